//! Config errors with file, line and column.

/// A configuration error (placeholder until the loader lands).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// What is wrong.
    pub message: String,
}
