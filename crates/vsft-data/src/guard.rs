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

/// Reads a whole file of at most `limit` bytes. Reads at most `limit + 1` bytes whatever
/// the file claims to be (a FIFO or `/dev/zero` reports no size), so a larger file is
/// refused without being read. `what` names the kind of file in the error.
pub fn read_capped(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(DataError::Config { path: path.to_path_buf(), msg: format!("is a directory, expected a {what} file") });
    }
    let mut buf = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut buf).map_err(|e| DataError::io(path, e))?;
    if buf.len() as u64 > limit {
        return Err(DataError::TooLarge { path: path.to_path_buf(), what: what.to_string(), limit });
    }
    Ok(buf)
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
