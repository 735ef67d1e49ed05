//! Instance logs: a log shim process per instance writes what the instance prints into
//! size-capped, rotated files; the agent reads them back for `miren logs`.
//!
//! Instances outlive the agent (it may be restarted or killed while they keep printing), so
//! the writer cannot live in the agent: [`spawn_shim`] starts `miren-agent log-shim` (like
//! conmon or containerd's shim) in a session of its own, deaf to SIGTERM, SIGINT and SIGHUP,
//! with its stdin on a pipe whose write end becomes the instance's stdout and stderr. The shim
//! ([`run_shim`]) ends when every process of the instance is gone (EOF on the pipe).
//!
//! Files: `<logs>/APP/SERVICE-ID.log` is written; when a record would take it over the cap it is
//! renamed to `….log.1` (`.1` to `.2`, … up to `keep - 1` rotated files; the oldest is
//! dropped). Files are 0600, directories 0700. One record per line:
//! `2026-11-30T05:04:57.123456789Z TEXT\n` — RFC 3339 in UTC with nanoseconds, always 30
//! characters, so timestamps compare as text in time order ([`log_time`]). A line longer than
//! 16 KiB is cut into several records (the shim's memory stays bounded). A record the shim
//! cannot write (disk full, directory removed) is dropped and counted; the next record that can
//! be written is preceded by a note saying how many were lost.
//!
//! Reading ([`read`]): the files of every selected instance are opened newest first and kept
//! only if no rotation happened meanwhile, then merged by timestamp. A cursor names, per
//! instance, the file (inode plus a hash of its first bytes, since inode numbers are reused)
//! and the offset of the next unread line, so it stays valid while that file is renamed by
//! rotations. One call returns about 1 MiB and says whether more is there.
//!
//! Retention: [`prune`] keeps the logs of the [`KEEP_DEAD_INSTANCES`] most recently written dead
//! instances per service (a crash loop leaves one set per restart); [`remove_app_logs`] removes
//! an app's logs with the app.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    fs::{DirBuilder, File, OpenOptions},
    io::{self, BufRead, BufReader, ErrorKind, Read, Seek, SeekFrom, Write},
    os::{
        fd::OwnedFd,
        unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, SystemTime},
};

use nix::{
    fcntl::OFlag,
    sys::signal::{SigSet, Signal},
};

use super::SandboxError;
use crate::api::types::{LogChunk, LogLine};

/// Files of one instance's log in all (the written one and the rotated ones) by default.
pub const DEFAULT_KEEP_FILES: u32 = 3;
/// Most files of one instance's log the shim keeps (`--keep`); the reader looks for this many.
pub const MAX_KEEP_FILES: u32 = 10;
/// Smallest size cap of one log file (`--max-bytes`, `--instance-log-max`).
pub const MIN_FILE_BYTES: u64 = 4096;
/// Dead instances of a service whose logs [`prune`] keeps.
pub const KEEP_DEAD_INSTANCES: usize = 5;
/// Longest text of one record; longer lines are cut into several records.
const MAX_CHUNK: usize = 16 << 10;
/// How much the shim reads from its pipe at once.
const READ_BUFFER: usize = 64 << 10;
/// About how many bytes of lines one [`read`] returns.
const PAGE_BYTES: usize = 1 << 20;
/// Length of a record's timestamp.
const TIME_LEN: usize = 30;
/// Longest line [`read`] returns at once from a file not written by a shim (an older agent's
/// log); the rest of such a line follows as further lines.
const MAX_READ_LINE: usize = 64 << 10;
/// Bytes at the start of a file whose hash a cursor keeps to recognise the file.
const TAG_BYTES: u64 = 64;
/// How often [`read`] retries opening an instance's files when a rotation interfered.
const OPEN_ATTEMPTS: usize = 5;

/// `t` as a log timestamp: RFC 3339 in UTC with nanoseconds, e.g.
/// `2026-11-30T05:04:57.123456789Z`; always 30 characters, so timestamps compare as text in
/// time order.
pub fn log_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

