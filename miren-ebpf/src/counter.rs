//! `miren_count`: an XDP program that counts packets and bytes per CPU and passes everything.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use miren_common::counter;

#[map(name = "MIREN_PKT_COUNT")]
static PKT_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

#[xdp]
pub fn miren_count(ctx: XdpContext) -> u32 {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    add(counter::PACKETS, 1);
    add(counter::BYTES, frame_len);
    xdp_action::XDP_PASS
}

/// Adds `value` to this CPU's copy of `slot`. Per-CPU slots need no atomics.
#[inline(always)]
fn add(slot: u32, value: u64) {
    if let Some(counter) = PKT_COUNT.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful map lookup and only this CPU writes it.
        unsafe { *counter += value };
    }
}

/// `miren_empty`: passes every packet and does nothing else; the baseline of the data plane
/// benchmark.
#[xdp]
pub fn miren_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
