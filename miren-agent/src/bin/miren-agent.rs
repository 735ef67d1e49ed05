//! `miren-agent`: the node daemon. See `miren_agent::agent`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use miren_agent::settings::SettingsLayer;

/// mimalloc: the proxy allocates on every request (mostly inside Pingora); glibc's malloc
/// was ~11 % of the agent's CPU under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "miren node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once, at start")]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run(SettingsLayer),
    /// Write an instance's output (stdin) to size-capped, rotated log files until EOF (started
    /// by the agent for each instance).
    #[command(hide = true)]
    LogShim(miren_agent::sandbox::logs::LogFiles),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        // Before any runtime or thread: the shim lives as long as its instance.
        Command::LogShim(files) => {
            miren_agent::sandbox::logs::shim_main(&files);
            Ok(())
        }
        Command::Run(flags) => run(flags),
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
