//! Builds the eBPF programs in `miren-ebpf/` for `bpfel-unknown-none` (nightly + bpf-linker,
//! both installed by `cargo xtask setup`) and leaves the object in `OUT_DIR/miren-ebpf`, which
//! `src/bpf/mod.rs` embeds.
//!
//! `AYA_BUILD_SKIP=1` is an explicit opt-out for `cargo check`/clippy on machines without the
//! eBPF toolchain: the agent is then built with an empty object and refuses to load programs.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

/// Where `cargo xtask setup` installs bpf-linker (relative to the workspace root).
const TOOLS_BIN: &str = "target/tools/bin";
const SKIP_VAR: &str = "AYA_BUILD_SKIP";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("miren-agent has no parent directory")?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    println!("cargo::rustc-check-cfg=cfg(miren_ebpf_skipped)");
    println!("cargo::rerun-if-env-changed={SKIP_VAR}");
    println!(
        "cargo::rerun-if-changed={}",
        workspace.join("miren-common").display()
    );

    if env::var(SKIP_VAR).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!(
            "cargo::warning={SKIP_VAR} is set: building WITHOUT the eBPF object; this agent cannot load programs"
        );
        println!("cargo::rustc-cfg=miren_ebpf_skipped");
        fs::write(out_dir.join("miren-ebpf"), []).context("writing the empty eBPF placeholder")?;
        return Ok(());
    }

    let tools_bin = workspace.join(TOOLS_BIN);
    check_toolchain(&tools_bin)?;
    let path = env::var_os("PATH").unwrap_or_default();
    let path = env::join_paths(std::iter::once(tools_bin).chain(env::split_paths(&path)))?;
    // SAFETY: build scripts are single-threaded at this point; the variables are inherited by
    // the nested eBPF cargo build so rustc finds the project-local bpf-linker.
    // CARGO_TERM_QUIET keeps the nested build's progress lines out of cargo's warnings
    // (errors are still shown).
    unsafe {
        env::set_var("PATH", path);
        env::set_var("CARGO_TERM_QUIET", "true");
    }

    let ebpf_dir = workspace.join("miren-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 workspace path")?;
    let package = Package {
        name: "miren-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Nightly)
        .context("building the eBPF programs failed; run `cargo xtask setup`, then build again")?;
    let object = out_dir.join("miren-ebpf");
    if fs::metadata(&object).map(|m| m.len()).unwrap_or(0) == 0 {
        bail!("the eBPF build produced no object at {}", object.display());
    }
    Ok(())
}

/// Fails with the setup step to run when the nightly toolchain, its rust-src or bpf-linker is
/// missing, instead of a confusing error deep inside the nested build.
fn check_toolchain(tools_bin: &Path) -> anyhow::Result<()> {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        bail!(
            "the nightly Rust toolchain is missing; run `cargo xtask setup` (or `rustup toolchain install nightly`)"
        );
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!(
            "rust-src for nightly is missing; run `cargo xtask setup` (or `rustup component add rust-src --toolchain nightly`)"
        );
    }
    let on_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !tools_bin.join("bpf-linker").is_file() && !on_path {
        bail!(
            "bpf-linker not found in {} or on PATH; run `cargo xtask setup` (or set {SKIP_VAR}=1 to only check/lint without the eBPF object)",
            tools_bin.display()
        );
    }
    if tools_bin.join("bpf-linker").is_file() {
        println!(
            "cargo::rerun-if-changed={}",
            tools_bin.join("bpf-linker").display()
        );
    }
    Ok(())
}
