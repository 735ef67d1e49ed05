//! `miren cert set` and `miren cert list` through the real CLI and agent: a stored certificate
//! is listed (text and JSON) and survives a `kill -9` restart; a key that does not match its
//! certificate, or a certificate that does not cover the host, is refused with a message
//! naming the file, and nothing is stored. Certificates live in the agent's store, not in
//! files; the files an earlier agent left in `<state-dir>/certs` are imported once.

use std::{path::Path, process::Command};

use miren_agent::api::types::{CertInfo, CertSource};
use miren_tests::{
    process::{AgentProcess, TempDir, binary},
    tls::self_signed,
};

fn start_agent(dir: &Path) -> AgentProcess {
    let socket = dir.join("agent.sock");
    let mut command = Command::new(binary("miren-agent"));
    command
        .arg("run")
        .arg("--config")
        .arg("/dev/null")
        .arg("--no-sandboxes")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--api-socket")
        .arg(&socket)
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--https-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
    AgentProcess::start(command, &socket, &dir.join("agent.log"))
}

fn run(agent: &AgentProcess, args: &[&str]) -> (bool, String, String) {
    let out = agent.miren(args);
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn list_json(agent: &AgentProcess) -> Vec<CertInfo> {
    let (ok, stdout, stderr) = run(agent, &["--output", "json", "cert", "list"]);
    assert!(ok, "cert list failed: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// The entries of the agent's state directory whose name starts with `prefix`.
fn state_entries(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[test]
fn cert_set_list_refuse_and_survive_restart() {
    let dir = TempDir::new("certs");
    let agent = start_agent(dir.path());

    let (ok, stdout, _) = run(&agent, &["cert", "list"]);
    assert!(ok);
    assert_eq!(stdout, "no certificates\n");

    let shop = self_signed(&["shop.example.com", "www.shop.example.com"]);
    let (cert, key) = shop.write(dir.path(), "shop");
    let (ok, stdout, stderr) = run(
        &agent,
        &[
            "cert",
            "set",
            "shop.example.com",
            "--cert",
            &cert,
            "--key",
            &key,
        ],
    );
    assert!(ok, "cert set failed: {stderr}");
    assert!(
        stdout.starts_with("certificate for shop.example.com stored (expires "),
        "{stdout}"
    );

    let (ok, table, _) = run(&agent, &["cert", "list"]);
    assert!(ok);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["HOST", "SOURCE", "EXPIRES", "SANS"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[0], "shop.example.com");
    assert_eq!(row[1], "user");
    assert_eq!(row[3], "shop.example.com,www.shop.example.com");
    let listed = list_json(&agent);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].source, CertSource::User);
    assert_eq!(listed[0].sans, ["shop.example.com", "www.shop.example.com"]);
    assert!(
        listed[0].not_after.ends_with('Z'),
        "{}",
        listed[0].not_after
    );
    assert_eq!(
        state_entries(dir.path(), "certs"),
        Vec::<String>::new(),
        "certificates are kept in the store, not in files"
    );

    // A key from another pair: refused, naming the key file; nothing stored.
    let other = self_signed(&["blog.example.com"]);
    let (other_cert, other_key) = other.write(dir.path(), "other");
    let refusals = [
        (
            "blog.example.com",
            other_cert.clone(),
            key.clone(),
            format!("{key}: the private key does not match the certificate for blog.example.com"),
        ),
        // A certificate for another host: refused, naming the certificate file.
        (
            "shop.example.com",
            other_cert.clone(),
            other_key.clone(),
            format!("{other_cert}: the certificate does not cover shop.example.com"),
        ),
        // An unreadable file is named by the CLI itself.
        (
            "blog.example.com",
            dir.path().join("missing.crt").display().to_string(),
            other_key.clone(),
            format!(
                "cannot read the certificate file {}",
                dir.path().join("missing.crt").display()
            ),
        ),
    ];
    for (host, cert, key, expected) in &refusals {
        let (ok, _, stderr) = run(&agent, &["cert", "set", host, "--cert", cert, "--key", key]);
        assert!(
            !ok,
            "cert set {host} --cert {cert} --key {key} was accepted"
        );
        assert!(stderr.contains(expected.as_str()), "{stderr}");
    }
    assert_eq!(list_json(&agent), listed, "a refused pair changed the list");

    // kill -9 and restart: the certificate is loaded again.
    agent.kill9();
    let agent = start_agent(dir.path());
    assert_eq!(list_json(&agent), listed);
}

#[test]
fn certificate_files_of_an_earlier_agent_are_imported_once() {
    let dir = TempDir::new("certs-import");
    // What an earlier agent left: HOST.crt, HOST.key, HOST.json (source), wildcards as
    // _wildcard.PARENT.*, and a pair that does not load.
    let legacy = dir.path().join("state/certs");
    std::fs::create_dir_all(&legacy).unwrap();
    let shop = self_signed(&["shop.example.com"]);
    let wild = self_signed(&["*.example.net"]);
    for (stem, pem, source) in [
        ("shop.example.com", &shop, "user"),
        ("_wildcard.example.net", &wild, "acme"),
        ("broken.example.org", &shop, "user"),
    ] {
        pem.write(&legacy, stem);
        std::fs::write(
            legacy.join(format!("{stem}.json")),
            format!("{{\"source\":\"{source}\"}}"),
        )
        .unwrap();
    }

    let agent = start_agent(dir.path());
    let listed: Vec<(String, CertSource)> = list_json(&agent)
        .into_iter()
        .map(|c| (c.host, c.source))
        .collect();
    assert_eq!(
        listed,
        [
            ("*.example.net".to_owned(), CertSource::Acme),
            ("shop.example.com".to_owned(), CertSource::User),
        ],
        "{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(log.contains("not importing a certificate file"), "{log}");
    let renamed = state_entries(dir.path(), "certs");
    assert_eq!(renamed.len(), 1, "{renamed:?}");
    assert!(renamed[0].starts_with("certs.imported-"), "{renamed:?}");

    // The store is the source of truth now: a restart lists the same and imports nothing.
    agent.kill9();
    let agent = start_agent(dir.path());
    assert_eq!(list_json(&agent).len(), 2);
    let log = agent.log_text();
    assert!(!log.contains("imported a certificate file"), "{log}");
}
