//! `ksi-host serve`: the daemon. HTTP on a loopback address and on a Unix socket in the data
//! dir; SIGTERM/SIGINT drain (stop claiming, let running steps finish within a grace period,
//! then exit 0).

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
        if ev.is_ok_and(|e| {
            e.paths
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

/// Runs the daemon until a signal, then drains.
pub async fn serve(config: Config, args: ServeArgs, host: Host) -> anyhow::Result<()> {
    let token_file = config.data_dir.join("api.token");
    if !args.listen.ip().is_loopback() && !token_file.exists() {
        anyhow::bail!(
            "refusing to listen on {} without an API token: anyone on the network could run Claude on your account. Create {} (mode 0600) or listen on 127.0.0.1",
            args.listen,
            token_file.display()
        );
    }
    let (stop, stop_rx) = watch::channel(false);
    let workers = host.spawn_workers(stop_rx.clone());
    let scheduler = tokio::spawn(crate::workflow::schedule::run(
        host.engine.clone(),
        stop_rx.clone(),
    ));
    let _definitions_watcher = watch_definitions(&host)?;
    // Retention, hourly: archived prompts, and completed bus events older than
    // `bus_retention_secs` (dead letters and unfinished deliveries are kept).
    {
        let exec = host.executor.clone();
        let bus = host.bus.clone();
        let retention = Duration::from_secs(config.bus_retention_secs);
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
        data_dir: config.data_dir.clone(),
        parts: Arc::new(vec![
            Arc::new(api::claude::ExecutorPart(host.executor.clone())) as Arc<dyn api::ApiPart>,
            Arc::new(api::claude::PluginsPart(host.plugins.clone())),
        ]),
    };
    let app = api::router(state);
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
    tracing::info!(listen = %args.listen, socket = %sock.display(), compat = ?compat, "ksi-host serving");
    eprintln!(
        "ksi-host serving on http://{} and {}",
        args.listen,
        sock.display()
    );

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
        axum::serve(tcp, app.clone())
            .with_graceful_shutdown(shutdown)
            .into_future(),
    );
    let unix_server = tokio::spawn(
        axum::serve(unix, app)
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
    host.store.close();
    eprintln!("ksi-host: stopped");
    Ok(())
}
