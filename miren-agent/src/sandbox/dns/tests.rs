use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

use super::*;

const TYPE_MX: u16 = 15;
const SHOP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const BLOG: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const WEB_1: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 5);
const WEB_2: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 6);
/// What the fake upstream answers with.
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const WAIT: Duration = Duration::from_secs(5);

/// Apps `shop` (sandbox 127.0.0.1; `web` with two instances, `worker` with none) and `blog`
/// (sandbox 127.0.0.2; `web` with one instance).
#[derive(Debug)]
struct Directory {
    apps: HashMap<Ipv4Addr, &'static str>,
    services: HashMap<(&'static str, &'static str), Vec<Ipv4Addr>>,
}

fn directory() -> Directory {
    Directory {
        apps: HashMap::from([(SHOP, "shop"), (BLOG, "blog")]),
        services: HashMap::from([
            (("shop", "web"), vec![WEB_1, WEB_2]),
            (("shop", "worker"), vec![]),
            (("blog", "web"), vec![Ipv4Addr::new(10, 88, 0, 9)]),
        ]),
    }
}

impl DnsDirectory for Directory {
    fn app_of(&self, ip: Ipv4Addr) -> Option<String> {
        self.apps.get(&ip).map(|app| app.to_string())
    }

    fn service_addrs(&self, app: &str, service: &str) -> Option<Vec<Ipv4Addr>> {
        self.services
            .iter()
            .find(|((a, s), _)| *a == app && *s == service)
            .map(|(_, v)| v.clone())
    }

    fn addr6(&self, addr: Ipv4Addr) -> Option<Ipv6Addr> {
        (addr != WEB_2).then(|| addr.to_ipv6_mapped())
    }
}

/// A query for `name` (text, trailing dot optional) with RD set.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = header(id, FLAG_RD, 1, 0);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

fn id_of(reply: &[u8]) -> u16 {
    read_u16(reply, 0).unwrap()
}

fn flags_of(reply: &[u8]) -> u16 {
    read_u16(reply, 2).unwrap()
}

fn rcode_of(reply: &[u8]) -> u16 {
    flags_of(reply) & 0xF
}

/// The A and AAAA records of a response whose answers point to its question (this resolver's
/// and the fake upstream's), checking each record's fixed fields, and whether the authority
/// section holds the zone's SOA (checked whole).
fn records_of(reply: &[u8], question_end: usize) -> (Vec<IpAddr>, bool) {
    let count = usize::from(read_u16(reply, 6).unwrap());
    let mut at = question_end;
    let mut addrs = Vec::new();
    for _ in 0..count {
        let record = &reply[at..];
        assert_eq!(record[..2], POINTER_TO_QUESTION);
        assert_eq!(read_u16(record, 4), Some(CLASS_IN));
        let addr = match (read_u16(record, 2), read_u16(record, 10)) {
            (Some(TYPE_A), Some(4)) => IpAddr::from(<[u8; 4]>::try_from(&record[12..16]).unwrap()),
            (Some(TYPE_AAAA), Some(16)) => {
                IpAddr::from(<[u8; 16]>::try_from(&record[12..28]).unwrap())
            }
            other => panic!("not an address record: {other:?} in {reply:?}"),
        };
        at += if addr.is_ipv4() {
            A_RECORD_LEN
        } else {
            AAAA_RECORD_LEN
        };
        addrs.push(addr);
    }
    let soa = read_u16(reply, 8) == Some(1);
    if soa {
        let record = &reply[at..];
        // Owner and the two names point to the zone's name: `app.miren`.
        let zone = usize::from(read_u16(record, 0).unwrap() & 0x3FFF);
        assert_eq!(&reply[zone..zone + 11], b"\x03app\x05miren\x00");
        assert_eq!(read_u16(record, 2), Some(TYPE_SOA));
        assert_eq!(read_u16(record, 10), Some(38));
        assert_eq!(&record[12..15], b"\x02ns");
        // Negative answers are cached as briefly as positive ones.
        assert_eq!(record[46..50], ANSWER_TTL.to_be_bytes());
        at += 50;
    }
    assert_eq!(reply.len(), at, "{reply:?}");
    (addrs, soa)
}

