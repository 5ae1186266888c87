//! Writing conversations + images as parquet in the `llava-instruct-mix-vsft` schema:
//!
//! ```text
//! messages: list<element: struct<content: list<element: struct<index: int64, text: string, type: string>>, role: string>>
//! images:   list<element: struct<bytes: binary, path: string>>
//! ```
//!
//! with the `huggingface` schema metadata that `datasets` writes, so Python's
//! `datasets.load_dataset("parquet", ...)` reads `images` as a list of `Image`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int64Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{DemoError, Result};

/// One conversation: the image goes before the first user turn's text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConvRow {
    /// (user text, assistant text) per turn.
    pub turns: Vec<(String, String)>,
    pub png: Vec<u8>,
}

const HF_FEATURES: &str = r#"{"info":{"features":{"messages":{"feature":{"content":{"feature":{"index":{"dtype":"int64","_type":"Value"},"text":{"dtype":"string","_type":"Value"},"type":{"dtype":"string","_type":"Value"}},"_type":"List"},"role":{"dtype":"string","_type":"Value"}},"_type":"List"},"images":{"feature":{"_type":"Image"},"_type":"List"}}}}"#;

fn content_fields() -> Fields {
    Fields::from(vec![
        Field::new("index", DataType::Int64, true),
        Field::new("text", DataType::Utf8, true),
        Field::new("type", DataType::Utf8, true),
    ])
}

fn message_fields() -> Fields {
    Fields::from(vec![
        Field::new("content", DataType::List(Arc::new(Field::new("element", DataType::Struct(content_fields()), true))), true),
        Field::new("role", DataType::Utf8, true),
    ])
}

fn image_fields() -> Fields {
    Fields::from(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)])
}

pub(crate) fn schema() -> Schema {
    let messages = Field::new("messages", DataType::List(Arc::new(Field::new("element", DataType::Struct(message_fields()), true))), true);
    let images = Field::new("images", DataType::List(Arc::new(Field::new("element", DataType::Struct(image_fields()), true))), true);
    Schema::new(vec![messages, images]).with_metadata(HashMap::from([("huggingface".to_string(), HF_FEATURES.to_string())]))
}

fn batch(rows: &[ConvRow], schema: &Arc<Schema>) -> std::result::Result<RecordBatch, String> {
    // Content blocks, flattened over all messages of all rows.
    let (mut c_index, mut c_text, mut c_type) = (Vec::new(), Vec::new(), Vec::new());
    let mut content_lens = Vec::new(); // blocks per message
    let mut roles = Vec::new();
    let mut message_lens = Vec::new(); // messages per row
    for row in rows {
        for (t, (user, assistant)) in row.turns.iter().enumerate() {
            let mut n = 0;
            if t == 0 {
                c_index.push(Some(0i64));
                c_text.push(None);
                c_type.push(Some("image"));
                n += 1;
            }
            c_index.push(None);
            c_text.push(Some(user.as_str()));
            c_type.push(Some("text"));
            content_lens.push(n + 1);
            roles.push("user");
            c_index.push(None);
            c_text.push(Some(assistant.as_str()));
            c_type.push(Some("text"));
            content_lens.push(1);
            roles.push("assistant");
        }
        message_lens.push(2 * row.turns.len());
    }
    let content = StructArray::try_new(
        content_fields(),
        vec![
            Arc::new(Int64Array::from(c_index)) as ArrayRef,
            Arc::new(StringArray::from(c_text)),
            Arc::new(StringArray::from(c_type)),
        ],
        None,
    )
    .map_err(|e| e.to_string())?;
    let content_list = ListArray::try_new(
        Arc::new(Field::new("element", DataType::Struct(content_fields()), true)),
        OffsetBuffer::from_lengths(content_lens),
        Arc::new(content),
        None,
    )
    .map_err(|e| e.to_string())?;
    let message = StructArray::try_new(message_fields(), vec![Arc::new(content_list) as ArrayRef, Arc::new(StringArray::from(roles))], None)
        .map_err(|e| e.to_string())?;
    let messages = ListArray::try_new(
        Arc::new(Field::new("element", DataType::Struct(message_fields()), true)),
        OffsetBuffer::from_lengths(message_lens),
        Arc::new(message),
        None,
    )
    .map_err(|e| e.to_string())?;
    let bytes: Vec<Option<&[u8]>> = rows.iter().map(|r| Some(r.png.as_slice())).collect();
    let paths: Vec<Option<&str>> = vec![None; rows.len()];
    let image = StructArray::try_new(image_fields(), vec![Arc::new(BinaryArray::from(bytes)) as ArrayRef, Arc::new(StringArray::from(paths))], None)
        .map_err(|e| e.to_string())?;
    let images = ListArray::try_new(
        Arc::new(Field::new("element", DataType::Struct(image_fields()), true)),
        OffsetBuffer::from_lengths(vec![1; rows.len()]),
        Arc::new(image),
        None,
    )
    .map_err(|e| e.to_string())?;
    RecordBatch::try_new(schema.clone(), vec![Arc::new(messages), Arc::new(images)]).map_err(|e| e.to_string())
}

/// Writes `rows` to `path` (through a temporary file renamed into place, so a reader never
/// sees half a file), `row_group` rows per row group.
pub(crate) fn write_rows(path: &Path, rows: &[ConvRow], row_group: usize) -> Result<()> {
    let perr = |m: String| DemoError::Parquet { path: path.to_path_buf(), msg: m };
    if let Some(dir) = path.parent() {
        crate::error::create_dir(dir)?;
    }
    let tmp = path.with_extension("parquet.tmp");
    let schema = Arc::new(schema());
    let file = std::fs::File::create(&tmp).map_err(|e| DemoError::io(&tmp, e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group.max(1)))
        .set_created_by("vsft-demo".to_string())
        .build();
    let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| perr(e.to_string()))?;
    for chunk in rows.chunks(row_group.max(1)) {
        let b = batch(chunk, &schema).map_err(perr)?;
        w.write(&b).map_err(|e| perr(e.to_string()))?;
    }
    w.close().map_err(|e| perr(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| DemoError::io(path, e))?;
    Ok(())
}
