//! ICMP errors through a node port, end to end on both planes:
//!
//! - Path MTU discovery: a 5 MB TCP download from an instance (node's sandbox side MTU 1,500)
//!   to a client behind a router whose hop towards the client has MTU 1,280, while the client's
//!   own link is 1,500 (so its MSS does not fit the hop and clamping cannot hide the problem).
//!   The router sends ICMP "fragmentation needed" about the instance's DF segments to their
//!   source, NODE_IP (about NODE_IP:node_port → client); the node must hand it to the instance,
//!   which then sends smaller segments, so the download completes intact. The router's
//!   `IcmpOutDestUnreachs` and the instance's learned path MTU prove the ICMP was really needed
//!   and delivered.
//! - A stopped instance: once the instance's socket is closed, its namespace answers the
//!   client's next datagram with ICMP port unreachable; the client must see it as coming from
//!   NODE_IP about NODE_IP:node_port (a connected socket gets ECONNREFUSED, the error queue
//!   names NODE_IP as the offender and NODE_IP:node_port as the original destination).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use miren_tests::{
    on_both_planes,
    world::{NODE_IP, Plane, World, sandbox_ip},
};

on_both_planes!(
    a_tcp_download_through_a_smaller_mtu_on_the_clients_path_completes_intact,
    a_stopped_instance_s_port_unreachable_comes_from_the_node_port,
);

/// The MTU of the router's hop towards the client.
const HOP_MTU: u32 = 1280;
/// The size of the download.
const DOWNLOAD: usize = 5_000_000;
/// The port of the test's own servers in the sandbox (the node port's endpoint).
const SERVER_PORT: u16 = 9100;
/// How long a read may wait (generous: shared machine).
const TIMEOUT: Duration = Duration::from_secs(20);

/// Byte `i` of the download.
fn download_byte(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Serves one download in `world`'s sandbox 0 at `SERVER_PORT`: after a request line, the
/// `DOWNLOAD` bytes of [`download_byte`], then the connection is closed.
fn serve_download(world: &World) -> SocketAddr {
    let addr: SocketAddr = format!("{}:{SERVER_PORT}", sandbox_ip(0)).parse().unwrap();
    let listener = world
        .sandbox(0)
        .run(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut request = [0u8; 4];
        if stream.read_exact(&mut request).is_err() {
            return;
        }
        let data: Vec<u8> = (0..DOWNLOAD).map(download_byte).collect();
        let _ = stream.write_all(&data);
    });
    addr
}

fn a_tcp_download_through_a_smaller_mtu_on_the_clients_path_completes_intact(plane: Plane) {
    let world = World::new_routed(1, HOP_MTU);
    let router = world.router().unwrap();
    let agent = world.start_agent(plane);
    world.deploy(&agent);
    let server = serve_download(&world);
    let echo: SocketAddr = format!("{}:9000", sandbox_ip(0)).parse().unwrap();
    world.set_endpoint_addrs(&agent, &[echo], &[server]);
    let unreachables_before = router.snmp("IcmpOutDestUnreachs").unwrap();

    let node_port: SocketAddr = format!("{NODE_IP}:7000").parse().unwrap();
    let received = world
        .client
        .run(|| {
            let mut stream = TcpStream::connect_timeout(&node_port, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.write_all(b"GET\n")?;
            let mut received = Vec::with_capacity(DOWNLOAD);
            let mut buf = vec![0u8; 65_536];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(received),
                    Ok(len) => received.extend_from_slice(&buf[..len]),
                    Err(err) => {
                        return Err(std::io::Error::new(
                            err.kind(),
                            format!("after {} bytes: {err}", received.len()),
                        ));
                    }
                }
            }
        })
        .unwrap();
    let unreachables = router.snmp("IcmpOutDestUnreachs").unwrap() - unreachables_before;
    let path = world
        .sandbox(0)
        .ip(&["route", "get", &world.client_ip().to_string()])
        .unwrap();
    let received = received.unwrap_or_else(|err| {
        panic!(
            "{plane:?}: the download stalled: {err}; the router sent {unreachables} ICMP \
             destination unreachable; the instance's route to the client: {path}"
        )
    });
    assert_eq!(received.len(), DOWNLOAD, "downloaded bytes");
    if let Some(i) = (0..DOWNLOAD).find(|i| received[*i] != download_byte(*i)) {
        panic!("the download differs at byte {i}");
    }
    assert!(
        unreachables > 0,
        "the router sent no ICMP fragmentation needed: path MTU discovery was not exercised"
    );
    assert!(
        path.contains(&format!("mtu {HOP_MTU}")),
        "the instance learned the path MTU: {path}"
    );
    if plane == Plane::Xdp {
        assert!(
            world.dataplane_event("icmp_to_instance") > 0,
            "XDP translated the ICMP"
        );
    }
}

