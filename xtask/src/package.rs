//! `cargo xtask package`: the Debian package of the agent and the CLI.
//!
//! The tree is staged under `target/package/` and built with `dpkg-deb`: both binaries
//! (stripped), the systemd units of `packaging/`, the commented default config
//! `/etc/miren/agent.toml` (`miren-agent default-config`), man pages and bash/zsh/fish
//! completions (`miren-agent package-files`, generated from the clap definitions), the
//! copyright file and a Debian changelog. Library dependencies come from `dpkg-shlibdeps`.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// The package's name.
const NAME: &str = "miren-agent";
/// Tools the agent runs (the data plane, the sandboxes) besides the libraries it links.
const RUNTIME_DEPENDS: &str = "nftables, iproute2, conntrack, runc, tini";
/// The maintainer field.
const MAINTAINER: &str = "miren-agent developers <miren-agent@lists.example.org>";

/// Which build of the binaries goes into the package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `--release`: what a node should run.
    Release,
    /// The debug build (faster to build; for tests of the packaging itself).
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

/// Builds the binaries in `profile` (when `build`), then the .deb in `out_dir`; returns its
/// path.
pub fn run(root: &Path, profile: Profile, build: bool, out_dir: &Path) -> Result<PathBuf> {
    if build {
        let mut args = vec!["build", "--bins"];
        if profile == Profile::Release {
            args.push("--release");
        }
        cmd::cargo(root, &args)?;
    }
    // xtask's own version is the workspace's (`version.workspace = true`).
    let version = env!("CARGO_PKG_VERSION");
    let arch = cmd::output(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture failed: is this a Debian system?")?;
    let stage = root
        .join("target/package")
        .join(format!("{NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let bin_dir = root.join("target").join(profile.dir());
    for binary in ["miren-agent", "miren"] {
        let dest = stage.join("usr/bin").join(binary);
        create_parent(&dest)?;
        cmd::run(
            Command::new("strip")
                .arg("--strip-unneeded")
                .arg("-o")
                .arg(&dest)
                .arg(bin_dir.join(binary)),
        )?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
    }
    let agent = stage.join("usr/bin/miren-agent");
    stage_generated(&stage, &agent)?;
    for unit in ["miren-agent.service", "miren-agent.socket"] {
        copy(
            &root.join("packaging").join(unit),
            &stage.join("lib/systemd/system").join(unit),
        )?;
    }
    let doc = stage.join("usr/share/doc").join(NAME);
    copy(&root.join("packaging/copyright"), &doc.join("copyright"))?;
    write(
        &doc.join("changelog.gz"),
        &gzip(debian_changelog(version).as_bytes())?,
    )?;
    let depends = library_depends(&stage)?;
    write_control(&stage, version, &arch, &depends)?;
    fs::create_dir_all(out_dir)?;
    let deb = out_dir.join(format!("{NAME}_{version}_{arch}.deb"));
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    eprintln!("built {}", deb.display());
    Ok(deb)
}

/// The files the agent generates from its own definitions: the default config, the man
/// pages (gzipped) and the completions, each where Debian expects it.
fn stage_generated(stage: &Path, agent: &Path) -> Result<()> {
    let config = cmd::output(Command::new(agent).arg("default-config"))
        .context("miren-agent default-config failed")?;
    write(
        &stage.join("etc/miren/agent.toml"),
        format!("{config}\n").as_bytes(),
    )?;
    let generated = stage.join("../generated");
    if generated.exists() {
        fs::remove_dir_all(&generated)?;
    }
    cmd::run(Command::new(agent).arg("package-files").arg(&generated))?;
    for section in ["1", "8"] {
        let from = generated.join(format!("man{section}"));
        for page in read_dir(&from)? {
            let name = page.file_name().context("man page without a name")?;
            let dest = stage
                .join(format!("usr/share/man/man{section}"))
                .join(format!("{}.gz", name.to_string_lossy()));
            write(&dest, &gzip(&fs::read(&page)?)?)?;
        }
    }
    let completions = [
        ("bash", "usr/share/bash-completion/completions"),
        ("zsh", "usr/share/zsh/vendor-completions"),
        ("fish", "usr/share/fish/vendor_completions.d"),
    ];
    for (shell, dir) in completions {
        for file in read_dir(&generated.join("completions").join(shell))? {
            let name = file.file_name().context("completion without a name")?;
            copy(&file, &stage.join(dir).join(name))?;
        }
    }
    fs::remove_dir_all(&generated)?;
    Ok(())
}

/// `DEBIAN/`: control, conffiles, md5sums and the maintainer scripts that tell systemd about
/// the units.
fn write_control(stage: &Path, version: &str, arch: &str, depends: &str) -> Result<()> {
    let installed_kib = du_kib(stage)?;
    let control = format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}, {RUNTIME_DEPENDS}\n\
         Section: net\n\
         Priority: optional\n\
         Description: node agent of a small PaaS: node ports, HTTP ingress, app instances\n \
         miren-agent runs on every node of a Miren-style platform. It forwards TCP and\n \
         UDP node ports to the apps' instances with eBPF/XDP (nftables where XDP cannot\n \
         run), serves HTTP and HTTPS with automatic certificates, runs each instance in\n \
         its own container and exports per-port statistics to Prometheus. The miren\n \
         command deploys apps and inspects the node.\n"
    );
    let debian = stage.join("DEBIAN");
    write(&debian.join("control"), control.as_bytes())?;
    write(&debian.join("conffiles"), b"/etc/miren/agent.toml\n")?;
    let reload = "if [ -d /run/systemd/system ]; then\n\tsystemctl --system daemon-reload >/dev/null || true\nfi\n";
    for script in ["postinst", "postrm"] {
        let path = debian.join(script);
        write(&path, format!("#!/bin/sh\nset -e\n{reload}").as_bytes())?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    let mut sums = String::new();
    for file in files_under(stage)? {
        let relative = file.strip_prefix(stage)?;
        if relative.starts_with("DEBIAN") || relative.starts_with("etc") {
            continue;
        }
        let sum = cmd::output(Command::new("md5sum").arg(&file))
            .with_context(|| format!("md5sum {}", file.display()))?;
        let hash = sum.split_whitespace().next().unwrap_or_default();
        sums.push_str(&format!("{hash}  {}\n", relative.display()));
    }
    write(&debian.join("md5sums"), sums.as_bytes())
}

/// The libraries the binaries link, as package dependencies (`dpkg-shlibdeps`).
fn library_depends(stage: &Path) -> Result<String> {
    // dpkg-shlibdeps wants a debian/control in its working directory.
    let work = stage.join("../shlibdeps");
    write(
        &work.join("debian/control"),
        format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n").as_bytes(),
    )?;
    let mut command = Command::new("dpkg-shlibdeps");
    command.arg("-O").current_dir(&work);
    for binary in ["miren-agent", "miren"] {
        command.arg(format!(
            "-e{}",
            stage.join("usr/bin").join(binary).display()
        ));
    }
    let out = cmd::output(&mut command).context("dpkg-shlibdeps failed (package dpkg-dev)")?;
    fs::remove_dir_all(&work)?;
    out.lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

/// A Debian changelog entry for `version` (a native package's changelog.gz).
fn debian_changelog(version: &str) -> String {
    let date = cmd::output(Command::new("date").arg("-R")).unwrap_or_default();
    format!(
        "{NAME} ({version}) unstable; urgency=medium\n\n  \
         * Release {version}; see the project's CHANGELOG.md.\n\n \
         -- {MAINTAINER}  {date}\n"
    )
}

/// `bytes` compressed with `gzip -9n` (no name or time stamp: reproducible).
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("could not start gzip")?;
    child
        .stdin
        .take()
        .context("gzip's stdin")?
        .write_all(bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    Ok(out.stdout)
}

/// The installed size in KiB (what `Installed-Size` counts).
fn du_kib(dir: &Path) -> Result<u64> {
    let bytes: u64 = files_under(dir)?
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    Ok(bytes.div_ceil(1024))
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in read_dir(dir)? {
        if entry.is_dir() {
            files.extend(files_under(&entry)?);
        } else {
            files.push(entry);
        }
    }
    files.sort();
    Ok(files)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().context("a path without a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
}

/// Copies `from` to `to` (mode 0644), creating `to`'s directory.
fn copy(from: &Path, to: &Path) -> Result<()> {
    write(
        to,
        &fs::read(from).with_context(|| format!("reading {}", from.display()))?,
    )
}

/// Writes `bytes` to `path` (mode 0644), creating its directory.
fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    create_parent(path)?;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}
