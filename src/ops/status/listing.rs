//! What the status pages list: repositories with their tags and sizes, read from the store
//! within a budget, and manifest summaries remembered per digest.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock;
use crate::oci::error::RegistryError;
use crate::oci::manifest::{Descriptor, Manifest};
use crate::oci::names::{Digest, RepoName};
use crate::ops::Service;
use crate::store::{Area, Store};

use super::render::percent_decode;
use super::PRIVATE;

/// Repositories listed on the overview.
const MAX_LISTED_REPOS: usize = 500;
/// Tags named per repository on the overview.
const TAGS_PER_ROW: usize = 8;
/// A repository as the page lists it.
pub(super) struct Repo {
    pub(super) area: Area,
    pub(super) upstream: String,
    pub(super) name: RepoName,
    /// The first tag names, sorted, whether or not their entries were read.
    pub(super) tag_names: Vec<String>,
    /// How many tags the repository has.
    pub(super) tag_count: usize,
    /// The tags whose entries were read.
    pub(super) tags: Vec<TagRow>,
    /// Compressed size of the unique blobs the read tags reference (known ones).
    pub(super) size: u64,
    /// Whether `size` counts everything (every tag read, every manifest known).
    pub(super) size_complete: bool,
}

pub(super) struct TagRow {
    pub(super) tag: String,
    pub(super) digest: String,
    pub(super) media_type: String,
    /// When the upstream last confirmed the tag (seconds since the epoch).
    pub(super) fetched_at: u64,
    pub(super) size: Option<u64>,
    pub(super) size_complete: bool,
    pub(super) platforms: Option<usize>,
}

/// Files (tag entries and manifests) one listing reads at most: a listing costs the same however
/// much an outsider has pulled into the cache. What is not read shows as unknown; summaries are
/// remembered, so later listings fill in.
pub(super) const READS_PER_LISTING: usize = 4_000;
/// Children of an index whose manifests are read for its size; beyond, the size is a lower bound.
pub(super) const MAX_CHILDREN: usize = 128;
/// Tag entries read per repository on the overview (all tags are counted).
const TAGS_READ_PER_REPO: usize = 32;
/// Tag rows on a repository's page.
const MAX_REPO_PAGE_TAGS: usize = 500;
/// Memory for remembered manifest summaries (roughly, in bytes).
const SUMMARY_MEMORY: usize = 32 << 20;
/// Summaries that could not read everything are computed again after this long.
const INCOMPLETE_TTL: Duration = Duration::from_secs(60);

/// What a manifest says about sizes, computed once per digest.
struct Summary {
    /// The manifest itself and what it refers to, with sizes: an image's config and layers, an
    /// index's image children and theirs.
    blobs: Vec<(Digest, u64)>,
    platforms: Option<usize>,
    /// Whether `blobs` is everything (an index's children all read).
    complete: bool,
}

/// A remembered summary (None: not a manifest the page understands), and when it expires if it
/// is incomplete.
type Remembered = (Option<Arc<Summary>>, Option<Instant>);

#[derive(Default)]
struct Summaries {
    map: HashMap<(Area, Digest), Remembered>,
    weight: usize,
}

/// Reads left to a listing.
pub(super) struct Budget(pub(super) usize);

impl Budget {
    pub(super) fn take(&mut self) -> bool {
        if self.0 == 0 {
            return false;
        }
        self.0 -= 1;
        true
    }
}

