//! berth: a pull-through caching mirror for the Docker Registry HTTP API v2 / OCI Distribution API.
//!
//! A request flows one way through these modules:
//!
//! - [`server`] accepts connections and hands each request to [`handlers`];
//! - [`routes`] parses the path into typed [`names`] (or answers with an [`error`]);
//! - [`handlers`] turn routes into responses, asking the [`mirror`] for content;
//! - the [`mirror`] answers from the [`cache`] (memory, then disk via the [`store`]) and asks the
//!   [`upstream`] on a miss, through the [`fetch`] coordinator so that concurrent misses cause
//!   one download;
//! - [`config`] holds every setting;
//! - [`tls`] terminates TLS for the server, with certificates [`certs`] can generate;
//! - [`conn`] bounds what clients may hold: connection caps, header, idle and send timeouts, and
//!   the file-descriptor budget.
//!
//! Around that path, the [`ops`] layer (entered from `App::handle`) resolves the client address,
//! answers CORS preflights ([`cors`]), applies client rate limits ([`ratelimit`]), writes the
//! request log line and counts [`metrics`] and the statistics of the [`status`] page.
//!
//! The private namespace is a small registry of its own: [`private`] answers pushes, deletes and
//! private pulls, keeping repositories' content apart through [`private_store`] and checking
//! pushed manifests with [`manifest`]; [`auth`] decides who may do what; [`webhook`] tells
//! receivers about pushes and deletes; [`gc`] removes what no manifest refers to.

pub mod auth;
pub mod cache;
pub mod certs;
pub mod config;
pub mod conn;
pub mod cors;
pub mod error;
pub mod fetch;
pub mod gc;
pub mod handlers;
pub mod manifest;
pub mod metrics;
pub mod mirror;
pub mod names;
pub mod ops;
pub mod private;
pub mod private_store;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod status;
pub mod store;
pub mod tls;
pub mod tls_cli;
pub mod upstream;
pub mod webhook;

/// Locks a mutex, carrying on past poisoning: every lock in berth guards plain bookkeeping that
/// stays consistent between statements, so a panic elsewhere must not take the server down.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
