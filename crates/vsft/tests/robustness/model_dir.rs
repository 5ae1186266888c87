//! Model directories: configs with zero, inconsistent and absurd sizes (every family), configs
//! that are not JSON or never end, safetensors files whose headers lie (lengths, offsets,
//! overlaps, dtypes, shapes) or that are cut short, broken shard indexes, and processor configs
//! with sizes that cannot work. Models are read by `vsft generate`, processors by `vsft data inspect`.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::common::root;
use crate::{args, endless, linked_copy, number_paths, replace, scratch, tiny_llava, with_value, Case, Rng};

const RANDOM_CONFIG_MUTATIONS: usize = 10;

/// Sizes that must be refused wherever the key appears (text or vision config).
fn refused_values() -> Vec<(&'static str, Vec<Value>)> {
    let huge = json!(1u64 << 40);
    vec![
        ("patch_size", vec![json!(0)]),
        ("num_attention_heads", vec![json!(0), json!(3)]),
        ("num_heads", vec![json!(0), json!(3)]),
        ("num_key_value_heads", vec![json!(0), json!(3)]),
        ("hidden_size", vec![huge.clone(), json!(0)]),
        ("embed_dim", vec![json!(0)]),
        ("vocab_size", vec![huge.clone(), json!(0)]),
        ("intermediate_size", vec![huge.clone()]),
        ("head_dim", vec![json!(1u64 << 31), json!(0)]),
        ("rope_theta", vec![json!(0.0), json!(-1.0)]),
        ("num_hidden_layers", vec![huge.clone()]),
        ("depth", vec![huge.clone()]),
        ("image_size", vec![json!(0)]),
        ("spatial_merge_size", vec![json!(0)]),
        ("temporal_patch_size", vec![json!(0)]),
        // 1 is in the vocabulary but is not the tokenizer's image placeholder.
        ("image_token_index", vec![huge.clone(), json!(1)]),
        ("image_token_id", vec![huge, json!(1)]),
    ]
}

fn generate(model: &Path) -> Vec<std::ffi::OsString> {
    let image = root().join("tests/fixtures/data/images/chelsea.jpg");
    args!["generate", "--model", model, "--image", image, "--prompt", "What is this?", "--max-new-tokens", "1"]
}

/// The families' model directories: LLaVA made here by `vsft init`, the others from fixtures.
fn bases() -> Vec<(&'static str, PathBuf)> {
    let f = root().join("tests/fixtures");
    vec![
        ("llava", tiny_llava()),
        ("llava_next", f.join("llava_next/model/legacy")),
        ("qwen2_vl", f.join("qwen_vl/model/qwen2_vl/hub")),
        ("qwen2_5_vl", f.join("qwen_vl/model/qwen2_5_vl/hub")),
    ]
}

fn config_cases(dir: &Path, family: &str, base: &Path, rng: &mut Rng) -> Vec<Case> {
    let config: Value = serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    let paths = number_paths(&config);
    let mut docs: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for (key, values) in refused_values() {
        // Legacy LLaVA-NeXT configs carry a top-level vocab_size that transformers ignores
        // (text_config's is the one used), so only the keys a model is built from count.
        let ignored = |p: &Vec<String>| p.len() == 1 && config.get("text_config").is_some_and(|t| t.get(&p[0]).is_some());
        for path in paths.iter().filter(|p| p.last().is_some_and(|k| k == key) && !ignored(p)) {
            for v in &values {
                docs.push((format!("{} = {v}", path.join(".")), with_value(&config, path, v.clone()).to_string().into_bytes(), false));
            }
        }
    }
    let wild = [json!(0), json!(-1), json!(1), json!(3), json!(1u64 << 40), json!(1e300), json!("x"), Value::Null, json!([])];
    for _ in 0..RANDOM_CONFIG_MUTATIONS {
        let path = rng.pick(&paths);
        let v = rng.pick(&wild).clone();
        docs.push((format!("random: {} = {v}", path.join(".")), with_value(&config, path, v).to_string().into_bytes(), true));
    }
    let text = config.to_string().into_bytes();
    docs.push(("truncated".into(), text[..text.len() / 2].to_vec(), false));
    docs.push(("not JSON".into(), b"\x00\x01garbage".to_vec(), false));
    docs.push(("a list".into(), b"[]".to_vec(), false));
    docs.push(("an unknown model_type".into(), with_value(&config, &["model_type".into()], json!("alien")).to_string().into_bytes(), false));

    let mut cases = Vec::new();
    for (k, (what, bytes, may_succeed)) in docs.into_iter().enumerate() {
        let d = linked_copy(base, &dir.join(format!("{family}-config{k}")));
        replace(&d.join("config.json"), bytes);
        let c = Case::new("model-dir", format!("{family} config.json: {what}"), generate(&d), "config.json");
        cases.push(if may_succeed { c.may_succeed() } else { c });
    }
    let d = linked_copy(base, &dir.join(format!("{family}-config-zero")));
    endless(&d.join("config.json"));
    cases.push(Case::new("model-dir", format!("{family} config.json: /dev/zero"), generate(&d), "config.json"));
    cases
}