/// The remembered summaries, shared with listings computed on the blocking pool.
#[derive(Clone, Default)]
pub(super) struct Memo {
    summaries: Arc<Mutex<Summaries>>,
    pub(super) reads: Arc<AtomicU64>,
    /// Indexes with more children than are looked at.
    pub(super) truncated_indexes: Arc<AtomicU64>,
    /// Listings that spent their read budget.
    pub(super) spent_budgets: Arc<AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(super) enum ListingKey {
    Overview {
        generation: u64,
        private: bool,
    },
    Repo {
        generation: u64,
        area: Area,
        upstream: String,
        name: RepoName,
    },
}

/// A computed listing: the repositories, and whether more exist than are listed.
pub(super) struct Listing {
    pub(super) repos: Vec<Repo>,
    pub(super) more: bool,
    /// The overview without the private area: whether it holds a repository (the visitor is
    /// told they are hidden).
    pub(super) private_hidden: bool,
}

/// The overview's listing: the cached repositories, and the private ones when `private`.
pub(super) async fn overview(app: &Service, private: bool) -> Result<Arc<Listing>, RegistryError> {
    let store = app.mirror.store().clone();
    let key = ListingKey::Overview {
        generation: app.pages.generation.load(Ordering::Relaxed),
        private,
    };
    app.pages
        .listing(key, move |memo, budget| {
            let mut listing = list_area(memo, &store, Area::Cache, MAX_LISTED_REPOS, budget)?;
            if private {
                let local = list_area(memo, &store, Area::Local, MAX_LISTED_REPOS, budget)?;
                listing.repos.extend(local.repos);
                listing.more |= local.more;
            } else {
                listing.private_hidden = !store.area_repos(Area::Local, 1).is_empty();
            }
            Ok(listing)
        })
        .await
}

/// The listing of the repository a page's path names (`<upstream>/<name>`): None when it names
/// none this visitor may see.
pub(super) async fn repo(
    app: &Service,
    rest: &str,
    private: bool,
) -> Result<Option<Arc<Listing>>, RegistryError> {
    let Some((upstream, name)) = rest.split_once('/') else {
        return Ok(None);
    };
    let upstream = percent_decode(upstream);
    let Ok(name) = RepoName::parse(name.trim_end_matches('/')) else {
        return Ok(None);
    };
    let is_private = app.is_private(&name);
    if is_private && !private {
        return Ok(None);
    }
    let area = if is_private { Area::Local } else { Area::Cache };
    // The upstream part names a directory: only a plain name is looked up.
    let plain = !upstream.is_empty()
        && upstream != "."
        && upstream != ".."
        && !upstream.contains(['/', '\\', '\0']);
    if !plain || (is_private != (upstream == PRIVATE)) {
        return Ok(None);
    }
    let store = app.mirror.store().clone();
    let key = ListingKey::Repo {
        generation: app.pages.generation.load(Ordering::Relaxed),
        area,
        upstream: upstream.clone(),
        name: name.clone(),
    };
    let listing = app
        .pages
        .listing(key, move |memo, budget| {
            let repo = read_repo(
                memo,
                &store,
                area,
                upstream,
                name,
                MAX_REPO_PAGE_TAGS,
                budget,
            )?;
            Ok(Listing {
                repos: repo.into_iter().collect(),
                more: false,
                private_hidden: false,
            })
        })
        .await?;
    Ok(Some(listing))
}

impl Memo {
    /// The summary of a manifest: remembered, or read (within the budget; None when the budget
    /// is spent, the manifest is missing, or it is not one the page understands). An index's
    /// image children are read too, unless `shallow`.
    fn summary(
        &self,
        store: &Store,
        area: Area,
        d: Digest,
        budget: &mut Budget,
        shallow: bool,
    ) -> Option<Arc<Summary>> {
        {
            let summaries = lock(&self.summaries);
            if let Some((s, expires)) = summaries.map.get(&(area, d)) {
                if expires.map_or(true, |t| t > Instant::now()) {
                    return s.clone();
                }
            }
        }
        if !budget.take() {
            return None;
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        let (bytes, _) = store.get_manifest(area, &d).ok()??;
        let manifest = Manifest::from_slice(&bytes).ok()?;
        let own = (d, bytes.len() as u64);
        let sized = |e: &Descriptor| (e.digest, e.size);
        let summary = if let Some(list) = &manifest.manifests {
            if shallow {
                // An index inside an index: counted by its own bytes, not remembered.
                return Some(Arc::new(Summary {
                    blobs: vec![own],
                    platforms: Some(list.len()),
                    complete: false,
                }));
            }
            let mut blobs = vec![own];
            let mut complete = list.len() <= MAX_CHILDREN;
            if !complete {
                self.truncated_indexes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%d, children = list.len(), looked_at = MAX_CHILDREN, "status page: an index with more children than are looked at; its size is a lower bound");
            }
            for child in list.iter().take(MAX_CHILDREN) {
                match self.summary(store, area, child.digest, budget, true) {
                    Some(s) => {
                        complete &= s.complete;
                        blobs.extend(s.blobs.iter().copied());
                    }
                    None => complete = false,
                }
            }
            Some(Summary {
                blobs,
                platforms: Some(list.len()),
                complete,
            })
        } else if let Some(layers) = &manifest.layers {
            let mut blobs = vec![own];
            blobs.extend(layers.iter().map(sized));
            blobs.extend(manifest.config.as_ref().map(sized));
            Some(Summary {
                blobs,
                platforms: None,
                complete: true,
            })
        } else {
            None
        };
        let summary = summary.map(Arc::new);
        self.remember(area, d, summary.clone());
        summary
    }

