//! The node-port programs, loaded for real, driven through BPF_PROG_TEST_RUN on crafted
//! frames: verdicts, every output byte, and checksums verified independently.
//!
//! Most tests are tables of rows (what, input frame, expected verdict, expected output bytes).
//! DNAT/SNAT rows expect exactly [`rewrite_expected`]'s frame (every checksum recomputed from
//! scratch) and pass [`verify_checksums`]; every other row expects its input back unchanged.
//! Each test function loads its own data plane, so the counters it reads are its own.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
    time::Duration,
};

use aya::programs::{ProgramError, TestRun, TestRunOptions, TestRunResult};
use miren_agent::{
    config::Protocol,
    dataplane::{
        BackendCounters, Counters, Dataplane, Family, GlobalCounters, NodePortKey, PortCounters,
        Snapshot, Snapshot4,
        xdp::{TCP_CLOSING_TIMEOUT, XdpDataplane},
    },
};
use miren_tests::packet::{
    ETH_LEN, Endpoint, FrameBuilder, IPPROTO_UDP, IPV4_LEN, L4Header, TCP_ACK, TCP_FIN, TCP_PSH,
    TCP_RST, TCP_SYN, arp_request, ipv6_frame, parse, rewrite_expected, truncate, verify_checksums,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Not one of the node's addresses.
const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const CLIENT: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 1],
    ip: Ipv4Addr::new(198, 51, 100, 7),
    port: 40_001,
};
/// The node port every test serves (as UDP and/or TCP).
const PORT: u16 = 7000;
const UDP_PORT: NodePortKey = key(PORT, Protocol::Udp);
const TCP_PORT: NodePortKey = key(PORT, Protocol::Tcp);

const fn key(port: u16, protocol: Protocol) -> NodePortKey {
    NodePortKey { port, protocol }
}

fn node(port: u16) -> Endpoint {
    Endpoint {
        mac: [2, 0, 0, 0, 0, 2],
        ip: NODE,
        port,
    }
}

fn client(port: u16) -> Endpoint {
    Endpoint { port, ..CLIENT }
}

/// Sandbox 10.88.0.`n`, target port 8000.
fn backend(n: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, n), 8000)
}

fn backends(n: Range<u8>) -> Vec<SocketAddrV4> {
    n.map(backend).collect()
}

/// The sandbox behind `backend`, as the source of its replies.
fn sandbox(backend: SocketAddrV4) -> Endpoint {
    Endpoint {
        mac: [2, 0, 0, 0, 0, 3],
        ip: *backend.ip(),
        port: backend.port(),
    }
}

fn addr_port(addr: SocketAddrV4) -> (Ipv4Addr, u16) {
    (*addr.ip(), addr.port())
}

/// UDP from the client's port `from` to node port `to`.
fn udp(from: u16, to: u16) -> FrameBuilder {
    FrameBuilder::udp(client(from), node(to))
}

/// TCP with `flags` from the client's port `from` to node port `to`.
fn tcp(from: u16, to: u16, flags: u8) -> FrameBuilder {
    FrameBuilder::tcp(client(from), node(to), flags, 1000, 0)
}

/// `len` bytes of payload.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| 0xa0 ^ i as u8).collect()
}

fn udp_checksum(frame: &[u8]) -> u16 {
    match parse(frame).unwrap().l4 {
        L4Header::Udp { checksum, .. } => checksum,
        other => panic!("not UDP: {other:?}"),
    }
}

fn destination(frame: &[u8]) -> SocketAddrV4 {
    let parsed = parse(frame).unwrap();
    SocketAddrV4::new(parsed.ipv4.dst, parsed.l4.ports().unwrap().1)
}

fn snapshot(ports: &[(NodePortKey, &[SocketAddrV4])]) -> Snapshot {
    Snapshot4 {
        node_addrs: vec![NODE],
        node_ports: ports.iter().map(|(k, e)| (*k, e.to_vec())).collect(),
    }
    .into()
}

/// A freshly loaded data plane (fresh counters) serving `ports`.
fn load(ports: &[(NodePortKey, &[SocketAddrV4])]) -> XdpDataplane {
    let mut dp = XdpDataplane::load().expect("load node-port programs");
    apply(&mut dp, ports);
    dp
}

fn apply(dp: &mut XdpDataplane, ports: &[(NodePortKey, &[SocketAddrV4])]) {
    dp.apply(&snapshot(ports)).expect("apply snapshot");
}

/// Sets the data plane's clock.
fn at(dp: &mut XdpDataplane, now: Duration) {
    dp.set_clock(Some(now)).expect("set clock");
}

fn counters(dp: &XdpDataplane) -> Counters {
    dp.counters().expect("read counters")
}

fn port_counters(dp: &XdpDataplane, key: NodePortKey) -> PortCounters {
    counters(dp).ports[&key]
}

/// Runs `program` once on `frame`: the verdict and the frame that comes out.
fn test_run<P>(program: &P, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

fn run_xdp(dp: &XdpDataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    test_run(dp.xdp_program().unwrap(), frame).expect("XDP test run")
}

fn run_tc(dp: &XdpDataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    test_run(dp.tc_program().unwrap(), frame).expect("TC test run")
}

/// Runs a node-port packet through XDP, checks it came out DNATed (exact bytes, checksums
/// verified), and returns the backend it went to.
fn forward(dp: &XdpDataplane, frame: &[u8]) -> SocketAddrV4 {
    let (verdict, out) = run_xdp(dp, frame);
    assert_eq!(verdict, XDP_PASS);
    let to = destination(&out);
    assert_ne!(*to.ip(), NODE, "not DNATed");
    assert_eq!(out, rewrite_expected(frame, Some(addr_port(to)), None));
    verify_checksums(&out).unwrap();
    to
}

/// Forwards `frame(port)` for every client port in `ports`: where each went.
fn place(
    dp: &XdpDataplane,
    ports: Range<u16>,
    frame: impl Fn(u16) -> Vec<u8>,
) -> BTreeMap<u16, SocketAddrV4> {
    ports
        .map(|port| (port, forward(dp, &frame(port))))
        .collect()
}

/// How many flows of `placement` each backend got.
fn tally(placement: &BTreeMap<u16, SocketAddrV4>) -> BTreeMap<SocketAddrV4, usize> {
    let mut tally = BTreeMap::new();
    for backend in placement.values() {
        *tally.entry(*backend).or_default() += 1;
    }
    tally
}

fn datagram(from: u16) -> Vec<u8> {
    udp(from, PORT).payload(b"data").build()
}

fn syn(from: u16) -> Vec<u8> {
    tcp(from, PORT, TCP_SYN).build()
}

fn ack(from: u16) -> Vec<u8> {
    tcp(from, PORT, TCP_ACK).payload(b"more").build()
}

/// One fixture.
#[derive(Debug)]
struct Row {
    what: String,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    /// The output is a NAT result: its checksums are verified too.
    natted: bool,
}

impl Row {
    /// A node-port packet that XDP DNATs to `to`.
    fn dnat(what: impl Into<String>, input: Vec<u8>, to: SocketAddrV4) -> Self {
        let output = rewrite_expected(&input, Some(addr_port(to)), None);
        Self::new(what, input, XDP_PASS, output, true)
    }

    /// A reply that TC reverse-NATs to come from the node port.
    fn snat(what: impl Into<String>, input: Vec<u8>) -> Self {
        let output = rewrite_expected(&input, None, Some((NODE, PORT)));
        Self::new(what, input, TC_ACT_OK, output, true)
    }

    /// A frame that comes out unchanged with `verdict`.
    fn untouched(what: impl Into<String>, input: Vec<u8>, verdict: u32) -> Self {
        let output = input.clone();
        Self::new(what, input, verdict, output, false)
    }

    fn new(
        what: impl Into<String>,
        input: Vec<u8>,
        verdict: u32,
        output: Vec<u8>,
        natted: bool,
    ) -> Self {
        Self {
            what: what.into(),
            input,
            verdict,
            output,
            natted,
        }
    }
}

fn run_table(rows: &[Row], run: impl Fn(&[u8]) -> (u32, Vec<u8>)) {
    for row in rows {
        let (verdict, output) = run(&row.input);
        assert_eq!(verdict, row.verdict, "{}: verdict", row.what);
        assert_eq!(output, row.output, "{}: output bytes", row.what);
        if row.natted {
            verify_checksums(&output).unwrap_or_else(|e| panic!("{}: {e}", row.what));
        }
    }
}

/// Asserts the global counters, and that no node port counted anything.
fn assert_no_port_counted(dp: &XdpDataplane, global: GlobalCounters) {
    let c = counters(dp);
    assert_eq!(c.global, global);
    assert!(
        c.ports.values().all(|p| *p == PortCounters::default()),
        "{:?}",
        c.ports
    );
}

/// IP bytes of the frames (their IPv4 total length), which is what the counters count.
fn ip_bytes<'a>(frames: impl IntoIterator<Item = &'a Vec<u8>>) -> u64 {
    frames
        .into_iter()
        .map(|f| u64::from(u16::from_be_bytes([f[16], f[17]])))
        .sum()
}

