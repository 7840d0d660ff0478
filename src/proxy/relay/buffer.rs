//! The relay's read buffers, kept per proxy thread between uses, so that
//! an idle client connection holds none and a request allocates none.

use bytes::BytesMut;

use crate::proxy::workers;

/// Size of the read buffers, for requests and for responses.
pub(super) const BUF: usize = 16 * 1024;

/// Spare read buffers kept per proxy thread.
const SPARE_MAX: usize = 64;

thread_local! {
    /// Read buffers between uses. Taking a buffer for each request and
    /// freeing it after made glibc give the pages back and fault them in
    /// again: 0.28 page faults per request, nginx none.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees this thread's spare buffers: its load is over (the heartbeat in
/// `workers.rs` saw a quiet interval), so an idle proxy holds none.
pub(in crate::proxy) fn free_spares() {
    SPARE.with(|s| *s.borrow_mut() = Vec::new());
}

/// A read buffer from this thread's spares, given back when dropped.
#[derive(Default)]
pub(super) struct Buffer(pub(super) BytesMut);

impl Buffer {
    pub(super) fn take() -> Self {
        workers::busy();
        let spare = SPARE.with(|s| s.borrow_mut().pop());
        Self(spare.unwrap_or_else(|| BytesMut::with_capacity(BUF)))
    }

    /// Room for a read, from the spares if it holds no memory yet.
    pub(super) fn room(&mut self) {
        if self.0.capacity() == 0 {
            *self = Self::take();
        }
        self.0.reserve(BUF);
    }

    /// Gives the memory back to the spares; the buffer is empty after.
    pub(super) fn release(&mut self) {
        if self.0.capacity() == 0 {
            return;
        }
        let mut b = std::mem::take(&mut self.0);
        b.clear();
        // After clear, reserve only moves the start back: no allocation.
        b.reserve(BUF);
        if b.capacity() == BUF {
            SPARE.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < SPARE_MAX {
                    s.push(b);
                }
            });
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::ops::Deref for Buffer {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.0
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.0
    }
}
