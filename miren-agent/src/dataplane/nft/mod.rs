//! [`NftDataplane`]: node ports in nftables, the fallback where XDP cannot run.
//!
//! The data plane owns one table, `inet miren`, and touches nothing else. The same code also
//! runs as the XDP data plane's companion ([`Scope::Companion`], table `inet miren_local`):
//! there it handles only what XDP cannot see — connections from the node itself and node-port
//! packets arriving on an interface XDP is not attached to (e.g. an instance calling its own
//! node port through the node address) — with the same rules, the prerouting ones limited by
//! `iifname != { XDP interfaces }`. Its rules are fixed
//! (their number does not grow with the node ports); everything per node port lives in set and
//! map elements, and the only chains that come and go are `endpoints_N`, one per distinct
//! endpoint count N:
//!
//! - `nat_in` / `nat_local` (nat, prerouting / output): traffic to a node address (set
//!   `node_addrs`, IPv4, or `node_addrs6`, IPv6) and a configured `(protocol, port)` jumps
//!   through the verdict map of its family (`nat`, `nat6`) to `endpoints_N`, N being the node
//!   port's endpoint count in that family, or to `no_endpoints`, which counts and drops.
//! - `endpoints_N` counts the new flow and DNATs it to slot `jhash(client addr, client port)
//!   mod N` of the node port in the map of its protocol and family (`endpoints_tcp`,
//!   `endpoints_udp`, `endpoints_tcp6`, `endpoints_udp6`); `dnat ip to` leaves IPv6 packets
//!   alone and `dnat ip6 to` IPv4 ones, so one chain serves both families. Kernel conntrack
//!   keeps the flow on that endpoint; the client's address is kept (no masquerade). Endpoints
//!   take the slots in address order, so an instance's IPv6 endpoint (which mirrors its IPv4
//!   address) has the slot of its IPv4 one.
//! - `nat_out` (nat, postrouting; only with interfaces in the [`Scope`]): flows DNATed here
//!   that arrived on another interface than the external (XDP) ones — an instance calling a
//!   node port (hairpin) — are masqueraded, since the instance chosen would otherwise answer
//!   the caller directly (same bridge) and the reply would miss the reverse translation.
//! - `count_in` / `count_local` / `count_out` (filter) count received packets per node port,
//!   replies per node port and forwarded packets per endpoint in the element counters of the
//!   sets `rx`, `tx_tcp`, `tx_udp` (IPv4; `rx6`, `tx_tcp6`, `tx_udp6` for IPv6) and
//!   `backend_tcp`, `backend_udp`, `backend_tcp6`, `backend_udp6`; new flows and drops go to
//!   `flows`/`flows6` and `drops`/`drops6` by `meta nfproto`.
//!
//! Every rule that looks at addresses comes once per family. A node without an IPv6 address
//! has an empty `node_addrs6`: the IPv6 rules match nothing.
//!
//! Every change is one atomic `nft -f -` transaction computed as the difference between what
//! the kernel holds (read back as JSON) and what the snapshot needs, so counter-carrying
//! elements that stay are never recreated and counters stay monotonic across applies and agent
//! restarts. Each rule carries a comment with a fingerprint of its text, so a table read back
//! shows whether its rules are still the ones this code writes.
//!
//! The parts, each depending only on those before it: `schema` (the table, sets, maps, chains
//! and rules this code writes), `state` (what the table holds or must hold), `script` (the
//! transaction between two states), `listing` (nft's JSON listing read back as a state and
//! counters) and `exec` (running `nft` and `conntrack`).

mod exec;
mod listing;
mod schema;
mod script;
mod state;
#[cfg(test)]
mod tests;

use std::{collections::BTreeSet, net::SocketAddr};

use exec::{list, list_table, nft, purge_conntrack};
use schema::SETS;
pub use schema::Scope;
use script::transaction;
use state::TableState;

use super::{Counters, Dataplane, DataplaneError, NodePortKey, Snapshot};

/// The nftables node-port data plane: owns `table inet miren` (or, as XDP's companion,
/// `table inet miren_local`) in the caller's network namespace.
#[derive(Debug)]
pub struct NftDataplane {
    /// Which traffic the table handles, and its name.
    scope: Scope,
    /// What the kernel's table holds, as last read or written.
    state: TableState,
    /// Backends removed from the table whose stale conntrack entries (all of UDP, unanswered
    /// connection attempts of TCP) are not deleted yet.
    stale_flows: BTreeSet<(NodePortKey, SocketAddr)>,
}