#[test]
fn node_port_packets_are_dnated_exactly() {
    let to = backend(2);
    let dp = load(&[(UDP_PORT, &[to]), (TCP_PORT, &[to])]);
    // Every row is its own flow (client port), so the first pass creates flows and the second
    // pass meets them established.
    let mut from = 41_000u16..;
    let mut next = || from.next().unwrap();
    let mut rows = Vec::new();
    for len in [0, 1, 2, 3, 5, 7] {
        let data = payload(len);
        let udp_frame = udp(next(), PORT).payload(&data).build();
        rows.push(Row::dnat(format!("UDP, {len}-byte payload"), udp_frame, to));
        let tcp_frame = tcp(next(), PORT, TCP_PSH | TCP_ACK).payload(&data).build();
        rows.push(Row::dnat(format!("TCP, {len}-byte payload"), tcp_frame, to));
    }
    for options in [&[1, 1, 1, 0][..], &[1, 1, 1, 1, 1, 1, 1, 0]] {
        let ihl = 5 + options.len() / 4;
        let udp_frame = udp(next(), PORT)
            .ip_options(options)
            .payload(b"opt")
            .build();
        rows.push(Row::dnat(format!("UDP, IHL {ihl}"), udp_frame, to));
        let tcp_frame = tcp(next(), PORT, TCP_SYN).ip_options(options).build();
        rows.push(Row::dnat(format!("TCP SYN, IHL {ihl}"), tcp_frame, to));
    }
    let padded = udp(next(), PORT).payload(b"x").trailer(&[0; 17]).build();
    rows.push(Row::dnat("UDP with Ethernet padding", padded, to));

    let unchecked = udp(next(), PORT)
        .payload(b"no checksum")
        .udp_checksum_disabled()
        .build();
    let unchecked = Row::dnat("UDP checksum 0 stays 0", unchecked, to);
    assert_eq!(udp_checksum(&unchecked.output), 0);
    rows.push(unchecked);
    for len in [2, 5] {
        let ffff = udp(next(), PORT)
            .payload(&payload(len))
            .udp_checksum_ffff_after_nat(Some(addr_port(to)), None)
            .build();
        let what = format!("UDP, {len}-byte payload, checksum 0 after the update → 0xFFFF");
        let ffff = Row::dnat(what, ffff, to);
        assert_eq!(udp_checksum(&ffff.output), 0xffff);
        rows.push(ffff);
    }

    run_table(&rows, |frame| run_xdp(&dp, frame));
    run_table(&rows, |frame| run_xdp(&dp, frame));

    let n = rows.len() as u64;
    let c = counters(&dp);
    assert_eq!(
        c.global,
        GlobalCounters {
            passed: 0,
            malformed: 0,
            // The two SYN rows meet their flows unanswered the second time: new attempts,
            // which pick their backend again (misses).
            conntrack_hits: n - 2,
            conntrack_misses: n + 2,
            // The six PSH|ACK rows start their flows without a SYN.
            tcp_non_syn_misses: 6,
            ..GlobalCounters::default()
        }
    );
    let flows = c.ports[&UDP_PORT].flows + c.ports[&TCP_PORT].flows;
    assert_eq!(flows, n + 2);
}

#[test]
fn non_service_traffic_passes_untouched() {
    let to = backend(2);
    let tcp_only = key(7100, Protocol::Tcp);
    let udp_only = key(7200, Protocol::Udp);
    let dp = load(&[
        (UDP_PORT, &[to]),
        (TCP_PORT, &[to]),
        (tcp_only, &[to]),
        (udp_only, &[to]),
    ]);
    let other_host = Endpoint {
        ip: OTHER_HOST,
        ..node(PORT)
    };
    let udp_segment = udp(40_001, PORT).payload(b"v6").build()[ETH_LEN + IPV4_LEN..].to_vec();
    let pass = |what: &str, frame| Row::untouched(what, frame, XDP_PASS);
    let mut rows = vec![
        pass("ARP request for the node", arp_request(CLIENT, NODE)),
        pass(
            "IPv6 UDP to the node port",
            ipv6_frame(CLIENT.mac, node(PORT).mac, IPPROTO_UDP, &udp_segment),
        ),
        pass(
            "VLAN-tagged UDP to the node port",
            udp(40_001, PORT).vlan(10).payload(b"x").build(),
        ),
        pass(
            "VLAN-tagged TCP SYN to the node port",
            tcp(40_001, PORT, TCP_SYN).vlan(10).build(),
        ),
        pass(
            "ICMP echo to the node",
            FrameBuilder::icmp_echo(CLIENT, node(0), 1, 1)
                .payload(b"ping")
                .build(),
        ),
        pass(
            "UDP to an unconfigured port",
            udp(40_001, 7001).payload(b"x").build(),
        ),
        pass(
            "TCP to an unconfigured port",
            tcp(40_001, 7001, TCP_SYN).build(),
        ),
        pass(
            "UDP to a TCP-only node port",
            udp(40_001, tcp_only.port).payload(b"x").build(),
        ),
        pass(
            "TCP to a UDP-only node port",
            tcp(40_001, udp_only.port, TCP_SYN).build(),
        ),
        pass(
            "UDP to the node port number on another host",
            FrameBuilder::udp(CLIENT, other_host).payload(b"x").build(),
        ),
        pass(
            "TCP to the node port number on another host",
            FrameBuilder::tcp(CLIENT, other_host, TCP_SYN, 1, 0).build(),
        ),
    ];
    let passed = rows.len() as u64;
    // Later fragments whose first fragment was never seen: their bytes where ports would be
    // look like node-port traffic, but they are not read as ports.
    for (what, more, offset) in [("middle", true, 64), ("last", false, 64)] {
        let udp_frame = udp(40_001, PORT)
            .payload(b"fragment")
            .fragment(more, offset);
        rows.push(pass(&format!("UDP {what} fragment"), udp_frame.build()));
        let tcp_frame = tcp(40_001, PORT, TCP_ACK)
            .payload(b"fragment")
            .fragment(more, offset);
        rows.push(pass(&format!("TCP {what} fragment"), tcp_frame.build()));
    }

    run_table(&rows, |frame| run_xdp(&dp, frame));

    assert_no_port_counted(
        &dp,
        GlobalCounters {
            passed,
            fragments_unmatched: 4,
            ..GlobalCounters::default()
        },
    );
}

