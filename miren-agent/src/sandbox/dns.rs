//! Internal DNS: the resolver every sandbox's resolv.conf points to (on the bridge address).
//!
//! `<service>.app.miren` answers with the A and AAAA records of the service's ready instances,
//! but only to sandboxes of the same app: any other asker, or a name in `app.miren` that is not
//! a service of the asker's app, gets NXDOMAIN. An answer without records (NODATA, NXDOMAIN)
//! carries the zone's SOA, so resolvers cache it as negative and fall back to the other family. Other names are relayed byte for byte to the host's
//! resolvers (over UDP for UDP clients, over TCP for TCP clients) with the client's query ID
//! restored. Only the header and the first question of a query are read; the wire format is
//! parsed and built here by hand.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// What the resolver needs to know about sandboxes (implemented by the runner).
pub trait DnsDirectory: Send + Sync + std::fmt::Debug {
    /// The app whose sandbox has address `ip`, if any.
    fn app_of(&self, ip: Ipv4Addr) -> Option<String>;
    /// Ready instance addresses of `app`'s `service`; `None` when the app has no such service.
    fn service_addrs(&self, app: &str, service: &str) -> Option<Vec<Ipv4Addr>>;
    /// The IPv6 address of the instance at `addr`, if it has one.
    fn addr6(&self, addr: Ipv4Addr) -> Option<Ipv6Addr>;
}

/// Why the resolver could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A socket could not be bound.
    #[error(
        "cannot listen for internal DNS on {transport} {addr}: {source}; check that no other DNS server (dnsmasq, systemd-resolved) listens on that address and that the agent may bind port 53 (root or CAP_NET_BIND_SERVICE)"
    )]
    Bind {
        /// `UDP` or `TCP`.
        transport: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The zone answered here, as lowercase labels.
const ZONE: [&[u8]; 2] = [b"app", b"miren"];
/// TTL of internal answers, seconds: instances come and go.
const ANSWER_TTL: u32 = 5;
/// How long each upstream may take to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// UDP queries in progress, at the most; beyond, they are dropped (clients retry).
const MAX_UDP_IN_FLIGHT: usize = 1024;
/// Open TCP connections, at the most; beyond, new ones are closed at once.
const MAX_TCP_CONNECTIONS: usize = 128;
/// Internal answers over UDP fit in this many bytes (no EDNS); beyond, they are truncated and
/// flagged TC so that the client asks again over TCP.
const UDP_LIMIT: usize = 512;
/// Largest DNS message (TCP length prefix, UDP payload).
const MAX_MESSAGE: usize = 65535;

const HEADER_LEN: usize = 12;
/// Longest name on the wire (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
/// An A record that points to the question's name: pointer, type, class, TTL, length, address.
const A_RECORD_LEN: usize = 16;
/// The same with an IPv6 address.
const AAAA_RECORD_LEN: usize = 28;
/// Compression pointer to offset 12, where the question's name starts.
const POINTER_TO_QUESTION: [u8; 2] = [0xC0, 0x0C];

const TYPE_A: u16 = 1;
const TYPE_SOA: u16 = 6;
const TYPE_AAAA: u16 = 28;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;

/// Response codes this resolver sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
}

/// The part of a query the resolver reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    id: u16,
    /// Recursion desired, echoed in the response.
    rd: bool,
    /// The name's labels, lowercased.
    labels: Vec<Vec<u8>>,
    qtype: u16,
    qclass: u16,
    /// Offset just past the question, so that it can be echoed as asked.
    end: usize,
}

/// A packet that is not a query the resolver can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejection {
    /// Not worth an answer: shorter than a header, or a response.
    Drop,
    /// Answered with `rcode` and no question.
    Reply { id: u16, rd: bool, rcode: Rcode },
}

