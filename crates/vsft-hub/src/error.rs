//! Errors of the Hub client. Each message says what to do about it.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, HubError>;

/// What can go wrong talking to the Hub or the local cache.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// 401/403: no token, a bad one, or one without the right access.
    #[error(
        "{what}: HTTP {status} (unauthorized{detail}). Set HF_TOKEN or run `huggingface-cli login`; \
         check the token has write access for pushes, and that you accepted the terms of gated repos{token_hint}"
    )]
    Auth { what: String, status: u16, detail: String, token_hint: &'static str },

    /// 404 on a repo.
    #[error("{repo_type} repo {repo_id:?} not found on {endpoint}: check the id (owner/name), the repo type, and that your token can see it if it is private{detail}")]
    RepoNotFound { repo_type: &'static str, repo_id: String, endpoint: String, detail: String },

    /// 404 on a revision (branch, tag or commit) of an existing repo.
    #[error(
        "revision {revision:?} not found in {repo_type} repo {repo_id:?}: check the branch, tag or commit sha{detail}"
    )]
    RevisionNotFound { repo_type: &'static str, repo_id: String, revision: String, detail: String },

    /// 404 on a file.
    #[error("file {path:?} not found in {repo_id:?} at revision {revision:?}{detail}")]
    EntryNotFound { repo_id: String, revision: String, path: String, detail: String },

    /// Any other HTTP error status (after retries for 5xx).
    #[error("{what}: HTTP {status}: {body}")]
    Http { what: String, status: u16, body: String },

    /// Connection-level failure (after retries).
    /// The cause is part of the message, not chained, so that it is printed once.
    #[error("{what}: cannot reach {endpoint}: {error}. Check the network and HF_ENDPOINT")]
    Transport {
        what: String,
        endpoint: String,
        error: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The server answered something this client does not understand.
    #[error("{what}: unexpected answer from the Hub: {msg}")]
    Protocol { what: String, msg: String },

    /// `HF_HUB_OFFLINE=1` and the cache lacks what was asked.
    #[error("offline mode (HF_HUB_OFFLINE=1): {what} is not in the cache {cache:?}. Unset HF_HUB_OFFLINE and download it once, or point to a local directory")]
    Offline { what: String, cache: PathBuf },

    /// A downloaded or uploaded file does not match its expected size or hash.
    #[error("{path:?}: {msg}")]
    Integrity { path: PathBuf, msg: String },

    /// Local file system error.
    /// The OS error is part of the message, not chained, so that it is printed once.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },

    /// Bad argument (repo id, pattern, …).
    #[error("{0}")]
    Invalid(String),
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HubError::Io { path: path.into(), error: source }
    }

    /// HTTP status of the error, if it came from an HTTP answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            HubError::Auth { status, .. } | HubError::Http { status, .. } => Some(*status),
            HubError::RepoNotFound { .. } | HubError::RevisionNotFound { .. } | HubError::EntryNotFound { .. } => {
                Some(404)
            }
            _ => None,
        }
    }
}