#[test]
fn malformed_frames_pass_untouched_and_are_counted() {
    let dp = load(&[(UDP_PORT, &[backend(2)]), (TCP_PORT, &[backend(2)])]);
    let udp_frame = udp(40_001, PORT).payload(b"abc").build();
    let tcp_frame = tcp(40_001, PORT, TCP_SYN).payload(b"abc").build();
    let malformed = |what: String, frame| Row::untouched(what, frame, XDP_PASS);
    let mut rows = Vec::new();
    // Cut anywhere from right after the Ethernet header to one byte short: inside or at the
    // end of each of the Ethernet, IPv4, L4 headers and the payload.
    for (name, frame) in [("UDP", &udp_frame), ("TCP", &tcp_frame)] {
        for len in ETH_LEN..frame.len() {
            let what = format!("{name} frame cut to {len} of {} bytes", frame.len());
            rows.push(malformed(what, truncate(frame, len)));
        }
    }
    for ihl in 0..5 {
        let frame = udp(40_001, PORT).ihl(ihl).payload(b"x").build();
        rows.push(malformed(format!("UDP with IHL {ihl}"), frame));
    }
    rows.push(malformed(
        "TCP with IHL 4".into(),
        tcp(40_001, PORT, TCP_SYN).ihl(4).build(),
    ));
    rows.push(malformed(
        "IHL 15: header longer than tot_len".into(),
        udp(40_001, PORT).ihl(15).payload(b"x").build(),
    ));
    rows.push(malformed(
        "UDP tot_len beyond the frame".into(),
        udp(40_001, PORT).tot_len(200).payload(b"x").build(),
    ));
    let tcp_len = (tcp_frame.len() - ETH_LEN) as u16;
    rows.push(malformed(
        "TCP tot_len one byte beyond the frame".into(),
        tcp(40_001, PORT, TCP_SYN)
            .payload(b"abc")
            .tot_len(tcp_len + 1)
            .build(),
    ));
    rows.push(malformed(
        "tot_len shorter than the IPv4 header".into(),
        udp(40_001, PORT).tot_len(19).payload(b"x").build(),
    ));
    // The L4 header ends beyond tot_len, in bytes that follow the IPv4 packet (padding).
    rows.push(malformed(
        "UDP header cut by tot_len, frame padded".into(),
        udp(40_001, PORT)
            .tot_len(IPV4_LEN as u16 + 4)
            .payload(&[0; 10])
            .build(),
    ));
    rows.push(malformed(
        "TCP header cut by tot_len, frame padded".into(),
        tcp(40_001, PORT, TCP_SYN)
            .tot_len(IPV4_LEN as u16 + 12)
            .build(),
    ));
    let mut version6 = udp_frame.clone();
    version6[ETH_LEN] = 0x65;
    rows.push(malformed("IP version 6 in an IPv4 frame".into(), version6));

    run_table(&rows, |frame| run_xdp(&dp, frame));

    // Shorter than an Ethernet header: the kernel refuses to run the program at all.
    for len in 0..ETH_LEN {
        let frame = truncate(&udp_frame, len);
        assert!(
            test_run(dp.xdp_program().unwrap(), &frame).is_err(),
            "{len} bytes"
        );
    }

    let malformed = rows.len() as u64;
    assert_no_port_counted(
        &dp,
        GlobalCounters {
            malformed,
            ..GlobalCounters::default()
        },
    );
}

#[test]
fn a_client_flow_sticks_to_one_backend_and_flows_spread_over_all() {
    let three = backends(2..5);
    let dp = load(&[(UDP_PORT, &three), (TCP_PORT, &three)]);
    /// Packet `i` of the flow from client port `from`.
    type Packet = fn(from: u16, i: usize) -> Vec<u8>;
    let udp_packet: Packet = |from, i| udp(from, PORT).payload(&payload(i)).build();
    let tcp_packet: Packet = |from, i| {
        let flags = if i == 0 { TCP_SYN } else { TCP_ACK | TCP_PSH };
        tcp(from, PORT, flags).payload(&payload(i)).build()
    };
    for (name, packet) in [("UDP", udp_packet), ("TCP", tcp_packet)] {
        let first = forward(&dp, &packet(40_001, 0));
        for i in 1..20 {
            assert_eq!(forward(&dp, &packet(40_001, i)), first, "{name} packet {i}");
        }
        let placement = place(&dp, 41_000..41_200, |from| packet(from, 1));
        let tally = tally(&placement);
        assert_eq!(
            tally.keys().copied().collect::<Vec<_>>(),
            three,
            "{name}: every backend gets flows: {tally:?}"
        );
    }
    let c = counters(&dp);
    assert_eq!(
        (c.ports[&UDP_PORT].flows, c.ports[&TCP_PORT].flows),
        (201, 201)
    );
    assert_eq!(
        (c.global.conntrack_hits, c.global.conntrack_misses),
        (2 * 19, 2 * 201)
    );
}

/// The non-SYN miss rule: a TCP packet without SYN that misses conntrack is counted and goes
/// where its flow's SYN would; a RST is remembered nowhere, anything else creates the entries.
#[test]
fn tcp_misses_without_syn_are_counted_and_a_stray_rst_creates_no_flow() {
    let (a, b, c) = (backend(2), backend(3), backend(4));
    let dp = load(&[(TCP_PORT, &[a, b, c])]);
    let rst = tcp(43_000, PORT, TCP_RST | TCP_ACK).build();
    let chosen = forward(&dp, &rst);
    let reply = FrameBuilder::tcp(sandbox(chosen), client(43_000), TCP_ACK, 1, 1001).build();
    assert_eq!(
        run_tc(&dp, &reply),
        (TC_ACT_OK, reply.clone()),
        "no reverse entry for a stray RST"
    );
    assert_eq!(port_counters(&dp, TCP_PORT).flows, 0);
    // Its flow's SYN goes to the same backend, and now the flow is remembered.
    assert_eq!(forward(&dp, &syn(43_000)), chosen);
    let mid_flow = tcp(43_001, PORT, TCP_ACK).build();
    let picked_up = forward(&dp, &mid_flow);
    let reply = FrameBuilder::tcp(sandbox(picked_up), client(43_001), TCP_ACK, 1, 1001).build();
    let natted = rewrite_expected(&reply, None, Some((NODE, PORT)));
    assert_eq!(
        run_tc(&dp, &reply),
        (TC_ACT_OK, natted),
        "a mid-flow miss creates the entries again"
    );
    let c = counters(&dp);
    assert_eq!(c.global.tcp_non_syn_misses, 2);
    assert_eq!(c.global.conntrack_misses, 3);
    assert_eq!(c.ports[&TCP_PORT].flows, 2);
}

