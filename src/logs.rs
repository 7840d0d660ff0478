//! TEMPORARY stub with the agreed API; replaced by the real module.
#![allow(missing_docs)]
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
#[derive(Clone, Debug)]
pub struct LogSink {
    inner: Arc<Mutex<Vec<u8>>>,
    tx: tokio::sync::broadcast::Sender<bytes::Bytes>,
}
impl LogSink {
    pub fn new(_file: Option<PathBuf>, _max_bytes: u64, _backups: u32) -> LogSink {
        LogSink {
            inner: Arc::default(),
            tx: tokio::sync::broadcast::channel(16).0,
        }
    }
    pub fn write(&self, data: &[u8]) {
        if let Ok(mut g) = self.inner.lock() {
            g.extend_from_slice(data);
        }
        let _ = self.tx.send(bytes::Bytes::copy_from_slice(data));
    }
    pub fn dropped_bytes(&self) -> u64 {
        0
    }
    pub fn tail(&self, max: usize) -> Vec<u8> {
        let g = self.inner.lock().map(|g| g.clone()).unwrap_or_default();
        g[g.len().saturating_sub(max)..].to_vec()
    }
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<bytes::Bytes> {
        self.tx.subscribe()
    }
}
pub async fn pump<R: tokio::io::AsyncRead + Unpin>(mut reader: R, sink: LogSink, _prefix: String) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        sink.write(&buf[..n]);
    }
}
