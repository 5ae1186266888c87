//! Pull: repo info → per-file HEAD/GET of `resolve` into the shared Hugging Face cache
//! (`{models|datasets}--owner--name/{blobs,snapshots,refs}`), resumable, offline-aware.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::client::{origin, quote, validate_repo_id, Ctx, HubClient, RepoType, Req};
use crate::error::{HubError, Result};
use crate::push::sha256_file;

/// What `GET /api/{type}s/{repo}/revision/{rev}` says about a revision.
#[derive(Clone, Debug, Deserialize)]
pub struct RepoInfo {
    /// The commit sha the revision points to.
    pub sha: String,
    /// Files of the repo at that commit.
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

/// One file of a [`RepoInfo`].
#[derive(Clone, Debug, Deserialize)]
pub struct Sibling {
    /// Repo-relative, `/`-separated path.
    pub rfilename: String,
}

struct FileMeta {
    commit: Option<String>,
    etag: String,
    size: Option<u64>,
    location: String,
}

fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `W/"abc"` → `abc`.
fn normalize_etag(e: &str) -> String {
    e.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// `fnmatch`-style match as `huggingface_hub` filters files: `*` (also across `/`), `?`,
/// `[abc]`, `[!abc]`, `[a-z]`; a pattern ending in `/` matches everything below it.
pub fn matches_pattern(pattern: &str, path: &str) -> bool {
    let pat: Vec<char> =
        if pattern.ends_with('/') { format!("{pattern}*") } else { pattern.to_string() }.chars().collect();
    let s: Vec<char> = path.chars().collect();
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        // p[0] == '['; returns (matched, length of the class incl. brackets)
        let mut i = 1;
        let neg = matches!(p.get(1), Some('!') | Some('^'));
        if neg {
            i += 1;
        }
        let start = i;
        let mut hit = false;
        while i < p.len() && (p[i] != ']' || i == start) {
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                if p[i] <= c && c <= p[i + 2] {
                    hit = true;
                }
                i += 3;
            } else {
                if p[i] == c {
                    hit = true;
                }
                i += 1;
            }
        }
        if i >= p.len() {
            return None; // unterminated: treat '[' literally
        }
        Some((hit != neg, i + 1))
    }
    fn rec(p: &[char], s: &[char]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some('*') => (0..=s.len()).any(|k| rec(&p[1..], &s[k..])),
            Some('?') => !s.is_empty() && rec(&p[1..], &s[1..]),
            Some('[') => match class(p, *s.first().unwrap_or(&'\0')) {
                Some((m, n)) => !s.is_empty() && m && rec(&p[n..], &s[1..]),
                None => s.first() == Some(&'[') && rec(&p[1..], &s[1..]),
            },
            Some(c) => s.first() == Some(c) && rec(&p[1..], &s[1..]),
        }
    }
    rec(&pat, &s)
}

/// The split a parquet file of a dataset repo belongs to, from the Hub's layouts:
/// `data/train-00000-of-00020.parquet`, `train.parquet`, `config/train-*.parquet`
/// → `train`; `default/test/0000.parquet` (the parquet-conversion layout) → `test`.
pub fn split_of(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let stem = name.strip_suffix(".parquet")?;
    let head: String = stem.chars().take_while(|c| !matches!(c, '-' | '.')).collect();
    if !head.is_empty() && !head.bytes().all(|b| b.is_ascii_digit()) {
        return Some(head);
    }
    // All-digit shard name: the split is the parent directory.
    let parent = path.rsplit('/').nth(1)?;
    Some(parent.to_string())
}

/// Whether a parquet file belongs to `split`: it sits in a directory named `split`, or its
/// name starts with `{split}-`, `{split}.` or `{split}_` (the rule vsft-data applies locally).
pub fn in_split(path: &str, split: &str) -> bool {
    if !path.ends_with(".parquet") {
        return false;
    }
    let mut comps: Vec<&str> = path.split('/').collect();
    let name = comps.pop().unwrap_or("");
    comps.contains(&split) || ["-", ".", "_"].iter().any(|sep| name.starts_with(&format!("{split}{sep}")))
}

fn io<T>(p: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| HubError::io(p, e))
}

impl HubClient {
    /// Cache folder of a repo: `{cache}/{models|datasets}--owner--name`.
    pub fn repo_cache_dir(&self, repo_id: &str, repo_type: RepoType) -> PathBuf {
        self.cfg.cache_dir.join(format!("{}--{}", repo_type.plural(), repo_id.replace('/', "--")))
    }

