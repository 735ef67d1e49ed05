//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4 "population").
//!
//! Builds the lookup table the XDP data plane indexes with `flow_hash % table.len()` to pick a
//! backend. Pure logic: the result depends only on the set of backend ids and the table size,
//! every backend gets `floor(M/N)` or `ceil(M/N)` slots, and adding or removing one backend
//! moves few slots besides the ones that must move.

/// Stable identifier of a backend; the table stores these ids.
pub type BackendId = u32;

/// Largest table size; used for more than [`MAX_FULL_RATIO_BACKENDS`] backends.
pub const MAX_TABLE_SIZE: u32 = 65_537;

/// Up to this many backends the table size is at least 100 × backends.
pub const MAX_FULL_RATIO_BACKENDS: usize = 650;

/// Seeds for the two independent hashes of a backend id. Their upper 32 bits differ, so
/// `id ^ SEED_OFFSET` never equals `other_id ^ SEED_SKIP` for 32-bit ids.
const SEED_OFFSET: u64 = 0x6a09_e667_f3bc_c908;
const SEED_SKIP: u64 = 0xbb67_ae85_84ca_a73b;

/// Table size for `backends` backends: the smallest prime ≥ 100 × `backends` (101 for one
/// backend), or 0 for none.
///
/// Capped at [`MAX_TABLE_SIZE`] (65537, prime) for more than [`MAX_FULL_RATIO_BACKENDS`]
/// backends; from 656 backends on the table is then smaller than 100 × backends, so balance
/// stays within one slot but slot disruption on changes grows.
pub fn table_size(backends: usize) -> u32 {
    match backends {
        0 => 0,
        n if n > MAX_FULL_RATIO_BACKENDS => MAX_TABLE_SIZE,
        // n ≤ 650, so 100 × n ≤ 65_000 fits in u32 and its next prime (65_003) stays below the cap.
        n => next_prime((n as u32).saturating_mul(100).max(101)),
    }
}

