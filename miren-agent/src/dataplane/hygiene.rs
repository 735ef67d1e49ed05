//! Data plane hygiene at start. miren's own node-port programs (recognised by name:
//! `miren_nodeport`, `miren_reply`) attached to a configured interface through a link this
//! agent does not adopt are detached, whatever pin directory they came from: an earlier agent
//! with another `--bpf-pin-dir`, or one whose data plane is no longer wanted, would otherwise
//! keep forwarding node-port traffic to instances that no longer exist. Programs that are not
//! miren's are never touched; a foreign XDP program is reported, since XDP cannot attach
//! beside it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use miren_common::nodeport as np;

use super::{DataplaneError, pins};
use crate::bpf::attached::{self, AttachedProgram, Hook};

/// The names of the programs this module may detach.
const OURS: [&str; 2] = [np::XDP_PROGRAM, np::TC_PROGRAM];

/// What [`clean`] found and did on one interface.
#[derive(Debug, Default)]
pub(super) struct Cleaned {
    /// One line per stale program detached (program, ids, hook, where it was pinned).
    pub(super) detached: Vec<String>,
    /// An XDP program on the interface that is not miren's.
    pub(super) foreign_xdp: Option<AttachedProgram>,
}

/// What to do with the programs attached to an interface.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan<'a> {
    /// miren's programs not attached through a kept link: to detach.
    stale: Vec<&'a AttachedProgram>,
    /// An XDP program that is not miren's.
    foreign_xdp: Option<&'a AttachedProgram>,
}

/// Sorts `attached` into miren's programs to detach (those whose link is not in `keep`) and a
/// foreign XDP program; other foreign programs are not this agent's business.
fn plan<'a>(attached: &'a [AttachedProgram], keep: &BTreeSet<u32>) -> Plan<'a> {
    let mut plan = Plan::default();
    for program in attached {
        if OURS.contains(&program.name.as_str()) {
            if program.link_id.is_none_or(|id| !keep.contains(&id)) {
                plan.stale.push(program);
            }
        } else if program.hook == Hook::Xdp {
            plan.foreign_xdp = Some(program);
        }
    }
    plan
}

/// Detaches miren's programs attached to `iface` (in the calling thread's network namespace)
/// except through the links `keep`, removes their pins when they can be found on a bpffs of
/// this mount namespace, and logs each.
///
/// # Errors
/// [`DataplaneError::Bpf`] if `iface` does not exist, or when the kernel cannot be asked or
/// refuses a detach; [`DataplaneError::StaleWithoutLink`] for a program of
/// miren's attached without a link.
pub(super) fn clean(iface: &str, keep: &BTreeSet<u32>) -> Result<Cleaned, DataplaneError> {
    let ifindex = attached::ifindex(iface)?;
    let attached = attached::attached(ifindex)?;
    let plan = plan(&attached, keep);
    let stale_links: BTreeSet<u32> = plan.stale.iter().filter_map(|p| p.link_id).collect();
    let pinned: BTreeMap<u32, PathBuf> = if stale_links.is_empty() {
        BTreeMap::new()
    } else {
        pins::find_link_pins(iface, &stale_links)
    };
    let mut cleaned = Cleaned {
        detached: Vec::new(),
        foreign_xdp: plan.foreign_xdp.cloned(),
    };
    for program in plan.stale {
        let Some(link_id) = program.link_id else {
            let remedy = match program.hook {
                Hook::Xdp => format!("ip link set dev {iface} xdp off"),
                Hook::TcxIngress => format!("bpftool net detach tcx_ingress dev {iface}"),
                Hook::TcxEgress => format!("bpftool net detach tcx_egress dev {iface}"),
            };
            return Err(DataplaneError::StaleWithoutLink {
                iface: iface.into(),
                name: program.name.clone(),
                id: program.prog_id,
                hook: program.hook,
                remedy,
            });
        };
        attached::detach_link(link_id)?;
        let pin = pinned.get(&link_id);
        if let Some(path) = pin
            && let Err(error) = std::fs::remove_file(path)
        {
            tracing::warn!(path = %path.display(), %error, "could not remove the stale link's pin");
        }
        let pinned_at = pin.map_or_else(
            || "pin not found".to_owned(),
            |p| format!("pinned at {}", p.display()),
        );
        tracing::warn!(
            %iface,
            program = %program.name,
            prog_id = program.prog_id,
            link_id,
            hook = %program.hook,
            pinned_at = %pinned_at,
            "detached a stale miren program this agent does not own"
        );
        cleaned.detached.push(format!(
            "{} (program {}, link {link_id}, {pinned_at}) from {iface} {}",
            program.name, program.prog_id, program.hook
        ));
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(hook: Hook, name: &str, prog_id: u32, link_id: Option<u32>) -> AttachedProgram {
        AttachedProgram {
            hook,
            prog_id,
            name: name.into(),
            link_id,
        }
    }

    fn plan_len(attached: &[AttachedProgram], keep: &BTreeSet<u32>) -> usize {
        plan(attached, keep).stale.len()
    }

    #[test]
    fn our_programs_outside_the_kept_links_are_stale() {
        let attached = [
            program(Hook::Xdp, np::XDP_PROGRAM, 10, Some(1)),
            program(Hook::TcxEgress, np::TC_PROGRAM, 11, Some(2)),
            program(Hook::TcxEgress, np::TC_PROGRAM, 21, Some(3)),
        ];
        let plan = plan(&attached, &BTreeSet::from([1, 2]));
        assert_eq!(plan.stale, vec![&attached[2]]);
        assert_eq!(plan.foreign_xdp, None);
        // Nothing kept (nftables chosen): every program of ours goes.
        assert_eq!(plan_len(&attached, &BTreeSet::new()), 3);
    }

    #[test]
    fn foreign_programs_are_never_stale() {
        let attached = [
            program(Hook::Xdp, "miren_count", 5, Some(7)),
            program(Hook::TcxEgress, "cil_to_netdev", 6, Some(8)),
        ];
        let plan = plan(&attached, &BTreeSet::new());
        assert!(plan.stale.is_empty());
        assert_eq!(plan.foreign_xdp, Some(&attached[0]));
    }

    #[test]
    fn our_programs_without_a_link_are_stale() {
        let attached = [program(Hook::Xdp, np::XDP_PROGRAM, 10, None)];
        assert_eq!(plan_len(&attached, &BTreeSet::from([10])), 1);
    }
}
