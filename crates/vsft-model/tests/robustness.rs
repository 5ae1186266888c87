//! Broken model directories: every mutation of a tiny model's config.json, safetensors files or
//! shard index ends in an error that names the file (and the key or tensor), never in a panic or
//! an allocation sized by the broken number (sizes that cannot fit are refused by the estimate,
//! before anything is allocated; a 2^40 allocation would abort this test process).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use serde_json::{json, Value};
use vsft_model::lora::LoraConfig;
use vsft_model::weights::{read_tensor_file, write_safetensors, PendingTensor, StoredDtype};
use vsft_model::{Family, VlmModel};

type Cpu = Flex;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny checkpoint of each family, in the Hub's layout.
fn family_dirs() -> Vec<PathBuf> {
    ["tests/fixtures/model/tiny-llava-gqa/legacy", "tests/fixtures/llava_next/model/legacy", "tests/fixtures/qwen_vl/model/qwen2_vl/hub", "tests/fixtures/qwen_vl/model/qwen2_5_vl/hub"]
        .iter()
        .map(|d| root().join(d))
        .collect()
}

/// A fresh directory for one case.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vsft-model-robustness-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `dir` with `src`'s weights linked in and `config` as its config.json.
fn model_dir(name: &str, src: &Path, config: &[u8]) -> PathBuf {
    let dir = scratch(name);
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if file.contains("safetensors") {
            std::os::unix::fs::symlink(&path, dir.join(&file)).unwrap();
        }
    }
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir
}

/// Loads `dir`, turning a panic into a test failure that says which case it was.
fn load(dir: &Path, case: &str) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| VlmModel::<Cpu>::load(dir, &Default::default()))) {
        Ok(result) => result.map(|_| ()).map_err(|e| e.to_string()),
        Err(_) => panic!("{case}: loading panicked"),
    }
}

fn load_err(dir: &Path, case: &str) -> String {
    load(dir, case).err().unwrap_or_else(|| panic!("{case}: loaded without an error"))
}

/// splitmix64: the seeded choices of the mutation generators.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Sets `pointer` (`/text_config/hidden_size`) in `config`, creating the last key.
fn set(config: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = if parent.is_empty() { &mut *config } else { config.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}")) };
    parent.as_object_mut().unwrap().insert(key.to_string(), value);
}

/// The integer-sized keys of each family's config (JSON pointers), as its file spells them.
fn integer_keys(family: Family) -> Vec<&'static str> {
    let llava_text = ["/text_config/vocab_size", "/text_config/hidden_size", "/text_config/intermediate_size", "/text_config/num_hidden_layers", "/text_config/num_attention_heads", "/text_config/num_key_value_heads", "/text_config/head_dim"];
    let clip = ["/vision_config/hidden_size", "/vision_config/intermediate_size", "/vision_config/num_hidden_layers", "/vision_config/num_attention_heads", "/vision_config/num_channels", "/vision_config/image_size", "/vision_config/patch_size", "/image_token_index", "/vision_feature_layer"];
    let qwen_text = ["/vocab_size", "/hidden_size", "/intermediate_size", "/num_hidden_layers", "/num_attention_heads", "/num_key_value_heads", "/image_token_id"];
    let qwen_vision = ["/vision_config/depth", "/vision_config/num_heads", "/vision_config/patch_size", "/vision_config/spatial_merge_size", "/vision_config/temporal_patch_size", "/vision_config/in_channels"];
    match family {
        Family::Llava | Family::LlavaNext => llava_text.iter().chain(&clip).copied().collect(),
        Family::Qwen2Vl => qwen_text.iter().chain(&qwen_vision).chain(&["/vision_config/embed_dim", "/vision_config/mlp_ratio"]).copied().collect(),
        Family::Qwen25Vl => qwen_text
            .iter()
            .chain(&qwen_vision)
            .chain(&["/vision_config/hidden_size", "/vision_config/intermediate_size", "/vision_config/out_hidden_size"])
            .copied()
            .collect(),
    }
}

fn number_keys(family: Family) -> Vec<&'static str> {
    match family {
        Family::Llava | Family::LlavaNext => vec!["/text_config/rms_norm_eps", "/vision_config/layer_norm_eps"],
        Family::Qwen2Vl | Family::Qwen25Vl => vec!["/rms_norm_eps", "/rope_theta"],
    }
}

