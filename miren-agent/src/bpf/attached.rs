//! What eBPF programs are attached to a network interface, read from the kernel, and detaching
//! links by id. aya 0.14 cannot list the links of an interface, so this speaks to the kernel
//! directly: netlink (`RTM_GETLINK`, the `IFLA_XDP` attributes) for the XDP program,
//! `BPF_PROG_QUERY` for TCX programs and their links, `BPF_LINK_GET_NEXT_ID` to find the link
//! of an XDP program, `BPF_LINK_DETACH` to detach one.
//!
//! Interfaces are looked up in the calling thread's network namespace (netlink and
//! `BPF_PROG_QUERY` are scoped to it), so an interface of the same index in another namespace
//! is never reported.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::BpfError;

/// Where a program is attached on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// XDP (any mode).
    Xdp,
    /// TCX ingress.
    TcxIngress,
    /// TCX egress.
    TcxEgress,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Xdp => "XDP",
            Self::TcxIngress => "TC ingress",
            Self::TcxEgress => "TC egress",
        })
    }
}

/// A program attached to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    /// Where it is attached.
    pub hook: Hook,
    /// The program's id.
    pub prog_id: u32,
    /// The program's name as the kernel knows it (at most 15 bytes).
    pub name: String,
    /// The link attaching it; `None` if it was attached without one (netlink or
    /// `BPF_PROG_ATTACH`).
    pub link_id: Option<u32>,
}

// From <linux/bpf.h>.
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_LINK_TYPE_XDP: u32 = 6;
// From <linux/if_link.h>.
const IFLA_XDP: u16 = 43;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const IFLA_EXT_MASK: u16 = 29;
// From <linux/netlink.h>: the type bits of an attribute (without NESTED / NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const RTM_NEWLINK: u16 = 16;

