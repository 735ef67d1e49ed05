use std::{
    collections::VecDeque,
    os::unix::fs::PermissionsExt,
    sync::atomic::{AtomicU32, Ordering},
};

use super::*;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("miren-logs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn files(path: PathBuf, max_bytes: u64, keep: u32) -> LogFiles {
    LogFiles {
        path,
        max_bytes,
        keep,
    }
}

/// Input that arrives in the given batches (one `read` each), running each batch's action
/// before handing it out.
struct Batches(VecDeque<Batch>);

/// Bytes of one read, and what happens before they are read.
type Batch = (Vec<u8>, Box<dyn FnOnce()>);

impl Read for Batches {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some((mut bytes, action)) = self.0.pop_front() else {
            return Ok(0);
        };
        action();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        if n < bytes.len() {
            self.0.push_front((bytes.split_off(n), Box::new(|| {})));
        }
        Ok(n)
    }
}

/// The records of `path` and its rotated files, oldest first: (time, text).
fn records(path: &Path) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for index in (0..MAX_KEEP_FILES).rev() {
        let Ok(text) = std::fs::read_to_string(rotated_path(path, index)) else {
            continue;
        };
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        for record in text.lines() {
            let time = record_time(record.as_bytes())
                .unwrap_or_else(|| panic!("record without a timestamp: {record:?}"));
            all.push((time.to_owned(), record[TIME_LEN + 1..].to_owned()));
        }
    }
    all
}

fn texts(records: &[(String, String)]) -> Vec<String> {
    records.iter().map(|(_, text)| text.clone()).collect()
}

#[test]
fn log_time_is_fixed_width_rfc3339_utc() {
    let t = SystemTime::UNIX_EPOCH + Duration::new(1_796_015_097, 5);
    assert_eq!(log_time(t), "2026-11-30T05:04:57.000000005Z");
    assert_eq!(
        log_time(SystemTime::UNIX_EPOCH),
        "1970-01-01T00:00:00.000000000Z"
    );
    assert!(is_log_time(log_time(SystemTime::now()).as_bytes()));
    for bad in [
        "2026-11-30T05:04:57.00000005Z",
        "2026-11-30 05:04:57.000000005Z",
        "2026-11-30T05:04:57.000000005+",
        "x026-11-30T05:04:57.000000005Z",
    ] {
        assert!(!is_log_time(bad.as_bytes()), "{bad}");
    }
}

#[test]
fn the_shim_rotates_at_the_cap_and_keeps_the_newest_files() {
    let dir = TempDir::new();
    let path = dir.0.join("web-1x1.log");
    let input: String = (0..2000).map(|i| format!("line {i:05}\n")).collect();
    let stats = run_shim(input.as_bytes(), &files(path.clone(), 4096, 3));

    // Each record: timestamp, space, "line NNNNN", newline = 42 bytes; 97 fit in 4096.
    assert_eq!(stats.records, 2000);
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.rotations, 2000 / 97);
    for index in 0..3 {
        let file = rotated_path(&path, index);
        let metadata = std::fs::metadata(&file).unwrap();
        assert!(
            metadata.len() <= 4096,
            "{}: {}",
            file.display(),
            metadata.len()
        );
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    }
    assert!(!rotated_path(&path, 3).exists());
    assert_eq!(
        std::fs::metadata(rotated_path(&path, 1)).unwrap().len(),
        97 * 42
    );
    let kept = texts(&records(&path));
    let expected: Vec<String> = (2000 - kept.len()..2000)
        .map(|i| format!("line {i:05}"))
        .collect();
    assert_eq!(kept, expected);
    assert_eq!(kept.len(), 2 * 97 + 2000 % 97);
}