/// Values no integer size may take: zero, negative, fractional, text, and 2^40 (which either
/// breaks a divisibility or range rule or makes a model that cannot fit in memory).
fn bad_integers() -> Vec<Value> {
    vec![json!(0), json!(-1), json!(1.5), json!("8"), json!(1u64 << 40)]
}

fn bad_numbers() -> Vec<Value> {
    vec![json!(0.0), json!(-1e-6), json!(-1), json!("1e-6")]
}

/// The key as an error names it: dotted, relative to where the family's file keeps it.
fn dotted(pointer: &str) -> String {
    pointer.trim_start_matches('/').replace('/', ".")
}

#[test]
fn every_bad_config_value_is_an_error_naming_the_file_and_key() {
    let mut rng = Rng(13);
    let mut cases = 0;
    for src in family_dirs() {
        let config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
        let family = Family::from_config(&config).unwrap();
        let keys: Vec<(&str, Vec<Value>)> = integer_keys(family)
            .into_iter()
            .map(|k| (k, bad_integers()))
            .chain(number_keys(family).into_iter().map(|k| (k, bad_numbers())))
            .collect();
        for (key, values) in keys {
            // Every key with two seeded bad values, so each value class is covered per family.
            for _ in 0..2 {
                let value = values[rng.below(values.len())].clone();
                let mut broken = config.clone();
                set(&mut broken, key, value.clone());
                let case = format!("{} {key} = {value}", family.model_type());
                let dir = model_dir(&format!("config-{cases}"), &src, &serde_json::to_vec(&broken).unwrap());
                let err = load_err(&dir, &case);
                assert!(err.contains(&dir.join("config.json").display().to_string()), "{case}: {err}");
                // 2^40 may break a rule of another key first (a head size that mrope_section no
                // longer halves): that key is named then.
                let huge = value == json!(1u64 << 40) && err.contains("`");
                let named = err.contains(&dotted(key)) || err.contains("does not fit in memory") || huge;
                assert!(named, "{case}: the error names neither the key nor the memory it needs: {err}");
                cases += 1;
            }
        }
    }
    assert!(cases > 100, "{cases} cases");
}

#[test]
fn inconsistent_sizes_name_both_keys() {
    let src = &family_dirs()[0];
    let config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    for (pointer, value, want) in [
        ("/text_config/num_key_value_heads", json!(4), "`text_config.num_key_value_heads` must divide `text_config.num_attention_heads` (6), found 4"),
        ("/text_config/head_dim", json!(7), "`text_config.head_dim` must be even"),
        ("/vision_config/num_attention_heads", json!(5), "`vision_config.num_attention_heads` must divide `vision_config.hidden_size` (48), found 5"),
        ("/vision_config/patch_size", json!(0), "`vision_config.patch_size` must be a positive integer, found 0"),
        ("/vision_feature_layer", json!(7), "`vision_feature_layer` must lie in -3..=2"),
        ("/vision_feature_layer", json!([]), "`vision_feature_layer` must name at least one layer"),
        ("/image_token_index", json!(320), "`image_token_index` must be a token id in 0..320"),
        ("/text_config/rms_norm_eps", json!(0.0), "`text_config.rms_norm_eps` must be a finite number > 0, found 0"),
        ("/text_config/rope_parameters/rope_theta", json!(-5.0), "`text_config.rope_parameters.rope_theta` must be a finite number > 0"),
        ("/text_config/hidden_size", json!(-96), "`text_config.hidden_size`: invalid value: integer `-96`"),
    ] {
        let mut broken = config.clone();
        set(&mut broken, pointer, value);
        let dir = model_dir("inconsistent", src, &serde_json::to_vec(&broken).unwrap());
        let err = load_err(&dir, pointer);
        assert!(err.contains(want), "{pointer}: {err}");
    }
    // Qwen2.5-VL's vision keys and flat text keys.
    let src = &family_dirs()[3];
    let config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    for (pointer, value, want) in [
        ("/vision_config/fullatt_block_indexes", json!([0, 9]), "`vision_config.fullatt_block_indexes` must lie in 0..2"),
        ("/vision_config/window_size", json!(20), "`vision_config.window_size` must be at least"),
        ("/rope_scaling/mrope_section", json!([1, 1, 1]), "`rope_scaling.mrope_section` must be non-negative integers summing to head_dim / 2 = 4"),
        ("/rope_scaling/mrope_section", json!([-1, 3, 2]), "`rope_scaling.mrope_section` must be"),
        ("/vision_config/out_hidden_size", json!(24), "`vision_config.out_hidden_size` (the merger's output) must equal `hidden_size` (16), found 24"),
        ("/num_key_value_heads", json!(0), "`num_key_value_heads` must be a positive integer, found 0"),
        ("/video_token_id", json!(-3), "`video_token_id` must be a token id"),
    ] {
        let mut broken = config.clone();
        set(&mut broken, pointer, value);
        let dir = model_dir("inconsistent-qwen", src, &serde_json::to_vec(&broken).unwrap());
        let err = load_err(&dir, pointer);
        assert!(err.contains(want), "{pointer}: {err}");
    }
}

