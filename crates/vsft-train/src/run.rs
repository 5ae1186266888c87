//! `vsft train`: the recipe, top to bottom — load the model, set up the stage (what trains),
//! stream the data, step, log, evaluate, checkpoint, resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ElementConversion;
use vsft_data::{open_dataset, Batch, CollatorConfig, Cursor, DataLoader, LoaderConfig, Processor};
use vsft_model::lora::LoraConfig;
use vsft_model::VlmModel;

use crate::checkpoint::{self, CheckpointContent, TrainerState};
use crate::error::TrainError;
use crate::metrics::{eval_record, write_run_info, LogWindow};
use vsft_track::Tracker;
use crate::optim::{lr_lambda, warmup_steps, AdamWConfig};
use crate::progress::{Progress, StepView};
use crate::recipe::{Recipe, Stage};
use crate::trainer::{batch_tensors, image_infos, image_inputs, OptimSettings, Trainer, TrainParts};

/// Where to resume from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    No,
    /// The newest complete checkpoint in `output_dir`, if any.
    Auto,
    Dir(PathBuf),
}

/// Local paths for what the recipe names (Hub ids already downloaded by the caller).
#[derive(Debug, Clone)]
pub struct Inputs {
    pub model_dir: PathBuf,
    pub train: String,
    pub eval: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub last_checkpoint: PathBuf,
    pub interrupted: bool,
    pub rows_skipped: usize,
    pub losses: Vec<f64>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static HANDLER: Once = Once::new();

fn install_ctrlc() {
    HANDLER.call_once(|| {
        // A second Ctrl-C while saving still kills the process (the handler only sets a flag once).
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    });
}

fn loader_config(recipe: &Recipe, batch_size: usize, shuffle: bool) -> Result<LoaderConfig, TrainError> {
    let d = &recipe.data;
    Ok(LoaderConfig {
        batch_size,
        collator: CollatorConfig {
            label_mask: d.label_mask.parse().map_err(TrainError::Recipe)?,
            max_length: Some(d.max_length),
            pad_to_multiple_of: d.pad_to_multiple_of,
            add_special_tokens: d.add_special_tokens,
        },
        shuffle,
        num_workers: d.num_workers,
        on_bad_row: d.on_bad_row.parse().map_err(TrainError::Recipe)?,
        ..LoaderConfig::default()
    })
}

/// Mean loss over every label token of a dataset, without building a graph.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub label_tokens: usize,
    pub examples: usize,
    /// Mean over batches of the share of label tokens predicted right (TRL's `eval_mean_token_accuracy`).
    pub mean_token_accuracy: f64,
}

pub fn evaluate<B: Backend>(model: &VlmModel<B>, batches: impl Iterator<Item = Result<Batch, vsft_data::DataError>>) -> Result<EvalResult, TrainError> {
    let model = model.as_dyn();
    let device = model.device();
    let (mut sum, mut tokens, mut examples, mut accuracy, mut batches_seen) = (0.0f64, 0usize, 0usize, 0.0f64, 0usize);
    for batch in batches {
        let batch = batch?;
        let (ids, mask, _) = batch_tensors::<B>(&batch, &device);
        let infos = image_infos(&batch.images);
        let feats = (!infos.is_empty()).then(|| model.image_features(&image_inputs(&batch.images, &infos))).transpose()?;
        let positions = crate::trainer::batch_positions(model, &batch)?;
        let loss = model.loss_with_features(ids, mask, feats, &batch.labels, &positions)?;
        sum += loss.sum.into_scalar().elem::<f64>();
        tokens += loss.label_tokens;
        examples += batch.batch_size;
        accuracy += loss.correct_tokens as f64 / loss.label_tokens.max(1) as f64;
        batches_seen += 1;
    }
    Ok(EvalResult { loss: sum / tokens.max(1) as f64, label_tokens: tokens, examples, mean_token_accuracy: accuracy / batches_seen.max(1) as f64 })
}

