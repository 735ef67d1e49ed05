//! Where the XDP data plane pins its maps and links on bpffs (`--bpf-pin-dir`), so a
//! restarted agent adopts them: `DIR/maps/NAME`, `DIR/links/{xdp,tc}-IFACE`.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::ffi::OsStringExt as _,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use miren_common::nodeport as np;

use super::DataplaneError;
use crate::bpf::BpfError;

/// bpffs's `f_type` (see `statfs(2)`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where bpffs is mounted by convention (systemd, Cilium): the default pin directory's parent.
pub(super) const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// The node-port maps that are pinned (all of them: state and counters survive restarts).
const PINNED_MAPS: &[&str] = &[
    np::NODE_ADDRS_MAP,
    np::NODE_ADDRS6_MAP,
    np::SERVICES_MAP,
    np::MAGLEV_MAP,
    np::BACKENDS_MAP,
    np::BACKEND_ADDRS_MAP,
    np::CONNTRACK_MAP,
    np::PORT_STATS_MAP,
    np::BACKEND_STATS_MAP,
    np::GLOBAL_STATS_MAP,
    np::CONFIG_MAP,
    np::BACKENDS6_MAP,
    np::CONNTRACK6_MAP,
    np::BACKEND_STATS6_MAP,
    // Pins of an agent from before IPv6 port counters or fragment tracking lack these: the
    // loader creates them empty.
    np::PORT_STATS6_MAP,
    np::FRAGS_MAP,
    np::FRAGS6_MAP,
    np::BACKEND_ADDRS6_MAP,
];

/// What must happen before a pin directory can be used.
#[derive(Debug, PartialEq, Eq)]
pub enum PinDirPlan {
    /// It is (or will be created) on a bpffs.
    Ready,
    /// It lies under [`BPFFS_ROOT`], which is no bpffs: mount one there.
    MountRoot,
    /// It would not be on a bpffs: `ancestor`, its nearest existing ancestor, is on a
    /// filesystem of type `fs_type` (`None`: not even `/` could be inspected).
    NotBpffs {
        ancestor: Option<PathBuf>,
        fs_type: i64,
    },
}

/// Decides what `dir` needs, given `fs_type(path)`: the filesystem type of an existing path,
/// `None` for a missing one.
fn plan_pin_dir(dir: &Path, fs_type: impl Fn(&Path) -> Option<i64>) -> PinDirPlan {
    let found = dir
        .ancestors()
        .find_map(|path| fs_type(path).map(|t| (path, t)));
    match found {
        Some((_, BPF_FS_MAGIC)) => PinDirPlan::Ready,
        _ if dir.starts_with(BPFFS_ROOT)
            && fs_type(Path::new(BPFFS_ROOT)) != Some(BPF_FS_MAGIC) =>
        {
            PinDirPlan::MountRoot
        }
        Some((ancestor, fs_type)) => PinDirPlan::NotBpffs {
            ancestor: Some(ancestor.to_owned()),
            fs_type,
        },
        None => PinDirPlan::NotBpffs {
            ancestor: None,
            fs_type: 0,
        },
    }
}

/// What `dir` needs before it can hold pins, as the agent decides when it starts.
pub fn pin_dir_plan(dir: &Path) -> PinDirPlan {
    plan_pin_dir(dir, fs_type)
}

impl PinDirPlan {
    /// Why the directory cannot hold pins as it is ([`PinDirPlan::NotBpffs`]), else `None`.
    pub fn not_bpffs_reason(&self) -> Option<String> {
        match self {
            Self::NotBpffs {
                ancestor: Some(ancestor),
                fs_type,
            } => Some(format!(
                "it is not on a bpf filesystem ({} is on {})",
                ancestor.display(),
                fs_name(*fs_type)
            )),
            Self::NotBpffs { ancestor: None, .. } => {
                Some("no part of its path can be inspected".into())
            }
            Self::Ready | Self::MountRoot => None,
        }
    }
}

/// The filesystem type of `path`, `None` if it cannot be inspected (missing).
fn fs_type(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|fs| fs.filesystem_type().0)
}

/// A readable name for a filesystem type.
fn fs_name(fs_type: i64) -> String {
    match fs_type {
        0x6265_6572 => "sysfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0xef53 => "ext2/3/4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        other => format!("filesystem type {other:#x}"),
    }
}

