//! LLaVA-NeXT against transformers 5.24 (fixtures from scripts/make_llava_next_model_fixtures.py):
//! a tiny random model with a Mistral decoder (GQA), real photographs tiled at 56-px tiles,
//! a two-image row. Logits in the three key layouts, the loss, the packed image features, the
//! projector and `image_newline` gradients, the vision tower's gradients when it trains, the
//! sliding window, greedy generation through the model's own processor and template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use vsft_model::generate::GenerateOptions;
use vsft_model::loss::causal_lm_loss;
use vsft_model::weights::{read_tensor_file, RawTensor};
use vsft_model::{HfImages, StoredDtype, VlmModel};

type Cpu = Flex;
type Train = common::Train;

mod common;
use common::{max_abs_diff, param_grads, rel_diff, values};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava_next/model")
}

fn tensors(file: &str) -> BTreeMap<String, RawTensor> {
    read_tensor_file(&fixture().join(file)).expect("fixture (run scripts/make_llava_next_model_fixtures.py)")
}

struct Inputs<B: Backend> {
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
    labels: Tensor<B, 2, Int>,
    images: HfImages,
    seq: usize,
}

fn inputs<B: Backend>(model: &VlmModel<B>, t: &BTreeMap<String, RawTensor>) -> Inputs<B> {
    let dev = Default::default();
    let ids = &t["input_ids"];
    let shape = [ids.shape[0], ids.shape[1]];
    let int = |k: &str| Tensor::<B, 2, Int>::from_data(TensorData::new(t[k].to_i64().unwrap(), shape), &dev);
    let images = model.images_from_hf(&t["pixel_values"], Some(&t["image_sizes"])).unwrap();
    Inputs { ids: int("input_ids"), mask: int("attention_mask"), labels: int("labels"), images, seq: shape[1] }
}

/// Logits `[batch·seq, vocab]` rows at the fixture's (row, position) pairs.
fn logits_at(logits: &[f32], positions: &RawTensor, seq: usize, vocab: usize) -> Vec<f32> {
    positions
        .to_i64()
        .unwrap()
        .chunks(2)
        .flat_map(|p| {
            let row = p[0] as usize * seq + p[1] as usize;
            logits[row * vocab..(row + 1) * vocab].to_vec()
        })
        .collect()
}

fn check_logits(model: &VlmModel<Cpu>, r: &BTreeMap<String, RawTensor>, key: &str, what: &str) -> f32 {
    let x = inputs(model, &tensors("inputs.safetensors"));
    let logits = model.as_dyn().forward(x.ids, x.mask, Some(&x.images.inputs())).unwrap();
    let vocab = logits.dims()[2];
    let got = logits_at(&values(logits), &r[&format!("{key}logits_positions")], x.seq, vocab);
    let d = max_abs_diff(&got, &r[&format!("{key}logits")].to_f32().unwrap());
    println!("{what}: logits max abs diff {d:.2e}");
    assert!(d <= 1e-4, "{what}: logits differ by {d}");
    d
}

#[test]
fn logits_match_transformers_in_every_key_layout() {
    let r = tensors("reference.safetensors");
    for layout in ["legacy", "v452", "v5"] {
        let model = VlmModel::<Cpu>::load(&fixture().join(layout), &Default::default()).unwrap();
        assert_eq!(model.family(), vsft_model::Family::LlavaNext);
        check_logits(&model, &r, "", layout);
    }
}

#[test]
fn packed_image_features_and_loss_match_transformers() {
    let r = tensors("reference.safetensors");
    let model = VlmModel::<Cpu>::load(&fixture().join("legacy"), &Default::default()).unwrap();
    let x = inputs(&model, &tensors("inputs.safetensors"));
    assert_eq!(x.images.infos.iter().map(|i| i.units).collect::<Vec<_>>(), vec![4, 5, 4], "tiles per image");
    let feats = model.as_dyn().image_features(&x.images.inputs()).unwrap();
    let want = &r["image_features"];
    assert_eq!(feats.dims().to_vec(), want.shape, "packed feature rows (unpadding, newlines)");
    let d = rel_diff(&values(feats.clone()), &want.to_f32().unwrap());
    println!("packed image features rel diff {d:.2e}");
    assert!(d <= 1e-5, "packed image features differ by {d}");
    let labels = x.labels.to_data().convert::<i64>().into_vec::<i64>().unwrap();
    let loss = model.as_dyn().loss_with_features(x.ids, x.mask, Some(feats), &labels, &Default::default()).unwrap();
    let sum = values(loss.sum.clone())[0] as f64;
    let want_sum = r["loss_sum"].to_f32().unwrap()[0] as f64;
    let want_mean = r["loss"].to_f32().unwrap()[0] as f64;
    assert_eq!(loss.label_tokens as i64, r["label_tokens"].to_i64().unwrap()[0]);
    let rel = (sum / loss.label_tokens as f64 - want_mean).abs() / want_mean;
    println!("loss {:.6} vs {want_mean:.6}: rel {rel:.2e}; sum rel {:.2e}", sum / loss.label_tokens as f64, (sum - want_sum).abs() / want_sum);
    assert!(rel <= 1e-5, "mean loss differs: {rel}");
}

