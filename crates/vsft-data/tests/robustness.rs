//! Hostile input never panics, hangs or allocates without bound: broken datasets (parquet
//! and LLaVA JSON, structurally wrong or with mutated bytes), hostile chat templates, broken
//! tokenizer files and absurd loader settings all end in an error that names the file (and
//! the row, field or template).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, Int64Builder, ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{Array, ArrayRef, Int64Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use vsft_data::collator::{CollatorConfig, MAX_BATCH_TOKENS};
use vsft_data::dataset::{open_dataset, Cursor, OnBadRow, Row, RowSource, SplitMix64 as Rng};
use vsft_data::inspect::{inspect, InspectOptions};
use vsft_data::loader::MAX_NUM_WORKERS;
use vsft_data::template::{ChatTemplate, Content, Message, SpecialTokens, MAX_TEMPLATE_BYTES, TEMPLATE_FUEL};
use vsft_data::{BadRowKind, DataError, DataLoader, LoaderConfig, Processor};

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

/// A fresh directory for one test.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vsft-robust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture processor, loaded once.
fn processor() -> Arc<Processor> {
    static PROCESSOR: std::sync::OnceLock<Arc<Processor>> = std::sync::OnceLock::new();
    PROCESSOR.get_or_init(|| Arc::new(Processor::from_model_dir(&fx().join("model"), Some(&fx().join("llava_hf.jinja"))).unwrap())).clone()
}

/// Runs `f`, failing the test with `case` if it panics.
fn no_panic<T>(case: &str, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{case}: panicked"))
}

/// Asserts an error message names `needles` and has no Debug-formatted internals.
fn assert_names(case: &str, msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "{case}: {msg:?} does not name {n:?}");
    }
    assert!(!msg.contains("field ``"), "{case}: empty field name in {msg:?}");
    for internal in ["Some(", "Error {", "kind:", "LlavaRecord"] {
        assert!(!msg.contains(internal), "{case}: Debug internals ({internal}) in {msg:?}");
    }
}

/// Every batch of a dataset (or the error opening it), with `workers` threads.
fn load_all(data: &Path, workers: usize, on_bad_row: OnBadRow) -> Vec<Result<vsft_data::Batch, DataError>> {
    let src = match open_dataset(data.to_str().unwrap(), None, Some(&fx().join("images"))) {
        Ok(s) => s,
        Err(e) => return vec![Err(e)],
    };
    let cfg = LoaderConfig { batch_size: 2, shuffle: false, num_workers: workers, on_bad_row, ..Default::default() };
    DataLoader::new(src, processor(), cfg, Cursor::default()).collect()
}

// ---------------------------------------------------------------------------------------
// Parquet

