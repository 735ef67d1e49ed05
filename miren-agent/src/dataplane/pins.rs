//! Where the XDP data plane pins its maps and links on bpffs (`--bpf-pin-dir`), so a
//! restarted agent adopts them: `DIR/maps/NAME`, `DIR/links/{xdp,tc}-IFACE`.

use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use miren_common::nodeport as np;

use super::DataplaneError;
use crate::bpf::BpfError;

/// bpffs's `f_type` (see `statfs(2)`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The node-port maps that are pinned (all of them: state and counters survive restarts).
const PINNED_MAPS: &[&str] = &[
    np::NODE_ADDRS_MAP,
    np::SERVICES_MAP,
    np::MAGLEV_MAP,
    np::BACKENDS_MAP,
    np::CONNTRACK_MAP,
    np::PORT_STATS_MAP,
    np::BACKEND_STATS_MAP,
    np::GLOBAL_STATS_MAP,
    np::CONFIG_MAP,
];

/// Creates `dir/maps` and `dir/links`, checking that `dir` is on a bpffs.
pub(super) fn prepare(dir: &Path) -> Result<(), DataplaneError> {
    let io = |op: String| move |source| DataplaneError::Io { op, source };
    for sub in ["maps", "links"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(io(format!("creating {}", dir.join(sub).display())))?;
    }
    let fs = nix::sys::statfs::statfs(dir)
        .map_err(|e| io(format!("statfs {}", dir.display()))(e.into()))?;
    if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(DataplaneError::Io {
            op: format!(
                "{} is not on a bpf filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass another --bpf-pin-dir",
                dir.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    Ok(())
}

/// `(map name, pin path)` for every pinned map.
pub(super) fn map_paths(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    PINNED_MAPS
        .iter()
        .map(|name| (*name, dir.join("maps").join(name)))
        .collect()
}

/// The XDP and TC link pins of `iface`.
pub(super) fn link_paths(dir: &Path, iface: &str) -> (PathBuf, PathBuf) {
    let links = dir.join("links");
    (
        links.join(format!("xdp-{iface}")),
        links.join(format!("tc-{iface}")),
    )
}

/// Opens a pinned link.
pub(super) fn open_link(path: &Path) -> Result<FdLink, DataplaneError> {
    PinnedLink::from_pin(path)
        .map(FdLink::from)
        .map_err(link_err(path))
}

/// Pins a link taken out of its program (so it outlives the agent).
pub(super) fn pin_link(link: Result<FdLink, LinkError>, path: &Path) -> Result<(), DataplaneError> {
    let link = link.map_err(link_err(path))?;
    link.pin(path).map(drop).map_err(|e| DataplaneError::Io {
        op: format!("pinning {}: {e}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

/// The error for a link operation on `path`.
pub(super) fn link_err(path: &Path) -> impl FnOnce(LinkError) -> DataplaneError {
    let op = format!("using the pinned link {}", path.display());
    move |source| DataplaneError::Bpf(BpfError::Link { op, source })
}

/// Removes the pinned links (which detaches their programs once no process holds them) and
/// maps under `dir`; true if there were any. A missing directory or one not on a bpffs holds
/// no pins.
pub(super) fn remove_all(dir: &Path) -> Result<bool, DataplaneError> {
    let mut removed = false;
    for sub in ["links", "maps"] {
        let sub = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for entry in entries {
            let path = entry
                .map_err(|source| DataplaneError::Io {
                    op: format!("listing {}", sub.display()),
                    source,
                })?
                .path();
            std::fs::remove_file(&path).map_err(|source| DataplaneError::Io {
                op: format!("removing the leftover pin {}", path.display()),
                source,
            })?;
            removed = true;
        }
    }
    Ok(removed)
}
