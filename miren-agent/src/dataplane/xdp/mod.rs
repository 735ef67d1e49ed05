//! [`XdpDataplane`]: node ports in eBPF. The XDP program `miren_nodeport` DNATs node-port
//! traffic on the external interfaces; the TC egress program `miren_reply` reverse-NATs the
//! replies. Userspace owns id allocation and the Maglev tables: a service's new table is
//! written into the inactive generation, then the service entry flips to it in one map update,
//! so a packet never sees a half-written table.
//!
//! This file loads, pins and attaches the programs; [`maps`] is the one typed interface to
//! the maps (and the only place that names them), [`apply`] applies snapshots and reads
//! counters over it, and `fake` is its in-memory stand-in for unit tests.

mod apply;
#[cfg(test)]
mod fake;
mod maps;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use miren_common::nodeport::{self as np, Config};

use self::{apply::NodePorts, maps::KernelMaps};
use super::{Counters, Dataplane, DataplaneError, Snapshot, pins};
use crate::bpf::{BpfError, load_object_pinned, load_xdp, xdp, xdp_mut};

/// Default idle timeout of UDP sessions.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a TCP flow that saw FIN keeps its backend without packets.
pub const TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);

/// How the XDP program came to be attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode.
    Native,
    /// Generic (skb) mode, because the driver refused native mode.
    Generic,
    /// A link pinned by an earlier agent was taken over (its mode is kept).
    Adopted,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native XDP",
            Self::Generic => "generic XDP",
            Self::Adopted => "adopted pinned XDP link",
        })
    }
}

/// The eBPF/XDP node-port data plane.
#[derive(Debug)]
pub struct XdpDataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    ports: NodePorts<KernelMaps>,
}

/// Removes the objects an earlier XDP data plane pinned under `pin_dir` (its links, which
/// detaches the programs, and its maps); true if there were any.
///
/// # Errors
/// [`DataplaneError::Io`] when a pin cannot be removed.
pub fn remove_pins(pin_dir: &Path) -> Result<bool, DataplaneError> {
    pins::remove_all(pin_dir)
}

