//! # vsft-hub: the Hugging Face Hub client of vsft
//!
//! A small blocking client that talks to the Hub's HTTP API the way `huggingface_hub`
//! (without Xet) does, and shares its on-disk cache with Python.
//!
//! ## Features
//! - **Configuration** ([`HubConfig::from_env`]): `HF_ENDPOINT`; token from `HF_TOKEN` →
//!   `HUGGING_FACE_HUB_TOKEN` → file `$HF_TOKEN_PATH` / `$HF_HOME/token`; cache `HF_HUB_CACHE`
//!   or `$HF_HOME/hub`; `HF_HUB_OFFLINE`; `HF_HUB_DISABLE_PROGRESS_BARS`; `HTTPS_PROXY`. Tests build a
//!   [`HubConfig`] explicitly instead.
//! - **Retries**: 5xx, 429 (honouring `Retry-After`) and connection errors are retried with
//!   exponential backoff ([`HubConfig::max_tries`], default 5), interrupted downloads resume. 401/403/404 become errors that say what to do.
//! - **Push** ([`HubClient::push_folder`]): create repo (existing is fine), create branch,
//!   preupload (base64 samples, 256 files a request; unchanged files skipped), Git LFS batch
//!   with `basic` and `multipart` transfers plus verify, then one NDJSON commit. Progress bar
//!   for uploads.
//! - **Pull** ([`HubClient::snapshot_download`], [`HubClient::download_file`]): into
//!   `{cache}/{models|datasets}--owner--name/{blobs,snapshots/<commit>,refs}` with relative
//!   symlinks, exactly the Python layout; `ETag`/`X-Linked-Etag`/`X-Repo-Commit` handling;
//!   resumable (`blobs/<etag>.incomplete` + `Range`); sha256 check of LFS blobs; offline mode
//!   and fallback to the cache when the Hub is unreachable. Progress bar for downloads.
//! - **Datasets** ([`HubClient::dataset_split_files`], [`HubClient::dataset_splits`]): parquet
//!   files per split from the repo's file list (`data/train-00000-of-00020.parquet` → `train`).
//! - **Paths in recipes** ([`resolve_model_path`], [`resolve_dataset_path`]): an existing local
//!   path is used as-is, otherwise `owner/name[@revision]` is downloaded from the Hub.
//! - **Test server** (feature `test-server`, module `testserver`): a Hub-compatible HTTP server
//!   on loopback that checks what clients send; test code only.
//!
//! ## Use
//! ```no_run
//! use vsft_hub::{HubClient, PushOptions};
//! let hub = HubClient::from_env();
//! // `vsft push DIR --repo OWNER/NAME [--private] [--revision REV] [--message TEXT]`
//! let opts = PushOptions { private: true, message: Some("Upload adapter".into()), ..Default::default() };
//! let info = hub.push_folder("out/adapter".as_ref(), "me/llava-lora", &opts)?;
//! println!("{}", info.commit_url);
//! // Recipes: `[model] path` and `[data] train` may be Hub ids.
//! let model_dir = vsft_hub::resolve_model_path("llava-hf/llava-1.5-7b-hf")?;
//! let data_dir = vsft_hub::resolve_dataset_path("HuggingFaceH4/llava-instruct-mix-vsft", "train")?;
//! # Ok::<(), vsft_hub::HubError>(())
//! ```
//! Other crates' tests get the server with
//! `vsft-hub = { path = "../vsft-hub", features = ["test-server"] }` in `[dev-dependencies]`.
//!
//! ## Verified against
//! The loopback test server, and (test `python_interop`, when `python3` has it) the Python
//! `huggingface_hub` client: its `upload_folder` passes the server's checks, it downloads what
//! vsft pushed, and each side reads the other's cache. Never run against huggingface.co here.
//!
//! ## Limits
//! - No Xet upload/download (the Hub accepts LFS from non-Xet clients).
//! - Pushes: no `create_pr`, no deletions; files unchanged at the revision are skipped and a
//!   push that changes nothing makes no commit; creating a Space needs its SDK (not sent).
//! - Files are transferred one at a time; no file locks between processes downloading the same
//!   blob at once; the `trees/` listing cache of `huggingface_hub` ≥ 2 is not written.
//! - Dataset splits come from file names, not from the `configs:` of the dataset card.

