//! The sending side of sd_notify, for `zdt notify` and tests. (The receiving
//! side, one socket per process, lives in [`crate::instance`].)

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Sends `message` to the notify socket `path` (a filesystem path, or an
/// abstract name written with a leading `@`).
pub fn send(path: &OsStr, message: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(message.as_bytes(), &addr)?;
    } else {
        sock.send_to(message.as_bytes(), path)?;
    }
    Ok(())
}
