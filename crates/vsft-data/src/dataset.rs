//! Datasets: parquet in the llava-instruct-mix-vsft schema and the original LLaVA JSON
//! format, read lazily by row index, with a seeded shuffle and a small resumable cursor.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{BadRowKind, DataError, Result};
use crate::template::{Content, Message, KNOWN_ROLES};

/// Where an image's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    Bytes(Arc<Vec<u8>>),
    Path(PathBuf),
}

impl ImageSource {
    /// The encoded image. A file is read up to `image_proc::MAX_IMAGE_FILE_BYTES`
    /// (a longer one is an error of kind `FileTooLarge`); errors name the file.
    pub fn load(&self) -> std::io::Result<Arc<Vec<u8>>> {
        match self {
            ImageSource::Bytes(b) => Ok(b.clone()),
            ImageSource::Path(p) => crate::guard::read_bounded(p, crate::image_proc::MAX_IMAGE_FILE_BYTES, "image files")
                .map(Arc::new)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
        }
    }
}

/// One dataset row, converted to the common message structure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Index in the split (before shuffling).
    pub index: usize,
    pub file: PathBuf,
    /// Row within `file`.
    pub file_row: usize,
    pub messages: Vec<Message>,
    pub images: Vec<ImageSource>,
}

/// What to do with a bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    #[default]
    Error,
    Skip,
}

impl std::str::FromStr for OnBadRow {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "error" => Ok(OnBadRow::Error),
            "skip" => Ok(OnBadRow::Skip),
            o => Err(format!("on_bad_row must be \"error\" or \"skip\", not {o:?}")),
        }
    }
}

/// Rows listed per reason in skip reports.
pub const SKIP_REPORT_ROWS: usize = 5;

/// Counts of skipped rows by reason, with the first few messages and row locations of each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkipStats {
    pub counts: BTreeMap<BadRowKind, usize>,
    pub examples: BTreeMap<BadRowKind, Vec<String>>,
    /// (file, row in file) of the first `SKIP_REPORT_ROWS` rows skipped for each reason.
    pub first_rows: BTreeMap<BadRowKind, Vec<(PathBuf, usize)>>,
}