/// Builds a Maglev lookup table of `size` slots over `backends`.
///
/// Ids may come in any order and duplicates count once: the result depends only on the set of
/// ids. `size` should be prime (see [`table_size`]) so each backend's permutation visits every
/// slot; a non-prime size still yields a full, balanced table. Returns an empty `Vec` when
/// `backends` is empty or `size` is 0.
pub fn build(backends: &[BackendId], size: u32) -> Vec<BackendId> {
    let mut ids = backends.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() || size == 0 {
        return Vec::new();
    }

    let m = u64::from(size);
    // Per backend: next candidate slot of its permutation and the permutation's skip.
    let mut cursors: Vec<(u64, u64)> = ids
        .iter()
        .map(|&id| {
            let offset = mix(u64::from(id) ^ SEED_OFFSET) % m;
            let skip = if m > 1 {
                mix(u64::from(id) ^ SEED_SKIP) % (m - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();

    let mut table: Vec<Option<BackendId>> = vec![None; size as usize];
    let mut filled: u64 = 0;
    let mut fallback_scan: usize = 0;
    'fill: loop {
        for (&id, cursor) in ids.iter().zip(cursors.iter_mut()) {
            let slot = next_free_slot(&table, cursor, m, &mut fallback_scan);
            table[slot] = Some(id);
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    // Every slot is filled at this point; `flatten` only drops the Option wrapper.
    table.into_iter().flatten().collect()
}

/// Advances a backend's permutation to its next free slot and returns it.
///
/// With a prime size the permutation covers every slot, so a free one is found within `m`
/// steps. Otherwise (non-prime size) the permutation may cycle over taken slots only; then the
/// first free slot in index order is used, which keeps the table full and balanced.
fn next_free_slot(
    table: &[Option<BackendId>],
    cursor: &mut (u64, u64),
    m: u64,
    fallback_scan: &mut usize,
) -> usize {
    let (pos, skip) = cursor;
    for _ in 0..m {
        let slot = *pos as usize;
        *pos = (*pos + *skip) % m;
        if table[slot].is_none() {
            return slot;
        }
    }
    while table[*fallback_scan].is_some() {
        *fallback_scan += 1;
    }
    *fallback_scan
}

/// splitmix64 finalizer: a cheap, well-mixed 64-bit hash.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Smallest prime ≥ `n`; callers keep `n` ≤ 65_000, far below `u32::MAX`.
fn next_prime(n: u32) -> u32 {
    let mut c = n.max(2);
    while !is_prime(c) {
        c += 1;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn counts(table: &[BackendId]) -> HashMap<BackendId, usize> {
        let mut c = HashMap::new();
        for &b in table {
            *c.entry(b).or_insert(0) += 1;
        }
        c
    }

    /// Ids that are not simply 0..n, to avoid accidental structure.
    fn ids(n: u32) -> Vec<BackendId> {
        (0..n).map(|i| (mix(u64::from(i)) >> 40) as u32).collect()
    }

    fn changed(a: &[BackendId], b: &[BackendId]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    #[test]
    fn table_sizes_are_primes() {
        assert_eq!(table_size(0), 0);
        assert_eq!(table_size(1), 101);
        assert_eq!(table_size(2), 211);
        assert_eq!(table_size(3), 307);
        assert_eq!(table_size(5), 503);
        assert_eq!(table_size(10), 1009);
        assert_eq!(table_size(650), 65_003);
        assert_eq!(table_size(651), MAX_TABLE_SIZE);
        assert_eq!(table_size(10_000), MAX_TABLE_SIZE);
        assert!(is_prime(MAX_TABLE_SIZE));
        for n in 1..=MAX_FULL_RATIO_BACKENDS {
            let m = table_size(n);
            assert!(is_prime(m), "{m} for {n}");
            assert!(m as usize >= 100 * n);
            assert!(m < MAX_TABLE_SIZE);
        }
    }

    #[test]
    fn empty_inputs_give_empty_table() {
        assert!(build(&[], 101).is_empty());
        assert!(build(&[], 0).is_empty());
        assert!(build(&[1, 2], 0).is_empty());
    }

    #[test]
    fn balanced_within_one_slot() {
        for n in 1..=20u32 {
            let backends = ids(n);
            let m = table_size(n as usize);
            let table = build(&backends, m);
            assert_eq!(table.len(), m as usize);
            let c = counts(&table);
            assert_eq!(c.len(), n as usize, "every backend gets slots (n={n})");
            let lo = m as usize / n as usize;
            let hi = lo + usize::from(!(m as usize).is_multiple_of(n as usize));
            for (&b, &k) in &c {
                assert!(backends.contains(&b));
                assert!(k == lo || k == hi, "n={n} backend {b} has {k} slots");
            }
        }
    }

    #[test]
    fn non_prime_size_still_full_and_balanced() {
        let backends = ids(7);
        for size in [1u32, 2, 4, 100, 1000] {
            let table = build(&backends, size);
            assert_eq!(table.len(), size as usize);
            let c = counts(&table);
            let per: Vec<usize> = backends
                .iter()
                .map(|b| c.get(b).copied().unwrap_or(0))
                .collect();
            let max = per.iter().copied().max().unwrap_or(0);
            let min = per.iter().copied().min().unwrap_or(0);
            assert!(max - min <= 1, "size {size}: {per:?}");
        }
    }

    #[test]
    fn order_and_duplicates_do_not_matter() {
        let backends = ids(9);
        let m = table_size(backends.len());
        let a = build(&backends, m);
        let mut rev = backends.clone();
        rev.reverse();
        assert_eq!(a, build(&rev, m));
        let mut dup = backends.clone();
        dup.extend_from_slice(&backends[..3]);
        dup.rotate_left(4);
        assert_eq!(a, build(&dup, m));
    }

    const PINNED: [BackendId; 12] = [3, 7, 3, 42, 3, 42, 7, 42, 7, 42, 7, 1_000_000];

    #[test]
    fn deterministic() {
        let backends = [7, 3, 1_000_000, 42];
        let table = build(&backends, 401);
        assert_eq!(table, build(&backends, 401));
        // Pinned prefix: catches accidental changes of the hash or fill order, which would
        // reshuffle flows across agent versions.
        assert_eq!(&table[..12], &PINNED[..]);
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let backends = ids(10);
        // Extra moves (slots of surviving backends that change owner) shrink as M/N grows:
        // measured ≤ 0.4% at M = 65537 and ≤ 4% at M = 1009 (≈100 × N) for these ids.
        for (m, max_percent) in [(MAX_TABLE_SIZE, 2), (table_size(10), 5)] {
            let before = build(&backends, m);
            for removed in &backends {
                let rest: Vec<_> = backends.iter().copied().filter(|b| b != removed).collect();
                let after = build(&rest, m);
                let extra = before
                    .iter()
                    .zip(&after)
                    .filter(|(x, y)| x != y && *x != removed)
                    .count();
                assert!(
                    extra * 100 < m as usize * max_percent,
                    "m={m}: {extra} extra moves removing {removed}"
                );
                assert!(after.iter().all(|b| b != removed));
            }
        }
    }

    #[test]
    fn adding_a_backend_takes_about_one_nth() {
        let backends = ids(11);
        let (old, new) = backends.split_at(10);
        let m = MAX_TABLE_SIZE;
        let before = build(old, m);
        let after = build(&backends, m);
        let taken = after.iter().filter(|&&b| b == new[0]).count();
        let share = m as usize / 11;
        assert!(taken == share || taken == share + 1, "{taken} vs {share}");
        // Slots moved between old backends on top of the ones the new backend took.
        let extra = changed(&before, &after) - taken;
        assert!(extra * 50 < m as usize, "{extra} extra moves");
    }
}
