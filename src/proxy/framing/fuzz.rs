//! The hyper path's framing watcher, as it is, behind a wrapper the fuzz
//! targets (fuzz/) can call. Nothing here is used by zdt itself.

use super::{Framing, State};

/// Follows a client's byte stream as the hyper path's reader does.
pub struct Watcher(Framing<()>);

impl Default for Watcher {
    fn default() -> Self {
        Self(Framing::with_prefix(
            (),
            bytes::BytesMut::new(),
            None,
            super::MAX_LINE,
        ))
    }
}

impl Watcher {
    /// Follows the bytes just read; may change the last byte of a head.
    pub fn feed(&mut self, buf: &mut [u8]) {
        if self.0.state != State::Off {
            let _ = self.0.feed(buf);
        }
    }

    /// Whether the watching has stopped.
    pub fn is_off(&self) -> bool {
        self.0.state == State::Off
    }
}
