//! Parity with transformers on the fixtures written by scripts/make_model_fixtures.py:
//! logits (max abs diff ≤ 1e-4), loss (relative ≤ 1e-5), projector gradients (relative ≤ 1e-4),
//! for every key layout, plus the save → load round trip and the loader's error reports.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use vsft_model::loss::causal_lm_loss;
use vsft_model::weights::{read_tensor_file, RawTensor};
use vsft_model::{StoredDtype, VlmModel};

type Cpu = Flex;
type Train = common::Train;

mod common;
use common::{check_logits, check_loss, check_projector_grads, images, inputs, llava, logits_of, max_abs_diff, reference, rel_diff, values, CONFIGS, LOGITS_ABS};

fn fixture_dir(name: &str) -> PathBuf {
    common::model_dir(name)
}

#[test]
fn logits_match_transformers_in_every_key_layout() {
    for name in CONFIGS {
        for layout in ["legacy", "v452", "v5"] {
            check_logits::<Cpu>(name, layout, 1.0);
        }
    }
}

#[test]
fn bf16_shards_with_a_total_size_index_load_and_match() {
    for name in CONFIGS {
        let r = reference(name);
        let x = inputs::<Cpu>(&r);
        let want = read_tensor_file(&fixture_dir(name).join("reference_sharded_bf16.safetensors")).unwrap()["logits"]
            .to_f32()
            .unwrap();
        let model = VlmModel::<Cpu>::load(&fixture_dir(name).join("sharded"), &Default::default()).unwrap();
        let diff = max_abs_diff(&logits_of(&model, &x), &want);
        println!("{name}/sharded bf16: logits max abs diff {diff:.3e}");
        assert!(diff <= LOGITS_ABS, "{name}: sharded bf16 logits differ by {diff}");
    }
}

#[test]
fn loss_matches_transformers_mean_and_sum() {
    for name in CONFIGS {
        check_loss::<Cpu>(name, 1.0);
    }
}

#[test]
fn projector_gradients_match_torch_autograd() {
    for name in CONFIGS {
        check_projector_grads::<Train>(name, 1.0);
    }
}

#[test]
fn save_then_load_gives_identical_tensors_in_sharded_legacy_layout() {
    for name in CONFIGS {
        let dev = Default::default();
        let model = VlmModel::<Cpu>::load(&fixture_dir(name).join("v5"), &dev).unwrap();
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("roundtrip-{name}"));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        model.save(&out, StoredDtype::F32, 60_000).unwrap();
        assert!(out.join("model.safetensors.index.json").exists(), "60 kB shards must give an index");
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
        let names: Vec<&String> = index["weight_map"].as_object().unwrap().keys().collect();
        assert!(names.iter().all(|n| n.starts_with("language_model.")
            || n.starts_with("vision_tower.vision_model.")
            || n.starts_with("multi_modal_projector.")), "legacy layout only: {names:?}");
        let again = VlmModel::<Cpu>::load(&out, &dev).unwrap();
        let a = model.named_tensors();
        let b = again.named_tensors();
        assert_eq!(a.len(), b.len());
        for ((na, _, ta), (nb, _, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(values(ta.flat.clone()), values(tb.flat.clone()), "{na} changed in the round trip");
        }
        println!("{name}: saved to {} ({} tensors)", out.display(), a.len());
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn mismatched_checkpoints_report_every_problem_at_once() {
    let src = fixture_dir("tiny-llava-mha").join("legacy");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mismatch");
    copy_dir(&src, &dir);
    // Two more layers than the checkpoint has, and a wider intermediate size.
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["num_hidden_layers"] = 3.into();
    cfg["text_config"]["intermediate_size"] = 144.into();
    cfg["vision_config"]["num_hidden_layers"] = 2.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = VlmModel::<Cpu>::load(&dir, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("missing tensor language_model.model.layers.2.self_attn.q_proj.weight"), "{err}");
    assert!(err.contains("tensor language_model.model.layers.0.mlp.up_proj.weight has shape [128, 64] in the checkpoint but the config gives [144, 64]"), "{err}");
    assert!(err.contains("unexpected tensor vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"), "{err}");
}

#[test]
fn unsupported_config_and_image_token_mismatch_are_clear_errors() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("unsupported");
    copy_dir(&fixture_dir("tiny-llava-mha").join("legacy"), &dir);
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["vision_config"]["hidden_act"] = "relu6".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = VlmModel::<Cpu>::load(&dir, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("relu6") && err.contains("quick_gelu"), "{err}");

    let r = reference("tiny-llava-mha");
    let x = inputs::<Cpu>(&r);
    let model = VlmModel::<Cpu>::load(&fixture_dir("tiny-llava-mha").join("legacy"), &Default::default()).unwrap();
    // One image for two rows that each hold an image's tokens.
    let p = &x.pixel_values;
    let per: usize = p.shape[1..].iter().product();
    let one = RawTensor::from_f32([&[1], &p.shape[1..]].concat(), &p.to_f32().unwrap()[..per]);
    let one = model.images_from_hf(&one, None).unwrap();
    let err = model.as_dyn().forward(x.input_ids, x.attention_mask, Some(&one.inputs())).unwrap_err().to_string();
    assert!(err.contains("image tokens (32;") && err.contains("image features (16)"), "{err}");
}

/// `model.dtype = "bfloat16"`: frozen weights held in bf16 (the sharded fixture's weights are
/// bf16 already, so holding them loses nothing), linears computed in bf16 as torch.autocast
/// does, projector in f32. Compared with transformers' f32 logits on the same bf16 weights, and
/// projector gradients with torch autograd's: the differences are bf16 rounding of activations.
#[test]
fn frozen_bf16_weights_stay_bf16_and_track_the_f32_reference() {
    for name in CONFIGS {
        let r = reference(name);
        let x = inputs::<Train>(&r);
        let dir = fixture_dir(name).join("sharded");
        let model = VlmModel::<Train>::load_with(&dir, &Default::default(), StoredDtype::BF16).unwrap();
        let dtypes: Vec<(String, burn::tensor::DType)> =
            model.named_tensors().iter().map(|(n, _, t)| (n.clone(), t.flat.dtype())).collect();
        for (n, dt) in &dtypes {
            let want = if n.starts_with("multi_modal_projector") { burn::tensor::DType::F32 } else { burn::tensor::DType::BF16 };
            assert_eq!(*dt, want, "{name}: {n} is {dt:?}");
        }
        let want = read_tensor_file(&fixture_dir(name).join("reference_sharded_bf16.safetensors")).unwrap()["logits"].to_f32().unwrap();
        let imgs = images(&model, &x);
        let projected = model.image_features_for_training(&imgs.inputs(), false).unwrap();
        let logits = model.as_dyn().forward_with_features(x.input_ids, x.attention_mask, Some(projected), &Default::default()).unwrap();
        let got = values(logits.clone());
        let diff = rel_diff(&got, &want);
        let grads = causal_lm_loss(logits, x.labels.unwrap()).mean().backward();
        let g = values(llava(&model).multi_modal_projector.linear_2.weight.val().grad(&grads).unwrap());
        let g_want = r["grad.multi_modal_projector.linear_2.weight"].to_f32().unwrap();
        let g_diff = rel_diff(&g, &g_want);
        println!("{name}: bf16 frozen weights: logits rel diff {diff:.2e}, projector grad rel diff {g_diff:.2e}");
        assert!(diff <= 2e-2, "{name}: bf16 logits differ by {diff} (relative to the largest logit)");
        assert!(g_diff <= 5e-2, "{name}: bf16 projector gradient differs by {g_diff}");
    }
}
