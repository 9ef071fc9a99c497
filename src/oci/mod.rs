//! The protocol's vocabulary, with no I/O: repository names, tags and digests, the routes of the
//! distribution API, its error codes, the manifest model (descriptors, image manifests, indexes),
//! the manifest media types, and platforms (`linux/arm64/v8`).

pub mod error;
pub mod manifest;
pub mod media;
pub mod names;
pub mod platform;
pub mod routes;