    /// The cached snapshot folder of `revision` (branch/tag name via `refs/`, or a commit sha),
    /// if it exists.
    pub fn cached_snapshot(&self, repo_id: &str, repo_type: RepoType, revision: &str) -> Option<PathBuf> {
        let dir = self.repo_cache_dir(repo_id, repo_type);
        let sha = if is_commit_sha(revision) && dir.join("snapshots").join(revision).is_dir() {
            revision.to_string()
        } else {
            std::fs::read_to_string(dir.join("refs").join(revision)).ok()?.trim().to_string()
        };
        let snap = dir.join("snapshots").join(sha);
        snap.is_dir().then_some(snap)
    }

    /// `GET /api/{type}s/{repo}/revision/{rev}`: commit sha and file list.
    pub fn repo_info(&self, repo_id: &str, repo_type: RepoType, revision: &str) -> Result<RepoInfo> {
        validate_repo_id(repo_id)?;
        if self.cfg.offline {
            return Err(HubError::Offline {
                what: format!("the file list of {repo_id}@{revision}"),
                cache: self.cfg.cache_dir.clone(),
            });
        }
        let url = self.api_url(&format!("/api/{}/{repo_id}/revision/{}", repo_type.plural(), quote(revision, false)));
        let ctx = Ctx::new(format!("reading {} repo {repo_id}@{revision}", repo_type.as_str()))
            .repo(repo_type, repo_id)
            .rev(revision);
        self.send_json(&Req::new("GET", url), &ctx)
    }

    /// Downloads the files of `repo_id` at `revision` (default `main`) whose path matches one of
    /// `allow_patterns` (all files when empty) into the cache, and returns the snapshot folder
    /// `{cache}/{type}s--owner--name/snapshots/{commit}`. Files already cached are not fetched
    /// again; interrupted downloads resume. Offline (or when the Hub cannot be reached and the
    /// snapshot is cached), the cached snapshot is returned.
    pub fn snapshot_download(
        &self,
        repo_id: &str,
        repo_type: RepoType,
        revision: Option<&str>,
        allow_patterns: &[&str],
    ) -> Result<PathBuf> {
        self.snapshot_select(repo_id, repo_type, revision, &|files: &[String]| {
            files
                .iter()
                .filter(|f| allow_patterns.is_empty() || allow_patterns.iter().any(|p| matches_pattern(p, f)))
                .cloned()
                .collect()
        })
    }

