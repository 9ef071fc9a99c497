//! A webhook receiver as configured: its URL, the secret that signs what it is sent, and extra
//! headers. Written either as a bare URL (`webhooks = ["https://ci/hook"]`) or as a table
//! (`[[webhooks]] url = ... secret_file = ... headers = { ... }`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::values::WebhookUrl;

/// Longest secret accepted: a secret is a key, not a document.
const MAX_SECRET: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: WebhookUrl,
    pub secret: Option<WebhookSecret>,
    /// Sent with every delivery (an API key a receiver wants, say); validated as HTTP headers.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Where the HMAC key comes from. A file keeps it out of the config (and out of `ps`); inline is
/// for configs that are themselves secret (a Kubernetes Secret, `BERTH_*` variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookSecret {
    Inline(String),
    File(PathBuf),
}

impl WebhookSecret {
    /// The key's bytes: the inline text, or the file's contents without a trailing newline.
    pub fn load(&self) -> Result<Vec<u8>, String> {
        let bytes = match self {
            WebhookSecret::Inline(s) => s.as_bytes().to_vec(),
            WebhookSecret::File(path) => {
                let len = std::fs::metadata(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .len();
                if len > MAX_SECRET {
                    return Err(format!(
                        "{}: {len} bytes; a secret is at most {MAX_SECRET}",
                        path.display()
                    ));
                }
                let mut b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                    b.pop();
                }
                b
            }
        };
        if bytes.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(bytes)
    }
}

impl Webhook {
    pub fn new(url: WebhookUrl) -> Webhook {
        Webhook {
            url,
            secret: None,
            headers: Vec::new(),
        }
    }
}

impl std::fmt::Display for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.url.fmt(f)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    url: WebhookUrl,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Reads either form, keeping the table's own error messages (an untagged enum would replace
/// them with "did not match any variant").
struct RawVisitor;

impl<'de> serde::de::Visitor<'de> for RawVisitor {
    type Value = Table;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a URL or a table with url, secret or secret_file, headers")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Table, E> {
        Ok(Table {
            url: WebhookUrl::parse(s).map_err(E::custom)?,
            secret: None,
            secret_file: None,
            headers: BTreeMap::new(),
        })
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Table, A::Error> {
        Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))
    }
}

impl<'de> Deserialize<'de> for Webhook {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let t = d.deserialize_any(RawVisitor)?;
        let secret = match (t.secret, t.secret_file) {
            (Some(_), Some(_)) => {
                return Err(D::Error::custom("give secret or secret_file, not both"))
            }
            (Some(s), None) => Some(WebhookSecret::Inline(s)),
            (None, Some(p)) => Some(WebhookSecret::File(p)),
            (None, None) => None,
        };
        let mut headers = Vec::new();
        for (name, value) in t.headers {
            let n = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| D::Error::custom(format!("{name:?} is not a header name")))?;
            let v = http::HeaderValue::from_str(&value).map_err(|_| {
                D::Error::custom(format!("the value of {name:?} is not a header value"))
            })?;
            headers.push((n, v));
        }
        Ok(Webhook {
            url: t.url,
            secret,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn urls_and_tables_both_configure_receivers() {
        let c = Config::from_toml(
            "[[webhooks]]\nurl = \"https://ci.example/hook\"\nsecret = \"k\"\nheaders = { X-Team = \"a\" }\n\
             [[webhooks]]\nurl = \"http://127.0.0.1:9/other\"\n",
        )
        .unwrap();
        assert_eq!(c.webhooks.len(), 2);
        assert_eq!(c.webhooks[0].url.to_string(), "https://ci.example/hook");
        assert_eq!(c.webhooks[0].secret.as_ref().unwrap().load().unwrap(), b"k");
        assert_eq!(c.webhooks[0].headers[0].0.as_str(), "x-team");
        assert!(c.webhooks[1].secret.is_none());
        let c = Config::from_toml("webhooks = [\"http://127.0.0.1:9/hook\"]\n").unwrap();
        assert!(c.webhooks[0].secret.is_none() && c.webhooks[0].headers.is_empty());
    }

    #[test]
    fn bad_receivers_are_one_line_errors() {
        for (toml, says) in [
            (
                "[[webhooks]]\nurl = \"http://h/\"\nsecret = \"a\"\nsecret_file = \"/x\"\n",
                "not both",
            ),
            (
                "[[webhooks]]\nurl = \"http://h/\"\nheaders = { \"bad name\" = \"v\" }\n",
                "not a header name",
            ),
            ("[[webhooks]]\nurl = \"ftp://h/\"\n", "http or https"),
            (
                "[[webhooks]]\nurl = \"http://h/\"\nsecrets = \"a\"\n",
                "webhooks",
            ),
        ] {
            let e = Config::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains('\n'), "{toml}: {e}");
        }
        // A secret file that cannot be read is caught when the config is checked, not at the
        // first push.
        let c = Config::from_toml(
            "[[webhooks]]\nurl = \"http://h/\"\nsecret_file = \"/nonexistent/secret\"\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("webhooks[0].secret") && e.contains("/nonexistent/secret"),
            "{e}"
        );
        let c = Config::from_toml("[[webhooks]]\nurl = \"http://h/\"\nsecret = \"\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("empty"));
    }
}
