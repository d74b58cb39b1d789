//! husk's global allocator: the first allocations of a process come from
//! a static arena, bump-allocated and never returned; the rest from the
//! system allocator.
//!
//! Why: husk ships static with musl, whose allocator (mallocng) maps and
//! unmaps small groups of memory as they fill and empty: about 60
//! mmap/munmap pairs in one `husk exec`, each munmap a TLB flush across
//! the process's threads, a third of the command's CPU time. Most husk
//! commands are short-lived and allocate well under the arena's size, so
//! they make no such calls; a long-lived husk (a container's monitor) uses
//! the arena for its start-up and the system allocator after it, and
//! wastes at most the arena. mimalloc was measured too: its start-up cost
//! more than it saved for a command this short (docs/benchmarks.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The arena's size: bytes of .bss, touched only as they are used.
const ARENA_BYTES: usize = 4 << 20;

/// The arena, page-aligned.
#[repr(C, align(4096))]
struct Bytes(UnsafeCell<[u8; ARENA_BYTES]>);

// SAFETY: the bytes are handed out in disjoint ranges (the atomic bump
// below), so no two threads ever touch the same byte through the arena.
unsafe impl Sync for Bytes {}

static ARENA: Bytes = Bytes(UnsafeCell::new([0; ARENA_BYTES]));

/// Bytes of [`ARENA`] handed out.
static USED: AtomicUsize = AtomicUsize::new(0);

/// Bump allocator over [`ARENA`], falling back to [`System`]. Every value
/// of it shares the one arena.
pub struct Arena;

impl Arena {
    fn base() -> usize {
        ARENA.0.get() as usize
    }

    fn owns(ptr: *mut u8) -> bool {
        let p = ptr as usize;
        p >= Self::base() && p < Self::base() + ARENA_BYTES
    }
}

// SAFETY: every pointer returned is either a fresh, suitably aligned,
// disjoint range of the arena or the system allocator's; the arena's
// ranges are never handed out twice.
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = Self::base();
        let mut used = USED.load(Ordering::Relaxed);
        loop {
            let start = (base + used).next_multiple_of(layout.align()) - base;
            let end = start + layout.size();
            if end > ARENA_BYTES {
                // SAFETY: the caller's layout, passed on.
                return unsafe { System.alloc(layout) };
            }
            match USED.compare_exchange_weak(used, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => used = now,
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !Self::owns(ptr) {
            // SAFETY: a pointer the system allocator gave, with its layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::owns(ptr) {
            // SAFETY: a pointer the system allocator gave, with its layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the new layout is valid (GlobalAlloc's contract for
        // realloc), and `alloc` is this allocator's.
        let new =
            unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !new.is_null() {
            // SAFETY: both ranges are live and do not overlap (the new one
            // is fresh); the smaller size is copied.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_disjoint_and_fall_back_when_full() {
        let arena = Arena;
        // SAFETY: layouts are valid; every pointer is freed with its own.
        unsafe {
            let a = arena.alloc(Layout::from_size_align(3, 1).unwrap());
            let b = arena.alloc(Layout::from_size_align(8, 64).unwrap());
            assert!(Arena::owns(a) && Arena::owns(b));
            assert_eq!(b as usize % 64, 0);
            assert!(b as usize >= a as usize + 3);
            let grown = arena.realloc(a, Layout::from_size_align(3, 1).unwrap(), 100);
            assert!(Arena::owns(grown));
            let big = arena.alloc(Layout::from_size_align(ARENA_BYTES, 8).unwrap());
            assert!(!big.is_null() && !Arena::owns(big));
            arena.dealloc(big, Layout::from_size_align(ARENA_BYTES, 8).unwrap());
        }
    }
}
