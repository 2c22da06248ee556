//! `ksi`: the KSI client. Every command talks to the daemon's HTTP API — over the data dir's
//! Unix socket, or over HTTP with `--url` — and reads the data dir in process when no daemon
//! runs (see `ksi_host::cli::client`).

use clap::{Parser, Subcommand};
use ksi_host::cli::client::{self, ClientArgs, DaemonClient, Need};
use ksi_host::cli::events::EventsCmd;
use ksi_host::cli::{GlobalArgs, init_logging, report_error};

/// KSI client: run workflows, talk to Claude agents, follow and publish events.
///
/// Talks to the daemon of --data-dir over its Unix socket, or to the daemon at --url; without
/// a daemon, listings read the data dir directly and `run`/`spawn` do the work in process.
#[derive(Debug, Parser)]
#[command(name = "ksi", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a workflow and follow it live, then print its result
    Run(ksi_host::cli::run::RunArgs),
    /// Workflow instances, newest first
    Workflows {
        /// Only this status (pending, running, paused, completed, failed, cancelled)
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
    /// Plugins: name, version, steps, file, hash, loaded-at
    #[command(subcommand)]
    Plugins(PluginsCmd),
    /// Create a plugin crate (`ksi plugin new NAME`), check or run one
    #[command(subcommand)]
    Plugin(ksi_host::cli::plugins::PluginCmd),
    /// Publish, follow and list bus events
    #[command(subcommand)]
    Events(EventsCmd),
    /// Print a shell completion script: `ksi completions bash > /etc/bash_completion.d/ksi`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum PluginsCmd {
    /// List the plugins: name, version, steps, file, hash, loaded-at
    List {
        #[arg(long)]
        json: bool,
    },
}

impl Cmd {
    /// What the command needs, and its name for messages.
    fn need(&self) -> (Need, &'static str) {
        use ksi_host::cli::claude::{AgentCmd, ClaudeCmd};
        use ksi_host::cli::workflow::{ScheduleCmd, WorkflowCmd};
        match self {
            Cmd::Workflow(WorkflowCmd::Show { .. }) => (Need::Read, "workflow show"),
            Cmd::Workflow(_) => (Need::Daemon, "workflow"),
            Cmd::Schedule(ScheduleCmd::List { .. }) => (Need::Read, "schedule list"),
            Cmd::Schedule(_) => (Need::Daemon, "schedule"),
            Cmd::Claude(ClaudeCmd::Agent(AgentCmd::Send { .. })) => (Need::Daemon, "agent send"),
            Cmd::Events(EventsCmd::Publish { .. }) => (Need::Daemon, "events publish"),
            _ => (Need::Read, "this command"),
        }
    }
}

async fn connect(
    cli_client: &ClientArgs,
    config: &ksi_host::config::Config,
    cmd: &Cmd,
) -> anyhow::Result<DaemonClient> {
    let (need, name) = cmd.need();
    client::connect(cli_client, config, need, name).await
}

fn main() {
    // Everything KSI writes is private (prompts, answers, the token), whatever the umask.
    ksi_host::store::private_umask();
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        std::process::exit(match ksi_host::cli::print_completions::<Cli>(shell) {
            Ok(()) => 0,
            Err(e) => report_error(&e),
        });
    }
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
            let args = cli.client;
            match cli.cmd {
                Cmd::Run(run) => {
                    // A running daemon owns the data dir (or one is starting on it): submit
                    // to it and follow its stream.
                    let daemon = match client::find_daemon(&args, &config).await? {
                        Some(d) => Some(d),
                        None if args.url.is_none() => {
                            client::wait_for_starting_daemon(&config.data_dir).await?
                        }
                        None => None,
                    };
                    if let Some(daemon) = daemon {
                        let local = (!daemon.is_remote()).then_some(config.data_dir.as_path());
                        let v = ksi_host::cli::run::run_on_daemon(&daemon, &run, local).await?;
                        if v["status"] != "completed" {
                            anyhow::bail!("workflow {} ended {}", v["id"], v["status"]);
                        }
                        return Ok(());
                    }
                    let bin = ksi_host::cli::run::claude_bin_with_notice(run.claude_bin.clone());
                    let host = ksi_host::daemon::Host::open(config, bin, false).await?;
                    let v = ksi_host::cli::run::run_in_process(&host, &run).await?;
                    if v.status != "completed" {
                        anyhow::bail!("workflow {} ended {}", v.id, v.status);
                    }
                    Ok(())
                }
                Cmd::Plugins(PluginsCmd::List { json }) => {
                    // Without a daemon, load the data dir's plugins here the way it would.
                    match client::find_daemon(&args, &config).await? {
                        Some(daemon) => ksi_host::cli::plugins::list_client(&daemon, json).await,
                        None => ksi_host::cli::plugins::list(&config, json),
                    }
                }
                // Works on files only: no daemon, no database.
                Cmd::Plugin(cmd) => ksi_host::cli::plugins::run(cmd, &config),
                Cmd::Completions { .. } => unreachable!("handled before start-up"),
                cmd => {
                    let c = connect(&args, &config, &cmd).await?;
                    match cmd {
                        Cmd::Workflows {
                            status,
                            limit,
                            json,
                        } => ksi_host::cli::workflow::list(&c, status, limit, json).await,
                        Cmd::Schedule(cmd) => ksi_host::cli::workflow::schedule(cmd, &c).await,
                        Cmd::Workflow(cmd) => ksi_host::cli::workflow::run(cmd, &c).await,
                        Cmd::Claude(cmd) => ksi_host::cli::claude::run(cmd, &c).await,
                        Cmd::Events(cmd) => ksi_host::cli::events::run_client(cmd, &c).await,
                        Cmd::Run(_)
                        | Cmd::Plugins(_)
                        | Cmd::Plugin(_)
                        | Cmd::Completions { .. } => {
                            unreachable!("dispatched above")
                        }
                    }
                }
            }
        })
    })();
    if let Err(e) = result {
        std::process::exit(report_error(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
