//! `miren cert set` and `miren cert list` through the real CLI and agent: a stored certificate
//! is listed (text and JSON) and survives a `kill -9` restart; a key that does not match its
//! certificate, or a certificate that does not cover the host, is refused with a message
//! naming the file, and nothing is stored.

use std::{path::Path, process::Command};

use miren_agent::api::types::{CertInfo, CertSource};
use miren_tests::{
    process::{AgentProcess, TempDir, binary},
    tls::{Pem, self_signed},
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

/// Writes `pem` as `NAME.crt` and `NAME.key` in `dir`; returns both paths as strings.
fn write_pair(dir: &Path, name: &str, pem: &Pem) -> (String, String) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pem.cert).unwrap();
    std::fs::write(&key, &pem.key).unwrap();
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
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

/// Files in the agent's certificate directory.
fn stored_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("state/certs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
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
    let (cert, key) = write_pair(dir.path(), "shop", &shop);
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
    let files_before = stored_files(dir.path());
    assert_eq!(
        files_before,
        [
            "shop.example.com.crt",
            "shop.example.com.json",
            "shop.example.com.key"
        ]
    );

    // A key from another pair: refused, naming the key file; nothing stored.
    let other = self_signed(&["blog.example.com"]);
    let (other_cert, other_key) = write_pair(dir.path(), "other", &other);
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
    assert_eq!(
        stored_files(dir.path()),
        files_before,
        "a refused pair left files"
    );

    // kill -9 and restart: the certificate is loaded again.
    agent.kill9();
    let agent = start_agent(dir.path());
    assert_eq!(list_json(&agent), listed);
}
