//! Qwen2-VL / Qwen2.5-VL parity with transformers 5.24 (`Qwen2VLImageProcessorPil`,
//! `Qwen2VLProcessor`, `get_rope_index`) and TRL 1.16 (`DataCollatorForVisionLanguageModeling`)
//! on the fixtures written by scripts/make_qwen_vl_data_fixtures.py. No expected number is
//! typed here: they all come from tests/fixtures/qwen_vl/data/reference.json and
//! pixel_samples.safetensors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as J;
use vsft_data::collator::{collate, CollatorConfig, LabelMask};
use vsft_data::dataset::{open_dataset, Cursor, OnBadRow, Row, RowSource};
use vsft_data::family::qwen2_vl::smart_resize;
use vsft_data::image_proc::{decode_image, RgbImage};
use vsft_data::template::Message;
use vsft_data::{rope_index, BadRowKind, DataLoader, LoaderConfig, Processor, ProcessorOverrides, VisionProcessor};

mod common;
use common::f32_sha256;

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen_vl/data")
}

fn reference() -> J {
    let s = std::fs::read_to_string(fx().join("reference.json")).expect("run scripts/make_qwen_vl_data_fixtures.py");
    serde_json::from_str(&s).unwrap()
}

fn processor() -> Processor {
    Processor::from_model_dir(&fx().join("processor"), None).unwrap()
}

fn dataset() -> Box<dyn RowSource> {
    open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap()
}

fn us(v: &J) -> usize {
    v.as_u64().unwrap() as usize
}

fn pair(v: &J) -> (usize, usize) {
    (us(&v[0]), us(&v[1]))
}

fn usizes(v: &J) -> Vec<usize> {
    v.as_array().unwrap().iter().map(us).collect()
}

fn flat(v: &J) -> Vec<i64> {
    v.as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap())).collect()
}

fn thw(v: &J) -> (usize, usize, usize) {
    (us(&v[0]), us(&v[1]), us(&v[2]))
}

/// The reference's settings: "hub" (the processor files) or an override from reference.json.
fn overrides(r: &J, setting: &str) -> ProcessorOverrides {
    if setting == "hub" {
        return ProcessorOverrides::default();
    }
    let o = &r["overrides"][setting];
    ProcessorOverrides { min_pixels: o.get("min_pixels").and_then(|x| x.as_u64()), max_pixels: o.get("max_pixels").and_then(|x| x.as_u64()), ..Default::default() }
}

const SETTINGS: [&str; 3] = ["hub", "max_small", "min_large"];

// ---------------------------------------------------------------------------------------

fn qwen(p: &VisionProcessor) -> &vsft_data::Qwen2VlProcessor {
    match p {
        VisionProcessor::Qwen2Vl(q) => q,
        o => panic!("expected qwen2_vl, got {}", o.family()),
    }
}

