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
//! - [`config`] holds every setting.
//!
//! Around that path, the [`ops`] layer (entered from `App::handle`) resolves the client address,
//! answers CORS preflights ([`cors`]), applies client rate limits ([`ratelimit`]), writes the
//! request log line and counts [`metrics`] and the statistics of the [`status`] page.

pub mod cache;
pub mod config;
pub mod cors;
pub mod error;
pub mod fetch;
pub mod handlers;
pub mod metrics;
pub mod mirror;
pub mod names;
pub mod ops;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod status;
pub mod store;
pub mod upstream;
