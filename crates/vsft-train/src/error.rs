use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("{0}")]
    Recipe(String),
    /// The OS error is shown in the message and deliberately not chained as a source: a
    /// printer that walks the chain would show its text twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Model(#[from] vsft_model::ModelError),
    #[error(transparent)]
    Data(#[from] vsft_data::DataError),
    #[error(transparent)]
    Track(#[from] vsft_track::TrackError),
    #[error("{0}")]
    Checkpoint(String),
    #[error("step {step}: the loss is {loss} (set train.on_nan = \"skip\" to drop such steps)")]
    NonFinite { step: usize, loss: f64 },
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), error }
    }
}

/// Reads a UTF-8 text file of at most `limit` bytes; `what` says what the file is, for the
/// message. Reads at most `limit + 1` bytes, so `/dev/zero` or a huge file stops with an error
/// instead of filling memory.
pub fn read_text_limited(path: &Path, limit: u64, what: &str) -> Result<String, TrainError> {
    let bytes = vsft_data::guard::read_bounded(path, limit, what).map_err(|e| {
        if vsft_data::guard::is_refusal(&e) {
            TrainError::Other(format!("{}: {e}", path.display()))
        } else {
            TrainError::io(path, e)
        }
    })?;
    String::from_utf8(bytes).map_err(|e| {
        TrainError::Other(format!("{}: not UTF-8 text (invalid byte at offset {}); expected {what}", path.display(), e.utf8_error().valid_up_to()))
    })
}


/// At most this many characters of a value or a line go into a message.
const EXCERPT_CHARS: usize = 80;

/// `text` for a message: whole when short, else its first characters and how long it is.
pub fn excerpt(text: &str) -> String {
    let n = text.chars().count();
    if n <= EXCERPT_CHARS {
        text.to_string()
    } else {
        let head: String = text.chars().take(EXCERPT_CHARS).collect();
        format!("{head}… ({n} characters)")
    }
}
