//! Qwen2-VL (untied) and Qwen2.5-VL (tied, windows that split the images) against transformers
//! 5.24 (fixtures from scripts/make_qwen_vl_model_fixtures.py): real photographs through the real
//! processor, a two-image row, right and left padding. Multimodal RoPE positions exactly, logits
//! in three key layouts, the loss, the merged image features, merger and tower gradients, and
//! greedy generation with the KV cache from the image file through the model's template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use vsft_model::generate::GenerateOptions;
use vsft_model::loss::causal_lm_loss;
use vsft_model::weights::{read_tensor_file, RawTensor};
use vsft_model::{Positions, VlmModel};

type Cpu = Flex;
type Train = common::Train;

mod common;
use common::{max_abs_diff, param_grads, rel_diff, values};

const MODELS: [&str; 2] = ["qwen2_vl", "qwen2_5_vl"];

fn fixture(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen_vl/model").join(model)
}

fn tensors(model: &str, file: &str) -> BTreeMap<String, RawTensor> {
    read_tensor_file(&fixture(model).join(file)).expect("fixture (run scripts/make_qwen_vl_model_fixtures.py)")
}

/// The batch (`prefix` "" or "left.") as tensors, with the model's images and positions.
struct Inputs<B: Backend> {
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
    labels: Vec<i64>,
    images: vsft_model::HfImages,
    positions: Positions,
    seq: usize,
}

fn inputs<B: Backend>(model: &VlmModel<B>, name: &str, prefix: &str) -> Inputs<B> {
    let t = tensors(name, "inputs.safetensors");
    let dev = Default::default();
    let ids = &t[&format!("{prefix}input_ids")];
    let shape = [ids.shape[0], ids.shape[1]];
    let host = |k: &str| t[&format!("{prefix}{k}")].to_i64().unwrap();
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), &dev);
    let images = model.images_from_hf(&t["pixel_values"], Some(&t["image_grid_thw"])).unwrap();
    let positions = model.as_dyn().positions(&host("input_ids"), &host("attention_mask"), shape[1], &images.infos).unwrap();
    Inputs { ids: int(host("input_ids")), mask: int(host("attention_mask")), labels: host("labels"), images, positions, seq: shape[1] }
}

#[test]
fn multimodal_positions_equal_get_rope_index_right_and_left_padded() {
    for name in MODELS {
        let model = VlmModel::<Cpu>::load(&fixture(name).join("hub"), &Default::default()).unwrap();
        let t = tensors(name, "inputs.safetensors");
        for prefix in ["", "left."] {
            let x = inputs(&model, name, prefix);
            let Positions::Multimodal(got) = &x.positions else { panic!("{name}: positions are not multimodal") };
            let want = t[&format!("{prefix}position_ids")].to_i64().unwrap(); // [3, batch, seq]
            let n = got.len();
            for (i, p) in got.iter().enumerate() {
                for c in 0..3 {
                    assert_eq!(p[c], want[c * n + i], "{name} {prefix}: token {i}, component {c}");
                }
            }
        }
    }
}

#[test]
fn logits_loss_and_features_match_transformers_in_every_layout() {
    for name in MODELS {
        let r = tensors(name, "reference.safetensors");
        let vocab_ids: Vec<i64> = r["logits_vocab_ids"].to_i64().unwrap();
        for layout in ["hub", "v452", "v5"] {
            let model = VlmModel::<Cpu>::load(&fixture(name).join(layout), &Default::default()).unwrap();
            for prefix in ["", "left."] {
                let x = inputs(&model, name, prefix);
                let m = model.as_dyn();
                let feats = m.image_features(&x.images.inputs()).unwrap();
                if prefix.is_empty() {
                    let d = rel_diff(&values(feats.clone()), &r["image_features"].to_f32().unwrap());
                    assert!(d <= 1e-5, "{name} {layout}: merged image features differ by {d}");
                }
                let logits = m.forward_with_features(x.ids.clone(), x.mask.clone(), Some(feats.clone()), &x.positions).unwrap();
                let v = logits.dims()[2];
                let all = values(logits);
                let got: Vec<f32> = r[&format!("{prefix}logits_positions")]
                    .to_i64()
                    .unwrap()
                    .chunks(2)
                    .flat_map(|p| {
                        let row = (p[0] as usize * x.seq + p[1] as usize) * v;
                        vocab_ids.iter().map(|&k| all[row + k as usize]).collect::<Vec<_>>()
                    })
                    .collect();
                let d = max_abs_diff(&got, &r[&format!("{prefix}logits")].to_f32().unwrap());
                let loss = m.loss_with_features(x.ids, x.mask, Some(feats), &x.labels, &x.positions).unwrap();
                let mean = values(loss.sum)[0] as f64 / loss.label_tokens as f64;
                let want = r[&format!("{prefix}loss")].to_f32().unwrap()[0] as f64;
                let rel = (mean - want).abs() / want;
                println!("{name} {layout} {prefix}: logits max abs diff {d:.2e}, loss rel {rel:.2e}");
                assert!(d <= 1e-4, "{name} {layout} {prefix}: logits differ by {d}");
                assert!(rel <= 1e-5, "{name} {layout} {prefix}: loss differs by {rel}");
            }
        }
    }
}

