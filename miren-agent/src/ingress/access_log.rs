//! The access log: one line per request, formatted on the ingress thread into a buffer of its
//! own and written to stderr in batches — when the thread's event loop goes idle, or once the
//! buffer passes [`BATCH`] — instead of one event per request through the tracing pipeline
//! (which cost ~4 µs per request: the formatting layer, a channel send and the log thread's
//! wake-ups; BENCHMARKS.md). Lines look like the agent's other log lines and obey the same
//! filter: `RUST_LOG=info,miren::access=off` turns them off.

use std::{cell::RefCell, fmt::Write as _, io::Write as _, time::SystemTime};

/// The log target of the lines.
pub const TARGET: &str = "miren::access";
/// Buffered bytes past which a busy thread writes its lines without waiting to go idle.
const BATCH: usize = 64 << 10;

thread_local! {
    /// This thread's lines not yet written, and the formatted date-time of the second its
    /// last line was stamped in.
    static PENDING: RefCell<(String, Option<(u64, String)>)> =
        const { RefCell::new((String::new(), None)) };
}

/// Whether access lines are logged (the tracing filter's verdict for [`TARGET`] at `info`).
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// Adds one line: the timestamp, level and target, then what `fields` writes.
pub fn line(fields: impl FnOnce(&mut String) -> std::fmt::Result) {
    PENDING.with_borrow_mut(|(buffer, second)| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        if second.as_ref().is_none_or(|(at, _)| *at != secs) {
            *second = Some((secs, date_time(secs)));
        }
        let stamp = second.as_ref().map_or("", |(_, text)| text.as_str());
        let _ = write!(
            buffer,
            "{stamp}.{:06}Z  INFO {TARGET}: ",
            now.subsec_micros()
        );
        let _ = fields(buffer);
        buffer.push('\n');
        if buffer.len() >= BATCH {
            write_out(buffer);
        }
    });
}

/// Writes this thread's pending lines; called when its event loop goes idle.
pub fn flush() {
    PENDING.with_borrow_mut(|(buffer, _)| write_out(buffer));
}

fn write_out(buffer: &mut String) {
    if !buffer.is_empty() {
        // Whole lines in one write: they never interleave with other threads' lines.
        let _ = std::io::stderr().lock().write_all(buffer.as_bytes());
        buffer.clear();
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of the Unix time `secs`.
fn date_time(secs: u64) -> String {
    let stamp = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        stamp.year(),
        u8::from(stamp.month()),
        stamp.day(),
        stamp.hour(),
        stamp.minute(),
        stamp.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_times_are_utc_and_zero_padded() {
        assert_eq!(date_time(0), "1970-01-01T00:00:00");
        assert_eq!(date_time(1_796_000_000), "2026-11-30T00:53:20");
    }
}
