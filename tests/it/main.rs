//! The fresh-machine tier: every integration test, in one binary (`cargo test`). berth runs
//! in-process against an in-process fake upstream (or as its built binary, for the command
//! line); nothing outside the machine and no extra packages are needed.
//!
//! One module per area; the shared harness is `tests/support` (also used by the interop tier).

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod charts;
mod cli;
mod conn;
mod deploy;
mod fetch;
mod ops;
mod pull;
mod push;
mod signin;
mod store;
mod tls;
mod upstream;
mod warm;