    /// [`snapshot_download`](Self::snapshot_download) with the files chosen by `select` from the
    /// repo's file list (given all the repo's paths, it returns those to fetch).
    pub fn snapshot_select(
        &self,
        repo_id: &str,
        repo_type: RepoType,
        revision: Option<&str>,
        select: &dyn Fn(&[String]) -> Vec<String>,
    ) -> Result<PathBuf> {
        validate_repo_id(repo_id)?;
        let rev = revision.unwrap_or("main");
        if self.cfg.offline {
            return self.cached_snapshot(repo_id, repo_type, rev).ok_or_else(|| HubError::Offline {
                what: format!("{} repo {repo_id}@{rev}", repo_type.as_str()),
                cache: self.cfg.cache_dir.clone(),
            });
        }
        let info = match self.repo_info(repo_id, repo_type, rev) {
            Ok(i) => i,
            Err(e @ HubError::Transport { .. }) => {
                if let Some(snap) = self.cached_snapshot(repo_id, repo_type, rev) {
                    eprintln!("warning: {e}; using the cached snapshot {snap:?}");
                    return Ok(snap);
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let all: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
        for f in select(&all) {
            self.fetch_file(repo_id, repo_type, &info.sha, &f, Some(&info.sha))?;
        }
        let dir = self.repo_cache_dir(repo_id, repo_type);
        let snap = dir.join("snapshots").join(&info.sha);
        io(&snap, std::fs::create_dir_all(&snap))?;
        self.write_ref(&dir, rev, &info.sha)?;
        Ok(snap)
    }

    /// Downloads one file (as `hf_hub_download`) and returns its path in the snapshot.
    pub fn download_file(
        &self,
        repo_id: &str,
        repo_type: RepoType,
        revision: Option<&str>,
        path: &str,
    ) -> Result<PathBuf> {
        validate_repo_id(repo_id)?;
        let rev = revision.unwrap_or("main");
        if self.cfg.offline {
            let p = self.cached_snapshot(repo_id, repo_type, rev).map(|s| s.join(path));
            return p.filter(|p| p.exists()).ok_or_else(|| HubError::Offline {
                what: format!("{path:?} of {} repo {repo_id}@{rev}", repo_type.as_str()),
                cache: self.cfg.cache_dir.clone(),
            });
        }
        self.fetch_file(repo_id, repo_type, rev, path, None)
    }

    fn write_ref(&self, repo_dir: &Path, rev: &str, sha: &str) -> Result<()> {
        if rev == sha {
            return Ok(());
        }
        let r = repo_dir.join("refs").join(rev);
        if std::fs::read_to_string(&r).ok().as_deref() == Some(sha) {
            return Ok(());
        }
        if let Some(p) = r.parent() {
            io(p, std::fs::create_dir_all(p))?;
        }
        let tmp = r.with_extension("tmp-vsft");
        io(&tmp, std::fs::write(&tmp, sha))?;
        io(&r, std::fs::rename(&tmp, &r))
    }

    /// HEAD of a `resolve` URL without following absolute redirects (the CDN), following
    /// relative ones (renamed repos); reads commit, ETag and size.
    fn file_metadata(&self, url: &str, ctx: &Ctx) -> Result<FileMeta> {
        let mut url = url.to_string();
        for _ in 0..5 {
            let req = Req::new("HEAD", url.clone()).no_redirects().header("accept-encoding", "identity");
            let resp = self.send(&req, ctx)?;
            let h = |n: &str| resp.header(n).map(str::to_string);
            let status = resp.status();
            let location = h("location");
            if (300..400).contains(&status) {
                if let Some(loc) = &location {
                    if loc.starts_with('/') {
                        url = format!("{}{loc}", origin(&url));
                        continue;
                    }
                }
            }
            let etag = h("x-linked-etag").or_else(|| h("etag")).map(|e| normalize_etag(&e)).filter(|e| !e.is_empty());
            let Some(etag) = etag else {
                return Err(HubError::Protocol {
                    what: ctx.what.clone(),
                    msg: "no ETag in the answer: is HF_ENDPOINT a Hugging Face Hub?".into(),
                });
            };
            if etag.contains(['/', '\\']) || etag.starts_with('.') {
                return Err(HubError::Protocol { what: ctx.what.clone(), msg: format!("bad ETag {etag:?}") });
            }
            let size = h("x-linked-size").or_else(|| h("content-length")).and_then(|s| s.trim().parse().ok());
            return Ok(FileMeta {
                commit: h("x-repo-commit"),
                etag,
                size,
                location: if (300..400).contains(&status) { location.unwrap_or(url) } else { url },
            });
        }
        Err(HubError::Protocol { what: ctx.what.clone(), msg: "too many redirects".into() })
    }

    /// One file into the cache; returns the snapshot path (a symlink into `blobs/`).
    fn fetch_file(
        &self,
        repo_id: &str,
        rt: RepoType,
        rev: &str,
        rel: &str,
        known_commit: Option<&str>,
    ) -> Result<PathBuf> {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) || rel.starts_with('/') {
            return Err(HubError::Invalid(format!("refusing unsafe repo path {rel:?}")));
        }
        let dir = self.repo_cache_dir(repo_id, rt);
        if let Some(c) = known_commit {
            let p = dir.join("snapshots").join(c).join(rel);
            if p.exists() {
                return Ok(p);
            }
        }
        let url = format!(
            "{}/{}{repo_id}/resolve/{}/{}",
            self.cfg.endpoint,
            rt.url_prefix(),
            quote(rev, false),
            quote(rel, true)
        );
        let ctx = Ctx::new(format!("downloading {rel} from {repo_id}@{rev}")).repo(rt, repo_id).rev(rev).path(rel);
        let meta = self.file_metadata(&url, &ctx)?;
        let commit = match (meta.commit.as_deref(), known_commit) {
            (Some(c), _) => c.to_string(),
            (None, Some(c)) => c.to_string(),
            (None, None) if is_commit_sha(rev) => rev.to_string(),
            (None, None) => {
                return Err(HubError::Protocol { what: ctx.what.clone(), msg: "no X-Repo-Commit header".into() })
            }
        };
        let pointer = dir.join("snapshots").join(&commit).join(rel);
        let blob = dir.join("blobs").join(&meta.etag);
        if !blob.exists() {
            io(&dir.join("blobs"), std::fs::create_dir_all(dir.join("blobs")))?;
            self.download_blob(&meta, &blob, rel, &ctx)?;
        }
        link_pointer(&pointer, &meta.etag, rel, &blob)?;
        self.write_ref(&dir, rev, &commit)?;
        Ok(pointer)
    }

    /// GET into `{blob}.incomplete`, resuming with `Range` from what is there, retrying
    /// interrupted transfers; checks the size (and sha256 for LFS blobs), then renames.
    fn download_blob(&self, meta: &FileMeta, blob: &Path, rel: &str, ctx: &Ctx) -> Result<()> {
        let inc = PathBuf::from(format!("{}.incomplete", blob.display()));
        let bar = self.bar(meta.size.unwrap_or(0), rel.to_string());
        let same_origin = origin(&meta.location) == origin(&self.cfg.endpoint);
        let mut attempt = 0u32;
        let result = loop {
            attempt += 1;
            let mut have = std::fs::metadata(&inc).map(|m| m.len()).unwrap_or(0);
            if let Some(size) = meta.size {
                if have == size && inc.exists() {
                    break Ok(());
                }
                if have > size {
                    io(&inc, std::fs::remove_file(&inc))?;
                    have = 0;
                }
            }
            bar.set_position(have);
            let mut req = Req::new("GET", meta.location.clone()).header("accept-encoding", "identity");
            if !same_origin {
                req = req.no_auth();
            }
            if have > 0 {
                req = req.header("range", format!("bytes={have}-"));
            }
            let ext_ctx = ctx.clone().external(!same_origin);
            let resp = match self.send(&req, &ext_ctx) {
                Ok(r) => r,
                Err(HubError::Http { status: 416, .. }) if have > 0 && attempt < self.cfg.max_tries => {
                    io(&inc, std::fs::remove_file(&inc))?;
                    continue;
                }
                Err(e) => break Err(e),
            };
            let resumed = resp.status() == 206;
            if resumed {
                let start = resp
                    .header("content-range")
                    .and_then(|cr| cr.trim().strip_prefix("bytes ")?.split('-').next()?.parse::<u64>().ok());
                if start != Some(have) {
                    io(&inc, std::fs::remove_file(&inc))?;
                    continue;
                }
            }
            let mut file = if resumed {
                io(&inc, std::fs::OpenOptions::new().append(true).open(&inc))?
            } else {
                bar.set_position(0);
                io(&inc, std::fs::File::create(&inc))?
            };
            let mut reader = resp.into_reader();
            let mut buf = vec![0u8; 1 << 20];
            let read_err = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => {
                        io(&inc, file.write_all(&buf[..n]))?;
                        bar.inc(n as u64);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e),
                }
            };
            io(&inc, file.flush())?;
            drop(file);
            match read_err {
                None => break Ok(()),
                Some(e) if attempt < self.cfg.max_tries => {
                    let _ = e;
                    std::thread::sleep(self.backoff(attempt - 1));
                }
                Some(e) => {
                    break Err(HubError::Transport {
                        what: format!("{} (interrupted; rerun to resume)", ctx.what),
                        endpoint: origin(&meta.location).to_string(),
                        error: Box::new(e),
                    })
                }
            }
        };
        bar.finish_and_clear();
        result?;
        let got = io(&inc, std::fs::metadata(&inc))?.len();
        if let Some(size) = meta.size {
            if got != size {
                return Err(HubError::Integrity {
                    path: inc,
                    msg: format!("downloaded {got} bytes, expected {size}; rerun to resume"),
                });
            }
        }
        if is_sha256(&meta.etag) {
            let sha = sha256_file(&inc)?;
            if !sha.eq_ignore_ascii_case(&meta.etag) {
                let _ = std::fs::remove_file(&inc);
                return Err(HubError::Integrity {
                    path: blob.to_path_buf(),
                    msg: format!("sha256 {sha} != {} (the corrupt download was deleted; rerun)", meta.etag),
                });
            }
        }
        io(blob, std::fs::rename(&inc, blob))
    }

