//! Error type of the data pipeline. Every error that concerns a dataset row names the
//! file, the row and the field it was found in.

use std::fmt;
use std::path::PathBuf;

/// Where in a dataset a problem was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLoc {
    pub file: PathBuf,
    /// Row index within `file` (0-based).
    pub row: usize,
    /// Field path within the row, e.g. `images[0].bytes` or `messages[1].role`.
    pub field: String,
}

impl fmt::Display for RowLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: row {}", self.file.display(), self.row)?;
        // A problem with the row as a whole (e.g. a record that is not a JSON object) has no field.
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        Ok(())
    }
}

/// Why a row is bad. Used both in errors and as the key of skip counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BadRowKind {
    CorruptImage,
    ImageCountMismatch,
    EmptyConversation,
    UnknownRole,
    MissingColumn,
    WrongType,
    MissingImageFile,
    ImageTruncated,
    TooLong,
    Template,
    /// Processing the row panicked (a bug in vsft or a library it uses, triggered by this row).
    Internal,
}

impl BadRowKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            BadRowKind::CorruptImage => "corrupt image",
            BadRowKind::ImageCountMismatch => "<image> count != image count",
            BadRowKind::EmptyConversation => "empty conversation",
            BadRowKind::UnknownRole => "unknown role",
            BadRowKind::MissingColumn => "missing column",
            BadRowKind::WrongType => "wrong type",
            BadRowKind::MissingImageFile => "missing image file",
            BadRowKind::ImageTruncated => "truncation would cut an image",
            BadRowKind::TooLong => "too long",
            BadRowKind::Template => "chat template error",
            BadRowKind::Internal => "internal error",
        }
    }
}

impl fmt::Display for BadRowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{loc}: {kind}: {msg}")]
    BadRow { loc: RowLoc, kind: BadRowKind, msg: String },
    /// The OS error is displayed, not chained as a source, so that `{:#}` does not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: larger than {} allowed for a {what}", crate::guard::human_bytes(*limit))]
    TooLarge { path: PathBuf, what: String, limit: u64 },
    #[error("{path}: parquet: {msg}")]
    Parquet { path: PathBuf, msg: String },
    #[error("{path}: schema: {msg}")]
    Schema { path: PathBuf, msg: String },
    #[error("{path}: json: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("image: {0}")]
    Image(String),
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A setting (recipe key such as `data.num_workers`) that cannot be honoured.
    #[error("{key}: {msg}")]
    Setting { key: &'static str, msg: String },
    #[error("no data files found for {0}")]
    NoData(String),
    #[error("{0}")]
    Other(String),
}

impl DataError {
    pub fn bad_row(
        file: impl Into<PathBuf>,
        row: usize,
        field: impl Into<String>,
        kind: BadRowKind,
        msg: impl Into<String>,
    ) -> Self {
        DataError::BadRow {
            loc: RowLoc { file: file.into(), row, field: field.into() },
            kind,
            msg: msg.into(),
        }
    }

    /// The bad-row kind, if this error is about one row (and so may be skipped).
    pub fn bad_row_kind(&self) -> Option<BadRowKind> {
        match self {
            DataError::BadRow { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), error: source }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
