//! `vsft train`: the recipe, top to bottom — load the model, set up the stage (what trains),
//! stream the data, step, log, evaluate, checkpoint, resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ElementConversion;
use vsft_data::{open_dataset, Batch, CollatorConfig, Cursor, DataLoader, LoaderConfig, Processor, Shard};
use vsft_model::lora::LoraConfig;
use vsft_model::VlmModel;

use crate::checkpoint::{self, CheckpointContent, TrainerState};
use crate::distributed::{all_reduce_scalars, Communicator, SingleRank};
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

fn loader_config(recipe: &Recipe, batch_size: usize, shuffle: bool, shard: Shard) -> Result<LoaderConfig, TrainError> {
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
        shard,
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
    pub batches: usize,
}

impl EvalResult {
    /// The whole evaluation set's result from each rank's part of it.
    fn reduce<B: Backend>(self, comm: &dyn Communicator<B>, device: &B::Device) -> Result<Self, TrainError> {
        if comm.world_size() == 1 {
            return Ok(self);
        }
        let mine = [self.loss * self.label_tokens as f64, self.label_tokens as f64, self.examples as f64, self.mean_token_accuracy * self.batches as f64, self.batches as f64];
        let r = all_reduce_scalars(comm, &mine, device)?;
        let (tokens, batches) = (r[1].round() as usize, r[4].round() as usize);
        Ok(EvalResult { loss: r[0] / tokens.max(1) as f64, label_tokens: tokens, examples: r[2].round() as usize, mean_token_accuracy: r[3] / batches.max(1) as f64, batches })
    }
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
    Ok(EvalResult { loss: sum / tokens.max(1) as f64, label_tokens: tokens, examples, mean_token_accuracy: accuracy / batches_seen.max(1) as f64, batches: batches_seen })
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
    train_rank::<B>(recipe, inputs, resume, device, on_checkpoint, &SingleRank)
}