/// The big-endian `u16` at `at`, if the packet is long enough.
fn read_u16(packet: &[u8], at: usize) -> Option<u16> {
    packet
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Reads the header and the (single) question of a query.
fn parse_query(packet: &[u8]) -> Result<Question, Rejection> {
    let (Some(id), Some(flags), Some(qdcount)) = (
        read_u16(packet, 0),
        read_u16(packet, 2),
        read_u16(packet, 4),
    ) else {
        return Err(Rejection::Drop);
    };
    if packet.len() < HEADER_LEN || flags & FLAG_QR != 0 {
        return Err(Rejection::Drop);
    }
    let rd = flags & FLAG_RD != 0;
    let reject = |rcode| Rejection::Reply { id, rd, rcode };
    if (flags >> 11) & 0xF != 0 {
        return Err(reject(Rcode::NotImp));
    }
    if qdcount != 1 {
        return Err(reject(Rcode::FormErr));
    }
    let mut at = HEADER_LEN;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*packet.get(at).ok_or(reject(Rcode::FormErr))?);
        // Compression pointers and extended label types have no place in a query's question.
        if len & 0xC0 != 0 {
            return Err(reject(Rcode::FormErr));
        }
        at += 1;
        if len == 0 {
            break;
        }
        let label = packet.get(at..at + len).ok_or(reject(Rcode::FormErr))?;
        labels.push(label.to_ascii_lowercase());
        at += len;
        if at - HEADER_LEN >= MAX_NAME {
            return Err(reject(Rcode::FormErr));
        }
    }
    let (Some(qtype), Some(qclass)) = (read_u16(packet, at), read_u16(packet, at + 2)) else {
        return Err(reject(Rcode::FormErr));
    };
    Ok(Question {
        id,
        rd,
        labels,
        qtype,
        qclass,
        end: at + 4,
    })
}

/// Where a name stands relative to `app.miren`.
#[derive(Debug, PartialEq, Eq)]
enum Zone<'a> {
    /// Outside: forwarded.
    Outside,
    /// `app.miren` itself.
    Apex,
    /// `<service>.app.miren`.
    Service(&'a str),
    /// Any other name inside (deeper, or a label that is not UTF-8).
    Unknown,
}

fn classify(labels: &[Vec<u8>]) -> Zone<'_> {
    let Some(split) = labels.len().checked_sub(ZONE.len()) else {
        return Zone::Outside;
    };
    if !labels[split..]
        .iter()
        .zip(ZONE)
        .all(|(label, zone)| label == zone)
    {
        return Zone::Outside;
    }
    match &labels[..split] {
        [] => Zone::Apex,
        [service] => std::str::from_utf8(service).map_or(Zone::Unknown, Zone::Service),
        _ => Zone::Unknown,
    }
}

/// A header: ID, flags and the question and answer counts (no other records).
fn header(id: u16, flags: u16, qdcount: u16, ancount: u16) -> Vec<u8> {
    header_with_authority(id, flags, qdcount, ancount, 0)
}

/// A header with `nscount` records in the authority section.
fn header_with_authority(id: u16, flags: u16, qdcount: u16, ancount: u16, nscount: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    for field in [id, flags, qdcount, ancount, nscount, 0] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    out
}

fn response_flags(rd: bool, authoritative: bool, rcode: Rcode) -> u16 {
    let mut flags = FLAG_QR | FLAG_RA | rcode as u16;
    if rd {
        flags |= FLAG_RD;
    }
    if authoritative {
        flags |= FLAG_AA;
    }
    flags
}

/// A response without a question, for queries whose question cannot be read.
fn bare_response(id: u16, rd: bool, rcode: Rcode) -> Vec<u8> {
    header(id, response_flags(rd, false, rcode), 0, 0)
}

