//! `ksi`: the KSI client.

use clap::{Parser, Subcommand};
use ksi_host::cli::events::EventsCmd;
use ksi_host::cli::{GlobalArgs, init_logging, open, report_error};

/// KSI client: follow and publish events, run workflows, watch agents.
#[derive(Debug, Parser)]
#[command(name = "ksi", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a workflow and follow it live, then print its result
    Run(ksi_host::cli::run::RunArgs),
    /// Workflow instances, newest first
    Workflows {
        /// Only this status (running, paused, completed, failed, cancelled)
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Start workflows on a cron schedule: add, list, rm
    #[command(subcommand)]
    Schedule(ksi_host::cli::workflow::ScheduleCmd),
    /// Show, cancel, pause, resume or retry one workflow instance
    #[command(subcommand)]
    Workflow(ksi_host::cli::workflow::WorkflowCmd),
    #[command(flatten)]
    Claude(ksi_host::cli::claude::ClaudeCmd),
    /// Plugins of the data dir: name, version, steps, file, hash, loaded-at
    #[command(subcommand)]
    Plugins(PluginsCmd),
    /// Create a plugin crate (`ksi plugin new NAME`), check or run one
    #[command(subcommand)]
    Plugin(ksi_host::cli::plugins::PluginCmd),
    /// Publish, follow and list bus events of the data dir
    #[command(subcommand)]
    Events(EventsCmd),
}

#[derive(Debug, Subcommand)]
enum PluginsCmd {
    /// List the plugins: name, version, steps, file, hash, loaded-at
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = (|| {
        let mut config = cli.global.config()?;
        // The client's own output is the interface: only warnings go to the log unless asked.
        if !ksi_host::cli::log_level_chosen(&cli.global) {
            config.log_level = "warn".into();
        }
        init_logging(&config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            match cli.cmd {
                Cmd::Run(args) => {
                    // A running daemon owns the data dir: submit to it and follow its stream.
                    if let Some(client) =
                        ksi_host::cli::client::DaemonClient::find(&config.data_dir).await
                    {
                        let v = ksi_host::cli::run::run_on_daemon(&client, &args, &config.data_dir)
                            .await?;
                        if v["status"] != "completed" {
                            anyhow::bail!("workflow {} ended {}", v["id"], v["status"]);
                        }
                        return Ok(());
                    }
                    let bin = ksi_host::cli::run::claude_bin_with_notice(args.claude_bin.clone());
                    let host = ksi_host::daemon::Host::open(config, bin, false).await?;
                    let v = ksi_host::cli::run::run_in_process(&host, &args).await?;
                    if v.status != "completed" {
                        anyhow::bail!("workflow {} ended {}", v.id, v.status);
                    }
                    Ok(())
                }
                Cmd::Workflows {
                    status,
                    limit,
                    json,
                } => ksi_host::cli::workflow::list(open(config)?, status, limit, json).await,
                Cmd::Schedule(cmd) => ksi_host::cli::workflow::schedule(cmd, open(config)?).await,
                Cmd::Workflow(cmd) => ksi_host::cli::workflow::run(cmd, open(config)?).await,
                Cmd::Claude(cmd) => ksi_host::cli::claude::run(cmd, open(config)?).await,
                Cmd::Plugins(PluginsCmd::List { json }) => {
                    ksi_host::cli::plugins::list(&config, json)
                }
                Cmd::Plugin(cmd) => ksi_host::cli::plugins::run(cmd),
                Cmd::Events(cmd) => ksi_host::cli::events::run(cmd, open(config)?).await,
            }
        })
    })();
    if let Err(e) = result {
        std::process::exit(report_error(&e));
    }
}
