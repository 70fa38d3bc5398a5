//! The process allocator: mimalloc, called through its plain entry points whenever the
//! alignment asked for is one every mimalloc block has anyway.
//!
//! Why not `mimalloc::MiMalloc`: it sends every allocation to `mi_malloc_aligned`, and mimalloc
//! serves an aligned request from its fast path only up to 1 KiB. Anything larger (the 8 KiB
//! read buffers of a connection, a header map's arrays, a response head being written) took
//! the generic path, which over-allocates and then aligns: five such allocations per proxied
//! request cost ~1.1k instructions, 4 % of the whole request (`bench/instructions.sh`).
//! `mi_malloc` serves the same sizes from the fast path. This is the same test the standard
//! library's `System` allocator makes before it calls `malloc`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// The alignment of every block `mi_malloc` returns that is at least this large: mimalloc's
/// `MI_MAX_ALIGN_SIZE`, the `max_align_t` a C `malloc` owes its callers (std's `System` makes
/// the same assumption of glibc's `malloc`).
const MIN_ALIGN: usize = 16;

/// mimalloc behind Rust's allocator interface.
pub struct MiMalloc;

/// Whether `mi_malloc(size)` already returns memory aligned to `align`: a block smaller than
/// `align` may not be (`align <= size` keeps `Layout { size: 1, align: 8 }` on the aligned
/// path).
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: every pointer handed out comes from mimalloc and is given back to mimalloc
// (`mi_free` takes blocks from the plain and the aligned entry points alike); the plain entry
// points are used only when their blocks meet the layout's alignment (`plain`), otherwise the
// aligned ones are asked for it explicitly.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl; `layout.size()` is non-zero by `GlobalAlloc`'s contract.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator; the new block keeps `layout.align()`.
        unsafe {
            if plain(layout.align(), new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many live blocks of the sizes whose classes are not powers of two (24, 40, 48 … bytes),
    /// asked for with the largest alignment the plain path serves: all of them meet it.
    #[test]
    fn plain_blocks_are_sixteen_aligned() {
        let a = MiMalloc;
        let mut live = Vec::new();
        for size in (16..=1100).step_by(8).chain([4000, 8192, 9000, 70_000]) {
            let layout = Layout::from_size_align(size, MIN_ALIGN).expect("layout");
            for _ in 0..20 {
                // SAFETY: non-zero size; freed below with the same layout.
                let p = unsafe { a.alloc(layout) };
                assert!(!p.is_null());
                assert_eq!(p as usize % MIN_ALIGN, 0, "size {size}");
                live.push((p, layout));
            }
        }
        for (p, layout) in live {
            // SAFETY: allocated above, freed once.
            unsafe { a.dealloc(p, layout) };
        }
    }

    /// Every layout shape the rule splits on, allocated, written, grown, shrunk and freed; the
    /// alignment holds at each step.
    #[test]
    fn blocks_meet_their_alignment_through_realloc() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 3, 7, 8, 9, 16, 24, 100, 1024, 1025, 8192, 70_000] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: non-zero sizes; each pointer is freed once, with its layout.
                unsafe {
                    let zeroed = a.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "zeroed {size}/{align}");
                    assert!(
                        std::slice::from_raw_parts(zeroed, size)
                            .iter()
                            .all(|b| *b == 0)
                    );
                    a.dealloc(zeroed, layout);

                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size}/{align}");
                    p.write_bytes(0xA5, size);
                    let mut layout = layout;
                    let mut p = p;
                    for new_size in [size * 3 + 1, (size / 2).max(1), 20_000] {
                        let kept = layout.size().min(new_size);
                        p = a.realloc(p, layout, new_size);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "realloc {size}->{new_size}/{align}");
                        assert!(
                            std::slice::from_raw_parts(p, kept)
                                .iter()
                                .all(|b| *b == 0xA5),
                            "realloc kept the contents"
                        );
                        layout = Layout::from_size_align(new_size, align).expect("layout");
                        p.write_bytes(0xA5, new_size);
                    }
                    a.dealloc(p, layout);
                }
            }
        }
    }
}
