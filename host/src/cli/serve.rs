//! `ksi-host serve`: the daemon. HTTP on a loopback address and on a Unix socket in the data
//! dir, each behind [`api::access`] (token over TCP, rate limit, audit log); scheduled
//! backups; SIGTERM/SIGINT drain (stop claiming, let running steps finish within a grace
//! period, then exit 0).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::daemon::Host;

/// Arguments of `ksi-host serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TCP address to listen on
    #[arg(long, default_value = "127.0.0.1:8787", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Seconds running steps get to finish after SIGTERM
    #[arg(long, default_value_t = 30)]
    pub grace_secs: u64,
    /// The Claude CLI to run (default: KSI_CLAUDE_BIN, else `claude` on PATH, else fake-claude)
    #[arg(long, value_name = "PATH")]
    pub claude_bin: Option<std::path::PathBuf>,
    /// Socket for clients of the original KSI (default: config `compat_socket`, else
    /// <data dir>/ksi-compat.sock)
    #[arg(long, value_name = "PATH", conflicts_with = "no_compat")]
    pub compat_socket: Option<std::path::PathBuf>,
    /// Do not listen for clients of the original KSI
    #[arg(long)]
    pub no_compat: bool,
}

/// Path of the daemon's Unix socket.
pub fn socket_path(config: &Config) -> std::path::PathBuf {
    config.data_dir.join("ksi.sock")
}

/// Reloads the workflow definitions when a file of the definitions directory changes (a file
/// that fails validation is reported and its previous version keeps serving).
fn watch_definitions(host: &Host) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = host.refs.root().join("definitions");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Content changes only: loading the definitions opens and reads them.
        if ev.is_ok_and(|e| {
            crate::plugins::watch::is_content_change(&e.kind)
                && e.paths
                    .iter()
                    .any(|p| p.extension().is_some_and(|x| x == "toml"))
        }) {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let engine = host.engine.clone();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: editors write in several steps.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            let errors = engine.load_definitions(&dir).await;
            tracing::info!(errors = errors.len(), "workflow definitions reloaded");
        }
    });
    Ok(watcher)
}

/// Backs the database up every `every` into `backup_dir` (see
/// [`crate::store::backup::scheduled_backup`]), publishing `system.backup.completed` or
/// `system.backup.failed` after each run.
fn spawn_backups(
    config: &Config,
    host: &Host,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (db, dir, keep) = (
        config.db_path(),
        config.backup_dir.clone(),
        config.backup_keep,
    );
    let bus = host.bus.clone();
    tracing::info!(dir = %dir.display(), every = ?every, keep, "scheduled backups on");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let run = tokio::task::spawn_blocking({
                let (db, dir) = (db.clone(), dir.clone());
                move || crate::store::backup::scheduled_backup(&db, &dir, keep)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            let event = match run {
                Ok(r) => {
                    tracing::info!(
                        file = %r.backup.destination,
                        bytes = r.backup.bytes,
                        compressed = r.compressed.len(),
                        deleted = r.deleted.len(),
                        ms = r.duration_ms,
                        "scheduled backup done"
                    );
                    crate::bus::NewEvent::new(
                        "system.backup.completed",
                        serde_json::to_value(&r).unwrap_or_default(),
                    )
                }
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "scheduled backup failed");
                    crate::bus::NewEvent::new(
                        "system.backup.failed",
                        serde_json::json!({ "backup_dir": dir, "error": e }),
                    )
                }
            };
            if let Err(e) = bus.publish(event).await {
                tracing::warn!(error = %e, "could not publish the backup event");
            }
        }
    })
}