/// True when `text` is a timestamp as [`log_time`] writes it.
pub fn is_log_time(text: &[u8]) -> bool {
    const PATTERN: &[u8; TIME_LEN] = b"dddd-dd-ddTdd:dd:dd.dddddddddZ";
    text.len() == TIME_LEN
        && text.iter().zip(PATTERN).all(|(&byte, &want)| {
            if want == b'd' {
                byte.is_ascii_digit()
            } else {
                byte == want
            }
        })
}

/// Where one shim writes and how much it keeps: the `miren-agent log-shim` flags.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LogFiles {
    /// The log file; rotated files are FILE.1, FILE.2, …
    #[arg(long = "file", value_name = "FILE")]
    pub path: PathBuf,
    /// Size cap of each file in bytes (at least 4096).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(MIN_FILE_BYTES..))]
    pub max_bytes: u64,
    /// Files kept in all, the written one included (1 to 10).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_KEEP_FILES)))]
    pub keep: u32,
}

impl LogFiles {
    /// The `index`th rotated file (`FILE.index`); index 0 is the written file.
    fn rotated(&self, index: u32) -> PathBuf {
        rotated_path(&self.path, index)
    }
}

/// `path` itself for index 0, else `path.INDEX`.
fn rotated_path(path: &Path, index: u32) -> PathBuf {
    if index == 0 {
        return path.to_owned();
    }
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

/// What a shim did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShimStats {
    /// Records written.
    pub records: u64,
    /// Rotations of the written file.
    pub rotations: u64,
    /// Records lost because the file could not be written.
    pub dropped: u64,
}

/// Starts a log shim for one instance and returns the write end of its input pipe, to become
/// the instance's stdout and stderr.
///
/// The shim is `agent_binary log-shim --file FILE --max-bytes MAX_BYTES --keep KEEP` (pass
/// `/proc/self/exe`, which still works after the agent's binary was replaced, or
/// [`std::env::current_exe`]), its stdout and stderr on /dev/null, working directory `/`,
/// mimalloc's arena committed lazily (`MIMALLOC_ARENA_EAGER_COMMIT=0`). Both
/// pipe ends are close-on-exec in the agent: hand the returned descriptor to the instance (a
/// `Stdio` dups it) and drop it in the agent once the instance started, so the shim sees EOF
/// when the instance's processes are gone. The directory of `file` is created (0700) if
/// needed. The agent's Tokio runtime reaps the shim when it exits.
///
/// # Panics
/// Outside a Tokio runtime (inside `spawn_blocking` is fine).
///
/// # Errors
/// [`SandboxError::Io`] for a `max_bytes` below [`MIN_FILE_BYTES`], a `keep` outside
/// 1..=[`MAX_KEEP_FILES`], or when the directory, the pipe or the process cannot be created.
pub fn spawn_shim(
    agent_binary: &Path,
    file: &Path,
    max_bytes: u64,
    keep: u32,
) -> Result<OwnedFd, SandboxError> {
    let op = || format!("starting the log shim for {}", file.display());
    if max_bytes < MIN_FILE_BYTES || !(1..=MAX_KEEP_FILES).contains(&keep) {
        return Err(SandboxError::io(
            op(),
            io::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a log needs files of at least {MIN_FILE_BYTES} bytes and 1 to \
                     {MAX_KEEP_FILES} files (got {max_bytes} bytes, {keep} files)"
                ),
            ),
        ));
    }
    if let Some(dir) = file.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| SandboxError::io(format!("creating {}", dir.display()), e))?;
    }
    let (read, write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::io(op(), e.into()))?;
    let mut child = tokio::process::Command::new(agent_binary)
        .arg("log-shim")
        .arg("--file")
        .arg(file)
        .args(["--max-bytes", &max_bytes.to_string()])
        .args(["--keep", &keep.to_string()])
        // mimalloc (the agent's allocator) commits its first arena eagerly: 8.4 MB private
        // per shim instead of 2.7 MB (debug build), once per instance on the node.
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        .spawn()
        .map_err(|e| SandboxError::io(op(), e))?;
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(write)
}

