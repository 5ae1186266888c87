use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Bad { path: PathBuf, msg: String },
}

impl TrackError {
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        TrackError::Io { path: path.to_path_buf(), msg: e.to_string() }
    }
    pub fn bad(path: &Path, msg: impl Into<String>) -> Self {
        TrackError::Bad { path: path.to_path_buf(), msg: msg.into() }
    }
}

pub type Result<T> = std::result::Result<T, TrackError>;
