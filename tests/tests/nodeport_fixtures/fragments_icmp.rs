//! Fragments and ICMP errors, both families: a fragmented datagram's fragments all follow its
//! first fragment (to the instance, and back from the node port), later fragments whose first
//! was not seen go to the kernel untouched, ICMP errors about node-port replies reach the
//! instance owning the flow and an instance's errors about a client's packet leave from the
//! node port. Every expected frame is rebuilt from scratch (`fragments` of a
//! `rewrite_expected` datagram, `icmp_error` quoting a `rewrite_expected` packet), so every
//! checksum in it is independent of the code under test.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use miren_tests::packet::{
    Endpoint6, Frame6Builder, IPV6_LEN, fragments, fragments6, icmp_error, icmp6_error, ip_packet,
    rewrite_expected6, verify_icmp6_checksum,
};

use super::*;

/// IP payload bytes per fragment (a 1500-byte MTU's, less the IPv4 header).
const CHUNK: usize = 1480;
/// A router on the client's path.
const ROUTER: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 9],
    ip: Ipv4Addr::new(198, 51, 100, 1),
    port: 0,
};
/// Destination unreachable, fragmentation needed (ICMPv4 type 3, code 4).
const FRAG_NEEDED: (u8, u8) = (3, 4);
/// Destination unreachable, port unreachable.
const PORT_UNREACHABLE: (u8, u8) = (3, 3);
/// The next-hop MTU of the "fragmentation needed" errors (1280).
const MTU_1280: [u8; 4] = [0, 0, 0x05, 0x00];

/// A 4,000-byte UDP datagram of the client's flow `from` (IP id `id`).
fn big_datagram(from: u16, id: u16) -> Vec<u8> {
    udp(from, PORT).id(id).payload(&payload(4000)).build()
}

/// The node-port data plane with every fragment of `datagram` run through `run`: the
/// frames that came out.
fn run_all(
    datagram: &[Vec<u8>],
    run: impl Fn(&[u8]) -> (u32, Vec<u8>),
    verdict: u32,
) -> Vec<Vec<u8>> {
    datagram
        .iter()
        .map(|frame| {
            let (got, out) = run(frame);
            assert_eq!(got, verdict);
            verify_checksums(&out).unwrap();
            out
        })
        .collect()
}

#[test]
fn fragments_of_a_datagram_follow_its_first_fragment_to_the_flows_instance() {
    let mut dp = load(&[(UDP_PORT, &backends(1..4))]);
    at(&mut dp, Duration::from_secs(100));
    let mut placed = BTreeMap::new();
    let mut later_fragments = 0;
    let mut sent = Vec::new();
    for (i, from) in (42_000..42_012).enumerate() {
        // Two fragmented datagrams and one whole one per flow: all reach one instance.
        for id in [2 * i as u16, 2 * i as u16 + 1] {
            let whole = big_datagram(from, id);
            let frags = fragments(&whole, CHUNK);
            assert_eq!(frags.len(), 3);
            let out = run_all(&frags, |f| run_xdp(&dp, f), XDP_PASS);
            let to = destination(&out[0]);
            let expected = fragments(&rewrite_expected(&whole, Some(addr_port(to)), None), CHUNK);
            assert_eq!(out, expected, "flow {from}, datagram {id}");
            assert_eq!(*placed.entry(from).or_insert(to), to, "flow {from} sticks");
            later_fragments += frags.len() - 1;
            sent.extend(frags);
        }
        assert_eq!(forward(&dp, &datagram(from)), placed[&from]);
        sent.push(datagram(from));
    }
    assert!(tally(&placed).len() >= 2, "flows spread: {placed:?}");

    // A later fragment whose first fragment never came, and one that comes too late: to the
    // kernel untouched.
    let orphan = fragments(&big_datagram(42_000, 900), CHUNK)[1].clone();
    let whole = big_datagram(42_000, 901);
    let frags = fragments(&whole, CHUNK);
    run_xdp(&dp, &frags[0]);
    at(&mut dp, Duration::from_secs(106));
    let late = frags[1].clone();
    run_table(
        &[
            Row::untouched("orphan later fragment", orphan, XDP_PASS),
            Row::untouched("later fragment after the timeout", late, XDP_PASS),
        ],
        |frame| run_xdp(&dp, frame),
    );
    sent.push(frags[0].clone());

    let c = counters(&dp);
    assert_eq!(c.global.fragments_forwarded, later_fragments as u64);
    assert_eq!(c.global.fragments_unmatched, 2);
    let port = c.ports[&UDP_PORT];
    assert_eq!(
        (port.rx_packets, port.rx_bytes),
        (sent.len() as u64, ip_bytes(&sent))
    );
}