/// The `miren-agent log-shim` process: leaves the agent's session, blocks SIGTERM, SIGINT and
/// SIGHUP (it stops only at EOF on stdin), closes every descriptor but stdin, stdout and
/// stderr (anything the agent leaked, such as a listening socket, must not live as long as the
/// instance), then runs [`run_shim`] on stdin.
pub fn shim_main(files: &LogFiles) -> ShimStats {
    // Fails only for a process group leader, which then stays in its session.
    let _ = nix::unistd::setsid();
    // SAFETY: close_range only closes descriptors; this process is single-threaded here and
    // owns nothing above stderr (it has only parsed its arguments).
    unsafe {
        libc::close_range(3, libc::c_uint::MAX, 0);
    }
    let mut deaf = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        deaf.add(signal);
    }
    let _ = deaf.thread_block();
    run_shim(io::stdin().lock(), files)
}

/// Copies `input` to `files` until EOF (or an unreadable input), one timestamped record per
/// line, rotating at the cap (see the module documentation). Never fails: what cannot be
/// written is dropped and counted.
pub fn run_shim(mut input: impl Read, files: &LogFiles) -> ShimStats {
    let chunk = usize::try_from(files.max_bytes.saturating_sub(TIME_LEN as u64 + 2))
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_CHUNK);
    let mut writer = Writer::open(files);
    let mut buffer = vec![0u8; READ_BUFFER];
    // The unfinished line (shorter than `chunk`), and whether part of it already went out.
    let mut partial: Vec<u8> = Vec::new();
    let mut cut = false;
    loop {
        let n = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let time = log_time(SystemTime::now());
        let mut rest = &buffer[..n];
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..newline];
            rest = &rest[newline + 1..];
            if partial.is_empty() {
                // The end of a line already written in chunks adds no empty record.
                if !(cut && line.is_empty()) {
                    writer.line(&time, line, chunk);
                }
            } else {
                partial.extend_from_slice(line);
                writer.line(&time, &partial, chunk);
                partial.clear();
            }
            cut = false;
        }
        partial.extend_from_slice(rest);
        if partial.len() >= chunk {
            let whole = partial.len() / chunk * chunk;
            writer.line(&time, &partial[..whole], chunk);
            partial.drain(..whole);
            cut = true;
        }
        writer.flush();
    }
    if !partial.is_empty() {
        writer.line(&log_time(SystemTime::now()), &partial, chunk);
    }
    writer.flush();
    writer.stats
}

/// The shim's side of the files: buffered records of one read, the size of the written file,
/// rotation, and what was lost.
#[derive(Debug)]
struct Writer<'a> {
    files: &'a LogFiles,
    /// `None` after an error: reopened at the next flush.
    file: Option<File>,
    size: u64,
    pending: Vec<u8>,
    pending_records: u64,
    /// Records dropped since the last note about it.
    unreported: u64,
    stats: ShimStats,
}

impl<'a> Writer<'a> {
    fn open(files: &'a LogFiles) -> Self {
        let mut writer = Self {
            files,
            file: None,
            size: 0,
            pending: Vec::new(),
            pending_records: 0,
            unreported: 0,
            stats: ShimStats::default(),
        };
        writer.reopen(false);
        writer
    }

    /// Opens the written file (appending, or emptied), 0600.
    fn reopen(&mut self, truncate: bool) {
        let opened = OpenOptions::new()
            .create(true)
            .write(true)
            .append(!truncate)
            .truncate(truncate)
            .mode(0o600)
            .open(&self.files.path)
            .and_then(|file| Ok((file.metadata()?.len(), file)));
        (self.size, self.file) = match opened {
            Ok((size, file)) => (size, Some(file)),
            Err(_) => (0, None),
        };
    }

