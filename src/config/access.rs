//! The access rules of the config file (`[groups]` and `[[access]]`): who may do what to which
//! repositories. Parsed and checked here; `auth::rules` applies them.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use super::{err, ConfigError};
use crate::oci::names::RepoName;

/// What a rule may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Pull,
    Push,
    Delete,
    /// Purging mirrored content, and berth's admin API.
    Admin,
}

impl Permission {
    /// How a refusal names what was missing: "alice may not push to private/app".
    pub fn verb(self) -> &'static str {
        match self {
            Permission::Pull => "pull from",
            Permission::Push => "push to",
            Permission::Delete => "delete from",
            Permission::Admin => "administer (purge)",
        }
    }
}

/// One `[[access]]` table: these users and groups may do these actions to these repositories.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub repositories: Vec<RepoPattern>,
    pub actions: Vec<Permission>,
}

/// A repository name pattern: a repository name in which `*` stands for any run of characters,
/// `/` included (so `private/team-a/*` matches `private/team-a/app` and `private/team-a/x/app`,
/// and `*` alone matches every repository).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RepoPattern(String);

impl TryFrom<String> for RepoPattern {
    type Error = String;

    fn try_from(s: String) -> Result<RepoPattern, String> {
        // Every name the pattern matches must be a repository name; with its stars filled in,
        // the pattern must be one.
        if RepoName::parse(&s.replace('*', "x")).is_err() {
            return Err(format!(
                "{s:?} is not a repository name pattern (lower-case names, `/` between parts, `*` for any run of characters)"
            ));
        }
        Ok(RepoPattern(s))
    }
}

impl RepoPattern {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*`-only glob matching, greedy with backtracking to the last star: linear in practice,
/// never exponential.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Checks what serde cannot: every group a rule names exists, every rule names someone, some
/// repositories and some actions.
pub(super) fn validate(
    groups: &BTreeMap<String, Vec<String>>,
    rules: &[AccessRule],
) -> Result<(), ConfigError> {
    for (i, rule) in rules.iter().enumerate() {
        let key = |k: &str| format!("access[{i}].{k}");
        if let Some(g) = rule.groups.iter().find(|g| !groups.contains_key(*g)) {
            return Err(err(
                key("groups"),
                format!("unknown group {g:?} (define it under [groups])"),
            ));
        }
        if rule.users.is_empty() && rule.groups.is_empty() {
            return Err(err(key("users"), "a rule must name users or groups"));
        }
        if rule.repositories.is_empty() {
            return Err(err(key("repositories"), "a rule must name repositories"));
        }
        if rule.actions.is_empty() {
            return Err(err(key("actions"), "a rule must grant some actions"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pattern(s: &str) -> RepoPattern {
        RepoPattern::try_from(s.to_owned()).unwrap()
    }

    #[test]
    fn patterns_match_within_and_across_segments() {
        let p = pattern("private/team-a/*");
        assert!(p.matches("private/team-a/app"));
        assert!(p.matches("private/team-a/x/app"));
        assert!(!p.matches("private/team-a"));
        assert!(!p.matches("private/team-b/app"));
        assert!(pattern("*").matches("library/alpine"));
        assert!(pattern("*/alpine").matches("library/alpine"));
        assert!(pattern("private/*-dev").matches("private/a/b-dev"));
        assert!(!pattern("private/*-dev").matches("private/a/b-prod"));
        assert!(pattern("private/app").matches("private/app"));
        assert!(!pattern("private/app").matches("private/app2"));
        for bad in ["Private/*", "private//*", "", "/x", "a b"] {
            assert!(RepoPattern::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_are_checked_at_load_with_one_line_errors() {
        let ok = Config::from_toml(
            "[groups]\nteam-a = [\"alice\"]\n[[access]]\ngroups = [\"team-a\"]\nrepositories = [\"private/*\"]\nactions = [\"pull\", \"push\"]\n",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(
            ok.access[0].actions,
            vec![Permission::Pull, Permission::Push]
        );
        for (text, names) in [
            (
                "[[access]]\nusers = [\"a\"]\nrepositories = [\"*\"]\nactions = [\"pusj\"]\n",
                "pusj",
            ),
            (
                "[[access]]\nusers = [\"a\"]\nrepositories = [\"Bad/*\"]\nactions = [\"pull\"]\n",
                "Bad/*",
            ),
        ] {
            let e = Config::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(names) && e.contains("access"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = Config::from_toml(
            "[[access]]\ngroups = [\"nobody\"]\nrepositories = [\"*\"]\nactions = [\"pull\"]\n",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("access[0].groups") && e.contains("nobody"),
            "{e}"
        );
        let e = Config::from_toml("[[access]]\nrepositories = [\"*\"]\nactions = [\"pull\"]\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("users or groups"), "{e}");
    }
}