/// The model's image-token id (`config.json`) must be the id the tokenizer gives the image
/// placeholder: otherwise rows carry placeholders the model never replaces with features, and
/// the mismatch would surface later, far from its cause.
pub fn check_image_token<B: Backend>(model: &VlmModel<B>, processor: &Processor, model_dir: &Path) -> Result<(), TrainError> {
    let (model_id, token_id) = (model.as_dyn().image_token_id(), processor.text.image_token_id as i64);
    if model_id == token_id {
        return Ok(());
    }
    Err(TrainError::Model(vsft_model::ModelError::Config {
        path: model_dir.join("config.json"),
        message: format!("the image token id is {model_id}, but the tokenizer gives the image placeholder the id {token_id}; the two must agree"),
    }))
}

/// Loads a stage-1 projector: a checkpoint directory (its `projector.safetensors` or
/// `adapter_model.safetensors`) or a safetensors file.
pub fn load_projector<B: Backend>(model: VlmModel<B>, path: &Path) -> Result<VlmModel<B>, TrainError> {
    let file = if path.is_dir() {
        [path.join("projector.safetensors"), path.join("adapter_model.safetensors")]
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| TrainError::Checkpoint(format!("{}: holds no projector.safetensors or adapter_model.safetensors", path.display())))?
    } else if path.exists() {
        path.to_path_buf()
    } else {
        return Err(TrainError::Checkpoint(format!("{}: does not exist; expected a checkpoint directory or a projector .safetensors file", path.display())));
    };
    let raw = vsft_model::weights::read_tensor_file(&file)?;
    let projector: Vec<_> = raw
        .into_iter()
        .map(|(k, v)| (vsft_model::weights::canonical_name(&k.strip_prefix("base_model.model.").unwrap_or(&k).replace(".modules_to_save.default.", ".")), v))
        .filter(|(k, _)| model.as_dyn().part_names().is_projector(k))
        .collect();
    if projector.is_empty() {
        return Err(TrainError::Checkpoint(format!("{}: holds no {}* tensor", file.display(), model.as_dyn().part_names().projector)));
    }
    Ok(model.with_tensors(&projector, &file)?)
}

/// Runs (or resumes) the training a recipe describes.
pub fn train<B: AutodiffBackend>(recipe: &Recipe, inputs: &Inputs, resume: Resume, device: &B::Device) -> Result<RunSummary, TrainError> {
    train_with::<B>(recipe, inputs, resume, device, &mut |_| Ok(()))
}

