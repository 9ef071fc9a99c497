//! Listing repositories in name order, a page at a time: only the directories on the way to
//! a page are read, so a page of the catalog (or of the status page) costs about the same
//! however many repositories the store holds.

use super::DiskStore;
use crate::store::Area;

impl DiskStore {
    /// Up to `n` repository names after `last`, in byte order: the private repositories that
    /// hold something, and the mirrored ones with a tag in the cache, of every upstream.
    pub(super) fn catalog_page(&self, last: Option<&str>, n: usize) -> Vec<String> {
        let mut names = Vec::new();
        repos_after(
            &self.local_repos_dir(),
            "",
            last,
            n,
            &|dir| non_empty(&dir.join("_manifests")) || non_empty(&dir.join("_tags")),
            &mut names,
        );
        for up in self.upstream_dirs(Area::Cache) {
            let mut found = Vec::new();
            repos_after(
                &self.repos_dir(Area::Cache).join(&up),
                "",
                last,
                n,
                &|dir| dir.join("_tags").is_dir(),
                &mut found,
            );
            names.extend(found);
        }
        names.sort();
        names.dedup();
        names.truncate(n);
        names
    }

    /// Up to `n` repositories of an area with tags, as (upstream, name), in that order.
    pub(super) fn area_page(&self, area: Area, n: usize) -> Vec<(String, String)> {
        let mut names: Vec<(String, String)> = Vec::new();
        for up in self.upstream_dirs(area) {
            let mut found = Vec::new();
            repos_after(
                &self.repos_dir(area).join(&up),
                "",
                None,
                n - names.len(),
                &|d| d.join("_tags").is_dir(),
                &mut found,
            );
            names.extend(found.into_iter().map(|name| (up.clone(), name)));
            if names.len() >= n {
                break;
            }
        }
        names
    }

    fn repos_dir(&self, area: Area) -> std::path::PathBuf {
        self.root().join(match area {
            Area::Cache => "cache/repos",
            Area::Local => "local/repos",
        })
    }

    /// The upstreams (for the local area: the one key it uses) that have repositories, sorted.
    fn upstream_dirs(&self, area: Area) -> Vec<String> {
        let mut ups: Vec<String> = match std::fs::read_dir(self.repos_dir(area)) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect(),
            Err(_) => Vec::new(),
        };
        ups.sort();
        ups
    }
}

fn non_empty(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Appends to `out`, in order, up to `n` repository names after `last` from one tree of
/// repository directories (`prefix` names `dir`). Only the directories on the way to the page
/// are read, so a page costs about the same however many repositories the tree holds.
///
/// A directory `c` stands for its own name `c` and for the names under `c/`; ordering the
/// children by those two keys visits the names in byte order (`a` < `a-b` < `a/x`), which a
/// plain walk of sorted children does not.
fn repos_after(
    dir: &std::path::Path,
    prefix: &str,
    last: Option<&str>,
    n: usize,
    is_repo: &dyn Fn(&std::path::Path) -> bool,
    out: &mut Vec<String>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // (key, child directory name, whether the key is the child's own name)
    let mut items: Vec<(String, String, bool)> = Vec::new();
    for e in entries.filter_map(Result::ok) {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // `_tags`, `_manifests`…: the repository's own data, never part of a name.
        if name.starts_with('_') {
            continue;
        }
        items.push((format!("{prefix}{name}"), name.clone(), true));
        items.push((format!("{prefix}{name}/"), name, false));
    }
    items.sort_unstable();
    for (key, child, own) in items {
        if out.len() >= n {
            return;
        }
        if own {
            if last.map_or(true, |l| key.as_str() > l) && is_repo(&dir.join(&child)) {
                out.push(key);
            }
        } else {
            // Every name under `key` sorts before `last` when `last` is past `key` without
            // starting with it.
            if last.is_some_and(|l| l > key.as_str() && !l.starts_with(key.as_str())) {
                continue;
            }
            repos_after(&dir.join(&child), &key, last, n, is_repo, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_pages_follow_byte_order_and_read_only_their_way() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "a", "a-b", "a/x", "a/x/y", "a0", "b/c/d", "lib/z", "lib/a", "lib/m-1", "lib/m",
        ];
        for n in names {
            std::fs::create_dir_all(dir.path().join(n).join("_tags")).unwrap();
        }
        // A directory that is only a namespace is no repository.
        std::fs::create_dir_all(dir.path().join("empty/ns")).unwrap();
        let is_repo = |d: &std::path::Path| d.join("_tags").is_dir();
        let mut sorted: Vec<&str> = names.to_vec();
        sorted.sort_unstable();
        let mut all = Vec::new();
        repos_after(dir.path(), "", None, 100, &is_repo, &mut all);
        assert_eq!(all, sorted);
        for n in 1..5 {
            let mut paged: Vec<String> = Vec::new();
            loop {
                let mut page = Vec::new();
                repos_after(
                    dir.path(),
                    "",
                    paged.last().map(String::as_str),
                    n,
                    &is_repo,
                    &mut page,
                );
                assert!(page.len() <= n);
                if page.is_empty() {
                    break;
                }
                paged.extend(page);
            }
            assert_eq!(paged, sorted, "pages of {n}");
        }
        // A page after a name that is not there starts at the next one.
        let mut page = Vec::new();
        repos_after(dir.path(), "", Some("a/w"), 2, &is_repo, &mut page);
        assert_eq!(page, ["a/x", "a/x/y"]);
    }
}