#[test]
fn fragmented_replies_leave_from_the_node_port() {
    let to = backend(2);
    let dp = load(&[(UDP_PORT, &[to])]);
    forward(&dp, &datagram(40_001));
    let whole = FrameBuilder::udp(sandbox(to), client(40_001))
        .id(77)
        .payload(&payload(4000))
        .build();
    let frags = fragments(&whole, CHUNK);
    let out = run_all(&frags, |f| run_tc(&dp, f), TC_ACT_OK);
    assert_eq!(
        out,
        fragments(&rewrite_expected(&whole, None, Some((NODE, PORT))), CHUNK)
    );
    // A later fragment of another reply whose first fragment was not seen: untouched.
    let orphan = fragments(
        &FrameBuilder::udp(sandbox(to), client(40_001))
            .id(78)
            .payload(&payload(4000))
            .build(),
        CHUNK,
    )[2]
    .clone();
    run_table(
        &[Row::untouched("orphan reply fragment", orphan, TC_ACT_OK)],
        |frame| run_tc(&dp, frame),
    );
    let c = counters(&dp);
    assert_eq!(
        (c.global.fragments_forwarded, c.global.fragments_unmatched),
        (2, 1)
    );
    let port = c.ports[&UDP_PORT];
    assert_eq!((port.tx_packets, port.tx_bytes), (3, ip_bytes(&frags)));
}

/// The node as the destination of an ICMP error, or as the source of one it sends.
fn node_host() -> Endpoint {
    node(0)
}

#[test]
fn icmp_errors_about_replies_are_translated_to_the_flows_instance() {
    let to = backend(3);
    let dp = load(&[(UDP_PORT, &[to]), (TCP_PORT, &[to])]);
    forward(&dp, &datagram(40_001));
    forward(&dp, &syn(40_002));
    // The replies as they left the node (from the node port), and as the instance sent them.
    let replies = [
        FrameBuilder::udp(node(PORT), client(40_001))
            .payload(&payload(1400))
            .build(),
        FrameBuilder::tcp(node(PORT), client(40_002), TCP_ACK, 5000, 1001)
            .payload(&payload(1400))
            .build(),
    ];
    let mut rows = Vec::new();
    for reply in &replies {
        let sent = rewrite_expected(reply, None, Some(addr_port(to)));
        let proto = parse(reply).unwrap().ipv4.protocol;
        // As much as routers quote: the RFC 792 minimum (IP header + 8 bytes; no TCP
        // checksum), and more (Linux quotes up to 576 bytes in all).
        for quote in [IPV4_LEN + 8, IPV4_LEN + 28, 548] {
            let input = icmp_error(
                ROUTER,
                node_host(),
                FRAG_NEEDED,
                MTU_1280,
                &ip_packet(reply)[..quote],
            );
            let instance = Endpoint {
                ip: *to.ip(),
                ..node_host()
            };
            let output = icmp_error(
                ROUTER,
                instance,
                FRAG_NEEDED,
                MTU_1280,
                &ip_packet(&sent)[..quote],
            );
            let what = format!("protocol {proto}, {quote} bytes quoted");
            rows.push(Row::new(what, input, XDP_PASS, output, true));
        }
    }
    let translated = rows.len() as u64;
    let reply = &replies[0];
    let untouched = |what: &str, frame| Row::untouched(what, frame, XDP_PASS);
    let other_flow = FrameBuilder::udp(node(PORT), client(40_099))
        .payload(b"x")
        .build();
    let mut fragment = ip_packet(reply).to_vec();
    fragment[6] = 0x20; // MF, offset 8 bytes: a later fragment (no ports)
    fragment[7] = 0x01;
    rows.extend([
        untouched(
            "echo request to the node",
            FrameBuilder::icmp_echo(CLIENT, node_host(), 7, 1).build(),
        ),
        untouched(
            "error about a reply of no flow",
            icmp_error(
                ROUTER,
                node_host(),
                FRAG_NEEDED,
                MTU_1280,
                ip_packet(&other_flow),
            ),
        ),
        untouched(
            "error quoting only 2 bytes after the IP header",
            icmp_error(
                ROUTER,
                node_host(),
                FRAG_NEEDED,
                MTU_1280,
                &ip_packet(reply)[..IPV4_LEN + 2],
            ),
        ),
        untouched(
            "error quoting a cut IP header",
            icmp_error(
                ROUTER,
                node_host(),
                FRAG_NEEDED,
                MTU_1280,
                &ip_packet(reply)[..12],
            ),
        ),
        untouched(
            "error quoting a later fragment",
            icmp_error(ROUTER, node_host(), FRAG_NEEDED, MTU_1280, &fragment[..48]),
        ),
        untouched(
            "error to another host",
            icmp_error(
                ROUTER,
                Endpoint {
                    ip: OTHER_HOST,
                    ..node_host()
                },
                FRAG_NEEDED,
                MTU_1280,
                ip_packet(reply),
            ),
        ),
    ]);
    run_table(&rows, |frame| run_xdp(&dp, frame));
    let c = counters(&dp);
    assert_eq!(c.global.icmp_to_instance, translated);
}

