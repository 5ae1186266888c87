use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    /// The OS error is part of the message and deliberately not chained as a source, so that
    /// an error chain does not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{dir}: the weights (*.safetensors) do not match what config.json describes:\n{problems}")]
    Mismatch { dir: PathBuf, problems: String },
    /// What the file describes would not fit in memory (refused before allocating it).
    #[error("{path}: {message}")]
    TooLarge { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
}

impl ModelError {
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), error }
    }
}
