use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use burn::tensor::ElementConversion;
use clap::{Args, Subcommand};
use vsft_data::{Batch, ImageBatch, ImageMeta};
use vsft_model::lora::LoraConfig;
use vsft_model::weights::RandomInit;
use vsft_model::VlmModel;
use vsft_train::optim::AdamWConfig;
use vsft_train::trainer::OptimSettings;
use vsft_train::{Stage, Trainer};

use crate::backend::{device, Compute, Train};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time the real training step (forward, backward, AdamW) on synthetic batches.
    #[command(after_help = "Example:\n  vsft bench train --model /tmp/bench --batch-size 4 --seq-len 512 --lora-r 16 --steps 5 --json")]
    Train(BenchTrainArgs),
    /// Time the gradient all-reduce: on GPU builds across the job's ranks (run under torchrun,
    /// srun or `vsft launch`-style variables, NCCL); on the CPU across `--nproc` thread ranks.
    #[command(after_help = "Examples:\n  vsft bench allreduce --nproc 2 --elements 4000000\n  torchrun --nproc-per-node 8 --no-python vsft bench allreduce --elements 340000000")]
    Allreduce(BenchAllreduceArgs),
}

#[derive(Args)]
pub struct BenchAllreduceArgs {
    /// f32 values summed per all-reduce (the stage-2 gradient: LLaVA-1.5-7B's LoRA r 128 and
    /// projector are about 340 million).
    #[arg(long, default_value_t = 1 << 22)]
    pub elements: usize,
    /// Timed all-reduces (one untimed warm-up runs first).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Thread ranks (CPU builds; GPU ranks come from the launcher's environment).
    #[arg(long, default_value_t = 2)]
    pub nproc: usize,
}

/// Median milliseconds of `iters` all-reduces of `elements` ones, each result checked.
fn time_all_reduce(comm: &dyn vsft_train::distributed::Communicator<Compute>, elements: usize, iters: usize, dev: &burn::tensor::Device<Compute>) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..=iters {
        let t = burn::tensor::Tensor::<Compute, 1>::ones([elements], dev);
        let started = Instant::now();
        let sum = comm.all_reduce_sum(t)?;
        // Reading one value back waits for the collective.
        let first = sum.slice([0..1]).into_scalar().elem::<f64>();
        let ms = started.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(first == comm.world_size() as f64, "all-reduce check: got {first}, expected {}", comm.world_size());
        if i > 0 {
            times.push(ms);
        }
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    Ok(times[times.len() / 2])
}

fn allreduce(a: BenchAllreduceArgs) -> Result<ExitCode> {
    anyhow::ensure!(a.elements >= 1 && a.iters >= 1, "--elements and --iters must be at least 1");
    let report = |world: usize, ms: f64, engine: &str| {
        let bytes = (a.elements * 4) as f64;
        let algbw = bytes / (ms / 1e3) / 1e9;
        // nccl-tests' bus bandwidth: what each link carries in a ring all-reduce.
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        println!(
            "{}",
            serde_json::json!({"engine": engine, "world_size": world, "elements": a.elements, "bytes": bytes, "ms_median": ms,
                "algbw_gb_s": algbw, "busbw_gb_s": busbw, "backend": crate::backend::name()})
        );
    };
    match vsft_train::distributed::WorldInfo::from_env()? {
        #[cfg(feature = "cuda")]
        Some(world) => {
            let (comm, dev) = crate::cmd_train::join_nccl(&world)?;
            let ms = time_all_reduce(&comm, a.elements, a.iters, &dev);
            match &ms {
                Ok(ms) if world.rank == 0 => report(world.world_size, *ms, "nccl (host-staged)"),
                Ok(_) => {}
                Err(e) => comm.watchdog().report_failure(&crate::describe(e)),
            }
            comm.watchdog().finish();
            ms.map(|_| ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "cuda"))]
        Some(world) => anyhow::bail!("rank {} of {}: processes need the NCCL engine of a `--features cuda` build; on the CPU use --nproc", world.rank, world.world_size),
        None => {
            let dev = device();
            let times = vsft_train::distributed::run_local_ranks::<Compute, _, _>(a.nproc, &dev, |comm| {
                time_all_reduce(comm, a.elements, a.iters, &dev).map_err(|e| vsft_train::TrainError::Other(e.to_string()))
            })?;
            report(a.nproc, times[0], "burn-collective (threads)");
            Ok(ExitCode::SUCCESS)
        }
    }
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

/// One synthetic image per row for a model, as its processor would lay out a 4:3 photo:
/// LLaVA's one fixed-size image; LLaVA-NeXT's 640×480 (at 336-px tiles), the 2×2 grid plus the
/// base tile, 5 tiles; Qwen2-VL's 640×480 at native resolution (smart_resize → 476×644, 34×46
/// patches, 391 tokens).
pub struct SyntheticImage {
    pub meta: ImageMeta,
    /// The shape of one unit of `pixel_values` (`[3, H, W]`, or Qwen's `[1176]`).
    pub unit_shape: Vec<usize>,
    /// The image-token id and the ids around an image's run (BOS before LLaVA's; Qwen's
    /// `<|vision_start|>` … `<|vision_end|>`).
    pub image_token: i64,
    pub before: Option<i64>,
    pub after: Option<i64>,
    pub vocab: usize,
}