/// The A records of a response (see [`records_of`]).
fn addrs_of(reply: &[u8], question_end: usize) -> Vec<Ipv4Addr> {
    records_of(reply, question_end)
        .0
        .into_iter()
        .filter_map(|addr| match addr {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect()
}

fn internal(packet: &[u8], asker: Ipv4Addr, rotation: usize) -> Option<Vec<u8>> {
    let question = parse_query(packet).unwrap();
    answer_internal(
        packet,
        &question,
        Some(asker),
        &directory(),
        rotation,
        UDP_LIMIT,
    )
}

#[test]
fn parse_query_reads_the_question_lowercased() {
    let packet = query(0xBEEF, "WeB.App.MIREN.", TYPE_A);
    let question = parse_query(&packet).unwrap();
    assert_eq!(
        question,
        Question {
            id: 0xBEEF,
            rd: true,
            labels: vec![b"web".to_vec(), b"app".to_vec(), b"miren".to_vec()],
            qtype: TYPE_A,
            qclass: CLASS_IN,
            end: packet.len(),
        }
    );
    // The same name without the trailing dot is the same question.
    assert_eq!(
        parse_query(&query(0xBEEF, "web.app.miren", TYPE_A)),
        Ok(question)
    );
}

#[test]
fn parse_query_reads_the_root_and_ignores_additional_records() {
    let mut packet = query(7, ".", TYPE_A);
    packet[11] = 1; // ARCOUNT, e.g. an EDNS OPT record
    packet.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
    let question = parse_query(&packet).unwrap();
    assert!(question.labels.is_empty());
    assert_eq!(question.end, HEADER_LEN + 5);
}

#[test]
fn parse_query_drops_short_packets_and_responses() {
    assert_eq!(parse_query(&[]), Err(Rejection::Drop));
    assert_eq!(
        parse_query(&[1, 2, 3, 4, 0, 1, 0, 0, 0, 0, 0]),
        Err(Rejection::Drop)
    );
    let mut response = query(1, "example.com", TYPE_A);
    response[2] |= 0x80;
    assert_eq!(parse_query(&response), Err(Rejection::Drop));
}

#[test]
fn parse_query_rejects_what_it_cannot_read() {
    let formerr = |id| {
        Err(Rejection::Reply {
            id,
            rd: true,
            rcode: Rcode::FormErr,
        })
    };
    let good = query(9, "example.com", TYPE_A);
    // Cut in the name, in the type, and no question at all.
    assert_eq!(parse_query(&good[..16]), formerr(9));
    assert_eq!(parse_query(&good[..good.len() - 1]), formerr(9));
    let mut none = good.clone();
    none[5] = 0;
    assert_eq!(parse_query(&none), formerr(9));
    let mut two = good.clone();
    two[5] = 2;
    assert_eq!(parse_query(&two), formerr(9));
    // A compression pointer in the question.
    let mut pointer = header(9, FLAG_RD, 1, 0);
    pointer.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
    assert_eq!(parse_query(&pointer), formerr(9));
    // A name over 255 bytes: four 63-byte labels make 257 with the root.
    let long = vec!["a".repeat(63); 4].join(".");
    assert_eq!(parse_query(&query(9, &long, TYPE_A)), formerr(9));
    let longest = [&vec!["a".repeat(63); 3][..], &["a".repeat(61)]]
        .concat()
        .join(".");
    assert!(parse_query(&query(9, &longest, TYPE_A)).is_ok());
    // Another opcode (here NOTIFY).
    let mut notify = good;
    notify[2] |= 4 << 3;
    assert_eq!(
        parse_query(&notify),
        Err(Rejection::Reply {
            id: 9,
            rd: true,
            rcode: Rcode::NotImp
        })
    );
}

#[test]
fn bare_response_is_a_header_with_the_code() {
    assert_eq!(
        bare_response(0x1234, true, Rcode::FormErr),
        [0x12, 0x34, 0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        flags_of(&bare_response(1, false, Rcode::NotImp)),
        FLAG_QR | FLAG_RA | 4
    );
}

#[test]
fn classify_places_names_against_the_zone() {
    let labels = |name: &str| parse_query(&query(1, name, TYPE_A)).unwrap().labels;
    assert_eq!(classify(&labels("example.com")), Zone::Outside);
    assert_eq!(classify(&labels("miren")), Zone::Outside);
    assert_eq!(classify(&labels("app.miren.example")), Zone::Outside);
    assert_eq!(classify(&labels("xapp.miren")), Zone::Outside);
    assert_eq!(classify(&labels("APP.Miren.")), Zone::Apex);
    assert_eq!(classify(&labels("Web.app.miren")), Zone::Service("web"));
    assert_eq!(classify(&labels("a.web.app.miren")), Zone::Unknown);
    // A label holding a dot is not `web.app`.
    let mut dotted = header(1, 0, 1, 0);
    dotted.extend_from_slice(b"\x07web.app\x05miren\x00\x00\x01\x00\x01");
    assert_eq!(
        classify(&parse_query(&dotted).unwrap().labels),
        Zone::Outside
    );
    let mut binary = header(1, 0, 1, 0);
    binary.extend_from_slice(b"\x01\xff\x03app\x05miren\x00\x00\x01\x00\x01");
    assert_eq!(
        classify(&parse_query(&binary).unwrap().labels),
        Zone::Unknown
    );
}

#[test]
fn service_answers_its_apps_ready_instances() {
    let packet = query(0x4242, "WEB.app.miren.", TYPE_A);
    let reply = internal(&packet, SHOP, 0).unwrap();
    assert_eq!(id_of(&reply), 0x4242);
    assert_eq!(flags_of(&reply), FLAG_QR | FLAG_AA | FLAG_RD | FLAG_RA);
    assert_eq!(read_u16(&reply, 4), Some(1));
    // The question is echoed as asked.
    assert_eq!(reply[HEADER_LEN..packet.len()], packet[HEADER_LEN..]);
    assert_eq!(addrs_of(&reply, packet.len()), [WEB_1, WEB_2]);
    assert_eq!(
        reply[packet.len() + 6..packet.len() + 10],
        5u32.to_be_bytes()
    );
    // The next asker gets the other order.
    assert_eq!(
        addrs_of(&internal(&packet, SHOP, 1).unwrap(), packet.len()),
        [WEB_2, WEB_1]
    );
}

#[test]
fn aaaa_answers_the_instances_ipv6_addresses_and_other_types_get_no_data_with_the_soa() {
    let aaaa = query(3, "web.app.miren", TYPE_AAAA);
    let (addrs, soa) = records_of(&internal(&aaaa, SHOP, 0).unwrap(), aaaa.len());
    assert_eq!(addrs, [IpAddr::V6(WEB_1.to_ipv6_mapped())]);
    assert!(!soa);
    // A service without instances (so without IPv6 ones), and a type nothing answers: NODATA
    // with the zone's SOA, so resolvers cache it and use the other family.
    for (name, qtype) in [("worker.app.miren", TYPE_AAAA), ("web.app.miren", TYPE_MX)] {
        let packet = query(3, name, qtype);
        let reply = internal(&packet, SHOP, 0).unwrap();
        assert_eq!(rcode_of(&reply), Rcode::NoError as u16);
        assert_eq!(flags_of(&reply) & FLAG_AA, FLAG_AA);
        assert_eq!(
            records_of(&reply, packet.len()),
            (Vec::new(), true),
            "{name}"
        );
    }
    // NXDOMAIN carries it too; at the apex the SOA points to the question's name itself.
    let unknown = query(3, "nope.app.miren", TYPE_A);
    let reply = internal(&unknown, SHOP, 0).unwrap();
    assert_eq!(rcode_of(&reply), Rcode::NxDomain as u16);
    assert_eq!(records_of(&reply, unknown.len()), (Vec::new(), true));
    let apex = query(3, "app.miren", TYPE_A);
    assert_eq!(
        records_of(&internal(&apex, SHOP, 0).unwrap(), apex.len()),
        (Vec::new(), true)
    );
    let any = query(3, "web.app.miren", TYPE_ANY);
    let (addrs, _) = records_of(&internal(&any, SHOP, 0).unwrap(), any.len());
    assert_eq!(addrs.len(), 3, "{addrs:?}");
}

#[test]
fn service_without_ready_instances_gets_no_data() {
    let packet = query(3, "worker.app.miren", TYPE_A);
    let reply = internal(&packet, SHOP, 0).unwrap();
    assert_eq!(rcode_of(&reply), Rcode::NoError as u16);
    assert!(addrs_of(&reply, packet.len()).is_empty());
}

#[test]
fn names_outside_the_askers_app_do_not_exist() {
    let cases = [
        ("worker.app.miren", BLOG),  // another app's service
        ("web.app.miren", STRANGER), // not a sandbox
        ("db.app.miren", SHOP),      // no such service
        ("a.web.app.miren", SHOP),   // deeper than a service
    ];
    for (name, asker) in cases {
        let packet = query(5, name, TYPE_A);
        let reply = internal(&packet, asker, 0).unwrap();
        assert_eq!(
            flags_of(&reply),
            FLAG_QR | FLAG_AA | FLAG_RD | FLAG_RA | 3,
            "{name}"
        );
        assert!(addrs_of(&reply, packet.len()).is_empty(), "{name}");
    }
    // An IPv6 client is no sandbox.
    let packet = query(5, "web.app.miren", TYPE_A);
    let question = parse_query(&packet).unwrap();
    let from_v6 = answer_internal(&packet, &question, None, &directory(), 0, UDP_LIMIT);
    assert_eq!(rcode_of(&from_v6.unwrap()), 3);
    // Each app sees its own `web`.
    let packet = query(5, "web.app.miren", TYPE_A);
    let blog = internal(&packet, BLOG, 0).unwrap();
    assert_eq!(addrs_of(&blog, packet.len()), [Ipv4Addr::new(10, 88, 0, 9)]);
}

#[test]
fn zone_apex_exists_and_other_names_are_not_internal() {
    let apex = query(6, "app.miren", TYPE_A);
    assert_eq!(rcode_of(&internal(&apex, STRANGER, 0).unwrap()), 0);
    assert_eq!(internal(&query(6, "example.com", TYPE_A), SHOP, 0), None);
}

#[test]
fn answers_over_the_udp_limit_are_truncated() {
    let many: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(10, 88, 1, i)).collect();
    let records: Vec<IpAddr> = many.iter().map(|a| IpAddr::V4(*a)).collect();
    let packet = query(8, "web.app.miren", TYPE_A);
    let question = parse_query(&packet).unwrap();
    let zone = Some(zone_offset(&question));
    let udp = response(
        &packet,
        &question,
        Rcode::NoError,
        zone,
        &records,
        UDP_LIMIT,
    );
    assert!(udp.len() <= UDP_LIMIT);
    assert_eq!(flags_of(&udp) & FLAG_TC, FLAG_TC);
    assert_eq!(
        addrs_of(&udp, packet.len()),
        many[..(UDP_LIMIT - packet.len()) / 16]
    );
    let tcp = response(
        &packet,
        &question,
        Rcode::NoError,
        zone,
        &records,
        MAX_MESSAGE,
    );
    assert_eq!(flags_of(&tcp) & FLAG_TC, 0);
    assert_eq!(addrs_of(&tcp, packet.len()), many);
}

#[test]
fn is_reply_to_matches_id_and_question() {
    let sent = query(0x0102, "example.com", TYPE_A);
    let end = sent.len();
    let mut reply = sent.clone();
    reply[2] |= 0x80;
    assert!(is_reply_to(&reply, &sent, end));
    reply[HEADER_LEN + 1] = b'E'; // 0x20 case randomisation is the same question
    assert!(is_reply_to(&reply, &sent, end));
    reply[HEADER_LEN + 1] = b'x';
    assert!(!is_reply_to(&reply, &sent, end));
    let no_question = bare_response(0x0102, true, Rcode::FormErr);
    assert!(is_reply_to(&no_question, &sent, end));
    assert!(!is_reply_to(
        &bare_response(0x0103, true, Rcode::FormErr),
        &sent,
        end
    ));
    assert!(!is_reply_to(&sent, &sent, end), "a query is no reply");
    assert!(!is_reply_to(&reply[..3], &sent, end));
}

#[test]
fn resolvers_from_reads_nameservers() {
    let text = [
        "# generated",
        "search example.com",
        "nameserver 127.0.0.53",
        " nameserver\t10.0.0.2 # lan",
        ";nameserver 10.0.0.9",
        "nameserver ::1",
        "nameserver fe80::1%eth0",
        "nameserver bogus",
        "nameserver",
        "options edns0",
    ]
    .join("\n");
    assert_eq!(
        resolvers_from(&text),
        ["127.0.0.53:53", "10.0.0.2:53", "[::1]:53"].map(|a| a.parse::<SocketAddr>().unwrap())
    );
    assert_eq!(resolvers_from(""), []);
}

// Real sockets on loopback.

/// A resolver on 127.0.0.1 forwarding to `upstreams` after `upstream_timeout`, with the
/// `directory()` apps.
struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(upstreams: Vec<SocketAddr>, upstream_timeout: Duration) -> Running {
    let mut server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), upstreams)
        .await
        .unwrap();
    server.upstream_timeout = upstream_timeout;
    let addr = server.local_addr();
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(server.serve(Arc::new(directory()), shutdown));
    Running { addr, stop, task }
}

