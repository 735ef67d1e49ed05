//! A lost instance's unanswered connection attempts do not capture a client's retry: a client's
//! SYN through NODE_IP:node_port reaches an instance that no longer answers (its address gone
//! from its namespace), the instance is removed from the endpoints, and a new connection from
//! the SAME client port must reach a live instance — the data plane must not keep the
//! unreplied flow on the removed backend (on nftables the kernel's conntrack entry in SYN_SENT
//! would otherwise be reused for up to 120 s). An established connection to a removed
//! (draining) instance keeps working meanwhile. Runs on both planes.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use miren_tests::{
    on_both_planes,
    process::AgentProcess,
    world::{NODE_IP, Plane, World, sandbox_ip, tcp_connect_from},
};

on_both_planes!(a_retry_from_the_same_port_reaches_a_live_instance_after_the_lost_one_is_removed);

/// How long the attempt towards the lost instance waits (it gets no answer).
const LOST_WAIT: Duration = Duration::from_secs(3);
/// How long a connection that must succeed may take (generous: shared machine).
const TIMEOUT: Duration = Duration::from_secs(15);

/// Writes `message` on `stream` and reads back its echo.
fn echo(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(message)?;
    let mut buf = vec![0u8; message.len()];
    stream.read_exact(&mut buf)?;
    assert_eq!(buf, message);
    Ok(())
}

/// The kernel's TCP conntrack entries towards node port 7000 in the node namespace (for the
/// failure message; on XDP they are not the data plane's).
fn tcp_conntrack(world: &World) -> String {
    world
        .node
        .command("conntrack")
        .args(["-L", "-p", "tcp", "--orig-port-dst", "7000"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

fn a_retry_from_the_same_port_reaches_a_live_instance_after_the_lost_one_is_removed(plane: Plane) {
    let world = World::new(3);
    let agent: AgentProcess = world.start_agent(plane);
    world.deploy(&agent);
    let node_port: SocketAddr = format!("{NODE_IP}:7000").parse().unwrap();

    // An established connection to instance 2, which is removed later (draining).
    world.set_endpoints(&agent, &[2]);
    let mut draining = world
        .client
        .run(|| TcpStream::connect_timeout(&node_port, TIMEOUT))
        .unwrap()
        .expect("connection to instance 2");
    world
        .client
        .run(|| echo(&mut draining, b"before"))
        .unwrap()
        .unwrap();
    assert_eq!(
        world.served_by(draining.local_addr().unwrap()),
        Some(2),
        "one endpoint"
    );

    // Instance 0 is lost: its address is gone from its namespace, so nothing answers there.
    // It becomes the only endpoint (instance 2 is removed; its connection is established).
    let cidr = format!("{}/24", sandbox_ip(0));
    world
        .sandbox(0)
        .ip(&["addr", "del", &cidr, "dev", "eth0"])
        .unwrap();
    world.set_endpoints(&agent, &[0]);
    let client_ip = world.client_ip();
    let client_port = world
        .client
        .run(|| {
            let local = SocketAddr::new(client_ip, 0);
            // Bind first to learn the port (the attempt below gets no answer).
            let probe = std::net::TcpListener::bind(local).unwrap();
            let port = probe.local_addr().unwrap().port();
            drop(probe);
            let local = SocketAddr::new(client_ip, port);
            let err = tcp_connect_from(local, node_port, LOST_WAIT)
                .expect_err("the lost instance answered");
            assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
            local
        })
        .unwrap();
    let unreplied = tcp_conntrack(&world);

    // The lost instance is removed; instance 1 is the only endpoint. A retry from the same
    // client port must reach it.
    world.set_endpoints(&agent, &[1]);
    let retry = world
        .client
        .run(|| {
            let mut stream = tcp_connect_from(client_port, node_port, TIMEOUT)?;
            echo(&mut stream, b"retry")?;
            Ok::<_, std::io::Error>(stream)
        })
        .unwrap();
    let retry = retry.unwrap_or_else(|err| {
        panic!(
            "{plane:?}: a retry from {client_port} after the lost instance was removed failed: \
             {err}\nconntrack (node) before the removal:\n{unreplied}\nafter:\n{}\n{}",
            tcp_conntrack(&world),
            agent.log_text()
        )
    });
    assert_eq!(world.served_by(client_port), Some(1), "the live instance");
    drop(retry);

    // The draining connection to removed instance 2 still works.
    world
        .client
        .run(|| echo(&mut draining, b"still there"))
        .unwrap()
        .expect("the established connection to the removed instance continues");
}