impl SkipStats {
    pub fn record(&mut self, e: &DataError) {
        let kind = e.bad_row_kind().unwrap_or(BadRowKind::Template);
        *self.counts.entry(kind).or_default() += 1;
        let ex = self.examples.entry(kind).or_default();
        if ex.len() < 3 {
            ex.push(e.to_string());
        }
        if let DataError::BadRow { loc, .. } = e {
            let rows = self.first_rows.entry(kind).or_default();
            if rows.len() < SKIP_REPORT_ROWS {
                rows.push((loc.file.clone(), loc.row));
            }
        }
    }
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }
    pub fn merge(&mut self, o: &SkipStats) {
        for (k, v) in &o.counts {
            *self.counts.entry(*k).or_default() += v;
        }
        for (k, v) in &o.examples {
            let ex = self.examples.entry(*k).or_default();
            let room = 3usize.saturating_sub(ex.len());
            ex.extend(v.iter().take(room).cloned());
        }
        for (k, v) in &o.first_rows {
            let rows = self.first_rows.entry(*k).or_default();
            let room = SKIP_REPORT_ROWS.saturating_sub(rows.len());
            rows.extend(v.iter().take(room).cloned());
        }
    }
    /// One entry per reason with the first rows skipped for it, e.g.
    /// `corrupt image: 3 rows (data/train.parquet rows 4, 17, 230)`.
    pub fn report(&self) -> String {
        if self.counts.is_empty() {
            return "no rows skipped".into();
        }
        self.counts
            .iter()
            .map(|(k, &n)| {
                let rows = self.first_rows.get(k).map(|r| r.as_slice()).unwrap_or_default();
                let noun = if n == 1 { "row" } else { "rows" };
                if rows.is_empty() {
                    return format!("{k}: {n} {noun}");
                }
                let more = if n > rows.len() { ", ..." } else { "" };
                format!("{k}: {n} {noun} ({}{more})", list_rows_by_file(rows))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// `a.parquet rows 1, 4; b.parquet row 0` (files in order of first appearance).
fn list_rows_by_file(rows: &[(PathBuf, usize)]) -> String {
    let mut by_file: Vec<(&Path, Vec<usize>)> = Vec::new();
    for (file, row) in rows {
        match by_file.iter_mut().find(|(f, _)| f == file) {
            Some((_, v)) => v.push(*row),
            None => by_file.push((file, vec![*row])),
        }
    }
    by_file
        .iter()
        .map(|(f, v)| {
            let noun = if v.len() == 1 { "row" } else { "rows" };
            format!("{} {noun} {}", f.display(), v.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Random access to the rows of a split.
pub trait RowSource: Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads row `index` (0-based over the split).
    fn get(&mut self, index: usize) -> Result<Row>;
    /// Contiguous ranges of rows that are cheap to read together (parquet row groups).
    fn groups(&self) -> Vec<(usize, usize)>;
    /// How many groups will be read in an interleaved way (the shuffle window): sources
    /// with a cache keep at least that many decoded.
    fn set_group_window(&mut self, _groups: usize) {}
    fn describe(&self) -> String;
}

/// Most messages in one conversation.
pub const MAX_MESSAGES_PER_ROW: usize = 4096;
/// Most rows in a dataset (the epoch order holds 8 bytes per row, a LLaVA JSON index 16):
/// counts claimed by a file's metadata beyond it are refused before anything is allocated.
pub const MAX_DATASET_ROWS: usize = 1 << 25;
/// Most rows in one parquet row group (a row group is decoded at once).
pub const MAX_ROW_GROUP_ROWS: usize = 1 << 20;
/// Most rows a parquet file may claim per byte of its size (run-length encoding makes
/// identical rows cheap, but not free): a footer claiming more is lying.
const MAX_ROWS_PER_FILE_BYTE: u64 = 1024;
/// Largest record of a LLaVA JSON file (records hold text and image paths, not images).
pub const MAX_JSON_RECORD_BYTES: u64 = 64 << 20;

/// Checks the common structure of a row: non-empty, known roles, content types, and that
/// the number of image blocks equals the number of images.
pub fn validate_row(row: &Row) -> Result<()> {
    let bad = |field: String, kind: BadRowKind, msg: String| DataError::bad_row(&row.file, row.file_row, field, kind, msg);
    if row.messages.is_empty() {
        return Err(bad("messages".into(), BadRowKind::EmptyConversation, "the conversation has no messages".into()));
    }
    if row.messages.len() > MAX_MESSAGES_PER_ROW {
        // Label masks without {% generation %} render every prefix: quadratic in the turns.
        return Err(bad(
            "messages".into(),
            BadRowKind::TooLong,
            format!("{} messages; at most {MAX_MESSAGES_PER_ROW} are allowed in one conversation", row.messages.len()),
        ));
    }
    let mut n_img = 0;
    for (i, m) in row.messages.iter().enumerate() {
        if !KNOWN_ROLES.contains(&m.role.as_str()) {
            return Err(bad(
                format!("messages[{i}].role"),
                BadRowKind::UnknownRole,
                format!("unknown role {:?} (expected one of {:?})", m.role, KNOWN_ROLES),
            ));
        }
        for (j, c) in m.content.iter().enumerate() {
            match c.kind.as_str() {
                "image" => n_img += 1,
                "text" => {
                    if c.text.is_none() {
                        return Err(bad(format!("messages[{i}].content[{j}].text"), BadRowKind::WrongType, "text block with null text".into()));
                    }
                }
                o => {
                    return Err(bad(format!("messages[{i}].content[{j}].type"), BadRowKind::WrongType, format!("unknown content type {o:?}")));
                }
            }
        }
    }
    if n_img != row.images.len() {
        return Err(bad(
            "images".into(),
            BadRowKind::ImageCountMismatch,
            format!("{n_img} image blocks (<image>) in the messages but {} images", row.images.len()),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Parquet

/// Files of a dataset: a file, a directory of shards (hub layout `data/{split}-*.parquet`) or
/// a glob. With `split`, only files whose name starts with `{split}-`/`{split}.`/`{split}_`
/// (or that sit in a directory named `split`) are kept.
pub fn resolve_parquet_files(path: &str, split: Option<&str>) -> Result<Vec<PathBuf>> {
    let p = Path::new(path);
    let mut files: Vec<PathBuf> = if p.is_file() {
        return Ok(vec![p.to_path_buf()]);
    } else if p.is_dir() {
        let mut out = Vec::new();
        walk(p, &mut out, 0).map_err(|e| DataError::io(p, e))?;
        out
    } else if path.contains(['*', '?', '[']) {
        glob::glob(path)
            .map_err(|e| DataError::Other(format!("bad glob {path:?}: {e}")))?
            .filter_map(|r| r.ok())
            .filter(|f| f.is_file())
            .collect()
    } else {
        return Err(DataError::NoData(path.to_string()));
    };
    files.retain(|f| f.extension().is_some_and(|e| e == "parquet"));
    let name_of = |f: &PathBuf| f.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    // Shards without split names (e.g. `part-0.parquet`) are all `train`.
    let unsplit = !files.iter().any(|f| ["train", "test", "validation", "valid", "dev", "eval"].iter().any(|s| name_of(f).starts_with(s)));
    let split = if unsplit && split == Some("train") { None } else { split };
    if let Some(s) = split {
        files.retain(|f| {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let in_dir = f.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()) == Some(s);
            in_dir || [format!("{s}-"), format!("{s}."), format!("{s}_")].iter().any(|pre| name.starts_with(pre.as_str()))
        });
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::NoData(format!("{path}{}", split.map(|s| format!(" (split {s})")).unwrap_or_default())));
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> std::io::Result<()> {
    if depth > 4 {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out, depth + 1)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

struct ParquetFile {
    path: PathBuf,
    meta: ArrowReaderMetadata,
    /// Global index of the file's first row.
    start: usize,
    /// (global start, rows) per row group.
    groups: Vec<(usize, usize)>,
    /// Schema problem, reported for each row of the file.
    schema_error: Option<(String, BadRowKind, String)>,
}

/// Lazily read parquet shards in the llava-instruct-mix-vsft schema.
pub struct ParquetSource {
    files: Vec<ParquetFile>,
    total: usize,
    /// (file index, row group) -> decoded batch; a few most recent.
    cache: VecDeque<((usize, usize), RecordBatch)>,
    cache_cap: usize,
}

fn check_schema(schema: &arrow_schema::Schema) -> Option<(String, BadRowKind, String)> {
    for col in ["messages", "images"] {
        let Ok(f) = schema.field_with_name(col) else {
            return Some((col.into(), BadRowKind::MissingColumn, format!("column `{col}` is missing")));
        };
        let ok = match f.data_type() {
            DataType::List(c) | DataType::LargeList(c) => matches!(c.data_type(), DataType::Struct(_)),
            _ => false,
        };
        if !ok {
            let want = if col == "messages" { "list<struct<content, role>>" } else { "list<struct<bytes, path>>" };
            return Some((col.into(), BadRowKind::WrongType, format!("expected {want}, found {}", f.data_type())));
        }
    }
    None
}

/// Checks that every column chunk of a row group lies inside the file: the parquet crate
/// allocates a chunk's claimed size before reading it.
fn check_column_chunks(rg: &parquet::file::metadata::RowGroupMetaData, file_len: u64) -> std::result::Result<(), String> {
    for c in rg.columns() {
        let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
        let len = c.compressed_size();
        let end = u64::try_from(start).ok().zip(u64::try_from(len).ok()).and_then(|(s, l)| s.checked_add(l));
        if end.is_none_or(|e| e > file_len) {
            return Err(format!("column `{}` claims bytes {start}..{start}+{len}, outside the file's {file_len} bytes", c.column_path()));
        }
    }
    Ok(())
}

impl ParquetSource {
    pub fn open(files: Vec<PathBuf>) -> Result<Self> {
        let mut out = Vec::new();
        let mut total = 0usize;
        for path in files {
            let perr = |msg: String| DataError::Parquet { path: path.clone(), msg };
            let f = File::open(&path).map_err(|e| DataError::io(&path, e))?;
            let file_len = f.metadata().map_err(|e| DataError::io(&path, e))?.len();
            // The parquet crate checks the footer length against the file size; the thrift
            // decoder may still panic on hostile metadata.
            let meta = crate::guard::catch_panic(|| ArrowReaderMetadata::load(&f, ArrowReaderOptions::new()))
                .map_err(|p| perr(format!("unreadable metadata (the parquet library failed: {p})")))?
                .map_err(|e| perr(e.to_string()))?;
            let schema_error = check_schema(meta.schema());
            let start = total;
            let mut groups = Vec::new();
            let mut file_rows = 0u64;
            for (gi, rg) in meta.metadata().row_groups().iter().enumerate() {
                let n = usize::try_from(rg.num_rows())
                    .ok()
                    .filter(|&n| n <= MAX_ROW_GROUP_ROWS)
                    .ok_or_else(|| perr(format!("row group {gi} claims {} rows; a row group may hold 0 to {MAX_ROW_GROUP_ROWS}", rg.num_rows())))?;
                check_column_chunks(rg, file_len).map_err(|m| perr(format!("row group {gi}: {m}")))?;
                file_rows += n as u64;
                groups.push((total, n));
                total += n;
                if total > MAX_DATASET_ROWS {
                    return Err(perr(format!("the dataset would have more than {MAX_DATASET_ROWS} rows, the most allowed")));
                }
            }
            if file_rows > file_len.saturating_mul(MAX_ROWS_PER_FILE_BYTE) {
                return Err(perr(format!("the metadata claims {file_rows} rows in a file of {file_len} bytes")));
            }
            out.push(ParquetFile { path, meta, start, groups, schema_error });
        }
        Ok(ParquetSource { files: out, total, cache: VecDeque::new(), cache_cap: 4 })
    }

    /// Number of decoded row groups kept (at least 1).
    pub fn set_cache_capacity(&mut self, n: usize) {
        self.cache_cap = n.max(1);
    }

    pub fn files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    fn locate(&self, index: usize) -> (usize, usize, usize) {
        let fi = self.files.partition_point(|f| f.start <= index) - 1;
        let f = &self.files[fi];
        let gi = f.groups.partition_point(|&(s, _)| s <= index) - 1;
        (fi, gi, index - f.groups[gi].0)
    }

    fn batch(&mut self, fi: usize, gi: usize) -> Result<RecordBatch> {
        if let Some(pos) = self.cache.iter().position(|(k, _)| *k == (fi, gi)) {
            let e = self.cache.remove(pos).expect("position found above");
            let b = e.1.clone();
            self.cache.push_front(e);
            return Ok(b);
        }
        let f = &self.files[fi];
        let perr = |msg: String| DataError::Parquet { path: f.path.clone(), msg: format!("row group {gi}: {msg}") };
        let n = f.groups[gi].1;
        let batch = crate::guard::catch_panic(|| read_row_group(f, gi))
            .map_err(|p| perr(format!("undecodable data (the parquet library failed: {p})")))?
            .map_err(perr)?;
        if batch.num_rows() != n {
            return Err(perr(format!("the metadata says {n} rows but the data holds {}", batch.num_rows())));
        }
        self.cache.push_front(((fi, gi), batch.clone()));
        while self.cache.len() > self.cache_cap {
            self.cache.pop_back();
        }
        Ok(batch)
    }
}

/// Decodes the `messages` and `images` columns of one row group as one batch.
fn read_row_group(f: &ParquetFile, gi: usize) -> std::result::Result<RecordBatch, String> {
    let file = File::open(&f.path).map_err(|e| e.to_string())?;
    let n = f.groups[gi].1;
    let columns = ["messages", "images"].iter().filter_map(|col| f.meta.schema().index_of(col).ok());
    let pmask = parquet::arrow::ProjectionMask::roots(f.meta.metadata().file_metadata().schema_descr(), columns);
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, f.meta.clone())
        .with_row_groups(vec![gi])
        .with_projection(pmask)
        .with_batch_size(n)
        .build()
        .map_err(|e| e.to_string())?;
    let mut batches = Vec::new();
    for b in reader {
        batches.push(b.map_err(|e| e.to_string())?);
    }
    // Only row groups with rows are read, and they are read as one batch.
    match batches.len() {
        1 => Ok(batches.pop().expect("one batch")),
        k => Err(format!("decoded into {k} batches, expected 1")),
    }
}

/// The values of list element `row` of a List/LargeList array.
fn list_at(arr: &dyn Array, row: usize) -> std::result::Result<Option<ArrayRef>, String> {
    if arr.is_null(row) {
        return Ok(None);
    }
    if let Some(l) = arr.as_list_opt::<i32>() {
        return Ok(Some(l.value(row)));
    }
    if let Some(l) = arr.as_list_opt::<i64>() {
        return Ok(Some(l.value(row)));
    }
    Err(format!("expected a list, found {}", arr.data_type()))
}

fn str_at(arr: &dyn Array, i: usize) -> std::result::Result<Option<String>, String> {
    if arr.is_null(i) {
        return Ok(None);
    }
    if let Some(a) = arr.as_string_opt::<i32>() {
        return Ok(Some(a.value(i).to_string()));
    }
    if let Some(a) = arr.as_string_opt::<i64>() {
        return Ok(Some(a.value(i).to_string()));
    }
    if let Some(a) = arr.as_string_view_opt() {
        return Ok(Some(a.value(i).to_string()));
    }
    Err(format!("expected string, found {}", arr.data_type()))
}

fn bytes_at(arr: &dyn Array, i: usize) -> std::result::Result<Option<Vec<u8>>, String> {
    if arr.is_null(i) {
        return Ok(None);
    }
    if let Some(a) = arr.as_binary_opt::<i32>() {
        return Ok(Some(a.value(i).to_vec()));
    }
    if let Some(a) = arr.as_binary_opt::<i64>() {
        return Ok(Some(a.value(i).to_vec()));
    }
    if let Some(a) = arr.as_binary_view_opt() {
        return Ok(Some(a.value(i).to_vec()));
    }
    Err(format!("expected binary, found {}", arr.data_type()))
}

fn int_at(arr: &dyn Array, i: usize) -> std::result::Result<Option<i64>, String> {
    if arr.is_null(i) {
        return Ok(None);
    }
    if let Some(a) = arr.as_primitive_opt::<Int64Type>() {
        return Ok(Some(a.value(i)));
    }
    if let Some(a) = arr.as_primitive_opt::<arrow_array::types::Int32Type>() {
        return Ok(Some(a.value(i) as i64));
    }
    Err(format!("expected int64, found {}", arr.data_type()))
}

/// Value `i` of an optional struct child: `None` when the child is absent or the value null.
fn opt_at<T>(col: Option<&ArrayRef>, i: usize, at: fn(&dyn Array, usize) -> std::result::Result<Option<T>, String>) -> std::result::Result<Option<T>, String> {
    col.map_or(Ok(None), |a| at(a.as_ref(), i))
}

fn struct_field<'a>(s: &'a StructArray, name: &str) -> Option<&'a ArrayRef> {
    s.column_by_name(name)
}

impl RowSource for ParquetSource {
    fn len(&self) -> usize {
        self.total
    }

    fn groups(&self) -> Vec<(usize, usize)> {
        self.files.iter().flat_map(|f| f.groups.iter().copied()).collect()
    }

    fn describe(&self) -> String {
        format!("{} parquet file(s), {} rows", self.files.len(), self.total)
    }

    fn set_group_window(&mut self, groups: usize) {
        self.set_cache_capacity(groups.max(self.cache_cap));
    }

    fn get(&mut self, index: usize) -> Result<Row> {
        if index >= self.total {
            return Err(DataError::Other(format!("row {index} out of range ({} rows)", self.total)));
        }
        let (fi, gi, r) = self.locate(index);
        let file_row = index - self.files[fi].start;
        let path = self.files[fi].path.clone();
        if let Some((field, kind, msg)) = self.files[fi].schema_error.clone() {
            return Err(DataError::bad_row(path, file_row, field, kind, msg));
        }
        let batch = self.batch(fi, gi)?;
        // Arrow's accessors assume consistent offsets; a file that decodes into inconsistent
        // arrays fails this row, not the process.
        crate::guard::catch_panic(|| parquet_row(&batch, r, index, &path, file_row)).unwrap_or_else(|p| {
            Err(DataError::bad_row(&path, file_row, "", BadRowKind::Internal, format!("the row's arrays are inconsistent: {p}")))
        })
    }
}

/// Converts row `r` of a decoded row group (columns checked by `check_schema`) to a `Row`.
fn parquet_row(batch: &RecordBatch, r: usize, index: usize, path: &Path, file_row: usize) -> Result<Row> {
    let bad = |field: String, kind: BadRowKind, msg: String| DataError::bad_row(path, file_row, field, kind, msg);
    let wt = |field: String, msg: String| DataError::bad_row(path, file_row, field, BadRowKind::WrongType, msg);
    let column = |name: &str| batch.column_by_name(name).ok_or_else(|| bad(name.into(), BadRowKind::MissingColumn, format!("column `{name}` is missing")));

    // messages
    let msgs = list_at(column("messages")?.as_ref(), r)
        .map_err(|m| wt("messages".into(), m))?
        .ok_or_else(|| bad("messages".into(), BadRowKind::EmptyConversation, "messages is null".into()))?;
    let ms = msgs.as_struct_opt().ok_or_else(|| wt("messages".into(), format!("expected struct elements, found {}", msgs.data_type())))?;
    let role_col = struct_field(ms, "role").ok_or_else(|| bad("messages.role".into(), BadRowKind::MissingColumn, "no `role` field".into()))?;
    let content_col = struct_field(ms, "content").ok_or_else(|| bad("messages.content".into(), BadRowKind::MissingColumn, "no `content` field".into()))?;
    let mut messages = Vec::with_capacity(ms.len().min(MAX_MESSAGES_PER_ROW + 1));
    for i in 0..ms.len() {
        let role = str_at(role_col.as_ref(), i)
            .map_err(|m| wt(format!("messages[{i}].role"), m))?
            .ok_or_else(|| wt(format!("messages[{i}].role"), "role is null".into()))?;
        let mut content = Vec::new();
        if let Some(ca) = list_at(content_col.as_ref(), i).map_err(|m| wt(format!("messages[{i}].content"), m))? {
            let cs = ca.as_struct_opt().ok_or_else(|| wt(format!("messages[{i}].content"), format!("expected list<struct<index, text, type>>, found {}", ca.data_type())))?;
            let ty = struct_field(cs, "type").ok_or_else(|| bad(format!("messages[{i}].content.type"), BadRowKind::MissingColumn, "no `type` field".into()))?;
            let tx = struct_field(cs, "text");
            let ix = struct_field(cs, "index");
            for j in 0..cs.len() {
                let kind = str_at(ty.as_ref(), j)
                    .map_err(|m| wt(format!("messages[{i}].content[{j}].type"), m))?
                    .ok_or_else(|| wt(format!("messages[{i}].content[{j}].type"), "type is null".into()))?;
                let text = opt_at(tx, j, str_at).map_err(|m| wt(format!("messages[{i}].content[{j}].text"), m))?;
                let index = opt_at(ix, j, int_at).map_err(|m| wt(format!("messages[{i}].content[{j}].index"), m))?;
                content.push(Content { index, text, kind });
            }
        }
        messages.push(Message { role, content });
    }

    // images
    let mut images = Vec::new();
    if let Some(ia) = list_at(column("images")?.as_ref(), r).map_err(|m| wt("images".into(), m))? {
        let is = ia.as_struct_opt().ok_or_else(|| wt("images".into(), format!("expected list<struct<bytes, path>>, found {}", ia.data_type())))?;
        let bcol = struct_field(is, "bytes");
        let pcol = struct_field(is, "path");
        for k in 0..is.len() {
            let b = opt_at(bcol, k, bytes_at).map_err(|m| wt(format!("images[{k}].bytes"), m))?;
            let p = opt_at(pcol, k, str_at).map_err(|m| wt(format!("images[{k}].path"), m))?;
            match (b, p) {
                (Some(b), _) => images.push(ImageSource::Bytes(Arc::new(b))),
                (None, Some(p)) => {
                    let pp = Path::new(&p);
                    let full = if pp.is_absolute() { pp.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).join(pp) };
                    images.push(ImageSource::Path(full));
                }
                (None, None) => return Err(bad(format!("images[{k}]"), BadRowKind::CorruptImage, "image has neither bytes nor path".into())),
            }
        }
    }
    Ok(Row { index, file: path.to_path_buf(), file_row, messages, images })
}

// ---------------------------------------------------------------------------------------
// LLaVA JSON

/// The original LLaVA format: `[{"id", "image", "conversations": [{"from", "value"}]}]`,
/// image paths relative to an image folder. `<image>` in a value becomes an image block
/// (with one `\n` right after it dropped); `human`→user, `gpt`→assistant.
pub struct LlavaJsonSource {
    path: PathBuf,
    image_root: PathBuf,
    /// Byte range of each record in the file: the file is scanned once, records are parsed
    /// on access, so memory holds 16 bytes per row, not the dataset.
    records: Vec<(u64, u32)>,
    file: Option<File>,
}

/// Byte ranges of the elements of a top-level JSON array (or of the non-empty lines of a
/// JSON-lines file), found by a streaming scan that tracks strings and nesting. Records larger
/// than `MAX_JSON_RECORD_BYTES` and more than `MAX_DATASET_ROWS` records are refused.
fn scan_records(path: &Path, jsonl: bool) -> Result<Vec<(u64, u32)>> {
    use std::io::Read;
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::new();
    let (mut depth, mut in_str, mut esc) = (0u64, false, false);
    let mut start: Option<u64> = None;
    let mut pos: u64 = 0;
    let mut started = jsonl; // seen the opening '[' (JSON) / always (JSON lines)
    let mut closed = false; // seen the closing ']' (JSON)
    let jerr = |m: String| DataError::Json { path: path.to_path_buf(), msg: m };
    let push = |out: &mut Vec<(u64, u32)>, s0: u64, end: u64| -> Result<()> {
        let len = end - s0;
        if len > MAX_JSON_RECORD_BYTES {
            return Err(jerr(format!(
                "record {} (at byte {s0}) has {len} bytes; a record may have at most {}",
                out.len(),
                crate::guard::human_bytes(MAX_JSON_RECORD_BYTES)
            )));
        }
        if out.len() >= MAX_DATASET_ROWS {
            return Err(jerr(format!("more than {MAX_DATASET_ROWS} records, the most allowed")));
        }
        out.push((s0, len as u32));
        Ok(())
    };
    loop {
        let n = r.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        for &c in &buf[..n] {
            if in_str {
                if esc {
                    esc = false;
                } else if c == b'\\' {
                    esc = true;
                } else if c == b'"' {
                    in_str = false;
                }
                pos += 1;
                continue;
            }
            let blank = matches!(c, b' ' | b'\t' | b'\r' | b'\n');
            if !blank && (closed || (!started && c != b'[')) {
                let found = if closed { "text after the closing `]`" } else { "something else" };
                return Err(jerr(format!("expected one JSON array of records, found {found} at byte {pos}")));
            }
            match c {
                b'"' => {
                    in_str = true;
                    if start.is_none() && depth == 0 {
                        start = Some(pos);
                    }
                }
                b'[' if !started => started = true,
                b'[' | b'{' => {
                    if depth == 0 && start.is_none() {
                        start = Some(pos);
                    }
                    depth += 1;
                }
                b']' | b'}' if depth > 0 => {
                    depth -= 1;
                    if depth == 0 {
                        if let Some(s0) = start.take() {
                            push(&mut out, s0, pos + 1)?;
                        }
                    }
                }
                b']' if !jsonl => {
                    if let Some(s0) = start.take() {
                        push(&mut out, s0, pos)?;
                    }
                    closed = true;
                }
                b']' | b'}' => return Err(jerr(format!("unbalanced `{}` at byte {pos}", c as char))),
                b',' | b'\n' if depth == 0 => {
                    if let Some(s0) = start.take() {
                        push(&mut out, s0, pos)?;
                    }
                }
                _ if blank || c == b',' => {}
                _ => {
                    if depth == 0 && start.is_none() {
                        start = Some(pos);
                    }
                }
            }
            pos += 1;
        }
    }
    if in_str || depth != 0 || (started && !jsonl && !closed) {
        return Err(jerr("truncated JSON".into()));
    }
    // An empty (or all-blank) file is no JSON document at all, not an empty dataset.
    if !jsonl && !started {
        return Err(jerr("empty: expected one JSON array of records".into()));
    }
    if let Some(s0) = start.take() {
        push(&mut out, s0, pos)?;
    }
    Ok(out)
}

impl LlavaJsonSource {
    pub fn open(path: &Path, image_root: Option<&Path>) -> Result<Self> {
        let jsonl = path.extension().is_some_and(|e| e == "jsonl");
        let records = scan_records(path, jsonl)?;
        let image_root = image_root.map(Path::to_path_buf).unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf());
        Ok(LlavaJsonSource { path: path.to_path_buf(), image_root, records, file: None })
    }

    fn record(&mut self, index: usize) -> Result<serde_json::Value> {
        use std::io::{Read, Seek, SeekFrom};
        let &(off, len) = self.records.get(index).ok_or_else(|| DataError::Other(format!("row {index} out of range")))?;
        if self.file.is_none() {
            self.file = Some(File::open(&self.path).map_err(|e| DataError::io(&self.path, e))?);
        }
        let f = self.file.as_mut().expect("opened above");
        // `len` was bounded by `MAX_JSON_RECORD_BYTES` when the file was scanned.
        let mut buf = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(off)).and_then(|_| f.read_exact(&mut buf)).map_err(|e| DataError::io(&self.path, e))?;
        serde_json::from_slice(&buf).map_err(|e| {
            DataError::bad_row(&self.path, index, "", BadRowKind::WrongType, format!("invalid JSON record (at byte {off} of the file): {e}"))
        })
    }
}

/// Converts LLaVA turns to messages.
pub fn llava_to_messages(turns: &[(String, String)]) -> std::result::Result<Vec<Message>, (usize, String)> {
    let mut out = Vec::new();
    let mut img = 0usize;
    for (i, (from, value)) in turns.iter().enumerate() {
        let role = match from.as_str() {
            "human" | "user" => "user",
            "gpt" | "assistant" => "assistant",
            "system" => "system",
            o => return Err((i, o.to_string())),
        };
        let mut content = Vec::new();
        let mut rest = value.as_str();
        while let Some(pos) = rest.find("<image>") {
            if pos > 0 {
                content.push(Content::text(&rest[..pos]));
            }
            content.push(Content::image(img));
            img += 1;
            rest = &rest[pos + "<image>".len()..];
            rest = rest.strip_prefix('\n').unwrap_or(rest);
        }
        if !rest.is_empty() {
            content.push(Content::text(rest));
        }
        out.push(Message::new(role, content));
    }
    Ok(out)
}

impl RowSource for LlavaJsonSource {
    fn len(&self) -> usize {
        self.records.len()
    }
    fn groups(&self) -> Vec<(usize, usize)> {
        vec![(0, self.records.len())]
    }
    fn describe(&self) -> String {
        format!("LLaVA JSON {} ({} rows)", self.path.display(), self.records.len())
    }
    fn get(&mut self, index: usize) -> Result<Row> {
        let rec = self.record(index)?;
        let path = &self.path;
        let bad = |field: String, kind: BadRowKind, msg: String| DataError::bad_row(path, index, field, kind, msg);
        let wt = |field: String, want: &str, found: &serde_json::Value| bad(field, BadRowKind::WrongType, format!("expected {want}, found {}", json_kind(found)));
        let rec = rec.as_object().ok_or_else(|| wt(String::new(), "an object with `conversations` and `image`", &rec))?;
        let conv = rec.get("conversations").ok_or_else(|| bad("conversations".into(), BadRowKind::MissingColumn, "no `conversations`".into()))?;
        let turns = conv.as_array().ok_or_else(|| wt("conversations".into(), "a list of {\"from\", \"value\"} turns", conv))?;
        let mut tv = Vec::with_capacity(turns.len());
        for (i, t) in turns.iter().enumerate() {
            let t = t.as_object().ok_or_else(|| wt(format!("conversations[{i}]"), "an object with `from` and `value`", t))?;
            let text = |key: &str| -> Result<String> {
                let field = format!("conversations[{i}].{key}");
                let v = t.get(key).ok_or_else(|| bad(field.clone(), BadRowKind::MissingColumn, format!("no `{key}`")))?;
                v.as_str().map(str::to_string).ok_or_else(|| wt(field, "a string", v))
            };
            tv.push((text("from")?, text("value")?));
        }
        let messages = llava_to_messages(&tv).map_err(|(i, r)| {
            bad(format!("conversations[{i}].from"), BadRowKind::UnknownRole, format!("unknown role {r:?} (expected human, gpt or system)"))
        })?;
        let mut images = Vec::new();
        match rec.get("image") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) => images.push(s.as_str()),
            Some(serde_json::Value::Array(a)) => {
                for (k, v) in a.iter().enumerate() {
                    images.push(v.as_str().ok_or_else(|| wt(format!("image[{k}]"), "a path", v))?);
                }
            }
            Some(o) => return Err(wt("image".into(), "a path or a list of paths", o)),
        }
        let mut srcs = Vec::new();
        for (k, im) in images.iter().enumerate() {
            let p = self.image_root.join(im);
            if !p.is_file() {
                let field = if images.len() == 1 { "image".to_string() } else { format!("image[{k}]") };
                return Err(bad(field, BadRowKind::MissingImageFile, format!("image file {} not found", p.display())));
            }
            srcs.push(ImageSource::Path(p));
        }
        Ok(Row { index, file: self.path.clone(), file_row: index, messages, images: srcs })
    }
}

/// What kind of JSON value `v` is, for errors (never the value itself, which may be huge).
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Opens a dataset: `.json`/`.jsonl` is LLaVA JSON, anything else parquet (a file, a
/// directory of shards or a glob). A directory holding `train*` files and no `split` given
/// means the `train` split.
pub fn open_dataset(path: &str, split: Option<&str>, image_root: Option<&Path>) -> Result<Box<dyn RowSource>> {
    let p = Path::new(path);
    if p.is_file() && p.extension().is_some_and(|e| e == "json" || e == "jsonl") {
        return Ok(Box::new(LlavaJsonSource::open(p, image_root)?));
    }
    // A directory in the hub layout without a split asked for: the `train` split.
    let split = match split {
        None if p.is_dir() => {
            let all = resolve_parquet_files(path, None)?;
            let has_train = all.iter().any(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("train")));
            if has_train {
                Some("train")
            } else {
                None
            }
        }
        s => s,
    };
    let files = resolve_parquet_files(path, split)?;
    Ok(Box::new(ParquetSource::open(files)?))
}

// ---------------------------------------------------------------------------------------
// Order and cursor

/// The position in the stream: small, serialisable, stored in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    pub seed: u64,
    pub epoch: u64,
    /// Number of rows of this epoch's order already consumed.
    pub position: usize,
}

/// splitmix64: the seeded generator of the epoch order (and of the robustness tests' mutations).
pub struct SplitMix64(pub u64);
impl SplitMix64 {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        // Lemire's multiply-shift; bias negligible for dataset sizes.
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The order of rows in an epoch: a seeded permutation of row indices. Row groups are
/// permuted, then the rows of each window of `window` consecutive (permuted) groups are
/// permuted together, so reading touches at most `window` row groups at a time. With
/// `window >= number of groups` it is a uniform permutation of all rows.
pub fn epoch_order(groups: &[(usize, usize)], seed: u64, epoch: u64, shuffle: bool, window: usize) -> Vec<usize> {
    let total: usize = groups.iter().map(|g| g.1).sum();
    let mut out = Vec::with_capacity(total);
    if !shuffle {
        for &(s, n) in groups {
            out.extend(s..s + n);
        }
        return out;
    }
    let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xA24BAED4963EE407) ^ 0x5EED);
    let mut g: Vec<(usize, usize)> = groups.to_vec();
    rng.shuffle(&mut g);
    for w in g.chunks(window.max(1)) {
        let start = out.len();
        for &(s, n) in w {
            out.extend(s..s + n);
        }
        rng.shuffle(&mut out[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(text: &str, jsonl: bool) -> Vec<String> {
        let p = std::env::temp_dir().join(format!("vsft-scan-{}-{}.json", std::process::id(), jsonl));
        std::fs::write(&p, text).unwrap();
        let r = scan_records(&p, jsonl).unwrap();
        std::fs::remove_file(&p).ok();
        r.iter().map(|&(o, l)| text[o as usize..o as usize + l as usize].trim().to_string()).collect()
    }

    #[test]
    fn scans_array_elements_and_lines() {
        let t = r#" [ {"a": "x]}\"[{", "b": [1, {"c": 2}]},
 {"d": "é\\"} ,3, "s,t" ] "#;
        let got = ranges(t, false);
        assert_eq!(got, vec![r#"{"a": "x]}\"[{", "b": [1, {"c": 2}]}"#, r#"{"d": "é\\"}"#, "3", r#""s,t""#]);
        for g in &got {
            serde_json::from_str::<serde_json::Value>(g).unwrap();
        }
        let l = "{\"a\": 1}\n\n{\"b\": \"}\\n{\"}\n";
        assert_eq!(ranges(l, true), vec!["{\"a\": 1}", "{\"b\": \"}\\n{\"}"]);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let groups = vec![(0, 5), (5, 3), (8, 7)];
        let a = epoch_order(&groups, 1, 0, true, 2);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..15).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(&groups, 1, 0, true, 2));
        assert_ne!(a, epoch_order(&groups, 1, 1, true, 2));
        assert_ne!(a, epoch_order(&groups, 2, 0, true, 2));
        assert_eq!(epoch_order(&groups, 1, 0, false, 2), (0..15).collect::<Vec<_>>());
    }
}