/// Stage 1's gradients (projector and `image_newline`, tower frozen on the inner backend), then
/// with the tower trainable: every tower tensor's gradient, and none where transformers has none.
#[test]
fn gradients_match_torch_autograd_with_the_tower_frozen_and_trained() {
    let r = tensors("reference.safetensors");
    let model = VlmModel::<Train>::load(&fixture().join("legacy"), &Default::default()).unwrap();
    for (tower_trains, prefix) in [(false, "grad."), (true, "grad_vt.")] {
        let x = inputs(&model, &tensors("inputs.safetensors"));
        let feats = model.image_features_for_training(&x.images.inputs(), tower_trains).unwrap();
        let logits = model.as_dyn().forward_with_features(x.ids, x.mask, Some(feats), &Default::default()).unwrap();
        let grads = causal_lm_loss(logits, x.labels).mean().backward();
        let mut checked = 0;
        let mut worst = (0f32, String::new());
        for (name, got) in param_grads(&model, &grads) {
            let Some(want) = r.get(&format!("{prefix}{name}")) else {
                assert!(tower_trains || !name.starts_with("vision_tower.") || got.is_none(), "{name}: the frozen tower built a graph");
                continue;
            };
            let want = want.to_f32().unwrap();
            if want.iter().all(|&v| v == 0.0) {
                // Layers above the selected hidden state get no gradient in torch either.
                assert!(got.is_none_or(|g| g.iter().all(|&v| v == 0.0)), "{name}: torch has no gradient, vsft has one");
                continue;
            }
            let got = got.unwrap_or_else(|| panic!("{name}: no gradient"));
            if name.ends_with("k_proj.bias") {
                // Adding the same vector to every key shifts a query's scores by a constant,
                // which softmax ignores: this gradient is zero up to rounding on both sides.
                let noise = max_abs_diff(&got, &want);
                assert!(noise <= 1e-5, "{name}: a gradient that should vanish is {noise}");
                continue;
            }
            let d = rel_diff(&got, &want);
            assert!(d <= 1e-4, "{prefix}{name}: gradient differs by {d}");
            if d > worst.0 {
                worst = (d, name.clone());
            }
            checked += 1;
        }
        println!("{prefix}: {checked} gradients match, worst rel diff {:.2e} ({})", worst.0, worst.1);
        assert!(checked >= if tower_trains { 5 + 20 } else { 5 }, "{prefix}: only {checked} gradients compared");
    }
}

#[test]
fn mistral_sliding_window_masks_as_transformers_does() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("llava-next-window8");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture().join("legacy")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    std::fs::copy(fixture().join("sliding_window8/config.json"), dir.join("config.json")).unwrap();
    let model = VlmModel::<Cpu>::load(&dir, &Default::default()).unwrap();
    assert_eq!(model.language_model().model.sliding_window, Some(8));
    check_logits(&model, &tensors("reference.safetensors"), "sliding_window8.", "sliding window 8");
    // An absent key means 4096, as LlavaNextConfig resolves it; null means none.
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("legacy/config.json")).unwrap()).unwrap();
    let legacy: vsft_model::LlavaNextConfig = serde_json::from_value(cfg.clone()).unwrap();
    assert_eq!(legacy.base.text_config.sliding_window(), None, "null: no window");
    cfg["text_config"].as_object_mut().unwrap().remove("sliding_window");
    let absent: vsft_model::LlavaNextConfig = serde_json::from_value(cfg).unwrap();
    assert_eq!(absent.base.text_config.sliding_window().map(|w| w as u64), reference["absent_sliding_window_resolves_to"].as_u64());
}