#[test]
fn the_shim_appends_to_an_existing_file_and_one_kept_file_is_emptied_at_the_cap() {
    let dir = TempDir::new();
    let path = dir.0.join("web-1x1.log");
    let settings = files(path.clone(), 4096, 1);
    run_shim(&b"first\n"[..], &settings);
    run_shim(&b"second\n"[..], &settings);
    assert_eq!(texts(&records(&path)), ["first", "second"]);

    let input: String = (0..200).map(|i| format!("line {i:05}\n")).collect();
    let stats = run_shim(input.as_bytes(), &settings);
    assert_eq!(stats.rotations, 2);
    assert!(!rotated_path(&path, 1).exists());
    let kept = texts(&records(&path));
    assert_eq!(kept.last().unwrap(), "line 00199");
    assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
}

#[test]
fn long_lines_are_cut_into_records_and_a_last_unfinished_line_is_kept() {
    let dir = TempDir::new();
    let path = dir.0.join("web-1x1.log");
    let long = "a".repeat(40 << 10);
    // The long line arrives in pieces, its newline alone in the last one.
    let batches = Batches(VecDeque::from([
        (
            long.as_bytes()[..10_000].to_vec(),
            Box::new(|| {}) as Box<dyn FnOnce()>,
        ),
        (long.as_bytes()[10_000..].to_vec(), Box::new(|| {})),
        (b"\nshort\nunfinished".to_vec(), Box::new(|| {})),
    ]));
    run_shim(batches, &files(path.clone(), 1 << 20, 3));
    let kept = texts(&records(&path));
    assert_eq!(
        kept.len(),
        5,
        "{:?}",
        kept.iter().map(String::len).collect::<Vec<_>>()
    );
    assert_eq!(kept[0].len(), 16 << 10);
    assert_eq!(kept[1].len(), 16 << 10);
    assert_eq!(kept[2].len(), 8 << 10);
    assert_eq!(kept[..3].concat(), long);
    assert_eq!(kept[3..], ["short", "unfinished"]);

    // A line exactly the size of a chunk, then its newline: no empty record after it.
    let exact = "b".repeat(16 << 10);
    let batches = Batches(VecDeque::from([
        (
            exact.as_bytes().to_vec(),
            Box::new(|| {}) as Box<dyn FnOnce()>,
        ),
        (b"\n\nnext\n".to_vec(), Box::new(|| {})),
    ]));
    run_shim(batches, &files(path.clone(), 1 << 20, 3));
    assert_eq!(
        texts(&records(&path))[5..],
        [exact, String::new(), "next".into()]
    );
}

#[test]
fn records_stay_under_a_small_cap() {
    let dir = TempDir::new();
    let path = dir.0.join("web-1x1.log");
    let line = format!("{}\n", "c".repeat(10_000));
    run_shim(line.repeat(3).as_bytes(), &files(path.clone(), 4096, 3));
    for index in 0..3 {
        assert!(std::fs::metadata(rotated_path(&path, index)).unwrap().len() <= 4096);
    }
    // The last line's three records are left, one per file.
    let lengths: Vec<usize> = texts(&records(&path)).iter().map(String::len).collect();
    assert_eq!(lengths, [4064, 4064, 10_000 - 2 * 4064]);
}

#[test]
fn unwritable_records_are_dropped_counted_and_noted_once_writing_works() {
    let dir = TempDir::new();
    let app = dir.0.join("app");
    let path = app.join("web-1x1.log");
    let create = app.clone();
    let batches = Batches(VecDeque::from([
        (
            b"lost 1\nlost 2\n".to_vec(),
            Box::new(|| {}) as Box<dyn FnOnce()>,
        ),
        (
            b"kept\n".to_vec(),
            Box::new(move || std::fs::create_dir_all(&create).unwrap()),
        ),
    ]));
    let stats = run_shim(batches, &files(path.clone(), 4096, 3));
    assert_eq!(stats.dropped, 2);
    assert_eq!(stats.records, 2);
    assert_eq!(
        texts(&records(&path)),
        [
            "[miren log-shim] 2 log lines were lost: the log file could not be written",
            "kept"
        ]
    );
}

/// Writes `records` (time, text) as a shim would to `path` (appending).
fn write_records(path: &Path, records: &[(&str, &str)]) {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for (time, text) in records {
        writeln!(file, "{time} {text}").unwrap();
    }
}

