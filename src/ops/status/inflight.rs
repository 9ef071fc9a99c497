//! The status page's "In flight" section: blob downloads from upstreams and blob uploads into
//! the private namespace under way, and the note that tells an anonymous visitor that private
//! repositories exist without naming them.
//!
//! Which blobs are being pulled or pushed, and by whom, is for the visitors who may see the
//! private namespace ([`App::may_see_private`](crate::http::App)); others see how many.

use std::fmt::Write as _;

use crate::config::human_bytes;
use crate::oci::error::RegistryError;
use crate::ops::Service;
use crate::store::{blocking, now_secs};

use super::render::{esc, human_duration};

/// Rows listed of each kind; the count says how many more there are.
const MAX_ROWS: usize = 50;

/// The "In flight" section.
pub(super) async fn section(
    app: &Service,
    private: bool,
    h: &mut String,
) -> Result<(), RegistryError> {
    let downloads = app.mirror.fetches.in_flight();
    let uploads = app.private.uploads_open();
    let _ = write!(
        h,
        "<section id=\"in-flight\"><h2>In flight</h2><p>\
         <span id=\"downloads-in-flight\">{downloads}</span> downloads from upstreams, \
         <span id=\"uploads-in-flight\">{uploads}</span> uploads into the private namespace.</p>"
    );
    if !private {
        if downloads + uploads > 0 {
            h.push_str("<p class=\"muted\">Sign in to see which.</p>");
        }
        h.push_str("</section>");
        return Ok(());
    }
    let list = app.mirror.fetches.list(MAX_ROWS);
    if !list.is_empty() {
        h.push_str(
            "<h3>Downloads</h3><table id=\"downloads\"><tr><th>Digest</th><th>Repository</th>\
             <th>Upstream</th><th class=\"num\">Received</th><th class=\"num\">Waiting clients</th></tr>",
        );
        for d in &list {
            let digest = d.digest.to_string();
            let _ = write!(
                h,
                "<tr><td><code title=\"{}\">{}</code></td><td>{}</td><td>{}</td>\
                 <td class=\"num\">{} / {}</td><td class=\"num\">{}</td></tr>",
                esc(&digest),
                esc(short(&digest)),
                esc(d.repo.as_str()),
                esc(&d.upstream),
                human_bytes(d.received),
                d.total.map_or_else(|| "?".to_owned(), human_bytes),
                d.readers,
            );
        }
        h.push_str("</table>");
    }
    let sessions = app.private.store.uploads.clone();
    let sessions = blocking(move || sessions.in_progress(MAX_ROWS)).await?;
    if !sessions.is_empty() {
        h.push_str(
            "<h3>Uploads</h3><table id=\"uploads\"><tr><th>Session</th><th>Repository</th>\
             <th>User</th><th class=\"num\">Received</th><th>Started</th></tr>",
        );
        let now = now_secs();
        for (id, info, len) in &sessions {
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td>{} ago</td></tr>",
                esc(short(id.as_str())),
                esc(&info.repo),
                esc(info.owner.as_deref().unwrap_or("—")),
                human_bytes(*len),
                human_duration(std::time::Duration::from_secs(
                    now.saturating_sub(info.started)
                )),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
    Ok(())
}

/// The note an anonymous visitor gets where the private repositories would be listed.
pub(super) const HIDDEN_NOTE: &str = "<p class=\"muted\" id=\"private-hidden\">\
    Private repositories exist but are hidden: <a href=\"/ui/login\">sign in</a> to see them.</p>";

fn short(s: &str) -> &str {
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    s.get(..12).unwrap_or(s)
}
