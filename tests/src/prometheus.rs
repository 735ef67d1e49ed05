//! The real Prometheus tools for the observability tests: Debian's `promtool` and `prometheus`
//! (2.42), unpacked by `cargo xtask setup` under `target/tools/prometheus`, and a Prometheus
//! server run inside a test's network namespace, scraping the agent there.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    apps::wait_until,
    process::{TempDir, workspace_root},
    topology::{ChildGuard, Netns},
};

/// The path of `name` (`promtool` or `prometheus`) from Debian's prometheus package.
///
/// # Panics
/// When it is missing, naming the command that fetches it.
pub fn tool(name: &str) -> PathBuf {
    let path = workspace_root()
        .join("target/tools/prometheus/usr/bin")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup` (it downloads Debian's prometheus package and \
         unpacks it there, without installing it)",
        path.display()
    );
    path
}

/// Runs `promtool ARGS…` in `dir`, with `stdin` as its standard input.
pub fn promtool(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(tool("promtool"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(stdin)
        .expect("write to promtool");
    child.wait_with_output().expect("wait for promtool")
}

/// The address Prometheus listens on inside its namespace.
const LISTEN: &str = "127.0.0.1:9090";

/// A Prometheus server inside a network namespace, listening on [`LISTEN`] there, scraping
/// every second, its storage in a temporary directory; killed (by its pid) when dropped.
#[derive(Debug)]
pub struct Prometheus<'a> {
    ns: &'a Netns,
    /// Dropped first: the process is killed before its directory goes.
    _child: ChildGuard,
    dir: TempDir,
}

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `ns` scraping `target` (job `miren`) and evaluating the rule
    /// files `rules`, and waits until it is ready.
    ///
    /// # Panics
    /// When it cannot start or is not ready within 30 s (with its log).
    pub fn start(ns: &'a Netns, target: &str, rules: &[PathBuf]) -> Self {
        let dir = TempDir::new("prometheus");
        let rule_files: Vec<String> = rules
            .iter()
            .map(|r| format!("  - {}\n", r.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\
             scrape_configs:\n  - job_name: miren\n    static_configs:\n      - targets: ['{target}']\n",
            rule_files.concat()
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let mut command = ns.command(&tool("prometheus").to_string_lossy());
        command
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = ns.spawn(&mut command).expect("start prometheus");
        let prometheus = Self {
            ns,
            _child: child,
            dir,
        };
        wait_until("Prometheus to be ready", Duration::from_secs(30), || {
            prometheus.get("/-/ready", &[]).is_some()
        });
        prometheus
    }

    /// What Prometheus has logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET PATH` with `params` (URL-encoded by curl) from inside the namespace: the body, or
    /// `None` when the request failed.
    fn get(&self, path: &str, params: &[(&str, &str)]) -> Option<String> {
        let mut command = self.ns.command("curl");
        command.args(["-sS", "--fail", "--max-time", "10", "-G"]);
        for (name, value) in params {
            command
                .arg("--data-urlencode")
                .arg(format!("{name}={value}"));
        }
        let out = command
            .arg(format!("http://{LISTEN}{path}"))
            .output()
            .expect("run curl (package curl)");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `GET /api/v1/PATH` with `params`: the answer's `data`.
    ///
    /// # Panics
    /// When the request fails or Prometheus answers with an error (naming `params`).
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let body = self
            .get(&format!("/api/v1/{path}"), params)
            .unwrap_or_else(|| panic!("/api/v1/{path} {params:?} failed:\n{}", self.log_text()));
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["status"], "success", "{params:?}: {answer}");
        answer["data"].clone()
    }

    /// An instant query's result (`/api/v1/query`): one entry per series.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }
}
