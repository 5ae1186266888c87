//! Helpers the integration tests share: the fixture directory and batches from
//! `tests/fixtures/train/stage1_batches.safetensors`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use vsft_data::{Batch, ImageBatch, ImageMeta};
use vsft_model::weights::RawTensor;
use vsft_model::LlavaNextConfig;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Rows `rows` of fixture batch `i`; `unpad` trims to the longest row.
#[allow(dead_code)]
pub fn batch_from(t: &std::collections::BTreeMap<String, RawTensor>, i: usize, rows: std::ops::Range<usize>, unpad: bool) -> Batch {
    let ids = &t[&format!("batch{i}.input_ids")];
    let (bsz, seq) = (ids.shape[0], ids.shape[1]);
    let ids = ids.to_i64().unwrap();
    let mask = t[&format!("batch{i}.attention_mask")].to_i64().unwrap();
    let labels = t[&format!("batch{i}.labels")].to_i64().unwrap();
    let pix = &t[&format!("batch{i}.pixel_values")];
    let per_image: usize = pix.shape[1..].iter().product();
    let (h, w) = (pix.shape[2], pix.shape[3]);
    let pix = pix.to_f32().unwrap();
    assert!(rows.end <= bsz);
    let width = if unpad { rows.clone().map(|r| mask[r * seq..(r + 1) * seq].iter().sum::<i64>() as usize).max().unwrap() } else { seq };
    let take = |v: &Vec<i64>| rows.clone().flat_map(|r| v[r * seq..r * seq + width].to_vec()).collect::<Vec<i64>>();
    let labels_v = take(&labels);
    let n_label_tokens = labels_v.iter().filter(|&&l| l != -100).count();
    Batch {
        batch_size: rows.len(),
        seq_len: width,
        input_ids: take(&ids),
        attention_mask: take(&mask),
        labels: labels_v,
        images: ImageBatch {
            pixel_values: rows.clone().flat_map(|r| pix[r * per_image..(r + 1) * per_image].to_vec()).collect(),
            shape: vec![rows.len(), 3, h, w],
            meta: vec![ImageMeta { original_hw: (h, w), units: 1, grid: (1, 1, 1), tokens: 0 }; rows.len()],
        },
        rows: rows.collect(),
        n_label_tokens,
        all_labels_masked: n_label_tokens == 0,
    }
}

/// A whole batch in transformers' LLaVA-NeXT layout (`{prefix}input_ids`, …, `pixel_values
/// [images, max tiles, 3, H, W]`, `image_sizes`) as vsft's batch: padding tiles dropped.
#[allow(dead_code)]
pub fn llava_next_batch(t: &std::collections::BTreeMap<String, RawTensor>, prefix: &str, cfg: &LlavaNextConfig) -> Batch {
    let ids = &t[&format!("{prefix}input_ids")];
    let (bsz, seq) = (ids.shape[0], ids.shape[1]);
    let labels = t[&format!("{prefix}labels")].to_i64().unwrap();
    let pix = &t[&format!("{prefix}pixel_values")];
    let shape: [usize; 5] = pix.shape.clone().try_into().unwrap();
    let sizes: Vec<(usize, usize)> = t[&format!("{prefix}image_sizes")].to_i64().unwrap().chunks(2).map(|s| (s[0] as usize, s[1] as usize)).collect();
    let (pixel_values, shape, infos) = cfg.from_hf_inputs(&pix.to_f32().unwrap(), shape, &sizes).unwrap();
    let n_label_tokens = labels.iter().filter(|&&l| l != -100).count();
    Batch {
        batch_size: bsz,
        seq_len: seq,
        input_ids: ids.to_i64().unwrap(),
        attention_mask: t[&format!("{prefix}attention_mask")].to_i64().unwrap(),
        labels,
        images: ImageBatch {
            pixel_values,
            shape: shape.to_vec(),
            meta: infos.iter().map(|i| ImageMeta { original_hw: i.original_hw, units: i.units, grid: i.grid, tokens: 0 }).collect(),
        },
        rows: (0..bsz).collect(),
        n_label_tokens,
        all_labels_masked: n_label_tokens == 0,
    }
}