/// A client whose SYN went to an instance that never answered (lost, then removed) and
/// that retries from the same port must reach a live instance; an answered connection to
/// a removed instance keeps it (draining).
#[test]
fn a_syn_retried_on_an_unanswered_flow_picks_its_backend_again() {
    let (lost, live) = (backend(1), backend(2));
    let mut dp = load(&[(TCP_PORT, &[lost])]);
    let (unanswered, answered) = (40_500, 40_501);
    assert_eq!(forward(&dp, &syn(unanswered)), lost);
    assert_eq!(forward(&dp, &syn(answered)), lost);
    let syn_ack = FrameBuilder::tcp(
        sandbox(lost),
        client(answered),
        TCP_SYN | TCP_ACK,
        5000,
        1001,
    );
    run_table(&[Row::snat("SYN-ACK", syn_ack.build())], |f| run_tc(&dp, f));
    apply(&mut dp, &[(TCP_PORT, &[live])]);

    assert_eq!(forward(&dp, &syn(unanswered)), live, "retried SYN");
    assert_eq!(
        forward(&dp, &ack(unanswered)),
        live,
        "and the rest of its handshake"
    );
    assert_eq!(forward(&dp, &ack(answered)), lost, "answered connection");
    assert_eq!(
        forward(&dp, &syn(answered)),
        lost,
        "a SYN on an answered connection"
    );
}

#[test]
fn rst_forgets_its_flow_and_other_connections_keep_their_backend() {
    let (a, b, c, d) = (backend(2), backend(3), backend(4), backend(5));
    let mut dp = load(&[(TCP_PORT, &[a, b, c])]);
    let reset = 40_000;
    let first = forward(&dp, &syn(reset));
    assert_eq!(port_counters(&dp, TCP_PORT).flows, 1);
    let reply =
        FrameBuilder::tcp(sandbox(first), client(reset), TCP_SYN | TCP_ACK, 1, 1001).build();
    let natted = rewrite_expected(&reply, None, Some((NODE, PORT)));
    assert_eq!(run_tc(&dp, &reply), (TC_ACT_OK, natted), "before the RST");

    let rst = tcp(reset, PORT, TCP_RST | TCP_ACK).build();
    assert_eq!(
        forward(&dp, &rst),
        first,
        "the RST goes to the flow's backend"
    );
    assert_eq!(
        run_tc(&dp, &reply),
        (TC_ACT_OK, reply.clone()),
        "after the RST: untouched, the reverse entry is gone"
    );

    let established = place(&dp, 41_000..41_030, syn);
    let tally = tally(&established);
    assert!(tally.contains_key(&c) && tally.len() > 1, "{tally:?}");

    // c leaves, d arrives.
    apply(&mut dp, &[(TCP_PORT, &[a, b, d])]);
    let before = port_counters(&dp, TCP_PORT).flows;
    let again = forward(&dp, &syn(reset));
    assert!([a, b, d].contains(&again), "{again}");
    assert_eq!(port_counters(&dp, TCP_PORT).flows, before + 1, "a new flow");
    // Established connections keep their backend, even the removed c.
    assert_eq!(place(&dp, 41_000..41_030, ack), established);

    let global = counters(&dp).global;
    assert_eq!(
        (global.conntrack_hits, global.conntrack_misses),
        (1 + 30, 1 + 30 + 1)
    );
}

#[test]
fn fin_closes_a_flow_after_the_closing_timeout() {
    let mut dp = load(&[(TCP_PORT, &[backend(2)])]);
    let flows = |dp: &XdpDataplane| port_counters(dp, TCP_PORT).flows;
    let (closing, open) = (40_000, 40_001);
    let t0 = Duration::from_secs(100);
    at(&mut dp, t0);
    forward(&dp, &syn(closing));
    forward(&dp, &syn(open));
    assert_eq!(flows(&dp), 2);

    let fin_at = t0 + Duration::from_secs(1);
    at(&mut dp, fin_at);
    forward(&dp, &tcp(closing, PORT, TCP_FIN | TCP_ACK).build());
    // Idle exactly the closing timeout: still the same flow, and the packet refreshes it.
    let last = fin_at + TCP_CLOSING_TIMEOUT;
    at(&mut dp, last);
    forward(&dp, &ack(closing));
    assert_eq!(flows(&dp), 2);
    // Idle a nanosecond longer: the flow is gone, the next packet starts a new one.
    at(
        &mut dp,
        last + TCP_CLOSING_TIMEOUT + Duration::from_nanos(1),
    );
    forward(&dp, &ack(closing));
    assert_eq!(flows(&dp), 3);
    // A flow without FIN does not expire.
    at(&mut dp, t0 + Duration::from_secs(100_000));
    forward(&dp, &ack(open));
    assert_eq!(flows(&dp), 3);

    let global = counters(&dp).global;
    assert_eq!((global.conntrack_hits, global.conntrack_misses), (3, 3));
}

#[test]
fn idle_udp_sessions_expire() {
    let mut dp = load(&[(UDP_PORT, &backends(2..5))]);
    let timeout = Duration::from_secs(30);
    dp.set_udp_timeout(timeout).unwrap();
    let flows = |dp: &XdpDataplane| port_counters(dp, UDP_PORT).flows;
    let sessions = 40_000..40_050;
    let t0 = Duration::from_secs(100);
    at(&mut dp, t0);
    let placed = place(&dp, sessions.clone(), datagram);
    assert_eq!(flows(&dp), 50);

    // Two more backends; sessions idle exactly the timeout keep theirs.
    let five = backends(2..7);
    apply(&mut dp, &[(UDP_PORT, &five)]);
    at(&mut dp, t0 + timeout);
    assert_eq!(place(&dp, sessions.clone(), datagram), placed);
    assert_eq!(flows(&dp), 50);

    // Idle a nanosecond longer: every session starts over and is placed on the new table.
    at(&mut dp, t0 + 2 * timeout + Duration::from_nanos(1));
    let replaced = place(&dp, sessions, datagram);
    assert_eq!(flows(&dp), 100);
    assert!(replaced.values().all(|b| five.contains(b)));
    assert!(
        replaced
            .iter()
            .any(|(port, b)| placed[port] != *b && five[3..].contains(b)),
        "some session moved to a new backend"
    );
    let global = counters(&dp).global;
    assert_eq!((global.conntrack_hits, global.conntrack_misses), (50, 100));
}

