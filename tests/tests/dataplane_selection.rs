//! Data plane selection with the real agent: `--dataplane auto` falls back to nftables when
//! the kernel refuses XDP, and starting one data plane removes the other one's leftovers.

use aya::programs::XdpMode;
use miren_agent::{api::types::Status, bpf::PacketCounter};
use miren_tests::{
    process::AgentProcess,
    world::{NODE_IP, Plane, World, wait_for_status_ok},
};

fn status(agent: &AgentProcess) -> Status {
    let out = agent.miren(&["status", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn has_xdp(world: &World) -> bool {
    world
        .node
        .ip(&["link", "show", "dev", "eth0"])
        .unwrap()
        .contains("xdp")
}

fn has_nft_table(world: &World) -> bool {
    world
        .node
        .command("nft")
        .args(["list", "table", "inet", "miren"])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn auto_falls_back_to_nft_when_the_kernel_refuses_xdp() {
    let world = World::new(1);
    // Another program already owns XDP on the node's interface: the kernel refuses a second
    // one in native mode (busy) and in generic mode (native and generic cannot be mixed).
    let mut foreign = PacketCounter::load().expect("load the foreign XDP program");
    world
        .node
        .run(|| foreign.attach("eth0", XdpMode::Driver))
        .unwrap()
        .expect("attach the foreign XDP program");

    let agent = world.start_agent_with("auto");
    world.deploy(&agent);
    assert_eq!(
        world.udp_echo(b"hello").1.to_string(),
        format!("{NODE_IP}:7000")
    );

    let status = status(&agent);
    assert_eq!(status.dataplane.mode, "nft", "{status:?}");
    for expected in ["XDP refused", "native mode:", "generic mode:"] {
        assert!(
            status.dataplane.reason.contains(expected),
            "reason should say why XDP was refused: {}",
            status.dataplane.reason
        );
    }
    let log = agent.log_text();
    assert!(log.contains("XDP in native mode refused"), "{log}");
    assert!(log.contains("XDP in generic mode refused"), "{log}");
    // The foreign program is untouched and still sees the traffic.
    assert!(has_xdp(&world));
    assert!(foreign.counts().unwrap().packets > 0);
}

#[test]
fn starting_one_data_plane_removes_the_other_ones_leftovers() {
    let world = World::new(1);
    let agent = world.start_agent(Plane::Xdp);
    world.deploy(&agent);
    assert_eq!(
        world.udp_echo(b"hello").1.to_string(),
        format!("{NODE_IP}:7000")
    );
    assert!(has_xdp(&world) && !has_nft_table(&world));
    // Killed without cleanup: XDP stays attached through its pinned links.
    agent.kill9();
    assert!(has_xdp(&world), "pinned XDP links outlive the agent");

    let agent = world.start_agent(Plane::Nft);
    wait_for_status_ok(&agent);
    assert_eq!(
        world.udp_echo(b"hello").1.to_string(),
        format!("{NODE_IP}:7000")
    );
    assert!(
        !has_xdp(&world) && has_nft_table(&world),
        "{}",
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains("removed the pinned objects of an earlier XDP data plane")
    );
    agent.kill9();
    assert!(has_nft_table(&world), "the nft table outlives the agent");

    let agent = world.start_agent(Plane::Xdp);
    wait_for_status_ok(&agent);
    assert_eq!(
        world.udp_echo(b"hello").1.to_string(),
        format!("{NODE_IP}:7000")
    );
    assert!(
        has_xdp(&world) && !has_nft_table(&world),
        "{}",
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains("removed the nft table of an earlier nftables data plane")
    );
}
