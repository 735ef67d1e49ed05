//! `cargo xtask setup`: installs what the build and the tests need, checking each step first
//! and doing only what is missing. A failed step says what failed and how to fix it by hand.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Debian packages the build, the tests, the demo and the benchmarks use, and why.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("cmake", "builds C dependencies of pingora"),
    ("nftables", "the nft data plane and its tests"),
    ("iproute2", "network namespaces, veth, bridges in tests"),
    ("conntrack", "flushing stale UDP conntrack entries"),
    (
        "ethtool",
        "turning off TX checksum offload in test topologies",
    ),
    (
        "util-linux",
        "nsenter for running commands in test namespaces",
    ),
    ("bpftool", "inspecting loaded eBPF programs and maps"),
    ("pebble", "ACME test CA for the ingress tests"),
    ("curl", "HTTP requests in the ingress tests and the demo"),
    ("python3", "runs the example apps the demo deploys"),
    (
        "openssl",
        "makes the self-signed certificate of examples/irc's TLS port",
    ),
    (
        "python3-grpcio",
        "the gRPC server and client of the ingress gRPC tests (tests/grpc)",
    ),
    ("runc", "the OCI runtime the agent runs every instance in"),
    ("tini", "the first process of every instance's container"),
    (
        "systemd",
        "systemd-socket-activate for the socket-activation test",
    ),
    (
        "nginx-light",
        "the reverse-proxy baseline of the ingress benchmark",
    ),
    ("wrk", "load generator of the ingress benchmark"),
    (
        "etcd-server",
        "the real etcd (3.4) the cluster-mode tests run, one member per node namespace",
    ),
    (
        "protobuf-compiler",
        "protoc, which the etcd-client crate's build needs",
    ),
    (
        "dpkg-dev",
        "dpkg-shlibdeps, which computes the .deb's library dependencies (cargo xtask package)",
    ),
    ("lintian", "checks the .deb (the package test)"),
    ("binutils", "strip, for the binaries in the .deb"),
    (
        "libprotobuf-dev",
        "protobuf's well-known .proto files (google/protobuf/descriptor.proto) the etcd-client build imports",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Project-local tool directory (the agent's build script looks here too).
const TOOLS_DIR: &str = "target/tools";

/// Runs every setup step in order.
pub fn run(root: &Path) -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker(root)?;
    prometheus_tools(root)?;
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !dpkg_installed(name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (name, why) in APT_PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
        eprintln!("setup: installing {name} ({why})");
    }
    let hint = format!("apt-get update && apt-get install -y {}", missing.join(" "));
    if !nix_is_root() {
        bail!("setup: packages missing and not running as root; install them with:\n  sudo {hint}");
    }
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd::run(&mut command)
    };
    apt(&["update", "-q"])
        .with_context(|| format!("setup: apt-get update failed; fix by hand:\n  {hint}"))?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
        .with_context(|| format!("setup: installing packages failed; fix by hand:\n  {hint}"))
}

fn dpkg_installed(package: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.ends_with("install ok installed"))
}

fn nix_is_root() -> bool {
    cmd::output(Command::new("id").arg("-u")).as_deref() == Some("0")
}

fn nightly_rust_src() -> Result<()> {
    let installed =
        cmd::output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .context("setup: the nightly toolchain is missing; install it with:\n  rustup toolchain install nightly --profile minimal")?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("setup: adding rust-src failed; fix by hand:\n  rustup component add rust-src --toolchain nightly")
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM and installs it under
/// `target/tools`, unless the right version is already there.
fn bpf_linker(root: &Path) -> Result<()> {
    let tools = root.join(TOOLS_DIR);
    let linker = tools.join("bin/bpf-linker");
    let version = cmd::output(Command::new(&linker).arg("--version"));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    let llvm_prefix = link_nightly_llvm(&tools)?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {}",
        llvm_prefix.display()
    );
    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .args(["--version", &format!("={BPF_LINKER_VERSION}")])
        .args(["--features", BPF_LINKER_LLVM_FEATURE])
        .arg("--root")
        .arg(&tools)
        .env("LLVM_PREFIX", &llvm_prefix);
    let hint = format!(
        "LLVM_PREFIX={} {}",
        llvm_prefix.display(),
        cmd::display(&install)
    );
    cmd::run(&mut install)
        .with_context(|| format!("setup: building bpf-linker failed; fix by hand:\n  {hint}"))?;
    cmd::output(Command::new(&linker).arg("--version"))
        .with_context(|| format!("setup: the installed {} does not run", linker.display()))?;
    Ok(())
}