#[test]
fn udp_backends_added_and_removed_keep_established_sessions() {
    let mut dp = load(&[(UDP_PORT, &backends(2..5))]);
    at(&mut dp, Duration::from_secs(100));
    let flows = |dp: &XdpDataplane| port_counters(dp, UDP_PORT).flows;
    let sessions = 40_000..40_050;
    let placed = place(&dp, sessions.clone(), datagram);

    let four = backends(2..6);
    apply(&mut dp, &[(UDP_PORT, &four)]);
    assert_eq!(place(&dp, sessions.clone(), datagram), placed, "added");
    let newcomers = tally(&place(&dp, 41_000..41_200, datagram));
    assert!(newcomers.contains_key(&four[3]), "{newcomers:?}");
    assert_eq!(flows(&dp), 250);

    let removed = placed[&sessions.start];
    let live: Vec<SocketAddrV4> = four.iter().copied().filter(|b| *b != removed).collect();
    apply(&mut dp, &[(UDP_PORT, &live)]);
    let after = place(&dp, sessions.clone(), datagram);
    for (port, old) in &placed {
        if *old == removed {
            assert!(
                live.contains(&after[port]),
                "{port} moved to {}",
                after[port]
            );
        } else {
            assert_eq!(after[port], *old, "{port} kept its backend");
        }
    }
    let moved = placed.values().filter(|b| **b == removed).count() as u64;
    assert_eq!(flows(&dp), 250 + moved);
    let fresh = tally(&place(&dp, 42_000..42_200, datagram));
    assert!(!fresh.contains_key(&removed), "{fresh:?}");
}

#[test]
fn replies_are_reverse_nated_exactly() {
    let to = backend(2);
    let dp = load(&[(UDP_PORT, &[to]), (TCP_PORT, &[to])]);
    let (udp_client, tcp_client) = (40_001, 40_002);
    forward(&dp, &datagram(udp_client));
    forward(&dp, &syn(tcp_client));

    let from = sandbox(to);
    let udp_reply = |port| FrameBuilder::udp(from, client(port));
    let tcp_reply = |port, flags| FrameBuilder::tcp(from, client(port), flags, 5000, 1001);
    let mut rows = Vec::new();
    for len in [0, 1, 3, 4] {
        let frame = udp_reply(udp_client).payload(&payload(len)).build();
        rows.push(Row::snat(format!("UDP reply, {len}-byte payload"), frame));
        let frame = tcp_reply(tcp_client, TCP_ACK)
            .payload(&payload(len))
            .build();
        rows.push(Row::snat(format!("TCP reply, {len}-byte payload"), frame));
    }
    rows.push(Row::snat(
        "TCP SYN-ACK",
        tcp_reply(tcp_client, TCP_SYN | TCP_ACK).build(),
    ));
    rows.push(Row::snat(
        "UDP reply, IHL 6",
        udp_reply(udp_client)
            .ip_options(&[1, 1, 1, 0])
            .payload(b"o")
            .build(),
    ));
    rows.push(Row::snat(
        "TCP reply, IHL 7",
        tcp_reply(tcp_client, TCP_ACK)
            .ip_options(&[1, 1, 1, 1, 1, 1, 1, 0])
            .build(),
    ));
    let unchecked = Row::snat(
        "UDP reply with checksum 0 stays 0",
        udp_reply(udp_client)
            .payload(b"pong")
            .udp_checksum_disabled()
            .build(),
    );
    assert_eq!(udp_checksum(&unchecked.output), 0);
    rows.push(unchecked);
    let ffff = Row::snat(
        "UDP reply, checksum 0 after the update → 0xFFFF",
        udp_reply(udp_client)
            .payload(b"pong")
            .udp_checksum_ffff_after_nat(None, Some((NODE, PORT)))
            .build(),
    );
    assert_eq!(udp_checksum(&ffff.output), 0xffff);
    rows.push(ffff);

    let other_port = sandbox(SocketAddrV4::new(*to.ip(), 8001));
    let ok = |what: &str, frame| Row::untouched(what, frame, TC_ACT_OK);
    rows.extend([
        ok(
            "UDP from the sandbox to a client port without a flow",
            udp_reply(40_009).payload(b"x").build(),
        ),
        ok(
            "UDP from another port of the sandbox",
            FrameBuilder::udp(other_port, client(udp_client)).build(),
        ),
        ok(
            "UDP from another sandbox",
            FrameBuilder::udp(sandbox(backend(3)), client(udp_client)).build(),
        ),
        ok(
            "UDP shaped like a reply of the TCP flow",
            udp_reply(tcp_client).payload(b"x").build(),
        ),
        ok(
            "TCP shaped like a reply of the UDP flow",
            tcp_reply(udp_client, TCP_ACK).build(),
        ),
        ok("the client's packet (forward entry)", datagram(udp_client)),
        ok(
            "the DNATed packet to the sandbox",
            rewrite_expected(&datagram(udp_client), Some(addr_port(to)), None),
        ),
        ok(
            "ICMP echo from the sandbox to the client",
            FrameBuilder::icmp_echo(from, client(0), 1, 1).build(),
        ),
        ok("ARP from the sandbox", arp_request(from, CLIENT.ip)),
    ]);

    run_table(&rows, |frame| run_tc(&dp, frame));

    let c = counters(&dp);
    for key in [UDP_PORT, TCP_PORT] {
        let replies: Vec<&Vec<u8>> = rows
            .iter()
            .filter(|r| r.natted)
            .map(|r| &r.input)
            .filter(|f| (parse(f).unwrap().ipv4.protocol == IPPROTO_UDP) == (key == UDP_PORT))
            .collect();
        let port = c.ports[&key];
        assert_eq!(
            (port.tx_packets, port.tx_bytes),
            (replies.len() as u64, ip_bytes(replies)),
            "{key:?}"
        );
    }
}

/// A flow this node sent to a backend on another node was masqueraded to the node's address
/// with a port the kernel picked, possibly a node port's: the backend's reply to it must pass
/// to the kernel (whose conntrack translates it back), never start a node-port flow.
#[test]
fn packets_from_a_backends_own_address_and_port_are_never_node_port_flows() {
    let remote = backend(2);
    let mut dp = load(&[(UDP_PORT, &[remote]), (TCP_PORT, &[remote])]);
    let from = sandbox(remote);
    let pass = |what: &str, frame| Row::untouched(what, frame, XDP_PASS);
    let rows = [
        pass(
            "UDP reply to the node address and a node port",
            FrameBuilder::udp(from, node(PORT)).payload(b"pong").build(),
        ),
        pass(
            "TCP SYN-ACK to the node address and a node port",
            FrameBuilder::tcp(from, node(PORT), TCP_SYN | TCP_ACK, 5000, 1001).build(),
        ),
    ];
    run_table(&rows, |frame| run_xdp(&dp, frame));
    assert_no_port_counted(
        &dp,
        GlobalCounters {
            passed: rows.len() as u64,
            ..GlobalCounters::default()
        },
    );

    // Another port of the same sandbox is a client like any other.
    let other_port = sandbox(SocketAddrV4::new(*remote.ip(), 8001));
    let datagram = FrameBuilder::udp(other_port, node(PORT)).build();
    assert_eq!(forward(&dp, &datagram), remote);
    // Once it is no backend any more, the sandbox's port is a client too.
    apply(
        &mut dp,
        &[(UDP_PORT, &[backend(3)]), (TCP_PORT, &[backend(3)])],
    );
    assert_eq!(forward(&dp, &rows[0].input), backend(3));
}

