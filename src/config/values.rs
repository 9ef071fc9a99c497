//! The types of single settings: sizes, durations, URLs, networks. Each parses from the text a
//! person writes in the file or on the command line, and reports a bad value in one line.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A setting written as a number or as text in the file: `4096` or `"4GiB"`, `300` or `"5m"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    N(u64),
    S(String),
}

/// `Deserialize` through the type's `parse`: from a string, or also from a number when the
/// number form is meant (`ByteSize`, `Seconds`).
macro_rules! deserialize_by_parse {
    (numbers: $($n:ty),*; strings: $($s:ty),*) => {
        $(impl<'de> Deserialize<'de> for $n {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = match Raw::deserialize(d)? {
                    Raw::N(n) => n.to_string(),
                    Raw::S(s) => s,
                };
                <$n>::parse(&text).map_err(serde::de::Error::custom)
            }
        })*
        $(impl<'de> Deserialize<'de> for $s {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$s>::parse(&s).map_err(serde::de::Error::custom)
            }
        })*
    };
}

deserialize_by_parse!(numbers: ByteSize, Seconds; strings: UpstreamUrl, PublicUrl, WebhookUrl, IpNet);

/// Bytes for people: `12 B`, `1.5 KiB`, `5.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// A byte count written as `50GiB`, `1.5KiB`, `10 MB`, `4096`: `B`, `KiB` … `EiB` (or `Ki` …),
/// `KB` … `EB` (or `K` …), in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        // bytesize takes a bare integer as bytes, but wants a unit after a fraction (`1.5`).
        let bytes = if s.ends_with(|c: char| c.is_ascii_digit() || c == '.') {
            format!("{s}B").parse()
        } else {
            s.parse::<bytesize::ByteSize>()
        };
        bytes
            .map(|b| ByteSize(b.as_u64()))
            .map_err(|e| format!("{s:?} is not a size like \"50GiB\": {e}"))
    }
}

/// A duration written as `300`, `300s`, `5m`, `1h`, `250ms`, `1.5d`.
///
/// Parsed by hand rather than with `humantime::parse_duration`: that takes only whole numbers
/// followed by a unit, so a plain `300` (seconds, as the file and `--grace` accept) and
/// fractions like `1.5h` would each need a number-and-unit split of their own around it — the
/// whole of this parser again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

/// The longest duration any setting takes: longer ones are surely typos, and every duration
/// must stay addable to the clock without overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86400);

impl Seconds {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like \"5m\""))?;
        let secs = match unit.trim() {
            "" | "s" => num,
            "ms" => num / 1000.0,
            "m" => num * 60.0,
            "h" => num * 3600.0,
            "d" => num * 86400.0,
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} (use ms, s, m, h, d)"
                ))
            }
        };
        match Duration::try_from_secs_f64(secs) {
            Ok(d) if d <= MAX_DURATION => Ok(Seconds(d)),
            _ => Err(format!("{s:?} is not a duration of at most 100 years")),
        }
    }
}

/// An upstream registry's base URL: http or https, a host, an optional port, no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: String,
    /// `host` or `host:port`, as sent in the Host header.
    pub authority: String,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s
            .trim_end_matches('/')
            .parse()
            .map_err(|e| format!("{s:?}: {e}"))?;
        let scheme = uri.scheme_str().unwrap_or_default().to_owned();
        if scheme != "http" && scheme != "https" {
            return Err(format!("{s:?}: the scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{s:?}: no host"))?
            .to_string();
        if authority.contains('@') {
            return Err(format!(
                "{s:?}: put credentials in user/password_file, not in the URL"
            ));
        }
        if !matches!(uri.path(), "" | "/") {
            return Err(format!("{s:?}: an upstream URL has no path"));
        }
        Ok(UpstreamUrl { scheme, authority })
    }

    pub fn docker_hub() -> Self {
        UpstreamUrl {
            scheme: "https".into(),
            authority: "registry-1.docker.io".into(),
        }
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// The URL clients reach berth at: http or https, a host, an optional port, no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl(pub UpstreamUrl);

impl PublicUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s.trim_end_matches('/').split_once("://").map(|(_, r)| r);
        if rest.is_some_and(|r| r.contains(['/', '?', '#'])) {
            return Err(format!(
                "{s:?}: berth serves the registry API at the root; give the URL without a path"
            ));
        }
        UpstreamUrl::parse(s).map(PublicUrl)
    }
}

impl fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A webhook receiver's URL: http or https, with a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(pub http::Uri);

impl WebhookUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!("{s:?}: the scheme must be http or https"));
        }
        if uri.host().is_none() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(WebhookUrl(uri))
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An IP network from `trusted_proxies`: `10.0.0.1`, `10.0.0.0/8`, `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet(ipnet::IpNet);

impl IpNet {
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let net = match s.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) if !s.contains('/') => match s.parse::<std::net::IpAddr>() {
                Ok(addr) => ipnet::IpNet::from(addr),
                Err(_) => return Err(format!("{s:?} is not an IP address or CIDR block")),
            },
            Err(e) => return Err(format!("{s:?}: {e}")),
        };
        // An IPv4 network given in IPv6 form matches the IPv4 addresses it names.
        Ok(IpNet(match net {
            ipnet::IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len().saturating_sub(96))
                    .map(ipnet::IpNet::V4)
                    .map_err(|e| format!("{s:?}: {e}"))?,
                None => net,
            },
            v4 => v4,
        }))
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A `cors_origins` entry: `*`, or a scheme and host (and port) with no path.
pub fn valid_origin(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.trim_end_matches('/').contains('/')
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]/".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_match() {
        let n = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.9.9".parse().unwrap()));
        let one = IpNet::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(IpNet::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("example.com").is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(ByteSize::parse("50GiB").unwrap().0, 50 << 30);
        assert_eq!(ByteSize::parse("1.5KiB").unwrap().0, 1536);
        assert_eq!(ByteSize::parse("10 MB").unwrap().0, 10_000_000);
        assert!(ByteSize::parse("10 XB").is_err());
        assert_eq!(Seconds::parse("5m").unwrap().0, Duration::from_secs(300));
        assert_eq!(
            Seconds::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert!(Seconds::parse("soon").is_err());
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
