//! What can go wrong talking to an upstream, and how a failed request is classified.

use std::time::Duration;

use http::StatusCode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream timed out")]
    Timeout,
    #[error("upstream says not found")]
    NotFound,
    #[error("upstream rate limit hit; retry after {retry_after:?}")]
    TooManyRequests { retry_after: Duration },
    #[error("upstream denied access ({0})")]
    Denied(StatusCode),
    #[error("upstream answered {0}")]
    Status(StatusCode),
    #[error("upstream sent invalid content: {0}")]
    Invalid(String),
    /// The circuit breaker is open: recent requests failed, so none is sent for a while.
    #[error("upstream is down ({failures} failed requests in a row); next try in {}s", retry_in.as_secs().max(1))]
    Down { failures: u32, retry_in: Duration },
}

impl UpstreamError {
    /// Whether a cached copy should be served instead: the upstream is down, not saying "no".
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_)
            | UpstreamError::Timeout
            | UpstreamError::Down { .. }
            | UpstreamError::TooManyRequests { .. } => true,
            UpstreamError::Status(s) => s.is_server_error(),
            _ => false,
        }
    }

    /// A short name for metric labels and log fields.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable(_) => "unreachable",
            UpstreamError::Timeout => "timeout",
            UpstreamError::NotFound => "not_found",
            UpstreamError::TooManyRequests { .. } => "rate_limited",
            UpstreamError::Denied(_) => "denied",
            UpstreamError::Status(_) => "status",
            UpstreamError::Invalid(_) => "invalid",
            UpstreamError::Down { .. } => "down",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

impl UpstreamError {
    /// What a request that got no response came to: a timeout when anything in the error's
    /// sources timed out (the connector's connect timeout, a socket or a connection that timed
    /// out), else an unreachable upstream, with the whole chain as the message.
    pub(super) fn unanswered(e: &hyper_util::client::legacy::Error) -> UpstreamError {
        if timed_out(e) {
            UpstreamError::Timeout
        } else {
            UpstreamError::Unreachable(error_chain(e))
        }
    }
}

/// Whether `e` or any error it wraps is a timeout, by type: an I/O error of kind `TimedOut` (the
/// connect timeout's, or the OS's `ETIMEDOUT`), or a hyper timeout.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
            // An I/O error's own payload is not among its sources.
            if io.get_ref().is_some_and(|inner| timed_out(inner)) {
                return true;
            }
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        next = e.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// An error that wraps another, as the client's and the connector's errors do.
    #[derive(Debug)]
    struct Wrapping(&'static str, Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.1)
        }
    }

    #[test]
    fn timeouts_are_told_by_type_not_text() {
        // What the connector's connect timeout gives: tokio's Elapsed in an I/O error of kind
        // TimedOut, inside the connector's error.
        let elapsed = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(std::time::Duration::ZERO, std::future::pending::<()>()).await
            })
            .unwrap_err();
        let connect = Wrapping(
            "tcp connect error",
            Box::new(io::Error::new(io::ErrorKind::TimedOut, elapsed)),
        );
        assert!(timed_out(&Wrapping(
            "client error (Connect)",
            Box::new(connect)
        )));
        // The OS's ETIMEDOUT.
        assert!(timed_out(&io::Error::from_raw_os_error(110)));
        // A timeout wrapped in an I/O error of another kind.
        let wrapped = io::Error::other(io::Error::new(io::ErrorKind::TimedOut, "x"));
        assert!(timed_out(&wrapped));
        // Refused connections are not timeouts, whatever their text says.
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "timed out? no: refused");
        assert!(!timed_out(&Wrapping(
            "tcp connect error",
            Box::new(refused)
        )));
        assert!(!timed_out(&io::Error::other("timeout")));
    }
}
