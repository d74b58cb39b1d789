//! The uids and gids husk's VMMs run as (docs/security.md, "The VMM
//! process"): the VMM whose process ID is P runs as `VMM_ID_BASE + P`.
//! Shared by husk-vmm, which takes its id, and `husk doctor`, which checks
//! that no user or subordinate-id range of the host falls among them.

/// The first id.
pub const VMM_ID_BASE: u32 = 0x7000_0000;

/// How many ids: the largest process ID Linux hands out is below 2^22
/// (`PID_MAX_LIMIT` on 64-bit).
pub const VMM_ID_COUNT: u32 = 1 << 22;

/// The uid and gid of the VMM with process ID `pid`.
pub fn vmm_id(pid: u32) -> u32 {
    VMM_ID_BASE + pid.min(VMM_ID_COUNT - 1)
}

/// Whether `[start, start + count)` shares an id with the VMMs' range.
pub fn overlaps(start: u64, count: u64) -> bool {
    let base = u64::from(VMM_ID_BASE);
    let end = base + u64::from(VMM_ID_COUNT);
    count > 0 && start < end && start.saturating_add(count) > base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_compared_at_both_ends() {
        assert!(!overlaps(100_000, 65_536));
        assert!(overlaps(u64::from(VMM_ID_BASE), 1));
        assert!(overlaps(u64::from(VMM_ID_BASE) - 1, 2));
        assert!(!overlaps(u64::from(VMM_ID_BASE) - 1, 1));
        let end = u64::from(VMM_ID_BASE) + u64::from(VMM_ID_COUNT);
        assert!(overlaps(end - 1, 1));
        assert!(!overlaps(end, 10));
        assert!(!overlaps(u64::from(VMM_ID_BASE), 0));
        assert_eq!(vmm_id(7), VMM_ID_BASE + 7);
    }
}