    /// One line as records of at most `chunk` bytes of text.
    fn line(&mut self, time: &str, text: &[u8], chunk: usize) {
        if text.is_empty() {
            self.record(time, b"");
        }
        for part in text.chunks(chunk) {
            self.record(time, part);
        }
    }

    fn record(&mut self, time: &str, text: &[u8]) {
        if self.unreported > 0 {
            let note = format!(
                "[miren log-shim] {} log lines were lost: the log file could not be written",
                self.unreported
            );
            self.unreported = 0;
            self.push(time, note.as_bytes());
        }
        self.push(time, text);
    }

    fn push(&mut self, time: &str, text: &[u8]) {
        let len = (TIME_LEN + text.len() + 2) as u64;
        let used = self.size + self.pending.len() as u64;
        if used > 0 && used + len > self.files.max_bytes {
            self.flush();
            self.rotate();
        }
        self.pending.extend_from_slice(time.as_bytes());
        self.pending.push(b' ');
        self.pending.extend_from_slice(text);
        self.pending.push(b'\n');
        self.pending_records += 1;
    }

    /// Writes the buffered records (in one write when possible).
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if self.file.is_none() {
            self.reopen(false);
        }
        let written = match &mut self.file {
            Some(file) => file.write_all(&self.pending).is_ok(),
            None => false,
        };
        if written {
            self.size += self.pending.len() as u64;
            self.stats.records += self.pending_records;
        } else {
            self.stats.dropped += self.pending_records;
            self.unreported += self.pending_records;
            self.file = None;
        }
        self.pending.clear();
        self.pending_records = 0;
    }

    /// FILE.(K-2) → FILE.(K-1), …, FILE → FILE.1, and a new FILE. When FILE cannot be renamed
    /// (one file kept, or an error) it is emptied instead, which keeps the cap.
    fn rotate(&mut self) {
        self.file = None;
        let keep = self.files.keep;
        for index in (1..keep.saturating_sub(1)).rev() {
            let _ = std::fs::rename(self.files.rotated(index), self.files.rotated(index + 1));
        }
        let renamed = keep > 1 && std::fs::rename(&self.files.path, self.files.rotated(1)).is_ok();
        self.reopen(!renamed);
        self.stats.rotations += 1;
    }
}

/// Which lines [`read`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Only this service's instances.
    pub service: Option<String>,
    /// The cursor of an earlier [`LogChunk`]: continue after it. Empty: start as `tail` and
    /// `since` say (both are ignored with a cursor).
    pub after: String,
    /// Start with the last `tail` lines of all selected instances together.
    pub tail: Option<usize>,
    /// Start with the lines written at most this long ago.
    pub since: Option<Duration>,
    /// Stop before lines written after this [`log_time`] timestamp (so that reading all lines
    /// ends even while instances keep writing).
    pub until: Option<String>,
}

