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
//! - [`tls`] terminates TLS for the server, with certificates [`certs`] can generate.

pub mod cache;
pub mod certs;
pub mod config;
pub mod error;
pub mod fetch;
pub mod handlers;
pub mod mirror;
pub mod names;
pub mod routes;
pub mod server;
pub mod store;
pub mod tls;
pub mod tls_cli;
pub mod upstream;
