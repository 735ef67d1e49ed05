//! `miren-agent`: the node daemon. See `miren_agent::agent`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use miren_agent::settings::SettingsLayer;

#[derive(Debug, Parser)]
#[command(version, about = "miren node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run(SettingsLayer),
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Command::Run(flags) = Cli::parse().command;
    miren_agent::agent::run(flags.resolve()?).await?;
    Ok(())
}