/// Creates `TOOLS/llvm/lib/{libLLVM.so,<exact name>}` pointing at nightly's libLLVM and returns
/// `TOOLS/llvm` (the `LLVM_PREFIX` for bpf-linker; its rpath keeps pointing there).
fn link_nightly_llvm(tools: &Path) -> Result<PathBuf> {
    let sysroot = cmd::output(
        Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]),
    )
    .context(
        "setup: cannot find the nightly sysroot; check `rustup run nightly rustc --print sysroot`",
    )?;
    let sysroot_lib = Path::new(&sysroot).join("lib");
    let libllvm = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("setup: reading {}", sysroot_lib.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "setup: no libLLVM.so.* in {}; is the nightly toolchain complete?",
                sysroot_lib.display()
            )
        })?;
    let prefix = tools.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("setup: creating {}", lib.display()))?;
    let exact_name = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(exact_name)] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("setup: linking {}", link.display()))?;
    }
    Ok(prefix)
}

/// Where Debian's prometheus package is unpacked (`usr/bin/prometheus`, `usr/bin/promtool`).
const PROMETHEUS_DIR: &str = "target/tools/prometheus";

/// Debian's `prometheus` (2.42) binaries for the observability tests (`promtool` checks the
/// agent's metrics and the alert rules, a real Prometheus scrapes a test's agent). The package
/// is downloaded and unpacked, never installed: its postinst would start a Prometheus daemon
/// on this machine. Skipped when already unpacked.
fn prometheus_tools(root: &Path) -> Result<()> {
    let dir = root.join(PROMETHEUS_DIR);
    let bin = dir.join("usr/bin");
    if bin.join("prometheus").is_file() && bin.join("promtool").is_file() {
        return Ok(());
    }
    let debs = root.join(TOOLS_DIR).join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("setup: creating {}", debs.display()))?;
    eprintln!("setup: fetching prometheus (promtool and prometheus for the observability tests)");
    let download = || {
        let mut command = Command::new("apt-get");
        command.args(["download", "prometheus"]).current_dir(&debs);
        cmd::run(&mut command)
    };
    let hint = format!(
        "cd {} && apt-get download prometheus && dpkg-deb -x prometheus_*.deb {}",
        debs.display(),
        dir.display()
    );
    if download().is_err() {
        cmd::run(Command::new("apt-get").args(["update", "-q"]))
            .with_context(|| format!("setup: apt-get update failed; fix by hand:\n  {hint}"))?;
        download().with_context(|| {
            format!("setup: downloading prometheus failed; fix by hand:\n  {hint}")
        })?;
    }
    let deb = fs::read_dir(&debs)
        .with_context(|| format!("setup: reading {}", debs.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("prometheus_") && n.ends_with(".deb"))
        })
        .with_context(|| format!("setup: no prometheus_*.deb in {}", debs.display()))?;
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir)).with_context(|| {
        format!(
            "setup: unpacking {} failed; fix by hand:\n  {hint}",
            deb.display()
        )
    })?;
    cmd::output(Command::new(bin.join("promtool")).arg("--version"))
        .with_context(|| format!("setup: {} does not run", bin.join("promtool").display()))?;
    Ok(())
}
