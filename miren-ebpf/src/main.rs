//! miren eBPF programs. Built for `bpfel-unknown-none` by miren-agent's build script and
//! embedded in the agent. On the host target it only type-checks (for clippy).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod counter;
mod csum;
mod family;
mod fragments;
mod headers;
mod icmp;
mod maps;
mod nodeport;
mod reply;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach a panic, so this is never executed.
    loop {}
}

/// Kernel licence string; GPL-compatible so GPL-only helpers are available.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "miren-ebpf holds eBPF programs; they are built for bpfel-unknown-none and embedded in miren-agent"
    );
}
