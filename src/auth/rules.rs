//! The access rules applied: what a user may do to a repository under the config's `[groups]`
//! and `[[access]]` tables, and the refusal that names what is missing.
//!
//! Without rules, berth behaves as it always has: every user pulls, pushes and deletes in the
//! private namespace, and nobody is admin. With rules, a user may do in the private namespace
//! only what a rule matching the user (by name or group) and the repository grants; admin
//! (purging mirrored content) is granted by rules alone. Mirrored pulls are not governed by
//! rules: they stay anonymous, or open to every user under `auth_everything`.

use crate::auth::{Access, Actions, Need};
use crate::config::{AccessRule, Config, Permission};
use crate::oci::names::RepoName;

/// What a user may do to one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rights {
    pub actions: Actions,
    pub admin: bool,
}

/// What `user` may do to `repo` (named as the request names it).
pub fn rights(config: &Config, user: &str, repo: &RepoName) -> Rights {
    let private = config.private_ns.iter().any(|ns| repo.is_in_namespace(ns));
    if config.access.is_empty() {
        return Rights {
            actions: if private { Actions::ALL } else { Actions::PULL },
            admin: false,
        };
    }
    let mut granted = Vec::new();
    for rule in &config.access {
        if names_user(config, rule, user)
            && rule.repositories.iter().any(|p| p.matches(repo.as_str()))
        {
            granted.extend_from_slice(&rule.actions);
        }
    }
    let actions = if private {
        granted
            .iter()
            .map(|p| match p {
                Permission::Pull => Actions::PULL,
                Permission::Push => Actions::PUSH,
                Permission::Delete => Actions::DELETE,
                Permission::Admin => Actions::NONE,
            })
            .fold(Actions::NONE, Actions::union)
    } else {
        Actions::PULL
    };
    Rights {
        actions,
        admin: granted.contains(&Permission::Admin),
    }
}

/// Why a user is refused: the permission missing, and on which repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub missing: Permission,
    /// A repository's name, or what else was asked for (`every repository`).
    pub on: String,
}

impl Refusal {
    pub fn message(&self, user: &str) -> String {
        format!("{user} may not {} {}", self.missing.verb(), self.on)
    }
}

/// Whether a rule makes `user` admin of every repository (the pattern `*`): what managing
/// users needs, since a user of the htpasswd file is no repository's.
pub fn admin_of_everything(config: &Config, user: &str) -> bool {
    config.access.iter().any(|rule| {
        rule.actions.contains(&Permission::Admin)
            && rule.repositories.iter().any(|p| p.as_str() == "*")
            && names_user(config, rule, user)
    })
}

/// Whether a rule is about `user`: by name, or by one of the user's groups.
fn names_user(config: &Config, rule: &AccessRule, user: &str) -> bool {
    rule.users.iter().any(|u| u == user)
        || rule.groups.iter().any(|g| {
            config
                .groups
                .get(g)
                .is_some_and(|members| members.iter().any(|m| m == user))
        })
}

/// Whether `user` may do what a request needs; only the private namespace and admin requests
/// are governed by rules.
pub fn check(config: &Config, user: &str, access: Access, need: &Need) -> Result<(), Refusal> {
    let Some(repo) = need.repository() else {
        if access == Access::Admin && !admin_of_everything(config, user) {
            return Err(Refusal {
                missing: Permission::Admin,
                on: "every repository (user management needs admin on \"*\")".into(),
            });
        }
        return Ok(());
    };
    let rights = rights(config, user, &repo);
    let missing = match access {
        Access::Admin if !rights.admin => Permission::Admin,
        Access::PrivateRead | Access::PrivateWrite if !rights.actions.contains(need.actions) => {
            if need.actions.contains(Actions::PUSH) {
                Permission::Push
            } else if need.actions.contains(Actions::DELETE) {
                Permission::Delete
            } else {
                Permission::Pull
            }
        }
        _ => return Ok(()),
    };
    Err(Refusal {
        missing,
        on: repo.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rules: &str) -> Config {
        let c = Config::from_toml(&format!("private_ns = [\"private\"]\n{rules}")).unwrap();
        c.validate().unwrap();
        c
    }

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn without_rules_users_own_the_private_namespace_and_nobody_is_admin() {
        let c = config("");
        let r = rights(&c, "alice", &name("private/x"));
        assert_eq!(r.actions, Actions::ALL);
        assert!(!r.admin);
        assert_eq!(
            rights(&c, "alice", &name("library/alpine")).actions,
            Actions::PULL
        );
    }

    #[test]
    fn rules_grant_per_user_group_and_pattern() {
        let c = config(
            "[groups]\nteam-a = [\"alice\", \"bob\"]\n\
             [[access]]\ngroups = [\"team-a\"]\nrepositories = [\"private/team-a/*\"]\nactions = [\"pull\", \"push\"]\n\
             [[access]]\nusers = [\"carol\"]\nrepositories = [\"*\"]\nactions = [\"pull\", \"push\", \"delete\", \"admin\"]\n",
        );
        let bob = rights(&c, "bob", &name("private/team-a/app"));
        assert!(bob.actions.contains(Actions::PUSH) && !bob.actions.contains(Actions::DELETE));
        assert!(!bob.admin);
        assert_eq!(
            rights(&c, "bob", &name("private/team-b/app")).actions,
            Actions::NONE
        );
        assert!(rights(&c, "carol", &name("library/alpine")).admin);
        assert_eq!(
            rights(&c, "carol", &name("private/team-b/app")).actions,
            Actions::ALL
        );
        assert_eq!(
            rights(&c, "dave", &name("private/team-a/app")).actions,
            Actions::NONE
        );
    }
}
