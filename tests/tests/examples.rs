//! Every app under `examples/`, deployed as it is by the real agent running real sandboxes and
//! spoken to as its users would: through its node ports from the client namespace
//! (`NODE_IP:node_port`, on both data planes), or through its route on the agent's ingress. An
//! example without a check here fails the test, so a new one cannot go untested.

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use miren_tests::{
    apps::{HttpClient, app_detail, endpoints, udp_exchange, wait_until_logging},
    ingress::ok,
    process::{AgentProcess, example, workspace_root},
    tls,
    world::{CLIENT_IP, NODE_IP, Plane, World, wait_for_status_ok},
};

/// How long instances may take to become ready, and a reply to come.
const WAIT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(5);

const HTTP: HttpClient = HttpClient {
    connect_timeout: Some(Duration::from_secs(5)),
    read_timeout: Duration::from_secs(10),
};

type Check = fn(&World, &AgentProcess);

/// The check of each example, by directory name.
fn check_of(example: &str) -> Option<Check> {
    Some(match example {
        "dns" => dns,
        "game" => game,
        "hello-web" => hello_web,
        "irc" => irc,
        "tcp-echo" => tcp_echo,
        "udp-echo" => udp_echo,
        _ => return None,
    })
}

miren_tests::on_both_planes!(every_example_deploys_as_it_is_and_serves_its_users);

fn every_example_deploys_as_it_is_and_serves_its_users(plane: Plane) {
    let mut names: Vec<String> = std::fs::read_dir(workspace_root().join("examples"))
        .expect("examples/")
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.path().join(".miren/app.toml").is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 6, "examples found: {names:?}");
    let checks: Vec<(String, Check)> = names
        .iter()
        .map(|name| {
            let check = check_of(name).unwrap_or_else(|| {
                panic!("examples/{name} has no check: add one to tests/tests/examples.rs")
            });
            (name.clone(), check)
        })
        .collect();

    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(plane, &[]);
    // All at once: the agent starts their instances side by side.
    for name in &names {
        let dir = example(name);
        let out = ok(&agent, &["deploy", dir.to_str().unwrap()]);
        assert!(out.contains(&format!("deployed app {name}")), "{out}");
    }
    for (name, check) in checks {
        wait_until_ready(&agent, &name);
        wait_for_status_ok(&agent);
        check(&world, &agent);
        // An example that served but crashed on the way is not one that runs.
        for service in app_detail(&agent, &name).services {
            let instances = service.instances.expect("instances run by this agent");
            assert_eq!(
                instances.restarts,
                0,
                "{name}/{}: {instances:?}\n{}",
                service.name,
                ok(&agent, &["logs", &name])
            );
        }
        eprintln!("examples/{name} ({plane:?}): ok");
    }
}

/// Waits until every service of `app` has all its fixed instances ready; fails with the app's
/// status and logs when one does not, or at once when its instances keep exiting.
fn wait_until_ready(agent: &AgentProcess, app: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let services = app_detail(agent, app).services;
        let crashing = services
            .iter()
            .any(|s| s.instances.as_ref().is_some_and(|i| i.crash_loop));
        if services.iter().all(|service| {
            let wanted: usize = service
                .concurrency
                .strip_prefix("fixed ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{app}: not a fixed service: {service:?}"));
            service
                .instances
                .as_ref()
                .is_some_and(|i| i.ready == wanted)
        }) {
            return;
        }
        assert!(
            !crashing && std::time::Instant::now() < deadline,
            "examples/{app} did not become ready:\n{}\nits logs:\n{}",
            ok(agent, &["app", "show", app]),
            ok(agent, &["logs", app])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn node(port: u16) -> SocketAddr {
    SocketAddr::new(NODE_IP.parse().unwrap(), port)
}

/// A TCP connection from the client to node port `port`, reads waiting up to [`REPLY`].
fn connect(world: &World, port: u16) -> TcpStream {
    let stream = world
        .client
        .run(|| TcpStream::connect_timeout(&node(port), REPLY))
        .unwrap()
        .unwrap_or_else(|e| panic!("a TCP connection to node port {port}: {e}"));
    stream.set_read_timeout(Some(REPLY)).unwrap();
    stream
}

/// The address of each ready instance of `app`'s `service` (its port `port_name`).
fn instance_ips(agent: &AgentProcess, app: &str, service: &str, port_name: &str) -> Vec<String> {
    endpoints(agent, app, service, port_name)
        .iter()
        .map(|addr| addr.ip().to_string())
        .collect()
}

/// `miren route set HOST APP` and the first `GET /` through the ingress that is not a 404
/// (the route reaching the ingress).
fn route_and_get(world: &World, agent: &AgentProcess, host: &str, app: &str) -> (u16, String) {
    ok(agent, &["route", "set", host, app]);
    let mut response = (0, String::new());
    wait_until_logging(agent, &format!("route {host} in the ingress"), WAIT, || {
        response = HTTP.get_via_ingress(world, host, "/");
        response.0 != 404
    });
    response
}

fn hello_web(world: &World, agent: &AgentProcess) {
    let instance = instance_ips(agent, "hello-web", "web", "http");
    let (status, body) = route_and_get(world, agent, "hello.example.com", "hello-web");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with(&format!("hello from hello-web at {}:8080", instance[0]))
            && body.contains("host hello.example.com, path /"),
        "{body}"
    );
}

