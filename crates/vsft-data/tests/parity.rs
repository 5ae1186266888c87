//! Parity with transformers 5.24 / TRL 1.16 on the fixtures written by
//! scripts/make_data_fixtures.py. No expected number is typed here: they all come from
//! tests/fixtures/data/reference.json and pixel_values.safetensors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as J;
use vsft_data::collator::{collate, CollatorConfig, Example, LabelMask};
use vsft_data::dataset::{open_dataset, Cursor, OnBadRow, RowSource};
use vsft_data::image_proc::{decode_image, ImageProcessor};
use vsft_data::template::{ChatTemplate, Message, SpecialTokens};
use vsft_data::{DataLoader, LoaderConfig, Processor};

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

fn reference() -> J {
    let s = std::fs::read_to_string(fx().join("reference.json")).expect("run scripts/make_data_fixtures.py");
    serde_json::from_str(&s).unwrap()
}

fn template_file(name: &str) -> PathBuf {
    fx().join(format!("{name}.jinja"))
}

fn processor(template: &str) -> Processor {
    Processor::from_model_dir(&fx().join("model"), Some(&template_file(template))).unwrap()
}

fn to_i64s(v: &J) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn flat(v: &J) -> Vec<i64> {
    v.as_array().unwrap().iter().flat_map(|r| to_i64s(r)).collect()
}