#[test]
fn sizes_that_cannot_fit_are_refused_before_allocation_saying_how_much() {
    let src = &family_dirs()[0];
    let config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    for (pointer, value, want) in [
        ("/text_config/vocab_size", json!(1u64 << 40), "GiB at 4 bytes each, more than the"),
        ("/text_config/intermediate_size", json!(1u64 << 40), "GiB at 4 bytes each"),
        ("/text_config/head_dim", json!(1u64 << 31), "GiB at 4 bytes each"),
        ("/text_config/num_hidden_layers", json!(u64::MAX), "more than 2^64 bytes"),
        ("/vision_config/image_size", json!(1u64 << 40), "does not fit in memory"),
    ] {
        let mut broken = config.clone();
        set(&mut broken, pointer, value.clone());
        let dir = model_dir("huge", src, &serde_json::to_vec(&broken).unwrap());
        let err = load_err(&dir, pointer);
        assert!(err.contains("config.json: the model described here does not fit in memory") && err.contains(want), "{pointer}: {err}");
        // `vsft init`'s path estimates too.
        let err = catch_unwind(|| VlmModel::<Cpu>::random_from_config(&broken, 0, &Default::default()).err()).unwrap().expect("refused");
        assert!(err.contains("does not fit in memory"), "{pointer} random: {err}");
    }
}

#[test]
fn the_estimate_is_the_models_parameter_count() {
    for name in ["tiny-llava-gqa", "tiny-llava-mha", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2_5-vl", "demo-tiny-llava"] {
        let config: Value = serde_json::from_slice(&std::fs::read(root().join(format!("configs/{name}.json"))).unwrap()).unwrap();
        let estimate = match Family::from_config(&config).unwrap() {
            Family::Llava => vsft_model::config::from_json::<vsft_model::LlavaConfig>(config.clone()).unwrap().parameter_count(),
            Family::LlavaNext => vsft_model::LlavaNextConfig::from_value(config.clone()).unwrap().parameter_count(),
            Family::Qwen2Vl | Family::Qwen25Vl => vsft_model::Qwen2VlConfig::from_value(config.clone()).unwrap().parameter_count(),
        };
        let model = VlmModel::<Cpu>::random_from_config(&config, 0, &Default::default()).unwrap();
        let actual: usize = model.named_tensors().iter().map(|(_, _, t)| t.shape.iter().product::<usize>()).sum();
        assert_eq!(estimate.0, Some(actual as u64), "{name}");
    }
}

