//! Data plane hygiene with the real agent: a stale XDP data plane pinned under another
//! `--bpf-pin-dir` is detached at start (whichever plane the new agent runs), foreign programs
//! are left alone and named in the status, with the default pin directory on a node whose
//! `/sys/fs/bpf` is no bpffs, `auto` mounts one and chooses XDP, and an agent restarted over an
//! earlier version's pins creates and pins the maps added since.
//!
//! The bpffs test runs the agent in a private mount namespace made for it (`unshare --mount
//! --propagation private`), so nothing is ever mounted in the host's mount namespace.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use miren_agent::{
    api::types::Status,
    bpf::{
        PacketCounter,
        attached::{self, AttachedProgram, Hook},
    },
};
use miren_tests::{
    process::{AgentProcess, BpfPinDir, binary},
    world::{NODE_IP, Plane, World, agent_command, wait_for_status_ok},
};

/// The node-port programs' names (miren_common::nodeport).
const XDP_PROGRAM: &str = "miren_nodeport";
const TC_PROGRAM: &str = "miren_reply";

fn status(agent: &AgentProcess) -> Status {
    let out = agent.miren(&["status", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The XDP and TCX programs on the node's eth0, read from the kernel inside its namespace.
fn programs_on_eth0(world: &World) -> Vec<AttachedProgram> {
    world
        .node
        .run(|| attached::attached(attached::ifindex("eth0")?))
        .unwrap()
        .expect("read the programs attached to eth0")
}

/// The node port answers and sandbox `sandbox` served the flow.
fn assert_served_by(world: &World, sandbox: usize) {
    let (client, from) = world.udp_echo(b"hello");
    assert_eq!(
        from,
        format!("{NODE_IP}:7000").parse::<SocketAddr>().unwrap()
    );
    assert_eq!(world.served_by(client), Some(sandbox), "flow from {client}");
}

/// Starts the agent (no sandboxes of its own) with `--bpf-pin-dir pins`.
fn start_agent_pinned_at(world: &World, dataplane: &str, pins: &Path) -> AgentProcess {
    let mut command = agent_command(&world.node, world.dir(), pins, dataplane);
    command.arg("--no-sandboxes");
    AgentProcess::start(
        command,
        &world.dir().join("agent.sock"),
        &world.dir().join("agent.log"),
    )
}

/// An XDP agent is killed with kill -9 (its links stay pinned under its pin directory, its
/// programs keep forwarding to sandbox 0); a new agent with another pin directory and `plane`
/// must detach them, so traffic follows the new agent's endpoints (sandbox 1).
fn restart_with_another_pin_dir(plane: Plane) {
    let world = World::new(2);
    let old_pins = BpfPinDir::new("old");
    let agent = start_agent_pinned_at(&world, "xdp", old_pins.path());
    world.deploy(&agent);
    assert_served_by(&world, 0);
    let old: Vec<u32> = programs_on_eth0(&world).iter().map(|p| p.prog_id).collect();
    assert_eq!(old.len(), 2, "XDP and TC programs: {old:?}");
    agent.kill9();
    assert_eq!(
        programs_on_eth0(&world).len(),
        2,
        "pinned links outlive the agent"
    );

    let new_pins = BpfPinDir::new("new");
    let agent = start_agent_pinned_at(&world, plane.flag(), new_pins.path());
    wait_for_status_ok(&agent);
    // Only the new data plane knows this change: a stale one keeps sending to sandbox 0.
    world.set_endpoints(&agent, &[1]);
    assert_served_by(&world, 1);

    let now = programs_on_eth0(&world);
    assert!(
        now.iter().all(|p| !old.contains(&p.prog_id)),
        "stale programs {old:?} still attached: {now:?}"
    );
    let mut names: Vec<(Hook, &str)> = now.iter().map(|p| (p.hook, p.name.as_str())).collect();
    names.sort();
    let expected = match plane {
        Plane::Xdp => vec![(Hook::Xdp, XDP_PROGRAM), (Hook::TcxEgress, TC_PROGRAM)],
        Plane::Nft => vec![],
    };
    assert_eq!(names, expected, "{}", agent.log_text());
    let link = world
        .node
        .ip(&["-d", "link", "show", "dev", "eth0"])
        .unwrap();
    assert_eq!(link.contains("prog/xdp"), plane == Plane::Xdp, "{link}");

    let status = status(&agent);
    assert_eq!(status.dataplane.mode, plane.flag(), "{status:?}");
    let old_pin = old_pins.path().join("links/xdp-eth0");
    for expected in [
        format!("detached stale {}", XDP_PROGRAM),
        format!("pinned at {}", old_pin.display()),
        format!("detached stale {}", TC_PROGRAM),
    ] {
        assert!(
            status.dataplane.reason.contains(&expected),
            "the status should say {expected:?}: {}",
            status.dataplane.reason
        );
    }
    assert!(!old_pin.exists(), "the stale link's pin is removed");
    assert!(
        agent
            .log_text()
            .contains("detached a stale miren program this agent does not own"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_stale_xdp_plane_from_another_pin_dir_is_detached_for_xdp() {
    restart_with_another_pin_dir(Plane::Xdp);
}

#[test]
fn a_stale_xdp_plane_from_another_pin_dir_is_detached_for_nft() {
    restart_with_another_pin_dir(Plane::Nft);
}

#[test]
fn a_restart_with_the_same_pin_dir_adopts_instead_of_detaching() {
    let world = World::new(1);
    let agent = world.start_agent(Plane::Xdp);
    world.deploy(&agent);
    assert_served_by(&world, 0);
    agent.kill9();
    let agent = world.start_agent(Plane::Xdp);
    wait_for_status_ok(&agent);
    assert_served_by(&world, 0);
    let status = status(&agent);
    assert!(
        status.dataplane.reason.contains("adopted pinned XDP link")
            && !status.dataplane.reason.contains("detached"),
        "{}",
        status.dataplane.reason
    );
}

/// The maps added after the first pinned releases (IPv6 port stats, fragment tracking, IPv6
/// backend addresses), as an upgraded agent finds them missing from its pin directory.
const NEWER_MAPS: [&str; 4] = [
    "MIREN_PORT_STATS6",
    "MIREN_FRAGS",
    "MIREN_FRAGS6",
    "MIREN_BACKEND_ADDRS6",
];

/// `miren_nodeport_rx_packets_total` of the UDP node port's IPv6 packets.
fn ipv6_udp_rx(world: &World) -> u64 {
    let metrics = world.scrape_metrics();
    metrics
        .lines()
        .find(|line| {
            line.starts_with("miren_nodeport_rx_packets_total{")
                && line.contains("family=\"ipv6\"")
                && line.contains("protocol=\"udp\"")
        })
        .and_then(|line| line.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no IPv6 UDP rx series in\n{metrics}"))
        .parse()
        .unwrap()
}

/// An agent restarted over the pins of an earlier version, which lack the maps added since,
/// adopts what is pinned, creates and pins the missing maps, and counts with them.
#[test]
fn a_restart_over_pins_lacking_newer_maps_pins_and_uses_them() {
    let world = World::new_dual_stack(1);
    let agent = world.start_agent(Plane::Xdp);
    world.deploy(&agent);
    world.udp_echo6(b"before the restart");
    agent.kill9();
    let maps = world.pin_dir().join("maps");
    for name in NEWER_MAPS {
        std::fs::remove_file(maps.join(name)).unwrap_or_else(|e| panic!("unpinning {name}: {e}"));
    }
    let agent = world.start_agent(Plane::Xdp);
    wait_for_status_ok(&agent);
    for name in NEWER_MAPS {
        assert!(maps.join(name).exists(), "{name} pinned again");
    }
    assert!(
        status(&agent)
            .dataplane
            .reason
            .contains("adopted pinned XDP link")
    );
    let before = ipv6_udp_rx(&world);
    for k in 0..5 {
        world.udp_echo6(format!("after the restart {k}").as_bytes());
    }
    assert_eq!(ipv6_udp_rx(&world) - before, 5, "{}", agent.log_text());
}

#[test]
fn a_foreign_xdp_program_is_left_alone_and_named() {
    let world = World::new(1);
    let mut foreign = PacketCounter::load().expect("load the foreign XDP program");
    world
        .node
        .run(|| foreign.attach("eth0", XdpMode::Driver))
        .unwrap()
        .expect("attach the foreign XDP program");

    let agent = world.start_agent_with("auto");
    world.deploy(&agent);
    assert_served_by(&world, 0);
    let status = status(&agent);
    assert_eq!(status.dataplane.mode, "nft", "{status:?}");
    let expected = "eth0 already runs the XDP program \"miren_count\"";
    assert!(
        status.dataplane.reason.contains(expected)
            && status.dataplane.reason.contains("not miren's"),
        "{}",
        status.dataplane.reason
    );
    let now = programs_on_eth0(&world);
    assert_eq!(
        now.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["miren_count"],
        "{now:?}"
    );
    assert!(foreign.counts().unwrap().packets > 0);
}

/// The mount namespace of the calling process.
fn mount_ns(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn auto_mounts_a_bpffs_for_the_default_pin_dir_and_chooses_xdp() {
    let world = World::new(1);
    let host_ns = mount_ns("self");
    let host_bpf = nix::sys::statfs::statfs("/sys/fs/bpf")
        .map(|fs| fs.filesystem_type().0)
        .ok();
    // A private mount namespace for the agent alone: a tmpfs over /sys/fs/bpf there makes it
    // "no bpffs"; the script refuses to go on unless it really runs in a namespace of its own.
    let script = format!(
        r#"[ "$(readlink /proc/self/ns/mnt)" != "{host_ns}" ] || {{ echo "not in a private mount namespace" >&2; exit 97; }}
mount -t tmpfs -o size=1m,mode=0700 tmpfs /sys/fs/bpf && exec "$@""#
    );
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(script)
        .arg("sh")
        .arg("nsenter")
        .arg(format!("--net={}", world.node.path().display()))
        .arg("--")
        .arg(binary("miren-agent"))
        .args(["run", "--iface", "eth0", "--node-ip", NODE_IP])
        .args(["--dataplane", "auto", "--no-sandboxes"])
        .arg("--state-dir")
        .arg(world.dir().join("state"))
        .arg("--api-socket")
        .arg(world.dir().join("agent.sock"));
    let mut agent = AgentProcess::start(
        command,
        &world.dir().join("agent.sock"),
        &world.dir().join("agent.log"),
    );
    assert_ne!(mount_ns(&agent.pid().to_string()), host_ns);

    world.deploy(&agent);
    assert_served_by(&world, 0);
    let status = status(&agent);
    assert_eq!(status.dataplane.mode, "xdp", "{status:?}");
    assert!(
        status
            .dataplane
            .reason
            .contains("mounted a bpffs at /sys/fs/bpf"),
        "{}",
        status.dataplane.reason
    );
    let log = agent.log_text();
    assert!(
        log.contains("the agent runs in a mount namespace of its own"),
        "{log}"
    );
    // The agent's pins live in its namespace's bpffs; the host's /sys/fs/bpf is untouched.
    let pinned = Command::new("nsenter")
        .arg(format!("--mount=/proc/{}/ns/mnt", agent.pid()))
        .args(["--", "ls", "/sys/fs/bpf/miren/links"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&pinned.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["tc-eth0", "xdp-eth0"],
        "{pinned:?}"
    );
    assert_eq!(
        nix::sys::statfs::statfs("/sys/fs/bpf")
            .map(|fs| fs.filesystem_type().0)
            .ok(),
        host_bpf
    );

    // Ending the agent ends its mount namespace and with it the bpffs and its pinned links:
    // nothing of the agent's stays on eth0 (World's drop then deletes the namespace).
    assert!(agent.terminate(Duration::from_secs(15)).is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !programs_on_eth0(&world).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(programs_on_eth0(&world), []);
}

#[test]
fn a_pin_dir_that_is_not_on_a_bpffs_is_refused_with_what_to_do() {
    let world = World::new(1);
    let pins = world.dir().join("pins");
    let agent = start_agent_pinned_at(&world, "auto", &pins);
    world.deploy(&agent);
    assert_served_by(&world, 0);
    let status = status(&agent);
    assert_eq!(status.dataplane.mode, "nft", "{status:?}");
    for expected in [
        format!("{} cannot hold pinned eBPF objects", pins.display()),
        "is not on a bpf filesystem".to_owned(),
        "mount a bpffs there (`mount -t bpf bpf DIR`) or pass a --bpf-pin-dir under /sys/fs/bpf"
            .to_owned(),
    ] {
        assert!(
            status.dataplane.reason.contains(&expected),
            "the status should say {expected:?}: {}",
            status.dataplane.reason
        );
    }
    assert!(!pins.exists(), "nothing is created outside a bpffs");
}
