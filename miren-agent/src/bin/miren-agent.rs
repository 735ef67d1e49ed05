//! `miren-agent`: the node daemon. See `miren_agent::agent`.

use anyhow::{Context as _, Result};
use clap::Parser;
use miren_agent::{
    agent_cli::{AgentCli, AgentCommand},
    settings::SettingsLayer,
};

/// mimalloc: the proxy allocates on every request (mostly inside Pingora); glibc's malloc
/// was ~11 % of the agent's CPU under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    match AgentCli::parse().command {
        // Before any runtime or thread: the shim lives as long as its instance.
        AgentCommand::LogShim(files) => {
            miren_agent::sandbox::logs::shim_main(&files);
            Ok(())
        }
        AgentCommand::Run(flags) => run(flags),
        AgentCommand::DefaultConfig => {
            print!("{}", miren_agent::settings::template::default_config());
            Ok(())
        }
        AgentCommand::PackageFiles { dir } => miren_agent::agent_cli::write_package_files(&dir)
            .with_context(|| format!("writing man pages and completions into {}", dir.display())),
    }
}

#[tokio::main]
async fn run(flags: SettingsLayer) -> Result<()> {
    // Log lines (one per HTTP request among them) are written by a thread of their own, so
    // the proxy's workers never wait on stderr; it writes whatever lines are queued in one
    // write(2) (the buffer is flushed after every batch); colour only on a terminal.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(
            64 << 10,
            std::io::stderr(),
        ));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer)
        .init();
    // Everything the agent creates is private to its user unless made wider on purpose: the
    // store (the apps' secrets), certificates, logs and all else under the state dir.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    miren_agent::agent::run(flags.resolve()?).await?;
    Ok(())
}
