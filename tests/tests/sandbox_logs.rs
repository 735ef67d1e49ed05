//! Instance logs with the real agent, CLI and log shims: an instance writing 50 MB keeps at
//! most 3 files of `--instance-log-max`; `miren logs` reads across the rotated files (all of
//! them, `--tail`, `--since`, `-f` while the files rotate); the shim keeps writing while no
//! agent runs; `miren app rm` removes the logs.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use miren_agent::api::types::LogChunk;
use miren_tests::{
    apps::{deploy, netns_pids, wait_until},
    ingress::ok,
    process::binary,
    world::{Plane, World},
};

/// The cap of each log file in this test.
const CAP: u64 = 1 << 20;
/// Every bulk line is `NNNNNNN ` and 100 `x` (108 characters), so every record is 140 bytes
/// (30-character timestamp, space, line, newline) and a file holds 7489 records.
const PER_FILE: usize = (CAP / 140) as usize;
/// 48 full files and 2 records more (50.3 MB): the last rotation happened 2 lines ago.
const TOTAL: usize = PER_FILE * 48 + 2;

/// Waits for files the test puts in its private `/tmp` ([`instance_tmp`]).
const CHATTY_PY: &str = r#"import os, sys, time
def wait_for(name):
    while not os.path.exists("/tmp/" + name):
        time.sleep(0.05)
out = sys.stdout
for i in range(TOTAL):
    out.write(f"{i:07d} {'x' * 100}\n")
out.flush()
wait_for("go-late")
print("late line", flush=True)
wait_for("go-more")
for i in range(10000):
    out.write(f"more {i:05d} {'y' * 100}\n")
out.flush()
print("more done", flush=True)
wait_for("go-alone")
print("written while no agent ran", flush=True)
while True:
    time.sleep(3600)
"#;

const APP: &str = r#"name = "chatty"
[services.chatty]
command = "exec python3 chatty.py"
[services.chatty.concurrency]
mode = "fixed"
num_instances = 1
"#;

/// The text after `INSTANCE | ` of every line `miren logs` printed.
fn texts(output: &str) -> Vec<String> {
    output
        .lines()
        .map(|line| match line.split_once(" | ") {
            Some((_, text)) => text.to_owned(),
            None => panic!("not an `INSTANCE | LINE` line: {line:?}"),
        })
        .collect()
}

fn bulk_line(i: usize) -> String {
    format!("{i:07} {}", "x".repeat(100))
}

