//! Control socket server.
