//! The Debian package (`cargo xtask package`), checked by the tools that consume it: lintian
//! on the .deb, `systemd-analyze verify` on its units, bash on its completions, and a smoke
//! run of the packaged binaries unpacked into a temporary root (the agent in a namespace
//! with the packaged config, a deploy with the packaged CLI, one request).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use miren_tests::{
    ingress::{Backend, BackendMode, IngressWorld},
    process::{AgentProcess, TempDir, binary},
};

/// Builds the .deb of the debug binaries into `dir` with the real `xtask package`.
fn build_deb(dir: &Path) -> PathBuf {
    let out = run(Command::new(binary("xtask"))
        .args(["package", "--debug", "--no-build", "--out"])
        .arg(dir));
    assert!(out.status.success(), "xtask package: {}", text(&out));
    let debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    debs[0].clone()
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (cargo xtask setup installs it)"))
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_deb_passes_lintian_its_units_verify_and_its_binaries_serve_from_an_unpacked_root() {
    let dir = TempDir::new("package");
    let deb = build_deb(dir.path());

    // lintian: no errors (and, as it stands, no warnings either).
    let lintian = run(Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .arg(&deb));
    assert!(lintian.status.success(), "lintian: {}", text(&lintian));

    let root = dir.path().join("root");
    let unpack = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    assert!(unpack.status.success(), "dpkg-deb -x: {}", text(&unpack));
    for file in [
        "usr/bin/miren-agent",
        "usr/bin/miren",
        "etc/miren/agent.toml",
        "lib/systemd/system/miren-agent.service",
        "lib/systemd/system/miren-agent.socket",
        "usr/share/man/man8/miren-agent.8.gz",
        "usr/share/man/man8/miren-agent-run.8.gz",
        "usr/share/man/man1/miren.1.gz",
        "usr/share/man/man1/miren-route-import.1.gz",
        "usr/share/bash-completion/completions/miren",
        "usr/share/zsh/vendor-completions/_miren",
        "usr/share/fish/vendor_completions.d/miren.fish",
        "usr/share/doc/miren-agent/copyright",
    ] {
        assert!(root.join(file).is_file(), "{file} is not in the package");
    }

    verify_units(&root);
    completions_load(&root);
    smoke_run(&root);
}

/// `systemd-analyze verify` of the packaged units in the unpacked root (which gets the
/// system's own units, for the targets they order against; man pages from the package).
fn verify_units(root: &Path) {
    let units = root.join("lib/systemd/system");
    let copy = run(Command::new("cp")
        .arg("-an")
        .arg("/lib/systemd/system/.")
        .arg(&units));
    assert!(copy.status.success(), "{}", text(&copy));
    let verify = run(Command::new("systemd-analyze")
        .env("MANPATH", root.join("usr/share/man"))
        .arg(format!("--root={}", root.display()))
        .arg("verify")
        .arg(units.join("miren-agent.service"))
        .arg(units.join("miren-agent.socket")));
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );
    // The check can fail: a unit naming a binary the package lacks does.
    let broken = root.join("lib/systemd/system/miren-broken.service");
    std::fs::write(
        &broken,
        "[Unit]\nDescription=x\n[Service]\nExecStart=/usr/bin/miren-missing run\n",
    )
    .unwrap();
    let refused = run(Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .arg("--man=no")
        .arg("verify")
        .arg(&broken));
    assert!(!refused.status.success(), "{}", text(&refused));
}

/// The packaged completion script and `miren completion bash` both load in bash and
/// register the completion function for `miren`.
fn completions_load(root: &Path) {
    let miren = root.join("usr/bin/miren");
    let script = format!(
        "set -e; source {file}; complete -p miren; complete -r miren; \
         source <({miren} completion bash); complete -p miren",
        file = root
            .join("usr/share/bash-completion/completions/miren")
            .display(),
        miren = miren.display(),
    );
    let bash = run(Command::new("bash").args(["--norc", "-c", &script]));
    let out = text(&bash);
    assert!(bash.status.success(), "{out}");
    assert_eq!(out.matches(" -F _miren miren\n").count(), 2, "{out}");
}

/// The packaged agent, with the packaged config (every key commented out) plus the test's
/// flags, in a namespace; the packaged `miren` deploys an app and routes a host to it; one
/// request through the ingress reaches the backend.
fn smoke_run(root: &Path) {
    let world = IngressWorld::new("pkg");
    let mut command = world
        .ns
        .command(root.join("usr/bin/miren-agent").to_str().unwrap());
    command
        .args(world.agent_args(&[]))
        .arg("--config")
        .arg(root.join("etc/miren/agent.toml"));
    let agent = AgentProcess::start(command, &world.api_socket(), &world.dir().join("agent.log"));
    let backend = Backend::start(&world.ns, "pkg", BackendMode::Normal);

    let app = world.dir().join("hello");
    std::fs::create_dir_all(app.join(".miren")).unwrap();
    std::fs::write(
        app.join(".miren/app.toml"),
        "name = \"hello\"\n[services.web]\ncommand = \"true\"\nport = 8080\n",
    )
    .unwrap();
    let miren = |args: &[&str]| {
        let out = run(Command::new(root.join("usr/bin/miren"))
            .arg("--socket")
            .arg(world.api_socket())
            .args(args));
        assert!(
            out.status.success(),
            "miren {args:?}: {}\n{}",
            text(&out),
            agent.log_text()
        );
    };
    miren(&["deploy", app.to_str().unwrap()]);
    world.set_endpoints("hello", &[backend.addr]);
    miren(&["route", "set", "hello.example.com", "hello"]);
    let response = world.get("hello.example.com", "/", &[]);
    assert_eq!(response.status, 200, "{response:?}\n{}", agent.log_text());
    assert_eq!(backend.requests(), 1);
}