/// GET `path` on the agent's API socket: (status, body).
fn api_get(socket: &Path, path: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The private `/tmp` of the only instance of the agent with pid `agent_pid`, as the node
/// sees it (`/proc/PID/root/tmp` of the instance's first process): the app's code is a
/// read-only copy, so the test signals the instance with files there.
fn instance_tmp(agent_pid: u32) -> PathBuf {
    let prefix = format!("miren-s{agent_pid:x}x");
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let netns: Vec<&str> = list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    assert_eq!(netns.len(), 1, "{list}");
    let pids = netns_pids(netns[0]);
    let pid = pids.first().expect("a process of the instance");
    PathBuf::from(format!("/proc/{pid}/root/tmp"))
}

/// The app's log files: (path, size, lines).
fn log_files(dir: &Path) -> Vec<(PathBuf, u64, usize)> {
    let mut files: Vec<(PathBuf, u64, usize)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let lines = bytes.iter().filter(|&&b| b == b'\n').count();
            (path, bytes.len() as u64, lines)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn logs_rotate_at_the_cap_and_miren_logs_reads_across_the_files() {
    let world = World::new(0);
    let flags = ["--instance-log-max", "1MiB"];
    let agent = world.start_agent_running_sandboxes(Plane::Nft, &flags);
    let chatty = CHATTY_PY.replace("TOTAL", &TOTAL.to_string());
    deploy(
        world.dir(),
        &agent,
        "chatty",
        APP,
        &[("chatty.py", &chatty)],
    );

    // 50 MB later: at most 3 files of at most 1 MiB each, and the newest just rotated.
    let last = bulk_line(TOTAL - 1);
    wait_until("the last bulk line", Duration::from_secs(120), || {
        texts(&ok(&agent, &["logs", "chatty", "--tail", "1"])) == [last.clone()]
    });
    let logs_dir = world.dir().join("state/sandbox/logs/chatty");
    let files = log_files(&logs_dir);
    assert_eq!(files.len(), 3, "{files:?}");
    let names: Vec<String> = files
        .iter()
        .map(|(path, _, _)| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let instance = names[0].strip_suffix(".log").unwrap().to_owned();
    let tmp = instance_tmp(agent.pid());
    assert_eq!(
        names,
        [
            format!("{instance}.log"),
            format!("{instance}.log.1"),
            format!("{instance}.log.2")
        ]
    );
    for (path, size, _) in &files {
        assert!(*size <= CAP, "{} has {size} bytes", path.display());
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
    let dir_mode = std::fs::metadata(&logs_dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    assert_eq!(files[0].2, 2, "the newest file holds the last 2 lines");
    assert_eq!(files[1].2, PER_FILE);

    // The last 5 lines: 3 from the rotated file, 2 from the newest.
    let tail = ok(&agent, &["logs", "chatty", "--tail", "5"]);
    let expected: Vec<String> = (TOTAL - 5..TOTAL).map(bulk_line).collect();
    assert_eq!(texts(&tail), expected);
    assert!(tail.starts_with(&format!("{instance} | ")), "{tail}");

    // Everything retained (about 1.9 MB, more than one answer of the API), in order.
    let all = texts(&ok(&agent, &["logs", "chatty"]));
    let retained = files.iter().map(|(_, _, lines)| lines).sum::<usize>();
    assert_eq!(all.len(), retained);
    let first = TOTAL - retained;
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, line)| *line == bulk_line(first + i))
    );

    // --since: the bulk was written more than 4 s before the late line.
    std::thread::sleep(Duration::from_secs(4));
    std::fs::write(tmp.join("go-late"), "").unwrap();
    wait_until("the late line", Duration::from_secs(30), || {
        texts(&ok(&agent, &["logs", "chatty", "--tail", "1"])) == ["late line"]
    });
    assert_eq!(
        texts(&ok(&agent, &["logs", "chatty", "--since", "2s"])),
        ["late line"]
    );
    assert_eq!(
        texts(&ok(&agent, &["logs", "chatty", "--since", "1h"])).len(),
        retained + 1
    );
    // The API refuses what it cannot use, naming the parameter.
    let socket = world.dir().join("agent.sock");
    for (query, name) in [
        ("tail=lots", "tail"),
        ("since=5x", "since"),
        ("until=yesterday", "until"),
    ] {
        let (status, body) = api_get(&socket, &format!("/v1/apps/chatty/logs?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(name), "{query}: {body}");
    }
    let (status, body) = api_get(&socket, "/v1/apps/chatty/logs?tail=2");
    assert_eq!(status, 200, "{body}");
    let chunk: LogChunk = serde_json::from_str(&body).unwrap();
    assert_eq!(chunk.lines.len(), 2);
    assert!(!chunk.more);
    assert_eq!(chunk.lines[1].line, "late line");
    assert!(chunk.lines.iter().all(|line| line.time.is_some()));
    let bad = agent.miren(&["logs", "chatty", "--since", "10 minutes"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("is not a duration"), "{stderr}");
    let stamped = ok(&agent, &["logs", "chatty", "--tail", "1", "--timestamps"]);
    let (time, rest) = stamped.split_once(' ').unwrap();
    assert_eq!(time.len(), 30, "{stamped}");
    assert!(time.ends_with('Z') && time.contains('T'), "{stamped}");
    assert_eq!(rest, format!("{instance} | late line\n"));

    // -f follows while the files rotate underneath (1.4 MB: one or two rotations).
    let mut follower = Command::new(binary("miren"))
        .arg("--socket")
        .arg(world.dir().join("agent.sock"))
        .args(["logs", "chatty", "-f", "--tail", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = |rx: &mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("a line from `miren logs -f`")
    };
    assert_eq!(next(&rx), format!("{instance} | late line"));
    std::fs::write(tmp.join("go-more"), "").unwrap();
    for i in 0..10000 {
        assert_eq!(
            next(&rx),
            format!("{instance} | more {i:05} {}", "y".repeat(100))
        );
    }
    assert_eq!(next(&rx), format!("{instance} | more done"));
    let _ = follower.kill();
    let _ = follower.wait();
    for (path, size, _) in log_files(&logs_dir) {
        assert!(size <= CAP, "{} has {size} bytes", path.display());
    }

    // The shim is not the agent's: with the agent killed, the instance's lines still reach
    // the file, and the next agent shows them.
    agent.kill9();
    std::fs::write(tmp.join("go-alone"), "").unwrap();
    let newest = logs_dir.join(format!("{instance}.log"));
    wait_until(
        "the line written without an agent",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&newest)
                .unwrap_or_default()
                .contains(" written while no agent ran\n")
        },
    );
    let mut agent = world.start_agent_running_sandboxes(Plane::Nft, &flags);
    assert_eq!(
        texts(&ok(&agent, &["logs", "chatty", "--tail", "2"])),
        ["more done", "written while no agent ran"]
    );

    // `app rm` removes the logs with the app.
    ok(&agent, &["app", "rm", "chatty"]);
    wait_until("the app's logs removed", Duration::from_secs(30), || {
        !logs_dir.exists()
    });
    agent.terminate(Duration::from_secs(20));
}

#[test]
fn the_log_shim_binary_ignores_stop_signals_and_writes_until_its_input_closes() {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::{Pid, getsid},
    };
    let dir = miren_tests::process::TempDir::new("log-shim");
    let file = dir.path().join("web-1x1.log");
    let mut shim = Command::new(binary("miren-agent"))
        .args(["log-shim", "--file"])
        .arg(&file)
        .args(["--max-bytes", "65536", "--keep", "3"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(i32::try_from(shim.id()).unwrap());
    let mut input = shim.stdin.take().unwrap();
    input.write_all(b"first\n").unwrap();
    wait_until("the first line", Duration::from_secs(10), || {
        std::fs::read_to_string(&file).is_ok_and(|text| text.ends_with(" first\n"))
    });
    assert_eq!(
        getsid(Some(pid)).unwrap(),
        pid,
        "the shim leads its own session"
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        kill(pid, signal).unwrap();
    }
    // 1 MB more, the last line without a newline.
    for i in 0..10_000 {
        writeln!(input, "{i:05} {}", "z".repeat(94)).unwrap();
    }
    input.write_all(b"last").unwrap();
    drop(input);
    let status = shim.wait().unwrap();
    assert!(status.success(), "{status}");

    let files = log_files(dir.path());
    assert_eq!(files.len(), 3, "{files:?}");
    for (path, size, _) in &files {
        assert!(*size <= 65536, "{} has {size} bytes", path.display());
    }
    let newest = std::fs::read_to_string(&file).unwrap();
    assert!(newest.ends_with(" last\n"), "{newest}");
    let rotated = std::fs::read_to_string(dir.path().join("web-1x1.log.1")).unwrap();
    let last_rotated = rotated.lines().last().unwrap();
    let newest_first = newest.lines().next().unwrap();
    let number = |record: &str| record[31..36].parse::<usize>().unwrap();
    assert_eq!(number(last_rotated) + 1, number(newest_first));
}
