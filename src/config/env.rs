//! Settings from the environment: every key of the file can also be given as a `BERTH_*`
//! variable, the way container platforms configure daemons.
//!
//! The name is the key's path in upper case, tables joined by a double underscore:
//! `max_cache_size` is `BERTH_MAX_CACHE_SIZE`, `[limits] idle_timeout` is
//! `BERTH_LIMITS__IDLE_TIMEOUT`, `[upstreams."docker.io"] url` is
//! `BERTH_UPSTREAMS__DOCKER_IO__URL` (a table name matches when its letters and digits do, `.`
//! and `-` written as `_`). The value is read as a TOML value when it is one (`300`, `true`,
//! `["a", "b"]`, `[{ url = "..." }]`) and as a string otherwise (`5m`, `50GiB`,
//! `0.0.0.0:5000`). Variables override the file; command-line flags override both.
//!
//! The variables are overlaid on the file's TOML table, which is then read like a file, so a
//! variable's value is checked exactly as the same key in the file would be.

use toml::{Table, Value};

use super::{ConfigError, DOCKER_HUB};

pub const PREFIX: &str = "BERTH_";

/// Variables with the prefix that are not settings.
const NOT_SETTINGS: &[&str] = &["BERTH_LOG", "BERTH_PASSWORD"];

/// Table names a variable may name before any file or variable created them: the built-in
/// upstream, so `BERTH_UPSTREAMS__DOCKER_IO__URL` works without a file.
const KNOWN_TABLES: &[&str] = &[DOCKER_HUB];

/// The file's text with the settings among `vars` applied, and the names of the variables that
/// were; None when no variable is a setting (then the file is read as it is, so its errors keep
/// their line numbers).
pub fn overlay(
    text: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Option<(String, Vec<String>)>, ConfigError> {
    let mut settings: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(name, _)| name.starts_with(PREFIX) && !NOT_SETTINGS.contains(&name.as_str()))
        .collect();
    if settings.is_empty() {
        return Ok(None);
    }
    // The same result whatever order the environment lists them in.
    settings.sort();
    let mut table: Table = toml::from_str(text).map_err(|e| super::toml_error(text, &e))?;
    let mut applied = Vec::new();
    for (name, value) in settings {
        set(&mut table, &name, &value)?;
        applied.push(name);
    }
    let merged = toml::to_string(&table).map_err(|e| ConfigError {
        key: applied.join(", "),
        message: e.to_string(),
    })?;
    Ok(Some((merged, applied)))
}

fn set(table: &mut Table, name: &str, value: &str) -> Result<(), ConfigError> {
    let bad = |message: &str| ConfigError {
        key: name.to_owned(),
        message: message.to_owned(),
    };
    let path: Vec<&str> = name[PREFIX.len()..].split("__").collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(bad(
            "an empty key in the name (a leading, trailing or tripled _)",
        ));
    }
    let (last, tables) = path.split_last().ok_or_else(|| bad("names no key"))?;
    let mut at = table;
    for segment in tables {
        let key = key_for(at, segment);
        let entry = at.entry(key).or_insert_with(|| Value::Table(Table::new()));
        at = match entry {
            Value::Table(t) => t,
            _ => return Err(bad(&format!("{segment} is a value, not a table"))),
        };
    }
    let key = key_for(at, last);
    at.insert(key, parse_value(value));
    Ok(())
}

/// The existing (or known) key a segment of a variable's name stands for, else the segment in
/// lower case (every key berth defines is snake_case).
fn key_for(table: &Table, segment: &str) -> String {
    let wanted = segment.to_ascii_lowercase();
    let same = |k: &str| normalise(k) == wanted;
    table
        .keys()
        .map(String::as_str)
        .chain(KNOWN_TABLES.iter().copied())
        .find(|k| same(k))
        .map_or(wanted.clone(), str::to_owned)
}

fn normalise(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// A TOML value when the text is one, else the text as a string.
fn parse_value(text: &str) -> Value {
    toml::from_str::<Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_toml_and_env(text, vars)
    }

    #[test]
    fn variables_set_keys_at_every_depth_and_override_the_file() {
        let c = load(
            "max_cache_size = \"1GiB\"\n[upstreams.\"ghcr.io\"]\nurl = \"https://ghcr.io\"\n",
            &[
                ("BERTH_MAX_CACHE_SIZE", "50GiB"),
                ("BERTH_LISTEN", "127.0.0.1:5999"),
                ("BERTH_PRIVATE_NS", "[\"private\", \"team\"]"),
                ("BERTH_AUTH_EVERYTHING", "false"),
                ("BERTH_LIMITS__IDLE_TIMEOUT", "2m"),
                ("BERTH_LIMITS__MAX_CONNECTIONS_PER_CLIENT", "7"),
                ("BERTH_UPSTREAMS__GHCR_IO__TAG_TTL", "30"),
                ("BERTH_UPSTREAMS__DOCKER_IO__URL", "http://127.0.0.1:9"),
                (
                    "BERTH_WEBHOOKS",
                    "[{ url = \"http://h/\", secret = \"k\" }]",
                ),
                ("BERTH_LOG", "debug"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(c.max_cache_size.0, 50 << 30);
        assert_eq!(c.listen.port(), 5999);
        assert_eq!(c.private_ns, ["private", "team"]);
        assert_eq!(c.limits.idle_timeout.0.as_secs(), 120);
        assert_eq!(c.limits.max_connections_per_client, 7);
        assert_eq!(c.upstreams["ghcr.io"].tag_ttl.0.as_secs(), 30);
        assert_eq!(
            c.upstreams["docker.io"].url.to_string(),
            "http://127.0.0.1:9"
        );
        assert_eq!(c.webhooks[0].url.to_string(), "http://h/");
        assert!(c.webhooks[0].secret.is_some());
        c.validate().unwrap();
    }

    #[test]
    fn without_variables_the_file_is_read_as_it_is() {
        assert!(overlay("listen = \"x\"", [("HOME".into(), "/".into())])
            .unwrap()
            .is_none());
        // Its errors keep the file's line numbers.
        let e = load("\n\nlisten = 5\n", &[]).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_bad_variable_is_a_one_line_error_naming_it() {
        for (vars, says) in [
            (vec![("BERTH_NO_SUCH_KEY", "1")], "BERTH_NO_SUCH_KEY"),
            (
                vec![("BERTH_LIMITS__IDLE_TIMEOUT", "soon")],
                "BERTH_LIMITS__IDLE_TIMEOUT",
            ),
            (
                vec![("BERTH_MAX_CACHE_SIZE__X", "1")],
                "BERTH_MAX_CACHE_SIZE__X",
            ),
            (
                vec![
                    ("BERTH_MAX_CACHE_SIZE", "1"),
                    ("BERTH_MAX_CACHE_SIZE__X", "1"),
                ],
                "not a table",
            ),
            (vec![("BERTH_LIMITS____X", "1")], "empty key"),
        ] {
            let e = load("", &vars).unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains('\n'), "{vars:?}: {e}");
        }
    }
}