impl NftDataplane {
    /// Checks that `nft` works and adopts `table inet miren` if it exists (its counters are
    /// kept), in the calling thread's network namespace.
    ///
    /// # Errors
    /// [`DataplaneError::Io`] if `nft` is missing; [`DataplaneError::Command`] if it fails or
    /// the table cannot be read.
    pub fn open() -> Result<Self, DataplaneError> {
        Self::open_scoped(Scope::default())
    }

    /// [`NftDataplane::open`] for the table of `scope` (e.g. [`Scope::companion`]).
    ///
    /// # Errors
    /// As [`NftDataplane::open`].
    pub fn open_scoped(scope: Scope) -> Result<Self, DataplaneError> {
        let op = "checking nft";
        nft(op, &["--version"], None)?.map_err(|detail| DataplaneError::Command {
            op: op.to_owned(),
            detail,
        })?;
        let table = scope.table();
        let state = list_table(&format!("reading table {table}"), scope.table_name())?.state;
        if state.exists {
            tracing::info!(
                node_ports = state.node_ports(),
                "adopted nftables table {table}"
            );
        }
        Ok(Self {
            scope,
            state,
            stale_flows: BTreeSet::new(),
        })
    }

    /// The scope of the table.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Deletes `table inet miren` (leftovers of an nft-mode agent); `true` if it existed.
    ///
    /// # Errors
    /// [`DataplaneError::Io`] if `nft` is missing; [`DataplaneError::Command`] if it fails.
    pub fn remove_table() -> Result<bool, DataplaneError> {
        Self::remove_table_of(&Scope::default())
    }

    /// Deletes the table of `scope`'s kind (`inet miren` or `inet miren_local`); `true` if it
    /// existed.
    ///
    /// # Errors
    /// [`DataplaneError::Io`] if `nft` is missing; [`DataplaneError::Command`] if it fails.
    pub fn remove_table_of(scope: &Scope) -> Result<bool, DataplaneError> {
        let op = format!("deleting table {}", scope.table());
        let op = op.as_str();
        match nft(op, &["delete", "table", "inet", scope.table_name()], None)? {
            Ok(_) => Ok(true),
            Err(stderr) if stderr.contains("No such file or directory") => Ok(false),
            Err(detail) => Err(DataplaneError::Command {
                op: op.to_owned(),
                detail,
            }),
        }
    }

    /// Runs one transaction from the believed state to `desired`; the believed state is
    /// updated only if it succeeded.
    fn write(&mut self, desired: &TableState) -> Result<(), DataplaneError> {
        let Some(script) = transaction(&self.state, desired, &self.scope) else {
            return Ok(());
        };
        let op = format!("applying table {}", self.scope.table());
        let op = op.as_str();
        nft(op, &["-f", "-"], Some(&script))?.map_err(|detail| DataplaneError::Command {
            op: op.to_owned(),
            detail,
        })?;
        self.state = desired.clone();
        Ok(())
    }
}

impl Dataplane for NftDataplane {
    fn mode(&self) -> &'static str {
        "nft"
    }

    fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
        let desired = TableState::desired(snapshot, &self.scope);
        let removed = self.state.removed_backends(&desired);
        if let Err(err) = self.write(&desired) {
            // The kernel is unchanged (transactions are atomic), but it may not hold what was
            // believed: read it back and try once more from what it really holds.
            tracing::warn!(error = %err, "nft transaction failed; re-reading the table");
            self.refresh()?;
            self.write(&desired)?;
        }
        self.stale_flows.extend(removed);
        self.stale_flows
            .retain(|backend| !desired.backends.contains(backend));
        while let Some(&(key, endpoint)) = self.stale_flows.first() {
            purge_conntrack(key, endpoint)?;
            self.stale_flows.remove(&(key, endpoint));
        }
        Ok(())
    }

    fn refresh(&mut self) -> Result<(), DataplaneError> {
        let op = format!("re-reading table {}", self.scope.table());
        self.state = list_table(&op, self.scope.table_name())?.state;
        Ok(())
    }

    fn counters(&self) -> Result<Counters, DataplaneError> {
        // Only the sets with counters, each listed by its own nft process in parallel: listing
        // the whole table (with the maps and rules) takes several times as long.
        let table = self.scope.table_name();
        let sets: Vec<Vec<&str>> = SETS
            .iter()
            .filter(|set| set.counter)
            .map(|set| vec!["set", "inet", table, set.name])
            .collect();
        let op = format!("reading the counters of table {}", self.scope.table());
        Ok(list(&op, &sets)?.counters)
    }
}