    /// Parquet files of a dataset repo by split (see [`split_of`]), sorted.
    pub fn dataset_splits(&self, repo_id: &str, revision: Option<&str>) -> Result<BTreeMap<String, Vec<String>>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for f in self.dataset_files(repo_id, revision)? {
            if let Some(s) = split_of(&f) {
                out.entry(s).or_default().push(f);
            }
        }
        Ok(out)
    }

    /// The parquet files of `split` in a dataset repo (see [`in_split`]; in a repo whose shards
    /// carry no split name, they all are `train`, as vsft-data reads them), sorted; an error
    /// naming the available splits when there are none. Works offline from the cache.
    pub fn dataset_split_files(&self, repo_id: &str, revision: Option<&str>, split: &str) -> Result<Vec<String>> {
        let all = self.dataset_files(repo_id, revision)?;
        // As vsft-data: shards without split names (`part-0.parquet`) are all `train`.
        let unsplit = !all.iter().any(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            ["train", "test", "validation", "valid", "dev", "eval"].iter().any(|s| name.starts_with(s))
        });
        let files: Vec<String> = if unsplit && split == "train" {
            all.clone()
        } else {
            all.iter().filter(|f| in_split(f, split)).cloned().collect()
        };
        if files.is_empty() {
            let mut splits: Vec<String> = all.iter().filter_map(|f| split_of(f)).collect();
            splits.sort();
            splits.dedup();
            return Err(HubError::Invalid(format!(
                "dataset {repo_id} has no parquet files for split {split:?} (splits found: {})",
                if splits.is_empty() { "none".to_string() } else { splits.join(", ") }
            )));
        }
        Ok(files)
    }

    /// Downloads the parquet files of `split` and returns the snapshot folder and their local paths.
    pub fn download_dataset_split(
        &self,
        repo_id: &str,
        revision: Option<&str>,
        split: &str,
    ) -> Result<(PathBuf, Vec<PathBuf>)> {
        let files = self.dataset_split_files(repo_id, revision, split)?;
        let snap = self.snapshot_select(repo_id, RepoType::Dataset, revision, &|all: &[String]| {
            all.iter().filter(|f| files.contains(f)).cloned().collect()
        })?;
        let paths: Vec<PathBuf> = files.iter().map(|f| snap.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            return Err(HubError::Offline { what: format!("{missing:?}"), cache: self.cfg.cache_dir.clone() });
        }
        Ok((snap, paths))
    }

    fn dataset_files(&self, repo_id: &str, revision: Option<&str>) -> Result<Vec<String>> {
        let rev = revision.unwrap_or("main");
        let mut files: Vec<String> = if self.cfg.offline {
            let snap = self.cached_snapshot(repo_id, RepoType::Dataset, rev).ok_or_else(|| HubError::Offline {
                what: format!("dataset repo {repo_id}@{rev}"),
                cache: self.cfg.cache_dir.clone(),
            })?;
            let mut out = Vec::new();
            list_rel(&snap, &snap, &mut out);
            out
        } else {
            self.repo_info(repo_id, RepoType::Dataset, rev)?.siblings.into_iter().map(|s| s.rfilename).collect()
        };
        files.retain(|f| f.ends_with(".parquet"));
        files.sort();
        Ok(files)
    }
}

