//! Deploys: Capistrano-style releases under a program's deploy root.
//!
//! ```text
//! root/releases/<id>/   one folder per release, filled once, never changed
//! root/shared/          what survives releases (uploads, .env)
//! root/current          symlink -> releases/<id>, switched atomically
//! ```
//!
//! - [`fetch`]: fills a fresh, empty release folder from a source (a folder,
//!   a tar/tar.gz/zip archive); parses `git+URL#REF` sources, which the
//!   deploy runs through zdt's spawner.

pub mod fetch;