/// Sends `packet` over UDP from `from` and returns the reply.
async fn ask_udp(server: SocketAddr, from: Ipv4Addr, packet: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind((from, 0)).await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buf = vec![0; MAX_MESSAGE];
    let (len, replier) = timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(replier, server);
    buf.truncate(len);
    buf
}

/// Sends `packets` over one TCP connection and returns the replies.
async fn ask_tcp(server: SocketAddr, packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let mut replies = Vec::new();
    for packet in packets {
        stream.write_all(&framed(packet).unwrap()).await.unwrap();
        let len = timeout(WAIT, stream.read_u16()).await.unwrap().unwrap();
        let mut reply = vec![0; usize::from(len)];
        stream.read_exact(&mut reply).await.unwrap();
        replies.push(reply);
    }
    replies
}

/// A fake upstream on 127.0.0.1 (UDP and TCP, same port) that answers every query with
/// `UPSTREAM_ANSWER` after `delay`, counting the queries and keeping the last ID it saw.
#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    queries: Arc<AtomicU32>,
    last_id: Arc<AtomicU32>,
}

impl Upstream {
    async fn start(delay: Duration) -> Upstream {
        let udp = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let upstream = Upstream {
            addr,
            queries: Arc::new(AtomicU32::new(0)),
            last_id: Arc::new(AtomicU32::new(0)),
        };
        let this = upstream.clone();
        tokio::spawn(async move {
            let mut buf = vec![0; MAX_MESSAGE];
            loop {
                let (len, client) = udp.recv_from(&mut buf).await.unwrap();
                let reply = this.answer(&buf[..len]);
                let udp = Arc::clone(&udp);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    udp.send_to(&reply, client).await.unwrap();
                });
            }
        });
        let this = upstream.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                let len = stream.read_u16().await.unwrap();
                let mut query = vec![0; usize::from(len)];
                stream.read_exact(&mut query).await.unwrap();
                let reply = this.answer(&query);
                stream.write_all(&framed(&reply).unwrap()).await.unwrap();
            }
        });
        upstream
    }

    fn answer(&self, query: &[u8]) -> Vec<u8> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        self.last_id
            .store(u32::from(id_of(query)), Ordering::SeqCst);
        let question = parse_query(query).unwrap();
        response(
            query,
            &question,
            Rcode::NoError,
            None,
            &[IpAddr::V4(UPSTREAM_ANSWER)],
            MAX_MESSAGE,
        )
    }
}