/// A whole batch in transformers' Qwen2-VL layout (`{prefix}input_ids`, …, `pixel_values
/// [patches, 1176]`, `image_grid_thw`) as vsft's batch.
#[allow(dead_code)]
pub fn qwen_batch(t: &std::collections::BTreeMap<String, RawTensor>, prefix: &str, image_token: i64, merge: usize) -> Batch {
    let ids = &t[&format!("{prefix}input_ids")];
    let (bsz, seq) = (ids.shape[0], ids.shape[1]);
    let labels = t[&format!("{prefix}labels")].to_i64().unwrap();
    let pix = &t[&format!("{prefix}pixel_values")];
    let meta: Vec<ImageMeta> = t[&format!("{prefix}image_grid_thw")]
        .to_i64()
        .unwrap()
        .chunks(3)
        .map(|g| {
            let (gt, gh, gw) = (g[0] as usize, g[1] as usize, g[2] as usize);
            ImageMeta { original_hw: (gh, gw), units: gt * gh * gw, grid: (gt, gh, gw), tokens: gt * gh * gw / (merge * merge) }
        })
        .collect();
    let input_ids = ids.to_i64().unwrap();
    assert_eq!(input_ids.iter().filter(|&&t| t == image_token).count(), meta.iter().map(|m| m.tokens).sum::<usize>());
    let n_label_tokens = labels.iter().filter(|&&l| l != -100).count();
    Batch {
        batch_size: bsz,
        seq_len: seq,
        input_ids,
        attention_mask: t[&format!("{prefix}attention_mask")].to_i64().unwrap(),
        labels,
        images: ImageBatch { pixel_values: pix.to_f32().unwrap(), shape: pix.shape.clone(), meta },
        rows: (0..bsz).collect(),
        n_label_tokens,
        all_labels_masked: n_label_tokens == 0,
    }
}

/// The mean loss of a model on a batch (images, positions and all), without a graph.
#[allow(dead_code)]
pub fn mean_loss<B: burn::tensor::backend::Backend>(model: &vsft_model::VlmModel<B>, b: &Batch) -> f64 {
    use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
    use vsft_train::trainer::{batch_positions, image_infos, image_inputs};
    let dev = Default::default();
    let shape = [b.batch_size, b.seq_len];
    let int = |v: &Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v.clone(), shape), &dev);
    let m = model.as_dyn();
    let infos = image_infos(&b.images);
    let feats = m.image_features(&image_inputs(&b.images, &infos)).unwrap();
    let positions = batch_positions(m, b).unwrap();
    let loss = m.loss_with_features(int(&b.input_ids), int(&b.attention_mask), Some(feats), &b.labels, &positions).unwrap();
    loss.sum.into_scalar().elem::<f64>() / loss.label_tokens as f64
}

/// Plain optimizer settings: lr 1e-3 for every group, AdamW's defaults, no weight decay, clipping at 1.
#[allow(dead_code)]
pub fn plain_settings(seed: u64) -> vsft_train::trainer::OptimSettings {
    vsft_train::trainer::OptimSettings {
        lr: 1e-3,
        projector_lr: None,
        vision_lr: None,
        weight_decay: 0.0,
        adam: vsft_train::optim::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        max_grad_norm: 1.0,
        seed,
    }
}

/// A PEFT reference run (the fixture's `reference.json` `lora` object) replayed by vsft: the
/// trainer from the base model plus PEFT's initial adapter with the run's optimizer settings.
#[allow(dead_code)]
pub fn peft_trainer<B: AutodiffBackend>(base_dir: &Path, fixture: &Path, r: &serde_json::Value, projector_lr_key: &str) -> (vsft_train::Trainer<B>, vsft_model::lora::LoraConfig) {
    use vsft_train::optim::AdamWConfig;
    use vsft_train::trainer::OptimSettings;
    let base = vsft_model::VlmModel::load(base_dir, &Default::default()).unwrap();
    let (model, lora_cfg) = base.load_adapter(&fixture.join("lora_init")).unwrap();
    let settings = OptimSettings {
        lr: r["lr"]["lora"].as_f64().unwrap(),
        projector_lr: r["lr"][projector_lr_key].as_f64(),
        vision_lr: None,
        weight_decay: r["weight_decay"].as_f64().unwrap(),
        adam: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        max_grad_norm: r["max_grad_norm"].as_f64().unwrap(),
        seed: 0,
    };
    (vsft_train::Trainer::new(model, vsft_train::Stage::Instruct, settings).unwrap(), lora_cfg)
}

/// The CPU threshold of the training checks against torch / PEFT: relative, on losses and
/// gradient norms; the backend suite multiplies it by at most 10.
pub const STEP_REL: f64 = 1e-4;

