//! `cargo xtask setup|build|test|demo|bench|package`: one-command setup, build, tests, demo,
//! benchmarks and the Debian package.
//!
//! Every command except `setup` runs `setup` first, so each works on a fresh machine.

mod cmd;
mod package;
mod setup;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Project tasks for miren-agent")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent).
    Setup,
    /// Set up, then build the agent (with its embedded eBPF object) and the CLI.
    Build,
    /// Set up, then build and run every unit and integration test, then `demo --once` and
    /// `demo --once --cluster`.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build in release mode, then run a benchmark (`dataplane`, `ingress` or `cluster`).
    Bench {
        /// Which benchmark.
        #[arg(default_value = "dataplane")]
        name: String,
        /// Which part of it: for `ingress`, `all` (the default), `proxy`, `routes`, `two-core`
        /// or `large-body`.
        group: Option<String>,
    },
    /// Set up, build the binaries, then the Debian package (`target/package/*.deb` unless
    /// `--out`).
    Package {
        /// Package the debug build instead of the release build (faster; for tests).
        #[arg(long)]
        debug: bool,
        /// Package the binaries as they are built now, without building them first.
        #[arg(long)]
        no_build: bool,
        /// Directory the .deb is written to [default: target/package].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Set up, build, then run the demo in network namespaces it creates.
    Demo {
        /// Exit after the showcase instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
        /// Run the 3-node cluster showcase (etcd, one agent per node) instead of one node.
        #[arg(long)]
        cluster: bool,
    },
}

/// `cargo` arguments that run the demo binary (its own arguments follow).
const DEMO_RUN: [&str; 6] = [
    "run",
    "--package",
    "miren-tests",
    "--bin",
    "miren-demo",
    "--",
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    setup::run(&root)?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Build => cmd::cargo(&root, &["build", "--bins"]),
        Task::Test { args } => {
            // Default members: everything but miren-ebpf, which the agent's build script builds
            // for the BPF target.
            cmd::cargo(&root, &["build", "--all-targets"])?;
            let mut test = vec!["test"];
            if !args.is_empty() {
                test.push("--");
                test.extend(args.iter().map(String::as_str));
            }
            cmd::cargo(&root, &test)?;
            if args.is_empty() {
                // The whole product end to end: the demos' showcases fail on any wrong step.
                cmd::cargo(&root, &[&DEMO_RUN[..], &["--once"]].concat())?;
                cmd::cargo(&root, &[&DEMO_RUN[..], &["--once", "--cluster"]].concat())?;
            }
            Ok(())
        }
        Task::Bench { name, group } => {
            // The benchmark starts the release agent binary.
            cmd::cargo(&root, &["build", "--release", "--bins"])?;
            let mut run = vec![
                "run",
                "--release",
                "--package",
                "miren-tests",
                "--bin",
                "miren-bench",
                "--",
                &name,
            ];
            run.extend(group.as_deref());
            cmd::cargo(&root, &run)
        }
        Task::Package {
            debug,
            no_build,
            out,
        } => {
            let profile = if debug {
                package::Profile::Debug
            } else {
                package::Profile::Release
            };
            let out = out.unwrap_or_else(|| root.join("target/package"));
            package::run(&root, profile, !no_build, &out).map(drop)
        }
        Task::Demo { once, cluster } => {
            // The demo starts the agent and the CLI binaries.
            cmd::cargo(&root, &["build", "--bins"])?;
            let mut demo = DEMO_RUN.to_vec();
            if once {
                demo.push("--once");
            }
            if cluster {
                demo.push("--cluster");
            }
            // Replaced by cargo, which replaces itself by the demo: Ctrl-C reaches only the
            // demo, which then cleans up before the shell prompt returns.
            cmd::exec_cargo(&root, &demo)
        }
    }
}

/// The workspace root (the parent of this crate's directory).
fn workspace_root() -> PathBuf {
    let xtask_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().map(PathBuf::from).unwrap_or(xtask_dir)
}