/// The index of `iface` in the calling thread's network namespace.
///
/// # Errors
/// [`BpfError::Kernel`] if there is no such interface.
pub fn ifindex(iface: &str) -> Result<u32, BpfError> {
    let op = || format!("finding interface {iface}");
    let name = std::ffi::CString::new(iface)
        .map_err(|_| kernel(op())(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(kernel(op())(io::Error::last_os_error())),
        index => Ok(index),
    }
}

/// Programs attached to `ifindex` (XDP and TCX), with their names and links.
///
/// # Errors
/// [`BpfError::Kernel`] when netlink or a `bpf()` command fails.
pub fn attached(ifindex: u32) -> Result<Vec<AttachedProgram>, BpfError> {
    let mut found = Vec::new();
    for prog_id in xdp_prog_ids(ifindex)? {
        let Some(name) = prog_name(prog_id)? else {
            continue;
        };
        found.push(AttachedProgram {
            hook: Hook::Xdp,
            prog_id,
            name,
            link_id: xdp_link_of(prog_id, ifindex)?,
        });
    }
    for (hook, attach_type) in [
        (Hook::TcxIngress, BPF_TCX_INGRESS),
        (Hook::TcxEgress, BPF_TCX_EGRESS),
    ] {
        for (prog_id, link_id) in tcx_query(ifindex, attach_type)? {
            let Some(name) = prog_name(prog_id)? else {
                continue;
            };
            found.push(AttachedProgram {
                hook,
                prog_id,
                name,
                link_id: (link_id != 0).then_some(link_id),
            });
        }
    }
    Ok(found)
}

/// Detaches link `link_id` (`BPF_LINK_DETACH`): its program leaves the interface at once,
/// even while the link stays pinned or held by another process. A link already gone is not
/// an error.
///
/// # Errors
/// [`BpfError::Kernel`] when the kernel refuses.
pub fn detach_link(link_id: u32) -> Result<(), BpfError> {
    let Some(fd) = fd_by_id(BPF_LINK_GET_FD_BY_ID, link_id, "link")? else {
        return Ok(());
    };
    let mut attr = [0u32; 4];
    attr[0] = fd.as_raw_fd() as u32;
    sys_bpf(BPF_LINK_DETACH, &mut attr).map_err(kernel(format!("detaching link {link_id}")))?;
    Ok(())
}

fn kernel(op: String) -> impl FnOnce(io::Error) -> BpfError {
    move |source| BpfError::Kernel { op, source }
}

/// `bpf(cmd, attr, sizeof attr)`.
fn sys_bpf<T: ?Sized>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let size = std::mem::size_of_val(attr);
    // SAFETY: `attr` is a valid, writable buffer of `size` bytes laid out as the command's
    // part of `union bpf_attr`; the kernel reads and writes only within it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<u8>(),
            size,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A file descriptor for the program or link `id`; `None` if it no longer exists.
fn fd_by_id(cmd: libc::c_long, id: u32, kind: &str) -> Result<Option<OwnedFd>, BpfError> {
    let mut attr = [0u32; 4];
    attr[0] = id;
    match sys_bpf(cmd, &mut attr) {
        // SAFETY: the command returned a new file descriptor that nothing else owns.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(kernel(format!("opening {kind} {id}"))(e)),
    }
}

/// Fills `info` (a prefix of `bpf_prog_info` or `bpf_link_info`) for `fd`.
fn info_by_fd(fd: &OwnedFd, info: &mut [u8], what: &str) -> Result<(), BpfError> {
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(kernel(format!("reading {what}")))?;
    Ok(())
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"))
}

/// The name of program `id`; `None` if it no longer exists.
fn prog_name(id: u32) -> Result<Option<String>, BpfError> {
    let Some(fd) = fd_by_id(BPF_PROG_GET_FD_BY_ID, id, "program")? else {
        return Ok(None);
    };
    // bpf_prog_info up to and including `name[16]` at offset 64.
    let mut info = [0u8; 80];
    info_by_fd(&fd, &mut info, &format!("the info of program {id}"))?;
    let name = &info[64..80];
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(Some(String::from_utf8_lossy(&name[..len]).into_owned()))
}

/// The XDP link attaching program `prog_id` to `ifindex`, if any.
fn xdp_link_of(prog_id: u32, ifindex: u32) -> Result<Option<u32>, BpfError> {
    let mut id = 0u32;
    loop {
        let mut attr = [0u32; 4];
        attr[0] = id;
        match sys_bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => id = attr[1],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(kernel("listing eBPF links".into())(e)),
        }
        let Some(fd) = fd_by_id(BPF_LINK_GET_FD_BY_ID, id, "link")? else {
            continue;
        };
        // bpf_link_info: type, id, prog_id, then the union (8-aligned) with xdp.ifindex first.
        let mut info = [0u8; 24];
        info_by_fd(&fd, &mut info, &format!("the info of link {id}"))?;
        if u32_at(&info, 0) == BPF_LINK_TYPE_XDP
            && u32_at(&info, 8) == prog_id
            && u32_at(&info, 16) == ifindex
        {
            return Ok(Some(id));
        }
    }
}

/// `(program id, link id or 0)` of each TCX program of `ifindex` at `attach_type`; empty on
/// kernels without TCX.
fn tcx_query(ifindex: u32, attach_type: u32) -> Result<Vec<(u32, u32)>, BpfError> {
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut capacity = 16usize;
    loop {
        let mut prog_ids = vec![0u32; capacity];
        let mut link_ids = vec![0u32; capacity];
        let mut attr = QueryAttr {
            target_ifindex: ifindex,
            attach_type,
            prog_ids: prog_ids.as_mut_ptr() as u64,
            count: capacity as u32,
            link_ids: link_ids.as_mut_ptr() as u64,
            ..QueryAttr::default()
        };
        match sys_bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                let count = attr.count as usize;
                return Ok(prog_ids.into_iter().zip(link_ids).take(count).collect());
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => capacity = attr.count as usize,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Vec::new()),
            Err(e) => {
                return Err(kernel(format!(
                    "querying the TCX programs of interface {ifindex}"
                ))(e));
            }
        }
    }
}