/// The rows of the fixture's test shard, as one record batch.
fn fixture_batch() -> RecordBatch {
    let f = std::fs::File::open(fx().join("llava_instruct_mix/data/test-00000-of-00001.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    arrow_select_first(&batches)
}

fn arrow_select_first(batches: &[RecordBatch]) -> RecordBatch {
    assert_eq!(batches.len(), 1, "the fixture shard is one batch");
    batches[0].clone()
}

fn write_parquet(path: &Path, batch: &RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// `batch` with column `name` replaced by `col` (or removed).
fn with_column(batch: &RecordBatch, name: &str, col: Option<ArrayRef>) -> RecordBatch {
    let schema = batch.schema();
    let mut fields = Vec::new();
    let mut cols = Vec::new();
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        if f.name() != name {
            fields.push(f.as_ref().clone());
            cols.push(c.clone());
        } else if let Some(col) = &col {
            fields.push(Field::new(name, col.data_type().clone(), true));
            cols.push(col.clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

/// A list<struct> column with child `child` of its structs replaced by `new` (same length).
fn replace_list_struct_child(col: &ArrayRef, child: &str, new: ArrayRef) -> ArrayRef {
    let list = col.as_any().downcast_ref::<ListArray>().unwrap();
    let st = list.values().as_any().downcast_ref::<StructArray>().unwrap();
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = st
        .fields()
        .iter()
        .zip(st.columns())
        .map(|(f, a)| if f.name() == child { (Field::new(child, new.data_type().clone(), true), new.clone()) } else { (f.as_ref().clone(), a.clone()) })
        .unzip();
    let st = StructArray::new(Fields::from(fields), arrays, st.nulls().cloned());
    let item = Field::new("item", st.data_type().clone(), true);
    Arc::new(ListArray::new(Arc::new(item), list.offsets().clone(), Arc::new(st), list.nulls().cloned()))
}

/// Length of the struct values of a list<struct> column.
fn values_len(col: &ArrayRef) -> usize {
    col.as_any().downcast_ref::<ListArray>().unwrap().values().len()
}

/// A list<struct> column with row `row` made null.
fn null_row(col: &ArrayRef, row: usize) -> ArrayRef {
    let list = col.as_any().downcast_ref::<ListArray>().unwrap();
    let valid: Vec<bool> = (0..list.len()).map(|i| i != row && list.is_valid(i)).collect();
    Arc::new(ListArray::new(
        Arc::new(Field::new("item", list.values().data_type().clone(), true)),
        list.offsets().clone(),
        list.values().clone(),
        Some(valid.into()),
    ))
}

/// Broken structures, each with the field its error must name.
fn structural_cases(batch: &RecordBatch) -> Vec<(&'static str, RecordBatch, &'static str, BadRowKind)> {
    let msgs = batch.column_by_name("messages").unwrap().clone();
    let imgs = batch.column_by_name("images").unwrap().clone();
    let n_msgs = values_len(&msgs);
    let n_imgs = values_len(&imgs);
    let strings = |n: usize, s: &str| -> ArrayRef { Arc::new(StringArray::from(vec![s; n])) };
    let ints = |n: usize| -> ArrayRef { Arc::new(Int64Array::from(vec![7i64; n])) };
    let list_of_ints = || -> ArrayRef {
        let mut b = ListBuilder::new(Int64Builder::new());
        for _ in 0..batch.num_rows() {
            b.values().append_value(1);
            b.append(true);
        }
        Arc::new(b.finish())
    };
    // messages whose first content block has an integer `type`
    let content = msgs.as_any().downcast_ref::<ListArray>().unwrap().values().as_any().downcast_ref::<StructArray>().unwrap().column_by_name("content").unwrap().clone();
    let content_int_type = replace_list_struct_child(&content, "type", ints(values_len(&content)));
    let content_bad_type = replace_list_struct_child(&content, "type", strings(values_len(&content), "video"));
    // images whose bytes are strings, and rows with neither bytes nor path
    let mut no_image = StructBuilder::from_fields(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)], n_imgs);
    for _ in 0..n_imgs {
        no_image.field_builder::<BinaryBuilder>(0).unwrap().append_null();
        no_image.field_builder::<StringBuilder>(1).unwrap().append_null();
        no_image.append(true);
    }
    let no_image: ArrayRef = Arc::new(no_image.finish());
    let imgs_list = imgs.as_any().downcast_ref::<ListArray>().unwrap();
    let imgs_no_bytes: ArrayRef = Arc::new(ListArray::new(
        Arc::new(Field::new("item", no_image.data_type().clone(), true)),
        imgs_list.offsets().clone(),
        no_image,
        None,
    ));
    vec![
        ("no_messages", with_column(batch, "messages", None), "messages", BadRowKind::MissingColumn),
        ("no_images", with_column(batch, "images", None), "images", BadRowKind::MissingColumn),
        ("messages_string", with_column(batch, "messages", Some(strings(batch.num_rows(), "hi"))), "messages", BadRowKind::WrongType),
        ("messages_list_of_int", with_column(batch, "messages", Some(list_of_ints())), "messages", BadRowKind::WrongType),
        ("images_list_of_int", with_column(batch, "images", Some(list_of_ints())), "images", BadRowKind::WrongType),
        ("role_int", with_column(batch, "messages", Some(replace_list_struct_child(&msgs, "role", ints(n_msgs)))), "messages[0].role", BadRowKind::WrongType),
        ("role_unknown", with_column(batch, "messages", Some(replace_list_struct_child(&msgs, "role", strings(n_msgs, "robot")))), "messages[0].role", BadRowKind::UnknownRole),
        ("content_string", with_column(batch, "messages", Some(replace_list_struct_child(&msgs, "content", strings(n_msgs, "hi")))), "messages[0].content", BadRowKind::WrongType),
        ("content_type_int", with_column(batch, "messages", Some(replace_list_struct_child(&msgs, "content", content_int_type))), "messages[0].content[0].type", BadRowKind::WrongType),
        ("content_type_video", with_column(batch, "messages", Some(replace_list_struct_child(&msgs, "content", content_bad_type))), "messages[0].content[0].type", BadRowKind::WrongType),
        ("image_bytes_string", with_column(batch, "images", Some(replace_list_struct_child(&imgs, "bytes", strings(n_imgs, "jpeg")))), "images[0].bytes", BadRowKind::WrongType),
        ("image_empty", with_column(batch, "images", Some(imgs_no_bytes)), "images[0]", BadRowKind::CorruptImage),
        ("messages_null", with_column(batch, "messages", Some(null_row(&msgs, 0))), "messages", BadRowKind::EmptyConversation),
        ("images_null", with_column(batch, "images", Some(null_row(&imgs, 0))), "images", BadRowKind::ImageCountMismatch),
    ]
}

#[test]
fn broken_parquet_structure_names_file_row_and_field() {
    let dir = tmp("parquet-structure");
    let batch = fixture_batch();
    for (name, bad, field, kind) in structural_cases(&batch) {
        let path = dir.join(format!("{name}.parquet"));
        write_parquet(&path, &bad);
        let file = format!("{name}.parquet");
        for workers in [0, 2] {
            let out = no_panic(name, || load_all(&path, workers, OnBadRow::Error));
            let err = out.into_iter().find_map(|r| r.err()).unwrap_or_else(|| panic!("{name}: no error"));
            let msg = err.to_string();
            assert_names(name, &msg, &[&file, "row 0", &format!("field `{field}`")]);
            assert_eq!(err.bad_row_kind(), Some(kind), "{name}: {msg}");
        }
        // skipping: every row of the file fails the same way, nothing panics
        let out = no_panic(name, || load_all(&path, 2, OnBadRow::Skip));
        assert!(out.iter().all(|r| r.is_ok()), "{name}: {:?}", out.iter().find_map(|r| r.as_ref().err().map(|e| e.to_string())));
    }
}

/// Mutations of a valid parquet file's bytes: its metadata (footer) and its length.
fn mutate_parquet(bytes: &[u8], rng: &mut Rng) -> (String, Vec<u8>) {
    let mut b = bytes.to_vec();
    let n = b.len();
    let meta_len = u32::from_le_bytes(b[n - 8..n - 4].try_into().unwrap()) as usize;
    let meta_start = n - 8 - meta_len;
    match rng.below(4) {
        0 => {
            let k = 1 + rng.below(8);
            for _ in 0..k {
                let i = meta_start + rng.below(meta_len);
                b[i] = rng.next() as u8;
            }
            (format!("{k} metadata bytes changed"), b)
        }
        1 => {
            let lie = [u32::MAX, (n as u32).saturating_mul(2), rng.next() as u32, 0][rng.below(4)];
            b[n - 8..n - 4].copy_from_slice(&lie.to_le_bytes());
            (format!("footer length {lie}"), b)
        }
        2 => {
            let keep = rng.below(n);
            b.truncate(keep);
            (format!("truncated to {keep} bytes"), b)
        }
        _ => {
            // a varint in the metadata made huge: counts and sizes are varints in thrift
            let i = meta_start + rng.below(meta_len.saturating_sub(5));
            b[i..i + 5].copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
            (format!("varint at {i} made huge"), b)
        }
    }
}

#[test]
fn mutated_parquet_bytes_fail_with_the_file_named() {
    let dir = tmp("parquet-bytes");
    let good = std::fs::read(fx().join("llava_instruct_mix/data/test-00000-of-00001.parquet")).unwrap();
    let mut rng = Rng(0x5eed_0001);
    let mut errors = 0;
    for case in 0..48 {
        let (what, bytes) = mutate_parquet(&good, &mut rng);
        let name = format!("mutant-{case}.parquet");
        let path = dir.join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let ctx = format!("case {case} ({what})");
        let out = no_panic(&ctx, || load_all(&path, 0, OnBadRow::Error));
        if let Some(e) = out.into_iter().find_map(|r| r.err()) {
            errors += 1;
            assert_names(&ctx, &e.to_string(), &[&name]);
        }
    }
    assert!(errors >= 24, "only {errors} of 48 mutants were refused");
}

/// `file` with its footer rewritten by `lie` applied to each row group's metadata.
fn with_lying_metadata(file: &Path, out: &Path, lie: impl Fn(parquet::file::metadata::RowGroupMetaData) -> parquet::file::metadata::RowGroupMetaData) {
    use parquet::file::metadata::{ParquetMetaDataBuilder, ParquetMetaDataReader, ParquetMetaDataWriter};
    let bytes = std::fs::read(file).unwrap();
    let n = bytes.len();
    let meta_len = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
    let meta = ParquetMetaDataReader::new().parse_and_finish(&std::fs::File::open(file).unwrap()).unwrap();
    let groups = meta.row_groups().iter().cloned().map(&lie).collect();
    let meta = ParquetMetaDataBuilder::new_from_metadata(meta).set_row_groups(groups).build();
    let mut b = bytes[..n - 8 - meta_len].to_vec();
    ParquetMetaDataWriter::new(&mut b, &meta).finish().unwrap();
    std::fs::write(out, b).unwrap();
}

#[test]
fn parquet_metadata_claiming_absurd_sizes_is_refused_when_opened() {
    // Row counts size the epoch order and the read batch; chunk sizes size the parquet
    // crate's read buffers: lies are refused before anything is allocated from them.
    let dir = tmp("parquet-lies");
    let good = fx().join("llava_instruct_mix/data/test-00000-of-00001.parquet");
    let cases: Vec<(&str, Box<dyn Fn(parquet::file::metadata::RowGroupMetaData) -> parquet::file::metadata::RowGroupMetaData>, &str)> = vec![
        ("rows_huge", Box::new(|rg| rg.into_builder().set_num_rows(1 << 60).build().unwrap()), "row group 0 claims"),
        ("rows_negative", Box::new(|rg| rg.into_builder().set_num_rows(-5).build().unwrap()), "row group 0 claims"),
        (
            "chunk_huge",
            Box::new(|rg| {
                let cols = rg.columns().iter().map(|c| c.clone().into_builder().set_total_compressed_size(1 << 50).build().unwrap()).collect();
                rg.into_builder().set_column_metadata(cols).build().unwrap()
            }),
            "outside the file",
        ),
        (
            "chunk_offset_negative",
            Box::new(|rg| {
                let cols = rg.columns().iter().map(|c| c.clone().into_builder().set_data_page_offset(-1).set_dictionary_page_offset(None).build().unwrap()).collect();
                rg.into_builder().set_column_metadata(cols).build().unwrap()
            }),
            "outside the file",
        ),
    ];
    for (name, lie, needle) in cases {
        let path = dir.join(format!("{name}.parquet"));
        with_lying_metadata(&good, &path, lie);
        let e = no_panic(name, || open_dataset(path.to_str().unwrap(), None, None)).err().unwrap_or_else(|| panic!("{name}: opened"));
        assert_names(name, &e.to_string(), &[&format!("{name}.parquet"), needle]);
    }
    // A plausible but wrong count opens, and reading the row group says what is wrong.
    let path = dir.join("rows_wrong.parquet");
    with_lying_metadata(&good, &path, |rg| rg.into_builder().set_num_rows(1 << 20).build().unwrap());
    let out = no_panic("rows_wrong", || load_all(&path, 2, OnBadRow::Skip));
    let e = out.into_iter().find_map(|r| r.err()).expect("an error").to_string();
    assert_names("rows_wrong", &e, &["rows_wrong.parquet", "row group 0", "the metadata says 1048576 rows"]);
}

// ---------------------------------------------------------------------------------------
// LLaVA JSON

fn llava_record(image: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "x",
        "image": image,
        "conversations": [{"from": "human", "value": format!("<image>\n{text}")}, {"from": "gpt", "value": "An answer."}]
    })
}

#[test]
fn broken_llava_json_names_file_row_and_field() {
    let dir = tmp("llava-json");
    let good = llava_record("astronaut.jpg", "What is this?");
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("not_object", serde_json::json!(3), ""),
        ("no_conversations", serde_json::json!({"image": "astronaut.jpg"}), "conversations"),
        ("conversations_string", serde_json::json!({"conversations": "hi"}), "conversations"),
        ("turn_string", serde_json::json!({"conversations": ["hi"]}), "conversations[0]"),
        ("from_missing", serde_json::json!({"conversations": [{"value": "hi"}]}), "conversations[0].from"),
        ("value_number", serde_json::json!({"conversations": [{"from": "human", "value": 5}]}), "conversations[0].value"),
        ("role_unknown", serde_json::json!({"conversations": [{"from": "robot", "value": "hi"}]}), "conversations[0].from"),
        ("image_number", serde_json::json!({"image": 5, "conversations": [{"from": "human", "value": "<image>"}]}), "image"),
        ("image_list_of_numbers", serde_json::json!({"image": [5], "conversations": [{"from": "human", "value": "<image>"}]}), "image[0]"),
        ("image_missing_file", llava_record("nope.jpg", "x"), "image"),
        ("image_count", serde_json::json!({"conversations": [{"from": "human", "value": "<image><image> two"}, {"from": "gpt", "value": "a"}]}), "images"),
    ];
    for (name, bad, field) in cases {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(&serde_json::json!([good, bad])).unwrap()).unwrap();
        let out = no_panic(name, || load_all(&path, 2, OnBadRow::Error));
        let err = out.into_iter().find_map(|r| r.err()).unwrap_or_else(|| panic!("{name}: no error"));
        let msg = err.to_string();
        let field = format!("field `{field}`");
        let mut needles = vec![format!("{name}.json"), "row 1".to_string()];
        if !field.ends_with("``") {
            needles.push(field);
        }
        assert_names(name, &msg, &needles.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(err.bad_row_kind().is_some(), "{name}: not a row error: {msg}");
    }
}

#[test]
fn malformed_llava_json_files_fail_with_the_file_named() {
    let dir = tmp("llava-files");
    let good = serde_json::to_string(&serde_json::json!([llava_record("astronaut.jpg", "What?")])).unwrap();
    let deep = format!("[{{\"conversations\": {}{}}}]", "[".repeat(100_000), "]".repeat(100_000));
    let huge_text = serde_json::to_string(&serde_json::json!([llava_record("astronaut.jpg", &"word ".repeat(4_000_000))])).unwrap();
    let mut cases: Vec<(String, String)> = vec![
        ("top_object".into(), "{\"conversations\": []}".into()),
        ("trailing".into(), format!("{good} [1]")),
        ("truncated".into(), good[..good.len() / 2].to_string()),
        ("unbalanced".into(), "[{]}]".into()),
        ("deep".into(), deep),
        ("huge_text".into(), huge_text),
    ];
    let mut rng = Rng(0x5eed_0002);
    for k in 0..24 {
        let mut b = good.clone().into_bytes();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            const JSON_BYTES: &[u8] = b"[]{}\",:\\x0 ";
            b[i] = JSON_BYTES[rng.below(JSON_BYTES.len())];
        }
        cases.push((format!("mutant{k}"), String::from_utf8_lossy(&b).into_owned()));
    }
    for (name, text) in cases {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, text).unwrap();
        let out = no_panic(&name, || load_all(&path, 0, OnBadRow::Error));
        match out.into_iter().find_map(|r| r.err()) {
            Some(e) => assert_names(&name, &e.to_string(), &[&format!("{name}.json")]),
            None => assert!(name.starts_with("mutant"), "{name}: accepted"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Chat templates

fn conversation() -> Vec<Message> {
    vec![
        Message::new("user", vec![Content::image(0), Content::text("What is in the picture?")]),
        Message::new("assistant", vec![Content::text("A cat on a sofa.")]),
        Message::new("user", vec![Content::text("And its colour?")]),
        Message::new("assistant", vec![Content::text("Orange, with white paws.")]),
    ]
}

#[test]
fn hostile_templates_fail_naming_the_template() {
    let dir = tmp("templates");
    let cases: Vec<(&str, String)> = vec![
        ("runaway_loop", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}".into()),
        ("string_doubling", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}".into()),
        ("string_doubling_plus", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}".into()),
        ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".into()),
        ("huge_output", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}".into()),
        ("huge_repeat", "{{ 'x' * 10000000000 }}".into()),
        ("huge_center", "{{ 'x'.center(10000000000) }}".into()),
        ("huge_range", "{{ range(10000000000) | list | length }}".into()),
        ("tojson_indent", "{{ messages | tojson(indent=1000000000) }}".into()),
        ("raise", "{{ raise_exception('no system prompt allowed') }}".into()),
        ("syntax", "{% for %}".into()),
        ("unclosed", "{% if true %}never closed".into()),
        ("unknown_filter", "{{ messages | no_such_filter }}".into()),
        ("deep_parens", format!("{{{{ {}1{} }}}}", "(".repeat(10_000), ")".repeat(10_000))),
        ("too_large", format!("{}{}", "x".repeat(MAX_TEMPLATE_BYTES as usize), "{{ 1 }}")),
    ];
    for (name, src) in cases {
        let path = dir.join(format!("{name}.jinja"));
        std::fs::write(&path, &src).unwrap();
        let file = format!("{name}.jinja");
        // The processor path: reading, compiling, rendering a row.
        let r = no_panic(name, || {
            let p = Processor::from_model_dir(&fx().join("model"), Some(&path))?;
            let row = Row { index: 0, file: PathBuf::from("mem.parquet"), file_row: 7, messages: conversation(), images: vec![] };
            let mut row = row;
            row.messages[0].content.remove(0);
            p.process_row(&row, &CollatorConfig::default())
        });
        let e = r.err().unwrap_or_else(|| panic!("{name}: rendered"));
        let msg = e.to_string();
        assert_names(name, &msg, &[&file]);
        if e.bad_row_kind().is_some() {
            assert_names(name, &msg, &["mem.parquet: row 7"]);
            assert_eq!(e.bad_row_kind(), Some(BadRowKind::Template), "{name}: {msg}");
        }
        // A loader thread renders with the same bounds.
        let out = no_panic(name, || {
            std::thread::Builder::new()
                .stack_size(vsft_data::loader::WORKER_STACK_BYTES)
                .spawn(move || ChatTemplate::from_file_source(&src, &path).and_then(|t| t.render(&conversation(), false, &SpecialTokens::default())).map(|r| r.text.len()))
                .unwrap()
                .join()
                .unwrap()
        });
        assert_names(name, &out.unwrap_err().to_string(), &[&file]);
    }
}

#[test]
fn real_templates_use_a_hundredth_of_the_fuel_budget_at_most() {
    let special = SpecialTokens { bos_token: Some("<s>".into()), eos_token: Some("</s>".into()), ..Default::default() };
    let mut long = Vec::new();
    for k in 0..50 {
        long.extend(conversation().into_iter().map(|mut m| {
            if let Some(Content { text: Some(t), .. }) = m.content.last_mut() {
                t.push_str(&format!(" (turn {k})"));
            }
            m
        }));
    }
    let mut worst = 0;
    for t in ["llava_hf", "blog", "extra", "json"] {
        let path = fx().join(format!("{t}.jinja"));
        let tmpl = ChatTemplate::from_file_source(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
        for msgs in [conversation(), long[..8].to_vec()] {
            for agp in [false, true] {
                // extra.jinja raises for some roles: only successful renders count
                if let Ok(used) = tmpl.fuel_used(&msgs, agp, &special) {
                    worst = worst.max(used);
                }
            }
        }
    }
    assert!(worst > 0);
    assert!(worst * 100 <= TEMPLATE_FUEL, "the fixture templates use {worst} fuel; the budget {TEMPLATE_FUEL} leaves less than 100x");
    // and a 200-turn conversation fits too
    let path = fx().join("llava_hf.jinja");
    let tmpl = ChatTemplate::from_file_source(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
    let msgs: Vec<Message> = long.into_iter().filter(|m| !m.content.iter().any(|c| c.is_image())).collect();
    assert!(tmpl.render(&msgs, false, &special).is_ok());
}

// ---------------------------------------------------------------------------------------
// Tokenizer files

/// A copy of the fixture model directory whose tokenizer.json is `bytes`.
fn model_with_tokenizer(dir: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["chat_template.jinja", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json"] {
        std::fs::copy(fx().join("model").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("tokenizer.json"), bytes).unwrap();
    dir.to_path_buf()
}

#[test]
fn broken_tokenizer_json_is_an_error_naming_the_file() {
    let root = tmp("tokenizer");
    let good = std::fs::read(fx().join("model/tokenizer.json")).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("null".into(), b"null".to_vec()),
        ("list".into(), b"[]".to_vec()),
        ("object".into(), b"{}".to_vec()),
        ("not_utf8".into(), vec![0xff, 0xfe, 0x00, 0x80]),
        ("deep".into(), "[".repeat(100_000).into_bytes()),
        ("model_null".into(), br#"{"version":"1.0","model":null}"#.to_vec()),
        ("bpe_merge_unknown".into(), br#"{"version":"1.0","model":{"type":"BPE","vocab":{"a":0},"merges":["x y"]}}"#.to_vec()),
        ("wordpiece_no_unk".into(), br#"{"version":"1.0","model":{"type":"WordPiece","vocab":{"a":0},"unk_token":"[UNK]"}}"#.to_vec()),
    ];
    let mut rng = Rng(0x5eed_0003);
    for k in 0..12 {
        let mut b = good.clone();
        if k % 2 == 0 {
            b.truncate(rng.below(b.len()));
        } else {
            for _ in 0..4 {
                let i = rng.below(b.len());
                b[i] = b"{}[]\":,0 "[rng.below(9)];
            }
        }
        cases.push((format!("mutant{k}"), b));
    }
    for (name, bytes) in cases {
        let dir = model_with_tokenizer(&root.join(&name), &bytes);
        let r = no_panic(&name, || Processor::from_model_dir(&dir, None));
        match r {
            Err(e) => assert_names(&name, &e.to_string(), &["tokenizer.json"]),
            Ok(_) => assert!(name.starts_with("mutant"), "{name}: accepted"),
        }
    }
    // a directory named tokenizer.json, and a device that never ends
    let dir = root.join("dir");
    model_with_tokenizer(&dir, b"{}");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    std::fs::create_dir(dir.join("tokenizer.json")).unwrap();
    let e = Processor::from_model_dir(&dir, None).unwrap_err().to_string();
    assert_names("dir", &e, &["tokenizer.json"]);
    let dir = root.join("zero");
    model_with_tokenizer(&dir, b"{}");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("tokenizer.json")).unwrap();
    let e = Processor::from_model_dir(&dir, None).unwrap_err().to_string();
    assert_names("zero", &e, &["tokenizer.json", "256 MiB"]);
    // a template file that never ends
    let e = Processor::from_model_dir(&fx().join("model"), Some(Path::new("/dev/zero"))).unwrap_err().to_string();
    assert_names("template /dev/zero", &e, &["/dev/zero", "1 MiB"]);
}

// ---------------------------------------------------------------------------------------
// Loader and collator settings

#[test]
fn absurd_worker_counts_are_refused_naming_the_key() {
    let data = fx().join("llava_instruct_mix/data/test-00000-of-00001.parquet");
    let cfg = LoaderConfig { num_workers: 100_000, ..Default::default() };
    let src = || open_dataset(data.to_str().unwrap(), None, None).unwrap();
    let e = DataLoader::try_new(src(), processor(), cfg.clone(), Cursor::default()).err().expect("refused");
    assert_names("try_new", &e.to_string(), &["data.num_workers", "100000", &MAX_NUM_WORKERS.to_string()]);
    // `new` reports it as the first item, then ends
    let mut l = DataLoader::new(src(), processor(), cfg, Cursor::default());
    assert_names("new", &l.next().unwrap().unwrap_err().to_string(), &["data.num_workers"]);
    assert!(l.next().is_none());
    // the most allowed works
    let cfg = LoaderConfig { num_workers: MAX_NUM_WORKERS, batch_size: 1, shuffle: false, ..Default::default() };
    let n = DataLoader::try_new(src(), processor(), cfg, Cursor::default()).unwrap().map(|b| b.unwrap().batch_size).sum::<usize>();
    assert_eq!(n, src().len());
}

#[test]
fn absurd_padding_is_refused_naming_the_key() {
    let data = fx().join("llava_instruct_mix/data/test-00000-of-00001.parquet");
    let src = open_dataset(data.to_str().unwrap(), None, None).unwrap();
    let collator = CollatorConfig { pad_to_multiple_of: Some(1_000_000), ..Default::default() };
    let cfg = LoaderConfig { collator, ..Default::default() };
    let e = DataLoader::try_new(src, processor(), cfg, Cursor::default()).err().expect("refused");
    assert_names("loader", &e.to_string(), &["data.pad_to_multiple_of", "1000000"]);
    // the collator itself refuses a padded batch beyond its bound
    let c = CollatorConfig { pad_to_multiple_of: Some(60_000), ..Default::default() };
    assert_eq!(c.padded_len(4, 100).unwrap(), 60_000);
    let e = c.padded_len(1000, 100).unwrap_err().to_string();
    assert_names("collator", &e, &["data.pad_to_multiple_of", &MAX_BATCH_TOKENS.to_string()]);
    let e = CollatorConfig::default().padded_len(usize::MAX, 2).unwrap_err().to_string();
    assert_names("unpadded", &e, &["data.max_length"]);
}

/// A source whose row 1 makes the reading library panic.
struct PanickingSource(Box<dyn RowSource>);
impl RowSource for PanickingSource {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&mut self, index: usize) -> vsft_data::Result<Row> {
        if index == 1 {
            panic!("bad offsets in shard-7.parquet row 1");
        }
        self.0.get(index)
    }
    fn groups(&self) -> Vec<(usize, usize)> {
        self.0.groups()
    }
    fn describe(&self) -> String {
        "panicking source".into()
    }
}

#[test]
fn a_panic_in_a_loader_thread_reaches_the_consumer_with_its_message() {
    let data = fx().join("llava_instruct_mix/data/test-00000-of-00001.parquet");
    for workers in [0, 1, 3] {
        let src = Box::new(PanickingSource(open_dataset(data.to_str().unwrap(), None, None).unwrap()));
        let cfg = LoaderConfig { batch_size: 1, shuffle: false, num_workers: workers, ..Default::default() };
        let out: Vec<_> = no_panic("loader", || DataLoader::new(src, processor(), cfg, Cursor::default()).collect());
        let e = out.iter().find_map(|r| r.as_ref().err()).expect("an error").to_string();
        assert_names(&format!("{workers} workers"), &e, &["shard-7.parquet row 1", "reading row 1"]);
        // the batch before it arrived, nothing after it
        assert!(out[0].is_ok() && out.last().unwrap().is_err(), "{workers} workers");
    }
}

#[test]
fn skip_reports_list_the_first_rows_of_each_kind() {
    let path = fx().join("bad/corrupt_image.parquet");
    let src = open_dataset(path.to_str().unwrap(), None, None).unwrap();
    let cfg = LoaderConfig { shuffle: false, num_workers: 2, on_bad_row: OnBadRow::Skip, ..Default::default() };
    let mut l = DataLoader::new(src, processor(), cfg, Cursor::default());
    assert!(l.by_ref().all(|b| b.is_ok()));
    let report = l.skipped().report();
    assert!(report.contains(&format!("corrupt image: 1 row ({} row 1)", path.display())), "{report}");
    // more than the listed rows are counted and elided
    let mut stats = vsft_data::SkipStats::default();
    for row in [4, 17, 230, 231, 300, 301, 302] {
        stats.record(&DataError::bad_row("a.parquet", row, "images[0].bytes", BadRowKind::CorruptImage, "x"));
    }
    stats.record(&DataError::bad_row("b.parquet", 2, "messages", BadRowKind::EmptyConversation, "x"));
    assert_eq!(stats.report(), "corrupt image: 7 rows (a.parquet rows 4, 17, 230, 231, 300, ...); empty conversation: 1 row (b.parquet row 2)");
}

#[test]
fn inspect_stops_at_the_first_bad_row_unless_skipping() {
    let mut o = InspectOptions::new(fx().join("model"), fx().join("bad/unknown_role.parquet").to_str().unwrap());
    o.chat_template = Some(fx().join("llava_hf.jinja"));
    let e = inspect(&o).unwrap_err().to_string();
    assert_names("inspect", &e, &["unknown_role.parquet", "row 2", "field `messages[0].role`"]);
    o.on_bad_row = OnBadRow::Skip;
    let (examples, skipped) = inspect(&o).unwrap();
    assert_eq!(skipped.counts.get(&BadRowKind::UnknownRole), Some(&1));
    assert!(!examples.is_empty());
    // LLaVA JSON with its image folder
    let mut o = InspectOptions::new(fx().join("model"), fx().join("llava.json").to_str().unwrap());
    o.image_root = Some(fx().join("images"));
    o.limit = Some(2);
    assert_eq!(inspect(&o).unwrap().0.len(), 2);
}