fn udp_echo(world: &World, agent: &AgentProcess) {
    let instances = instance_ips(agent, "udp-echo", "echo", "game");
    assert_eq!(instances.len(), 2, "{instances:?}");
    for i in 0..4 {
        let message = format!("ping {i}");
        let reply = world
            .client
            .run(|| udp_exchange(node(7777), message.as_bytes(), REPLY))
            .unwrap()
            .expect("a UDP echo through node port 7777");
        let reply = String::from_utf8(reply).unwrap();
        let (instance, echoed) = reply.split_once(": ").expect("INSTANCE: MESSAGE");
        assert!(instances.iter().any(|i| i == instance), "{reply}");
        assert_eq!(echoed, message);
    }
}

fn tcp_echo(world: &World, _agent: &AgentProcess) {
    // Several clients at once, their writes interleaved: each gets its own bytes back.
    let mut clients: Vec<TcpStream> = (0..4).map(|_| connect(world, 7000)).collect();
    for round in 0..3 {
        for (i, client) in clients.iter_mut().enumerate() {
            client
                .write_all(format!("client {i} round {round}\n").as_bytes())
                .unwrap();
        }
        for (i, client) in clients.iter_mut().enumerate() {
            let expected = format!("client {i} round {round}\n");
            let mut echoed = vec![0u8; expected.len()];
            client.read_exact(&mut echoed).expect("the echo");
            assert_eq!(String::from_utf8_lossy(&echoed), expected);
        }
    }
}

fn game(world: &World, agent: &AgentProcess) {
    let instances = instance_ips(agent, "game", "server", "game");
    assert_eq!(instances.len(), 2, "{instances:?}");
    let player = world
        .client
        .run(|| UdpSocket::bind((CLIENT_IP, 0)))
        .unwrap()
        .unwrap();
    player.connect(node(27015)).unwrap();
    player.set_read_timeout(Some(REPLY)).unwrap();
    let exchange = |message: &str| {
        player.send(message.as_bytes()).unwrap();
        let mut buf = [0u8; 2048];
        let n = player.recv(&mut buf).expect("a reply on node port 27015");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let welcome = exchange("JOIN tester");
    let instance = welcome
        .strip_prefix("WELCOME tester 1/32 ")
        .unwrap_or_else(|| panic!("{welcome}"));
    assert!(instances.iter().any(|i| i == instance), "{welcome}");
    assert_eq!(exchange("MOVE 3 4"), "AT tester 3 4");
    assert_eq!(exchange("STATE"), "STATE 1/32 tester:3,4");

    // The admin page through its route, from each instance in turn (the ingress takes turns).
    let (status, mut page) = route_and_get(world, agent, "admin.game.example.com", "game");
    let player_line = format!(
        "tester from {CLIENT_IP}:{} at 3,4",
        player.local_addr().unwrap().port()
    );
    let mut seen = Vec::new();
    for _ in 0..10 {
        assert_eq!(status, 200, "{page}");
        let (header, rest) = page.split_once('\n').unwrap_or((&page, ""));
        let at = header
            .strip_prefix("game-server at ")
            .unwrap_or_else(|| panic!("{page}"))
            .to_owned();
        if at == instance {
            assert_eq!(rest, format!("players 1/32\n{player_line}\n"), "{page}");
        } else {
            assert_eq!(rest, "players 0/32\n", "{page}");
        }
        if !seen.contains(&at) {
            seen.push(at);
        }
        if seen.len() == 2 {
            break;
        }
        page = HTTP.get_via_ingress(world, "admin.game.example.com", "/").1;
    }
    assert_eq!(seen.len(), 2, "the admin pages of both instances: {seen:?}");
    assert_eq!(exchange("LEAVE"), "BYE tester");
}

/// A DNS query for `name` (type A, class IN, recursion desired) with id `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        query.push(u8::try_from(label.len()).unwrap());
        query.extend(label.as_bytes());
    }
    query.extend([0, 0, 1, 0, 1]);
    query
}

