//! The test harness, by role:
//!
//! - [`fake`]: an in-process fake upstream registry with fault injection;
//! - [`image`]: synthetic images and manifest lists, deterministic blobs, digests;
//! - [`harness`]: berth started in-process against the fake, with its own data dir;
//! - [`client`]: a small HTTP client and [`client::wait_for`];
//! - [`logs`]: berth's log lines captured as JSON;
//! - [`contract`]: what every content-store backend must do.
//!
//! The fresh-machine tier (`tests/it`) uses all of it; the interop tier (`tests/interop`) the
//! parts it needs.

pub mod client;
pub mod contract;
pub mod fake;
pub mod harness;
pub mod image;
pub mod logs;

pub use self::client::*;
pub use self::fake::*;
pub use self::harness::*;
pub use self::image::*;
pub use self::logs::*;
