//! A counting global allocator, so the dataplane can prove (in tests) and
//! report (in `/metrics`) that its packet path allocates nothing.
//!
//! Install it in a binary or test with
//! `#[global_allocator] static A: ridge_io::CountingAlloc = ridge_io::CountingAlloc;`
//! and read [`thread_allocations`] from the thread whose allocations matter.
//! Without it installed, the counters stay at zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The system allocator, counting allocations per thread and in total.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

static TOTAL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // `const` initialisation with a type that needs no destructor: reading
    // it never allocates and never registers a TLS destructor, so it is
    // safe to touch from inside the allocator.
    static THREAD: Cell<u64> = const { Cell::new(0) };
}

#[inline]
fn count() {
    TOTAL.fetch_add(1, Ordering::Relaxed);
    // During thread teardown the slot may be gone; such allocations are not
    // on any packet path, so they are only counted in the total.
    let _ = THREAD.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; counting touches only an
// atomic and a const-initialised thread-local, neither of which allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from `System` through this allocator with
        // `layout`; the caller upholds `realloc`'s contract for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations (and reallocations) made by the calling thread so far.
pub fn thread_allocations() -> u64 {
    THREAD.try_with(Cell::get).unwrap_or(0)
}

/// Allocations made by every thread so far.
pub fn total_allocations() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}