/// A response to `question` (read from `packet`, echoed as asked) with `addrs` as A and AAAA
/// records, as many as fit in `limit` bytes (TC set when some do not). With `zone` (the offset
/// of the zone's name in the packet) and no records, the zone's SOA goes in the authority
/// section.
fn response(
    packet: &[u8],
    question: &Question,
    rcode: Rcode,
    zone: Option<u16>,
    addrs: &[IpAddr],
    limit: usize,
) -> Vec<u8> {
    let mut room = limit.saturating_sub(question.end);
    let fit = addrs
        .iter()
        .take_while(|addr| {
            let len = if addr.is_ipv4() {
                A_RECORD_LEN
            } else {
                AAAA_RECORD_LEN
            };
            let fits = len <= room;
            room = room.saturating_sub(len);
            fits
        })
        .count();
    let mut flags = response_flags(question.rd, zone.is_some(), rcode);
    if fit < addrs.len() {
        flags |= FLAG_TC;
    }
    let soa = zone.filter(|_| addrs.is_empty());
    // `fit` ≤ limit / 16 ≤ 65535 / 16.
    let ancount = u16::try_from(fit).unwrap_or(u16::MAX);
    let mut out = header_with_authority(question.id, flags, 1, ancount, u16::from(soa.is_some()));
    out.extend_from_slice(&packet[HEADER_LEN..question.end]);
    for addr in &addrs[..fit] {
        out.extend_from_slice(&POINTER_TO_QUESTION);
        let (kind, data) = match addr {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        record_head(&mut out, kind, data.len());
        out.extend_from_slice(&data);
    }
    if let Some(zone) = soa {
        soa_record(&mut out, zone);
    }
    out
}

/// Type, class, TTL and data length of a record whose name was just written.
fn record_head(out: &mut Vec<u8>, kind: u16, data_len: usize) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ANSWER_TTL.to_be_bytes());
    // Record data here is at most 16 bytes (an address) or the SOA's 38.
    out.extend_from_slice(&u16::try_from(data_len).unwrap_or(u16::MAX).to_be_bytes());
}

/// The zone's SOA record (`ns.app.miren. hostmaster.app.miren.`, negative answers cached for
/// [`ANSWER_TTL`]), its names compressed to the zone's name at offset `zone`.
fn soa_record(out: &mut Vec<u8>, zone: u16) {
    let pointer = (0xC000 | zone).to_be_bytes();
    let mut data = Vec::new();
    for label in [&b"ns"[..], b"hostmaster"] {
        data.push(label.len() as u8);
        data.extend_from_slice(label);
        data.extend_from_slice(&pointer);
    }
    // Serial, refresh, retry, expire, minimum (the negative-caching TTL).
    for field in [1, 3600, 600, 86400, ANSWER_TTL] {
        data.extend_from_slice(&u32::to_be_bytes(field));
    }
    out.extend_from_slice(&pointer);
    record_head(out, TYPE_SOA, data.len());
    out.extend_from_slice(&data);
}

/// The offset in the packet of the zone's name (`app.miren`) inside the question's name.
fn zone_offset(question: &Question) -> u16 {
    let inside = question.labels.len().saturating_sub(ZONE.len());
    let skipped: usize = question.labels[..inside].iter().map(|l| l.len() + 1).sum();
    // A name is at most 255 bytes.
    u16::try_from(HEADER_LEN + skipped).unwrap_or(HEADER_LEN as u16)
}

/// The answer to a question about `app.miren` from `asker` (`None`: not an IPv4 client), or
/// `None` when the name is outside the zone. `rotation` picks which address comes first.
fn answer_internal(
    packet: &[u8],
    question: &Question,
    asker: Option<Ipv4Addr>,
    directory: &dyn DnsDirectory,
    rotation: usize,
    limit: usize,
) -> Option<Vec<u8>> {
    let found = match classify(&question.labels) {
        Zone::Outside => return None,
        Zone::Apex => Some(Vec::new()),
        Zone::Service(service) => asker
            .and_then(|ip| directory.app_of(ip))
            .and_then(|app| directory.service_addrs(&app, service)),
        Zone::Unknown => None,
    };
    let zone = Some(zone_offset(question));
    let Some(mut found) = found else {
        return Some(response(
            packet,
            question,
            Rcode::NxDomain,
            zone,
            &[],
            limit,
        ));
    };
    if !found.is_empty() {
        let len = found.len();
        found.rotate_left(rotation % len);
    }
    let class_in = matches!(question.qclass, CLASS_IN | CLASS_ANY);
    let wants = |kind| class_in && (question.qtype == kind || question.qtype == TYPE_ANY);
    let mut addrs: Vec<IpAddr> = Vec::new();
    if wants(TYPE_A) {
        addrs.extend(found.iter().map(|a| IpAddr::V4(*a)));
    }
    if wants(TYPE_AAAA) {
        addrs.extend(
            found
                .iter()
                .filter_map(|a| directory.addr6(*a))
                .map(IpAddr::V6),
        );
    }
    Some(response(
        packet,
        question,
        Rcode::NoError,
        zone,
        &addrs,
        limit,
    ))
}

/// How a query arrived, and so how it is forwarded and how large an internal answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn limit(self) -> usize {
        match self {
            Transport::Udp => UDP_LIMIT,
            Transport::Tcp => MAX_MESSAGE,
        }
    }
}