/// Runs the daemon until a signal, then drains.
pub async fn serve(config: Config, args: ServeArgs, host: Host) -> anyhow::Result<()> {
    // Opening the host compiled the plugins that had no cached machine code (Cranelift's
    // working memory, freed by now, stays in the allocator): hand it back to the system, so a
    // first start idles at the footprint of later ones (measured 48 MB -> see README).
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    let token_file = config.data_dir.join("api.token");
    if !args.listen.ip().is_loopback() && !token_file.exists() {
        anyhow::bail!(
            "refusing to listen on {} without an API token: anyone on the network could run Claude on your account. Create {} (mode 0600) or listen on 127.0.0.1",
            args.listen,
            token_file.display()
        );
    }
    if let Some(mode) = api::token::too_open(&config.data_dir) {
        tracing::warn!(
            file = %token_file.display(),
            mode = format!("{mode:o}"),
            "the API token file is readable by other users: chmod 600 it"
        );
    }
    let (stop, stop_rx) = watch::channel(false);
    let workers = host.spawn_workers(stop_rx.clone());
    let scheduler = tokio::spawn(crate::workflow::schedule::run(
        host.engine.clone(),
        stop_rx.clone(),
    ));
    let _definitions_watcher = watch_definitions(&host)?;
    // Retention, hourly: archived prompts, completed bus events older than
    // `bus_retention_secs` (dead letters and unfinished deliveries are kept), and audit log
    // entries older than `audit_retention_days`.
    {
        let exec = host.executor.clone();
        let bus = host.bus.clone();
        let retention = Duration::from_secs(config.bus_retention_secs);
        let audit_max_age_ms = (config.audit_retention_days as i64).saturating_mul(86_400_000);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let pruned = exec.prune_archive();
                if pruned > 0 {
                    tracing::info!(pruned, "archived prompts pruned");
                }
                match bus.prune(retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(events = n, "old completed events pruned"),
                    Err(e) => tracing::warn!(error = %e, "pruning old events failed"),
                }
                match crate::audit::prune(bus.store(), audit_max_age_ms).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(entries = n, "old audit log entries pruned"),
                    Err(e) => tracing::warn!(error = %e, "pruning the audit log failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
    }
    let state = AppState {
        store: host.store.clone(),
        bus: host.bus.clone(),
        refs: host.refs.clone(),
        engine: host.engine.clone(),
        started: Instant::now(),
        fanout: api::events::Fanout::new(host.store.clone(), host.bus.clone()),
        data_dir: config.data_dir.clone(),
        parts: Arc::new(vec![
            Arc::new(api::claude::ExecutorPart(host.executor.clone())) as Arc<dyn api::ApiPart>,
            Arc::new(api::claude::PluginsPart(host.plugins.clone())),
        ]),
    };
    let backups = config
        .backup_interval
        .map(|every| spawn_backups(&config, &host, every.0, stop_rx.clone()));
    let app = api::router(state);
    // The same routes on both listeners, each behind its own access rules.
    let audit = crate::audit::AuditLog::spawn(host.store.clone());
    let token = Arc::new(api::token::TokenFile::new(&config.data_dir));
    let rate = api::access::RateLimit::new(config.api_rate_per_s, config.api_rate_burst);
    let access = |listener| api::access::Access {
        listener,
        token: token.clone(),
        rate: rate.clone(),
        audit: audit.clone(),
        allowed_hosts: Arc::new(config.api_allowed_hosts.clone()),
    };
    let tcp_app = access(api::access::Listener::Tcp {
        beyond_loopback: !args.listen.ip().is_loopback(),
    })
    .wrap(app.clone());
    let unix_app = access(api::access::Listener::Unix).wrap(app);
    let tcp = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "listening on {} (is another daemon running? choose another --listen)",
                args.listen
            )
        })?;
    let sock = socket_path(&config);
    let _ = std::fs::remove_file(&sock); // a stale socket of a dead daemon (the data-dir lock is ours)
    let unix = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("binding {}", sock.display()))?;
    // The socket grants the whole API without a token: its owner only, whatever the umask.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private (0600)", sock.display()))?;
    }
    let compat =
        match api::compat::socket_path(&config, args.compat_socket.as_deref(), args.no_compat) {
            Some(path) => {
                let listener = api::compat::bind(&path)?;
                let state = api::compat::CompatState::new(
                    host.store.clone(),
                    host.bus.clone(),
                    host.refs.clone(),
                    host.executor.clone(),
                    config.data_dir.clone(),
                );
                tokio::spawn(api::compat::serve(listener, state, stop_rx.clone()));
                eprintln!(
                    "ksi-host: clients of the original KSI can connect to {}",
                    path.display()
                );
                Some(path)
            }
            None => None,
        };
    // The address bound (`--listen 127.0.0.1:0` picks a free port).
    let listen = tcp.local_addr().unwrap_or(args.listen);
    tracing::info!(listen = %listen, socket = %sock.display(), compat = ?compat, "ksi-host serving");
    eprintln!("ksi-host serving on http://{listen} and {}", sock.display());

    let shutdown = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let shutdown2 = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let tcp_server = tokio::spawn(
        axum::serve(
            tcp,
            tcp_app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .into_future(),
    );
    let unix_server = tokio::spawn(
        axum::serve(unix, unix_app)
            .with_graceful_shutdown(shutdown2)
            .into_future(),
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
    eprintln!(
        "ksi-host: draining (running steps have {} s to finish)",
        args.grace_secs
    );
    let _ = stop.send(true);
    // Running steps finish and commit; claimed-but-unstarted events are released by the next
    // start-up's recovery (the lock proves they are ours).
    if tokio::time::timeout(Duration::from_secs(args.grace_secs), workers)
        .await
        .is_err()
    {
        tracing::warn!("grace period over: steps still running will be re-run after restart");
    }
    // A plugin still running (in wasm, or looping on host calls) stops now: its thread must
    // not keep the process alive after the store closes.
    host.plugins.engine().interrupt_all();
    let _ = scheduler.await;
    // No Claude process outlives the daemon: what still runs is killed; its rows are
    // reconciled (retried, or completed from their log) at the next start.
    let killed = host.executor.shutdown().await;
    if killed > 0 {
        tracing::warn!(killed, "Claude processes stopped at shutdown");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp_server.await;
        let _ = unix_server.await;
    })
    .await;
    let _ = std::fs::remove_file(&sock);
    if let Some(path) = compat {
        let _ = std::fs::remove_file(path);
    }
    if let Some(b) = backups {
        // A backup in progress finishes (it is a consistent copy or nothing).
        let _ = b.await;
    }
    // Every answered mutating request has its audit entry on disk before the store closes.
    audit.flush().await;
    host.store.close();
    eprintln!("ksi-host: stopped");
    Ok(())
}
