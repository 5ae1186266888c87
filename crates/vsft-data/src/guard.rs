//! Containment of untrusted input: reads bounded by size, and panics of libraries turned
//! into errors that say where they happened.

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};

/// `n` bytes as a short human-readable size (`1 MiB`, `300 bytes`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if n >= size && n % size == 0 {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} bytes")
}

/// The largest JSON configuration file read anywhere in vsft (`config.json`, shard indexes,
/// processor and adapter configs, recipes).
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 << 20;

/// Every bounded read of vsft: a whole file of at most `limit` bytes. Reads at most
/// `limit + 1` bytes whatever the file claims to be (a FIFO or `/dev/zero` reports no size),
/// so a larger file is refused without being read. The errors are `io::Error`s of kind
/// `FileTooLarge` or `IsADirectory` whose text says the limit and what was expected (`what`,
/// e.g. "a recipe (TOML)"); callers put the path in front, in their own error type.
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind};
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(Error::new(ErrorKind::IsADirectory, format!("is a directory, expected {what}")));
    }
    // The file's size, when it has one, sizes the buffer, never more than the limit.
    let mut buf = Vec::with_capacity(meta.len().min(limit) as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(Error::new(ErrorKind::FileTooLarge, format!("more than {}, the limit for {what}", human_bytes(limit))));
    }
    Ok(buf)
}

/// Whether a [`read_bounded`] error is its own refusal (the text says it all) rather than the OS's.
pub fn is_refusal(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::FileTooLarge | std::io::ErrorKind::IsADirectory)
}

/// [`read_bounded`] with vsft-data's errors.
pub fn read_capped(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    read_bounded(path, limit, what).map_err(|e| match e.kind() {
        std::io::ErrorKind::FileTooLarge => DataError::TooLarge { path: path.to_path_buf(), what: what.to_string(), limit },
        std::io::ErrorKind::IsADirectory => DataError::Config { path: path.to_path_buf(), msg: e.to_string() },
        _ => DataError::io(path, e),
    })
}

/// `read_capped` for text files.
pub fn read_text_capped(path: &Path, limit: u64, what: &str) -> Result<String> {
    String::from_utf8(read_capped(path, limit, what)?)
        .map_err(|e| DataError::Config { path: path.to_path_buf(), msg: format!("{what} is not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()) })
}

/// The message of a caught panic (`panic!` payloads are `&str` or `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs `f`, turning a panic into `Err(message)`. For calls into libraries that may panic
/// on hostile input (tokenizers, arrow); the data they see is not reused after a panic.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

/// Reads and parses a JSON file of at most `limit` bytes.
pub fn read_json_capped(path: &Path, limit: u64, what: &str) -> Result<serde_json::Value> {
    let bytes = read_capped(path, limit, what)?;
    serde_json::from_slice(&bytes).map_err(|e| DataError::Json { path: path.to_path_buf(), msg: e.to_string() })
}

/// Runs `f` on a row, turning a panic into a bad-row error (kind `Internal`) naming the row,
/// so that one hostile row fails (or, with `on_bad_row = skip`, skips) like any bad row.
pub fn row_guard<T>(row: &crate::dataset::Row, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_panic(f).unwrap_or_else(|msg| {
        Err(DataError::bad_row(&row.file, row.file_row, "", crate::error::BadRowKind::Internal, format!("processing the row failed: {msg}")))
    })
}

/// Reads row `index` of `source`, turning a panic into an error naming the row.
pub fn read_row(source: &mut dyn crate::dataset::RowSource, index: usize) -> Result<crate::dataset::Row> {
    catch_panic(|| source.get(index)).unwrap_or_else(|msg| Err(DataError::Other(format!("{}: reading row {index} failed: {msg}", source.describe()))))
}