#[test]
fn unreadable_json_files_end_with_an_error_naming_them() {
    let src = &family_dirs()[0];
    let cases: [(&str, &[u8]); 4] = [
        ("nan", br#"{"model_type": "llava", "text_config": {"rms_norm_eps": NaN}}"#),
        ("garbage", b"\x00\xff{{{"),
        ("array", b"[1, 2]"),
        ("empty", b""),
    ];
    for (name, text) in cases {
        let dir = model_dir(name, src, text);
        let err = load_err(&dir, name);
        assert!(err.contains("config.json"), "{name}: {err}");
    }
    // /dev/zero never ends: the read stops at the bound.
    for file in ["config.json", "model.safetensors.index.json"] {
        let dir = model_dir("dev-zero", src, &std::fs::read(src.join("config.json")).unwrap());
        let _ = std::fs::remove_file(dir.join(file));
        std::os::unix::fs::symlink("/dev/zero", dir.join(file)).unwrap();
        let err = load_err(&dir, file);
        assert!(err.contains(file) && err.contains("more than 16 MiB"), "{file}: {err}");
    }
}

/// The header of a safetensors file as JSON, and its data.
fn split(bytes: &[u8]) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

fn join(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// A model directory whose model.safetensors is `bytes`.
fn with_weights(name: &str, bytes: &[u8]) -> PathBuf {
    let src = &family_dirs()[0];
    let dir = scratch(name);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir
}

#[test]
fn lying_safetensors_headers_are_refused_naming_the_file_and_tensor() {
    let original = std::fs::read(family_dirs()[0].join("model.safetensors")).unwrap();
    let (header, data) = split(&original);
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort_by_key(|k| header[*k]["data_offsets"][0].as_u64());
    let (first, second) = (names[0].clone(), names[1].clone());
    let edit = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut h = header.clone();
        f(&mut h);
        join(&h, &data)
    };
    let len_prefix = |n: u64| [n.to_le_bytes().as_slice(), &original[8..]].concat();
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("short", original[..5].to_vec(), "truncated: 5 bytes".into()),
        ("header-past-end", len_prefix(original.len() as u64), "truncated: the header needs".into()),
        ("header-over-limit", len_prefix(200_000_000), "exceeds the format's limit".into()),
        ("truncated", original[..original.len() - 100].to_vec(), format!("truncated: the header's tensors need a file of {} bytes, the file has {}", original.len(), original.len() - 100)),
        ("trailing", [original.as_slice(), &[0u8; 16]].concat(), "16 bytes after the last tensor".into()),
        ("overlap", edit(&|h| h[&second]["data_offsets"] = h[&first]["data_offsets"].clone()), "overlap".into()),
        ("out-of-file", edit(&|h| h[&first]["data_offsets"] = json!([1u64 << 50, (1u64 << 50) + 4])), format!("tensor {first}: data_offsets")),
        ("offsets-overflow", edit(&|h| h[&first]["data_offsets"] = json!([u64::MAX - 1, u64::MAX])), format!("tensor {first}")),
        ("shape-mismatch", edit(&|h| h[&first]["shape"] = json!([1])), format!("tensor {first}: data_offsets")),
        ("shape-overflow", edit(&|h| h[&first]["shape"] = json!([1u64 << 32, 1u64 << 32, 1u64 << 32])), "more than 2^64 bytes".into()),
        ("negative-dim", edit(&|h| h[&first]["shape"] = json!([-1, 4])), "non-negative integers".into()),
        ("dtype", edit(&|h| h[&first]["dtype"] = json!("F8_E4M3")), format!("tensor {first}: unknown dtype F8_E4M3")),
        ("dtype-size", edit(&|h| h[&first]["dtype"] = json!("F16")), format!("tensor {first}: data_offsets")),
        ("not-json", { let mut b = original.clone(); b[8..20].copy_from_slice(b"not json at "); b }, "header is not a JSON object".into()),
    ];
    for (name, bytes, want) in cases {
        let dir = with_weights(name, &bytes);
        let path = dir.join("model.safetensors");
        let err = load_err(&dir, name);
        assert!(err.contains(&path.display().to_string()) && err.contains(&want), "{name}: {err}");
        assert!(!err.contains("{ ") && !err.contains("failed to fill"), "{name}: internals in {err}");
    }
}

#[test]
fn seeded_header_and_length_mutations_never_panic() {
    let original = std::fs::read(family_dirs()[0].join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let dir = scratch("seeded");
    let path = dir.join("model.safetensors");
    let mut rng = Rng(7);
    for case in 0..300 {
        let mut bytes = original.clone();
        match case % 3 {
            // Random bytes of the header (and its length) overwritten.
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(8 + header_len);
                    bytes[at] = rng.next() as u8;
                }
            }
            // Cut anywhere.
            _ => bytes.truncate(rng.below(original.len())),
        }
        std::fs::write(&path, &bytes).unwrap();
        match catch_unwind(|| read_tensor_file(&path)) {
            Err(_) => panic!("case {case}: panicked"),
            Ok(Err(e)) => assert!(e.to_string().contains(&path.display().to_string()), "case {case}: {e}"),
            // A mutation that left the header valid and describing the same bytes.
            Ok(Ok(tensors)) => assert!(tensors.values().all(|t| t.bytes.len() <= original.len())),
        }
    }
}