#[test]
fn a_node_port_without_endpoints_drops_and_counts() {
    let empty = key(9000, Protocol::Udp);
    let dp = load(&[(empty, &[])]);
    let frame = udp(40_001, empty.port).payload(b"x").build();
    assert_eq!(run_xdp(&dp, &frame).0, XDP_DROP);
    let port = port_counters(&dp, empty);
    assert_eq!(
        (port.rx_packets, port.drop_no_backend, port.flows),
        (1, 1, 0)
    );
}

#[test]
fn counters_are_exact_after_a_fixed_sequence() {
    let (udp_backend, tcp_backend) = (backend(2), backend(3));
    let empty = key(9000, Protocol::Udp);
    let dp = load(&[
        (UDP_PORT, &[udp_backend]),
        (TCP_PORT, &[tcp_backend]),
        (empty, &[]),
    ]);
    let udp_in = [
        udp(40_001, PORT).payload(b"hello").build(),
        udp(40_001, PORT).payload(b"x").build(),
        udp(40_002, PORT).build(),
    ];
    let tcp_in = [syn(40_001), ack(40_001)];
    let dropped = udp(40_001, empty.port).payload(b"dropped").build();
    for frame in udp_in.iter().chain(&tcp_in) {
        forward(&dp, frame);
    }
    assert_eq!(run_xdp(&dp, &dropped).0, XDP_DROP);
    for frame in [
        arp_request(CLIENT, NODE),
        FrameBuilder::udp(
            CLIENT,
            Endpoint {
                ip: OTHER_HOST,
                ..node(PORT)
            },
        )
        .build(),
        truncate(&datagram(40_001), ETH_LEN + IPV4_LEN),
    ] {
        assert_eq!(run_xdp(&dp, &frame), (XDP_PASS, frame.clone()));
    }
    let udp_out = [FrameBuilder::udp(sandbox(udp_backend), CLIENT)
        .payload(b"pong")
        .build()];
    let tcp_out = [
        FrameBuilder::tcp(sandbox(tcp_backend), CLIENT, TCP_SYN | TCP_ACK, 1, 1001)
            .payload(b"welcome")
            .build(),
    ];
    let unrelated = FrameBuilder::udp(sandbox(udp_backend), client(40_999)).build();
    for frame in udp_out.iter().chain(&tcp_out).chain([&unrelated]) {
        assert_eq!(run_tc(&dp, frame).0, TC_ACT_OK);
    }

    let rx = |frames: &[Vec<u8>]| (frames.len() as u64, ip_bytes(frames));
    let port = |flows, rx_in: (u64, u64), tx_out: (u64, u64)| PortCounters {
        rx_packets: rx_in.0,
        rx_bytes: rx_in.1,
        flows,
        tx_packets: tx_out.0,
        tx_bytes: tx_out.1,
        ..PortCounters::default()
    };
    let mut expected = Counters {
        backends: BTreeMap::from([
            ((UDP_PORT, udp_backend), backend_counters(rx(&udp_in))),
            ((TCP_PORT, tcp_backend), backend_counters(rx(&tcp_in))),
        ]),
        global: GlobalCounters {
            passed: 2,
            malformed: 1,
            conntrack_hits: 2,
            conntrack_misses: 4,
            ..GlobalCounters::default()
        },
        // No IPv6 backends (`backends6`) here.
        ..Counters::default()
    };
    let ipv4 = [
        (UDP_PORT, port(2, rx(&udp_in), rx(&udp_out))),
        (TCP_PORT, port(1, rx(&tcp_in), rx(&tcp_out))),
        (
            empty,
            PortCounters {
                drop_no_backend: 1,
                ..port(0, rx(std::slice::from_ref(&dropped)), (0, 0))
            },
        ),
    ];
    for (key, counters) in ipv4 {
        expected.insert_port(key, Family::V4, counters);
        expected.insert_port(key, Family::V6, PortCounters::default());
    }
    assert_eq!(counters(&dp), expected);
}

fn backend_counters((packets, bytes): (u64, u64)) -> BackendCounters {
    BackendCounters { packets, bytes }
}

/// A TCP connection keeps its removed backend; the backend that replaces it must not be
/// credited with that connection's packets.
#[test]
fn a_removed_tcp_backends_packets_are_not_counted_for_its_successor() {
    let (old, new) = (backend(2), backend(3));
    let mut dp = load(&[(TCP_PORT, &[old])]);
    forward(&dp, &syn(40_000));
    apply(&mut dp, &[(TCP_PORT, &[new])]);
    assert_eq!(forward(&dp, &ack(40_000)), old, "kept by the connection");
    assert_eq!(
        counters(&dp).backends[&(TCP_PORT, new)],
        BackendCounters::default(),
        "the new backend received nothing"
    );
}

/// A TCP connection keeps its removed backend even when a UDP backend is removed later.
#[test]
fn removing_a_udp_backend_keeps_tcp_connections_to_a_removed_backend() {
    // Below 7000, so applied first: its freed backend id is free when the UDP port's new
    // backend takes one.
    let tcp_port = key(5000, Protocol::Tcp);
    let (kept, udp_first, udp_second) = (backend(2), backend(3), backend(4));
    let mut dp = load(&[(tcp_port, &[kept]), (UDP_PORT, &[udp_first])]);
    let connection = |flags| tcp(40_000, tcp_port.port, flags).build();
    assert_eq!(forward(&dp, &connection(TCP_SYN)), kept);
    apply(
        &mut dp,
        &[(tcp_port, &[]), (UDP_PORT, &[udp_first, udp_second])],
    );
    assert_eq!(forward(&dp, &connection(TCP_ACK)), kept);
    apply(&mut dp, &[(tcp_port, &[]), (UDP_PORT, &[udp_first])]);
    assert_eq!(
        run_xdp(&dp, &connection(TCP_ACK)).1,
        rewrite_expected(&connection(TCP_ACK), Some(addr_port(kept)), None),
        "still forwarded to its backend"
    );
}

/// IPv6 node ports: the same programs, IPv6 frames built and checked by
/// `miren_tests::packet`'s IPv6 helpers.
mod ipv6 {
    use std::{
        collections::BTreeSet,
        net::{IpAddr, Ipv6Addr, SocketAddr},
    };

    use miren_tests::packet::{
        Endpoint6, Frame6Builder, IPV6_DSTOPTS, IPV6_HOPOPTS, IPV6_LEN, IPV6_ROUTING, UDP_LEN,
        parse6, rewrite_expected6, verify_checksums6,
    };

    use super::*;

