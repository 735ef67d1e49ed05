//! `cargo xtask demo`: a whole node in network namespaces. A node namespace runs the real
//! agent (node ports on its eth0 through `--dataplane auto`, the HTTP ingress on NODE_IP:80,
//! sandboxes behind its own bridge); a client namespace sends traffic. The demo deploys the
//! two example apps `examples/hello-web` (HTTP, reached through a route) and
//! `examples/udp-echo` (a UDP "game server", 2 instances behind node port 7777) with the real
//! `miren` CLI, then prints every command it runs with its real output: curl through the route,
//! UDP round trips through the node port, `miren ports`, `miren endpoints` and a /metrics
//! excerpt. It stays up until Ctrl-C (`--once`: exits after the showcase, non-zero if a step
//! failed). Everything it creates is removed on exit, also on failure or Ctrl-C: the agent gets
//! SIGTERM (so it removes its sandboxes), then the namespaces are deleted.
//!
//! `--cluster` (`cargo xtask demo --cluster`) runs the 3-node showcase of `cluster.rs`
//! instead.

mod cluster;
mod node;
mod showcase;

use std::{
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Result, bail};

use crate::node::DemoNode;

fn main() -> ExitCode {
    let once = std::env::args().any(|arg| arg == "--once");
    let cluster = std::env::args().any(|arg| arg == "--cluster");
    let stop = match Stop::on_signals() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("demo: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = if cluster {
        cluster::run(once, &stop)
    } else {
        run(once, &stop)
    };
    let failures = match result {
        Ok(failures) => failures,
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if failures.is_empty() {
        println!("\ndemo finished: every step succeeded");
        ExitCode::SUCCESS
    } else {
        eprintln!("\ndemo finished with {} failed step(s):", failures.len());
        for failure in &failures {
            eprintln!("  - {failure}");
        }
        ExitCode::FAILURE
    }
}

/// Sets up, shows, waits (unless `once`) and cleans up; returns the failed showcase steps.
fn run(once: bool, stop: &Stop) -> Result<Vec<String>> {
    let node = DemoNode::start(stop)?;
    showcase::deploy(&node, stop)?;
    let mut failures = showcase::run(&node, stop);
    if !once && !stop.requested() {
        showcase::try_it_yourself(&node);
        stop.wait();
        println!();
    }
    if let Err(e) = node.shut_down() {
        println!("FAILED: {e:#}");
        failures.push(format!("cleanup: {e:#}"));
    }
    Ok(failures)
}

/// Set when SIGINT (Ctrl-C) or SIGTERM arrives; the demo then cleans up and exits.
#[derive(Debug)]
pub struct Stop {
    flag: &'static AtomicBool,
    signalled: mpsc::Receiver<()>,
}

impl Stop {
    /// Handles SIGINT and SIGTERM on a background thread from now on.
    fn on_signals() -> Result<Self> {
        static FLAG: AtomicBool = AtomicBool::new(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, signalled) = mpsc::channel();
        let (installed_tx, installed) = mpsc::channel();
        std::thread::spawn(move || {
            runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                let _ = installed_tx.send(());
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            FLAG.store(true, Ordering::SeqCst);
            eprintln!("\nstopping: cleaning up (the agent removes its sandboxes first)");
            let _ = tx.send(());
        });
        if installed.recv().is_err() {
            bail!("could not install the SIGINT/SIGTERM handlers");
        }
        Ok(Self {
            flag: &FLAG,
            signalled,
        })
    }

    /// True once a signal has arrived.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Fails with "interrupted" once a signal has arrived, so setup stops between steps.
    ///
    /// # Errors
    /// When a signal has arrived.
    pub fn check(&self) -> Result<()> {
        if self.requested() {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Sleeps `duration` or until a signal arrives.
    pub fn sleep(&self, duration: Duration) {
        if !self.requested() {
            let _ = self.signalled.recv_timeout(duration);
        }
    }

    /// Blocks until a signal arrives.
    pub fn wait(&self) {
        if !self.requested() {
            let _ = self.signalled.recv();
        }
    }
}