/// What the error queue of a socket holds about one ICMP error.
#[derive(Debug)]
struct QueuedError {
    /// `ee_errno`.
    errno: i32,
    /// `ee_origin`, `ee_type`, `ee_code`.
    origin: u8,
    icmp_type: u8,
    icmp_code: u8,
    /// The address that sent the ICMP error (`SO_EE_OFFENDER`).
    offender: Option<Ipv4Addr>,
    /// The destination of the packet the error is about (from its inner header).
    destination: Option<SocketAddrV4>,
}

/// `sockaddr_in` → address and port.
fn socket_addr_v4(sin: &libc::sockaddr_in) -> Option<SocketAddrV4> {
    (i32::from(sin.sin_family) == libc::AF_INET).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        )
    })
}

/// Turns `IP_RECVERR` on for `socket`.
fn receive_errors(socket: &UdpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a c_int of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
}

/// Reads one error from `socket`'s error queue (`MSG_ERRQUEUE`), if one is queued.
fn queued_error(socket: &UdpSocket) -> std::io::Result<QueuedError> {
    let mut payload = [0u8; 256];
    let mut control = [0u64; 64];
    // SAFETY: recvmsg with buffers of the sizes passed; the control messages are read within
    // the length the kernel returned, through the CMSG macros.
    unsafe {
        let mut name: libc::sockaddr_in = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&raw mut name).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        if libc::recvmsg(
            socket.as_raw_fd(),
            &raw mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_RECVERR {
                let data = libc::CMSG_DATA(cmsg);
                let err: libc::sock_extended_err = std::ptr::read_unaligned(data.cast());
                let offender: libc::sockaddr_in = std::ptr::read_unaligned(
                    data.add(std::mem::size_of::<libc::sock_extended_err>())
                        .cast(),
                );
                return Ok(QueuedError {
                    errno: err.ee_errno as i32,
                    origin: err.ee_origin,
                    icmp_type: err.ee_type,
                    icmp_code: err.ee_code,
                    offender: socket_addr_v4(&offender).map(|a| *a.ip()),
                    destination: socket_addr_v4(&name),
                });
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
        Err(std::io::Error::other("no IP_RECVERR control message"))
    }
}

/// An ICMP error as a raw socket in the client's namespace received it.
#[derive(Debug, PartialEq, Eq)]
struct SeenIcmp {
    /// The outer source.
    from: Ipv4Addr,
    icmp_type: u8,
    icmp_code: u8,
    /// The inner (offending) packet's source and destination.
    inner_source: SocketAddrV4,
    inner_destination: SocketAddrV4,
}

/// A raw ICMP socket (sees every ICMP packet the namespace receives).
struct IcmpCapture(OwnedFd);

impl IcmpCapture {
    /// Opens the socket; call it inside the namespace.
    fn open() -> Self {
        // SAFETY: socket() returns a new descriptor this value owns (checked below).
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                libc::IPPROTO_ICMP,
            )
        };
        assert!(
            fd >= 0,
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh, valid descriptor owned by nobody else.
        Self(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The ICMP errors received so far (other ICMP packets and truncated ones are skipped).
    fn errors(&self) -> Vec<SeenIcmp> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: recv into a buffer of the size passed.
            let len =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(len) = usize::try_from(len) else {
                return seen;
            };
            seen.extend(parse_icmp_error(&buf[..len]));
        }
    }
}