/// A safetensors file's parts: its header and the data after it.
fn split_safetensors(bytes: &[u8]) -> (Value, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), &bytes[8 + n..])
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_string().into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn safetensors_cases(dir: &Path, family: &str, base: &Path, rng: &mut Rng) -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(base).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    files.sort();
    let mut cases = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(file).unwrap();
        let (header, data) = split_safetensors(&bytes);
        let tensors: Vec<String> = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
        let tensor = rng.pick(&tensors).clone();
        let others: Vec<String> = tensors.iter().filter(|t| **t != tensor).cloned().collect();
        let other = rng.pick(&others).clone();
        // A dtype of another width than the stored one, so that the bytes cannot fit.
        let other_dtype = if header[&tensor]["dtype"] == "F32" { "F16" } else { "F32" };
        let off = |t: &str| header[t]["data_offsets"].clone();
        let mut lies: Vec<(String, Vec<u8>)> = Vec::new();
        for _ in 0..3 {
            let at = rng.below(bytes.len());
            lies.push((format!("truncated at {at} of {}", bytes.len()), bytes[..at].to_vec()));
        }
        for len in [u64::MAX, bytes.len() as u64, 0, 7] {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&len.to_le_bytes());
            lies.push((format!("header length {len}"), b));
        }
        let end = data.len() as u64;
        lies.push((format!("{tensor} ends past the file"), join_safetensors(&with_value(&header, &[tensor.clone(), "data_offsets".into()], json!([0, end + 4096])), data)));
        lies.push((format!("{tensor} offsets reversed"), join_safetensors(&with_value(&header, &[tensor.clone(), "data_offsets".into()], json!([8, 0])), data)));
        lies.push((format!("{tensor} overlaps {other}"), join_safetensors(&with_value(&header, &[tensor.clone(), "data_offsets".into()], off(&other)), data)));
        lies.push((format!("{tensor} dtype {other_dtype}"), join_safetensors(&with_value(&header, &[tensor.clone(), "dtype".into()], json!(other_dtype)), data)));
        lies.push((format!("{tensor} dtype unknown"), join_safetensors(&with_value(&header, &[tensor.clone(), "dtype".into()], json!("Q7")), data)));
        lies.push((format!("{tensor} shape huge"), join_safetensors(&with_value(&header, &[tensor.clone(), "shape".into()], json!([1u64 << 40, 1u64 << 40])), data)));
        lies.push((format!("{tensor} shape transposed"), join_safetensors(&with_value(&header, &[tensor.clone(), "shape".into()], json!([3, 5])), data)));
        let header_text = header.to_string().into_bytes();
        let mut garbage = bytes.clone();
        garbage[8..8 + header_text.len().min(64)].fill(b'#');
        lies.push(("header JSON garbage".into(), garbage));
        for (k, (what, b)) in lies.into_iter().enumerate() {
            let d = linked_copy(base, &dir.join(format!("{family}-{name}-st{k}")));
            replace(&d.join(&name), b);
            cases.push(Case::new("model-dir", format!("{family} {name}: {what}"), generate(&d), name.clone()));
        }
    }
    let index = base.join("model.safetensors.index.json");
    if index.exists() {
        let idx: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let tensor = idx["weight_map"].as_object().unwrap().keys().next().unwrap().clone();
        let docs = [
            ("a shard that does not exist", with_value(&idx, &["weight_map".into(), tensor.clone()], json!("model-99999-of-99999.safetensors")).to_string(), "model-99999-of-99999.safetensors".to_string()),

            ("a shard path leaving the directory", with_value(&idx, &["weight_map".into(), tensor.clone()], json!("../../../etc/passwd")).to_string(), "model.safetensors.index.json".to_string()),
            ("not JSON", "{\"weight_map\": ".to_string(), "model.safetensors.index.json".to_string()),
        ];
        for (k, (what, text, must_name)) in docs.into_iter().enumerate() {
            let d = linked_copy(base, &dir.join(format!("{family}-index{k}")));
            replace(&d.join("model.safetensors.index.json"), text);
            cases.push(Case::new("model-dir", format!("{family} index: {what}"), generate(&d), must_name));
        }
    }
    cases
}