/// A timestamp `seconds` after an arbitrary fixed instant.
fn at(seconds: u64) -> String {
    log_time(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds))
}

/// Rotates `path` as the shim does with three files.
fn rotate(path: &Path) {
    let _ = std::fs::rename(rotated_path(path, 1), rotated_path(path, 2));
    std::fs::rename(path, rotated_path(path, 1)).unwrap();
    File::create(path).unwrap();
}

fn lines_of(chunk: &LogChunk) -> Vec<String> {
    chunk.lines.iter().map(|l| l.line.clone()).collect()
}

#[test]
fn the_reader_follows_lines_across_rotations_with_its_cursor() {
    let dir = TempDir::new();
    let path = dir.0.join("web").join("web-1x1.log");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let times: Vec<String> = (0..9).map(at).collect();
    write_records(&path, &[(&times[0], "zero"), (&times[1], "one")]);
    rotate(&path);
    write_records(&path, &[(&times[2], "two"), (&times[3], "three")]);
    rotate(&path);
    write_records(&path, &[(&times[4], "four")]);

    let all = read(&dir.0, "web", &LogQuery::default()).unwrap();
    assert_eq!(lines_of(&all), ["zero", "one", "two", "three", "four"]);
    assert_eq!(all.lines[4].time.as_deref(), Some(times[4].as_str()));
    assert_eq!(all.lines[4].instance, "web-1x1");
    assert!(!all.more);

    // Nothing new: nothing returned.
    let again = LogQuery {
        after: all.cursor.clone(),
        ..LogQuery::default()
    };
    let none = read(&dir.0, "web", &again).unwrap();
    assert!(none.lines.is_empty());
    assert_eq!(none.cursor, all.cursor);

    // Two rotations later the cursor's file is `.2`: exactly the new lines follow.
    write_records(&path, &[(&times[5], "five")]);
    rotate(&path);
    write_records(&path, &[(&times[6], "six")]);
    rotate(&path);
    write_records(&path, &[(&times[7], "seven")]);
    let next = read(&dir.0, "web", &again).unwrap();
    assert_eq!(lines_of(&next), ["five", "six", "seven"]);

    // An unfinished last line waits for its newline.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(format!("{} eig", times[8]).as_bytes())
        .unwrap();
    let after_next = LogQuery {
        after: next.cursor.clone(),
        ..LogQuery::default()
    };
    assert!(read(&dir.0, "web", &after_next).unwrap().lines.is_empty());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"ht\n")
        .unwrap();
    assert_eq!(
        lines_of(&read(&dir.0, "web", &after_next).unwrap()),
        ["eight"]
    );

    // A cursor whose file was rotated away entirely starts at the oldest retained line.
    for _ in 0..3 {
        rotate(&path);
    }
    write_records(&path, &[(&times[8], "nine")]);
    let lost = read(&dir.0, "web", &after_next).unwrap();
    assert_eq!(lines_of(&lost), ["nine"]);
}

#[test]
fn a_cursor_does_not_match_another_file_with_the_same_inode() {
    let dir = TempDir::new();
    let path = dir.0.join("web").join("web-1x1.log");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_records(&path, &[(&at(0), "old one"), (&at(1), "old two")]);
    let first = read(&dir.0, "web", &LogQuery::default()).unwrap();
    // Same inode, other content (as when a removed file's inode is reused).
    std::fs::write(&path, "").unwrap();
    write_records(
        &path,
        &[
            (&at(2), "new one"),
            (&at(3), "new two"),
            (&at(4), "new three"),
        ],
    );
    let next = read(
        &dir.0,
        "web",
        &LogQuery {
            after: first.cursor,
            ..LogQuery::default()
        },
    )
    .unwrap();
    assert_eq!(lines_of(&next), ["new one", "new two", "new three"]);
}