/// An IPv4 packet holding an ICMP error about a UDP or TCP packet.
fn parse_icmp_error(packet: &[u8]) -> Option<SeenIcmp> {
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let icmp = packet.get(ihl..)?;
    let (icmp_type, icmp_code) = (*icmp.first()?, *icmp.get(1)?);
    if ![3, 11, 12].contains(&icmp_type) {
        return None;
    }
    let inner = icmp.get(8..)?;
    let inner_ihl = usize::from(inner.first()? & 0x0f) * 4;
    let ports = inner.get(inner_ihl..inner_ihl + 4)?;
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Some(SeenIcmp {
        from: addr(packet.get(12..16)?),
        icmp_type,
        icmp_code,
        inner_source: SocketAddrV4::new(addr(inner.get(12..16)?), port(&ports[..2])),
        inner_destination: SocketAddrV4::new(addr(inner.get(16..20)?), port(&ports[2..])),
    })
}

fn a_stopped_instance_s_port_unreachable_comes_from_the_node_port(plane: Plane) {
    let world = World::new(1);
    let agent = world.start_agent(plane);
    world.deploy(&agent);
    // The instance: the test's own UDP socket in sandbox 0, the node port's only endpoint.
    let server: SocketAddr = format!("{}:{SERVER_PORT}", sandbox_ip(0)).parse().unwrap();
    let instance = world
        .sandbox(0)
        .run(|| UdpSocket::bind(server))
        .unwrap()
        .unwrap();
    instance.set_read_timeout(Some(TIMEOUT)).unwrap();
    let tcp: SocketAddr = format!("{}:9000", sandbox_ip(0)).parse().unwrap();
    world.set_endpoint_addrs(&agent, &[server], &[tcp]);

    let node_port = SocketAddrV4::new(NODE_IP.parse().unwrap(), 7000);
    let client_ip = world.client_ip();
    let client = world
        .client
        .run(|| {
            let socket = UdpSocket::bind((client_ip, 0)).unwrap();
            socket.connect(node_port).unwrap();
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            receive_errors(&socket);
            (socket, IcmpCapture::open())
        })
        .unwrap();
    let (client, capture) = client;

    // The flow works while the instance runs.
    client.send(b"hello").unwrap();
    let mut buf = [0u8; 64];
    let (len, from) = instance.recv_from(&mut buf).expect("the instance got it");
    instance.send_to(&buf[..len], from).unwrap();
    let len = client.recv(&mut buf).expect("the echo");
    assert_eq!(&buf[..len], b"hello");

    // The instance stops (its socket closes): the next datagram draws a port unreachable.
    drop(instance);
    client.send(b"anyone?").unwrap();
    let refused = client.recv(&mut buf);
    let queued = queued_error(&client);
    let seen = capture.errors();
    let err = refused.expect_err("no reply can come from a stopped instance");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "{plane:?}: the client's connected socket got {err} instead of ECONNREFUSED (the port \
         unreachable did not reach it as one about NODE_IP:7000); error queue: {queued:?}; \
         ICMP errors the client received: {seen:?}"
    );
    let local = match client.local_addr().unwrap() {
        SocketAddr::V4(local) => local,
        SocketAddr::V6(local) => panic!("an IPv4 client, not {local}"),
    };
    assert_eq!(
        seen,
        [SeenIcmp {
            from: *node_port.ip(),
            icmp_type: 3,
            icmp_code: 3,
            inner_source: local,
            inner_destination: node_port,
        }],
        "the raw socket saw one port unreachable from NODE_IP about the client's datagram to \
         NODE_IP:7000"
    );
    let queued = queued.expect("the error is queued (IP_RECVERR)");
    assert_eq!(
        (
            queued.errno,
            queued.origin,
            queued.icmp_type,
            queued.icmp_code
        ),
        (libc::ECONNREFUSED, libc::SO_EE_ORIGIN_ICMP, 3, 3),
        "an ICMP port unreachable: {queued:?}"
    );
    assert_eq!(
        queued.offender,
        Some(*node_port.ip()),
        "sent by NODE_IP: {queued:?}"
    );
    assert_eq!(
        queued.destination,
        Some(node_port),
        "about NODE_IP:7000: {queued:?}"
    );
    if plane == Plane::Xdp {
        assert!(
            world.dataplane_event("icmp_from_instance") > 0,
            "TC translated the ICMP"
        );
    }
}
