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
    /// Publish, follow and list bus events of the data dir
    #[command(subcommand)]
    Events(EventsCmd),
}

fn main() {
    let cli = Cli::parse();
    let result = (|| {
        let config = cli.global.config()?;
        init_logging(&config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            match cli.cmd {
                Cmd::Events(cmd) => ksi_host::cli::events::run(cmd, open(config)?).await,
            }
        })
    })();
    if let Err(e) = result {
        std::process::exit(report_error(&e));
    }
}