#[test]
fn instances_are_merged_by_time_and_tail_takes_the_last_lines_of_all() {
    let dir = TempDir::new();
    let app = dir.0.join("game");
    std::fs::create_dir_all(&app).unwrap();
    let a = app.join("udp-1x1.log");
    let b = app.join("udp-1x2.log");
    let other = app.join("udp-relay-1x3.log");
    write_records(&a, &[(&at(0), "a0"), (&at(2), "a2")]);
    rotate(&a);
    write_records(&a, &[(&at(4), "a4"), (&at(7), "a7")]);
    write_records(
        &b,
        &[
            (&at(1), "b1"),
            (&at(3), "b3"),
            (&at(5), "b5"),
            (&at(6), "b6"),
        ],
    );
    write_records(&other, &[(&at(8), "relay")]);

    let udp = |tail| LogQuery {
        service: Some("udp".into()),
        tail,
        ..LogQuery::default()
    };
    let all = read(&dir.0, "game", &udp(None)).unwrap();
    assert_eq!(
        lines_of(&all),
        ["a0", "b1", "a2", "b3", "a4", "b5", "b6", "a7"]
    );
    let instances: Vec<&str> = all.lines.iter().map(|l| l.instance.as_str()).collect();
    assert_eq!(instances[..2], ["udp-1x1", "udp-1x2"]);

    // The last 5 span both instances and both of a's files.
    let tail = read(&dir.0, "game", &udp(Some(5))).unwrap();
    assert_eq!(lines_of(&tail), ["b3", "a4", "b5", "b6", "a7"]);
    let tail = read(&dir.0, "game", &udp(Some(7))).unwrap();
    assert_eq!(lines_of(&tail), ["b1", "a2", "b3", "a4", "b5", "b6", "a7"]);
    assert_eq!(
        lines_of(&read(&dir.0, "game", &udp(Some(100))).unwrap()).len(),
        8
    );

    // Tail 0 returns nothing, and its cursor sits at the end of every instance.
    let none = read(&dir.0, "game", &udp(Some(0))).unwrap();
    assert!(none.lines.is_empty());
    write_records(&b, &[(&at(9), "b9")]);
    let next = read(
        &dir.0,
        "game",
        &LogQuery {
            after: none.cursor,
            service: Some("udp".into()),
            ..LogQuery::default()
        },
    )
    .unwrap();
    assert_eq!(lines_of(&next), ["b9"]);

    // Without a service, every instance.
    let everything = read(&dir.0, "game", &LogQuery::default()).unwrap();
    assert_eq!(everything.lines.len(), 10);
    assert_eq!(everything.lines[9].line, "b9");
    assert_eq!(everything.lines[8].instance, "udp-relay-1x3");
}

#[test]
fn since_and_until_select_by_timestamp() {
    let dir = TempDir::new();
    let path = dir.0.join("web").join("web-1x1.log");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let now = SystemTime::now();
    let ago = |minutes: u64| log_time(now - Duration::from_secs(minutes * 60));
    write_records(&path, &[(&ago(120), "2h"), (&ago(90), "90m")]);
    rotate(&path);
    write_records(&path, &[(&ago(30), "30m"), (&ago(1), "1m")]);

    let since = |since: u64| LogQuery {
        since: Some(Duration::from_secs(since * 60)),
        ..LogQuery::default()
    };
    assert_eq!(
        lines_of(&read(&dir.0, "web", &since(60)).unwrap()),
        ["30m", "1m"]
    );
    assert_eq!(
        lines_of(&read(&dir.0, "web", &since(100)).unwrap()),
        ["90m", "30m", "1m"]
    );
    assert!(read(&dir.0, "web", &since(0)).unwrap().lines.is_empty());
    let both = LogQuery {
        tail: Some(1),
        ..since(60)
    };
    assert_eq!(lines_of(&read(&dir.0, "web", &both).unwrap()), ["1m"]);

    let until = LogQuery {
        until: Some(ago(60)),
        ..LogQuery::default()
    };
    let chunk = read(&dir.0, "web", &until).unwrap();
    assert_eq!(lines_of(&chunk), ["2h", "90m"]);
    assert!(!chunk.more);
    let rest = read(
        &dir.0,
        "web",
        &LogQuery {
            after: chunk.cursor,
            ..LogQuery::default()
        },
    )
    .unwrap();
    assert_eq!(lines_of(&rest), ["30m", "1m"]);
}

