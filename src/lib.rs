//! berth: a pull-through caching mirror for the Docker Registry HTTP API v2 / OCI Distribution API.
//!
//! The folders are layers, and each uses only the ones above it in this list:
//!
//! - [`oci`]: the protocol's vocabulary, with no I/O — names, digests, routes, error codes,
//!   manifests;
//! - [`config`] holds every setting; [`certs`] makes certificates;
//! - [`store`]: the content store, the only code that touches files — blobs, manifests, tags,
//!   uploads, the private repositories' links, gc, and the pages of blob files sent to clients;
//! - [`auth`]: who may do what — htpasswd users, tokens, scopes;
//! - [`mirror`]: the pull-through cache — tag freshness, the memory and disk caches, one
//!   download per missing blob (the fetch coordinator), the upstream clients;
//! - [`registry`]: the private namespace — pushes, deletes, uploads, listings, webhooks;
//! - [`http`]: requests and responses — routing a request to the mirror or the registry, bodies,
//!   error documents, ranges, listeners with their connection caps and timeouts, TLS;
//! - [`ops`]: around every request — client address, CORS, rate limits, the request log,
//!   metrics, the status page;
//! - [`app`] wires them together and starts the listeners.
//!
//! A pull goes `http` (route, auth) → `mirror` (cache, or fetch from the upstream) → `store`.

#![deny(unsafe_code)]

pub mod app;
pub mod auth;
pub mod certs;
pub mod config;
pub mod http;
pub mod mirror;
pub mod oci;
pub mod ops;
pub mod registry;
pub mod store;

/// Locks a mutex, carrying on past poisoning: every lock in berth guards plain bookkeeping that
/// stays consistent between statements, so a panic elsewhere must not take the server down.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
