//! `cargo xtask demo`: builds a client and a node namespace joined by a veth pair, attaches the
//! packet counter XDP program natively to the node's end, runs a UDP echo server in the node
//! namespace, sends real traffic from the client and prints the kernel's counters.
//! Everything it creates is removed on exit (also on Ctrl-C).

use std::{net::UdpSocket, time::Duration};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use miren_agent::bpf::PacketCounter;
use miren_tests::topology::{Netns, veth};

const NODE_IP: &str = "10.99.0.2";
const CLIENT_IP: &str = "10.99.0.1";
const ECHO_PORT: u16 = 7000;

fn main() -> Result<()> {
    let once = std::env::args().any(|arg| arg == "--once");
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let _ = stop_tx.send(());
    });

    let client = Netns::new("demo-client")?;
    let node = Netns::new("demo-node")?;
    veth(&client, "eth0", &node, "eth0")?;
    client.addr("eth0", &format!("{CLIENT_IP}/24"))?;
    node.addr("eth0", &format!("{NODE_IP}/24"))?;
    println!(
        "created namespaces {} and {} joined by a veth pair",
        client.name(),
        node.name()
    );

    let mut counter = PacketCounter::load().context("loading the eBPF object")?;
    node.run(|| counter.attach("eth0", XdpMode::Driver))?
        .context("native XDP attach")?;
    println!(
        "$ ip -n {} link show dev eth0   # \"xdp\" = native (driver) mode",
        node.name()
    );
    print!("{}", node.ip(&["link", "show", "dev", "eth0"])?);

    let server = node.run(|| UdpSocket::bind((NODE_IP, ECHO_PORT)))??;
    std::thread::spawn(move || echo(&server));
    let socket = client.run(|| UdpSocket::bind((CLIENT_IP, 0)))??;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;

    let mut sent = 0u32;
    let mut round_trip = |socket: &UdpSocket| -> Result<()> {
        sent += 1;
        let message = format!("ping {sent}");
        socket.send_to(message.as_bytes(), (NODE_IP, ECHO_PORT))?;
        let mut buf = [0u8; 64];
        let (len, from) = socket.recv_from(&mut buf).context("no echo")?;
        let counts = counter.counts()?;
        println!(
            "{CLIENT_IP} -> {NODE_IP}:{ECHO_PORT} {message:?}, echo {:?} from {from}; XDP counted {} packets, {} bytes",
            String::from_utf8_lossy(&buf[..len]),
            counts.packets,
            counts.bytes
        );
        Ok(())
    };
    for _ in 0..5 {
        round_trip(&socket)?;
    }
    if !once {
        println!("sending one packet per second; Ctrl-C to stop and clean up");
        while stop_rx.recv_timeout(Duration::from_secs(1)).is_err() {
            round_trip(&socket)?;
        }
    }
    println!("removing namespaces");
    Ok(())
}

fn echo(socket: &UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((len, from)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(&buf[..len], from);
    }
}
