//! LLaVA-NeXT parity with transformers 5.24 (`LlavaNextProcessor`, PIL backend) and TRL 1.16
//! (`DataCollatorForVisionLanguageModeling`) on the fixtures written by
//! scripts/make_llava_next_data_fixtures.py. No expected number is typed here: they all
//! come from tests/fixtures/llava_next/data/reference.json and pixel_samples.safetensors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as J;
use vsft_data::collator::{collate, CollatorConfig, LabelMask};
use vsft_data::dataset::{open_dataset, Cursor, OnBadRow, Row, RowSource};
use vsft_data::family::llava_next::{py_int_round7, select_best_resolution};
use vsft_data::image_proc::{decode_image, RgbImage};
use vsft_data::template::Message;
use vsft_data::{BadRowKind, DataLoader, LoaderConfig, Processor, VisionProcessor};

mod common;
use common::f32_sha256;

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava_next/data")
}

fn reference() -> J {
    let s = std::fs::read_to_string(fx().join("reference.json")).expect("run scripts/make_llava_next_data_fixtures.py");
    serde_json::from_str(&s).unwrap()
}

fn processor(template: Option<&str>) -> Processor {
    let t = template.map(|t| fx().join(format!("{t}.jinja")));
    Processor::from_model_dir(&fx().join("processor"), t.as_deref()).unwrap()
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

fn anyres(p: &VisionProcessor) -> &vsft_data::AnyResProcessor {
    match p {
        VisionProcessor::LlavaNext(a) => a,
        o => panic!("expected llava_next, got {}", o.family()),
    }
}

// ---------------------------------------------------------------------------------------

#[test]
fn processor_settings_load_from_both_layouts() {
    let r = reference();
    let hub = VisionProcessor::from_model_dir(&fx().join("processor")).unwrap();
    assert_eq!(hub.family(), "llava_next");
    let a = anyres(&hub);
    let want_pins: Vec<(usize, usize)> = r["image_grid_pinpoints"].as_array().unwrap().iter().map(pair).collect();
    assert_eq!(a.config.image_grid_pinpoints, want_pins);
    assert_eq!(a.tile, us(&r["crop_size"]));
    assert_eq!(a.unit_hw, (us(&r["crop_size"]), us(&r["crop_size"])));
    assert_eq!(a.config.patch_size, us(&r["patch_size"]));
    assert_eq!(a.config.num_additional_image_tokens, us(&r["num_additional_image_tokens"]));

    // transformers 5.24's save_pretrained layout: no preprocessor_config.json, the image
    // processor nested in processor_config.json.
    let tmp = std::env::temp_dir().join(format!("vsft-llava-next-524-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.json"] {
        std::fs::copy(fx().join("processor").join(f), tmp.join(f)).unwrap();
    }
    std::fs::copy(fx().join("processor_config.5_24.json"), tmp.join("processor_config.json")).unwrap();
    let nested = Processor::from_model_dir(&tmp, None).unwrap();
    let b = anyres(&nested.image);
    assert_eq!(a.config, b.config);
    assert_eq!((a.tile, a.base_hw, a.unit_hw), (b.tile, b.base_hw, b.unit_hw));
    let hubp = processor(None);
    assert_eq!(hubp.text.template.source(), nested.text.template.source());
    assert_eq!(hubp.text.image_token_id as u64, r["image_token_id"].as_u64().unwrap());
    assert_eq!(hubp.text.pad_token_id as u64, r["pad_token_id"].as_u64().unwrap());
    assert!(hubp.text.image.dynamic);
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn pixel_values_bit_exact_for_every_image() {
    let r = reference();
    let p = VisionProcessor::from_model_dir(&fx().join("processor")).unwrap();
    let a = anyres(&p);
    let st_bytes = std::fs::read(fx().join("pixel_samples.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let images = r["images"].as_object().unwrap();
    assert!(images.len() >= 6);
    for (name, want) in images {
        let bytes = std::fs::read(fx().join("images").join(name)).unwrap();
        let img = decode_image(&bytes).unwrap();
        let got = p.preprocess(std::slice::from_ref(&img)).unwrap();
        let shape = usizes(&want["pixel_values_shape"]);
        assert_eq!(got.shape, shape[1..], "{name}: pixel_values shape (batch axis dropped)");
        assert_eq!(got.n_images(), 1);
        let m = got.meta[0];
        assert_eq!(m.original_hw, pair(&want["image_sizes"]), "{name}: image_sizes");
        assert_eq!(m.units, us(&want["tiles"]), "{name}: tiles");
        let best = pair(&want["best_resolution"]);
        assert_eq!(a.best_resolution(m.original_hw.0, m.original_hw.1), best, "{name}: best resolution");
        assert_eq!(m.grid, (1, best.0 / a.tile, best.1 / a.tile), "{name}: grid");
        assert_eq!(m.tokens, us(&want["tokens"]), "{name}: <image> tokens");
        // strided values first (diagnosis), then the hash of everything
        let stride = us(&want["sample_stride"]);
        let t = st.tensor(name).unwrap();
        let sample: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let ours: Vec<f32> = got.pixel_values.iter().step_by(stride).copied().collect();
        assert_eq!(ours.len(), sample.len(), "{name}");
        let mut n_diff = 0;
        let mut max = 0f32;
        for (x, y) in ours.iter().zip(&sample) {
            if x.to_bits() != y.to_bits() {
                n_diff += 1;
                max = max.max((x - y).abs());
            }
        }
        let hash_ok = f32_sha256(&got.pixel_values) == want["sha256"].as_str().unwrap();
        report.push(format!(
            "{name:<24} {}x{} tiles {} tokens {} sampled {} values: {n_diff} differ (max {max:e}); sha256 {}",
            img.width,
            img.height,
            m.units,
            m.tokens,
            sample.len(),
            if hash_ok { "equal" } else { "DIFFERENT" }
        ));
        if n_diff > 0 || !hash_ok {
            failures.push(name.clone());
        }
    }
    eprintln!("llava_next pixel parity:\n{}", report.join("\n"));
    assert!(failures.is_empty(), "not bit-exact: {failures:?}");
}

#[test]
fn token_counts_and_tiles_match_the_processor_for_many_sizes() {
    let r = reference();
    let p = VisionProcessor::from_model_dir(&fx().join("processor")).unwrap();
    let a = anyres(&p);
    let sizes = r["sizes"].as_array().unwrap();
    assert!(sizes.len() >= 300);
    for s in sizes {
        let (h, w) = pair(&s["hw"]);
        let m = p.meta(h, w).unwrap();
        assert_eq!(m.tokens, us(&s["tokens"]), "{h}x{w} (HxW): tokens");
        assert_eq!(m.units, us(&s["tiles"]), "{h}x{w}: tiles");
        assert_eq!(a.best_resolution(h, w), pair(&s["best_resolution"]), "{h}x{w}: best resolution");
        assert_eq!(select_best_resolution(h, w, &a.config.image_grid_pinpoints), pair(&s["best_resolution"]));
    }
}

#[test]
fn int_round7_is_python_semantics() {
    // int(round(x, 7)): 7-decimal rounding first, then truncation.
    assert_eq!(py_int_round7(14.4), 14);
    assert_eq!(py_int_round7(13.99999996), 14);
    assert_eq!(py_int_round7(13.9999999), 13);
    assert_eq!(py_int_round7(0.0), 0);
    assert_eq!(py_int_round7(7.0), 7);
}

fn rows(source: &mut dyn RowSource, ids: &[usize]) -> Vec<Row> {
    ids.iter().map(|&i| source.get(i).unwrap()).collect()
}

#[test]
fn batches_match_trl_collator_in_all_masks() {
    let r = reference();
    let mut source = open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
    assert_eq!(source.len(), us(&r["n_rows"]));
    let plain = processor(None);
    let training = processor(Some("llava_next_training"));
    let mut checked = 0;
    for b in r["batches"].as_array().unwrap() {
        let ids = usizes(&b["rows"]);
        let rs = rows(source.as_mut(), &ids);
        for (mode_name, want) in b["labels"].as_object().unwrap() {
            let mode: LabelMask = mode_name.parse().unwrap();
            let p = if mode == LabelMask::Assistant { &training } else { &plain };
            let cfg = CollatorConfig { label_mask: mode, max_length: None, pad_to_multiple_of: None, add_special_tokens: false };
            let examples: Vec<_> = rs.iter().map(|row| p.process_row(row, &cfg).unwrap()).collect();
            let batch = collate(&examples, &cfg, p.text.pad_token_id, p.text.image_token_id).unwrap();
            let ctx = format!("rows {ids:?} mask {mode_name}");
            let want_ids = flat(&b["input_ids"]);
            assert_eq!(batch.batch_size, ids.len(), "{ctx}");
            assert_eq!(batch.seq_len * ids.len(), want_ids.len(), "{ctx}: seq_len");
            assert_eq!(batch.input_ids, want_ids, "{ctx}: input_ids");
            assert_eq!(batch.attention_mask, flat(&b["attention_mask"]), "{ctx}: attention_mask");
            assert_eq!(batch.labels, flat(want), "{ctx}: labels");
            // the loader's path (normalising straight into the batch) gives the same batch
            let prepared: Vec<_> = rs.iter().map(|row| p.prepare_row(row, &cfg).unwrap()).collect();
            assert_eq!(p.collate_prepared(&prepared, &cfg).unwrap(), batch, "{ctx}: collate_prepared");
            // images: image_sizes, tokens per image = image runs in the ids, transformers' padded shape
            let im = &batch.images;
            let want_sizes: Vec<(usize, usize)> = b["image_sizes"].as_array().unwrap().iter().map(pair).collect();
            assert_eq!(im.image_sizes(), want_sizes, "{ctx}: image_sizes");
            assert_eq!(im.total_tokens() as i64, batch.input_ids.iter().filter(|&&t| t == p.text.image_token_id as i64).count() as i64);
            let names = b["images"].as_array().unwrap();
            assert_eq!(im.n_images(), names.len());
            for (k, n) in names.iter().enumerate() {
                let want = &r["images"][n.as_str().unwrap()];
                assert_eq!(im.meta[k].units, us(&want["tiles"]), "{ctx}: {n}");
                assert_eq!(f32_sha256(im.image_pixels(k)), want["sha256"].as_str().unwrap(), "{ctx}: {n} pixels");
            }
            match b["pixel_values_shape"].as_array() {
                Some(shape) => {
                    let (padded, pshape) = im.padded_tiles();
                    assert_eq!(pshape.to_vec(), usizes(&b["pixel_values_shape"]), "{ctx}: padded pixel_values shape");
                    assert_eq!(shape.len(), 5);
                    let per = pshape[2] * pshape[3] * pshape[4];
                    for k in 0..im.n_images() {
                        let base = k * pshape[1] * per;
                        let n = im.meta[k].units * per;
                        assert_eq!(&padded[base..base + n], im.image_pixels(k));
                        assert!(padded[base + n..base + pshape[1] * per].iter().all(|&x| x == 0.0), "{ctx}: padding tiles are zero");
                    }
                }
                None => assert!(im.is_empty()),
            }
            checked += 1;
        }
    }
    assert!(checked >= 15);
    eprintln!("checked {checked} (batch, mask) combinations against TRL's collator");
}

#[test]
fn generation_prompts_with_images_match_the_processor() {
    let r = reference();
    let p = processor(None);
    let mut source = open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
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
        let full = p.text.render(&msgs, false).unwrap().text;
        assert_eq!(full, e["text"].as_str().unwrap(), "row {i}: rendered");
        // count-based encoding cannot know LLaVA-NeXT's counts
        if n_img > 0 {
            assert!(p.text.encode_prompt(prompt, n_img).is_err());
        } else {
            assert_eq!(p.text.encode_prompt(prompt, 0).unwrap(), want);
        }
    }
}

#[test]
fn loader_and_summary_work_for_llava_next() {
    let r = reference();
    let p = Arc::new(processor(None));
    let cfg = CollatorConfig { label_mask: LabelMask::Pad, add_special_tokens: false, ..Default::default() };
    let lcfg = |workers| LoaderConfig { batch_size: 3, collator: cfg.clone(), shuffle: true, shuffle_window: 2, num_workers: workers, prefetch: 3, on_bad_row: OnBadRow::Error, drop_last: false, shard: Default::default() };
    let src = || open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
    let c0 = Cursor { seed: 3, epoch: 0, position: 0 };
    let inline: Vec<_> = DataLoader::new(src(), p.clone(), lcfg(0), c0).map(|b| b.unwrap()).collect();
    let threaded: Vec<_> = DataLoader::new(src(), p.clone(), lcfg(2), c0).map(|b| b.unwrap()).collect();
    assert_eq!(inline, threaded);
    let n_rows: usize = inline.iter().map(|b| b.batch_size).sum();
    assert_eq!(n_rows, us(&r["n_rows"]));
    // every batch equals process_row + collate of its rows
    let mut s = src();
    for b in &inline {
        let ex: Vec<_> = b.rows.iter().map(|&i| p.process_row(&s.get(i).unwrap(), &cfg).unwrap()).collect();
        assert_eq!(&p.collate(&ex, &cfg).unwrap(), b);
    }
    let n_images: usize = r["rows"].as_array().unwrap().iter().map(|e| e["images"].as_array().unwrap().len()).sum();
    let mut opts = vsft_data::InspectOptions::new(fx().join("processor"), fx().join("llava_instruct_mix").to_str().unwrap().to_string());
    opts.split = Some("train".into());
    opts.add_special_tokens = false;
    let summary = vsft_data::summarize(&opts, 2).unwrap();
    assert_eq!(summary.rows_ok, us(&r["n_rows"]));
    assert_eq!(summary.images, n_images);
    let (ins, _) = vsft_data::inspect(&opts).unwrap();
    for (e, want) in ins.iter().zip(r["rows"].as_array().unwrap()) {
        let names = want["images"].as_array().unwrap();
        assert_eq!(e.images.len(), names.len());
        for (st, n) in e.images.iter().zip(names) {
            let w = &r["images"][n.as_str().unwrap()];
            assert_eq!((st.height, st.width), pair(&w["image_sizes"]));
            assert_eq!((st.units, st.tokens), (us(&w["tiles"]), us(&w["tokens"])));
        }
        assert_eq!(e.text, want["text"].as_str().unwrap());
    }
}

#[test]
fn truncation_skips_rows_whose_image_tokens_would_be_cut() {
    let p = processor(None);
    let mut source = open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
    let row = source.get(2).unwrap(); // two images
    let full = p.process_row(&row, &CollatorConfig::default()).unwrap();
    assert_eq!(full.encoded.image_spans.len(), 2);
    let (s1, e1) = full.encoded.image_spans[1];
    for max in [s1 + 1, e1 - 1] {
        let cfg = CollatorConfig { max_length: Some(max), ..Default::default() };
        let e = p.process_row(&row, &cfg).unwrap_err();
        assert_eq!(e.bad_row_kind(), Some(BadRowKind::ImageTruncated), "{e}");
    }
    let cfg = CollatorConfig { max_length: Some(e1 + 2), ..Default::default() };
    let t = p.process_row(&row, &cfg).unwrap();
    assert_eq!(t.encoded.input_ids, full.encoded.input_ids[..e1 + 2]);
    assert_eq!(t.images, full.images);
}

#[test]
fn extreme_and_degenerate_images_never_panic() {
    let r = reference();
    let p = VisionProcessor::from_model_dir(&fx().join("processor")).unwrap();
    let (uh, uw) = p.unit_hw();
    // extreme aspect ratios: a correct layout, counts as the processor's
    for s in r["sizes"].as_array().unwrap() {
        let (h, w) = pair(&s["hw"]);
        if h.max(w) < 4000 && h.min(w) > 2 {
            continue;
        }
        let img = RgbImage::new(w, h, (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect());
        let b = p.preprocess(std::slice::from_ref(&img)).unwrap();
        assert_eq!(b.meta[0].tokens, us(&s["tokens"]), "{h}x{w}");
        assert_eq!(b.shape, vec![us(&s["tiles"]), 3, uh, uw], "{h}x{w}");
        assert!(b.pixel_values.iter().all(|v| v.is_finite()));
    }
    // zero-size and inconsistent buffers: errors, not panics
    let bad = RgbImage { width: 0, height: 5, data: vec![] };
    assert!(p.preprocess(&[bad]).is_err());
    let bad = RgbImage { width: 4, height: 4, data: vec![0; 5] };
    assert!(p.preprocess(&[bad]).is_err());
    assert!(p.meta(0, 10).is_err());
    assert!(p.process_bytes(b"not an image").is_err());
    // decompression bombs: refused from the header, before any pixel buffer exists
    let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x03];
    jpeg.extend_from_slice(&[1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9]);
    let e = decode_image(&jpeg).unwrap_err();
    assert!(e.contains("65535x65535") && e.contains("limit"), "{e}");
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
    let ihdr = [&40000u32.to_be_bytes()[..], &40000u32.to_be_bytes()[..], &[8, 2, 0, 0, 0]].concat();
    let png = [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]), &chunk(b"IEND", &[])].concat();
    let e = decode_image(&png).unwrap_err();
    assert!(e.contains("40000x40000") && e.contains("limit"), "{e}");
}

fn write_dir(files: &[(&str, String)]) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!("vsft-llava-next-cfg-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&d).unwrap();
    for (name, text) in files {
        std::fs::write(d.join(name), text).unwrap();
    }
    d
}

#[test]
fn configs_are_validated_with_clear_errors() {
    let pre: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx().join("processor/preprocessor_config.json")).unwrap()).unwrap();
    let proc_cfg = std::fs::read_to_string(fx().join("processor/processor_config.json")).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = pre.clone();
        f(&mut v);
        write_dir(&[("preprocessor_config.json", v.to_string()), ("processor_config.json", proc_cfg.clone())])
    };
    // unknown type: an error naming the supported ones
    let d = with(&|v| {
        v["image_processor_type"] = "SiglipImageProcessor".into();
        v.as_object_mut().unwrap().remove("image_grid_pinpoints");
    });
    let e = VisionProcessor::from_model_dir(&d).unwrap_err().to_string();
    assert!(e.contains("SiglipImageProcessor") && e.contains("LlavaNextImageProcessor") && e.contains("CLIPImageProcessor"), "{e}");
    // pinpoints that are not multiples of the tile
    let d = with(&|v| v["image_grid_pinpoints"] = serde_json::json!([[336, 600]]));
    let e = VisionProcessor::from_model_dir(&d).unwrap_err().to_string();
    assert!(e.contains("image_grid_pinpoints") && e.contains("preprocessor_config.json"), "{e}");
    let d = with(&|v| v["image_grid_pinpoints"] = serde_json::json!([[336]]));
    assert!(VisionProcessor::from_model_dir(&d).is_err());
    let d = with(&|v| v["resample"] = 2.into());
    assert!(VisionProcessor::from_model_dir(&d).unwrap_err().to_string().contains("resample"));
    // pinpoints alone select the family (no image_processor_type); absent pinpoints: the default list
    let d = with(&|v| {
        v.as_object_mut().unwrap().remove("image_processor_type");
    });
    assert_eq!(VisionProcessor::from_model_dir(&d).unwrap().family(), "llava_next");
    let d = with(&|v| {
        v.as_object_mut().unwrap().remove("image_grid_pinpoints");
    });
    let p = VisionProcessor::from_model_dir(&d).unwrap();
    assert_eq!(anyres(&p).config.image_grid_pinpoints, vsft_data::family::llava_next::DEFAULT_PINPOINTS.to_vec());
    // the strategy: "default" drops one token; "full" and an absent key (None in
    // LlavaNextProcessor) do not
    let base = VisionProcessor::from_model_dir(&fx().join("processor")).unwrap();
    let pc: serde_json::Value = serde_json::from_str(&proc_cfg).unwrap();
    for (strategy, extra) in [(Some("full"), 1), (None, 1)] {
        let mut c = pc.clone();
        match strategy {
            Some(s) => c["vision_feature_select_strategy"] = s.into(),
            None => {
                c.as_object_mut().unwrap().remove("vision_feature_select_strategy");
            }
        }
        let d = write_dir(&[("preprocessor_config.json", pre.to_string()), ("processor_config.json", c.to_string())]);
        let p = VisionProcessor::from_model_dir(&d).unwrap();
        assert_eq!(p.image_tokens(480, 640).unwrap(), base.image_tokens(480, 640).unwrap() + extra, "{strategy:?}");
    }
    let mut c = pc.clone();
    c["vision_feature_select_strategy"] = "cls_only".into();
    let d = write_dir(&[("preprocessor_config.json", pre.to_string()), ("processor_config.json", c.to_string())]);
    assert!(VisionProcessor::from_model_dir(&d).unwrap_err().to_string().contains("cls_only"));
    // no patch size anywhere
    let mut v = pre.clone();
    v["image_processor_type"] = "LlavaNextImageProcessor".into();
    let d = write_dir(&[("preprocessor_config.json", v.to_string())]);
    assert!(VisionProcessor::from_model_dir(&d).unwrap_err().to_string().contains("patch"));
}