/// A fresh unpredictable query ID for upstreams (std's per-instance SipHash keys).
fn random_id() -> u16 {
    RandomState::new().hash_one(0u8) as u16
}

/// Whether `reply` answers `sent` (whose question ends at `question_end`): same ID, a response,
/// and the same question (any case) unless the upstream sent none (e.g. FORMERR).
fn is_reply_to(reply: &[u8], sent: &[u8], question_end: usize) -> bool {
    let (Some(flags), Some(qdcount)) = (read_u16(reply, 2), read_u16(reply, 4)) else {
        return false;
    };
    reply[..2] == sent[..2]
        && flags & FLAG_QR != 0
        && (qdcount == 0
            || reply
                .get(HEADER_LEN..question_end)
                .is_some_and(|q| q.eq_ignore_ascii_case(&sent[HEADER_LEN..question_end])))
}

/// Sends `sent` to `upstream` from a fresh UDP port and waits for its reply.
async fn exchange_udp(
    sent: &[u8],
    question_end: usize,
    upstream: SocketAddr,
) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(sent).await?;
    let mut buf = vec![0; MAX_MESSAGE];
    loop {
        let len = socket.recv(&mut buf).await?;
        if is_reply_to(&buf[..len], sent, question_end) {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

/// Sends `sent` to `upstream` over a new TCP connection and reads its reply.
async fn exchange_tcp(
    sent: &[u8],
    question_end: usize,
    upstream: SocketAddr,
) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    stream.write_all(&framed(sent)?).await?;
    let len = stream.read_u16().await?;
    let mut reply = vec![0; usize::from(len)];
    stream.read_exact(&mut reply).await?;
    if is_reply_to(&reply, sent, question_end) {
        Ok(reply)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "reply to another query",
        ))
    }
}

/// `message` with its TCP length prefix.
fn framed(message: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message over 65535 bytes"))?;
    let mut out = Vec::with_capacity(2 + message.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Ok(out)
}

/// The internal DNS resolver, bound and ready to serve.
#[derive(Debug)]
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
    local_addr: SocketAddr,
    upstreams: Vec<SocketAddr>,
    upstream_timeout: Duration,
}