/// An address where nothing listens (ICMP port unreachable, connection refused).
async fn dead_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn udp_answers_services_only_within_the_app() {
    let running = start(vec![], UPSTREAM_TIMEOUT).await;
    let packet = query(0x1111, "Web.App.Miren.", TYPE_A);
    let reply = ask_udp(running.addr, SHOP, &packet).await;
    assert_eq!(id_of(&reply), 0x1111);
    assert_eq!(rcode_of(&reply), 0);
    let mut addrs = addrs_of(&reply, packet.len());
    addrs.sort();
    assert_eq!(addrs, [WEB_1, WEB_2]);

    let blog = ask_udp(running.addr, BLOG, &query(2, "worker.app.miren", TYPE_A)).await;
    assert_eq!(flags_of(&blog) & (FLAG_AA | 0xF), FLAG_AA | 3);
    let stranger = ask_udp(running.addr, STRANGER, &query(3, "web.app.miren", TYPE_A)).await;
    assert_eq!(flags_of(&stranger) & (FLAG_AA | 0xF), FLAG_AA | 3);
    let aaaa = ask_udp(running.addr, SHOP, &query(4, "web.app.miren", TYPE_AAAA)).await;
    assert_eq!((rcode_of(&aaaa), read_u16(&aaaa, 6)), (0, Some(1)));
}