#[test]
fn a_56px_tile_configuration_matches_the_processor() {
    // A tiny model's processor (crop 56, pinpoints in multiples of 56, patch 14): tiling,
    // pixels and the placeholder rule at another tile size.
    let r = reference();
    let t = &r["tile56"];
    let p = VisionProcessor::from_model_dir(&fx().join("processor_tile56")).unwrap();
    assert_eq!(p.unit_hw(), (56, 56));
    for (name, want) in t["images"].as_object().unwrap() {
        let img = decode_image(&std::fs::read(fx().join("images").join(name)).unwrap()).unwrap();
        let got = p.preprocess(std::slice::from_ref(&img)).unwrap();
        assert_eq!(got.shape, usizes(&want["pixel_values_shape"])[1..], "{name}");
        assert_eq!(got.meta[0].tokens, us(&want["tokens"]), "{name}");
        assert_eq!(anyres(&p).best_resolution(img.height, img.width), pair(&want["best_resolution"]), "{name}");
        assert_eq!(f32_sha256(&got.pixel_values), want["sha256"].as_str().unwrap(), "{name}: pixels");
    }
    let mut tiles_checked = 0;
    for s in t["sizes"].as_array().unwrap() {
        let (h, w) = pair(&s["hw"]);
        let m = p.meta(h, w).unwrap();
        assert_eq!(m.tokens, us(&s["tokens"]), "{h}x{w}");
        assert_eq!(anyres(&p).best_resolution(h, w), pair(&s["best_resolution"]), "{h}x{w}");
        if let Some(n) = s.get("tiles") {
            assert_eq!(m.units, us(n), "{h}x{w}");
            tiles_checked += 1;
        }
    }
    assert!(tiles_checked >= 20);
}