    const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10);
    /// Not one of the node's addresses.
    const OTHER_HOST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 99);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 7);

    fn node6(ip: Ipv6Addr, port: u16) -> Endpoint6 {
        Endpoint6 {
            mac: [2, 0, 0, 0, 0, 2],
            ip,
            port,
        }
    }

    fn client6(port: u16) -> Endpoint6 {
        Endpoint6 {
            mac: [2, 0, 0, 0, 0, 1],
            ip: CLIENT6,
            port,
        }
    }

    /// Instance `n`: 10.88.0.`n`:8000 and its twin [fd6d:6972:656e::`n`]:8000.
    fn instance(n: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::new(Ipv4Addr::new(10, 88, 0, n as u8).into(), 8000),
            SocketAddr::new(twin(n).into(), 8000),
        ]
    }

    fn twin(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd6d, 0x6972, 0x656e, 0, 0, 0, 0, n)
    }

    /// A snapshot with both node addresses and `ports`, each served by `instances` (IPv4
    /// endpoints first, then their IPv6 twins in the same order, as the agent lists them).
    fn snapshot6(ports: &[NodePortKey], instances: &[u16]) -> Snapshot {
        let endpoints: Vec<SocketAddr> = (0..2)
            .flat_map(|family| instances.iter().map(move |n| instance(*n)[family]))
            .collect();
        Snapshot {
            node_addrs: vec![IpAddr::V4(NODE), IpAddr::V6(NODE6)],
            node_ports: ports.iter().map(|k| (*k, endpoints.clone())).collect(),
        }
    }

    fn load6(ports: &[NodePortKey], instances: &[u16]) -> XdpDataplane {
        let mut dp = XdpDataplane::load().expect("load node-port programs");
        dp.apply(&snapshot6(ports, instances)).expect("apply");
        dp.set_clock(Some(Duration::from_secs(100)))
            .expect("set clock");
        dp
    }

    fn udp6(from: u16, to: Ipv6Addr) -> Frame6Builder {
        Frame6Builder::udp(client6(from), node6(to, PORT)).payload(b"data")
    }

    fn tcp6(from: u16, to: Ipv6Addr, flags: u8) -> Frame6Builder {
        Frame6Builder::tcp(client6(from), node6(to, PORT), flags, 1000, 0)
    }

    /// Runs every `(what, frame)` through XDP and asserts it comes out untouched with XDP_PASS.
    fn assert_untouched(dp: &XdpDataplane, rows: &[(&str, Vec<u8>)]) {
        for (what, frame) in rows {
            let (verdict, out) = run_xdp(dp, frame);
            assert_eq!(verdict, XDP_PASS, "{what}: verdict");
            assert_eq!(&out, frame, "{what}: output bytes");
        }
    }

    /// As for IPv4: a reply from a backend's own IPv6 address and port (a flow this node sent
    /// to another node's instance, masqueraded to this node's address with a port that may be
    /// a node port) passes to the kernel; any other port of the instance is a client.
    #[test]
    fn ipv6_packets_from_a_backends_own_address_and_port_are_never_node_port_flows() {
        let dp = load6(&[UDP_PORT, TCP_PORT], &[1]);
        let backend = Endpoint6 {
            mac: [2, 0, 0, 0, 0, 3],
            ip: twin(1),
            port: 8000,
        };
        let replies = [
            (
                "UDP reply to the node port",
                Frame6Builder::udp(backend, node6(NODE6, PORT)).build(),
            ),
            (
                "TCP SYN-ACK to the node port",
                Frame6Builder::tcp(backend, node6(NODE6, PORT), TCP_SYN | TCP_ACK, 1, 1).build(),
            ),
        ];
        assert_untouched(&dp, &replies);
        assert_no_port_counted(
            &dp,
            GlobalCounters {
                passed: 2,
                ..GlobalCounters::default()
            },
        );
        let other_port = Endpoint6 {
            port: 8001,
            ..backend
        };
        let (verdict, out) = run_xdp(
            &dp,
            &Frame6Builder::udp(other_port, node6(NODE6, PORT)).build(),
        );
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(destination6(&out), (twin(1), 8000));
    }

    /// The non-SYN miss rule over IPv6: a stray RST goes where its flow's SYN would and is
    /// remembered nowhere; a mid-flow ACK creates the flow's entries again.
    #[test]
    fn ipv6_tcp_misses_without_syn_are_counted_and_a_stray_rst_creates_no_flow() {
        let dp = load6(&[TCP_PORT], &[1, 2, 3]);
        let forward6 = |frame: &[u8]| {
            let (verdict, out) = run_xdp(&dp, frame);
            assert_eq!(verdict, XDP_PASS);
            verify_checksums6(&out).unwrap();
            destination6(&out)
        };
        let rst = tcp6(44_000, NODE6, TCP_RST | TCP_ACK).build();
        let chosen = forward6(&rst);
        let from = |(ip, port)| Endpoint6 {
            mac: [2, 0, 0, 0, 0, 3],
            ip,
            port,
        };
        let reply = Frame6Builder::tcp(from(chosen), client6(44_000), TCP_ACK, 1, 1001).build();
        assert_eq!(
            run_tc(&dp, &reply),
            (TC_ACT_OK, reply.clone()),
            "no reverse entry"
        );
        assert_eq!(forward6(&tcp6(44_000, NODE6, TCP_SYN).build()), chosen);
        let picked_up = forward6(&tcp6(44_001, NODE6, TCP_ACK).build());
        let reply = Frame6Builder::tcp(from(picked_up), client6(44_001), TCP_ACK, 1, 1001).build();
        let natted = rewrite_expected6(&reply, None, Some((NODE6, PORT)));
        assert_eq!(run_tc(&dp, &reply), (TC_ACT_OK, natted), "entries again");
        let c = counters(&dp);
        assert_eq!(c.global.tcp_non_syn_misses, 2);
        assert_eq!(c.families[&(TCP_PORT, Family::V6)].flows, 2);
    }

    #[test]
    fn ipv6_packets_not_for_a_node_port_pass_untouched() {
        let dp = load6(&[UDP_PORT, TCP_PORT], &[1, 2]);
        let mut five_ext = udp6(40_000, NODE6);
        for kind in [
            IPV6_HOPOPTS,
            IPV6_DSTOPTS,
            IPV6_ROUTING,
            IPV6_DSTOPTS,
            IPV6_DSTOPTS,
        ] {
            five_ext = five_ext.ext_header(kind, 0);
        }
        let passed = [
            ("UDP to another host", udp6(40_000, OTHER_HOST).build()),
            (
                "TCP SYN to another host",
                tcp6(40_000, OTHER_HOST, TCP_SYN).build(),
            ),
            (
                "UDP to another host behind a hop-by-hop header",
                udp6(40_000, OTHER_HOST).ext_header(IPV6_HOPOPTS, 1).build(),
            ),
            (
                "truncated UDP to another host",
                truncate(&udp6(40_000, OTHER_HOST).build(), ETH_LEN + IPV6_LEN + 4),
            ),
            (
                "UDP to the node, another port",
                Frame6Builder::udp(client6(40_000), node6(NODE6, 7001)).build(),
            ),
            (
                "last fragment to the node port, its first never seen",
                udp6(40_000, NODE6).fragment(185, false).build(),
            ),
            ("five extension headers before UDP", five_ext.build()),
            (
                "extension headers longer than the parser walks",
                udp6(40_000, NODE6)
                    .ext_header(IPV6_HOPOPTS, 40)
                    .ext_header(IPV6_DSTOPTS, 40)
                    .build(),
            ),
        ];
        assert_untouched(&dp, &passed);
        let malformed = [
            (
                "IPv6 header cut short",
                truncate(&udp6(40_000, NODE6).build(), ETH_LEN + IPV6_LEN - 1),
            ),
            (
                "payload_len beyond the frame",
                udp6(40_000, NODE6).payload_len(200).build(),
            ),
            (
                "UDP header cut short by payload_len",
                udp6(40_000, NODE6).payload_len(UDP_LEN as u16 - 1).build(),
            ),
            (
                "TCP header cut short by payload_len",
                tcp6(40_000, NODE6, TCP_ACK).payload_len(19).build(),
            ),
            (
                "extension header cut short by payload_len",
                udp6(40_000, NODE6)
                    .ext_header(IPV6_DSTOPTS, 0)
                    .payload_len(1)
                    .build(),
            ),
            (
                "extension header beyond the frame",
                truncate(
                    &udp6(40_000, NODE6).ext_header(IPV6_HOPOPTS, 0).build(),
                    ETH_LEN + IPV6_LEN + 1,
                ),
            ),
        ];
        assert_untouched(&dp, &malformed);
        assert_no_port_counted(
            &dp,
            GlobalCounters {
                // The later fragment whose first was never seen is counted unmatched.
                passed: passed.len() as u64 - 1,
                malformed: malformed.len() as u64,
                fragments_unmatched: 1,
                ..GlobalCounters::default()
            },
        );
    }

    /// The destination of an IPv6 frame.
    fn destination6(frame: &[u8]) -> (Ipv6Addr, u16) {
        let parsed = parse6(frame).unwrap();
        (parsed.dst, parsed.l4.ports().unwrap().1)
    }

    #[test]
    fn ipv6_node_port_packets_are_dnated_to_the_twins_exactly() {
        let dp = load6(&[UDP_PORT, TCP_PORT], &[1, 2, 3]);
        let twins: Vec<(Ipv6Addr, u16)> = (1..=3).map(|n| (twin(n), 8000)).collect();
        let mut frames = Vec::new();
        for from in 41_000..41_030u16 {
            frames.push(udp6(from, NODE6).build());
            frames.push(tcp6(from, NODE6, TCP_SYN).build());
        }
        frames.push(
            udp6(41_100, NODE6)
                .ext_header(IPV6_HOPOPTS, 0)
                .ext_header(IPV6_DSTOPTS, 1)
                .build(),
        );
        frames.push(udp6(41_101, NODE6).trailer(&[0; 9]).build());
        let mut seen = BTreeMap::new();
        for pass in 0..2 {
            for frame in &frames {
                let (verdict, out) = run_xdp(&dp, frame);
                assert_eq!(verdict, XDP_PASS);
                let to = destination6(&out);
                assert!(twins.contains(&to), "{to:?} is no twin");
                assert_eq!(out, rewrite_expected6(frame, Some(to), None));
                verify_checksums6(&out).unwrap();
                // Established flows keep their backend.
                if pass == 1 {
                    assert_eq!(seen[frame], to);
                }
                seen.insert(frame.clone(), to);
            }
        }
        let used: BTreeSet<_> = seen.values().collect();
        assert_eq!(used.len(), 3, "every twin gets flows");
        let c = counters(&dp);
        let n = frames.len() as u64;
        // The 30 SYNs meet their flows unanswered the second time: new attempts, which
        // pick their backend again (the same one, the table being unchanged).
        assert_eq!(c.global.conntrack_misses, n + 30);
        assert_eq!(c.global.conntrack_hits, n - 30);
        let rx: u64 = c.ports.values().map(|p| p.rx_packets).sum();
        assert_eq!(rx, 2 * n);
        let flows: u64 = c.ports.values().map(|p| p.flows).sum();
        assert_eq!(flows, n + 30);
        let per_twin: u64 = c.backends6.values().map(|b| b.packets).sum();
        assert_eq!(per_twin, 2 * n);
        assert!(
            c.backends.values().all(|b| b.packets == 0),
            "IPv4 backends untouched"
        );
    }

    #[test]
    fn ipv6_replies_leave_from_the_node_port_with_valid_checksums() {
        let dp = load6(&[UDP_PORT, TCP_PORT], &[1, 2]);
        let mut replied = 0u64;
        let mut reply_bytes = 0u64;
        for (from, forward) in [
            (42_000, udp6(42_000, NODE6).build()),
            (42_001, tcp6(42_001, NODE6, TCP_SYN).build()),
        ] {
            let (verdict, out) = run_xdp(&dp, &forward);
            assert_eq!(verdict, XDP_PASS);
            let (twin, twin_port) = destination6(&out);
            let instance = node6(twin, twin_port);
            let reply = if parse6(&forward).unwrap().protocol == 17 {
                Frame6Builder::udp(instance, client6(from))
                    .payload(b"reply")
                    .build()
            } else {
                Frame6Builder::tcp(instance, client6(from), TCP_SYN | TCP_ACK, 1, 1001).build()
            };
            let natted = rewrite_expected6(&reply, None, Some((NODE6, PORT)));
            assert_eq!(run_tc(&dp, &reply), (TC_ACT_OK, natted.clone()));
            verify_checksums6(&natted).unwrap();
            replied += 1;
            reply_bytes += (reply.len() - ETH_LEN) as u64;
        }
        // Not the reply of a node-port flow: untouched.
        let stranger = Frame6Builder::udp(node6(twin(1), 8000), client6(42_999))
            .payload(b"x")
            .build();
        assert_eq!(run_tc(&dp, &stranger), (TC_ACT_OK, stranger.clone()));
        let c = counters(&dp);
        let tx: u64 = c.ports.values().map(|p| p.tx_packets).sum();
        let tx_bytes: u64 = c.ports.values().map(|p| p.tx_bytes).sum();
        assert_eq!((tx, tx_bytes), (replied, reply_bytes));
    }

    #[test]
    fn ipv6_udp_without_checksum_and_instances_without_twins() {
        let dp = load6(&[UDP_PORT], &[1]);
        let zero = udp6(40_000, NODE6).udp_checksum_zero().build();
        assert_untouched(&dp, &[("UDP checksum 0 over IPv6", zero)]);
        assert_eq!(counters(&dp).global.malformed, 1);
        // IPv4 endpoints only: IPv6 clients are dropped and counted.
        let mut dp = dp;
        let only_v4 = Snapshot {
            node_addrs: vec![IpAddr::V4(NODE), IpAddr::V6(NODE6)],
            node_ports: BTreeMap::from([(UDP_PORT, vec![instance(1)[0]])]),
        };
        dp.apply(&only_v4).unwrap();
        let (verdict, _) = run_xdp(&dp, &udp6(40_001, NODE6).build());
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(counters(&dp).ports[&UDP_PORT].drop_no_backend, 1);
    }
}

#[path = "nodeport_fixtures/fragments_icmp.rs"]
mod fragments_icmp;
