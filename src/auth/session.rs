//! What the status page's sign-in form needs from authentication: a password check through the
//! same path as HTTP Basic (its failed-login limit, its bound on bcrypt runs, its cache), and
//! whether a signed-in user is still in the htpasswd file. The sessions themselves are the
//! status page's (`ops::status::session`).

use std::net::IpAddr;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue};

use crate::lock;
use crate::oci::error::RegistryError;

use super::{Authenticator, User};

impl Authenticator {
    /// Checks a user name and password typed into the sign-in form. They are handed to
    /// [`Authenticator::authenticate`] as the Basic credentials a client would send, so a form
    /// and a client are limited, counted and logged alike.
    pub async fn sign_in(
        &self,
        name: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<User, RegistryError> {
        // Basic credentials split at the first ':', which no user name contains; a name with
        // one would be checked as another user's.
        if name.is_empty() || name.contains(':') || self.htpasswd.is_none() {
            return Err(self.failed(client));
        }
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{name}:{password}"));
        let mut headers = HeaderMap::new();
        let value =
            HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| self.failed(client))?;
        headers.insert(http::header::AUTHORIZATION, value);
        match self.authenticate(&headers, client).await? {
            Some(user) => Ok(user),
            None => Err(self.failed(client)),
        }
    }

    /// The user a session speaks for, if they are still in the htpasswd file (a user removed
    /// from it loses their sessions at their next request). Like a password, a session may do
    /// whatever its user may.
    pub async fn session_user(&self, name: &str) -> Option<User> {
        let path = self.htpasswd.clone()?;
        let users = self.users.clone();
        let owned = name.to_owned();
        let present = tokio::task::spawn_blocking(move || {
            let mut users = lock(&users);
            users.refresh(&path);
            users.entries.contains_key(&owned)
        })
        .await
        .unwrap_or(false);
        present.then(|| User {
            name: name.into(),
            grants: None,
        })
    }
}

#[cfg(test)]
impl User {
    /// A user whose credentials grant only `actions` on `resource`, as a token's do: what a
    /// user without some permission looks like to the code that checks it.
    pub(crate) fn limited(name: &str, resource: &str, actions: super::Actions) -> User {
        let grants: super::Grants =
            serde_json::from_value(serde_json::json!({ resource: actions }))
                .expect("grants from a map of actions");
        User {
            name: name.into(),
            grants: Some(std::sync::Arc::new(grants)),
        }
    }
}