/// The blog's example on a tiny model in llava-v1.6-mistral-7b-hf's file layout: the prompt
/// through the model's chat template and processor, then greedy tokens with the KV cache.
#[test]
fn greedy_generation_matches_transformers_from_the_image_file() {
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("generate.json")).unwrap()).unwrap();
    let dir = fixture().join("legacy");
    let model = VlmModel::<Cpu>::load(&dir, &Default::default()).unwrap();
    let processor = vsft_data::Processor::from_model_dir(&dir, None).unwrap();
    let bytes = std::fs::read(fixture().join(want["image"].as_str().unwrap())).unwrap();
    let image = vsft_data::image_proc::decode_image(&bytes).unwrap();
    let messages = [vsft_data::Message::new("user", vec![vsft_data::Content::image(0), vsft_data::Content::text("What is shown in this image?")])];
    let (ids, images) = processor.encode_prompt_with_images(&messages, &[image]).unwrap();
    let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
    let prompt: Vec<i64> = want["prompt"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(ids, prompt, "prompt ids (template, BOS, image tokens) differ from the processor's");
    let infos: Vec<vsft_model::ImageInfo> = images.meta.iter().map(|m| vsft_model::ImageInfo { original_hw: m.original_hw, units: m.units, grid: m.grid }).collect();
    let inputs = vsft_model::ImageInputs { pixel_values: &images.pixel_values, shape: &images.shape, images: &infos };
    let opts = GenerateOptions { max_new_tokens: want["max_new_tokens"].as_u64().unwrap() as usize, eos_token_ids: vec![want["eos_token_id"].as_i64().unwrap()], ..Default::default() };
    let got = model.as_dyn().generate(&ids, Some(&inputs), &opts, &mut |_| true).unwrap();
    let expected: Vec<i64> = want["new_tokens"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(got, expected, "greedy tokens differ from transformers' generate");
}

/// Saved in the Hub's legacy layout, reloaded identical; bf16 frozen weights keep the
/// projector in f32.
#[test]
fn save_writes_the_legacy_layout_and_reloads_identically() {
    let dev = Default::default();
    let model = VlmModel::<Cpu>::load(&fixture().join("v5"), &dev).unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("llava-next-roundtrip");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    model.save(&out, StoredDtype::F32, u64::MAX).unwrap();
    let header = read_tensor_file(&out.join("model.safetensors")).unwrap();
    let legacy = read_tensor_file(&fixture().join("legacy/model-00002-of-00002.safetensors")).unwrap();
    for k in legacy.keys() {
        assert!(header.contains_key(k), "{k} missing from the saved legacy layout");
    }
    assert!(header.contains_key("image_newline"));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlavaNextForConditionalGeneration");
    assert_eq!(cfg["model_type"], "llava_next");
    let again = VlmModel::<Cpu>::load(&out, &dev).unwrap();
    for ((na, _, ta), (nb, _, tb)) in model.named_tensors().iter().zip(&again.named_tensors()) {
        assert_eq!(na, nb);
        assert_eq!(values(ta.flat.clone()), values(tb.flat.clone()), "{na}");
    }
}

/// The Hub's partial config of llava-v1.6-mistral-7b-hf (configs/llava-v1.6-mistral-7b.json)
/// resolves to what LlavaNextConfig makes of it: Mistral's own defaults, not Llama's.
#[test]
fn the_7b_hub_config_resolves_as_transformers_resolves_it() {
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap();
    let want = &reference["resolved_7b"];
    let cfg = vsft_model::LlavaNextConfig::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/llava-v1.6-mistral-7b.json")).unwrap();
    let t = &cfg.base.text_config;
    let got = serde_json::json!({
        "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_kv_heads(),
        "head_dim": t.head_dim(), "intermediate_size": t.intermediate_size, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta(), "sliding_window": t.sliding_window(),
        "vocab_size": t.vocab_size, "tie_word_embeddings": cfg.base.tie_word_embeddings(),
        "image_grid_pinpoints": cfg.image_grid_pinpoints, "vision_hidden_act": cfg.base.vision_config.hidden_act,
        "vision_image_size": cfg.base.vision_config.image_size, "image_token_id": cfg.base.image_token_index,
    });
    assert_eq!(&got, want);
}
