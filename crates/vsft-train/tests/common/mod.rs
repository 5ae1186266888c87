//! Helpers the integration tests share: the fixture directory and batches from
//! `tests/fixtures/train/stage1_batches.safetensors`.

use std::path::{Path, PathBuf};

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
pub fn mean_loss(model: &vsft_model::VlmModel<burn::backend::Flex>, b: &Batch) -> f64 {
    use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
    use vsft_train::trainer::{batch_positions, image_infos, image_inputs};
    let dev = Default::default();
    let shape = [b.batch_size, b.seq_len];
    let int = |v: &Vec<i64>| Tensor::<burn::backend::Flex, 2, Int>::from_data(TensorData::new(v.clone(), shape), &dev);
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
pub fn peft_trainer(base_dir: &Path, fixture: &Path, r: &serde_json::Value, projector_lr_key: &str) -> (vsft_train::Trainer<burn::backend::Autodiff<burn::backend::Flex>>, vsft_model::lora::LoraConfig) {
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

/// Steps the trainer through the reference run (`batch(step)`), each loss and pre-clip gradient
/// norm within 1e-4 relative of PEFT's.
#[allow(dead_code)]
pub fn replay_steps(trainer: &mut vsft_train::Trainer<burn::backend::Autodiff<burn::backend::Flex>>, r: &serde_json::Value, what: &str, batch: impl Fn(usize) -> Batch) {
    let floats = |k: &str| -> Vec<f64> { r[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
    let lr = r["lr"]["lora"].as_f64().unwrap();
    for (step, (want, want_norm)) in floats("losses").iter().zip(&floats("grad_norms_preclip")).enumerate() {
        let stats = trainer.step(&[batch(step)], lr, step, false).unwrap().unwrap();
        let (rel, rel_norm) = ((stats.loss - want).abs() / want, (stats.grad_norm - want_norm).abs() / want_norm);
        println!("{what} step {step}: loss {:.6} vs {want:.6} (rel {rel:.2e}), grad norm rel {rel_norm:.2e}", stats.loss);
        assert!(rel <= 1e-4, "{what} step {step}: loss differs by {rel}");
        assert!(rel_norm <= 1e-4, "{what} step {step}: gradient norm differs by {rel_norm}");
    }
}

/// Writes the trainer's adapter as a checkpoint does (into `target/tmp/<name>`), checks its keys
/// against PEFT's final adapter, and returns the base model with it loaded again.
#[allow(dead_code)]
pub fn export_and_reload(
    trainer: &vsft_train::Trainer<burn::backend::Autodiff<burn::backend::Flex>>,
    lora_cfg: &vsft_model::lora::LoraConfig,
    base_dir: &Path,
    fixture: &Path,
    name: &str,
) -> vsft_model::VlmModel<burn::backend::Flex> {
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
