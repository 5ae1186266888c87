//! Push: create repo → preupload → LFS batch (basic / multipart, verify) → NDJSON commit.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::client::{quote, validate_repo_id, Body, Ctx, HubClient, RepoType, Req};
use crate::error::{HubError, Result};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const LFS_MIME: &str = "application/vnd.git-lfs+json";
/// Files per preupload request and objects per LFS batch request, as `huggingface_hub`.
const CHUNK_FILES: usize = 256;

/// Options of [`HubClient::push_folder`].
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Create the repo private (ignored when it already exists).
    pub private: bool,
    /// Branch to commit to (default `main`); created from `main` when missing.
    pub revision: Option<String>,
    /// Commit summary (default "Upload folder with vsft").
    pub message: Option<String>,
    /// Model (default) or dataset repo.
    pub repo_type: RepoType,
}

/// The commit made by a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitInfo {
    /// Web URL of the commit.
    pub commit_url: String,
    /// The new commit sha.
    pub commit_oid: String,
    /// Files committed (repo-relative, `/`-separated).
    pub files: Vec<String>,
    /// Files that went through Git LFS (a subset of `files`).
    pub lfs_files: Vec<String>,
    /// Files left out because the revision already has them with the same content. When
    /// nothing changed, no commit is made and `commit_oid` is the revision's current commit.
    pub unchanged: Vec<String>,
}

struct LocalFile {
    rel: String,
    path: PathBuf,
    size: u64,
    sample: Vec<u8>,
}