/// The XDP program ids attached to `ifindex` (netlink `RTM_GETLINK`).
fn xdp_prog_ids(ifindex: u32) -> Result<Vec<u32>, BpfError> {
    let op = || format!("asking netlink about interface {ifindex}");
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(kernel(op())(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let request = getlink_request(ifindex);
    // SAFETY: `request` is a valid buffer of its length.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(kernel(op())(io::Error::last_os_error()));
    }
    let mut reply = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `reply` is a valid, writable buffer of its length.
        let len = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                reply.as_mut_ptr().cast(),
                reply.len(),
                0,
            )
        };
        if len < 0 {
            return Err(kernel(op())(io::Error::last_os_error()));
        }
        match parse_getlink_reply(&reply[..len as usize]) {
            Reply::Ids(ids) => return Ok(ids),
            Reply::Error(errno) => return Err(kernel(op())(io::Error::from_raw_os_error(errno))),
            Reply::Other => continue,
        }
    }
}

/// `RTM_GETLINK` for one interface, without statistics.
fn getlink_request(ifindex: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + IFINFOMSG_LEN + 8;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    // ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    msg.extend_from_slice(&[0; 8]);
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    msg.extend_from_slice(&(libc::RTEXT_FILTER_SKIP_STATS as u32).to_ne_bytes());
    msg
}

/// What a netlink reply datagram said.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// The link's XDP program ids (empty: none attached).
    Ids(Vec<u32>),
    /// An error (positive errno).
    Error(i32),
    /// Nothing about the request.
    Other,
}

/// Reads the XDP program ids out of an `RTM_NEWLINK` reply (or its error).
fn parse_getlink_reply(mut buf: &[u8]) -> Reply {
    while buf.len() >= NLMSG_HDR_LEN {
        let len = u32_at(buf, 0) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return Reply::Other;
        }
        let body = &buf[NLMSG_HDR_LEN..len];
        if kind == libc::NLMSG_ERROR as u16 && body.len() >= 4 {
            let errno = i32::from_ne_bytes(body[..4].try_into().expect("4 bytes"));
            return Reply::Error(-errno);
        }
        if kind == RTM_NEWLINK && body.len() >= IFINFOMSG_LEN {
            let mut ids = Vec::new();
            for (kind, xdp) in attributes(&body[IFINFOMSG_LEN..]) {
                if kind != IFLA_XDP {
                    continue;
                }
                for (kind, value) in attributes(xdp) {
                    let is_id = matches!(
                        kind,
                        IFLA_XDP_PROG_ID
                            | IFLA_XDP_DRV_PROG_ID
                            | IFLA_XDP_SKB_PROG_ID
                            | IFLA_XDP_HW_PROG_ID
                    );
                    if is_id && value.len() >= 4 {
                        let id = u32_at(value, 0);
                        if id != 0 && !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
            }
            return Reply::Ids(ids);
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    Reply::Other
}

/// The `(type, value)` netlink attributes in `buf`.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn reads_the_xdp_program_ids_of_a_link_reply() {
        let mut xdp = attr(2, &[1]); // IFLA_XDP_ATTACHED
        xdp.extend(attr(IFLA_XDP_PROG_ID, &42u32.to_ne_bytes()));
        xdp.extend(attr(IFLA_XDP_DRV_PROG_ID, &42u32.to_ne_bytes()));
        let mut body = vec![0; IFINFOMSG_LEN];
        body.extend(attr(3, b"eth0\0")); // IFLA_IFNAME
        body.extend(attr(IFLA_XDP | 0x8000, &xdp)); // NLA_F_NESTED
        assert_eq!(
            parse_getlink_reply(&message(RTM_NEWLINK, &body)),
            Reply::Ids(vec![42])
        );
    }

    #[test]
    fn a_link_without_xdp_has_no_ids() {
        let mut body = vec![0; IFINFOMSG_LEN];
        body.extend(attr(IFLA_XDP, &attr(2, &[0])));
        assert_eq!(
            parse_getlink_reply(&message(RTM_NEWLINK, &body)),
            Reply::Ids(vec![])
        );
    }

    #[test]
    fn netlink_errors_are_positive_errnos() {
        let body = (-libc::ENODEV).to_ne_bytes();
        assert_eq!(
            parse_getlink_reply(&message(libc::NLMSG_ERROR as u16, &body)),
            Reply::Error(libc::ENODEV)
        );
    }

    #[test]
    fn the_request_names_the_interface() {
        let request = getlink_request(7);
        assert_eq!(u32_at(&request, 0) as usize, request.len());
        assert_eq!(u32_at(&request, NLMSG_HDR_LEN + 4), 7);
    }
}
