//! `ksi-host`: the daemon and its administration commands.

use clap::{Parser, Subcommand};
use serde_json::json;

use super::events::EventsCmd;
use super::{GlobalArgs, init_logging, open, parse_json_arg, table};
use crate::bench;
use crate::config::SyncMode;
use crate::settings;
use crate::store::{self, migration_status};

/// KSI host: runs Claude agents and durable multi-step workflows.
#[derive(Debug, Parser)]
#[command(name = "ksi-host", version, about, propagate_version = true)]
pub struct HostCli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub cmd: HostCmd,
}

/// The subcommands of `ksi-host`.
#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Run the daemon: HTTP API, dashboard, engine, executor, plugins with hot reload
    Serve(super::serve::ServeArgs),
    /// Apply pending schema migrations (or show the schema version with --status)
    Migrate {
        /// Only show the current and latest version; change nothing
        #[arg(long)]
        status: bool,
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// Publish, follow and list bus events
    #[command(subcommand)]
    Events(EventsCmd),
    /// Copy the database while the daemon runs (online backup API), then check the copy
    Backup {
        /// A new file to write
        dest: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Replace the database with a backup after checking it (stop the daemon first); takes
    /// plain and gzip-compressed (`.db.gz`) backups
    Restore {
        src: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Index the conversation logs of an original KSI checkout (claude_logs/*.jsonl,
    /// var/logs/responses/*.jsonl) so `ksi sessions` and `ksi cost` see them; importing twice
    /// adds nothing
    ImportLogs {
        /// Root of the original KSI checkout
        dir: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show or rotate the API token that TCP clients must send (<data dir>/api.token)
    #[command(subcommand)]
    Token(TokenCmd),
    /// Show the audit log: every mutating API call, who made it, and what came of it
    Audit {
        /// Entries after this id (default: the newest --limit)
        #[arg(long, value_name = "ID")]
        since: Option<i64>,
        /// Most entries to show
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Check a plugin component or run one of its steps, without a daemon
    #[command(subcommand)]
    Plugin(super::plugins::PluginCmd),
    /// Read and change dynamic settings (the config table)
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Measure the bus, plugins, executor, workflows or the HTTP API
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Print a shell completion script: `ksi-host completions bash > /etc/bash_completion.d/ksi-host`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the HTTP API's OpenAPI document (or, with --markdown, the reference in docs/api.md)
    Openapi {
        /// Render it as Markdown: `ksi-host openapi --markdown > docs/api.md`
        #[arg(long)]
        markdown: bool,
    },
    /// Tools for developing and testing KSI itself
    #[command(subcommand, hide = true)]
    Dev(DevCmd),
}

/// `ksi-host token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Print the current token
    Show,
    /// Write a new random token (mode 0600) and print it; a running daemon accepts only the
    /// new one from its next request on
    Rotate,
}

/// `ksi-host config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Show all dynamic settings
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one setting
    Get { key: String },
    /// Change a setting (publishes system.config_change)
    Set {
        key: String,
        /// JSON value, e.g. 4 or '"sonnet"'
        value: String,
    },
}

/// `ksi-host bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// HTTP API: req/s and p50/p99 of GET /health, POST /events, GET /workflows/ID with
    /// keep-alive clients (as fast as possible, then at --rate); the daemon's RSS and idle CPU
    Api {
        /// Concurrent keep-alive connections
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds per phase (two phases per endpoint)
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Total requests/s of the paced phase
        #[arg(long, default_value_t = 5_000)]
        rate: u32,
        /// Seconds over which the idle daemon's CPU use is measured
        #[arg(long, default_value_t = 5.0)]
        idle_seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// Executor: per-call overhead and calls/s for 50 concurrent fake-claude calls, RSS
    Executor {
        /// Concurrent calls
        #[arg(long, default_value_t = 50)]
        calls: usize,
        /// Bursts of `calls` concurrent calls, one after the other; percentiles are over all
        /// their calls
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// How far below the daemon the CLIs run (`claude.nice`; default: the executor's 10).
        /// How much CPU the daemon keeps for its bookkeeping while 50 CLIs start at once
        /// depends on it
        #[arg(long)]
        nice: Option<i32>,
        #[arg(long)]
        json: bool,
    },
    /// Plugins: instantiate+call latency, compile and cached load times, hot-reload time
    Plugins {
        #[arg(long)]
        json: bool,
    },
    /// Workflow engine: durable steps/s and per-step latency (10-step echo workflows, 100 at
    /// once), and the time to resume 1,000 running instances after a restart
    Workflow {
        /// Concurrent instances
        #[arg(long, default_value_t = 100)]
        instances: usize,
        /// Instances to resume in the restart phase
        #[arg(long, default_value_t = 1000)]
        resume: usize,
        /// Use the in-process native echo instead of the WebAssembly echo plugin
        #[arg(long)]
        native: bool,
        /// Steps run concurrently
        #[arg(long, default_value_t = 16)]
        workers: usize,
        #[arg(long)]
        json: bool,
    },
    /// Durable bus: publish, batch publish, claim+ack throughput; publish->subscriber latency
    Bus {
        /// Events per phase
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Concurrent single-event publishers
        #[arg(long, default_value_t = 64)]
        publishers: usize,
        /// SQLite synchronous mode for the run
        #[arg(long, value_enum, default_value_t = SyncMode::Full)]
        sync: SyncMode,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

/// `ksi-host dev ...` (hidden)
#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Publish and consume in a loop; used by the crash test
    Soak(super::soak::SoakArgs),
    /// Start N Claude calls and wait for them; used by the daemon-kill test
    SpawnMany(super::claude::SpawnManyArgs),
    /// Settle the Claude processes a dead daemon left behind (start-up reconciliation)
    Reconcile {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the `ksi-host` binary. Returns the exit code.
pub fn main() -> i32 {
    let cli = HostCli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => super::report_error(&e),
    }
}

fn run(cli: HostCli) -> anyhow::Result<()> {
    if let HostCmd::Completions { shell } = cli.cmd {
        return super::print_completions::<HostCli>(shell);
    }
    let mut config = cli.global.config()?;
    // One-shot commands print their own output; only the daemon logs at info by default.
    if !matches!(cli.cmd, HostCmd::Serve(_)) && !super::log_level_chosen(&cli.global) {
        config.log_level = "warn".into();
    }
    if matches!(cli.cmd, HostCmd::Serve(_)) {
        super::init_daemon_logging(&config)?;
    } else {
        init_logging(&config);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            HostCmd::Serve(args) => {
                let bin = super::run::claude_bin_with_notice(args.claude_bin.clone());
                let host = crate::daemon::Host::open(config.clone(), bin, true).await?;
                super::serve::serve(config, args, host).await
            }
            HostCmd::Plugin(cmd) => super::plugins::run(cmd, &config),
            HostCmd::Token(cmd) => token_cmd(&config, cmd),
            HostCmd::Audit { since, limit, json } => audit_cmd(open(config)?, since, limit, json),
            HostCmd::Openapi { markdown } => {
                if markdown {
                    let doc: serde_json::Value = serde_json::from_str(crate::api::OPENAPI)?;
                    print!("{}", crate::api::reference::markdown(&doc).map_err(anyhow::Error::msg)?);
                } else {
                    print!("{}", crate::api::OPENAPI);
                }
                Ok(())
            }
            HostCmd::Backup { dest, json } => {
                let r = store::backup::backup(&config.db_path(), &dest)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    println!("backed up {} to {} ({} bytes, schema {}, integrity {})", r.source, r.destination, r.bytes, r.schema_version, r.integrity);
                }
                Ok(())
            }
            HostCmd::Restore { src, json } => {
                store::prepare_data_dir(&config.data_dir)?;
                let _lock = crate::daemon::DataDirLock::acquire(&config.data_dir)?;
                let r = store::backup::restore(&src, &config.db_path())?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    println!("restored {} from {} (schema {}, integrity {}); the previous database is kept as ksi.db.before-restore", r.destination, r.source, r.schema_version, r.integrity);
                }
                Ok(())
            }
            HostCmd::Bench(BenchCmd::Executor {
                calls,
                rounds,
                nice,
                json,
            }) => {
                store::prepare_data_dir(&config.data_dir)?;
                let (fake, _) = super::run::choose_claude_bin(Some(
                    std::env::current_exe()?.with_file_name("fake-claude"),
                ));
                let dir = std::env::var_os("KSI_BENCH_DIR")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| config.data_dir.join("bench-executor"));
                let r = bench::bench_executor(&dir, &fake, calls, rounds, nice).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    super::print_json_table(&r);
                }
                Ok(())
            }
            HostCmd::Bench(BenchCmd::Api {
                clients,
                seconds,
                rate,
                idle_seconds,
                json,
            }) => {
                if clients == 0 || rate == 0 || seconds <= 0.0 || idle_seconds <= 0.0 {
                    anyhow::bail!("--clients, --rate, --seconds and --idle-seconds must be greater than 0");
                }
                let exe = std::env::current_exe()?;
                let opts = bench::api::ApiBenchOptions { clients, seconds, rate, idle_seconds };
                let r = bench::api::run(&exe, &exe.with_file_name("fake-claude"), &config.data_dir, &opts).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print_api_bench(&r);
                }
                Ok(())
            }
            HostCmd::Bench(BenchCmd::Plugins { json }) => {
                let r =
                    tokio::task::spawn_blocking(crate::plugins::bench::try_bench_plugins).await??;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    super::print_json_table(&r);
                }
                Ok(())
            }
            HostCmd::Migrate { status, json } => migrate(&config, status, json),
            HostCmd::ImportLogs { dir, json } => {
                let o = open(config)?;
                let r = crate::claude::import::import_logs(&o.store, &o.refs, &dir).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    println!("{}", crate::claude::import::render(&r));
                }
                o.store.close();
                Ok(())
            }
            HostCmd::Events(cmd) => super::events::run(cmd, open(config)?).await,
            HostCmd::Config(cmd) => config_cmd(cmd, open(config)?).await,
            HostCmd::Bench(BenchCmd::Bus {
                events,
                publishers,
                sync,
                json,
            }) => {
                store::prepare_data_dir(&config.data_dir)?;
                let opts = bench::bus::BusBenchOptions {
                    events,
                    publishers,
                    sync,
                    ..Default::default()
                };
                let r = bench::bus::run(&config.data_dir.join("bench"), &opts).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    let mut t = table(&["measure", "value"]);
                    t.add_row(vec!["events per phase".into(), r.events.to_string()]);
                    t.add_row(vec!["payload".into(), format!("{} bytes", r.payload_bytes)]);
                    t.add_row(vec!["synchronous".into(), r.synchronous.clone()]);
                    t.add_row(vec![
                        format!("publish ({} concurrent, 1 event each)", r.publishers),
                        format!("{:.0} /s", r.publish_per_s),
                    ]);
                    t.add_row(vec![
                        format!("publish (batches of {})", r.batch_size),
                        format!("{:.0} /s", r.publish_batch_per_s),
                    ]);
                    t.add_row(vec![
                        "claim + ack".into(),
                        format!("{:.0} /s", r.claim_ack_per_s),
                    ]);
                    t.add_row(vec![
                        format!("publish -> subscriber p50 (at {}/s)", r.e2e_rate_per_s),
                        format!("{:.3} ms", r.e2e_p50_ms),
                    ]);
                    t.add_row(vec![
                        "publish -> subscriber p99".into(),
                        format!("{:.3} ms", r.e2e_p99_ms),
                    ]);
                    println!("{t}");
                }
                Ok(())
            }
            HostCmd::Bench(BenchCmd::Workflow {
                instances,
                resume,
                native,
                workers,
                json,
            }) => {
                store::prepare_data_dir(&config.data_dir)?;
                let dir = config.data_dir.join("bench-workflow");
                let (runner, handler): (std::sync::Arc<dyn crate::workflow::StepRunner>, &str) =
                    if native {
                        (
                            std::sync::Arc::new(bench::workflow::NativeEcho),
                            "native.echo",
                        )
                    } else {
                        // The WebAssembly echo plugin: every step instantiates and calls a component.
                        let pdir = config.data_dir.join("bench-plugins");
                        crate::plugins::bundled::install_bundled(&pdir.join("plugins"))?;
                        let rt = crate::plugins::PluginRuntime::new(
                            crate::plugins::RuntimeConfig::for_data_dir(&pdir),
                            std::sync::Arc::new(crate::daemon::NoStep),
                            std::sync::Arc::new(crate::plugins::RecordingEvents::default()),
                        )?;
                        rt.load_file(&pdir.join("plugins/echo.wasm"))?;
                        (
                            std::sync::Arc::new(crate::workflow::PluginRunner::new(rt)),
                            "echo.echo",
                        )
                    };
                let r =
                    bench::workflow::run(&dir, runner, handler, instances, resume, workers).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    let mut t = table(&["measure", "value"]);
                    t.add_row(vec!["handler".into(), r.handler.clone()]);
                    t.add_row(vec![
                        "workload".into(),
                        format!(
                            "{} instances x {} steps, {} workers",
                            r.instances, r.steps_per_instance, r.workers
                        ),
                    ]);
                    t.add_row(vec![
                        "durable steps".into(),
                        format!("{:.0} /s", r.steps_per_s),
                    ]);
                    t.add_row(vec![
                        "step p50 / p99".into(),
                        format!("{:.1} / {:.1} ms", r.step_p50_ms, r.step_p99_ms),
                    ]);
                    t.add_row(vec![
                        format!("resume {} instances", r.resume_instances),
                        format!("{:.0} ms", r.resume_ms),
                    ]);
                    println!("{t}");
                }
                Ok(())
            }
            HostCmd::Dev(DevCmd::Soak(args)) => super::soak::run(args, open(config)?).await,
            HostCmd::Dev(DevCmd::SpawnMany(args)) => {
                super::claude::spawn_many(args, open(config)?).await
            }
            HostCmd::Dev(DevCmd::Reconcile { json }) => {
                super::claude::reconcile(open(config)?, json)
                    .await
                    .map(|_| ())
            }
            HostCmd::Completions { .. } => unreachable!("handled before the runtime starts"),
        }
    })
}

fn token_cmd(config: &crate::config::Config, cmd: TokenCmd) -> anyhow::Result<()> {
    use crate::api::token;
    match cmd {
        TokenCmd::Show => match token::read(&config.data_dir)? {
            Some(t) => println!("{t}"),
            None => anyhow::bail!(
                "there is no API token in {} (the API is open on loopback); create one with `ksi-host token rotate`",
                config.data_dir.display()
            ),
        },
        TokenCmd::Rotate => {
            store::prepare_data_dir(&config.data_dir)?;
            let t = token::rotate(&config.data_dir)?;
            println!("{t}");
            eprintln!(
                "wrote {} ({}); a running daemon takes it from its next request on, and the old token stops working",
                token::token_path(&config.data_dir).display(),
                token::token_id(&t)
            );
        }
    }
    Ok(())
}

fn audit_cmd(o: super::Opened, since: Option<i64>, limit: usize, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=crate::api::MAX_LIMIT).contains(&limit),
        "--limit must be between 1 and {}",
        crate::api::MAX_LIMIT
    );
    let rows = o.store.read(|c| crate::audit::list(c, since, limit))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!(
            "the audit log is empty{}",
            if since.is_some() {
                " after that id"
            } else {
                ""
            }
        );
    } else {
        let mut t = table(&[
            "id",
            "when (UTC)",
            "who",
            "request",
            "status",
            "resource",
            "body",
        ]);
        for r in rows {
            let e = r.entry;
            let who = match e.peer {
                Some(p) if e.client != p => format!("{} from {p}", e.client),
                _ => e.client,
            };
            let when = chrono::DateTime::from_timestamp_millis(e.at)
                .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            t.add_row(vec![
                r.id.to_string(),
                when,
                who,
                format!("{} {}", e.method, super::ellipsize(&e.path, 48)),
                e.status.to_string(),
                e.resource.unwrap_or_default(),
                super::ellipsize(&e.summary.unwrap_or_default(), 60),
            ]);
        }
        println!("{t}");
    }
    o.store.close();
    Ok(())
}

/// The table of `ksi-host bench api`.
fn print_api_bench(r: &bench::api::ApiBenchReport) {
    let mut t = table(&[
        "endpoint", "phase", "req/s", "p50 ms", "p99 ms", "max ms", "errors",
    ]);
    for e in &r.endpoints {
        for (phase, p) in [
            (format!("{} clients, flat out", r.clients), &e.ceiling),
            (format!("paced at {}/s", r.rate_per_s), &e.paced),
        ] {
            t.add_row(vec![
                e.endpoint.clone(),
                phase,
                format!("{:.0}", p.req_per_s),
                format!("{:.2}", p.p50_ms),
                format!("{:.2}", p.p99_ms),
                format!("{:.1}", p.max_ms),
                p.errors.to_string(),
            ]);
        }
    }
    println!("{t}");
    let yes = |v: &serde_json::Value| if v == true { "met" } else { "MISSED" };
    println!(
        "daemon RSS: idle {:.1} MB (target < 40 MB: {}), under load {:.1} MB, after {:.1} MB",
        r.idle_rss_mb,
        yes(&r.meets_targets["idle_rss"]),
        r.load_rss_mb,
        r.after_rss_mb
    );
    println!(
        "daemon idle CPU: {:.2}% of a core over {} s, {:.0} wakeups/s (target ≈ 0: {})",
        r.idle_cpu_percent,
        r.idle_seconds,
        r.idle_wakeups_per_s,
        yes(&r.meets_targets["idle_cpu"])
    );
    println!(
        "p99 < 10 ms at 5,000 req/s on every endpoint: {}",
        yes(&r.meets_targets["paced_p99"])
    );
    println!(
        "POST /events p99 at 200 req/s: {:.2} ms, with 1,000 idle stream clients {:.2} ms (target < 2×: {})",
        r.publish_p99_ms,
        r.publish_p99_ms_with_1000_streams,
        yes(&r.meets_targets["publish_with_streams"])
    );
}

fn migrate(config: &crate::config::Config, status_only: bool, json: bool) -> anyhow::Result<()> {
    let path = config.db_path();
    if !status_only {
        let st = migration_status(&path)?;
        let store = crate::store::Store::open(config)?;
        store.close();
        if !json && !st.pending.is_empty() {
            for m in &st.pending {
                println!("applied {m}");
            }
        }
    }
    let st = migration_status(&path)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "database": path,
                "current": st.current,
                "latest": st.latest,
                "applied": st.applied,
                "pending": st.pending,
            }))?
        );
    } else {
        println!(
            "{}: schema version {} of {}{}",
            path.display(),
            st.current,
            st.latest,
            if st.pending.is_empty() {
                " (up to date)".to_string()
            } else {
                format!(
                    ", pending: {} (run `ksi-host migrate`)",
                    st.pending.join(", ")
                )
            }
        );
    }
    Ok(())
}

async fn config_cmd(cmd: ConfigCmd, o: super::Opened) -> anyhow::Result<()> {
    match cmd {
        ConfigCmd::List { json } => {
            let all = settings::list(&o.store)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no dynamic settings stored (defaults apply)");
            } else {
                let mut t = table(&["key", "value", "updated"]);
                for s in all {
                    t.add_row(vec![s.key, s.value.to_string(), super::clock(s.updated_at)]);
                }
                println!("{t}");
            }
        }
        ConfigCmd::Get { key } => match settings::get(&o.store, &key)? {
            Some(v) => println!("{v}"),
            None => anyhow::bail!("no setting named {key:?}; `ksi-host config list` shows them"),
        },
        ConfigCmd::Set { key, value } => {
            let v = parse_json_arg("the value", &value)?;
            let id = settings::set(&o.store, &key, v, None).await?;
            println!("{key} set (event {id})");
        }
    }
    Ok(())
}