impl DnsServer {
    /// Binds `addr` (UDP and TCP, same port); forwards other names to `upstreams`, in order.
    ///
    /// An upstream equal to the bound address is left out (it would loop).
    pub async fn bind(addr: SocketAddr, mut upstreams: Vec<SocketAddr>) -> Result<Self, DnsError> {
        let bind_error = |transport, addr| {
            move |source| DnsError::Bind {
                transport,
                addr,
                source,
            }
        };
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(bind_error("UDP", addr))?;
        let local_addr = udp.local_addr().map_err(bind_error("UDP", addr))?;
        let tcp = TcpListener::bind(local_addr)
            .await
            .map_err(bind_error("TCP", local_addr))?;
        upstreams.retain(|upstream| *upstream != local_addr);
        if upstreams.is_empty() {
            tracing::warn!(
                %local_addr,
                "internal DNS has no upstream resolver: names outside app.miren get SERVFAIL"
            );
        }
        Ok(Self {
            udp,
            tcp,
            local_addr,
            upstreams,
            upstream_timeout: UPSTREAM_TIMEOUT,
        })
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` turns true (or its sender is dropped); queries in progress are
    /// abandoned then.
    pub async fn serve(
        self,
        directory: Arc<dyn DnsDirectory>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let udp = Arc::new(self.udp);
        let resolver = Arc::new(Resolver {
            directory,
            upstreams: self.upstreams,
            upstream_timeout: self.upstream_timeout,
            rotation: AtomicUsize::new(0),
        });
        let mut queries = JoinSet::new();
        let mut connections = JoinSet::new();
        let mut buf = vec![0; MAX_MESSAGE];
        loop {
            tokio::select! {
                // (The `Ref` that `wait_for` returns is not `Send`: dropped in the block.)
                _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => break,
                Some(_) = queries.join_next(), if !queries.is_empty() => {}
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                received = udp.recv_from(&mut buf) => {
                    let (len, client) = match received {
                        Ok(received) => received,
                        Err(error) => {
                            tracing::debug!(%error, "internal DNS: UDP receive failed");
                            continue;
                        }
                    };
                    if queries.len() >= MAX_UDP_IN_FLIGHT {
                        tracing::debug!(%client, "internal DNS busy: query dropped");
                        continue;
                    }
                    let query = buf[..len].to_vec();
                    let (udp, resolver) = (Arc::clone(&udp), Arc::clone(&resolver));
                    queries.spawn(async move {
                        let reply = resolver.respond(&query, client.ip(), Transport::Udp).await;
                        let Some(reply) = reply else {
                            return;
                        };
                        if let Err(error) = udp.send_to(&reply, client).await {
                            tracing::debug!(%client, %error, "internal DNS: reply not sent");
                        }
                    });
                }
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, client)) if connections.len() < MAX_TCP_CONNECTIONS => {
                        connections.spawn(serve_tcp(stream, client, Arc::clone(&resolver)));
                    }
                    Ok((_, client)) => {
                        tracing::debug!(%client, "internal DNS busy: connection closed");
                    }
                    Err(error) => {
                        let local_addr = self.local_addr;
                        tracing::warn!(%local_addr, %error, "internal DNS: accept failed");
                        // Out of file descriptors: give others time to close theirs.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }
}

/// Answers queries on one TCP connection, in order, until the client closes it or goes idle.
async fn serve_tcp(mut stream: TcpStream, client: SocketAddr, resolver: Arc<Resolver>) {
    loop {
        let Ok(Ok(len)) = timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await else {
            return;
        };
        let mut query = vec![0; usize::from(len)];
        let Ok(Ok(_)) = timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query)).await else {
            return;
        };
        let Some(reply) = resolver.respond(&query, client.ip(), Transport::Tcp).await else {
            return;
        };
        let Ok(reply) = framed(&reply) else {
            return;
        };
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// What serving a query needs.
#[derive(Debug)]
struct Resolver {
    directory: Arc<dyn DnsDirectory>,
    upstreams: Vec<SocketAddr>,
    upstream_timeout: Duration,
    /// Turns the order of internal answers, query after query.
    rotation: AtomicUsize,
}

impl Resolver {
    /// The response to `packet` from `client`, or `None` when it deserves none.
    async fn respond(
        &self,
        packet: &[u8],
        client: IpAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let question = match parse_query(packet) {
            Ok(question) => question,
            Err(Rejection::Drop) => return None,
            Err(Rejection::Reply { id, rd, rcode }) => return Some(bare_response(id, rd, rcode)),
        };
        let asker = match client {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(ip) => ip.to_ipv4_mapped(),
        };
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        let limit = transport.limit();
        if let Some(reply) =
            answer_internal(packet, &question, asker, &*self.directory, rotation, limit)
        {
            return Some(reply);
        }
        let reply = self.forward(packet, question.end, transport).await;
        Some(
            reply.unwrap_or_else(|| response(packet, &question, Rcode::ServFail, None, &[], limit)),
        )
    }

    /// Asks the upstreams in order; the first reply, with `query`'s ID restored.
    async fn forward(
        &self,
        query: &[u8],
        question_end: usize,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let mut sent = query.to_vec();
        for &upstream in &self.upstreams {
            sent[..2].copy_from_slice(&random_id().to_be_bytes());
            let exchange = async {
                match transport {
                    Transport::Udp => exchange_udp(&sent, question_end, upstream).await,
                    Transport::Tcp => exchange_tcp(&sent, question_end, upstream).await,
                }
            };
            match timeout(self.upstream_timeout, exchange).await {
                Ok(Ok(mut reply)) => {
                    reply[..2].copy_from_slice(&query[..2]);
                    return Some(reply);
                }
                Ok(Err(error)) => tracing::debug!(%upstream, %error, "upstream DNS failed"),
                Err(_) => tracing::debug!(%upstream, "upstream DNS timed out"),
            }
        }
        None
    }
}

/// The `nameserver` entries of a resolv.conf (port 53), for the upstreams.
///
/// Entries that are not plain IP addresses (such as IPv6 with a `%zone`) are skipped.
pub fn resolvers_from(resolv_conf_text: &str) -> Vec<SocketAddr> {
    resolv_conf_text
        .lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests;
