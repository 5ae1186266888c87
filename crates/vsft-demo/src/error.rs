//! Errors of the demo generator; each names the file it concerns.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: parquet: {msg}", path.display())]
    Parquet { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    #[error("image encoding: {0}")]
    Image(String),
}

pub type Result<T> = std::result::Result<T, DemoError>;

impl DemoError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DemoError::Io { path: path.to_path_buf(), source }
    }
    pub(crate) fn data(path: &Path, msg: impl Into<String>) -> Self {
        DemoError::Data { path: path.to_path_buf(), msg: msg.into() }
    }
}

/// Creates `dir` (and parents), naming it on failure.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DemoError::io(dir, e))
}

/// Writes a file, naming it on failure.
pub(crate) fn write_file(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| DemoError::io(path, e))
}