/// [`train`], calling `on_checkpoint` after each periodic checkpoint is complete (e.g. to push it).
pub fn train_with<B: AutodiffBackend>(
    recipe: &Recipe,
    inputs: &Inputs,
    resume: Resume,
    device: &B::Device,
    on_checkpoint: &mut dyn FnMut(&Path) -> Result<(), TrainError>,
) -> Result<RunSummary, TrainError> {
    install_ctrlc();
    INTERRUPTED.store(false, Ordering::SeqCst);
    let t = &recipe.train;
    let out = recipe.output_dir();
    create_output_dir(&out)?;
    let recipe_toml = recipe.to_toml();
    let resolved = out.join("recipe.toml");
    std::fs::write(&resolved, &recipe_toml).map_err(|e| TrainError::io(&resolved, e))?;

    // Model and stage.
    eprintln!("vsft: loading {}", inputs.model_dir.display());
    // Validated when the recipe was read.
    let frozen_dtype = vsft_model::StoredDtype::from_torch_name(&recipe.model.dtype).unwrap_or(vsft_model::StoredDtype::F32);
    let mut model = VlmModel::<B>::load_with(&inputs.model_dir, device, frozen_dtype)?;
    eprintln!("vsft: model family {} ({})", model.family().model_type(), model.family().architecture());
    if frozen_dtype != vsft_model::StoredDtype::F32 {
        eprintln!("vsft: frozen weights in {} (projector, LoRA and optimizer state in f32)", recipe.model.dtype);
    }
    if let Some(p) = &recipe.model.projector {
        model = load_projector(model, Path::new(p)).map_err(|e| TrainError::Recipe(format!("model.projector: {e}")))?;
        eprintln!("vsft: projector from {p}");
    }
    let lora_cfg = LoraConfig {
        r: recipe.lora.r,
        alpha: recipe.lora.alpha,
        dropout: recipe.lora.dropout,
        target_modules: recipe.lora.target_modules.clone(),
        rslora: recipe.lora.rslora,
    };
    let targeted = if t.stage == Stage::Instruct { model.add_lora(&lora_cfg, t.seed)? } else { Vec::new() };
    let settings = OptimSettings {
        lr: t.lr,
        projector_lr: t.projector_lr,
        vision_lr: t.vision_lr,
        weight_decay: t.weight_decay,
        adam: AdamWConfig { beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps },
        max_grad_norm: t.max_grad_norm,
        seed: t.seed,
    };
    let mut trainer = Trainer::new(model, TrainParts { stage: t.stage, vision_tower: !t.freeze_vision_tower }, settings)?;
    trainer.gradient_checkpointing = recipe.train.gradient_checkpointing;
    if trainer.gradient_checkpointing {
        eprintln!("vsft: gradient checkpointing: decoder layers re-run one at a time in backward");
    }
    eprintln!("vsft: stage {:?}", t.stage);
    for g in trainer.group_report() {
        match g.lr {
            Some(lr) if g.trains => eprintln!("  {:<24} trains  {:>12} params  lr {lr:e}", g.name, g.params),
            _ => eprintln!("  {:<24} frozen  {:>12} params", g.name, g.params),
        }
    }

    // Data.
    let chat_template = recipe.data.chat_template.as_deref().map(Path::new);
    let overrides = vsft_data::ProcessorOverrides {
        min_pixels: recipe.data.min_pixels,
        max_pixels: recipe.data.max_pixels,
        max_image_pixels: recipe.data.max_image_pixels,
    };
    let processor = Arc::new(Processor::from_model_dir_with(&inputs.model_dir, chat_template, &overrides)?);
    check_image_token(&trainer.model, &processor, &inputs.model_dir)?;
    let image_root = recipe.data.image_folder.as_deref().map(Path::new);
    let open_train = || open_dataset(&inputs.train, Some("train"), image_root);
    let first_source = open_train()?;
    let rows = first_source.len();
    let lcfg = loader_config(recipe, t.batch_size, t.shuffle)?;
    let batches_per_epoch = rows.div_ceil(t.batch_size).max(1);
    let steps_per_epoch = batches_per_epoch.div_ceil(t.grad_accum).max(1);
    let total_steps = if t.max_steps > 0 { t.max_steps } else { t.epochs.saturating_mul(steps_per_epoch) };
    let warmup = warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio);
    eprintln!(
        "vsft: {rows} rows, {steps_per_epoch} steps per epoch, {total_steps} steps, batch {}×{} (global {}), warmup {warmup}",
        t.batch_size,
        t.grad_accum,
        t.batch_size * t.grad_accum
    );

    // Resume.
    let mut state = TrainerState {
        global_step: 0,
        total_steps,
        epoch: 0.0,
        cursor: Cursor { seed: t.seed, epoch: 0, position: 0 },
        optimizer_step: 0,
        stage: t.stage,
        trainable_fingerprint: recipe.trainable_fingerprint(),
        trainable: trainer.trainable.keys().cloned().collect(),
        rows_skipped: 0,
        batches_all_masked: 0,
        last_loss: None,
        last_eval_loss: None,
        base_model: recipe.model.path.clone(),
        model_type: trainer.model.family().model_type().to_string(),
        num_tokens: 0,
    };
    let (resume_dir, picked) = match resume {
        Resume::No => (None, false),
        Resume::Auto => (checkpoint::latest_checkpoint(&out), true),
        Resume::Dir(d) => (Some(d), false),
    };
    if let Some(dir) = resume_dir {
        let target = checkpoint::ResumeTarget {
            stage: t.stage,
            model_type: &state.model_type,
            trainable_fingerprint: &state.trainable_fingerprint,
            rows,
            total_steps,
            epochs: t.epochs,
            max_steps: t.max_steps,
        };
        let saved = checkpoint::read_state(&dir)
            .and_then(|saved| saved.check_resumable(&dir.join("trainer_state.json"), &target).map(|()| saved))
            .and_then(|saved| checkpoint::restore(&dir, &mut trainer, &saved).map(|()| saved))
            .map_err(|e| match picked {
                true => TrainError::Checkpoint(format!("{e} (--resume auto took the newest checkpoint; pass --resume <dir> to resume from an earlier one)")),
                false => e,
            })?;
        eprintln!("vsft: resumed from {} (step {})", dir.display(), saved.global_step);
        state = TrainerState { total_steps, ..saved };
    }

    let report_to = recipe.train.report_to.parsed().map_err(TrainError::Recipe)?;
    let mut tracker = Tracker::open(&out, &report_to)?;
    if let Some(f) = tracker.event_file() {
        eprintln!("vsft: TensorBoard events in {} (tensorboard --logdir {})", f.display(), out.join("runs").display());
    }
    write_run_info(&out, &trainer, t, None)?;
    let bar = Progress::new(total_steps, state.global_step);
    if B::name(device).contains("cubecl") && state.global_step < total_steps {
        bar.starting("the first step compiles and autotunes this backend's kernels (a minute or more; cached for later runs)");
    }
    let started = Instant::now();
    let mut window = LogWindow::new();
    let mut evaluated_at = None; // the step of the last evaluation, so that the end does not repeat it
    let mut losses = Vec::new();
    // A refused loader setting fails here, before the first step, not at the first batch.
    let mut loader = DataLoader::try_new(first_source, processor.clone(), lcfg.clone(), state.cursor)?;
    let mut skips = vsft_data::SkipStats::default();
    let rows_skipped_before = state.rows_skipped;
    let mut interrupted = false;
    'steps: while state.global_step < total_steps {
        if INTERRUPTED.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let mut micro = Vec::with_capacity(t.grad_accum);
        let waiting = Instant::now();
        while micro.len() < t.grad_accum {
            match loader.next() {
                Some(batch) => {
                    let batch = batch?;
                    if batch.all_labels_masked {
                        state.batches_all_masked += 1;
                        bar.println(format!("vsft: warning: a batch of rows {:?} has no label tokens; not trained on", batch.rows));
                        continue;
                    }
                    micro.push(batch);
                }
                None => {
                    let next = Cursor { seed: t.seed, epoch: state.cursor.epoch + 1, position: 0 };
                    let done = t.max_steps == 0 && next.epoch as usize >= t.epochs;
                    if !done {
                        skips.merge(loader.skipped());
                        loader = DataLoader::new(open_train()?, processor.clone(), lcfg.clone(), next);
                        state.cursor = next;
                    }
                    // The epoch's last step may be short, as in transformers.
                    if !micro.is_empty() {
                        break;
                    }
                    if done || rows == 0 {
                        break 'steps;
                    }
                }
            }
        }
        if micro.is_empty() {
            break;
        }
        window.data_wait += waiting.elapsed();
        let lr = t.lr * lr_lambda(t.scheduler, state.global_step, warmup, total_steps);
        let stats = trainer.step(&micro, lr, state.global_step, t.on_nan == "skip")?;
        state.global_step += 1;
        state.optimizer_step = trainer.optimizer.step;
        state.cursor = loader.cursor();
        state.epoch = state.cursor.epoch as f64 + state.cursor.position as f64 / rows.max(1) as f64;
        let Some(stats) = stats else {
            bar.println(format!("vsft: step {}: non-finite loss, step skipped", state.global_step));
            continue;
        };
        losses.push(stats.loss);
        state.last_loss = Some(stats.loss);
        state.num_tokens += stats.tokens as u64;
        window.add(&stats);
        let view = StepView { step: state.global_step, loss: stats.loss, lr, tokens_per_s: window.per_second(window.tokens) };
        bar.stepped(&view);
        if state.global_step % t.log_steps.max(1) == 0 || state.global_step == total_steps {
            bar.logged(&view);
            let mut record = window.record(&state, lr, &stats);
            for (key, group_lr) in [("learning_rate_projector", t.projector_lr), ("learning_rate_vision", t.vision_lr.filter(|_| !t.freeze_vision_tower))] {
                if let Some(base) = group_lr {
                    record[key] = serde_json::json!(base * lr / t.lr);
                }
            }
            record["elapsed_s"] = serde_json::json!(started.elapsed().as_secs_f64());
            tracker.log(&record)?;
            window = LogWindow::new();
        }
        if t.eval_steps > 0 && state.global_step % t.eval_steps == 0 {
            if let Some(eval) = &inputs.eval {
                evaluated_at = Some(state.global_step);
                let r = run_eval(&trainer, recipe, eval, &processor)?;
                state.last_eval_loss = Some(r.loss);
                tracker.log(&eval_record(&state, &r))?;
                vsft_track::report::write_report(&out)?;
                bar.println(format!("vsft: step {}: eval loss {:.4}", state.global_step, r.loss));
            }
        }
        if t.save_steps > 0 && state.global_step % t.save_steps == 0 && state.global_step < total_steps {
            let dir = save(&out, &trainer, &state, &lora_cfg, &targeted, &recipe_toml, t.save_total_limit)?;
            on_checkpoint(&dir)?;
        }
    }
    bar.finish();
    skips.merge(loader.skipped());
    state.rows_skipped = rows_skipped_before.saturating_add(skips.total());
    write_run_info(&out, &trainer, t, (skips.total() > 0).then(|| skips.report()))?;
    if !interrupted && evaluated_at != Some(state.global_step) {
        if let Some(eval) = &inputs.eval {
            let r = run_eval(&trainer, recipe, eval, &processor)?;
            state.last_eval_loss = Some(r.loss);
            tracker.log(&eval_record(&state, &r))?;
        }
    }
    vsft_track::report::write_report(&out)?;
    let last_checkpoint = save(&out, &trainer, &state, &lora_cfg, &targeted, &recipe_toml, t.save_total_limit)?;
    if interrupted {
        eprintln!("vsft: interrupted: saved {} (resume with --resume auto)", last_checkpoint.display());
    }
    if state.rows_skipped > 0 {
        eprintln!("vsft: {} rows skipped:\n{}", state.rows_skipped, skips.report());
    }
    if state.batches_all_masked > 0 {
        eprintln!("vsft: {} batches had no label tokens and were not trained on", state.batches_all_masked);
    }
    Ok(RunSummary {
        steps: state.global_step,
        final_loss: state.last_loss,
        final_eval_loss: state.last_eval_loss,
        last_checkpoint,
        interrupted,
        rows_skipped: state.rows_skipped,
        losses,
    })
}

