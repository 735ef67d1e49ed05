//! The embedded eBPF object and loading it into the kernel.

pub mod attached;
mod counter;

pub use counter::{PacketCounter, PacketCounts};

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::MapError,
    programs::{ProgramError, Xdp},
};

/// The eBPF object built from `miren-ebpf` by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/miren-ebpf"));

/// Errors from loading, attaching or reading the eBPF programs and maps.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The agent was built with `AYA_BUILD_SKIP=1` and carries no eBPF object.
    #[error(
        "this miren-agent was built with AYA_BUILD_SKIP=1 and has no eBPF programs; rebuild it after `cargo xtask setup`"
    )]
    NotBuilt,
    /// The kernel refused the object (verifier, permissions, missing features).
    #[error("loading the eBPF object failed (are you root, with BPF enabled?)")]
    Load(#[source] aya::EbpfError),
    /// The object lacks a program or map this code expects: build and code are out of step.
    #[error("the eBPF object has no {kind} named {name:?}; rebuild the agent")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The expected name.
        name: &'static str,
    },
    /// A program operation failed.
    #[error("{op} failed")]
    Program {
        /// What was being done, e.g. "attaching miren_count to veth0".
        op: String,
        /// The underlying error.
        #[source]
        source: ProgramError,
    },
    /// A link operation failed.
    #[error("{op} failed")]
    Link {
        /// What was being done.
        op: String,
        /// The underlying error.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A `bpf()` command or netlink request outside aya failed.
    #[error("{op}: {source}")]
    Kernel {
        /// What was being done, e.g. "detaching link 12".
        op: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A map operation failed.
    #[error("{op} failed")]
    Map {
        /// What was being done.
        op: String,
        /// The underlying error.
        #[source]
        source: MapError,
    },
}

/// Loads the embedded object: creates its maps; programs are loaded by their users.
pub(crate) fn load_object() -> Result<Ebpf, BpfError> {
    load_object_pinned(&[])
}

/// Like [`load_object`], but each `(map name, path)` in `pins` reuses the map pinned at `path`
/// or creates it and pins it there.
pub(crate) fn load_object_pinned(pins: &[(&'static str, PathBuf)]) -> Result<Ebpf, BpfError> {
    if cfg!(miren_ebpf_skipped) || OBJECT.is_empty() {
        return Err(BpfError::NotBuilt);
    }
    let mut loader = EbpfLoader::new();
    for (name, path) in pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(OBJECT).map_err(BpfError::Load)
}

/// Finds the XDP program `name` in `ebpf` and loads it into the kernel.
pub(crate) fn load_xdp(ebpf: &mut Ebpf, name: &'static str) -> Result<(), BpfError> {
    xdp_mut(ebpf, name)?
        .load()
        .map_err(|source| BpfError::Program {
            op: format!("loading {name}"),
            source,
        })
}

/// The XDP program `name` in `ebpf`.
pub(crate) fn xdp<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a Xdp, BpfError> {
    let program = ebpf.program(name).ok_or(BpfError::Missing {
        kind: "program",
        name,
    })?;
    program.try_into().map_err(|source| not_xdp(name, source))
}

/// The XDP program `name` in `ebpf`, mutably (to load or attach it).
pub(crate) fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, BpfError> {
    let program = ebpf.program_mut(name).ok_or(BpfError::Missing {
        kind: "program",
        name,
    })?;
    program.try_into().map_err(|source| not_xdp(name, source))
}

fn not_xdp(name: &str, source: ProgramError) -> BpfError {
    BpfError::Program {
        op: format!("treating {name} as XDP"),
        source,
    }
}