mod client;
mod error;
mod pull;
mod push;
#[cfg(any(test, feature = "test-server"))]
pub mod testserver;

use std::path::{Path, PathBuf};

pub use client::{HubClient, HubConfig, RepoType, DEFAULT_ENDPOINT};
pub use error::{HubError, Result};
pub use pull::{in_split, matches_pattern, split_of, RepoInfo, Sibling};
pub use push::{CommitInfo, PushOptions};

/// Weight formats skipped when a model repo also has safetensors.
const OTHER_WEIGHTS: &[&str] =
    &[".bin", ".pt", ".pth", ".h5", ".msgpack", ".ot", ".onnx", ".onnx_data", ".gguf", ".tflite", ".ckpt"];

/// Splits `owner/name[@revision]` when `s` looks like a Hub id (and is not a local path).
pub fn parse_hub_id(s: &str) -> Option<(&str, Option<&str>)> {
    let (id, rev) = match s.split_once('@') {
        Some((i, r)) if !r.is_empty() => (i, Some(r)),
        Some(_) => return None,
        None => (s, None),
    };
    (id.matches('/').count() == 1 && client::validate_repo_id(id).is_ok()).then_some((id, rev))
}

impl HubClient {
    /// See [`resolve_model_path`].
    pub fn resolve_model_path(&self, s: &str) -> Result<PathBuf> {
        let p = Path::new(s);
        if p.exists() {
            return Ok(p.to_path_buf());
        }
        let Some((id, rev)) = parse_hub_id(s) else {
            return Err(HubError::Invalid(format!(
                "model path {s:?} does not exist and is not a Hub id (owner/name[@revision])"
            )));
        };
        self.snapshot_select(id, RepoType::Model, rev, &|all: &[String]| {
            let has_st = all.iter().any(|f| f.ends_with(".safetensors"));
            all.iter().filter(|f| !has_st || !OTHER_WEIGHTS.iter().any(|e| f.ends_with(e))).cloned().collect()
        })
        .map_err(|e| not_local(s, e))
    }

    /// See [`resolve_dataset_path`].
    pub fn resolve_dataset_path(&self, s: &str, split: &str) -> Result<PathBuf> {
        let p = Path::new(s);
        if p.exists() {
            return Ok(p.to_path_buf());
        }
        let Some((id, rev)) = parse_hub_id(s) else {
            return Err(HubError::Invalid(format!(
                "dataset path {s:?} does not exist and is not a Hub id (owner/name[@revision])"
            )));
        };
        Ok(self.download_dataset_split(id, rev, split).map_err(|e| not_local(s, e))?.0)
    }
}

/// A Hub id that is not on the Hub may have been meant as a local path: say both.
fn not_local(s: &str, e: HubError) -> HubError {
    match e {
        HubError::RepoNotFound { .. } => {
            HubError::Invalid(format!("{s:?} is neither an existing local path nor a Hub repo: {e}"))
        }
        e => e,
    }
}

/// A model directory for `s`: an existing local path as-is, else the Hub id
/// `owner/name[@revision]` downloaded (all files; other weight formats skipped when the repo
/// has safetensors) into the HF cache, returning the snapshot folder. Uses
/// [`HubConfig::from_env`].
pub fn resolve_model_path(s: &str) -> Result<PathBuf> {
    HubClient::from_env().resolve_model_path(s)
}

/// A dataset location for `s`: an existing local path as-is, else the Hub dataset id
/// `owner/name[@revision]`, of which the parquet files of `split` are downloaded; returns the
/// snapshot folder, in which the split's files keep the repo layout (`data/{split}-*.parquet`,
/// selected by [`in_split`], the same rule as vsft-data). Uses [`HubConfig::from_env`].
pub fn resolve_dataset_path(s: &str, split: &str) -> Result<PathBuf> {
    HubClient::from_env().resolve_dataset_path(s, split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert_eq!(parse_hub_id("llava-hf/llava-1.5-7b-hf"), Some(("llava-hf/llava-1.5-7b-hf", None)));
        assert_eq!(parse_hub_id("a/b@dev"), Some(("a/b", Some("dev"))));
        assert_eq!(parse_hub_id("./a/b"), None);
        assert_eq!(parse_hub_id("/abs/path"), None);
        assert_eq!(parse_hub_id("gpt2"), None);
        assert_eq!(parse_hub_id("a/b/c"), None);
    }
}
