//! The one call the broker makes into its allocator (mimalloc, installed by `main.rs`): hand memory
//! that is free again back to the operating system.
//!
//! mimalloc keeps freed pages in the freeing thread's heap and purges them lazily, on that thread's
//! later allocations. A core that has just closed ten thousand connections and then sits idle would
//! keep tens of megabytes it no longer uses (so would one whose connections have just gone idle and
//! parked); the sweeper calls this after such a wave.

unsafe extern "C" {
    /// From mimalloc (linked through the `mimalloc` crate): collects the calling thread's heap and,
    /// with `force`, returns its free pages to the OS now.
    fn mi_collect(force: bool);
}

/// Returns this thread's free allocator pages to the OS. A few milliseconds at most; called rarely.
/// Harmless where mimalloc is not the global allocator (tests, fuzzing): its own heap is then empty.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi_collect(true) }
}