/// Steps the trainer through the reference run (`batch(step)`), each loss and pre-clip gradient
/// norm within `STEP_REL × factor` relative of PEFT's. Returns the largest of each.
#[allow(dead_code)]
pub fn replay_steps<B: AutodiffBackend>(trainer: &mut vsft_train::Trainer<B>, r: &serde_json::Value, what: &str, factor: f64, batch: impl Fn(usize) -> Batch) -> (f64, f64) {
    let floats = |k: &str| -> Vec<f64> { r[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
    let lr = r["lr"]["lora"].as_f64().unwrap();
    let mut worst = (0.0f64, 0.0f64);
    for (step, (want, want_norm)) in floats("losses").iter().zip(&floats("grad_norms_preclip")).enumerate() {
        let stats = trainer.step(&[batch(step)], lr, step, false).unwrap().unwrap();
        let (rel, rel_norm) = ((stats.loss - want).abs() / want, (stats.grad_norm - want_norm).abs() / want_norm);
        println!("{what} step {step}: loss {:.6} vs {want:.6} (rel {rel:.2e}), grad norm rel {rel_norm:.2e}", stats.loss);
        assert!(rel <= STEP_REL * factor, "{what} step {step}: loss differs by {rel}");
        assert!(rel_norm <= STEP_REL * factor, "{what} step {step}: gradient norm differs by {rel_norm}");
        worst = (worst.0.max(rel), worst.1.max(rel_norm));
    }
    worst
}

/// Writes the trainer's adapter as a checkpoint does (into `target/tmp/<name>`), checks its keys
/// against PEFT's final adapter, and returns the base model with it loaded again.
#[allow(dead_code)]
pub fn export_and_reload<B: AutodiffBackend>(
    trainer: &vsft_train::Trainer<B>,
    lora_cfg: &vsft_model::lora::LoraConfig,
    base_dir: &Path,
    fixture: &Path,
    name: &str,
) -> vsft_model::VlmModel<B::InnerBackend> {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    trainer.model.save_adapter_weights(&out, &|_| false).unwrap();
    let targeted: Vec<String> = trainer.trainable.keys().filter_map(|k| k.split_once(".lora.")).map(|(m, _)| m.replacen("language_model.model.", "model.language_model.", 1)).collect();
    let parts = trainer.model.as_dyn().part_names();
    std::fs::write(out.join("adapter_config.json"), lora_cfg.to_peft_json(&targeted, "base", parts, false).to_string()).unwrap();
    let ours = vsft_model::weights::read_tensor_file(&out.join("adapter_model.safetensors")).unwrap();
    let peft = vsft_model::weights::read_tensor_file(&fixture.join("lora_final/adapter_model.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>(), "{name}: adapter keys differ from PEFT's");
    vsft_model::VlmModel::load(base_dir, &Default::default()).unwrap().load_adapter(&out).unwrap().0
}

// ---------------------------------------------------------------------------------------------
// The training checks, generic over the backend: the CPU tests (stage1_parity.rs,
// llava_next_lora.rs) run them on Flex with `factor` 1, the backend suite (backends.rs) on wgpu
// / CUDA with at most 10.

/// The CPU threshold on the projector after the six stage-1 steps: max abs difference.
pub const FINAL_PROJECTOR_ABS: f32 = 1e-5;

/// `tests/fixtures/train/stage1_reference.json` (scripts/make_train_fixtures.py).
#[allow(dead_code)]
pub fn stage1_reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("train/stage1_reference.json")).unwrap()).unwrap()
}

/// A stage-1 trainer on tiny-llava-mha with the reference run's optimizer settings.
#[allow(dead_code)]
pub fn stage1_trainer<B: AutodiffBackend>(r: &serde_json::Value) -> vsft_train::Trainer<B> {
    let model = vsft_model::VlmModel::<B>::load(&fixtures().join("model/tiny-llava-mha/legacy"), &Default::default()).unwrap();
    let settings = vsft_train::trainer::OptimSettings {
        lr: r["lr"].as_f64().unwrap(),
        projector_lr: None,
        vision_lr: None,
        weight_decay: r["weight_decay"].as_f64().unwrap(),
        adam: vsft_train::optim::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        max_grad_norm: 0.0,
        seed: 0,
    };
    vsft_train::Trainer::new(model, vsft_train::Stage::Pretrain, settings).unwrap()
}

/// Six stage-1 AdamW steps (batch 2, constant lr, no clipping) against torch: each step's loss
/// and gradient norm within `STEP_REL × factor` relative, the final projector within
/// `FINAL_PROJECTOR_ABS × factor`. Returns (loss rel, grad norm rel, projector abs), the worst of each.
#[allow(dead_code)]
pub fn check_stage1_steps<B: AutodiffBackend>(gradient_checkpointing: bool, factor: f64) -> (f64, f64, f32) {
    let r = stage1_reference();
    let t = vsft_model::weights::read_tensor_file(&fixtures().join("train/stage1_batches.safetensors")).unwrap();
    let mut tr = stage1_trainer::<B>(&r);
    tr.gradient_checkpointing = gradient_checkpointing;
    let lr = r["lr"].as_f64().unwrap();
    let floats = |k: &str| -> Vec<f64> { r[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let mut worst = (0.0f64, 0.0f64, 0.0f32);
    for (step, (w, wn)) in floats("losses").iter().zip(&floats("grad_norms")).enumerate() {
        let b = batch_from(&t, step % 3, 0..2, false);
        let s = tr.step(&[b], lr, step, false).unwrap().unwrap();
        let rel = ((s.loss - w) / w).abs();
        let rel_norm = ((s.grad_norm - wn) / wn).abs();
        println!("step {}: loss {:.7} vs torch {:.7} (rel {rel:.2e}); grad norm rel {rel_norm:.2e}", step + 1, s.loss, w);
        assert!(rel <= STEP_REL * factor, "step {}: loss relative diff {rel}", step + 1);
        assert!(rel_norm <= STEP_REL * factor, "step {}: grad norm relative diff {rel_norm}", step + 1);
        worst = (worst.0.max(rel), worst.1.max(rel_norm), worst.2);
    }
    // The frozen parts did not move and the projector ended where torch's did.
    let values = tr.trainable_values();
    for name in ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"] {
        let got = values[&format!("multi_modal_projector.{name}")].to_data().convert::<f32>().into_vec::<f32>().unwrap();
        let want = t[&format!("final.multi_modal_projector.{name}")].to_f32().unwrap();
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!("final {name}: max abs diff {max:.2e}");
        assert!(max <= FINAL_PROJECTOR_ABS * factor as f32, "{name} after 6 steps differs by {max}");
        worst.2 = worst.2.max(max);
    }
    assert_eq!(tr.trainable.len(), 4, "stage 1 trains only the projector");
    worst
}

/// Stage 2 on the LLaVA-NeXT fixture against transformers + PEFT: six LoRA steps from PEFT's
/// initial adapter (`replay_steps`), then the adapter written as a checkpoint writes it, loaded
/// into a fresh base: its loss against PEFT's final adapter's, within `STEP_REL × factor`.
/// Returns (loss rel, grad norm rel, exported adapter's loss rel).
#[allow(dead_code)]
pub fn check_llava_next_lora<B: AutodiffBackend>(factor: f64, out_name: &str) -> (f64, f64, f64) {
    let dir = fixtures().join("llava_next/model");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let r = &reference["lora"];
    let cfg = LlavaNextConfig::from_file(&dir.join("legacy/config.json")).unwrap();
    let (mut trainer, lora_cfg) = peft_trainer::<B>(&dir.join("legacy"), &dir, r, "projector");
    assert_eq!(lora_cfg.dropout, 0.0);
    let n_peft_trainable = r["trainable_parameter_order"].as_array().unwrap().len();
    assert_eq!(trainer.trainable.len(), n_peft_trainable, "vsft trains what PEFT trains (LoRA A/B + projector; image_newline frozen)");
    let batches = vsft_model::weights::read_tensor_file(&dir.join("lora_batches.safetensors")).unwrap();
    let (rel, rel_norm) = replay_steps(&mut trainer, r, "llava_next", factor, |step| llava_next_batch(&batches, &format!("batch{}.", step % 3), &cfg));

    let reloaded = export_and_reload(&trainer, &lora_cfg, &dir.join("legacy"), &dir, out_name);
    let inputs = vsft_model::weights::read_tensor_file(&dir.join("inputs.safetensors")).unwrap();
    let ours_loss = mean_loss(&reloaded, &llava_next_batch(&inputs, "", &cfg));
    let want = r["final_loss_on_inputs"].as_f64().unwrap();
    let exported = (ours_loss - want).abs() / want;
    println!("final adapter: loss {ours_loss:.6} vs PEFT {want:.6} (rel {exported:.2e})");
    assert!(exported <= STEP_REL * factor, "the exported adapter's loss differs from PEFT's final adapter by {exported}");
    (rel, rel_norm, exported)
}