/// The lines of `app`'s instances under `logs_dir` that `query` selects, in time order
/// (instances merged by timestamp; lines of files not written by a shim come first), about
/// 1 MiB at most; [`LogChunk::more`] says whether to call again with [`LogChunk::cursor`].
///
/// # Errors
/// [`SandboxError::Io`] when the app's log directory or an instance's files cannot be read
/// (a missing directory is no error: no lines).
pub fn read(logs_dir: &Path, app: &str, query: &LogQuery) -> Result<LogChunk, SandboxError> {
    let dir = logs_dir.join(app);
    let io_err = |e| SandboxError::io(format!("reading the logs in {}", dir.display()), e);
    let positions = parse_cursor(&query.after);
    let mut sources = Vec::new();
    for instance in instance_files(&dir, query.service.as_deref())
        .map_err(io_err)?
        .into_keys()
    {
        let files = open_files(&dir.join(format!("{instance}.log"))).map_err(io_err)?;
        if files.is_empty() {
            continue;
        }
        let pos = positions
            .get(instance.as_str())
            .map_or(Pos::default(), |cursor| cursor.locate(&files));
        sources.push(Source::new(instance, files, pos));
    }
    let mut since = None;
    if query.after.is_empty() {
        if let Some(n) = query.tail {
            start_at_tail(&mut sources, n).map_err(io_err)?;
        }
        since = query.since.map(|ago| {
            log_time(
                SystemTime::now()
                    .checked_sub(ago)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            )
        });
    }
    let mut lines = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    loop {
        let mut next: Option<(Option<&str>, usize)> = None;
        for (i, source) in sources.iter_mut().enumerate() {
            if let Some(line) = source.peek(since.as_deref()).map_err(io_err)? {
                let key = (line.time.as_deref(), i);
                if next.is_none_or(|best| key < best) {
                    next = Some(key);
                }
            }
        }
        let Some((time, i)) = next else { break };
        if let (Some(time), Some(until)) = (time, &query.until)
            && time > until.as_str()
        {
            break;
        }
        if bytes >= PAGE_BYTES {
            more = true;
            break;
        }
        let source = &mut sources[i];
        if let Some(line) = source.head.take() {
            source.pos = line.next;
            bytes += line.text.len() + 1;
            lines.push(LogLine {
                instance: source.instance.clone(),
                line: line.text,
                time: line.time,
            });
        }
    }
    let cursor = sources
        .iter()
        .map(Source::cursor)
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_err)?
        .join(",");
    Ok(LogChunk {
        lines,
        cursor,
        more,
    })
}

/// Removes the logs of `service`'s dead instances (those not named in `live`) of `app`, but
/// for the [`KEEP_DEAD_INSTANCES`] most recently written; returns the instances removed.
///
/// # Errors
/// [`SandboxError::Io`] when the directory cannot be listed or a file cannot be removed.
pub fn prune(
    logs_dir: &Path,
    app: &str,
    service: &str,
    live: &[&str],
) -> Result<Vec<String>, SandboxError> {
    let dir = logs_dir.join(app);
    let io_err = |e| SandboxError::io(format!("pruning the logs in {}", dir.display()), e);
    let mut dead: Vec<(SystemTime, String, Vec<PathBuf>)> = instance_files(&dir, Some(service))
        .map_err(io_err)?
        .into_iter()
        .filter(|(instance, _)| !live.contains(&instance.as_str()))
        .map(|(instance, files)| {
            let newest = files
                .iter()
                .map(|(_, modified)| *modified)
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (
                newest,
                instance,
                files.into_iter().map(|(path, _)| path).collect(),
            )
        })
        .collect();
    dead.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let mut removed = Vec::new();
    for (_, instance, files) in dead.into_iter().skip(KEEP_DEAD_INSTANCES) {
        for file in files {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        removed.push(instance);
    }
    Ok(removed)
}

/// Removes every log of `app` (its directory under `logs_dir`); nothing to do when it has none.
///
/// # Errors
/// [`SandboxError::Io`] when `app` is not an app name (so no path outside `logs_dir` is ever
/// removed) or the directory cannot be removed.
pub fn remove_app_logs(logs_dir: &Path, app: &str) -> Result<(), SandboxError> {
    let op = || format!("removing the logs of app \"{app}\"");
    if !crate::config::is_dns_label(app) {
        return Err(SandboxError::io(
            op(),
            io::Error::new(ErrorKind::InvalidInput, "not an app name"),
        ));
    }
    match std::fs::remove_dir_all(logs_dir.join(app)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SandboxError::io(op(), e)),
    }
}

/// The log files in `dir` by instance (`SERVICE-ID`, of `service` only when given), with their
/// modification times. Instance ids contain no '-'; service names may.
fn instance_files(
    dir: &Path,
    service: Option<&str>,
) -> io::Result<BTreeMap<String, Vec<(PathBuf, SystemTime)>>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut found: BTreeMap<String, Vec<(PathBuf, SystemTime)>> = BTreeMap::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(instance) = name.to_str().and_then(instance_of) else {
            continue;
        };
        let wanted = service.is_none_or(|service| {
            instance
                .strip_prefix(service)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|id| !id.is_empty() && !id.contains('-'))
        });
        if !wanted {
            continue;
        }
        let modified = match entry.metadata() {
            Ok(metadata) => metadata.modified()?,
            // Rotated away since the listing.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        found
            .entry(instance.to_owned())
            .or_default()
            .push((entry.path(), modified));
    }
    Ok(found)
}