/// Processor configs with sizes that cannot work, read by `vsft data inspect`.
fn processor_cases(dir: &Path) -> Vec<Case> {
    let f = root().join("tests/fixtures");
    let data = f.join("data/llava_instruct_mix");
    let llava: Vec<(&str, Value)> = vec![
        ("crop_size 0", json!({"crop_size": {"height": 0, "width": 0}})),
        ("shortest_edge 0", json!({"size": {"shortest_edge": 0}})),
        ("crop_size 100000", json!({"crop_size": {"height": 100000, "width": 100000}, "size": {"shortest_edge": 100000}})),
        ("two means", json!({"image_mean": [0.5, 0.5]})),
        ("std 0", json!({"image_std": [0.0, 0.0, 0.0]})),
        ("resample 99", json!({"resample": 99})),
    ];
    let next: Vec<(&str, Value)> = vec![
        ("no pinpoints", json!({"image_grid_pinpoints": []})),
        ("a zero pinpoint", json!({"image_grid_pinpoints": [[0, 0]]})),
        ("a huge pinpoint", json!({"image_grid_pinpoints": [[100000, 100000]]})),
        ("crop_size 0", json!({"crop_size": {"height": 0, "width": 0}})),
    ];
    let qwen: Vec<(&str, Value)> = vec![
        ("patch_size 0", json!({"patch_size": 0})),
        ("merge_size 0", json!({"merge_size": 0})),
        ("temporal_patch_size 0", json!({"temporal_patch_size": 0})),
        ("min_pixels above max_pixels", json!({"min_pixels": 1_000_000_000u64, "max_pixels": 3136})),
        ("max_pixels 2^40", json!({"max_pixels": 1u64 << 40})),
    ];
    let mut cases = Vec::new();
    for (family, base, edits) in [("llava", f.join("data/model"), llava), ("llava_next", f.join("llava_next/data/processor"), next), ("qwen", f.join("qwen_vl/data/processor"), qwen)] {
        let config: Value = serde_json::from_slice(&std::fs::read(base.join("preprocessor_config.json")).unwrap()).unwrap();
        for (k, (what, edit)) in edits.into_iter().enumerate() {
            let mut c = config.clone();
            for (key, v) in edit.as_object().unwrap() {
                c[key] = v.clone();
            }
            let d = linked_copy(&base, &dir.join(format!("{family}-proc{k}")));
            replace(&d.join("preprocessor_config.json"), c.to_string());
            cases.push(Case::new("model-dir", format!("{family} preprocessor_config.json: {what}"), args!["data", "inspect", "--model", &d, "--data", &data], "preprocessor_config.json"));
        }
        let d = linked_copy(&base, &dir.join(format!("{family}-proc-zero")));
        endless(&d.join("preprocessor_config.json"));
        cases.push(Case::new("model-dir", format!("{family} preprocessor_config.json: /dev/zero"), args!["data", "inspect", "--model", &d, "--data", &data], "preprocessor_config.json"));
    }
    cases
}

pub fn cases() -> Vec<Case> {
    let dir = scratch("model_dir");
    let mut rng = Rng::new(1300);
    let mut cases = Vec::new();
    for (family, base) in bases() {
        cases.extend(config_cases(&dir, family, &base, &mut rng));
        cases.extend(safetensors_cases(&dir, family, &base, &mut rng));
    }
    cases.extend(processor_cases(&dir));
    cases
}
