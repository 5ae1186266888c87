use std::io::Read;
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
    let file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(TrainError::Other(format!("{}: is a directory, expected {what}", path.display())));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| TrainError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(TrainError::Other(format!(
            "{}: more than {} bytes; {what} may be at most {}",
            path.display(),
            limit,
            human_bytes(limit)
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        TrainError::Other(format!("{}: not UTF-8 text (invalid byte at offset {}); expected {what}", path.display(), e.utf8_error().valid_up_to()))
    })
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
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
