use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("{0}")]
    Recipe(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] vsft_model::ModelError),
    #[error(transparent)]
    Data(#[from] vsft_data::DataError),
    #[error("{0}")]
    Checkpoint(String),
    #[error("step {step}: the loss is {loss} (set train.on_nan = \"skip\" to drop such steps)")]
    NonFinite { step: usize, loss: f64 },
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}