#[tokio::test]
async fn udp_forwards_other_names_with_the_clients_id() {
    let upstream = Upstream::start(Duration::ZERO).await;
    let running = start(vec![upstream.addr], UPSTREAM_TIMEOUT).await;
    let packet = query(0xABCD, "example.com", TYPE_A);
    let reply = ask_udp(running.addr, SHOP, &packet).await;
    assert_eq!(id_of(&reply), 0xABCD);
    assert_eq!(flags_of(&reply) & FLAG_AA, 0);
    assert_eq!(reply[HEADER_LEN..packet.len()], packet[HEADER_LEN..]);
    assert_eq!(addrs_of(&reply, packet.len()), [UPSTREAM_ANSWER]);
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 1);
    // The upstream saw a fresh ID (it matches the client's with odds 1 in 65536, so look at
    // several queries).
    let mut fresh = u32::from(upstream.last_id.load(Ordering::SeqCst) != 0xABCD);
    for _ in 0..3 {
        ask_udp(running.addr, SHOP, &packet).await;
        fresh += u32::from(upstream.last_id.load(Ordering::SeqCst) != 0xABCD);
    }
    assert!(fresh >= 3);
}

#[tokio::test]
async fn names_in_the_zone_are_never_forwarded() {
    let upstream = Upstream::start(Duration::ZERO).await;
    let running = start(vec![upstream.addr], UPSTREAM_TIMEOUT).await;
    for name in [
        "nope.app.miren",
        "web.app.miren",
        "x.y.app.miren",
        "app.miren",
    ] {
        ask_udp(running.addr, STRANGER, &query(1, name, TYPE_A)).await;
    }
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn dead_upstreams_give_servfail_and_the_next_one_answers() {
    let dead = dead_addr().await;
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();

    let all_dead = start(vec![dead, silent_addr], Duration::from_millis(300)).await;
    let packet = query(0x5151, "example.com", TYPE_A);
    let started = Instant::now();
    let reply = ask_udp(all_dead.addr, SHOP, &packet).await;
    assert_eq!(id_of(&reply), 0x5151);
    assert_eq!(flags_of(&reply), FLAG_QR | FLAG_RD | FLAG_RA | 2);
    assert_eq!(
        reply,
        [&reply[..HEADER_LEN], &packet[HEADER_LEN..]].concat()
    );
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

    let upstream = Upstream::start(Duration::ZERO).await;
    let fallback = start(
        vec![dead, silent_addr, upstream.addr],
        Duration::from_millis(300),
    )
    .await;
    let reply = ask_udp(fallback.addr, SHOP, &packet).await;
    assert_eq!(addrs_of(&reply, packet.len()), [UPSTREAM_ANSWER]);

    let none = start(vec![], UPSTREAM_TIMEOUT).await;
    assert_eq!(rcode_of(&ask_udp(none.addr, SHOP, &packet).await), 2);
}

#[tokio::test]
async fn many_clients_are_served_at_once() {
    // One after the other, the 50 queries would take 50 s.
    let upstream = Upstream::start(Duration::from_secs(1)).await;
    let running = start(vec![upstream.addr], UPSTREAM_TIMEOUT).await;
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for id in 0..50u16 {
        let server = running.addr;
        clients.spawn(async move {
            let packet = query(id, &format!("host{id}.example.com"), TYPE_A);
            let reply = ask_udp(server, SHOP, &packet).await;
            assert_eq!(id_of(&reply), id);
            assert_eq!(addrs_of(&reply, packet.len()), [UPSTREAM_ANSWER]);
        });
    }
    // An internal answer does not wait for the slow upstream either.
    let internal = ask_udp(running.addr, SHOP, &query(99, "web.app.miren", TYPE_A)).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert_eq!(read_u16(&internal, 6), Some(2));
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 50);
}