#[derive(Deserialize)]
struct PreuploadAnswer {
    files: Vec<PreuploadFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreuploadFile {
    path: String,
    upload_mode: String,
    #[serde(default)]
    should_ignore: bool,
    /// The file's oid at the revision (git blob sha1, or sha256 for LFS), when it exists.
    #[serde(default)]
    oid: Option<String>,
}

#[derive(Deserialize)]
struct BatchAnswer {
    objects: Vec<BatchObject>,
}

#[derive(Deserialize)]
struct BatchObject {
    oid: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    actions: Option<BatchActions>,
    #[serde(default)]
    error: Option<BatchError>,
}

#[derive(Deserialize)]
struct BatchActions {
    upload: Option<Action>,
    verify: Option<Action>,
}

#[derive(Deserialize)]
struct Action {
    href: String,
    #[serde(default)]
    header: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct BatchError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommitAnswer {
    #[serde(default)]
    commit_url: String,
    commit_oid: String,
}

fn value_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Files under `dir` (recursively, following symlinks), `.git/` and `.cache/huggingface/` skipped,
/// as sorted `/`-separated relative paths.
fn collect_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>, depth: usize) -> Result<()> {
        if depth > 64 {
            return Err(HubError::Invalid(format!("{dir:?}: directory nesting too deep (symlink loop?)")));
        }
        for e in std::fs::read_dir(dir).map_err(|e| HubError::io(dir, e))? {
            let e = e.map_err(|e| HubError::io(dir, e))?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let meta = std::fs::metadata(&p).map_err(|e| HubError::io(&p, e))?;
            let rel = p.strip_prefix(root).unwrap_or(&p);
            let rel_s: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
            let rel_s = rel_s.join("/");
            if name == ".git" || rel_s == ".cache/huggingface" {
                continue;
            }
            if meta.is_dir() {
                walk(root, &p, out, depth + 1)?;
            } else if meta.is_file() {
                out.push((rel_s, p));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out, 0)?;
    out.sort();
    Ok(out)
}

/// sha256 (hex) of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| HubError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| HubError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Git's blob id: sha1 of `blob {size}\0` + content (the oid the Hub reports for regular files).
pub(crate) fn git_blob_sha1(path: &Path) -> Result<String> {
    use sha1::Digest as _;
    let data = std::fs::read(path).map_err(|e| HubError::io(path, e))?;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(&data);
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl HubClient {
    /// Creates a repo; an existing one (HTTP 409) is fine. Returns the repo URL.
    pub fn create_repo(&self, repo_id: &str, repo_type: RepoType, private: bool) -> Result<String> {
        validate_repo_id(repo_id)?;
        let (org, name) = match repo_id.split_once('/') {
            Some((o, n)) => (Some(o), n),
            None => (None, repo_id),
        };
        let mut body = json!({"name": name, "visibility": if private { "private" } else { "public" }});
        if let Some(o) = org {
            body["organization"] = json!(o);
        }
        if repo_type != RepoType::Model {
            body["type"] = json!(repo_type.as_str());
        }
        let body = serde_json::to_vec(&body).expect("json");
        let ctx = Ctx::new(format!("creating {} repo {repo_id}", repo_type.as_str())).repo(repo_type, repo_id);
        let req = Req::new("POST", self.api_url("/api/repos/create")).json(&body);
        match self.send_json::<serde_json::Value>(&req, &ctx) {
            Ok(v) => Ok(v.get("url").and_then(|u| u.as_str()).unwrap_or_default().to_string()),
            Err(HubError::Http { status: 409, .. }) => {
                Ok(format!("{}/{}{}", self.cfg.endpoint, repo_type.url_prefix(), repo_id))
            }
            // A token that may write to an existing repo but not create repos (fine-grained
            // tokens, org repos): fine when the repo is there.
            Err(e @ HubError::Auth { status: 403, .. }) => match self.repo_info(repo_id, repo_type, "main") {
                Ok(_) => Ok(format!("{}/{}{}", self.cfg.endpoint, repo_type.url_prefix(), repo_id)),
                Err(_) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Creates branch `branch` (from the default branch); an existing one is fine.
    pub fn create_branch(&self, repo_id: &str, repo_type: RepoType, branch: &str) -> Result<()> {
        let url = self.api_url(&format!("/api/{}/{repo_id}/branch/{}", repo_type.plural(), quote(branch, false)));
        let ctx = Ctx::new(format!("creating branch {branch:?} of {repo_id}")).repo(repo_type, repo_id);
        match self.send(&Req::new("POST", url).json(b"{}"), &ctx) {
            Ok(_) | Err(HubError::Http { status: 409, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Uploads every file of `dir` to `repo_id` in one commit, as `huggingface_hub.upload_folder`
    /// does without Xet: create the repo (existing is fine), create the branch when
    /// `revision` is not `main`, preupload to learn each file's mode, upload the LFS ones
    /// (basic or multipart transfer, then verify), then the NDJSON commit.
    pub fn push_folder(&self, dir: &Path, repo_id: &str, opts: &PushOptions) -> Result<CommitInfo> {
        validate_repo_id(repo_id)?;
        if self.cfg.offline {
            return Err(HubError::Invalid("cannot push in offline mode (HF_HUB_OFFLINE=1): unset it".into()));
        }
        if !dir.is_dir() {
            return Err(HubError::Invalid(format!("{dir:?} is not a directory: push needs the folder to upload")));
        }
        let rt = opts.repo_type;
        let rev = opts.revision.clone().unwrap_or_else(|| "main".to_string());
        let files = collect_files(dir)?;
        if files.is_empty() {
            return Err(HubError::Invalid(format!("{dir:?} has no files to push")));
        }
        let mut local = Vec::with_capacity(files.len());
        for (rel, path) in files {
            let mut f = std::fs::File::open(&path).map_err(|e| HubError::io(&path, e))?;
            let size = f.metadata().map_err(|e| HubError::io(&path, e))?.len();
            let mut sample = Vec::with_capacity(512);
            (&mut f).take(512).read_to_end(&mut sample).map_err(|e| HubError::io(&path, e))?;
            local.push(LocalFile { rel, path, size, sample });
        }

        self.create_repo(repo_id, rt, opts.private)?;
        if rev != "main" && !rev.starts_with("refs/pr/") {
            self.create_branch(repo_id, rt, &rev)?;
        }

        // Preupload: which files go through LFS.
        let mut modes: HashMap<String, (bool, bool, Option<String>)> = HashMap::new(); // path -> (lfs, ignore, remote oid)
        let pre_url = self.api_url(&format!("/api/{}/{repo_id}/preupload/{}", rt.plural(), quote(&rev, false)));
        let ctx = Ctx::new(format!("preupload to {repo_id}")).repo(rt, repo_id).rev(&rev);
        for chunk in local.chunks(CHUNK_FILES) {
            let files: Vec<_> =
                chunk.iter().map(|f| json!({"path": f.rel, "sample": B64.encode(&f.sample), "size": f.size})).collect();
            let body = serde_json::to_vec(&json!({ "files": files })).expect("json");
            let ans: PreuploadAnswer = self.send_json(&Req::new("POST", pre_url.clone()).json(&body), &ctx)?;
            for a in ans.files {
                modes.insert(a.path, (a.upload_mode == "lfs", a.should_ignore, a.oid));
            }
        }
        let mut regular = Vec::new();
        let mut lfs = Vec::new();
        let mut oids: HashMap<&str, String> = HashMap::new();
        let mut unchanged = Vec::new();
        let lfs_total: u64 =
            local.iter().filter(|f| modes.get(&f.rel).is_some_and(|m| m.0 && !m.1) && f.size > 0).map(|f| f.size).sum();
        let hbar = self.bar(lfs_total, "Hashing LFS files");
        for f in &local {
            let Some((is_lfs, ignore, remote)) = modes.get(&f.rel) else {
                return Err(HubError::Protocol {
                    what: ctx.what.clone(),
                    msg: format!("no upload mode returned for {:?}", f.rel),
                });
            };
            if *ignore {
                continue;
            }
            let is_lfs = *is_lfs && f.size > 0;
            let oid = if is_lfs {
                let o = sha256_file(&f.path)?;
                hbar.inc(f.size);
                o
            } else {
                git_blob_sha1(&f.path)?
            };
            if remote.as_deref() == Some(oid.as_str()) {
                unchanged.push(f.rel.clone());
                continue;
            }
            if is_lfs {
                oids.insert(&f.rel, oid);
                lfs.push(f);
            } else {
                regular.push(f);
            }
        }
        hbar.finish_and_clear();
        if regular.is_empty() && lfs.is_empty() {
            // Nothing to commit: don't make an empty commit (as huggingface_hub).
            let head = self.repo_info(repo_id, rt, &rev)?.sha;
            return Ok(CommitInfo {
                commit_url: format!("{}/{}{repo_id}/commit/{head}", self.cfg.endpoint, rt.url_prefix()),
                commit_oid: head,
                files: Vec::new(),
                lfs_files: Vec::new(),
                unchanged,
            });
        }

        // LFS uploads.
        if !lfs.is_empty() {
            let total: u64 = lfs.iter().map(|f| f.size).sum();
            let bar = self.bar(total, format!("Uploading {} LFS file(s)", lfs.len()));
            let res = self.upload_lfs(repo_id, rt, &rev, &lfs, &oids, &bar);
            bar.finish_and_clear();
            res?;
        }

        // NDJSON commit.
        let summary = opts.message.clone().unwrap_or_else(|| "Upload folder with vsft".to_string());
        let mut ndjson = Vec::new();
        let mut line = |v: serde_json::Value| {
            serde_json::to_writer(&mut ndjson, &v).expect("json");
            ndjson.push(b'\n');
        };
        line(json!({"key": "header", "value": {"summary": summary, "description": ""}}));
        for f in &regular {
            let bytes = std::fs::read(&f.path).map_err(|e| HubError::io(&f.path, e))?;
            line(json!({"key": "file", "value": {"content": B64.encode(&bytes), "path": f.rel, "encoding": "base64"}}));
        }
        for f in &lfs {
            line(
                json!({"key": "lfsFile", "value": {"path": f.rel, "algo": "sha256", "oid": oids[f.rel.as_str()], "size": f.size}}),
            );
        }
        let url = self.api_url(&format!("/api/{}/{repo_id}/commit/{}", rt.plural(), quote(&rev, false)));
        let ctx = Ctx::new(format!("committing to {repo_id}")).repo(rt, repo_id).rev(&rev);
        let req = Req::new("POST", url).header("content-type", "application/x-ndjson").body(Body::Bytes(&ndjson));
        let ans: CommitAnswer = self.send_json(&req, &ctx)?;
        let mut files: Vec<String> = regular.iter().chain(lfs.iter()).map(|f| f.rel.clone()).collect();
        files.sort();
        Ok(CommitInfo {
            commit_url: ans.commit_url,
            commit_oid: ans.commit_oid,
            files,
            lfs_files: lfs.iter().map(|f| f.rel.clone()).collect(),
            unchanged,
        })
    }

    fn upload_lfs(
        &self,
        repo_id: &str,
        rt: RepoType,
        rev: &str,
        lfs: &[&LocalFile],
        oids: &HashMap<&str, String>,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let batch_url = format!("{}/{}{repo_id}.git/info/lfs/objects/batch", self.cfg.endpoint, rt.url_prefix());
        let ctx = Ctx::new(format!("LFS batch for {repo_id}")).repo(rt, repo_id).rev(rev);
        // One object per distinct oid (identical files upload once).
        let mut by_oid: BTreeMap<&str, &LocalFile> = BTreeMap::new();
        for f in lfs {
            by_oid.entry(oids[f.rel.as_str()].as_str()).or_insert(f);
        }
        let objs: Vec<(&str, &LocalFile)> = by_oid.into_iter().collect();
        for chunk in objs.chunks(CHUNK_FILES) {
            let objects: Vec<_> = chunk.iter().map(|(oid, f)| json!({"oid": oid, "size": f.size})).collect();
            let body = serde_json::to_vec(&json!({
                "operation": "upload",
                "transfers": ["basic", "multipart"],
                "objects": objects,
                "hash_algo": "sha256",
                "ref": {"name": rev},
            }))
            .expect("json");
            let req = Req::new("POST", batch_url.clone())
                .header("accept", LFS_MIME)
                .header("content-type", LFS_MIME)
                .body(Body::Bytes(&body));
            let ans: BatchAnswer = self.send_json(&req, &ctx)?;
            for (oid, f) in chunk {
                let Some(obj) = ans.objects.iter().find(|o| o.oid == *oid) else {
                    return Err(HubError::Protocol {
                        what: ctx.what.clone(),
                        msg: format!("the batch answer lacks object {oid} ({})", f.rel),
                    });
                };
                if let Some(e) = &obj.error {
                    return Err(HubError::Http {
                        what: format!("LFS upload of {} to {repo_id}", f.rel),
                        status: if (100..600).contains(&e.code) { e.code as u16 } else { 422 },
                        body: e.message.clone(),
                    });
                }
                if obj.size != 0 && obj.size != f.size {
                    return Err(HubError::Protocol {
                        what: ctx.what.clone(),
                        msg: format!("object {oid} size {} != {}", obj.size, f.size),
                    });
                }
                let Some(actions) = &obj.actions else {
                    bar.inc(f.size); // already on the Hub
                    continue;
                };
                if let Some(up) = &actions.upload {
                    if up.header.contains_key("chunk_size") {
                        self.upload_multipart(up, oid, f, bar)?;
                    } else {
                        self.upload_basic(up, f, bar)?;
                    }
                } else {
                    bar.inc(f.size);
                }
                if let Some(v) = &actions.verify {
                    let body = serde_json::to_vec(&json!({"oid": oid, "size": f.size})).expect("json");
                    let mut req = Req::new("POST", v.href.clone())
                        .header("accept", LFS_MIME)
                        .header("content-type", LFS_MIME)
                        .body(Body::Bytes(&body));
                    for (k, val) in &v.header {
                        if let Some(s) = value_str(val) {
                            req = req.header(k, s);
                        }
                    }
                    let ctx = Ctx::new(format!("verifying LFS upload of {}", f.rel));
                    self.send(&req, &ctx)?;
                }
            }
        }
        Ok(())
    }

    fn upload_basic(&self, up: &Action, f: &LocalFile, bar: &indicatif::ProgressBar) -> Result<()> {
        let mut req = Req::new("PUT", up.href.clone()).no_auth().body(Body::File {
            path: &f.path,
            offset: 0,
            len: f.size,
            bar: Some(bar),
        });
        for (k, v) in &up.header {
            if let Some(s) = value_str(v) {
                req = req.header(k, s);
            }
        }
        self.send(&req, &Ctx::new(format!("uploading {}", f.rel)).external(true))?;
        Ok(())
    }

    fn upload_multipart(&self, up: &Action, oid: &str, f: &LocalFile, bar: &indicatif::ProgressBar) -> Result<()> {
        let what = format!("multipart upload of {}", f.rel);
        let proto = |msg: String| HubError::Protocol { what: what.clone(), msg };
        let chunk_size: u64 = up
            .header
            .get("chunk_size")
            .and_then(value_str)
            .and_then(|s| s.parse().ok())
            .filter(|&c| c > 0)
            .ok_or_else(|| proto("bad chunk_size".into()))?;
        let mut parts: Vec<(u32, String)> =
            up.header.iter().filter_map(|(k, v)| Some((k.parse::<u32>().ok()?, value_str(v)?))).collect();
        parts.sort();
        let expected = f.size.div_ceil(chunk_size);
        if parts.len() as u64 != expected {
            return Err(proto(format!(
                "{} part URLs for {} bytes in chunks of {chunk_size} (expected {expected})",
                parts.len(),
                f.size
            )));
        }
        let mut etags = Vec::with_capacity(parts.len());
        for (i, (num, url)) in parts.iter().enumerate() {
            let offset = i as u64 * chunk_size;
            let len = chunk_size.min(f.size - offset);
            let req =
                Req::new("PUT", url.clone()).no_auth().body(Body::File { path: &f.path, offset, len, bar: Some(bar) });
            let resp = self.send(&req, &Ctx::new(format!("uploading part {num} of {}", f.rel)).external(true))?;
            let etag = resp.header("etag").map(str::to_string).ok_or_else(|| proto(format!("part {num}: no ETag")))?;
            etags.push(json!({"partNumber": num, "etag": etag}));
        }
        let body = serde_json::to_vec(&json!({"oid": oid, "parts": etags})).expect("json");
        let req = Req::new("POST", up.href.clone())
            .no_auth()
            .header("accept", LFS_MIME)
            .header("content-type", LFS_MIME)
            .body(Body::Bytes(&body));
        self.send(&req, &Ctx::new(format!("completing {what}")).external(true))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids_match_git() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hello");
        std::fs::write(&p, b"hello\n").unwrap();
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(git_blob_sha1(&p).unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
        assert_eq!(sha256_file(&p).unwrap(), "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
    }
}
