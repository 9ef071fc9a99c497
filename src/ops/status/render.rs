//! The status pages' HTML: the overview, a repository's page, and the small formatting helpers.
//! Everything interpolated is HTML-escaped.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use crate::config::human_bytes;
use crate::oci::error::RegistryError;
use crate::oci::media::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::oci::names::{Digest, RepoName, Tag};
use crate::ops::Service;
use crate::store::{now_secs, Area};

use super::forms::{permitted, Action};
use super::listing::{self, Repo};
use super::session::Viewer;
use super::{Counts, PRIVATE};

const TOP_PULLS: usize = 10;

const CSS: &str =
    "body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}\
header{background:#1d3557;color:#fff;padding:14px 28px}header h1{margin:0;font-size:22px}\
header a{color:#fff;text-decoration:none}header small{opacity:.8}\
main{padding:18px 28px;max-width:1200px}section{background:#fff;border:1px solid #dde1e6;\
border-radius:6px;padding:12px 18px;margin:0 0 16px}h2{font-size:16px;margin:4px 0 10px}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;\
border-bottom:1px solid #eceef1;vertical-align:top}th{font-weight:600;color:#56606b}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
.bar{background:#e8ebef;border-radius:4px;height:12px;width:320px;display:inline-block;\
vertical-align:middle;overflow:hidden}.bar span{display:block;height:100%;background:#2a9d8f}\
.ok{color:#2a7d34}.bad{color:#b3261e}.muted{color:#7a838d}code{font-size:12px}\
.grid{display:flex;gap:16px;flex-wrap:wrap}.grid section{flex:1;min-width:320px}\
header .who{float:right;margin-top:4px}header form,td form{display:inline;margin:0}\
.notice{background:#e6f4ea;border:1px solid #b7dfc2;border-radius:6px;padding:8px 14px}";

/// A size for people, marked as a lower bound when not everything could be counted.
fn size_text(size: u64, complete: bool) -> String {
    if complete {
        human_bytes(size)
    } else {
        format!("≥ {}", human_bytes(size))
    }
}

pub(super) async fn overview(
    app: &Service,
    private: bool,
    viewer: &Viewer,
) -> Result<String, RegistryError> {
    let listing = listing::overview(app, private).await?;
    let repos = &listing.repos;
    let (since_start, today) = app.ops.traffic.snapshot();
    let disk = &app.mirror.disk;
    let mut h = String::with_capacity(16 << 10);
    head(&mut h, "berth status", viewer);
    let _ = write!(
        h,
        "<main><div class=\"grid\"><section><h2>Server</h2><table>\
         <tr><th>Uptime</th><td id=\"uptime\">{}</td></tr>\
         <tr><th>Version</th><td>{}</td></tr>\
         <tr><th>Cache</th><td><span class=\"bar\"><span style=\"width:{:.1}%\"></span></span> \
         <span id=\"cache-size\">{}</span> of {} ({:.1}%)</td></tr>\
         <tr><th>Evictions</th><td>{} ({})</td></tr>\
         <tr><th>Downloads in flight</th><td>{}</td></tr></table></section>",
        human_duration(app.started.elapsed()),
        esc(env!("CARGO_PKG_VERSION")),
        percent(disk.size(), disk.limit()).min(100.0),
        human_bytes(disk.size()),
        human_bytes(disk.limit()),
        percent(disk.size(), disk.limit()),
        disk.evictions.load(Ordering::Relaxed),
        human_bytes(disk.evicted_bytes.load(Ordering::Relaxed)),
        app.mirror.fetches.in_flight(),
    );
    h.push_str(
        "<section><h2>Traffic</h2><table><tr><th></th><th class=\"num\">Today (UTC)</th>\
         <th class=\"num\">Since start</th></tr>",
    );
    let row = |h: &mut String, label: &str, id: &str, f: &dyn Fn(&Counts) -> String| {
        let _ = write!(
            h,
            "<tr><th>{label}</th><td class=\"num\" id=\"{id}-today\">{}</td>\
             <td class=\"num\" id=\"{id}\">{}</td></tr>",
            f(&today),
            f(&since_start)
        );
    };
    row(&mut h, "Hit ratio", "hit-ratio", &|c| match c.hit_ratio() {
        Some(r) => format!("{:.1}%", r * 100.0),
        None => "—".into(),
    });
    row(
        &mut h,
        "Bytes saved (served from cache)",
        "bytes-saved",
        &|c| human_bytes(c.cache_bytes),
    );
    row(&mut h, "Bytes fetched upstream", "bytes-upstream", &|c| {
        human_bytes(c.upstream_bytes)
    });
    row(&mut h, "Bytes sent", "bytes-sent", &|c| {
        human_bytes(c.sent_bytes)
    });
    row(&mut h, "Requests", "requests", &|c| c.requests.to_string());
    row(&mut h, "Cache lookups", "lookups", &|c| {
        c.lookups.to_string()
    });
    h.push_str("</table></section></div>");
    super::chart::savings(&app.ops.traffic, &mut h);
    upstreams(app, &mut h);
    super::inflight::section(app, private, &mut h).await?;
    // Most pulled images.
    h.push_str("<section><h2>Most pulled images</h2>");
    let top = app.ops.pulls.top(TOP_PULLS, private);
    if top.is_empty() {
        h.push_str("<p class=\"muted\">No pulls since start.</p>");
    } else {
        h.push_str("<table><tr><th>Image</th><th>Upstream</th><th class=\"num\">Pulls</th></tr>");
        for (up, repo, tag, n) in top {
            let _ = write!(
                h,
                "<tr><td><code>{}:{}</code></td><td>{}</td><td class=\"num\">{n}</td></tr>",
                esc(&repo),
                esc(&tag),
                esc(upstream_label(app, &up)),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
    // Repositories.
    let _ = write!(
        h,
        "<section><h2>Repositories ({}{})</h2>",
        repos.len(),
        if listing.more { "+" } else { "" }
    );
    if listing.private_hidden {
        h.push_str(super::inflight::HIDDEN_NOTE);
    }
    if repos.is_empty() {
        h.push_str("<p class=\"muted\">Nothing cached yet.</p>");
    } else {
        h.push_str(
            "<table><tr><th>Repository</th><th>Upstream</th><th>Tags</th>\
             <th class=\"num\">Size</th><th>Last pull</th></tr>",
        );
        for r in repos {
            let pulls = app.ops.pulls.get(pull_key(r), r.name.as_str());
            let more = r.tag_count.saturating_sub(r.tag_names.len());
            let shown: Vec<String> = r.tag_names.iter().map(|t| esc(t)).collect();
            let _ = write!(
                h,
                "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}{}</td>\
                 <td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&repo_href(&r.upstream, &r.name)),
                esc(r.name.as_str()),
                esc(area_label(app, r)),
                shown.join(", "),
                if more > 0 {
                    format!(" <span class=\"muted\">and {more} more</span>")
                } else {
                    String::new()
                },
                size_text(r.size, r.size_complete),
                pulls.map_or_else(|| "—".to_owned(), |p| ago(p.last)),
            );
        }
        h.push_str("</table>");
        if listing.more {
            let _ = write!(
                h,
                "<p class=\"muted\">Showing the first {} in name order.</p>",
                repos.len()
            );
        }
    }
    h.push_str("</section></main></body></html>\n");
    Ok(h)
}

fn upstreams(app: &Service, h: &mut String) {
    h.push_str(
        "<section><h2>Upstreams</h2><table><tr><th>Upstream</th><th>URL</th>\
         <th>Last success</th><th>Last error</th><th>Rate limit remaining</th></tr>",
    );
    let mut ups: Vec<_> = app.mirror.upstreams().collect();
    ups.sort_by(|a, b| a.key.cmp(&b.key));
    for up in ups {
        let health = app.ops.hook.health(&up.key);
        let remaining = up.ratelimit_remaining.load(Ordering::Relaxed);
        let limit = up.ratelimit_limit.load(Ordering::Relaxed);
        let rl = match (remaining, limit) {
            (r, l) if r >= 0 && l > 0 => format!("{r} of {l}"),
            (r, _) if r >= 0 => r.to_string(),
            _ => "<span class=\"muted\">not reported</span>".to_owned(),
        };
        let ok = health.last_success.map_or_else(
            || "<span class=\"muted\">never</span>".into(),
            |t| format!("<span class=\"ok\">{}</span>", ago(t)),
        );
        let bad = health.last_error.map_or_else(
            || "<span class=\"muted\">none</span>".into(),
            |(t, msg)| format!("<span class=\"bad\">{}</span>: {}", ago(t), esc(&msg)),
        );
        let _ = write!(
            h,
            "<tr><td>{}{}</td><td><code>{}</code></td><td>{ok}</td><td>{bad}</td><td>{rl}</td></tr>",
            esc(&up.name),
            if up.name == up.key {
                String::new()
            } else {
                format!(" <span class=\"muted\">(?ns={})</span>", esc(&up.key))
            },
            esc(&up.url.to_string()),
        );
    }
    h.push_str("</table>");
    let mut limits = Vec::new();
    if let Some(rps) = app.ops.hook.rps() {
        limits.push(format!("upstream requests: {rps}/s"));
    }
    let slots = &app.mirror.slots;
    if slots.max() > 0 {
        limits.push(format!(
            "upstream fetches: {} of {} slots in use",
            slots.in_use(),
            slots.max()
        ));
    }
    if let Some(rps) = app.config.rate_limit.per_client_rps {
        limits.push(format!(
            "clients: {rps}/s each{}",
            if app.config.rate_limit.exempt_cache_hits {
                ", cache hits exempt"
            } else {
                ""
            }
        ));
    }
    if !limits.is_empty() {
        let _ = write!(
            h,
            "<p class=\"muted\">berth's own limits: {}</p>",
            esc(&limits.join("; "))
        );
    }
    h.push_str("</section>");
}

pub(super) async fn repo_page(
    app: &Service,
    rest: &str,
    private: bool,
    viewer: &Viewer,
    query: Option<&str>,
) -> Result<Option<String>, RegistryError> {
    let Some(listing) = listing::repo(app, rest, private).await? else {
        return Ok(None);
    };
    let Some(repo) = listing.repos.first() else {
        return Ok(None);
    };
    let pulls = app.ops.pulls.get(pull_key(repo), repo.name.as_str());
    let mut h = String::with_capacity(8 << 10);
    head(&mut h, &format!("{} — berth", repo.name), viewer);
    h.push_str("<main>");
    // What the last action did (the redirect after a form says so in the query).
    for (key, what) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let said = match &*key {
            "deleted" => format!("Deleted <code>{}</code>.", esc(&what)),
            "purged" => "Purged from the cache: the next pull fetches it from the upstream.".into(),
            "warming" => format!(
                "Warming <code>{}</code> in the background: see the downloads in flight.",
                esc(&what)
            ),
            _ => continue,
        };
        let _ = write!(h, "<p class=\"notice\" id=\"notice\">{said}</p>");
        break;
    }
    // Buttons only for a signed-in user allowed to delete here; the post is checked again.
    let actions = match (&viewer.user, &viewer.csrf) {
        (Some(user), Some(csrf)) if repo.area == Area::Local => Some((user, csrf.as_str())),
        _ => None,
    };
    let _ = write!(
        h,
        "<p><a href=\"/\">← all repositories</a></p><section><h2>{}</h2><table>\
         <tr><th>Upstream</th><td>{}</td></tr><tr><th>Size</th><td>{}</td></tr>\
         <tr><th>Last pull</th><td>{}</td></tr></table></section>",
        esc(repo.name.as_str()),
        esc(area_label(app, repo)),
        size_text(repo.size, repo.size_complete),
        pulls
            .as_ref()
            .map_or_else(|| "— (none since start)".to_owned(), |p| ago(p.last)),
    );
    if let (Some(user), Some(csrf), Area::Cache) = (&viewer.user, &viewer.csrf, repo.area) {
        admin_forms(app, &mut h, user, csrf, repo);
    }
    h.push_str(
        "<section><h2>Tags</h2><table><tr><th>Tag</th><th>Digest</th><th>Type</th>\
         <th class=\"num\">Size</th><th>Checked upstream</th><th class=\"num\">Pulls</th>",
    );
    if actions.is_some() {
        h.push_str("<th>Delete</th>");
    }
    h.push_str("</tr>");
    let action_url = esc(&repo_href(&repo.upstream, &repo.name));
    for t in &repo.tags {
        let kind = match t.platforms {
            Some(n) => format!("index, {n} platforms"),
            None => short_media_type(&t.media_type).to_owned(),
        };
        let n = pulls
            .as_ref()
            .and_then(|p| p.tags.get(&t.tag))
            .copied()
            .unwrap_or(0);
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td><code title=\"{}\">{}</code></td><td>{}</td>\
             <td class=\"num\">{}</td><td>{}</td><td class=\"num\">{n}</td>",
            esc(&t.tag),
            esc(&t.digest),
            esc(short_digest(&t.digest)),
            esc(&kind),
            t.size
                .map_or_else(|| "?".to_owned(), |n| size_text(n, t.size_complete)),
            if repo.area == Area::Local {
                "—".to_owned()
            } else {
                ago(t.fetched_at)
            },
        );
        let may = |user, action| permitted(&app.config, user, &repo.name, &action);
        if let Some((user, csrf)) = actions {
            let tag = Tag::parse(&t.tag)
                .ok()
                .filter(|tag| may(user, Action::DeleteTag(tag.clone())));
            let digest = Digest::parse(&t.digest)
                .ok()
                .filter(|d| may(user, Action::DeleteManifest(*d)));
            let csrf = esc(csrf);
            h.push_str("<td>");
            if tag.is_some() {
                let _ = write!(
                    h,
                    "<form method=\"post\" action=\"{action_url}\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <input type=\"hidden\" name=\"action\" value=\"delete-tag\">\
                     <input type=\"hidden\" name=\"tag\" value=\"{tag}\">\
                     <button type=\"submit\" id=\"delete-tag-{tag}\">tag</button></form> ",
                    tag = esc(&t.tag),
                );
            }
            if digest.is_some() {
                let _ = write!(
                    h,
                    "<form method=\"post\" action=\"{action_url}\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <input type=\"hidden\" name=\"action\" value=\"delete-manifest\">\
                     <input type=\"hidden\" name=\"digest\" value=\"{digest}\">\
                     <button type=\"submit\" title=\"the manifest and every tag pointing at it\">\
                     manifest</button></form>",
                    digest = esc(&t.digest),
                );
            }
            h.push_str("</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
    let unread = repo.tag_count.saturating_sub(repo.tags.len());
    if unread > 0 {
        let _ = write!(h, "<p class=\"muted\">{unread} more tags not shown.</p>");
    }
    h.push_str("</section></main></body></html>\n");
    Ok(Some(h))
}

/// The admin's forms on a mirrored repository's page, each shown only to a user it is permitted
/// to (the post is checked again).
fn admin_forms(app: &Service, h: &mut String, user: &crate::auth::User, csrf: &str, repo: &Repo) {
    let may = |action| permitted(&app.config, user, &repo.name, &action);
    let url = esc(&repo_href(&repo.upstream, &repo.name));
    let csrf = esc(csrf);
    let purge = may(Action::Purge);
    let warm = crate::oci::names::Reference::parse("latest").is_ok_and(|r| may(Action::Warm(r)));
    if !purge && !warm {
        return;
    }
    h.push_str("<section><h2>Admin</h2>");
    if warm {
        let _ = write!(
            h,
            "<form method=\"post\" action=\"{url}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"action\" value=\"warm\">\
             <label>Warm tag or digest <input name=\"reference\" value=\"latest\" \
             maxlength=\"200\"></label> <button type=\"submit\" id=\"warm\">Warm</button></form>"
        );
    }
    if purge {
        let _ = write!(
            h,
            "<form method=\"post\" action=\"{url}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"action\" value=\"purge\">\
             <button type=\"submit\" id=\"purge\" title=\"its tags, manifests and the blobs \
             only they use\">Purge this repository from the cache</button></form>"
        );
    }
    h.push_str("</section>");
}

pub(super) fn head(h: &mut String, title: &str, viewer: &Viewer) {
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body><header>",
        esc(title)
    );
    match (&viewer.user, &viewer.csrf) {
        (Some(user), Some(csrf)) => {
            let _ = write!(
                h,
                "<div class=\"who\">Signed in as <b id=\"signed-in-as\">{}</b> \
                 <form method=\"post\" action=\"/ui/logout\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button type=\"submit\" id=\"sign-out\">Sign out</button></form></div>",
                esc(user.name()),
                esc(csrf)
            );
        }
        _ if viewer.can_sign_in => {
            h.push_str(
                "<div class=\"who\"><a href=\"/ui/login\" id=\"sign-in-link\">Sign in</a></div>",
            );
        }
        _ => {}
    }
    h.push_str(
        "<h1><a href=\"/\">berth</a> <small>pull-through registry mirror</small></h1></header>",
    );
}

pub(super) fn not_found(path: &str, viewer: &Viewer) -> String {
    let mut h = String::new();
    head(&mut h, "not found — berth", viewer);
    let _ = writeln!(
        h,
        "<main><section><h2>Not found</h2><p>Nothing at <code>{}</code>.</p>\
         <p><a href=\"/\">Back to the status page</a></p></section></main></body></html>",
        esc(path)
    );
    h
}

fn pull_key(r: &Repo) -> &str {
    if r.area == Area::Local {
        PRIVATE
    } else {
        &r.upstream
    }
}

fn area_label<'a>(app: &'a Service, r: &'a Repo) -> &'a str {
    if r.area == Area::Local {
        "private"
    } else {
        app.mirror.upstream_name(&r.upstream)
    }
}

fn upstream_label<'a>(app: &'a Service, up: &'a str) -> &'a str {
    if up == PRIVATE {
        "private"
    } else {
        app.mirror.upstream_name(up)
    }
}

fn repo_href(upstream: &str, name: &RepoName) -> String {
    format!("/ui/repo/{}/{}", percent_encode(upstream), name.as_str())
}

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Unreserved characters and `:` (as in `localhost:5000`) stay; everything else is escaped.
const UPSTREAM_KEY: &percent_encoding::AsciiSet = &crate::oci::routes::UNRESERVED.remove(b':');

pub(super) fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UPSTREAM_KEY).to_string()
}

pub(super) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn short_digest(d: &str) -> &str {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    hex.get(..12).unwrap_or(hex)
}

fn short_media_type(m: &str) -> &str {
    match m {
        DOCKER_MANIFEST => "docker image",
        OCI_MANIFEST => "OCI image",
        DOCKER_LIST => "docker index",
        OCI_INDEX => "OCI index",
        other => other,
    }
}

fn percent(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 * 100.0 / b as f64
    }
}

pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m {secs}s"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// "5m ago", with the exact time in a tooltip.
fn ago(then: u64) -> String {
    let when = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(then));
    let d = Duration::from_secs(now_secs().saturating_sub(then));
    format!(
        "<span title=\"{}\">{} ago</span>",
        esc(&when),
        human_duration(d)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_formatting() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(percent_encode("docker.io"), "docker.io");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_duration(Duration::from_secs(3725)), "1h 2m");
        assert_eq!(short_digest("sha256:0123456789abcdef"), "0123456789ab");
    }
}