/// Makes `dir` usable for pins: when it lies under `/sys/fs/bpf` and that is no bpffs, mounts
/// one there (in the agent's mount namespace, as Cilium does); then creates `dir/maps` and
/// `dir/links`. Returns what was done worth telling the operator (the mount), if anything.
///
/// # Errors
/// [`DataplaneError::PinDir`] saying why and what to do when `dir` is not on a bpffs and none
/// could be mounted; [`DataplaneError::Io`] when the directories cannot be created.
pub(super) fn prepare(dir: &Path) -> Result<Option<String>, DataplaneError> {
    let pin_dir_err = |why: String, hint: String| DataplaneError::PinDir {
        dir: dir.to_owned(),
        why,
        hint,
    };
    let mut note = None;
    match plan_pin_dir(dir, fs_type) {
        PinDirPlan::Ready => {}
        PinDirPlan::MountRoot => {
            mount_bpffs_root().map_err(|why| {
                pin_dir_err(
                    why,
                    format!(
                        "mount one (`mount -t bpf bpf {BPFFS_ROOT}`) or pass --bpf-pin-dir DIR on a bpffs"
                    ),
                )
            })?;
            note = Some(format!("mounted a bpffs at {BPFFS_ROOT}"));
        }
        plan @ PinDirPlan::NotBpffs { .. } => {
            return Err(pin_dir_err(
                plan.not_bpffs_reason().unwrap_or_default(),
                format!(
                    "mount a bpffs there (`mount -t bpf bpf DIR`) or pass a --bpf-pin-dir under {BPFFS_ROOT}"
                ),
            ));
        }
    }
    for sub in ["maps", "links"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|source| DataplaneError::Io {
            op: format!("creating {}", dir.join(sub).display()),
            source,
        })?;
    }
    Ok(note)
}

/// Mounts a bpffs at [`BPFFS_ROOT`] (mode 0700, nosuid, nodev, noexec, like systemd). Warns
/// when the agent runs in a mount namespace of its own, where the mount (and every pin in it)
/// ends with the agent.
fn mount_bpffs_root() -> Result<(), String> {
    let root = Path::new(BPFFS_ROOT);
    if !root.is_dir() {
        return Err(format!(
            "{BPFFS_ROOT} does not exist (is sysfs mounted at /sys, and the kernel built with BPF?)"
        ));
    }
    let was = fs_type(root).map_or_else(|| "nothing".into(), fs_name);
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source, target, fstype, data) = (c("bpf"), c(BPFFS_ROOT), c("bpf"), c("mode=0700"));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(format!(
            "{BPFFS_ROOT} is not a bpffs ({was}) and mounting one there failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!(path = BPFFS_ROOT, previously = %was, "mounted a bpffs for the pinned data plane");
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    if own.is_some() && own != std::fs::read_link("/proc/1/ns/mnt").ok() {
        tracing::warn!(
            path = BPFFS_ROOT,
            "the agent runs in a mount namespace of its own: this bpffs mount and its pins end with it, so a restarted agent cannot adopt them; mount a bpffs on the host instead"
        );
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

/// The ids of the links pinned for `iface` under `dir` (those this agent adopts); pins that
/// cannot be opened are left out (attaching replaces them).
pub(super) fn pinned_link_ids(dir: &Path, iface: &str) -> BTreeSet<u32> {
    let (xdp, tc) = link_paths(dir, iface);
    [xdp, tc]
        .iter()
        .filter(|path| path.exists())
        .filter_map(|path| link_id(path))
        .collect()
}

/// The id of the link pinned at `path`.
fn link_id(path: &Path) -> Option<u32> {
    let link = FdLink::from(PinnedLink::from_pin(path).ok()?);
    link.info().ok().map(|info| info.id())
}

/// Where the links `ids` of `iface` are pinned, as far as can be found: the `links/xdp-IFACE`
/// and `links/tc-IFACE` pins (this agent's naming) up to four levels below each bpffs mount
/// point of the agent's mount namespace.
pub(super) fn find_link_pins(iface: &str, ids: &BTreeSet<u32>) -> BTreeMap<u32, PathBuf> {
    let names = [format!("xdp-{iface}"), format!("tc-{iface}")];
    let mut found = BTreeMap::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for root in bpffs_mounts(&mountinfo) {
        let mut pending = vec![(root, 0)];
        while let Some((dir, depth)) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if is_dir && depth < 4 {
                    pending.push((path, depth + 1));
                } else if !is_dir
                    && dir.file_name().is_some_and(|n| n == "links")
                    && names.iter().any(|n| entry.file_name() == n.as_str())
                    && let Some(id) = link_id(&path).filter(|id| ids.contains(id))
                {
                    found.insert(id, path);
                }
            }
        }
    }
    found
}

/// The mount points of bpffs in `/proc/self/mountinfo` text.
fn bpffs_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split(' ').next() == Some("bpf"))
                .then(|| mount.split(' ').nth(4).map(unescape_mount_path))?
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
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