fn copy_dir(files: &[(&Path, &str)], tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!("vsft-qwen-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&d).unwrap();
    for (src, name) in files {
        std::fs::copy(src, d.join(name)).unwrap();
    }
    d
}

#[test]
fn processor_settings_load_from_both_layouts() {
    let r = reference();
    let hub = VisionProcessor::from_model_dir(&fx().join("processor")).unwrap();
    assert_eq!(hub.family(), "qwen2_vl");
    assert!(hub.is_dynamic());
    let q = qwen(&hub);
    assert_eq!((q.config.min_pixels, q.config.max_pixels), (r["min_pixels"].as_u64().unwrap(), r["max_pixels"].as_u64().unwrap()));
    assert_eq!((q.config.patch_size, q.config.temporal_patch_size, q.config.merge_size), (us(&r["patch_size"]), us(&r["temporal_patch_size"]), us(&r["merge_size"])));
    assert_eq!(hub.unit_shape(), vec![3 * us(&r["temporal_patch_size"]) * us(&r["patch_size"]).pow(2)]);
    // transformers 5.24's layout: the image processor (with `size`) nested in processor_config.json
    let p = fx().join("processor");
    let d = copy_dir(
        &[
            (&p.join("tokenizer.json"), "tokenizer.json"),
            (&p.join("tokenizer_config.json"), "tokenizer_config.json"),
            (&p.join("chat_template.json"), "chat_template.json"),
            (&fx().join("processor_config.5_24.json"), "processor_config.json"),
        ],
        "524",
    );
    let nested = Processor::from_model_dir(&d, None).unwrap();
    assert_eq!(qwen(&nested.image).config, q.config);
    let hubp = processor();
    assert_eq!(hubp.family(), "qwen2_vl");
    assert_eq!(hubp.text.template.source(), nested.text.template.source());
    assert_eq!(hubp.text.image_token_id as u64, r["image_token_id"].as_u64().unwrap());
    assert_eq!(hubp.text.pad_token_id as u64, r["pad_token_id"].as_u64().unwrap());
    assert_eq!(hubp.text.vision_wrappers.map(|(a, b)| (a as u64, b as u64)), Some((r["vision_start_token_id"].as_u64().unwrap(), r["vision_end_token_id"].as_u64().unwrap())));
    assert!(hubp.text.image.dynamic);
    // Qwen2.5-VL ships the same image processor type: same family and settings
    let mut pre: J = serde_json::from_str(&std::fs::read_to_string(p.join("preprocessor_config.json")).unwrap()).unwrap();
    pre["processor_class"] = "Qwen2_5_VLProcessor".into();
    std::fs::write(d.join("preprocessor_config.json"), pre.to_string()).unwrap();
    let v25 = VisionProcessor::from_model_dir(&d).unwrap();
    assert_eq!(qwen(&v25).config, q.config);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn pixel_values_bit_exact_for_every_image_and_setting() {
    let r = reference();
    let st_bytes = std::fs::read(fx().join("pixel_samples.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let images = r["images"].as_object().unwrap();
    assert!(images.len() >= 6);
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for setting in SETTINGS {
        let p = VisionProcessor::from_model_dir_with(&fx().join("processor"), &overrides(&r, setting)).unwrap();
        for (name, e) in images {
            let want = &e[setting];
            let img = decode_image(&std::fs::read(fx().join("images").join(name)).unwrap()).unwrap();
            assert_eq!((img.height, img.width), pair(&e["hw"]), "{name}");
            let got = p.preprocess(std::slice::from_ref(&img)).unwrap();
            let ctx = format!("{name} [{setting}]");
            assert_eq!(got.shape, usizes(&want["pixel_values_shape"]), "{ctx}: pixel_values shape");
            let m = got.meta[0];
            assert_eq!(m.grid, thw(&want["image_grid_thw"]), "{ctx}: image_grid_thw");
            assert_eq!(m.units, got.shape[0], "{ctx}: units");
            assert_eq!(m.tokens, us(&want["tokens"]), "{ctx}: tokens");
            assert_eq!(qwen(&p).resized_hw(img.height, img.width).unwrap(), pair(&want["resized_hw"]), "{ctx}: resized size");
            let stride = us(&want["sample_stride"]);
            let t = st.tensor(&format!("{setting}/{name}")).unwrap();
            let sample: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            let ours: Vec<f32> = got.pixel_values.iter().step_by(stride).copied().collect();
            assert_eq!(ours.len(), sample.len(), "{ctx}");
            let (mut n_diff, mut max) = (0, 0f32);
            for (x, y) in ours.iter().zip(&sample) {
                if x.to_bits() != y.to_bits() {
                    n_diff += 1;
                    max = max.max((x - y).abs());
                }
            }
            let hash_ok = f32_sha256(&got.pixel_values) == want["sha256"].as_str().unwrap();
            report.push(format!(
                "{ctx:<36} {}x{} -> grid {:?} tokens {:>5}: {} sampled values, {n_diff} differ (max {max:e}); sha256 {}",
                img.width,
                img.height,
                m.grid,
                m.tokens,
                sample.len(),
                if hash_ok { "equal" } else { "DIFFERENT" }
            ));
            if n_diff > 0 || !hash_ok {
                failures.push(ctx);
            }
        }
    }
    eprintln!("qwen2_vl pixel parity:\n{}", report.join("\n"));
    assert!(failures.is_empty(), "not bit-exact: {failures:?}");
}

#[test]
fn smart_resize_and_token_counts_match_for_many_sizes() {
    let r = reference();
    let sizes = r["sizes"].as_array().unwrap();
    assert!(sizes.len() >= 1000);
    let mut errors = 0;
    for setting in SETTINGS {
        let p = VisionProcessor::from_model_dir_with(&fx().join("processor"), &overrides(&r, setting)).unwrap();
        let q = qwen(&p);
        for s in sizes {
            let (h, w) = pair(&s["hw"]);
            match &s[setting] {
                J::Null => {
                    let e = p.meta(h, w).unwrap_err().to_string();
                    assert!(e.contains("aspect ratio"), "{h}x{w}: {e}");
                    assert!(smart_resize(h, w, 28, q.config.min_pixels, q.config.max_pixels).is_err());
                    errors += 1;
                }
                want => {
                    let (rh, rw) = pair(want);
                    assert_eq!(smart_resize(h, w, 28, q.config.min_pixels, q.config.max_pixels).unwrap(), (rh, rw), "{h}x{w} [{setting}]");
                    let m = p.meta(h, w).unwrap();
                    assert_eq!(m.grid, (1, rh / 14, rw / 14), "{h}x{w} [{setting}]");
                    assert_eq!(m.tokens, (rh / 14) * (rw / 14) / 4, "{h}x{w} [{setting}]");
                }
            }
        }
    }
    assert!(errors >= 6, "the aspect-ratio error cases are in the sweep");
}

fn rows(source: &mut dyn RowSource, ids: &[usize]) -> Vec<Row> {
    ids.iter().map(|&i| source.get(i).unwrap()).collect()
}

#[test]
fn batches_match_trl_collator_in_all_masks() {
    let r = reference();
    let mut source = dataset();
    assert_eq!(source.len(), us(&r["n_rows"]));
    let p = processor();
    let mut checked = 0;
    for b in r["batches"].as_array().unwrap() {
        let ids = usizes(&b["rows"]);
        let rs = rows(source.as_mut(), &ids);
        for (mode_name, want) in b["labels"].as_object().unwrap() {
            let mode: LabelMask = mode_name.parse().unwrap();
            let cfg = CollatorConfig { label_mask: mode, max_length: None, pad_to_multiple_of: None, add_special_tokens: false };
            let examples: Vec<_> = rs.iter().map(|row| p.process_row(row, &cfg).unwrap()).collect();
            let batch = collate(&examples, &cfg, p.text.pad_token_id, p.text.image_token_id).unwrap();
            let ctx = format!("rows {ids:?} mask {mode_name}");
            let want_ids = flat(&b["input_ids"]);
            assert_eq!(batch.seq_len * ids.len(), want_ids.len(), "{ctx}: seq_len");
            assert_eq!(batch.input_ids, want_ids, "{ctx}: input_ids");
            assert_eq!(batch.attention_mask, flat(&b["attention_mask"]), "{ctx}: attention_mask");
            assert_eq!(batch.labels, flat(want), "{ctx}: labels");
            let prepared: Vec<_> = rs.iter().map(|row| p.prepare_row(row, &cfg).unwrap()).collect();
            assert_eq!(p.collate_prepared(&prepared, &cfg).unwrap(), batch, "{ctx}: collate_prepared");
            let im = &batch.images;
            let want_grids: Vec<_> = b["image_grid_thw"].as_array().unwrap().iter().map(thw).collect();
            assert_eq!(im.grid_thw(), want_grids, "{ctx}: image_grid_thw");
            assert_eq!(im.total_tokens(), batch.input_ids.iter().filter(|&&t| t == p.text.image_token_id as i64).count(), "{ctx}");
            match b["pixel_values_shape"].as_array() {
                Some(_) => assert_eq!(im.shape, usizes(&b["pixel_values_shape"]), "{ctx}: pixel_values shape"),
                None => assert!(im.is_empty() && im.n_units() == 0),
            }
            for (k, n) in b["images"].as_array().unwrap().iter().enumerate() {
                let want = &r["images"][n.as_str().unwrap()]["hub"];
                assert_eq!(f32_sha256(im.image_pixels(k)), want["sha256"].as_str().unwrap(), "{ctx}: {n} pixels");
            }
            checked += 1;
        }
    }
    assert!(checked >= 15);
    eprintln!("checked {checked} (batch, mask) combinations (pad: TRL's collator; assistant: hand-segmented turns)");
}

fn positions(v: &J) -> Vec<[i64; 3]> {
    v.as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|p| [p[0].as_i64().unwrap(), p[1].as_i64().unwrap(), p[2].as_i64().unwrap()])).collect()
}

#[test]
fn rope_index_matches_get_rope_index_right_and_left_padded() {
    let r = reference();
    let (img, vs) = (r["image_token_id"].as_i64().unwrap(), r["vision_start_token_id"].as_i64().unwrap());
    let merge = us(&r["merge_size"]);
    let mut checked = 0;
    for b in r["batches"].as_array().unwrap() {
        let grids: Vec<_> = b["image_grid_thw"].as_array().unwrap().iter().map(thw).collect();
        let n = b["rows"].as_array().unwrap().len();
        for (ids, mask, rope, side) in [(&b["input_ids"], &b["attention_mask"], &b["rope"], "right"), (&b["left"]["input_ids"], &b["left"]["attention_mask"], &b["left"]["rope"], "left")] {
            let (ids, mask) = (flat(ids), flat(mask));
            let seq = ids.len() / n;
            let (pos, deltas) = rope_index(&ids, &mask, seq, &grids, img, vs, merge).unwrap();
            assert_eq!(pos, positions(&rope["position_ids"]), "rows {} {side}-padded: position ids", b["rows"]);
            match rope["rope_deltas"].as_array() {
                Some(d) => assert_eq!(deltas, d.iter().map(|x| x.as_i64().unwrap()).collect::<Vec<_>>(), "rows {} {side}: deltas", b["rows"]),
                None => {
                    assert!(grids.is_empty() && !rope["from_get_rope_index"].as_bool().unwrap());
                    assert_eq!(deltas, vec![0; n]);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 10);
}

#[test]
fn rope_index_errors_instead_of_panicking() {
    let r = reference();
    let (img, vs) = (r["image_token_id"].as_i64().unwrap(), r["vision_start_token_id"].as_i64().unwrap());
    let b = &r["batches"][1];
    let grids: Vec<_> = b["image_grid_thw"].as_array().unwrap().iter().map(thw).collect();
    let (ids, mask) = (flat(&b["input_ids"]), flat(&b["attention_mask"]));
    let seq = ids.len() / 2;
    assert!(rope_index(&ids, &mask, seq, &grids, img, vs, 2).is_ok());
    let mut wrong = grids.clone();
    wrong[0].1 += 2;
    assert!(rope_index(&ids, &mask, seq, &wrong, img, vs, 2).unwrap_err().to_string().contains("grid"));
    assert!(rope_index(&ids, &mask, seq, &grids[..grids.len() - 1], img, vs, 2).is_err());
    let mut more = grids.clone();
    more.push((1, 4, 4));
    assert!(rope_index(&ids, &mask, seq, &more, img, vs, 2).is_err());
    assert!(rope_index(&ids, &mask, seq, &[], img, vs, 2).is_err());
    assert!(rope_index(&ids, &mask[1..], seq, &grids, img, vs, 2).is_err());
    assert!(rope_index(&ids, &mask, seq + 1, &grids, img, vs, 2).is_err());
    assert!(rope_index(&ids, &mask, seq, &grids, img, vs, 0).is_err());
    assert_eq!(rope_index(&[], &[], 0, &[], img, vs, 2).unwrap(), (vec![], vec![]));
}

#[test]
fn generation_prompts_with_images_match_the_processor() {
    let r = reference();
    let p = processor();
    let mut source = dataset();
    for e in r["rows"].as_array().unwrap() {
        let i = us(&e["row"]);
        let row = source.get(i).unwrap();
        let msgs: Vec<Message> = serde_json::from_value(e["messages"].clone()).unwrap();
        assert_eq!(msgs, row.messages);
        let prompt = &msgs[..us(&e["prompt_messages"])];
        let n_img = prompt.iter().flat_map(|m| &m.content).filter(|c| c.is_image()).count();
        let images: Vec<RgbImage> = p.decode_row_images(&row).unwrap().into_iter().take(n_img).collect();
        let (ids, batch) = p.encode_prompt_with_images(prompt, &images).unwrap();
        let want: Vec<u32> = e["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "row {i}");
        assert_eq!(batch.n_images(), n_img);
        assert_eq!(p.text.render(prompt, true).unwrap().text, e["prompt_text"].as_str().unwrap());
        assert_eq!(p.text.render(&msgs, false).unwrap().text, e["text"].as_str().unwrap(), "row {i}: rendered");
    }
}

#[test]
fn loader_and_summary_work_for_qwen() {
    let r = reference();
    let p = Arc::new(processor());
    let cfg = CollatorConfig { label_mask: LabelMask::PadImage, add_special_tokens: false, ..Default::default() };
    let lcfg = |workers| LoaderConfig { batch_size: 3, collator: cfg.clone(), shuffle: true, shuffle_window: 2, num_workers: workers, prefetch: 3, on_bad_row: OnBadRow::Error, drop_last: false, shard: Default::default() };
    let c0 = Cursor { seed: 5, epoch: 0, position: 0 };
    let inline: Vec<_> = DataLoader::new(dataset(), p.clone(), lcfg(0), c0).map(|b| b.unwrap()).collect();
    let threaded: Vec<_> = DataLoader::new(dataset(), p.clone(), lcfg(2), c0).map(|b| b.unwrap()).collect();
    assert_eq!(inline, threaded);
    assert_eq!(inline.iter().map(|b| b.batch_size).sum::<usize>(), us(&r["n_rows"]));
    let mut s = dataset();
    for b in &inline {
        let ex: Vec<_> = b.rows.iter().map(|&i| p.process_row(&s.get(i).unwrap(), &cfg).unwrap()).collect();
        assert_eq!(&p.collate(&ex, &cfg).unwrap(), b);
        assert_eq!(b.images.unit_shape(), &[1176]);
    }
    // per-row image tokens from the reference
    let mut per_row: Vec<usize> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["images"].as_array().unwrap().iter().map(|n| us(&r["images"][n.as_str().unwrap()]["hub"]["tokens"])).sum())
        .filter(|&t| t > 0)
        .collect();
    per_row.sort_unstable();
    let mut opts = vsft_data::InspectOptions::new(fx().join("processor"), fx().join("llava_instruct_mix").to_str().unwrap().to_string());
    opts.split = Some("train".into());
    opts.add_special_tokens = false;
    let summary = vsft_data::summarize(&opts, 2).unwrap();
    assert_eq!(summary.rows_ok, us(&r["n_rows"]));
    assert_eq!(summary.rows_with_images, per_row.len());
    assert_eq!(summary.image_tokens_total, per_row.iter().sum::<usize>());
    assert_eq!(summary.image_tokens_percentiles.first().unwrap().1, per_row[0]);
    assert_eq!(summary.image_tokens_percentiles.last().unwrap().1, *per_row.last().unwrap());
    for &(q, v) in &summary.image_tokens_percentiles {
        assert_eq!(v, vsft_data::inspect::percentile(&per_row, q));
    }
    assert!(summary.to_text().contains("image tokens/row: p0="), "{}", summary.to_text());
    // an override moves the summary
    opts.overrides = ProcessorOverrides { min_pixels: Some(28 * 28 * 512), max_pixels: Some(28 * 28 * 1280), ..Default::default() };
    let bigger = vsft_data::summarize(&opts, 2).unwrap();
    assert!(bigger.image_tokens_total > summary.image_tokens_total);
    let (ins, _) = vsft_data::inspect(&opts).unwrap();
    assert_eq!(ins.len(), us(&r["n_rows"]));
}

#[test]
fn overrides_are_checked_and_named() {
    let r = reference();
    // another family: an error naming the key
    let llava_next = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava_next/data/processor");
    let e = Processor::from_model_dir_with(&llava_next, None, &ProcessorOverrides { min_pixels: Some(1000), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("data.min_pixels") && e.contains("llava_next"), "{e}");
    let e = VisionProcessor::from_model_dir_with(&llava_next, &ProcessorOverrides { max_pixels: Some(1000), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("data.max_pixels") && !e.contains("data.min_pixels"), "{e}");
    assert!(Processor::from_model_dir_with(&llava_next, None, &ProcessorOverrides::default()).is_ok());
    // nonsense values
    let dir = fx().join("processor");
    let e = VisionProcessor::from_model_dir_with(&dir, &ProcessorOverrides { min_pixels: Some(1 << 20), max_pixels: Some(1 << 10), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("data.min_pixels"), "{e}");
    assert!(VisionProcessor::from_model_dir_with(&dir, &ProcessorOverrides { max_pixels: Some(0), ..Default::default() }).is_err());
    // only max_pixels: min_pixels stays the file's
    let p = VisionProcessor::from_model_dir_with(&dir, &overrides(&r, "max_small")).unwrap();
    assert_eq!(qwen(&p).config.min_pixels, r["min_pixels"].as_u64().unwrap());
    // and the processor built with it tokenizes with the smaller counts
    let p = Processor::from_model_dir_with(&dir, None, &overrides(&r, "max_small")).unwrap();
    let mut source = dataset();
    let row = source.get(1).unwrap(); // chelsea 640x480
    let ex = p.process_row(&row, &CollatorConfig::default()).unwrap();
    assert_eq!(ex.images.meta[0].tokens, us(&r["images"]["chelsea_640x480.jpg"]["max_small"]["tokens"]));
    assert_eq!(ex.images.total_tokens(), ex.encoded.input_ids.iter().filter(|&&t| t == p.text.image_token_id).count());
}

#[test]
fn config_layouts_and_errors() {
    let dir = fx().join("processor");
    let pre: J = serde_json::from_str(&std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap()).unwrap();
    let with = |f: &dyn Fn(&mut J)| {
        let mut v = pre.clone();
        f(&mut v);
        let d = copy_dir(&[], "cfg");
        std::fs::write(d.join("preprocessor_config.json"), v.to_string()).unwrap();
        d
    };
    let base = qwen(&VisionProcessor::from_model_dir(&dir).unwrap()).config.clone();
    // no min/max_pixels and no size: the class defaults 3136 / 1003520
    let d = with(&|v| {
        v.as_object_mut().unwrap().remove("min_pixels");
        v.as_object_mut().unwrap().remove("max_pixels");
    });
    let c = qwen(&VisionProcessor::from_model_dir(&d).unwrap()).config.clone();
    assert_eq!((c.min_pixels, c.max_pixels), (3136, 1003520));
    // `size` (5.24's keys) is read; top-level min/max_pixels win over it
    let d = with(&|v| {
        v.as_object_mut().unwrap().remove("max_pixels");
        v["size"] = serde_json::json!({"shortest_edge": 100, "longest_edge": 5000});
    });
    let c = qwen(&VisionProcessor::from_model_dir(&d).unwrap()).config.clone();
    assert_eq!((c.min_pixels, c.max_pixels), (base.min_pixels, 5000));
    // size without longest_edge and no max_pixels: transformers raises at resize
    let d = with(&|v| {
        v.as_object_mut().unwrap().remove("max_pixels");
        v.as_object_mut().unwrap().remove("min_pixels");
        v["size"] = serde_json::json!({"min_pixels": 100, "max_pixels": 5000});
    });
    assert!(VisionProcessor::from_model_dir(&d).unwrap_err().to_string().contains("longest_edge"));
    let d = with(&|v| v["resample"] = 2.into());
    assert!(VisionProcessor::from_model_dir(&d).unwrap_err().to_string().contains("resample"));
    // no type but Qwen keys: still Qwen; a Fast type name too
    let d = with(&|v| {
        v.as_object_mut().unwrap().remove("image_processor_type");
    });
    assert_eq!(VisionProcessor::from_model_dir(&d).unwrap().family(), "qwen2_vl");
    let d = with(&|v| v["image_processor_type"] = "Qwen2VLImageProcessorFast".into());
    assert_eq!(VisionProcessor::from_model_dir(&d).unwrap().family(), "qwen2_vl");
    // the unsupported-type error lists Qwen
    let d = with(&|v| v["image_processor_type"] = "SiglipImageProcessor".into());
    assert!(VisionProcessor::from_model_dir(&d).unwrap_err().to_string().contains("Qwen2VLImageProcessor"));
}

#[test]
fn extreme_images_error_or_work_without_panicking() {
    let p = processor();
    for (w, h) in [(201, 1), (1, 201), (5000, 20)] {
        let img = RgbImage::new(w, h, vec![7; w * h * 3]);
        assert!(p.image.preprocess(std::slice::from_ref(&img)).unwrap_err().to_string().contains("aspect ratio"), "{w}x{h}");
    }
    for (w, h) in [(1, 1), (200, 1), (1, 200), (29, 27), (3, 600)] {
        let img = RgbImage::new(w, h, (0..w * h * 3).map(|i| (i * 13 % 251) as u8).collect());
        let b = p.image.preprocess(std::slice::from_ref(&img)).unwrap();
        let (t, gh, gw) = b.meta[0].grid;
        assert_eq!(b.shape, vec![t * gh * gw, 1176], "{w}x{h}");
        assert_eq!(b.meta[0].tokens * 4, gh * gw);
        assert!(b.pixel_values.iter().all(|v| v.is_finite()));
    }
    assert!(p.image.meta(0, 5).is_err());
    assert!(p.image.preprocess(&[RgbImage { width: 4, height: 4, data: vec![0; 5] }]).is_err());
    // a row with such an image is a bad row (corrupt image), not a panic
    let mut source = dataset();
    let mut row = source.get(0).unwrap();
    let mut png = Vec::new();
    {
        // 300x1 PNG, stored uncompressed (zlib stored block)
        let (w, h) = (300u32, 1u32);
        let chunk = |kind: &[u8], data: &[u8]| -> Vec<u8> {
            let crc = [kind, data].concat().iter().fold(!0u32, |mut c, &b| {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
                }
                c
            });
            [&(data.len() as u32).to_be_bytes()[..], kind, data, &(!crc).to_be_bytes()].concat()
        };
        let raw: Vec<u8> = std::iter::once(0u8).chain(std::iter::repeat(128u8).take((w * 3) as usize)).collect();
        let adler = {
            let (mut a, mut b) = (1u32, 0u32);
            for &x in &raw {
                a = (a + x as u32) % 65521;
                b = (b + a) % 65521;
            }
            (b << 16) | a
        };
        let len = raw.len() as u16;
        let z = [&[0x78u8, 0x01, 0x01][..], &len.to_le_bytes(), &(!len).to_le_bytes(), &raw, &adler.to_be_bytes()].concat();
        let ihdr = [&w.to_be_bytes()[..], &h.to_be_bytes()[..], &[8, 2, 0, 0, 0]].concat();
        png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(b"IDAT", &z));
        png.extend(chunk(b"IEND", &[]));
    }
    assert_eq!(decode_image(&png).unwrap().width, 300);
    row.images[0] = vsft_data::ImageSource::Bytes(Arc::new(png));
    let e = p.process_row(&row, &CollatorConfig::default()).unwrap_err();
    assert_eq!(e.bad_row_kind(), Some(BadRowKind::CorruptImage), "{e}");
    assert!(e.to_string().contains("aspect ratio"), "{e}");
}

#[test]
fn truncation_never_cuts_an_image_or_its_wrappers() {
    let p = processor();
    let mut source = dataset();
    let row = source.get(2).unwrap(); // two images
    let full = p.process_row(&row, &CollatorConfig::default()).unwrap();
    assert_eq!(full.encoded.image_spans.len(), 2);
    let (s1, e1) = full.encoded.image_spans[1];
    let (vs1, ve1) = full.encoded.vision_spans[1];
    assert_eq!((vs1, ve1), (s1 - 1, e1 + 1));
    let (vs, ve) = p.text.vision_wrappers.unwrap();
    assert_eq!((full.encoded.input_ids[vs1], full.encoded.input_ids[ve1 - 1]), (vs, ve));
    for max in [s1 + 1, e1 - 1, e1] {
        let cfg = CollatorConfig { max_length: Some(max), ..Default::default() };
        let e = p.process_row(&row, &cfg).unwrap_err();
        assert_eq!(e.bad_row_kind(), Some(BadRowKind::ImageTruncated), "max {max}: {e}");
    }
    let cfg = CollatorConfig { max_length: Some(ve1 + 1), ..Default::default() };
    let t = p.process_row(&row, &cfg).unwrap();
    assert_eq!(t.encoded.input_ids, full.encoded.input_ids[..ve1 + 1]);
    assert_eq!(t.images, full.images);
}
