//! Idle upstream HTTP/1 connections of one ingress thread, kept for the next request to the
//! same backend. Thread-local (a connection is registered with its thread's event loop), so
//! no lock and no task per connection: a connection is checked for having been closed by the
//! instance when it is taken (it is then dropped, never written to), at most
//! [`MAX_IDLE_PER_UPSTREAM`] wait per backend, and one sweep per thread drops those idle longer
//! than [`IDLE_TIMEOUT`]. Connections are keyed by the backend's pool key — a hash of (app,
//! service, address) — so an address reused by another app never gets a connection opened
//! for the previous one.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    pin::Pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use pingora::protocols::Stream;
use tokio::{io::AsyncRead, time::Instant};

/// Idle connections kept per backend.
pub const MAX_IDLE_PER_UPSTREAM: usize = 128;
/// How long a connection may wait idle.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the sweep looks for connections idle too long.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// One idle connection.
struct Idle {
    stream: Stream,
    since: Instant,
}

thread_local! {
    /// Idle connections by pool key, the most recently used last.
    static IDLE: RefCell<HashMap<u64, Vec<Idle>>> = RefCell::new(HashMap::new());
    /// Whether this thread's sweep task runs.
    static SWEEPING: Cell<bool> = const { Cell::new(false) };
}

/// An idle connection to the backend with `key` that the instance has not closed, if any.
pub fn take(key: u64) -> Option<Stream> {
    IDLE.with_borrow_mut(|idle| {
        let waiting = idle.get_mut(&key)?;
        let now = Instant::now();
        let found = loop {
            let Some(Idle { mut stream, since }) = waiting.pop() else {
                break None;
            };
            if now.duration_since(since) < IDLE_TIMEOUT && still_open(&mut stream) {
                break Some(stream);
            }
        };
        if waiting.is_empty() {
            idle.remove(&key);
        }
        found
    })
}

/// Keeps `stream`, a connection to the backend with `key` that just completed a request and
/// can take another, unless [`MAX_IDLE_PER_UPSTREAM`] already wait (the oldest is dropped).
pub fn put(key: u64, stream: Stream) {
    IDLE.with_borrow_mut(|idle| {
        let waiting = idle.entry(key).or_default();
        if waiting.len() >= MAX_IDLE_PER_UPSTREAM {
            waiting.remove(0);
        }
        waiting.push(Idle {
            stream,
            since: Instant::now(),
        });
    });
    if !SWEEPING.replace(true) {
        tokio::spawn(sweep());
    }
}

/// Idle connections waiting on this thread (for tests).
#[cfg(test)]
pub fn idle_count(key: u64) -> usize {
    IDLE.with_borrow(|idle| idle.get(&key).map_or(0, Vec::len))
}

/// Drops the connections idle longer than [`IDLE_TIMEOUT`] every [`SWEEP_EVERY`], until none
/// is left.
async fn sweep() {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let empty = IDLE.with_borrow_mut(|idle| {
            let now = Instant::now();
            idle.retain(|_, waiting| {
                waiting.retain(|c| now.duration_since(c.since) < IDLE_TIMEOUT);
                !waiting.is_empty()
            });
            idle.is_empty()
        });
        if empty {
            SWEEPING.set(false);
            return;
        }
    }
}

/// False when the instance closed the idle connection or sent something unasked on it: a read
/// polled once without waiting costs no system call while the event loop has seen nothing
/// arrive on it.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use pingora::protocols::l4::stream::Stream as L4Stream;
    use tokio::{
        io::AsyncWriteExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A client connection and the server's end of it.
    async fn pair(listener: &TcpListener) -> (Stream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Box::new(L4Stream::from(client)), server)
    }

    /// Lets the event loop see what arrived on the sockets.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_are_kept_per_key_and_closed_ones_never_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (open, _open_server) = pair(&listener).await;
        let (closed, closed_server) = pair(&listener).await;
        let (chatty, mut chatty_server) = pair(&listener).await;
        put(1, open);
        put(1, closed);
        put(1, chatty);
        assert_eq!(idle_count(1), 3);
        assert!(take(2).is_none(), "another key's connection was handed out");
        drop(closed_server);
        chatty_server.write_all(b"unasked").await.unwrap();
        settle().await;
        // Taken most recent first: the chatty and the closed one are dropped, the open one
        // is handed out.
        assert!(take(1).is_some());
        assert_eq!(idle_count(1), 0);
        assert!(take(1).is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn at_most_the_bound_wait_per_upstream() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut servers = Vec::new();
        for _ in 0..MAX_IDLE_PER_UPSTREAM + 5 {
            let (stream, server) = pair(&listener).await;
            servers.push(server);
            put(7, stream);
        }
        assert_eq!(idle_count(7), MAX_IDLE_PER_UPSTREAM);
    }
}