/// `train.output_dir`, created if needed; a path that is a file, or cannot be created, is an
/// error naming the key.
fn create_output_dir(out: &Path) -> Result<(), TrainError> {
    if out.exists() && !out.is_dir() {
        return Err(TrainError::Recipe(format!("train.output_dir: {} exists and is not a directory", out.display())));
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::Recipe(format!("train.output_dir: cannot create {}: {e}", out.display())))
}

fn save<B: AutodiffBackend>(
    out: &Path,
    trainer: &Trainer<B>,
    state: &TrainerState,
    lora: &LoraConfig,
    targeted: &[String],
    recipe_toml: &str,
    limit: usize,
) -> Result<PathBuf, TrainError> {
    let lora = (!targeted.is_empty()).then_some((lora, targeted));
    checkpoint::save(out, CheckpointContent { trainer, state, lora, recipe_toml }, limit)
}

fn run_eval<B: AutodiffBackend>(trainer: &Trainer<B>, recipe: &Recipe, eval: &str, processor: &Arc<Processor>) -> Result<EvalResult, TrainError> {
    let source = open_dataset(eval, Some("test"), recipe.data.image_folder.as_deref().map(Path::new))?;
    let cfg = loader_config(recipe, recipe.train.batch_size, false)?;
    let loader = DataLoader::new(source, processor.clone(), cfg, Cursor::default());
    evaluate(&trainer.model.valid(), loader)
}
