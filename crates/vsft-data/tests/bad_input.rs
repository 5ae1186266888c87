//! Bad rows: every error names the file, the row and the field; `on_bad_row = skip`
//! counts them; truncation never cuts an image; all-masked batches are flagged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vsft_data::collator::{collate, CollatorConfig, LabelMask};
use vsft_data::dataset::{open_dataset, Cursor, ImageSource, OnBadRow, Row};
use vsft_data::template::{Content, Message};
use vsft_data::{BadRowKind, DataError, DataLoader, LoaderConfig, Processor};

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

fn processor(t: &str) -> Arc<Processor> {
    Arc::new(Processor::from_model_dir(&fx().join("model"), Some(&fx().join(format!("{t}.jinja")))).unwrap())
}

fn run(data: &Path, on_bad_row: OnBadRow) -> (Vec<Result<vsft_data::Batch, DataError>>, vsft_data::SkipStats) {
    let src = open_dataset(data.to_str().unwrap(), None, Some(&fx().join("images"))).unwrap();
    let cfg = LoaderConfig { batch_size: 8, shuffle: false, num_workers: 2, on_bad_row, ..Default::default() };
    let mut l = DataLoader::new(src, processor("llava_hf"), cfg, Cursor::default());
    let out: Vec<_> = l.by_ref().collect();
    (out, l.skipped().clone())
}

/// (file, row, field, kind) of each bad fixture.
fn cases() -> Vec<(&'static str, usize, &'static str, BadRowKind)> {
    vec![
        ("corrupt_image.parquet", 1, "images[0].bytes", BadRowKind::CorruptImage),
        ("count_mismatch.parquet", 1, "images", BadRowKind::ImageCountMismatch),
        ("empty_conversation.parquet", 1, "messages", BadRowKind::EmptyConversation),
        ("unknown_role.parquet", 2, "messages[0].role", BadRowKind::UnknownRole),
        ("missing_column.parquet", 0, "images", BadRowKind::MissingColumn),
        ("wrong_type.parquet", 0, "messages", BadRowKind::WrongType),
        ("llava_bad_role.json", 1, "conversations[0].from", BadRowKind::UnknownRole),
        ("llava_missing_image.json", 0, "image", BadRowKind::MissingImageFile),
    ]
}

#[test]
fn errors_name_file_row_and_field() {
    for (file, row, field, kind) in cases() {
        let (out, _) = run(&fx().join("bad").join(file), OnBadRow::Error);
        let err = out.into_iter().find_map(|r| r.err()).unwrap_or_else(|| panic!("{file}: no error"));
        let msg = err.to_string();
        eprintln!("{msg}");
        assert_eq!(err.bad_row_kind(), Some(kind), "{msg}");
        assert!(msg.contains(file), "{msg} does not name the file");
        assert!(msg.contains(&format!("row {row}:")), "{msg} does not name row {row}");
        assert!(msg.contains(&format!("`{field}`")), "{msg} does not name field {field}");
    }
}

#[test]
fn skip_counts_bad_rows_and_keeps_good_ones() {
    for (file, _, _, kind) in cases() {
        let path = fx().join("bad").join(file);
        let total = open_dataset(path.to_str().unwrap(), None, Some(&fx().join("images"))).unwrap().len();
        let (out, skipped) = run(&path, OnBadRow::Skip);
        let good: usize = out.iter().map(|b| b.as_ref().unwrap().batch_size).sum();
        assert_eq!(skipped.counts.get(&kind).copied().unwrap_or(0) + good, total, "{file}: {}", skipped.report());
        assert!(skipped.total() >= 1, "{file}");
        assert!(skipped.report().contains(kind.as_str()));
    }
}

#[test]
fn template_errors_name_the_row() {
    // extra.jinja raises for roles it does not know ("tool" passes validation).
    let p = processor("extra");
    let row = Row {
        index: 0,
        file: PathBuf::from("mem.parquet"),
        file_row: 5,
        messages: vec![Message::new("tool", vec![Content::text("x")])],
        images: vec![],
    };
    let e = p.process_row(&row, &CollatorConfig::default()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("mem.parquet: row 5") && msg.contains("bad role tool"), "{msg}");
    assert_eq!(e.bad_row_kind(), Some(BadRowKind::Template));
}

fn first_row() -> Row {
    let mut src = open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
    src.get(0).unwrap()
}

#[test]
fn truncation_never_cuts_an_image() {
    let p = processor("llava_hf");
    let row = first_row();
    let full = p.process_row(&row, &CollatorConfig::default()).unwrap();
    let img_end = full.encoded.image_spans[0].1;
    // inside the image: skipped with a reason
    let cfg = CollatorConfig { max_length: Some(img_end - 1), ..Default::default() };
    let e = p.process_row(&row, &cfg).unwrap_err();
    assert_eq!(e.bad_row_kind(), Some(BadRowKind::ImageTruncated), "{e}");
    // after the image: a prefix of the full sequence
    let cfg = CollatorConfig { max_length: Some(img_end + 3), ..Default::default() };
    let t = p.process_row(&row, &cfg).unwrap();
    assert_eq!(t.encoded.input_ids, full.encoded.input_ids[..img_end + 3]);
}

#[test]
fn all_masked_batches_are_flagged() {
    let p = processor("llava_hf");
    let mut row = first_row();
    row.messages.truncate(1); // user turn only: nothing for the assistant mask to train on
    let cfg = CollatorConfig { label_mask: LabelMask::Assistant, ..Default::default() };
    let ex = p.process_row(&row, &cfg).unwrap();
    let b = collate(&[ex], &cfg, p.text.pad_token_id, p.text.image_token_id).unwrap();
    assert!(b.all_labels_masked);
    assert_eq!(b.n_label_tokens, 0);
    let cfg = CollatorConfig { label_mask: LabelMask::Pad, ..Default::default() };
    let ex = p.process_row(&row, &cfg).unwrap();
    let b = collate(&[ex], &cfg, p.text.pad_token_id, p.text.image_token_id).unwrap();
    assert!(!b.all_labels_masked);
}

#[test]
fn images_by_path_and_bytes_agree() {
    let p = processor("llava_hf");
    let row = first_row();
    let ImageSource::Bytes(b) = &row.images[0] else { panic!() };
    let tmp = std::env::temp_dir().join(format!("vsft-data-{}.jpg", std::process::id()));
    std::fs::write(&tmp, b.as_slice()).unwrap();
    let mut row2 = row.clone();
    row2.images = vec![ImageSource::Path(tmp.clone())];
    assert_eq!(p.row_images(&row).unwrap(), p.row_images(&row2).unwrap());
    std::fs::remove_file(tmp).ok();
}