/// What a DNS response to [`dns_query`] says: its id, whether it is authoritative, its
/// response code and the addresses of its A answers.
fn dns_answer(response: &[u8], query: &[u8]) -> (u16, bool, u8, Vec<Ipv4Addr>) {
    assert!(response.len() >= query.len(), "short response {response:?}");
    let id = u16::from_be_bytes([response[0], response[1]]);
    assert!(response[2] & 0x80 != 0, "not a response: {response:?}");
    assert_eq!(response[4..6], [0, 1], "one question");
    assert_eq!(
        response[12..query.len()],
        query[12..],
        "the question echoed"
    );
    let count = u16::from_be_bytes([response[6], response[7]]);
    let mut at = query.len();
    let mut addresses = Vec::new();
    for _ in 0..count {
        // The name: a pointer (2 bytes) or labels ending in a zero.
        if response[at] & 0xC0 == 0xC0 {
            at += 2;
        } else {
            while response[at] != 0 {
                at += 1 + usize::from(response[at]);
            }
            at += 1;
        }
        let field = |i: usize| u16::from_be_bytes([response[at + i], response[at + i + 1]]);
        let (kind, class, len) = (field(0), field(2), usize::from(field(8)));
        if (kind, class, len) == (1, 1, 4) {
            let data: [u8; 4] = response[at + 10..at + 14].try_into().unwrap();
            addresses.push(Ipv4Addr::from(data));
        }
        at += 10 + len;
    }
    (id, response[2] & 0x04 != 0, response[3] & 0x0F, addresses)
}

/// One query over UDP to node port 53.
fn dns_over_udp(world: &World, id: u16, name: &str) -> (u16, bool, u8, Vec<Ipv4Addr>) {
    let query = dns_query(id, name);
    let response = world
        .client
        .run(|| udp_exchange(node(53), &query, REPLY))
        .unwrap()
        .unwrap_or_else(|| panic!("no DNS answer over UDP for {name}"));
    dns_answer(&response, &query)
}

/// Queries over one TCP connection to node port 53 (each with its 2-byte length).
fn dns_over_tcp(world: &World, queries: &[(u16, &str)]) -> Vec<(u16, bool, u8, Vec<Ipv4Addr>)> {
    let mut stream = connect(world, 53);
    queries
        .iter()
        .map(|(id, name)| {
            let query = dns_query(*id, name);
            let len = u16::try_from(query.len()).unwrap();
            stream.write_all(&len.to_be_bytes()).unwrap();
            stream.write_all(&query).unwrap();
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).expect("a DNS answer over TCP");
            let mut response = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut response).unwrap();
            dns_answer(&response, &query)
        })
        .collect()
}

fn dns(world: &World, _agent: &AgentProcess) {
    const NXDOMAIN: u8 = 3;
    const REFUSED: u8 = 5;
    let www = vec![Ipv4Addr::new(192, 0, 2, 1)];
    let irc = vec![Ipv4Addr::new(192, 0, 2, 20)];
    // Each query on a fresh socket: the flows spread over both instances.
    for id in 1..=4 {
        assert_eq!(
            dns_over_udp(world, id, "www.example.com"),
            (id, true, 0, www.clone())
        );
    }
    assert_eq!(
        dns_over_udp(world, 5, "Nope.Example.COM"),
        (5, true, NXDOMAIN, vec![])
    );
    assert_eq!(
        dns_over_udp(world, 6, "example.org"),
        (6, false, REFUSED, vec![])
    );
    assert_eq!(
        dns_over_tcp(
            world,
            &[
                (7, "irc.example.com"),
                (8, "nope.example.com"),
                (9, "www.example.com")
            ]
        ),
        vec![
            (7, true, 0, irc),
            (8, true, NXDOMAIN, vec![]),
            (9, true, 0, www)
        ]
    );
}