fn list_rel(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            list_rel(root, &p, out);
        } else if p.exists() {
            if let Ok(r) = p.strip_prefix(root) {
                let parts: Vec<String> = r.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
                out.push(parts.join("/"));
            }
        }
    }
}

/// `snapshots/{commit}/{rel}` → `../../(..)blobs/{etag}` (a copy where symlinks fail).
fn link_pointer(pointer: &Path, etag: &str, rel: &str, blob: &Path) -> Result<()> {
    if let Some(p) = pointer.parent() {
        io(p, std::fs::create_dir_all(p))?;
    }
    if pointer.symlink_metadata().is_ok() {
        io(pointer, std::fs::remove_file(pointer))?;
    }
    let ups = rel.split('/').count() - 1 + 2;
    let target: PathBuf = std::iter::repeat_n("..", ups).collect::<PathBuf>().join("blobs").join(etag);
    #[cfg(unix)]
    {
        if std::os::unix::fs::symlink(&target, pointer).is_ok() {
            return Ok(());
        }
    }
    let _ = target;
    io(pointer, std::fs::copy(blob, pointer).map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches_pattern("*.json", "config.json"));
        assert!(matches_pattern("*.json", "sub/config.json"));
        assert!(!matches_pattern("*.json", "model.safetensors"));
        assert!(matches_pattern("data/", "data/train-0.parquet"));
        assert!(matches_pattern("model-0000?-of-*.safetensors", "model-00001-of-00003.safetensors"));
        assert!(matches_pattern("[ab].txt", "a.txt"));
        assert!(!matches_pattern("[!ab].txt", "a.txt"));
        assert!(matches_pattern("data/train-0000[0].parquet", "data/train-00000.parquet"));
    }

    #[test]
    fn splits() {
        assert_eq!(split_of("data/train-00000-of-00020.parquet").as_deref(), Some("train"));
        assert_eq!(split_of("test.parquet").as_deref(), Some("test"));
        assert_eq!(split_of("default/validation/0000.parquet").as_deref(), Some("validation"));
        assert_eq!(split_of("README.md"), None);
        assert!(in_split("data/train-00000-of-00020.parquet", "train"));
        assert!(!in_split("data/test-00000-of-00001.parquet", "train"));
        assert!(in_split("default/test/0000.parquet", "test"));
        assert!(!in_split("data/train.json", "train"));
    }

    #[test]
    fn etags() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
    }
}
