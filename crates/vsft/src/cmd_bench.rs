use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use vsft_data::{Batch, ImageBatch, ImageMeta};
use vsft_model::lora::LoraConfig;
use vsft_model::weights::RandomInit;
use vsft_model::VlmModel;
use vsft_train::optim::AdamWConfig;
use vsft_train::trainer::OptimSettings;
use vsft_train::{Stage, Trainer};

use crate::backend::{device, Train};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time the real training step (forward, backward, AdamW) on synthetic batches.
    #[command(after_help = "Example:\n  vsft bench train --model /tmp/bench --batch-size 4 --seq-len 512 --lora-r 16 --steps 5 --json")]
    Train(BenchTrainArgs),
}

#[derive(Args)]
pub struct BenchTrainArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// pretrain (projector only) or instruct (projector + LoRA).
    #[arg(long, default_value = "instruct")]
    pub stage: String,
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// Timed steps (one untimed warm-up step runs first).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long)]
    pub json: bool,
    /// Label every position, image placeholders included (default: image positions are -100,
    /// as every LLaVA collator masks them).
    #[arg(long)]
    pub label_all: bool,
    /// Per-decoder-layer gradient checkpointing (`[train] gradient_checkpointing`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Frozen weights' dtype (`model.dtype` in a recipe): float32, or bfloat16 on a GPU.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// One synthetic image per row for a model: LLaVA's one fixed-size image, or for LLaVA-NeXT a
/// 4:3 photo (640×480 at 336-px tiles), which takes the 2×2 grid plus the base tile: 5 tiles.
pub fn synthetic_image<B: burn::tensor::backend::Backend>(model: &VlmModel<B>) -> (ImageMeta, (usize, usize)) {
    match model {
        VlmModel::Llava(m) => {
            let s = m.config.vision_config.image_size;
            (ImageMeta { original_hw: (s, s), units: 1, grid: (1, 1, 1), tokens: m.config.image_tokens_per_image() }, (s, s))
        }
        VlmModel::LlavaNext(m) => {
            let s = m.config.base.vision_config.image_size;
            let original_hw = (480 * s / 336, 640 * s / 336);
            let grid = m.config.grid(original_hw);
            let n = m.config.tile_side();
            let (unpadded, newlines) = vsft_data::family::llava_next::unpadded_features(original_hw.0, original_hw.1, n, n, grid.1, grid.2);
            let meta = ImageMeta { original_hw, units: 1 + grid.1 * grid.2, grid, tokens: n * n + unpadded + newlines };
            (meta, (s, s))
        }
    }
}

/// Random tokens with one image's tokens right after BOS, random pixels; labels = ids, with the
/// image positions -100 unless `label_all`.
pub fn synthetic_batch(cfg: &vsft_model::LlavaConfig, image: (ImageMeta, (usize, usize)), batch: usize, seq: usize, seed: u64, label_all: bool) -> Batch {
    let mut rng = RandomInit::new(seed);
    let (meta, (h, w)) = image;
    let per_image = meta.tokens;
    assert!(seq > per_image + 2, "--seq-len must exceed the {per_image} image tokens");
    let vocab = cfg.text_config.vocab_size as f64;
    let image = cfg.image_token_index;
    let mut ids = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        ids.push(1);
        ids.extend(std::iter::repeat_n(image, per_image));
        while ids.len() % seq != 0 {
            let t = 3 + (rng.uniform() * (vocab.min(32000.0) - 3.0)) as i64;
            ids.push(if t == image { 3 } else { t });
        }
    }
    let units = batch * meta.units;
    let pixels = rng.fill(units * 3 * h * w, vsft_model::weights::Init::Normal(1.0));
    let labels: Vec<i64> = ids.iter().map(|&t| if t == image && !label_all { vsft_model::loss::IGNORE_INDEX } else { t }).collect();
    let n_label_tokens = labels.iter().filter(|&&l| l != vsft_model::loss::IGNORE_INDEX).count();
    Batch {
        batch_size: batch,
        seq_len: seq,
        labels,
        attention_mask: vec![1; batch * seq],
        input_ids: ids,
        images: ImageBatch { pixel_values: pixels, shape: vec![units, 3, h, w], meta: vec![meta; batch] },
        rows: (0..batch).collect(),
        n_label_tokens,
        all_labels_masked: false,
    }
}

pub fn run(c: BenchCommand) -> Result<ExitCode> {
    let BenchCommand::Train(a) = c;
    let stage = match a.stage.as_str() {
        "pretrain" => Stage::Pretrain,
        "instruct" => Stage::Instruct,
        s => anyhow::bail!("--stage {s}: use pretrain or instruct"),
    };
    let dev = device();
    let frozen = vsft_model::StoredDtype::from_torch_name(&a.dtype)
        .ok_or_else(|| anyhow::anyhow!("--dtype {}: use float32, bfloat16 or float16", a.dtype))?;
    let mut model = VlmModel::<Train>::load_with(&a.model, &dev, frozen)?;
    if stage == Stage::Instruct {
        let lora = LoraConfig { r: a.lora_r, alpha: 2.0 * a.lora_r as f64, dropout: 0.0, ..Default::default() };
        model.add_lora(&lora, 0)?;
    }
    let image = synthetic_image(&model);
    let cfg = match &model {
        VlmModel::Llava(m) => m.config.clone(),
        VlmModel::LlavaNext(m) => m.config.base.clone(),
    };
    let settings = OptimSettings {
        lr: 1e-4,
        projector_lr: Some(1e-4),
        vision_lr: None,
        weight_decay: 0.0,
        adam: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        max_grad_norm: 1.0,
        seed: 0,
    };
    let mut trainer = Trainer::new(model, stage, settings)?;
    trainer.gradient_checkpointing = a.gradient_checkpointing;
    let batch = synthetic_batch(&cfg, image, a.batch_size, a.seq_len, 0, a.label_all);
    let mut times = Vec::new();
    for step in 0..=a.steps {
        let t = Instant::now();
        let stats = trainer.step(std::slice::from_ref(&batch), 1e-4, step, false)?;
        // The step's results are read back to the host (loss, norm), so the time is the step's.
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if step > 0 {
            times.push(ms);
        }
        if !a.json {
            eprintln!("step {step}: {ms:.1} ms, loss {:.4}", stats.map(|s| s.loss).unwrap_or(f64::NAN));
        }
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let median = times[times.len() / 2];
    let tokens = (a.batch_size * a.seq_len) as f64;
    let out = serde_json::json!({
        "step_ms_median": median,
        "tokens_per_s": tokens / (median / 1e3),
        "peak_rss_mb": peak_rss_mb(),
        "backend": crate::backend::name(),
        "gradient_checkpointing": a.gradient_checkpointing,
        "labels": if a.label_all { "all positions" } else { "image positions -100" },
        "dtype": a.dtype,
        "family": trainer.model.family().model_type(), "tiles_per_image": image.0.units, "image_tokens": image.0.tokens,
        "batch_size": a.batch_size, "seq_len": a.seq_len, "stage": a.stage, "lora_r": a.lora_r, "steps": a.steps,
    });
    if a.json {
        println!("{out}");
    } else {
        println!("median step {median:.1} ms, {:.0} tokens/s, peak RSS {:.0} MB", tokens / (median / 1e3), peak_rss_mb());
    }
    Ok(ExitCode::SUCCESS)
}