#[test]
fn merger_and_tower_gradients_match_torch_autograd() {
    for name in MODELS {
        let r = tensors(name, "reference.safetensors");
        let model = VlmModel::<Train>::load(&fixture(name).join("hub"), &Default::default()).unwrap();
        for (tower_trains, prefix) in [(false, "grad."), (true, "grad_vt.")] {
            let x = inputs(&model, name, "");
            let feats = model.image_features_for_training(&x.images.inputs(), tower_trains).unwrap();
            let logits = model.as_dyn().forward_with_features(x.ids, x.mask, Some(feats), &x.positions).unwrap();
            let (t, b) = (x.seq, x.labels.len() / x.seq);
            let labels = Tensor::<Train, 2, Int>::from_data(TensorData::new(x.labels.clone(), [b, t]), &Default::default());
            let grads = causal_lm_loss(logits, labels).mean().backward();
            let mut checked = 0;
            let mut worst = (0f32, String::new());
            for (param, got) in param_grads(&model, &grads) {
                let Some(want) = r.get(&format!("{prefix}{param}")) else { continue };
                let want = want.to_f32().unwrap();
                if want.iter().all(|&v| v == 0.0) {
                    continue;
                }
                let got = got.unwrap_or_else(|| panic!("{name} {prefix}{param}: no gradient"));
                let d = rel_diff(&got, &want);
                assert!(d <= 1e-4, "{name} {prefix}{param}: gradient differs by {d}");
                if d > worst.0 {
                    worst = (d, param.clone());
                }
                checked += 1;
            }
            println!("{name} {prefix}: {checked} gradients, worst rel diff {:.2e} ({})", worst.0, worst.1);
            assert!(checked >= if tower_trains { 20 } else { 4 }, "{name} {prefix}: only {checked} compared");
        }
    }
}

#[test]
fn greedy_generation_matches_transformers_from_the_image_file() {
    for name in MODELS {
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("generate.json")).unwrap()).unwrap();
        let dir = fixture(name).join("hub");
        let model = VlmModel::<Cpu>::load(&dir, &Default::default()).unwrap();
        let processor = vsft_data::Processor::from_model_dir(&dir, None).unwrap();
        let bytes = std::fs::read(fixture(name).join(want["image"].as_str().unwrap())).unwrap();
        let image = vsft_data::image_proc::decode_image(&bytes).unwrap();
        let messages = [vsft_data::Message::new("user", vec![vsft_data::Content::image(0), vsft_data::Content::text("What is shown in this image?")])];
        let (ids, images) = processor.encode_prompt_with_images(&messages, &[image]).unwrap();
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let prompt: Vec<i64> = want["prompt"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(ids, prompt, "{name}: prompt ids differ from the processor's");
        let infos: Vec<vsft_model::ImageInfo> = images.meta.iter().map(|m| vsft_model::ImageInfo { original_hw: m.original_hw, units: m.units, grid: m.grid }).collect();
        let inputs = vsft_model::ImageInputs { pixel_values: &images.pixel_values, shape: &images.shape, images: &infos };
        let opts = GenerateOptions { max_new_tokens: want["max_new_tokens"].as_u64().unwrap() as usize, eos_token_ids: vec![want["eos_token_id"].as_i64().unwrap()], ..Default::default() };
        let got = model.as_dyn().generate(&ids, Some(&inputs), &opts, &mut |_| true).unwrap();
        let expected: Vec<i64> = want["new_tokens"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        println!("{name}: {got:?}");
        assert_eq!(got, expected, "{name}: greedy tokens differ from transformers' generate");
    }
}