#[test]
fn large_logs_come_in_pages_without_losing_lines() {
    let dir = TempDir::new();
    let path = dir.0.join("web").join("web-1x1.log");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // 3.9 MB of records in two files.
    let input: String = (0..30_000)
        .map(|i| format!("{i:06} {}\n", "x".repeat(90)))
        .collect();
    run_shim(input.as_bytes(), &files(path.clone(), 2 << 20, 2));
    assert!(rotated_path(&path, 1).exists());

    let mut query = LogQuery::default();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let chunk = read(&dir.0, "web", &query).unwrap();
        pages += 1;
        seen.extend(chunk.lines.into_iter().map(|l| l.line));
        query.after = chunk.cursor;
        if !chunk.more {
            break;
        }
    }
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(seen.len(), 30_000);
    assert!(
        seen.iter()
            .enumerate()
            .all(|(i, line)| line.starts_with(&format!("{i:06} ")))
    );
}

#[test]
fn lines_of_older_logs_without_timestamps_are_shown_first() {
    let dir = TempDir::new();
    let app = dir.0.join("web");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("web-1x1.log"), "plain one\nplain two\n").unwrap();
    write_records(&app.join("web-1x2.log"), &[(&at(0), "stamped")]);
    let chunk = read(&dir.0, "web", &LogQuery::default()).unwrap();
    assert_eq!(lines_of(&chunk), ["plain one", "plain two", "stamped"]);
    assert_eq!(chunk.lines[0].time, None);
    assert!(
        read(&dir.0, "absent", &LogQuery::default())
            .unwrap()
            .lines
            .is_empty()
    );
}

#[test]
fn prune_keeps_live_instances_and_the_newest_dead_ones() {
    let dir = TempDir::new();
    let app = dir.0.join("web");
    std::fs::create_dir_all(&app).unwrap();
    let base = SystemTime::now() - Duration::from_secs(3600);
    for n in 0..9u64 {
        let path = app.join(format!("web-1x{n}.log"));
        write_records(&path, &[(&at(n), "x")]);
        if n % 2 == 0 {
            rotate(&path);
            write_records(&path, &[(&at(n), "y")]);
        }
        for index in 0..2 {
            if let Ok(file) = File::options()
                .append(true)
                .open(rotated_path(&path, index))
            {
                file.set_modified(base + Duration::from_secs(n * 60))
                    .unwrap();
            }
        }
    }
    write_records(&app.join("web-api-1x0.log"), &[(&at(0), "other service")]);

    // web-1x0 is live (and oldest); 1x1..1x8 are dead: the 5 newest stay.
    let removed = prune(&dir.0, "web", "web", &["web-1x0"]).unwrap();
    assert_eq!(removed, ["web-1x3", "web-1x2", "web-1x1"]);
    let mut left: Vec<String> = std::fs::read_dir(&app)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "web-1x0.log",
            "web-1x0.log.1",
            "web-1x4.log",
            "web-1x4.log.1",
            "web-1x5.log",
            "web-1x6.log",
            "web-1x6.log.1",
            "web-1x7.log",
            "web-1x8.log",
            "web-1x8.log.1",
            "web-api-1x0.log"
        ]
    );
    assert!(
        prune(&dir.0, "web", "web", &["web-1x0"])
            .unwrap()
            .is_empty()
    );
    assert!(prune(&dir.0, "absent", "web", &[]).unwrap().is_empty());
}

#[test]
fn remove_app_logs_removes_the_app_directory_only() {
    let dir = TempDir::new();
    for app in ["web", "other"] {
        std::fs::create_dir_all(dir.0.join(app)).unwrap();
        write_records(&dir.0.join(app).join("web-1x1.log"), &[(&at(0), "x")]);
    }
    remove_app_logs(&dir.0, "web").unwrap();
    assert!(!dir.0.join("web").exists());
    assert!(dir.0.join("other").join("web-1x1.log").exists());
    remove_app_logs(&dir.0, "web").unwrap();
    for bad in ["..", "", "a/b", "../other"] {
        assert!(remove_app_logs(&dir.0, bad).is_err(), "{bad}");
    }
    assert!(dir.0.join("other").exists());
}

