//! `miren-agent`: the node daemon.
//!
//! Current scope (issue [F]): `run --iface IF…` loads the embedded eBPF object, attaches the
//! packet counter to each interface (native XDP, generic if the driver refuses) and logs the
//! counts until SIGINT/SIGTERM. The node-port data plane, store and API follow in later issues.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand};
use miren_agent::bpf::PacketCounter;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(version, about = "miren node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// External interface to attach to (repeatable).
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// Seconds between counter log lines.
        #[arg(long, default_value_t = 10)]
        report_interval: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Command::Run {
        ifaces,
        report_interval,
    } = Cli::parse().command;
    let mut counter = PacketCounter::load().context("loading the eBPF programs")?;
    for iface in &ifaces {
        let mode = match counter.attach(iface, XdpMode::Driver) {
            Ok(()) => "native",
            Err(native) => {
                tracing::warn!(%iface, error = %anyhow::Error::from(native), "native XDP refused; trying generic");
                counter
                    .attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching to {iface}"))?;
                "generic"
            }
        };
        tracing::info!(%iface, mode, "packet counter attached");
    }

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_secs(report_interval.max(1)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let counts = counter.counts()?;
                tracing::info!(packets = counts.packets, bytes = counts.bytes, "counters");
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    tracing::info!("shutting down; detaching programs");
    Ok(())
}