#[test]
fn icmp_errors_from_an_instance_leave_from_the_node_port() {
    let to = backend(4);
    let dp = load(&[(UDP_PORT, &[to]), (TCP_PORT, &[to])]);
    let asked = [datagram(40_001), syn(40_002)];
    for packet in &asked {
        forward(&dp, packet);
    }
    let instance = sandbox(to);
    let on_path = Endpoint {
        ip: Ipv4Addr::new(10, 88, 0, 254),
        ..instance
    };
    let mut rows = Vec::new();
    for packet in &asked {
        // What the instance received, and what the client sent.
        let received = rewrite_expected(packet, Some(addr_port(to)), None);
        for (what, from) in [("the instance", instance), ("a host on the way", on_path)] {
            let input = icmp_error(
                from,
                client(0),
                PORT_UNREACHABLE,
                [0; 4],
                ip_packet(&received),
            );
            // The outer source becomes the node only when it was the instance.
            let outer = if from.ip == *to.ip() {
                Endpoint { ip: NODE, ..from }
            } else {
                from
            };
            let output = icmp_error(
                outer,
                client(0),
                PORT_UNREACHABLE,
                [0; 4],
                ip_packet(packet),
            );
            rows.push(Row::new(
                format!("port unreachable from {what}"),
                input,
                TC_ACT_OK,
                output,
                true,
            ));
        }
    }
    let translated = rows.len() as u64;
    let unknown = rewrite_expected(&datagram(40_077), Some(addr_port(to)), None);
    rows.extend([
        Row::untouched(
            "error about a packet of no flow",
            icmp_error(
                instance,
                client(0),
                PORT_UNREACHABLE,
                [0; 4],
                ip_packet(&unknown),
            ),
            TC_ACT_OK,
        ),
        Row::untouched(
            "echo from the instance",
            FrameBuilder::icmp_echo(instance, client(0), 1, 1).build(),
            TC_ACT_OK,
        ),
    ]);
    run_table(&rows, |frame| run_tc(&dp, frame));
    assert_eq!(counters(&dp).global.icmp_from_instance, translated);
}

/// IPv6: the same rules.
mod ipv6 {
    use super::*;

