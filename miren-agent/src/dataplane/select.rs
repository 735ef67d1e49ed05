//! Choosing the node-port data plane (`--dataplane auto|xdp|nft`): auto tries XDP in native
//! mode, then XDP in generic mode, then nftables, and says why each step failed. XDP runs with
//! its nftables companion (table `inet miren_local`, [`super::companion`]) for the node's own
//! connections and hairpin. Whatever is chosen, the other data plane's leftovers (pinned eBPF
//! objects, or the nft table `inet miren` or the companion's `inet miren_local`) are removed,
//! and miren's programs attached to the interfaces through links this agent does not adopt
//! (e.g. pinned under another `--bpf-pin-dir`) are detached ([`super::hygiene`]).

use std::{collections::BTreeSet, path::Path, time::Duration};

use super::{
    Dataplane, DataplaneError,
    companion::WithCompanion,
    hygiene,
    nft::{NftDataplane, Scope},
    peer_nat::{Masquerade, PeerNat},
    pins,
    xdp::{self, XdpDataplane},
};

/// Which data plane the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneChoice {
    /// XDP native, else XDP generic, else nftables.
    Auto,
    /// XDP in native mode only.
    Xdp,
    /// nftables only.
    Nft,
}

impl DataplaneChoice {
    /// `auto`, `xdp` or `nft`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "xdp" => Some(Self::Xdp),
            "nft" => Some(Self::Nft),
            _ => None,
        }
    }
}

/// What the data plane needs to start.
#[derive(Debug, Clone)]
pub struct SelectSettings<'a> {
    /// What the operator asked for.
    pub choice: DataplaneChoice,
    /// External interfaces to attach XDP to.
    pub ifaces: &'a [String],
    /// Where XDP pins its maps and links.
    pub bpf_pin_dir: &'a Path,
    /// Idle timeout of UDP sessions (XDP; nftables uses the kernel's conntrack timeouts).
    pub udp_timeout: Duration,
}

/// The started data plane, its cross-node masquerade, and why it was chosen.
#[derive(Debug)]
pub struct Selected {
    /// The data plane.
    pub dataplane: Box<dyn Dataplane>,
    /// The masquerade of its flows to other nodes' instances.
    pub peer_nat: PeerNat,
    /// Why (shown by `miren status`).
    pub reason: String,
}

/// Starts the data plane `settings.choice` asks for.
///
/// # Errors
/// [`DataplaneError`] when the chosen data plane (for auto: the last fallback, nftables) cannot
/// start; for auto the error also says why XDP was refused.
pub fn select(settings: &SelectSettings<'_>) -> Result<Selected, DataplaneError> {
    match settings.choice {
        DataplaneChoice::Nft => start_nft("--dataplane nft".into(), settings),
        DataplaneChoice::Xdp => start_xdp(settings, false),
        DataplaneChoice::Auto => {
            let native = match start_xdp(settings, false) {
                Ok(selected) => return Ok(selected),
                Err(err) => err,
            };
            // Without a usable pin directory generic mode fails the same way.
            if matches!(native, DataplaneError::PinDir { .. }) {
                tracing::warn!(error = %native, "XDP refused; using nftables");
                return start_nft(format!("XDP refused: {native}"), settings).map_err(|nft| {
                    DataplaneError::Command {
                        op: "no node-port data plane could start".into(),
                        detail: format!("XDP: {native}; nftables: {nft}"),
                    }
                });
            }
            tracing::warn!(error = %native, "XDP in native mode refused; trying generic mode");
            let generic = match start_xdp(settings, true) {
                Ok(mut selected) => {
                    selected.reason =
                        format!("{} (native mode refused: {native})", selected.reason);
                    return Ok(selected);
                }
                Err(err) => err,
            };
            tracing::warn!(error = %generic, "XDP in generic mode refused; using nftables");
            start_nft(
                format!("XDP refused; native mode: {native}; generic mode: {generic}"),
                settings,
            )
            .map_err(|nft| DataplaneError::Command {
                op: "no node-port data plane could start".into(),
                detail: format!(
                    "XDP native mode: {native}; XDP generic mode: {generic}; nftables: {nft}"
                ),
            })
        }
    }
}