impl XdpDataplane {
    /// Loads the programs and fresh maps (not attached yet), with the default UDP idle timeout.
    ///
    /// # Errors
    /// [`DataplaneError::Bpf`] when the kernel refuses the programs.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(None)
    }

    /// Loads the programs with their maps pinned under `pin_dir` (a bpffs directory). Maps
    /// pinned by an earlier agent are adopted with their contents (conntrack, tables,
    /// counters), and [`XdpDataplane::attach`] takes over pinned links, so forwarding never
    /// stops across a restart.
    ///
    /// # Errors
    /// [`DataplaneError::PinDir`] if `pin_dir` is not on a bpffs (under `/sys/fs/bpf`, one is
    /// mounted there first when none is); [`DataplaneError::Bpf`] when the kernel refuses the
    /// programs or pinned maps do not match.
    pub fn load_pinned(pin_dir: &Path) -> Result<Self, DataplaneError> {
        pins::prepare(pin_dir)?;
        Self::load_with(Some(pin_dir.to_owned()))
    }

    fn load_with(pin_dir: Option<PathBuf>) -> Result<Self, DataplaneError> {
        let map_pins = pin_dir.as_deref().map(pins::map_paths).unwrap_or_default();
        let mut ebpf = load_object_pinned(&map_pins)?;
        load_xdp(&mut ebpf, np::XDP_PROGRAM)?;
        classifier_mut(&mut ebpf)?
            .load()
            .map_err(|source| BpfError::Program {
                op: format!("loading {}", np::TC_PROGRAM),
                source,
            })?;
        let maps = KernelMaps::take(&mut ebpf)?;
        let config = Config {
            udp_timeout_ns: DEFAULT_UDP_TIMEOUT.as_nanos() as u64,
            tcp_closing_timeout_ns: TCP_CLOSING_TIMEOUT.as_nanos() as u64,
            fake_now_ns: 0,
        };
        Ok(Self {
            ebpf,
            pin_dir,
            ports: NodePorts::open(maps, config)?,
        })
    }

    /// Attaches XDP (in generic mode if `generic`, else native) and the TC egress program to
    /// `iface` in the calling thread's network namespace. With a pin
    /// directory, links are pinned, and links pinned by an earlier agent are taken over
    /// atomically (the new programs replace the old ones without a gap).
    ///
    /// # Errors
    /// [`DataplaneError::Bpf`] when attaching fails.
    pub fn attach(&mut self, iface: &str, generic: bool) -> Result<AttachMode, DataplaneError> {
        let pins = self
            .pin_dir
            .as_deref()
            .map(|dir| pins::link_paths(dir, iface));
        if let Some((xdp_pin, tc_pin)) = &pins
            && xdp_pin.exists()
            && tc_pin.exists()
        {
            match self.adopt_links(xdp_pin, tc_pin) {
                Ok(()) => return Ok(AttachMode::Adopted),
                Err(err) => {
                    tracing::warn!(%iface, error = %err, "pinned links are stale; attaching afresh");
                    let _ = std::fs::remove_file(xdp_pin);
                    let _ = std::fs::remove_file(tc_pin);
                }
            }
        }
        let program_err = |op: String| move |source| BpfError::Program { op, source };
        let attach = |ebpf: &mut Ebpf, mode| {
            xdp_mut(ebpf, np::XDP_PROGRAM)?
                .attach(iface, mode)
                .map_err(program_err(format!(
                    "attaching {} to {iface} in {mode:?} mode",
                    np::XDP_PROGRAM
                )))
        };
        let (mode, xdp_mode) = if generic {
            (AttachMode::Generic, XdpMode::Skb)
        } else {
            (AttachMode::Native, XdpMode::Driver)
        };
        let xdp_link = attach(&mut self.ebpf, xdp_mode)?;
        let tc_link = classifier_mut(&mut self.ebpf)?
            .attach(iface, TcAttachType::Egress)
            .map_err(program_err(format!(
                "attaching {} to {iface} egress",
                np::TC_PROGRAM
            )))?;
        if let Some((xdp_pin, tc_pin)) = pins {
            let xdp = xdp_mut(&mut self.ebpf, np::XDP_PROGRAM)?
                .take_link(xdp_link)
                .map_err(program_err(format!("taking the XDP link of {iface}")))?;
            pins::pin_link(FdLink::try_from(xdp), &xdp_pin)?;
            let tc = classifier_mut(&mut self.ebpf)?
                .take_link(tc_link)
                .map_err(program_err(format!("taking the TC link of {iface}")))?;
            pins::pin_link(FdLink::try_from(tc), &tc_pin)?;
        }
        Ok(mode)
    }

    /// Points links pinned by an earlier agent at this agent's programs.
    fn adopt_links(&mut self, xdp_pin: &Path, tc_pin: &Path) -> Result<(), DataplaneError> {
        let program_err = |op: &str| {
            let op = op.to_owned();
            move |source| DataplaneError::Bpf(BpfError::Program { op, source })
        };
        let xdp_link =
            XdpLink::try_from(pins::open_link(xdp_pin)?).map_err(pins::link_err(xdp_pin))?;
        let program = xdp_mut(&mut self.ebpf, np::XDP_PROGRAM)?;
        let id = program
            .attach_to_link(xdp_link)
            .map_err(program_err("replacing the pinned XDP program"))?;
        drop(
            program
                .take_link(id)
                .map_err(program_err("releasing the XDP link"))?,
        );
        let tc_link = SchedClassifierLink::try_from(pins::open_link(tc_pin)?)
            .map_err(pins::link_err(tc_pin))?;
        let program = classifier_mut(&mut self.ebpf)?;
        let id = program
            .attach_to_link(tc_link)
            .map_err(program_err("replacing the pinned TC program"))?;
        drop(
            program
                .take_link(id)
                .map_err(program_err("releasing the TC link"))?,
        );
        Ok(())
    }

    /// The XDP program (for `BPF_PROG_TEST_RUN`).
    ///
    /// # Errors
    /// [`BpfError::Missing`] if the object lacks it.
    pub fn xdp_program(&self) -> Result<&Xdp, BpfError> {
        xdp(&self.ebpf, np::XDP_PROGRAM)
    }

    /// The TC program (for `BPF_PROG_TEST_RUN`).
    ///
    /// # Errors
    /// [`BpfError::Missing`] if the object lacks it.
    pub fn tc_program(&self) -> Result<&SchedClassifier, BpfError> {
        let missing = BpfError::Missing {
            kind: "program",
            name: np::TC_PROGRAM,
        };
        self.ebpf
            .program(np::TC_PROGRAM)
            .ok_or(missing)?
            .try_into()
            .map_err(not_classifier)
    }

    /// Sets the UDP idle timeout.
    ///
    /// # Errors
    /// When the config map cannot be written.
    pub fn set_udp_timeout(&mut self, timeout: Duration) -> Result<(), DataplaneError> {
        self.ports
            .configure(|config| config.udp_timeout_ns = timeout.as_nanos() as u64)
    }

    /// Replaces the data plane's clock with a fixed time (tests); `None` restores the kernel
    /// clock.
    ///
    /// # Errors
    /// When the config map cannot be written.
    pub fn set_clock(&mut self, now: Option<Duration>) -> Result<(), DataplaneError> {
        self.ports
            .configure(|config| config.fake_now_ns = now.map_or(0, |t| t.as_nanos() as u64))
    }
}

fn classifier_mut(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, BpfError> {
    let missing = BpfError::Missing {
        kind: "program",
        name: np::TC_PROGRAM,
    };
    ebpf.program_mut(np::TC_PROGRAM)
        .ok_or(missing)?
        .try_into()
        .map_err(not_classifier)
}

fn not_classifier(source: aya::programs::ProgramError) -> BpfError {
    BpfError::Program {
        op: format!("treating {} as a classifier", np::TC_PROGRAM),
        source,
    }
}

impl Dataplane for XdpDataplane {
    fn mode(&self) -> &'static str {
        "xdp"
    }

    fn refresh(&mut self) -> Result<(), DataplaneError> {
        self.ports.adopt()
    }

    fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
        self.ports.apply(snapshot)
    }

    fn counters(&self) -> Result<Counters, DataplaneError> {
        self.ports.counters()
    }
}
