//! The interop tier: berth between real Debian tools, in one binary built only with the
//! `interop` feature: `cargo test --features interop --test interop` (as root, for dockerd). A
//! missing tool fails its tests with the Debian package to install; nothing is skipped.
//!
//! - `skopeo`: the distribution registry (`docker-registry`) upstream, images pushed and pulled
//!   back through berth with skopeo, compared byte for byte; the private namespace by hand.
//! - `tls`: skopeo and containerd through berth's HTTPS listener, configured with the client
//!   files shipped in `deploy/clients/`.
//! - `docker`: a private dockerd with berth as its registry mirror.
//! - `browser`: the status page in headless chromium.
//! - `readme`: every command of the README's quick start and private-namespace sections, run
//!   as written against a local upstream (with documented rewrites), so the docs cannot drift.
//!
//! Shared helpers: `oci` (deterministic OCI images and layouts), `procs` (the processes and how
//! to run them), `pulls` (pushing and checking pulls), and the fresh-machine tier's harness
//! (`tests/support`: synthetic blobs and digests, the in-process fake and berth).

#[allow(dead_code, unused_imports)] // the interop tier uses part of the shared harness
#[path = "../support/mod.rs"]
mod support;

mod garage;
mod oci;
mod procs;
mod pulls;

mod browser;
mod browser_signin;
mod docker;
mod readme;
mod replicas;
mod s3;
mod skopeo;
mod tls;