#[test]
fn pixel_values_match_clip_image_processor_pil() {
    let r = reference();
    let ip = ImageProcessor::from_model_dir(&fx().join("model")).unwrap();
    let family = vsft_data::VisionProcessor::from_model_dir(&fx().join("model")).unwrap();
    assert_eq!(family.family(), "llava");
    let st_bytes = std::fs::read(fx().join("pixel_values.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (name, stat) in r["images"].as_object().unwrap() {
        let t = st.tensor(name).unwrap();
        let want: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let shape: Vec<usize> = stat["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let bytes = std::fs::read(fx().join("images").join(name)).unwrap();
        let img = decode_image(&bytes).unwrap();
        let got = ip.preprocess(&img);
        assert_eq!(vec![3, got.height, got.width], shape, "{name}");
        let fam = family.preprocess(std::slice::from_ref(&img)).unwrap();
        assert_eq!(fam.shape, [vec![1], shape.clone()].concat(), "{name}");
        assert_eq!(fam.pixel_values, got.data, "{name}: family path");
        assert_eq!(fam.meta[0].original_hw, (img.height, img.width));
        assert_eq!(got.data.len(), want.len());
        let mut max = 0f64;
        let mut sum = 0f64;
        for (a, b) in got.data.iter().zip(&want) {
            let d = (*a as f64 - *b as f64).abs();
            sum += d;
            max = max.max(d);
        }
        let mean = sum / want.len() as f64;
        report.push(format!("{name:<16} {}x{} mean_abs={mean:.2e} max_abs={max:.2e}", img.width, img.height));
        if stat["no_resize"].as_bool().unwrap() {
            if max > 1e-6 {
                failures.push(format!("{name}: max abs diff {max} > 1e-6 on an image that needs no resize"));
            }
        } else if mean > 2e-3 || max > 0.05 {
            failures.push(format!("{name}: mean abs diff {mean} (limit 2e-3), max abs diff {max} (limit 0.05)"));
        }
    }
    eprintln!("pixel parity:\n{}", report.join("\n"));
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn chat_templates_render_like_transformers() {
    let r = reference();
    let special = SpecialTokens::from_tokenizer_config(
        &serde_json::from_str(&std::fs::read_to_string(fx().join("model/tokenizer_config.json")).unwrap()).unwrap(),
    );
    for name in ["llava_hf", "blog", "extra", "json"] {
        let src = std::fs::read_to_string(template_file(name)).unwrap();
        let t = ChatTemplate::new(&src).unwrap();
        for e in r["rendered"].as_array().unwrap() {
            let msgs: Vec<Message> = serde_json::from_value(e["messages"].clone()).unwrap();
            let got = t.render(&msgs, false, &special).unwrap();
            assert_eq!(got.text, e[name].as_str().unwrap(), "template {name}, row {}", e["row"]);
            let got = t.render(&msgs, true, &special).unwrap();
            assert_eq!(got.text, e[format!("{name}_gen")].as_str().unwrap(), "template {name} +gen, row {}", e["row"]);
        }
    }
}

#[test]
fn model_dir_template_is_chat_template_jinja() {
    // The fixture model dir carries the llava-hf template as chat_template.jinja.
    let p = Processor::from_model_dir(&fx().join("model"), None).unwrap();
    assert!(p.text.template.has_generation());
    let want = std::fs::read_to_string(template_file("llava_hf")).unwrap();
    assert_eq!(p.text.template.source(), want);
}

fn check_batch(b: &J, source: &mut dyn RowSource, procs: &std::collections::HashMap<String, Processor>) -> usize {
    let tn = b["template"].as_str().unwrap();
    let p = &procs[tn];
    let ast = b["add_special_tokens"].as_bool().unwrap();
    let mult = b["pad_to_multiple_of"].as_u64().map(|x| x as usize);
    let rows: Vec<_> = b["rows"].as_array().unwrap().iter().map(|r| r[2].as_u64().unwrap() as usize).collect();
    let mut checked = 0;
    for (mode_name, want) in b["labels"].as_object().unwrap() {
        let mode: LabelMask = mode_name.parse().unwrap();
        let cfg = CollatorConfig { label_mask: mode, max_length: None, pad_to_multiple_of: mult, add_special_tokens: ast };
        let examples: Vec<Example> = rows
            .iter()
            .map(|&i| {
                let row = source.get(i).unwrap();
                // the row's file/row as the fixture names them
                let file = row.file.file_name().unwrap().to_str().unwrap().to_string();
                let fr = b["rows"].as_array().unwrap().iter().find(|r| r[2].as_u64().unwrap() as usize == i).unwrap();
                assert_eq!(file, fr[0].as_str().unwrap());
                assert_eq!(row.file_row, fr[1].as_u64().unwrap() as usize);
                p.process_row(&row, &cfg).unwrap()
            })
            .collect();
        let batch = collate(&examples, &cfg, p.text.pad_token_id, p.text.image_token_id).unwrap();
        let ctx = format!("rows {rows:?} template {tn} add_special_tokens {ast} multiple {mult:?} mask {mode_name}");
        let want_ids = flat(&b["input_ids"]);
        let n = b["input_ids"].as_array().unwrap().len();
        assert_eq!(batch.batch_size, n, "{ctx}");
        assert_eq!(batch.seq_len * n, want_ids.len(), "{ctx}: seq_len");
        assert_eq!(batch.input_ids, want_ids, "{ctx}: input_ids");
        assert_eq!(batch.attention_mask, flat(&b["attention_mask"]), "{ctx}: attention_mask");
        assert_eq!(batch.labels, flat(want), "{ctx}: labels");
        assert!(!batch.all_labels_masked);
        checked += 1;
    }
    checked
}

#[test]
fn batches_match_llava_processor_and_trl_collator() {
    let r = reference();
    let mut source = open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
    assert_eq!(source.len() as u64, r["n_train"].as_u64().unwrap());
    let procs: std::collections::HashMap<String, Processor> =
        ["llava_hf", "blog", "extra"].iter().map(|n| (n.to_string(), processor(n))).collect();
    let mut checked = 0;
    let mut trl = 0;
    for b in r["batches"].as_array().unwrap() {
        checked += check_batch(b, source.as_mut(), &procs);
        if b.get("trl_checked").is_some() {
            trl += 1;
        }
    }
    assert!(trl > 0);
    eprintln!("checked {checked} (batch, mask) combinations, {trl} batches also against TRL's collator");
}

#[test]
fn llava_json_converts_to_the_same_messages_and_tokens() {
    let r = reference();
    let mut pq = open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
    let mut js = open_dataset(fx().join("llava.json").to_str().unwrap(), None, Some(&fx().join("images"))).unwrap();
    let ids: Vec<String> = r["llava_json_ids"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    assert_eq!(js.len(), ids.len());
    let p = processor("llava_hf");
    let cfg = CollatorConfig { label_mask: LabelMask::Assistant, ..Default::default() };
    for (k, id) in ids.iter().enumerate() {
        let i: usize = id.trim_start_matches("train-").parse().unwrap();
        let a = js.get(k).unwrap();
        let b = pq.get(i).unwrap();
        assert_eq!(a.messages, b.messages, "{id}");
        let ea = p.process_row(&a, &cfg).unwrap();
        let eb = p.process_row(&b, &cfg).unwrap();
        assert_eq!(ea.encoded, eb.encoded, "{id}");
        assert_eq!(ea.images, eb.images, "{id}");
    }
}

#[test]
fn test_split_and_glob() {
    let r = reference();
    let dir = fx().join("llava_instruct_mix");
    let t = open_dataset(dir.to_str().unwrap(), Some("test"), None).unwrap();
    assert_eq!(t.len() as u64, r["n_test"].as_u64().unwrap());
    let g = open_dataset(dir.join("data/train-*.parquet").to_str().unwrap(), None, None).unwrap();
    assert_eq!(g.len() as u64, r["n_train"].as_u64().unwrap());
    let one = open_dataset(dir.join("data").join(r["train_files"][1].as_str().unwrap()).to_str().unwrap(), None, None).unwrap();
    assert!(one.len() > 0 && one.len() < g.len());
}

fn loader(workers: usize, cursor: Cursor, mask: LabelMask) -> DataLoader {
    let src = open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
    let cfg = LoaderConfig {
        batch_size: 3,
        collator: CollatorConfig { label_mask: mask, ..Default::default() },
        shuffle: true,
        shuffle_window: 2,
        num_workers: workers,
        prefetch: 2,
        on_bad_row: OnBadRow::Error,
        drop_last: false,
        shard: Default::default(),
    };
    DataLoader::new(src, Arc::new(processor("llava_hf")), cfg, cursor)
}

#[test]
fn loader_is_deterministic_and_resumable() {
    let c0 = Cursor { seed: 7, epoch: 0, position: 0 };
    let inline: Vec<_> = loader(0, c0, LabelMask::Pad).map(|b| b.unwrap()).collect();
    let threaded: Vec<_> = loader(3, c0, LabelMask::Pad).map(|b| b.unwrap()).collect();
    assert_eq!(inline, threaded);
    let rows: Vec<usize> = inline.iter().flat_map(|b| b.rows.clone()).collect();
    let mut sorted = rows.clone();
    sorted.sort();
    assert_eq!(sorted, (0..rows.len()).collect::<Vec<_>>(), "an epoch is a permutation");
    assert_ne!(rows, sorted, "shuffled");
    // another epoch, another order; same seed+epoch, same order
    let e1: Vec<usize> = loader(2, c0.next_epoch(), LabelMask::Pad).flat_map(|b| b.unwrap().rows).collect();
    assert_ne!(e1, rows);
    // resume after two batches
    let mut l = loader(2, c0, LabelMask::Pad);
    let _ = l.next().unwrap().unwrap();
    let _ = l.next().unwrap().unwrap();
    let cur = l.cursor();
    let json = serde_json::to_string(&cur).unwrap();
    let cur2: Cursor = serde_json::from_str(&json).unwrap();
    let rest: Vec<_> = loader(2, cur2, LabelMask::Pad).map(|b| b.unwrap()).collect();
    assert_eq!(rest, inline[2..].to_vec());
}

fn u8_tensor<'a>(st: &'a safetensors::SafeTensors<'a>, name: &str) -> (Vec<usize>, &'a [u8]) {
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data())
}

#[test]
fn image_decoding_matches_pillow() {
    let bytes = std::fs::read(fx().join("pil_uint8.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().iter().filter(|n| n.starts_with("decoded/")).map(|n| n.to_string()).collect();
    names.sort();
    assert!(names.len() >= 8);
    let mut report = Vec::new();
    for n in names {
        let file = n.trim_start_matches("decoded/");
        let (shape, want) = u8_tensor(&st, &n);
        let data = std::fs::read(fx().join("jpeg").join(file)).unwrap();
        let img = decode_image(&data).unwrap();
        assert_eq!(vec![img.height, img.width, 3], shape, "{file}");
        let diff: Vec<i32> = img.data.iter().zip(want).map(|(&a, &b)| (a as i32 - b as i32).abs()).collect();
        let max = diff.iter().copied().max().unwrap();
        let mean = diff.iter().map(|&d| d as f64).sum::<f64>() / diff.len() as f64;
        let own = vsft_data::jpeg::decode(&data, vsft_data::image_proc::MAX_IMAGE_PIXELS).is_ok();
        report.push(format!("{file:<18} own_decoder={own} max={max} mean={mean:.4}"));
        if own || file.ends_with(".png") {
            assert_eq!(max, 0, "{file}: must be bit-exact with Pillow");
        } else {
            // progressive: decoded by the `image` crate (zune-jpeg), within a few levels
            assert!(max <= 8 && mean <= 1.0, "{file}: max {max} mean {mean}");
        }
    }
    eprintln!("jpeg decoding:\n{}", report.join("\n"));
}

#[test]
fn bicubic_resize_matches_pillow() {
    let bytes = std::fs::read(fx().join("pil_uint8.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (shape, src) = u8_tensor(&st, "resize/src");
    let img = vsft_data::image_proc::RgbImage::new(shape[1], shape[0], src.to_vec());
    let mut n = 0;
    for name in st.names() {
        let Some(size) = name.strip_prefix("resize/").filter(|s| *s != "src") else { continue };
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
        let (_, want) = u8_tensor(&st, name);
        let got = vsft_data::image_proc::resize_bicubic_pil(&img, w, h);
        assert_eq!(got.data, want, "resize {}x{} -> {w}x{h}", img.width, img.height);
        n += 1;
    }
    assert!(n >= 10);
}

#[test]
fn generation_prompt_encoding_matches_rendered_reference() {
    // The prompt of row 0's user turn: ids equal to tokenizing the reference text rendered
    // with add_generation_prompt (the "_gen" entries come from transformers).
    let r = reference();
    let p = processor("llava_hf");
    let e = &r["rendered"][0];
    let msgs: Vec<Message> = serde_json::from_value(e["messages"].clone()).unwrap();
    let n_img = e["images"].as_array().unwrap().len();
    let ids = p.text.encode_prompt(&msgs, n_img).unwrap();
    let full = p.text.encode_with(&msgs, n_img, true, true, None).unwrap();
    assert_eq!(ids, full.input_ids);
    assert_eq!(full.text, e["llava_hf_gen"].as_str().unwrap());
    assert_eq!(ids.iter().filter(|&&t| t == p.text.image_token_id).count(), n_img * p.text.image.image_seq_length);
    for e in r["rendered"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(e["messages"].clone()).unwrap();
        let ids = p.text.encode_prompt(&msgs, e["images"].as_array().unwrap().len()).unwrap();
        let want: Vec<u32> = e["llava_hf_gen_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "row {}", e["row"]);
    }
}
