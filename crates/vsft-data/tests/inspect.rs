//! `inspect` and `summarize`, checked against the reference fixtures.

use std::path::{Path, PathBuf};

use serde_json::Value as J;
use vsft_data::inspect::{inspect, percentile, summarize, InspectOptions};
use vsft_data::LabelMask;

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

fn reference() -> J {
    serde_json::from_str(&std::fs::read_to_string(fx().join("reference.json")).unwrap()).unwrap()
}

fn opts() -> InspectOptions {
    let mut o = InspectOptions::new(fx().join("model"), fx().join("llava_instruct_mix").to_str().unwrap());
    o.split = Some("train".into());
    o
}

/// Per-row (length, labels) of the llava_hf / add_special_tokens=true reference batches.
fn reference_rows(mask: &str) -> Vec<(usize, Vec<i64>, Vec<i64>)> {
    let r = reference();
    let mut out = Vec::new();
    for b in r["batches"].as_array().unwrap() {
        if b["template"] != "llava_hf" || b["add_special_tokens"] != true || !b["pad_to_multiple_of"].is_null() {
            continue;
        }
        for (k, row) in b["rows"].as_array().unwrap().iter().enumerate() {
            let am: Vec<i64> = b["attention_mask"][k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            let n = am.iter().sum::<i64>() as usize;
            let ids: Vec<i64> = b["input_ids"][k].as_array().unwrap().iter().take(n).map(|x| x.as_i64().unwrap()).collect();
            let labels: Vec<i64> = b["labels"][mask][k].as_array().unwrap().iter().take(n).map(|x| x.as_i64().unwrap()).collect();
            out.push((row[2].as_u64().unwrap() as usize, ids, labels));
        }
    }
    out.sort_by_key(|x| x.0);
    out
}

#[test]
fn inspect_json_lines_match_reference() {
    let r = reference();
    let mut o = opts();
    o.label_mask = LabelMask::Assistant;
    o.limit = Some(4);
    let (ex, skipped) = inspect(&o).unwrap();
    assert_eq!(ex.len(), 4);
    assert_eq!(skipped.total(), 0);
    let refs = reference_rows("assistant");
    for e in &ex {
        let line: J = serde_json::from_str(&e.to_json_line()).unwrap();
        for k in ["index", "text", "input_ids", "labels", "images"] {
            assert!(line.get(k).is_some(), "{k} missing");
        }
        let (_, ids, labels) = refs.iter().find(|x| x.0 == e.index).unwrap();
        assert_eq!(&e.input_ids, ids);
        assert_eq!(&e.labels, labels);
        assert_eq!(e.text, r["rendered"][e.index]["llava_hf"].as_str().unwrap());
        let names = r["rendered"][e.index]["images"].as_array().unwrap();
        for (im, name) in e.images.iter().zip(names) {
            let st = &r["images"][name.as_str().unwrap()];
            assert!((im.pixel_mean - st["mean"].as_f64().unwrap()).abs() < 1e-6);
            assert!((im.pixel_abs_mean - st["abs_mean"].as_f64().unwrap()).abs() < 1e-6);
        }
        // the marked text shows the trained spans
        assert!(e.to_text().contains("[["), "{}", e.to_text());
    }
}

#[test]
fn summary_counts_rows_images_and_lengths() {
    let r = reference();
    let s = summarize(&opts(), 2).unwrap();
    assert_eq!(s.rows as u64, r["n_train"].as_u64().unwrap());
    assert_eq!(s.skipped.total(), 0);
    let images: usize = r["rendered"].as_array().unwrap().iter().map(|e| e["images"].as_array().unwrap().len()).sum();
    assert_eq!(s.images, images);
    let mut lens: Vec<usize> = reference_rows("pad").iter().map(|x| x.1.len()).collect();
    lens.sort();
    assert_eq!(s.tokens_total, lens.iter().sum::<usize>());
    for &(q, v) in &s.length_percentiles {
        assert_eq!(v, percentile(&lens, q));
    }
    assert!(s.to_text().contains("no rows skipped"));
}

#[test]
fn summary_reports_skips() {
    let mut o = InspectOptions::new(fx().join("model"), fx().join("bad/unknown_role.parquet").to_str().unwrap());
    o.on_bad_row = vsft_data::OnBadRow::Skip;
    let s = summarize(&o, 0).unwrap();
    assert_eq!(s.rows, 3);
    assert_eq!(s.rows_ok, 2);
    assert!(s.to_text().contains("unknown role: 1"), "{}", s.to_text());
}

#[test]
fn image_seq_length_from_config_json_matches_processor_config() {
    use vsft_data::template::ImageTokenSpec;
    let r = reference();
    let model = fx().join("model");
    let crop = Some((r["crop"].as_u64().unwrap() as usize, r["crop"].as_u64().unwrap() as usize));
    let from_proc = ImageTokenSpec::from_model_dir(&model, crop).unwrap();
    assert_eq!(from_proc.image_seq_length as u64, r["image_seq_length"].as_u64().unwrap());
    // A model dir with only config.json (LLaVA layout, vision_config.patch_size).
    let dir = std::env::temp_dir().join(format!("vsft-data-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pc: J = serde_json::from_str(&std::fs::read_to_string(model.join("processor_config.json")).unwrap()).unwrap();
    let cfg = serde_json::json!({"model_type": "llava", "vision_feature_select_strategy": pc["vision_feature_select_strategy"],
        "vision_config": {"patch_size": pc["patch_size"]}});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    assert_eq!(ImageTokenSpec::from_model_dir(&dir, crop).unwrap(), from_proc);
    let cfg = serde_json::json!({"image_seq_length": r["image_seq_length"]});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    assert_eq!(ImageTokenSpec::from_model_dir(&dir, crop).unwrap(), from_proc);
    std::fs::remove_dir_all(dir).ok();
}