/// One rank of a data-parallel run: every rank of `comm` calls this with the same recipe.
/// Each micro-batch of the recipe's `batch_size` rows is this rank's part of a global batch
/// of `batch_size × world` rows (the loader's [`Shard`]), so the job trains on what one
/// device would at batch `batch_size × world`. A global batch without a label token is
/// skipped by every rank alike, a Ctrl-C stops every rank at the same step, evaluation is
/// sharded and reduced, and rank 0 alone logs and writes (checkpoints, after checking that
/// the ranks' weights agree). With [`SingleRank`] this is the one-device run.
pub fn train_rank<B: AutodiffBackend>(
    recipe: &Recipe,
    inputs: &Inputs,
    resume: Resume,
    device: &B::Device,
    on_checkpoint: &mut dyn FnMut(&Path) -> Result<(), TrainError>,
    comm: &dyn Communicator<B::InnerBackend>,
) -> Result<RunSummary, TrainError> {
    install_ctrlc();
    let (lead, world) = (comm.rank() == 0, comm.world_size());
    INTERRUPTED.store(false, Ordering::SeqCst);
    let say = |msg: String| {
        if lead {
            eprintln!("{msg}");
        }
    };
    let t = &recipe.train;
    let out = recipe.output_dir();
    let recipe_toml = recipe.to_toml();
    if lead {
        create_output_dir(&out)?;
        let resolved = out.join("recipe.toml");
        std::fs::write(&resolved, &recipe_toml).map_err(|e| TrainError::io(&resolved, e))?;
    }

    // Model and stage.
    say(format!("vsft: loading {}", inputs.model_dir.display()));
    // Validated when the recipe was read.
    let frozen_dtype = vsft_model::StoredDtype::from_torch_name(&recipe.model.dtype).unwrap_or(vsft_model::StoredDtype::F32);
    let mut model = VlmModel::<B>::load_with(&inputs.model_dir, device, frozen_dtype)?;
    say(format!("vsft: model family {} ({})", model.family().model_type(), model.family().architecture()));
    if frozen_dtype != vsft_model::StoredDtype::F32 {
        say(format!("vsft: frozen weights in {} (projector, LoRA and optimizer state in f32)", recipe.model.dtype));
    }
    if let Some(p) = &recipe.model.projector {
        model = load_projector(model, Path::new(p)).map_err(|e| TrainError::Recipe(format!("model.projector: {e}")))?;
        say(format!("vsft: projector from {p}"));
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
    let inner_device = trainer.inner_device();
    trainer.gradient_checkpointing = recipe.train.gradient_checkpointing;
    if trainer.gradient_checkpointing {
        say("vsft: gradient checkpointing: decoder layers re-run one at a time in backward".into());
    }
    say(format!("vsft: stage {:?}", t.stage));
    for g in trainer.group_report() {
        match g.lr {
            Some(lr) if g.trains => say(format!("  {:<24} trains  {:>12} params  lr {lr:e}", g.name, g.params)),
            _ => say(format!("  {:<24} frozen  {:>12} params", g.name, g.params)),
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
    let lcfg = loader_config(recipe, t.batch_size, t.shuffle, Shard { rank: comm.rank(), world })?;
    let global_batch = t.batch_size * world;
    let batches_per_epoch = rows.div_ceil(global_batch).max(1);
    let steps_per_epoch = batches_per_epoch.div_ceil(t.grad_accum).max(1);
    let total_steps = if t.max_steps > 0 { t.max_steps } else { t.epochs.saturating_mul(steps_per_epoch) };
    let warmup = warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio);
    let ranks = if world > 1 { format!("{world} ranks × ") } else { String::new() };
    say(format!(
        "vsft: {rows} rows, {steps_per_epoch} steps per epoch, {total_steps} steps, batch {ranks}{}×{} (global {}), warmup {warmup}",
        t.batch_size,
        t.grad_accum,
        global_batch * t.grad_accum
    ));

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
        say(format!("vsft: resumed from {} (step {})", dir.display(), saved.global_step));
        state = TrainerState { total_steps, ..saved };
    }
    // Every rank starts from rank 0's weights (they agree already: same seed, same checkpoint).
    trainer.broadcast_trainable(comm)?;

    let report_to = recipe.train.report_to.parsed().map_err(TrainError::Recipe)?;
    let mut tracker = if lead { Some(Tracker::open(&out, &report_to)?) } else { None };
    if let Some(f) = tracker.as_ref().and_then(|t| t.event_file()) {
        eprintln!("vsft: TensorBoard events in {} (tensorboard --logdir {})", f.display(), out.join("runs").display());
    }
    if lead {
        write_run_info(&out, &trainer, t, None)?;
    }
    let bar = if lead { Progress::new(total_steps, state.global_step) } else { Progress::silent(total_steps, state.global_step) };
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
        // A Ctrl-C (seen by one process, or one rank first) stops every rank at this step.
        let stop = INTERRUPTED.load(Ordering::SeqCst);
        let stop = if world > 1 { all_reduce_scalars(comm, &[stop as u8 as f64], &inner_device)?[0] > 0.0 } else { stop };
        if stop {
            interrupted = true;
            break;
        }
        let mut micro = Vec::with_capacity(t.grad_accum);
        let mut slots = 0;
        let waiting = Instant::now();
        while slots < t.grad_accum {
            match loader.next_slot() {
                Some(slot) => {
                    let slot = slot?;
                    // Whether the global batch has a label token: every rank takes the same decision.
                    let labelled = slot.as_ref().is_some_and(|b| !b.all_labels_masked);
                    let labelled = if world > 1 { all_reduce_scalars(comm, &[labelled as u8 as f64], &inner_device)?[0] > 0.0 } else { labelled };
                    if !labelled {
                        if slot.is_some() {
                            state.batches_all_masked += 1;
                            let rows = slot.as_ref().map(|b| format!("{:?}", b.rows)).unwrap_or_default();
                            bar.println(format!("vsft: warning: a batch of rows {rows} has no label tokens; not trained on"));
                        }
                        continue;
                    }
                    slots += 1;
                    micro.extend(slot.filter(|b| !b.all_labels_masked));
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
                    if slots > 0 {
                        break;
                    }
                    if done || rows == 0 {
                        break 'steps;
                    }
                }
            }
        }
        if slots == 0 {
            break;
        }
        window.data_wait += waiting.elapsed();
        let lr = t.lr * lr_lambda(t.scheduler, state.global_step, warmup, total_steps);
        let stats = trainer.step_across(&micro, lr, state.global_step, t.on_nan == "skip", comm)?;
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
            if world > 1 {
                // The job's tokens/s is `tokens_per_s`; each rank's share, and the time in collectives.
                record["world_size"] = serde_json::json!(world);
                record["tokens_per_s_per_rank"] = serde_json::json!(record["tokens_per_s"].as_f64().unwrap_or(0.0) / world as f64);
                record["communication_seconds"] = serde_json::json!(stats.communication_seconds);
            }
            if let Some(tracker) = tracker.as_mut() {
                tracker.log(&record)?;
            }
            window = LogWindow::new();
        }
        if t.eval_steps > 0 && state.global_step % t.eval_steps == 0 {
            if let Some(eval) = &inputs.eval {
                evaluated_at = Some(state.global_step);
                let r = run_eval(&trainer, recipe, eval, &processor, comm)?;
                state.last_eval_loss = Some(r.loss);
                if let Some(tracker) = tracker.as_mut() {
                    tracker.log(&eval_record(&state, &r))?;
                    vsft_track::report::write_report(&out)?;
                }
                bar.println(format!("vsft: step {}: eval loss {:.4}", state.global_step, r.loss));
            }
        }
        if t.save_steps > 0 && state.global_step % t.save_steps == 0 && state.global_step < total_steps {
            let dir = save(&out, &trainer, &state, &lora_cfg, &targeted, &recipe_toml, t.save_total_limit, comm)?;
            if lead {
                on_checkpoint(&dir)?;
            }
        }
    }
    bar.finish();
    skips.merge(loader.skipped());
    // Each rank skipped bad rows of its own part: the job's count is their sum.
    let skipped_here = skips.total();
    let skipped_all = if world > 1 { all_reduce_scalars(comm, &[skipped_here as f64], &inner_device)?[0].round() as usize } else { skipped_here };
    state.rows_skipped = rows_skipped_before.saturating_add(skipped_all);
    if lead {
        write_run_info(&out, &trainer, t, (skipped_here > 0).then(|| skips.report()))?;
    }
    if !interrupted && evaluated_at != Some(state.global_step) {
        if let Some(eval) = &inputs.eval {
            let r = run_eval(&trainer, recipe, eval, &processor, comm)?;
            state.last_eval_loss = Some(r.loss);
            if let Some(tracker) = tracker.as_mut() {
                tracker.log(&eval_record(&state, &r))?;
            }
        }
    }
    if lead {
        vsft_track::report::write_report(&out)?;
    }
    let last_checkpoint = save(&out, &trainer, &state, &lora_cfg, &targeted, &recipe_toml, t.save_total_limit, comm)?;
    if interrupted {
        say(format!("vsft: interrupted: saved {} (resume with --resume auto)", last_checkpoint.display()));
    }
    if state.rows_skipped > 0 {
        say(format!("vsft: {} rows skipped{}:\n{}", state.rows_skipped, if world > 1 { " (rank 0's listed)" } else { "" }, skips.report()));
    }
    if state.batches_all_masked > 0 {
        say(format!("vsft: {} batches had no label tokens and were not trained on", state.batches_all_masked));
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

/// Writes a checkpoint (rank 0) once every rank's weights are checked to agree; every rank
/// returns its path.
#[allow(clippy::too_many_arguments)]
fn save<B: AutodiffBackend>(
    out: &Path,
    trainer: &Trainer<B>,
    state: &TrainerState,
    lora: &LoraConfig,
    targeted: &[String],
    recipe_toml: &str,
    limit: usize,
    comm: &dyn Communicator<B::InnerBackend>,
) -> Result<PathBuf, TrainError> {
    trainer.check_ranks_agree(comm)?;
    let dir = if comm.rank() == 0 {
        let lora = (!targeted.is_empty()).then_some((lora, targeted));
        checkpoint::save(out, CheckpointContent { trainer, state, lora, recipe_toml }, limit)?
    } else {
        checkpoint::checkpoint_dir(out, state.global_step)
    };
    if comm.world_size() > 1 {
        // The others wait until it is complete (a rank that reads it next, to resume, finds it).
        all_reduce_scalars(comm, &[0.0], &trainer.inner_device())?;
    }
    Ok(dir)
}

/// The evaluation set's loss: each rank evaluates its shard, and the results are reduced.
fn run_eval<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    recipe: &Recipe,
    eval: &str,
    processor: &Arc<Processor>,
    comm: &dyn Communicator<B::InnerBackend>,
) -> Result<EvalResult, TrainError> {
    let source = open_dataset(eval, Some("test"), recipe.data.image_folder.as_deref().map(Path::new))?;
    let cfg = loader_config(recipe, recipe.train.batch_size, false, Shard { rank: comm.rank(), world: comm.world_size() })?;
    let loader = DataLoader::new(source, processor.clone(), cfg, Cursor::default());
    evaluate(&trainer.model.valid(), loader)?.reduce(comm, &trainer.inner_device())
}
