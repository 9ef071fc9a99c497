//! The failed-login limit: failures and password checks under way, per client address.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// The sliding window failed logins are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses the failure limit tracks before it drops those with nothing to remember.
const TRACKED_ADDRESSES: usize = 10_000;

/// Failed logins per client address in a sliding window, and the password checks under way for
/// each address. An address whose failures and checks under way reach the quota is refused
/// before anything is hashed, so a flood from one address costs at most the quota in bcrypt
/// runs per window, however many requests it sends at once. Requests with the same credentials
/// share one check (a client's parallel requests), so they take room once.
pub(super) struct FailureLimit {
    quota: usize,
    addresses: Mutex<HashMap<IpAddr, Attempts>>,
}

#[derive(Default)]
struct Attempts {
    /// Times of the failures in the window, oldest first.
    failures: VecDeque<Instant>,
    /// Checks under way, by credentials key, with the requests waiting on each.
    checking: HashMap<[u8; 32], usize>,
}

impl Attempts {
    fn expire(&mut self, now: Instant) {
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= FAILURE_WINDOW)
        {
            self.failures.pop_front();
        }
    }

    /// `Err(retry after)` when the address has no room for another check.
    fn room(&self, quota: usize, now: Instant) -> Result<(), Duration> {
        if self.failures.len() + self.checking.len() < quota {
            return Ok(());
        }
        // Room comes back when the oldest failure leaves the window, or a check under way ends.
        let wait = match self.failures.front() {
            Some(oldest) if self.failures.len() >= quota => {
                (*oldest + FAILURE_WINDOW).saturating_duration_since(now)
            }
            _ => Duration::ZERO,
        };
        Err(wait.max(Duration::from_secs(1)))
    }
}

/// A request waiting on a password check for an address; ends when dropped (also when the
/// client leaves).
pub(super) struct Checking<'a> {
    limit: &'a FailureLimit,
    address: IpAddr,
    credentials: [u8; 32],
}

impl Drop for Checking<'_> {
    fn drop(&mut self) {
        if let Some(a) = lock(&self.limit.addresses).get_mut(&self.address) {
            if let Some(n) = a.checking.get_mut(&self.credentials) {
                *n -= 1;
                if *n == 0 {
                    a.checking.remove(&self.credentials);
                }
            }
        }
    }
}

impl FailureLimit {
    pub(super) fn new(quota: u32) -> FailureLimit {
        FailureLimit {
            quota: quota.max(1) as usize,
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// One IPv6 client holds a /64 at least, so that is what counts as its address.
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 => v4,
        }
    }

    /// Whether the address may try credentials now.
    pub(super) fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut addresses = lock(&self.addresses);
        match addresses.get_mut(&FailureLimit::key(ip)) {
            Some(a) => {
                a.expire(now);
                a.room(self.quota, now)
            }
            None => Ok(()),
        }
    }

    /// Takes room for a check of these credentials from the address (none when the same
    /// credentials are being checked for it already), or says how long until there is some.
    pub(super) fn begin(
        &self,
        ip: IpAddr,
        credentials: [u8; 32],
    ) -> Result<Checking<'_>, Duration> {
        let address = FailureLimit::key(ip);
        let now = Instant::now();
        let mut addresses = lock(&self.addresses);
        if addresses.len() >= TRACKED_ADDRESSES && !addresses.contains_key(&address) {
            addresses.retain(|_, a| {
                a.expire(now);
                !a.checking.is_empty() || !a.failures.is_empty()
            });
        }
        let a = addresses.entry(address).or_default();
        a.expire(now);
        if !a.checking.contains_key(&credentials) {
            a.room(self.quota, now)?;
        }
        *a.checking.entry(credentials).or_insert(0) += 1;
        Ok(Checking {
            limit: self,
            address,
            credentials,
        })
    }

    pub(super) fn failed(&self, ip: IpAddr) {
        let mut addresses = lock(&self.addresses);
        let a = addresses.entry(FailureLimit::key(ip)).or_default();
        a.failures.push_back(Instant::now());
        while a.failures.len() > self.quota {
            a.failures.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_limit_counts_failures_and_checks_under_way() {
        let limit = FailureLimit::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = limit.begin(ip, [1; 32]).unwrap();
        // The same credentials join the check under way; others need room.
        let a2 = limit.begin(ip, [1; 32]).unwrap();
        let b = limit.begin(ip, [2; 32]).unwrap();
        assert!(limit.begin(ip, [3; 32]).is_err());
        drop((a, a2));
        limit.failed(ip);
        drop(b);
        limit.failed(ip);
        let wait = limit.check(ip).unwrap_err();
        assert!(
            wait > Duration::from_secs(50) && wait <= FAILURE_WINDOW,
            "{wait:?}"
        );
        // One IPv6 client is its /64.
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        limit.failed(v6);
        limit.failed("2001:db8::2".parse().unwrap());
        assert!(limit.check("2001:db8::ffff".parse().unwrap()).is_err());
        assert!(limit.check("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }
}