pub fn synthetic_image<B: burn::tensor::backend::Backend>(model: &VlmModel<B>) -> Result<SyntheticImage> {
    Ok(match model {
        VlmModel::Llava(m) => {
            let s = m.config.vision_config.image_size;
            SyntheticImage {
                meta: ImageMeta { original_hw: (s, s), units: 1, grid: (1, 1, 1), tokens: m.config.image_tokens_per_image() },
                unit_shape: vec![3, s, s],
                image_token: m.config.image_token_index,
                before: Some(1),
                after: None,
                vocab: m.config.text_config.vocab_size,
            }
        }
        VlmModel::LlavaNext(m) => {
            let s = m.config.base.vision_config.image_size;
            let original_hw = (480 * s / 336, 640 * s / 336);
            let grid = m.config.grid(original_hw);
            let n = m.config.tile_side();
            let (unpadded, newlines) = vsft_data::family::llava_next::unpadded_features(original_hw.0, original_hw.1, n, n, grid.1, grid.2);
            SyntheticImage {
                meta: ImageMeta { original_hw, units: 1 + grid.1 * grid.2, grid, tokens: n * n + unpadded + newlines },
                unit_shape: vec![3, s, s],
                image_token: m.config.base.image_token_index,
                before: Some(1),
                after: None,
                vocab: m.config.base.text_config.vocab_size,
            }
        }
        VlmModel::QwenVl(m) => {
            let v = &m.config.vision_config;
            let (p, merge) = (v.patch_size, v.spatial_merge_size());
            let (h, w) = vsft_data::family::qwen2_vl::smart_resize(480, 640, p * merge, 3136, 12845056).map_err(anyhow::Error::msg)?;
            let (gh, gw) = (h / p, w / p);
            SyntheticImage {
                meta: ImageMeta { original_hw: (480, 640), units: gh * gw, grid: (1, gh, gw), tokens: gh * gw / (merge * merge) },
                unit_shape: vec![v.patch_dim()],
                image_token: m.config.image_token_id,
                before: Some(m.config.vision_start_token_id),
                after: Some(m.config.vision_end_token_id),
                vocab: m.config.text_config.vocab_size,
            }
        }
    })
}

/// Random tokens with one image's tokens at the start, random pixels; labels = ids, with the
/// image positions -100 unless `label_all`.
pub fn synthetic_batch(image: &SyntheticImage, batch: usize, seq: usize, seed: u64, label_all: bool) -> Result<Batch> {
    let mut rng = RandomInit::new(seed);
    let meta = image.meta;
    let per_image = meta.tokens;
    anyhow::ensure!(seq > per_image + 2, "--seq-len must exceed the {per_image} image tokens");
    let vocab = image.vocab as f64;
    let specials = [Some(image.image_token), image.before, image.after];
    let mut ids = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        ids.extend(image.before);
        ids.extend(std::iter::repeat_n(image.image_token, per_image));
        ids.extend(image.after);
        while ids.len() % seq != 0 {
            let t = 3 + (rng.uniform() * (vocab.min(32000.0) - 3.0)) as i64;
            ids.push(if specials.contains(&Some(t)) { 3 } else { t });
        }
    }
    let units = batch * meta.units;
    let unit: usize = image.unit_shape.iter().product();
    let pixels = rng.fill(units * unit, vsft_model::weights::Init::Normal(1.0));
    let labels: Vec<i64> = ids.iter().map(|&t| if t == image.image_token && !label_all { vsft_model::loss::IGNORE_INDEX } else { t }).collect();
    let n_label_tokens = labels.iter().filter(|&&l| l != vsft_model::loss::IGNORE_INDEX).count();
    let shape = [vec![units], image.unit_shape.clone()].concat();
    Ok(Batch {
        batch_size: batch,
        seq_len: seq,
        labels,
        attention_mask: vec![1; batch * seq],
        input_ids: ids,
        images: ImageBatch { pixel_values: pixels, shape, meta: vec![meta; batch] },
        rows: (0..batch).collect(),
        n_label_tokens,
        all_labels_masked: false,
    })
}

pub fn run(c: BenchCommand) -> Result<ExitCode> {
    let a = match c {
        BenchCommand::Train(a) => a,
        BenchCommand::Allreduce(a) => return allreduce(a),
    };
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
    let image = synthetic_image(&model)?;
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
    let batch = synthetic_batch(&image, a.batch_size, a.seq_len, 0, a.label_all)?;
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
        "family": trainer.model.family().model_type(), "units_per_image": image.meta.units, "image_tokens": image.meta.tokens,
        "batch_size": a.batch_size, "seq_len": a.seq_len, "stage": a.stage, "lora_r": a.lora_r, "steps": a.steps,
    });
    if a.json {
        println!("{out}");
    } else {
        println!("median step {median:.1} ms, {:.0} tokens/s, peak RSS {:.0} MB", tokens / (median / 1e3), peak_rss_mb());
    }
    Ok(ExitCode::SUCCESS)
}