    const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 7);
    const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 1);
    /// The instance behind the node port: 10.88.0.5:8000 and [fd6d:6972:656e::5]:8000.
    const TWIN: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x6972, 0x656e, 0, 0, 0, 0, 5);
    /// Packet too big (ICMPv6 type 2), MTU 1280.
    const PACKET_TOO_BIG: (u8, u8) = (2, 0);
    /// Destination unreachable, port unreachable.
    const PORT_UNREACHABLE6: (u8, u8) = (1, 4);

    fn ep(ip: Ipv6Addr, port: u16) -> Endpoint6 {
        Endpoint6 {
            mac: [2, 0, 0, 0, 0, 2],
            ip,
            port,
        }
    }

    fn load6() -> XdpDataplane {
        let endpoints = vec![
            SocketAddr::new(Ipv4Addr::new(10, 88, 0, 5).into(), 8000),
            SocketAddr::new(TWIN.into(), 8000),
        ];
        let mut dp = XdpDataplane::load().expect("load node-port programs");
        dp.apply(&Snapshot {
            node_addrs: vec![IpAddr::V4(NODE), IpAddr::V6(NODE6)],
            node_ports: [UDP_PORT, TCP_PORT]
                .iter()
                .map(|k| (*k, endpoints.clone()))
                .collect(),
        })
        .expect("apply");
        at(&mut dp, Duration::from_secs(100));
        dp
    }

    fn to_node(from: u16, payload_len: usize) -> Vec<u8> {
        Frame6Builder::udp(ep(CLIENT6, from), ep(NODE6, PORT))
            .payload(&payload(payload_len))
            .build()
    }

    fn to_instance(frame: &[u8]) -> Vec<u8> {
        rewrite_expected6(frame, Some((TWIN, 8000)), None)
    }

    fn run(dp: &XdpDataplane, frames: &[Vec<u8>], tc: bool) -> Vec<Vec<u8>> {
        frames
            .iter()
            .map(|frame| {
                let (verdict, out) = if tc {
                    run_tc(dp, frame)
                } else {
                    run_xdp(dp, frame)
                };
                assert_eq!(verdict, if tc { TC_ACT_OK } else { XDP_PASS });
                out
            })
            .collect()
    }

    #[test]
    fn ipv6_fragments_follow_their_first_fragment_both_ways() {
        let dp = load6();
        let whole = to_node(43_000, 4000);
        let out = run(&dp, &fragments6(&whole, CHUNK, 0xabcd), false);
        assert_eq!(out, fragments6(&to_instance(&whole), CHUNK, 0xabcd));

        let reply = Frame6Builder::udp(ep(TWIN, 8000), ep(CLIENT6, 43_000))
            .payload(&payload(4000))
            .build();
        let out = run(&dp, &fragments6(&reply, CHUNK, 0x1234_5678), true);
        let expected = rewrite_expected6(&reply, None, Some((NODE6, PORT)));
        assert_eq!(out, fragments6(&expected, CHUNK, 0x1234_5678));

        // A later fragment whose first was not seen: untouched.
        let orphan = fragments6(&to_node(43_001, 4000), CHUNK, 0xdead)[1].clone();
        assert_eq!(run(&dp, std::slice::from_ref(&orphan), false), vec![orphan]);
        let c = counters(&dp);
        assert_eq!(
            (c.global.fragments_forwarded, c.global.fragments_unmatched),
            (4, 1)
        );
    }

    #[test]
    fn ipv6_icmp_errors_are_translated_both_ways() {
        let dp = load6();
        let asked = to_node(43_002, 16);
        run(&dp, std::slice::from_ref(&asked), false);
        let mtu = 1280u32.to_be_bytes();

        // Packet too big about the reply the node sent: to the instance.
        let reply = Frame6Builder::udp(ep(NODE6, PORT), ep(CLIENT6, 43_002))
            .payload(&payload(1400))
            .build();
        let sent = rewrite_expected6(&reply, None, Some((TWIN, 8000)));
        let router = ep(ROUTER6, 0);
        for quote in [IPV6_LEN + 8, 1232] {
            let input = icmp6_error(
                router,
                ep(NODE6, 0),
                PACKET_TOO_BIG,
                mtu,
                &ip_packet(&reply)[..quote],
            );
            let out = run(&dp, &[input], false).remove(0);
            let expected = icmp6_error(
                router,
                ep(TWIN, 0),
                PACKET_TOO_BIG,
                mtu,
                &ip_packet(&sent)[..quote],
            );
            verify_icmp6_checksum(&out).unwrap();
            assert_eq!(out, expected, "{quote} bytes quoted");
        }
        // Port unreachable from the instance about the client's packet: from the node port.
        let input = icmp6_error(
            ep(TWIN, 0),
            ep(CLIENT6, 0),
            PORT_UNREACHABLE6,
            [0; 4],
            ip_packet(&to_instance(&asked)),
        );
        let out = run(&dp, &[input], true).remove(0);
        verify_icmp6_checksum(&out).unwrap();
        let expected = icmp6_error(
            ep(NODE6, 0),
            ep(CLIENT6, 0),
            PORT_UNREACHABLE6,
            [0; 4],
            ip_packet(&asked),
        );
        assert_eq!(out, expected);

        // No flow, or not an error: untouched.
        let stranger = Frame6Builder::udp(ep(NODE6, PORT), ep(CLIENT6, 43_099)).build();
        let untouched = [
            icmp6_error(
                router,
                ep(NODE6, 0),
                PACKET_TOO_BIG,
                mtu,
                ip_packet(&stranger),
            ),
            // The quoted IPv6 header cut short, and one whole but without its ports.
            icmp6_error(
                router,
                ep(NODE6, 0),
                PACKET_TOO_BIG,
                mtu,
                &ip_packet(&reply)[..30],
            ),
            icmp6_error(
                router,
                ep(NODE6, 0),
                PACKET_TOO_BIG,
                mtu,
                &ip_packet(&reply)[..IPV6_LEN + 2],
            ),
            icmp6_error(
                router,
                ep(NODE6, 0),
                (128, 0),
                [0, 1, 0, 1],
                b"echo request",
            ),
        ];
        assert_eq!(run(&dp, &untouched, false), untouched.to_vec());
        let c = counters(&dp);
        assert_eq!(
            (c.global.icmp_to_instance, c.global.icmp_from_instance),
            (2, 1)
        );
    }
}
