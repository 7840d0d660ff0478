//! Control socket client.