/// `INSTANCE` of a file named `INSTANCE.log` or `INSTANCE.log.N`.
fn instance_of(file_name: &str) -> Option<&str> {
    if let Some(instance) = file_name.strip_suffix(".log") {
        return Some(instance);
    }
    let (instance, index) = file_name.rsplit_once(".log.")?;
    (!index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())).then_some(instance)
}

/// One opened log file.
#[derive(Debug)]
struct LogFile {
    file: File,
    inode: u64,
}

impl LogFile {
    /// Hash (FNV-1a) of the file's first `len` bytes; `None` when it is shorter.
    fn tag(&self, len: u64) -> io::Result<Option<u64>> {
        let mut start = vec![0u8; usize::try_from(len.min(TAG_BYTES)).unwrap_or(0)];
        match self.file.read_exact_at(&mut start, 0) {
            Ok(()) => Ok(Some(
                start.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
                    (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                }),
            )),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The timestamp of the record starting at `offset`, if it has one.
    fn time_at(&self, offset: u64) -> io::Result<Option<String>> {
        let mut head = [0u8; TIME_LEN + 1];
        match self.file.read_exact_at(&mut head, offset) {
            Ok(()) => Ok(record_time(&head).map(str::to_owned)),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The timestamp a record starts with (followed by a space).
fn record_time(record: &[u8]) -> Option<&str> {
    let time = record.get(..TIME_LEN)?;
    (record.get(TIME_LEN) == Some(&b' ') && is_log_time(time))
        .then(|| std::str::from_utf8(time).ok())
        .flatten()
}

/// Opens `path` and its rotated files, oldest first. Opens the newest first and checks
/// afterwards that `path` is still the file opened: then no rotation happened in between and
/// the files are one consistent sequence; otherwise it tries again.
fn open_files(path: &Path) -> io::Result<Vec<LogFile>> {
    let mut files = Vec::new();
    for _ in 0..OPEN_ATTEMPTS {
        files.clear();
        let mut newest = None;
        for index in 0..MAX_KEEP_FILES {
            match File::open(rotated_path(path, index)) {
                Ok(file) => {
                    let inode = file.metadata()?.ino();
                    if index == 0 {
                        newest = Some(inode);
                    }
                    files.push(LogFile { file, inode });
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let now = match std::fs::metadata(path) {
            Ok(metadata) => Some(metadata.ino()),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if now == newest {
            break;
        }
    }
    files.reverse();
    Ok(files)
}

/// A place in an instance's files (index into them, oldest first, and byte offset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    file: usize,
    offset: u64,
}

/// One instance's entry of a cursor: `INSTANCE:INODE:TAG:OFFSET` (tag in hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CursorPos {
    inode: u64,
    tag: u64,
    offset: u64,
}

impl CursorPos {
    /// Where this cursor points in `files`: the file with its inode whose first bytes hash to
    /// its tag; the start of the oldest file when that file was rotated away.
    fn locate(&self, files: &[LogFile]) -> Pos {
        files
            .iter()
            .position(|file| {
                file.inode == self.inode
                    && file.file.metadata().is_ok_and(|m| m.len() >= self.offset)
                    && file.tag(self.offset).ok().flatten() == Some(self.tag)
            })
            .map_or(Pos::default(), |file| Pos {
                file,
                offset: self.offset,
            })
    }
}

/// Parses a cursor (entries that do not parse are ignored: those instances start over).
fn parse_cursor(cursor: &str) -> HashMap<&str, CursorPos> {
    cursor
        .split(',')
        .filter_map(|entry| {
            let mut parts = entry.rsplitn(4, ':');
            let offset = parts.next()?.parse().ok()?;
            let tag = u64::from_str_radix(parts.next()?, 16).ok()?;
            let inode = parts.next()?.parse().ok()?;
            let instance = parts.next()?;
            Some((instance, CursorPos { inode, tag, offset }))
        })
        .collect()
}

/// A line read from a file.
#[derive(Debug)]
struct Line {
    time: Option<String>,
    text: String,
    /// Where the line after it starts.
    next: Pos,
}

/// Reads one instance's lines across its files.
#[derive(Debug)]
struct Source {
    instance: String,
    files: Vec<LogFile>,
    /// Where the next line not returned starts.
    pos: Pos,
    /// The next line, read but not returned yet.
    head: Option<Line>,
    reader: Option<(usize, BufReader<File>)>,
    done: bool,
}

impl Source {
    fn new(instance: String, files: Vec<LogFile>, pos: Pos) -> Self {
        Self {
            instance,
            files,
            pos,
            head: None,
            reader: None,
            done: false,
        }
    }

    /// The next line (skipping lines older than `since`), read once and kept until taken.
    fn peek(&mut self, since: Option<&str>) -> io::Result<Option<&Line>> {
        while self.head.is_none() && !self.done {
            match self.read_line()? {
                Some(line) if since.is_some_and(|since| line.time.as_deref() < Some(since)) => {
                    self.pos = line.next;
                }
                Some(line) => self.head = Some(line),
                None => self.done = true,
            }
        }
        Ok(self.head.as_ref())
    }

    /// The line after the head (or at `pos`); `None` at the end, where an unfinished last
    /// line of the written file stays unread.
    fn read_line(&mut self) -> io::Result<Option<Line>> {
        let mut bytes = Vec::new();
        loop {
            let start = self.head.as_ref().map_or(self.pos, |line| line.next);
            if start.file >= self.files.len() {
                return Ok(None);
            }
            let newest = start.file + 1 == self.files.len();
            if self
                .reader
                .as_ref()
                .is_none_or(|(file, _)| *file != start.file)
            {
                let mut file = self.files[start.file].file.try_clone()?;
                file.seek(SeekFrom::Start(start.offset))?;
                self.reader = Some((start.file, BufReader::with_capacity(READ_BUFFER, file)));
            }
            let Some((_, reader)) = &mut self.reader else {
                return Ok(None);
            };
            let ended = read_line_capped(reader, &mut bytes)?;
            if bytes.is_empty() || (!ended && bytes.len() < MAX_READ_LINE && newest) {
                if newest {
                    return Ok(None);
                }
                // The end of a rotated file: go on with the next one.
                self.pos = Pos {
                    file: start.file + 1,
                    offset: 0,
                };
                continue;
            }
            let next = Pos {
                file: start.file,
                offset: start.offset + bytes.len() as u64,
            };
            if ended {
                bytes.pop();
            }
            let (time, text) = match record_time(&bytes) {
                Some(time) => (Some(time.to_owned()), &bytes[TIME_LEN + 1..]),
                None => (None, &bytes[..]),
            };
            return Ok(Some(Line {
                time,
                text: String::from_utf8_lossy(text).into_owned(),
                next,
            }));
        }
    }

    /// This source's cursor entry.
    fn cursor(&self) -> io::Result<String> {
        let pos = self.pos;
        let file = &self.files[pos.file.min(self.files.len() - 1)];
        let tag = file.tag(pos.offset)?.unwrap_or(0);
        Ok(format!(
            "{}:{}:{tag:x}:{}",
            self.instance, file.inode, pos.offset
        ))
    }
}

/// Reads up to and including the next newline into `line` (cleared first), at most
/// [`MAX_READ_LINE`] bytes; true when a newline ended it.
fn read_line_capped(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<bool> {
    line.clear();
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(false);
        }
        let room = MAX_READ_LINE - line.len();
        let window = &available[..available.len().min(room)];
        if let Some(newline) = window.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&window[..=newline]);
            reader.consume(newline + 1);
            return Ok(true);
        }
        let taken = window.len();
        line.extend_from_slice(window);
        reader.consume(taken);
        if line.len() >= MAX_READ_LINE {
            return Ok(false);
        }
    }
}

/// Moves every source to the first of the last `n` lines of all sources together (by
/// timestamp); a source none of whose lines are among them starts at its end. Reads the
/// sources backwards, merged newest first, so memory does not grow with `n`.
fn start_at_tail(sources: &mut [Source], n: usize) -> io::Result<()> {
    let mut starts = Vec::with_capacity(sources.len());
    {
        let mut readers = Vec::with_capacity(sources.len());
        let mut heads = Vec::with_capacity(sources.len());
        for source in sources.iter() {
            let (mut reader, end) = Backward::new(&source.files)?;
            starts.push(end);
            heads.push(reader.prev()?);
            readers.push(reader);
        }
        for _ in 0..n {
            let newest = heads
                .iter()
                .enumerate()
                .filter_map(|(i, head)| head.as_ref().map(|(time, pos)| (time, i, *pos)))
                .max();
            let Some((_, i, pos)) = newest else { break };
            starts[i] = pos;
            heads[i] = readers[i].prev()?;
        }
    }
    for (source, start) in sources.iter_mut().zip(starts) {
        source.pos = start;
    }
    Ok(())
}

/// An instance's complete lines read backwards, newest first, one block at a time.
#[derive(Debug)]
struct Backward<'a> {
    files: &'a [LogFile],
    /// The file being read, and where its unread part ends.
    file: usize,
    end: u64,
    /// The block of `file` read last, and where it starts.
    block: Vec<u8>,
    block_start: u64,
}

impl<'a> Backward<'a> {
    /// A reader starting after the last complete line, and that position (where a source
    /// with none of the last lines starts).
    fn new(files: &'a [LogFile]) -> io::Result<(Self, Pos)> {
        let mut reader = Self {
            files,
            file: files.len().saturating_sub(1),
            end: 0,
            block: Vec::new(),
            block_start: 0,
        };
        if let Some(newest) = files.last() {
            // The unfinished last line of the written file is not a line yet.
            let len = newest.file.metadata()?.len();
            reader.end = reader.newline_before(len)?.map_or(0, |newline| newline + 1);
        }
        let end = Pos {
            file: reader.file,
            offset: reader.end,
        };
        Ok((reader, end))
    }

    /// The previous line's timestamp and start; `None` before the first line.
    fn prev(&mut self) -> io::Result<Option<(Option<String>, Pos)>> {
        while self.end == 0 {
            if self.file == 0 {
                return Ok(None);
            }
            self.file -= 1;
            self.block.clear();
            // A rotated file's last line counts even without its newline.
            self.end = self.files[self.file].file.metadata()?.len();
        }
        let start = self
            .newline_before(self.end - 1)?
            .map_or(0, |newline| newline + 1);
        self.end = start;
        let time = self.files[self.file].time_at(start)?;
        Ok(Some((
            time,
            Pos {
                file: self.file,
                offset: start,
            },
        )))
    }

    /// Where the last newline before `pos` in the current file is.
    fn newline_before(&mut self, mut pos: u64) -> io::Result<Option<u64>> {
        while pos > 0 {
            let cached = self.block_start + self.block.len() as u64;
            if !(self.block_start < pos && pos <= cached) {
                let start = pos.saturating_sub(READ_BUFFER as u64);
                self.block
                    .resize(usize::try_from(pos - start).unwrap_or(0), 0);
                self.files[self.file]
                    .file
                    .read_exact_at(&mut self.block, start)?;
                self.block_start = start;
            }
            let upto = usize::try_from(pos - self.block_start).unwrap_or(0);
            if let Some(i) = self.block[..upto].iter().rposition(|&b| b == b'\n') {
                return Ok(Some(self.block_start + i as u64));
            }
            pos = self.block_start;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