/// Loads XDP (adopting pinned state; mounting a bpffs at `/sys/fs/bpf` for the default pin
/// directory when there is none), detaches stale programs of miren's from every interface,
/// attaches to every interface in native mode or, with `generic`, generic mode (interfaces
/// already attached through this pin directory's links are adopted), removes a leftover
/// nft table of the nftables data plane, opens the companion for the node's own connections
/// and packets arriving elsewhere than the interfaces (adopting its table, so those flows
/// survive a restart), and sets the cross-node masquerade up for packets arriving on the
/// interfaces.
fn start_xdp(settings: &SelectSettings<'_>, generic: bool) -> Result<Selected, DataplaneError> {
    let mounted = pins::prepare(settings.bpf_pin_dir)?;
    let mut dataplane = XdpDataplane::load_pinned(settings.bpf_pin_dir)?;
    dataplane.set_udp_timeout(settings.udp_timeout)?;
    let mut modes = Vec::new();
    let mut notes: Vec<String> = mounted.into_iter().collect();
    for iface in settings.ifaces {
        let keep = pins::pinned_link_ids(settings.bpf_pin_dir, iface);
        let cleaned = hygiene::clean(iface, &keep)?;
        if let Some(foreign) = cleaned.foreign_xdp {
            return Err(DataplaneError::ForeignXdp {
                iface: iface.clone(),
                name: foreign.name,
                id: foreign.prog_id,
            });
        }
        notes.extend(
            cleaned
                .detached
                .into_iter()
                .map(|d| format!("detached stale {d}")),
        );
        let mode = dataplane.attach(iface, generic)?;
        tracing::info!(%iface, %mode, "XDP node-port data plane attached");
        modes.push(format!("{iface} {mode}"));
    }
    if NftDataplane::remove_table()? {
        tracing::info!("removed the nft table of an earlier nftables data plane");
    }
    let scope = Scope::companion(settings.ifaces).map_err(|detail| DataplaneError::Command {
        op: "the XDP data plane's nftables companion".into(),
        detail,
    })?;
    let companion = NftDataplane::open_scoped(scope)?;
    let table = companion.scope().table_name();
    let peer_nat = PeerNat::open(&Masquerade::ArrivedOn(settings.ifaces.to_vec()))?;
    Ok(Selected {
        dataplane: Box::new(WithCompanion::new(Box::new(dataplane), Box::new(companion))),
        peer_nat,
        reason: with_notes(
            format!(
                "XDP on {}, with the nftables companion (table inet {table}) for the node's \
                 own connections and instances calling node ports",
                modes.join(", ")
            ),
            &notes,
        ),
    })
}

/// Detaches every program of miren's from the interfaces (whatever pin directory holds their
/// links), removes XDP leftovers under the pin directory (pinned maps and links) and the XDP
/// companion's table, and opens the nftables data plane (masquerading hairpin flows, those
/// arriving elsewhere than the interfaces) with the cross-node masquerade of the flows it
/// DNATs.
fn start_nft(reason: String, settings: &SelectSettings<'_>) -> Result<Selected, DataplaneError> {
    let mut notes = Vec::new();
    for iface in settings.ifaces {
        let cleaned = hygiene::clean(iface, &BTreeSet::new())?;
        notes.extend(
            cleaned
                .detached
                .into_iter()
                .map(|d| format!("detached stale {d}")),
        );
    }
    let bpf_pin_dir = settings.bpf_pin_dir;
    if xdp::remove_pins(bpf_pin_dir)? {
        tracing::info!(dir = %bpf_pin_dir.display(), "removed the pinned objects of an earlier XDP data plane");
    }
    let companion = Scope::Companion { xdp: Vec::new() };
    if NftDataplane::remove_table_of(&companion)? {
        tracing::info!("removed the nft table of an earlier XDP data plane's companion");
    }
    let scope = Scope::plane(settings.ifaces).map_err(|detail| DataplaneError::Command {
        op: "the nftables data plane".into(),
        detail,
    })?;
    Ok(Selected {
        dataplane: Box::new(NftDataplane::open_scoped(scope)?),
        peer_nat: PeerNat::open(&Masquerade::Dnated)?,
        reason: with_notes(format!("nftables ({reason})"), &notes),
    })
}

/// `reason`, then `; note` for each note.
fn with_notes(reason: String, notes: &[String]) -> String {
    notes
        .iter()
        .fold(reason, |reason, note| format!("{reason}; {note}"))
}