    fn remember(&self, area: Area, digest: Digest, summary: Option<Arc<Summary>>) {
        let weight = 64 + summary.as_ref().map_or(0, |s| s.blobs.len() * 40);
        let expires = summary
            .as_ref()
            .filter(|s| !s.complete)
            .map(|_| Instant::now() + INCOMPLETE_TTL);
        let mut summaries = lock(&self.summaries);
        if summaries.weight + weight > SUMMARY_MEMORY {
            // Crude but bounded: start over; the next listings read again within their budget.
            summaries.map.clear();
            summaries.weight = 0;
        }
        summaries.weight += weight;
        summaries.map.insert((area, digest), (summary, expires));
    }
}

/// Reads a repository's tags (at most `max_tags` entries) with their sizes (blocking).
fn read_repo(
    memo: &Memo,
    store: &Store,
    area: Area,
    upstream: String,
    name: RepoName,
    max_tags: usize,
    budget: &mut Budget,
) -> std::io::Result<Option<Repo>> {
    let Some(files) = store.tag_names(area, &upstream, &name)? else {
        return Ok(None);
    };
    let mut tag_names: Vec<String> = files.iter().map(|(t, _)| t.to_string()).collect();
    tag_names.dedup();
    let tag_count = tag_names.len();
    tag_names.truncate(TAGS_PER_ROW);
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut repo_blobs: HashMap<Digest, u64> = HashMap::new();
    let mut size_complete = true;
    let mut tags = Vec::new();
    for (read, (tag, variant)) in files.iter().enumerate() {
        if read >= max_tags || !budget.take() {
            size_complete = false;
            break;
        }
        let Some(entry) = store.get_tag(area, &upstream, &name, tag, variant)? else {
            continue;
        };
        if !seen.insert((tag.to_string(), entry.digest.to_string())) {
            continue;
        }
        let summary = memo.summary(store, area, entry.digest, budget, false);
        let (size, complete, platforms) = match &summary {
            Some(s) => {
                let unique: HashMap<Digest, u64> = s.blobs.iter().copied().collect();
                repo_blobs.extend(unique.iter().map(|(d, n)| (*d, *n)));
                (Some(unique.values().sum()), s.complete, s.platforms)
            }
            None => (None, false, None),
        };
        size_complete &= complete;
        tags.push(TagRow {
            tag: tag.to_string(),
            digest: entry.digest.to_string(),
            media_type: entry.media_type,
            fetched_at: entry.fetched_at,
            size,
            size_complete: complete,
            platforms,
        });
    }
    Ok(Some(Repo {
        area,
        upstream,
        name,
        tag_names,
        tag_count,
        tags,
        size: repo_blobs.values().sum(),
        size_complete,
    }))
}

/// The first `limit` repositories of an area, in (upstream, name) order, read within the
/// budget; and whether there are more (blocking).
fn list_area(
    memo: &Memo,
    store: &Store,
    area: Area,
    limit: usize,
    budget: &mut Budget,
) -> std::io::Result<Listing> {
    let mut names = store.area_repos(area, limit + 1);
    let more = names.len() > limit;
    names.truncate(limit);
    let mut repos = Vec::new();
    for (up, name) in names {
        let Ok(name) = RepoName::parse(&name) else {
            continue;
        };
        if let Some(repo) = read_repo(memo, store, area, up, name, TAGS_READ_PER_REPO, budget)? {
            repos.push(repo);
        }
    }
    Ok(Listing {
        repos,
        more,
        private_hidden: false,
    })
}