#[tokio::test]
async fn malformed_packets_are_refused_and_serving_goes_on() {
    let running = start(vec![], UPSTREAM_TIMEOUT).await;
    let socket = UdpSocket::bind((SHOP, 0)).await.unwrap();
    // Too short for a header, and a response: no reply.
    socket.send_to(&[1, 2, 3], running.addr).await.unwrap();
    let mut response = query(1, "web.app.miren", TYPE_A);
    response[2] |= 0x80;
    socket.send_to(&response, running.addr).await.unwrap();
    // A cut question: FORMERR with the ID.
    let cut = query(0x7777, "web.app.miren", TYPE_A);
    socket.send_to(&cut[..15], running.addr).await.unwrap();
    let mut buf = vec![0; MAX_MESSAGE];
    let (len, _) = timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf[..len], bare_response(0x7777, true, Rcode::FormErr));
    // Then a good query is answered.
    socket
        .send_to(&query(0x8888, "web.app.miren", TYPE_A), running.addr)
        .await
        .unwrap();
    let (len, _) = timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((id_of(&buf[..len]), read_u16(&buf, 6)), (0x8888, Some(2)));
}

#[tokio::test]
async fn tcp_answers_and_forwards_on_one_connection() {
    let upstream = Upstream::start(Duration::ZERO).await;
    let running = start(vec![upstream.addr], UPSTREAM_TIMEOUT).await;
    let internal = query(0x0101, "web.app.miren", TYPE_A);
    let external = query(0x0202, "example.com", TYPE_A);
    let replies = ask_tcp(running.addr, &[internal.clone(), external.clone()]).await;
    assert_eq!(id_of(&replies[0]), 0x0101);
    assert_eq!(addrs_of(&replies[0], internal.len()).len(), 2);
    assert_eq!(id_of(&replies[1]), 0x0202);
    assert_eq!(addrs_of(&replies[1], external.len()), [UPSTREAM_ANSWER]);
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bind_reports_a_taken_address() {
    let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let error = DnsServer::bind(addr, vec![]).await.unwrap_err();
    let DnsError::Bind {
        transport,
        addr: reported,
        ..
    } = &error;
    assert_eq!((*transport, *reported), ("UDP", addr));
    assert!(error.to_string().contains("no other DNS server"), "{error}");
}

#[tokio::test]
async fn bind_leaves_itself_out_of_the_upstreams() {
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let other: SocketAddr = "127.0.0.53:53".parse().unwrap();
    let server = DnsServer::bind(addr, vec![addr, other]).await.unwrap();
    assert_eq!(server.local_addr(), addr);
    assert_eq!(server.upstreams, [other]);
}

#[tokio::test]
async fn serve_stops_on_shutdown() {
    let running = start(vec![], UPSTREAM_TIMEOUT).await;
    ask_udp(running.addr, SHOP, &query(1, "web.app.miren", TYPE_A)).await;
    running.stop.send_replace(true);
    timeout(WAIT, running.task).await.unwrap().unwrap();
}