#[test]
fn a_checkpoint_that_does_not_match_its_config_names_the_tensor() {
    let src = &family_dirs()[0];
    let tensors = read_tensor_file(&src.join("model.safetensors")).unwrap();
    let (victim, _) = tensors.iter().find(|(_, t)| t.shape.len() == 2 && t.shape[0] != t.shape[1]).unwrap();
    let values: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, t)| {
            let mut shape = t.shape.clone();
            if n == victim {
                shape.reverse();
            }
            (n.clone(), shape, t.to_f32().unwrap())
        })
        .collect();
    let dir = scratch("mismatch");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let pending = values.iter().map(|(n, s, v)| PendingTensor { name: n.clone(), shape: s.clone(), values: Box::new(move || v.clone()) }).collect();
    write_safetensors(&dir.join("model.safetensors"), pending, StoredDtype::F32).unwrap();
    let err = load_err(&dir, "mismatch");
    assert!(err.contains(&format!("tensor {victim} has shape")), "{err}");

    // A config much larger than its checkpoint: every tensor mismatches, nothing is allocated for them.
    let mut config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    set(&mut config, "/text_config/num_hidden_layers", json!(2000));
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let err = load_err(&dir, "larger config");
    assert!(err.contains("missing tensor language_model.model.layers.1999.self_attn.q_proj.weight"), "{err}");
}

#[test]
fn a_shard_index_that_lies_names_the_index_and_tensor() {
    let src = root().join("tests/fixtures/model/tiny-llava-gqa/sharded");
    let index: Value = serde_json::from_slice(&std::fs::read(src.join("model.safetensors.index.json")).unwrap()).unwrap();
    let (tensor, shard) = index["weight_map"].as_object().unwrap().iter().next().map(|(t, s)| (t.clone(), s.clone())).unwrap();
    for (name, key, value, want) in [
        ("missing-shard", tensor.clone(), json!("model-00009-of-00009.safetensors"), format!("weight_map places tensor {tensor} in model-00009-of-00009.safetensors, which does not exist")),
        ("absent-tensor", "language_model.model.extra.weight".to_string(), shard.clone(), format!("weight_map places tensor language_model.model.extra.weight in {}, which does not hold it", shard.as_str().unwrap())),
        ("escaping-shard", tensor.clone(), json!("../legacy/model.safetensors"), "is not a file name in the checkpoint's directory".to_string()),
        ("not-a-name", tensor.clone(), json!(5), "is not a file name".to_string()),
    ] {
        let dir = model_dir(name, &src, &std::fs::read(src.join("config.json")).unwrap());
        let mut broken = index.clone();
        broken["weight_map"][&key] = value;
        let index_path = dir.join("model.safetensors.index.json");
        std::fs::remove_file(&index_path).unwrap();
        std::fs::write(&index_path, serde_json::to_vec(&broken).unwrap()).unwrap();
        let err = load_err(&dir, name);
        assert!(err.contains(&index_path.display().to_string()) && err.contains(&want), "{name}: {err}");
    }
}

#[test]
fn lora_sizes_are_checked_before_the_adapters_exist() {
    let mut model = VlmModel::<Cpu>::load(&family_dirs()[0], &Default::default()).unwrap();
    let huge = LoraConfig { r: 1_000_000_000, ..LoraConfig::default() };
    let err = catch_unwind(AssertUnwindSafe(|| model.add_lora(&huge, 0))).expect("no panic").unwrap_err().to_string();
    assert!(err.contains("lora.r = 1000000000: adapters on 14 linear layers") && err.contains("do not fit in memory") && err.contains("GiB"), "{err}");
    for (cfg, want) in [
        (LoraConfig { r: 0, ..LoraConfig::default() }, "`lora.r` must be a positive integer, found 0"),
        (LoraConfig { dropout: f64::NAN, ..LoraConfig::default() }, "`lora.dropout` must be a probability in [0, 1), found NaN"),
        (LoraConfig { dropout: 1.0, ..LoraConfig::default() }, "`lora.dropout` must be a probability"),
    ] {
        let err = catch_unwind(AssertUnwindSafe(|| model.add_lora(&cfg, 0))).expect("no panic").unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    // PEFT's adapter_config.json is held to the same rules, under PEFT's key names.
    let err = LoraConfig::from_peft_json(&json!({"r": 0, "lora_alpha": 16})).unwrap_err();
    assert!(err.contains("`r` must be a positive integer"), "{err}");
    let err = LoraConfig::from_peft_json(&json!({"r": 8, "lora_dropout": 2.5})).unwrap_err();
    assert!(err.contains("`lora_dropout` must be a probability in [0, 1), found 2.5"), "{err}");
}