/// One IRC connection: lines are read until one matches what a step waits for.
struct Irc<S: Read + Write> {
    name: String,
    stream: BufReader<S>,
}

impl<S: Read + Write> Irc<S> {
    fn send(&mut self, line: &str) {
        let stream = self.stream.get_mut();
        stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        stream.flush().unwrap();
    }

    /// Reads lines until one is `expected`; panics with the lines read when the connection
    /// closes or stays silent for the read timeout.
    fn expect(&mut self, expected: &str) {
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            match self.stream.read_line(&mut line) {
                Ok(n) if n > 0 => {}
                result => panic!(
                    "{}: no {expected:?} ({result:?}); lines read: {seen:#?}",
                    self.name
                ),
            }
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            if line == expected {
                return;
            }
            seen.push(line);
        }
    }

    /// NICK and USER, then the welcome.
    fn register(&mut self, nick: &str) {
        self.send(&format!("NICK {nick}"));
        self.send(&format!("USER {nick} 0 * :Test {nick}"));
        self.expect(&format!(
            ":irc.example.com 001 {nick} :Welcome to the Internet Relay Network {nick}!{nick}@{CLIENT_IP}"
        ));
    }
}

/// Two users register, join a channel and talk in it; PING gets PONG; QUIT is seen by the
/// other.
fn irc_conversation<S: Read + Write>(mut a: Irc<S>, mut b: Irc<S>, channel: &str) {
    let (na, nb) = (a.name.clone(), b.name.clone());
    a.register(&na);
    b.register(&nb);
    a.send(&format!("JOIN {channel}"));
    a.expect(&format!(":{na}!{na}@{CLIENT_IP} JOIN {channel}"));
    b.send(&format!("JOIN {channel}"));
    b.expect(&format!(":irc.example.com 353 {nb} = {channel} :{na} {nb}"));
    a.expect(&format!(":{nb}!{nb}@{CLIENT_IP} JOIN {channel}"));
    a.send(&format!("PRIVMSG {channel} :hello from {na}"));
    b.expect(&format!(
        ":{na}!{na}@{CLIENT_IP} PRIVMSG {channel} :hello from {na}"
    ));
    b.send(&format!("PRIVMSG {channel} :hi {na}, {nb} here"));
    a.expect(&format!(
        ":{nb}!{nb}@{CLIENT_IP} PRIVMSG {channel} :hi {na}, {nb} here"
    ));
    b.send("PING :are-you-there");
    b.expect(":irc.example.com PONG irc.example.com :are-you-there");
    b.send("QUIT :done");
    b.expect("ERROR :Closing link (Quit: done)");
    a.expect(&format!(":{nb}!{nb}@{CLIENT_IP} QUIT :Quit: done"));
}

fn irc(world: &World, _agent: &AgentProcess) {
    let plain = |name: &str| Irc {
        name: name.to_owned(),
        stream: BufReader::new(connect(world, 6667)),
    };
    irc_conversation(plain("alice"), plain("bob"), "#plain");

    // TLS: the certificate the server made for itself at start, then the same conversation.
    let leaf = world
        .client
        .run(|| tls::served_leaf(node(6697), "irc.example.com"))
        .unwrap()
        .expect("a TLS handshake on node port 6697");
    assert_eq!(leaf.dns_names, ["irc.example.com"], "{leaf:?}");
    assert_eq!(leaf.issuer, "CN=irc.example.com", "self-signed: {leaf:?}");
    let secure = |name: &str| {
        let stream = world
            .client
            .run(|| tls::connect(node(6697), "irc.example.com"))
            .unwrap()
            .expect("a TLS connection to node port 6697");
        Irc {
            name: name.to_owned(),
            stream: BufReader::new(stream),
        }
    };
    irc_conversation(secure("carol"), secure("dave"), "#tls");
}
