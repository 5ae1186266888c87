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
        write!(f, "{}: row {}: field `{}`", self.file.display(), self.row, self.field)
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
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
        DataError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
