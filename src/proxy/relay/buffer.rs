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

impl Buffer {
    /// Reads what `fd` already holds, without waiting: one `recv`, with no
    /// trip through the reactor first. For a connection the reactor has
    /// just taken (accepted, or moved from another thread): tokio knows
    /// no readiness for it until its next turn, though with
    /// TCP_DEFER_ACCEPT (`listen.rs`) an accepted client's request is
    /// already there. Ok(0) is the peer's close; WouldBlock, nothing yet.
    pub(super) fn read_now(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.room();
        let spare = self.0.spare_capacity_mut();
        // SAFETY: recv writes at most `spare.len()` bytes into `spare`,
        // which is valid for writes of that length (its bytes need not be
        // initialized: they are only written), and the fd is open for as
        // long as `fd` is borrowed.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return Err(std::io::Error::last_os_error());
        };
        // SAFETY: recv initialized the first `n` bytes of the spare
        // capacity, n <= spare.len().
        unsafe { self.0.set_len(self.0.len() + n) };
        Ok(n)
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
