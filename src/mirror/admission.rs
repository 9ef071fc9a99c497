//! Whether a request may go on to the upstream, asked just before it would.
//!
//! The mirror does not know about clients or their limits; the ops layer does. It arms an
//! [`UpstreamAdmission`] for each request it serves (when cache hits are exempt from client rate
//! limits, only requests that need the upstream count), and the mirror and handlers call
//! [`before_upstream`] where a request is about to contact an upstream.

use std::future::Future;

use crate::oci::error::RegistryError;

/// Decides, once per request, whether it may contact the upstream.
pub trait UpstreamAdmission: Send {
    fn admit(&self) -> Result<(), RegistryError>;
}

tokio::task_local! {
    static ADMISSION: Box<dyn UpstreamAdmission>;
}

/// Runs a request's handler with `admission` armed.
pub async fn scope<F: Future>(admission: Box<dyn UpstreamAdmission>, f: F) -> F::Output {
    ADMISSION.scope(admission, f).await
}

/// Called where a request is about to contact an upstream: refused when the armed admission
/// says so; allowed when none is armed.
pub fn before_upstream() -> Result<(), RegistryError> {
    ADMISSION.try_with(|a| a.admit()).unwrap_or(Ok(()))
}