#[cfg(test)]
mod tests {
    use super::*;

    const SYSFS: i64 = 0x6265_6572;
    const TMPFS: i64 = 0x0102_1994;

    /// A filesystem where each listed path exists with the given type.
    fn fs(paths: &[(&str, i64)]) -> impl Fn(&Path) -> Option<i64> {
        let paths: Vec<(PathBuf, i64)> = paths.iter().map(|(p, t)| (p.into(), *t)).collect();
        move |path| paths.iter().find(|(p, _)| p == path).map(|(_, t)| *t)
    }

    #[test]
    fn the_default_dir_on_a_node_without_bpffs_mounts_one() {
        let node = fs(&[
            ("/", 0xef53),
            ("/sys", SYSFS),
            ("/sys/fs", SYSFS),
            ("/sys/fs/bpf", SYSFS),
        ]);
        assert_eq!(
            plan_pin_dir(Path::new("/sys/fs/bpf/miren"), &node),
            PinDirPlan::MountRoot
        );
        // Something else mounted over /sys/fs/bpf is no bpffs either.
        let node = fs(&[("/", 0xef53), ("/sys/fs/bpf", TMPFS)]);
        assert_eq!(
            plan_pin_dir(Path::new("/sys/fs/bpf/miren"), &node),
            PinDirPlan::MountRoot
        );
    }

    #[test]
    fn a_dir_on_bpffs_is_ready_even_before_it_exists() {
        let node = fs(&[("/", 0xef53), ("/sys/fs/bpf", BPF_FS_MAGIC)]);
        assert_eq!(
            plan_pin_dir(Path::new("/sys/fs/bpf/miren"), &node),
            PinDirPlan::Ready
        );
        let node = fs(&[("/", 0xef53), ("/run/pins", BPF_FS_MAGIC)]);
        assert_eq!(
            plan_pin_dir(Path::new("/run/pins/a/b"), &node),
            PinDirPlan::Ready
        );
    }

    #[test]
    fn a_dir_elsewhere_is_refused_with_the_filesystem_it_is_on() {
        let node = fs(&[("/", 0xef53), ("/tmp", TMPFS)]);
        assert_eq!(
            plan_pin_dir(Path::new("/tmp/pins"), &node),
            PinDirPlan::NotBpffs {
                ancestor: Some("/tmp".into()),
                fs_type: TMPFS
            }
        );
        // Under a bpffs /sys/fs/bpf, another filesystem mounted inside is not mounted over.
        let node = fs(&[("/sys/fs/bpf", BPF_FS_MAGIC), ("/sys/fs/bpf/x", TMPFS)]);
        assert_eq!(
            plan_pin_dir(Path::new("/sys/fs/bpf/x/miren"), &node),
            PinDirPlan::NotBpffs {
                ancestor: Some("/sys/fs/bpf/x".into()),
                fs_type: TMPFS
            }
        );
    }

    #[test]
    fn bpffs_mount_points_come_from_mountinfo() {
        let mountinfo = "\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
40 22 0:35 / /sys/fs/bpf rw,nosuid shared:15 - bpf bpf rw,mode=700
41 1 0:36 / /tmp/my\\040pins rw - bpf none rw
";
        assert_eq!(
            bpffs_mounts(mountinfo),
            vec![PathBuf::from("/sys/fs/bpf"), PathBuf::from("/tmp/my pins")]
        );
    }
}