#[tokio::test]
async fn spawn_shim_hands_out_the_write_end_and_the_shim_sees_eof() {
    let dir = TempDir::new();
    // A stand-in for the agent binary: `log-shim --file FILE …` copies stdin to FILE.copy,
    // which appears only once stdin is closed.
    let fake = dir.0.join("fake-agent");
    std::fs::write(
        &fake,
        "#!/bin/sh\ncat > \"$3.tmp\" && mv \"$3.tmp\" \"$3.copy\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.0.join("logs").join("web").join("web-1x1.log");

    let fd = spawn_shim(&fake, &log, 1 << 20, 3).unwrap();
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_ne!(
        flags & libc::FD_CLOEXEC,
        0,
        "the write end is close-on-exec"
    );
    let mode = std::fs::metadata(log.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let mut output = File::from(fd);
    output.write_all(b"hello\n").unwrap();
    drop(output);
    let copy = PathBuf::from(format!("{}.copy", log.display()));
    let mut waited = 0;
    while std::fs::read_to_string(&copy).ok().as_deref() != Some("hello\n") {
        assert!(waited < 500, "the shim never wrote its copy");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }

    for (max_bytes, keep) in [(100, 3), (1 << 20, 0), (1 << 20, 11)] {
        assert!(spawn_shim(&fake, &log, max_bytes, keep).is_err());
    }
}

/// The lines of every page `query` leads to.
fn read_pages(logs_dir: &Path, app: &str, mut query: LogQuery) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let chunk = read(logs_dir, app, &query).unwrap();
        lines.extend(lines_of(&chunk));
        query.after = chunk.cursor;
        if !chunk.more {
            return lines;
        }
    }
}

#[test]
fn tail_reads_backwards_across_blocks_and_files() {
    let dir = TempDir::new();
    let app = dir.0.join("web");
    std::fs::create_dir_all(&app).unwrap();
    // Lines of many lengths (up to several blocks of the backward reader), empty ones too.
    let input: String = (0..400)
        .map(|i| format!("{i:03} {}\n", "v".repeat((i * 7919) % 40_000)))
        .chain(["\n".to_owned(), "\n".to_owned(), "last".to_owned()])
        .collect();
    let path = app.join("web-1x1.log");
    // About 8 MB: three files, none rotated away; lines over 16 KiB are several records.
    run_shim(input.as_bytes(), &files(path.clone(), 3 << 20, 3));
    assert!(rotated_path(&path, 2).exists());
    // An older agent's rotated file whose last line has no newline, and an unfinished line
    // of a written file (not shown yet).
    std::fs::write(app.join("web-1x0.log.1"), "legacy one\nlegacy two").unwrap();
    // (Longer than the rotated file: the backward reader must not reuse its block.)
    std::fs::write(app.join("web-1x0.log"), "legacy three, a longer line\n").unwrap();
    let other = app.join("web-1x2.log");
    write_records(&other, &[(&log_time(SystemTime::now()), "other")]);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&other)
        .unwrap()
        .write_all(b"2030-01-01T00:00:00.000000000Z unfinis")
        .unwrap();

    let all = read_pages(&dir.0, "web", LogQuery::default());
    assert_eq!(
        all[..3],
        ["legacy one", "legacy two", "legacy three, a longer line"]
    );
    assert_eq!(all[3], "000 ");
    assert!(all.len() > 3 + 400 + 2 + 1);
    assert_eq!(all.last().unwrap(), "other");
    for n in [0, 1, 2, 3, 5, 17, 100, all.len() - 1, all.len(), usize::MAX] {
        let query = LogQuery {
            tail: Some(n),
            ..LogQuery::default()
        };
        let tail = read_pages(&dir.0, "web", query);
        assert_eq!(tail, all[all.len() - n.min(all.len())..], "tail {n}");
    }
}
