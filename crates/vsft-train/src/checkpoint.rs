//! Checkpoints: `output_dir/checkpoint-<step>/` with
//! - the trainable weights: `adapter_model.safetensors` + `adapter_config.json` (PEFT's layout)
//!   in the instruct stage, `projector.safetensors` (transformers' names) in the pretrain stage;
//! - `optimizer.safetensors`: AdamW moments keyed by parameter name (`exp_avg.<name>`, `exp_avg_sq.<name>`);
//! - `trainer_state.json`: step, epoch, data cursor, optimizer step, recipe fingerprint, skip counts.
//!
//! Written into `.tmp-checkpoint-<step>` and renamed into place, so a crash at any moment leaves
//! earlier checkpoints whole; a directory without `trainer_state.json` is never resumed from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use vsft_data::Cursor;
use vsft_model::weights::{self, read_tensor_file, PendingTensor, StoredDtype, TensorRef};

use crate::error::TrainError;
use crate::optim::Moments;
use crate::recipe::Stage;
use crate::trainer::Trainer;

fn default_model_type() -> String {
    "llava".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub total_steps: usize,
    /// Fractional epoch, as transformers logs it.
    pub epoch: f64,
    pub cursor: Cursor,
    pub optimizer_step: usize,
    pub stage: Stage,
    /// What decides the trainable parameters; a resume under a different one is refused.
    pub trainable_fingerprint: String,
    pub trainable: Vec<String>,
    pub rows_skipped: usize,
    pub batches_all_masked: usize,
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub base_model: String,
    /// The base model's `model_type` (checkpoints from before families were added are LLaVA's).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Non-pad tokens trained on so far (TRL's `num_tokens`); 0 in checkpoints that predate it.
    #[serde(default)]
    pub num_tokens: u64,
}

/// Everything a checkpoint writer needs from the run.
pub struct CheckpointContent<'a, B: AutodiffBackend> {
    pub trainer: &'a Trainer<B>,
    pub state: &'a TrainerState,
    pub lora: Option<(&'a vsft_model::lora::LoraConfig, &'a [String])>,
    pub recipe_toml: &'a str,
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Complete checkpoints (those with a `trainer_state.json`), oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path().join("trainer_state.json").exists().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    list_checkpoints(output_dir).pop().map(|(_, p)| p)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::io(path, e)
}

/// Writes a checkpoint atomically and applies `save_total_limit` rotation.
pub fn save<B: AutodiffBackend>(output_dir: &Path, c: CheckpointContent<'_, B>, total_limit: usize) -> Result<PathBuf, TrainError> {
    let step = c.state.global_step;
    let final_dir = checkpoint_dir(output_dir, step);
    let tmp = output_dir.join(format!(".tmp-checkpoint-{step}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let model = &c.trainer.model;
    match c.lora {
        Some((cfg, targeted)) => {
            let trains = |n: &str| c.trainer.trainable.contains_key(n);
            model.save_adapter_weights(&tmp, &trains)?;
            let json = cfg.to_peft_json(targeted, &c.state.base_model, model.as_dyn().part_names(), c.trainer.tower_trains_in_full());
            write_json(&tmp.join("adapter_config.json"), &json)?;
        }
        None => {
            let projector = model.projector_tensors();
            let pending = projector
                .iter()
                .map(|(n, t)| PendingTensor::from_tensor(n.clone(), t))
                .collect();
            weights::write_safetensors(&tmp.join("projector.safetensors"), pending, StoredDtype::F32)?;
        }
    }
    test_pause_hook();
    // Optimizer moments by parameter name.
    let moments: Vec<(String, TensorRef<B::InnerBackend>)> = c
        .trainer
        .optimizer
        .state
        .iter()
        .flat_map(|(name, m)| {
            let n = m.exp_avg.dims()[0];
            [
                (format!("exp_avg.{name}"), TensorRef { shape: vec![n], flat: m.exp_avg.clone() }),
                (format!("exp_avg_sq.{name}"), TensorRef { shape: vec![n], flat: m.exp_avg_sq.clone() }),
            ]
        })
        .collect();
    let pending = moments.iter().map(|(n, t)| PendingTensor::from_tensor(n.clone(), t)).collect();
    weights::write_safetensors(&tmp.join("optimizer.safetensors"), pending, StoredDtype::F32)?;
    // Exact resume needs the trainable tensors bit for bit, under vsft's names too.
    let values = c.trainer.trainable_values();
    let refs: Vec<(String, TensorRef<B::InnerBackend>)> = values
        .into_iter()
        .map(|(n, t)| {
            let len = t.dims()[0];
            (n, TensorRef { shape: vec![len], flat: t })
        })
        .collect();
    let pending = refs.iter().map(|(n, t)| PendingTensor::from_tensor(n.clone(), t)).collect();
    weights::write_safetensors(&tmp.join("trainable.safetensors"), pending, StoredDtype::F32)?;
    std::fs::write(tmp.join("recipe.toml"), c.recipe_toml).map_err(io(&tmp))?;
    // trainer_state.json last: its presence marks a complete checkpoint.
    write_json(&tmp.join("trainer_state.json"), &serde_json::to_value(c.state).expect("state serialises"))?;
    sync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    sync_dir(output_dir);
    if total_limit > 0 {
        let all = list_checkpoints(output_dir);
        let excess = all.len().saturating_sub(total_limit);
        for (_, dir) in all.into_iter().filter(|(s, _)| *s != step).take(excess) {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
    }
    Ok(final_dir)
}

/// Test hook: `VSFT_TEST_PAUSE_IN_CHECKPOINT_MS` sleeps in the middle of a checkpoint write so
/// that a test can kill the process there.
fn test_pause_hook() {
    if let Some(ms) = std::env::var("VSFT_TEST_PAUSE_IN_CHECKPOINT_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), TrainError> {
    std::fs::write(path, serde_json::to_string_pretty(v).expect("json")).map_err(io(path))
}

/// The largest `trainer_state.json` read (one holds a few kilobytes: the names of the trained
/// parameters and a handful of numbers).
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// A checkpoint's `trainer_state.json`, read with a bounded read and checked for values no run
/// writes (a negative or non-finite epoch, more optimizer steps than steps, counters near
/// overflow). A missing directory or file, or a damaged one, is an error naming it.
pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    if !dir.is_dir() {
        let what = if dir.exists() { "is not a directory" } else { "does not exist" };
        return Err(TrainError::Checkpoint(format!("{}: {what}; expected a checkpoint directory written by vsft train (checkpoint-<step>)", dir.display())));
    }
    let p = dir.join("trainer_state.json");
    if !p.exists() {
        return Err(TrainError::Checkpoint(format!(
            "{}: missing: {} is not a complete vsft checkpoint (a checkpoint is complete once its trainer_state.json is written)",
            p.display(),
            dir.display()
        )));
    }
    let text = crate::error::read_text_limited(&p, MAX_STATE_BYTES, "a trainer state (JSON)")?;
    // The path names the field (`global_step: invalid value: integer `-1`, expected usize`).
    let state: TrainerState = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
        .map_err(|e| {
            let field = match e.path().to_string() {
                at if at == "." => String::new(),
                at => format!("field `{at}`: "),
            };
            TrainError::Checkpoint(format!("{}: not a valid trainer state: {field}{}", p.display(), e.inner()))
        })?;
    state.check(&p)?;
    Ok(state)
}

/// Counters beyond this were not written by a training run (and would overflow when added to).
const MAX_COUNTER: usize = 1 << 48;

/// What a resumed run is: a checkpoint must agree with it to be resumed.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeTarget<'a> {
    pub stage: Stage,
    pub model_type: &'a str,
    pub trainable_fingerprint: &'a str,
    /// Rows of the training data.
    pub rows: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    /// `train.epochs`, and `train.max_steps` (0: the epochs decide).
    pub epochs: usize,
    pub max_steps: usize,
}

impl TrainerState {
    /// Values no run writes, whatever the recipe.
    fn check(&self, file: &Path) -> Result<(), TrainError> {
        let bad = |field: &str, allowed: String, found: String| {
            Err(TrainError::Checkpoint(format!("{}: {field} must be {allowed}, found {found}", file.display())))
        };
        for (field, value) in [
            ("global_step", self.global_step),
            ("total_steps", self.total_steps),
            ("optimizer_step", self.optimizer_step),
            ("cursor.position", self.cursor.position),
            ("rows_skipped", self.rows_skipped),
            ("batches_all_masked", self.batches_all_masked),
        ] {
            if value > MAX_COUNTER {
                return bad(field, format!("at most {MAX_COUNTER}"), value.to_string());
            }
        }
        if self.cursor.epoch > MAX_COUNTER as u64 {
            return bad("cursor.epoch", format!("at most {MAX_COUNTER}"), self.cursor.epoch.to_string());
        }
        if !self.epoch.is_finite() || self.epoch < 0.0 {
            return bad("epoch", "a finite number ≥ 0".into(), self.epoch.to_string());
        }
        if self.optimizer_step > self.global_step {
            return bad("optimizer_step", format!("at most global_step ({})", self.global_step), self.optimizer_step.to_string());
        }
        for (field, loss) in [("last_loss", self.last_loss), ("last_eval_loss", self.last_eval_loss)] {
            if loss.is_some_and(|l| !l.is_finite()) {
                return bad(field, "a finite number or null".into(), format!("{loss:?}"));
            }
        }
        Ok(())
    }

    /// Refuses to resume a run from a checkpoint of another stage, model or trainable set, or
    /// one whose step or data cursor lies past this run's schedule or data, naming the field of
    /// `file` (the checkpoint's `trainer_state.json`).
    pub fn check_resumable(&self, file: &Path, run: &ResumeTarget<'_>) -> Result<(), TrainError> {
        let refuse = |message: String| Err(TrainError::Checkpoint(format!("{}: {message}", file.display())));
        if self.stage != run.stage {
            return refuse(format!(
                "stage is \"{}\" but the recipe's train.stage is \"{}\": resume with the recipe the checkpoint was trained with, or use a new train.output_dir",
                stage_name(self.stage),
                stage_name(run.stage)
            ));
        }
        if self.model_type != run.model_type {
            return refuse(format!(
                "model_type is \"{}\" but the recipe's model.path is a \"{}\" model",
                crate::error::excerpt(&self.model_type),
                run.model_type
            ));
        }
        if self.trainable_fingerprint != run.trainable_fingerprint {
            return refuse(format!(
                "trainable_fingerprint: the recipe changes what is trained: checkpoint {} vs recipe {}",
                crate::error::excerpt(&self.trainable_fingerprint),
                run.trainable_fingerprint
            ));
        }
        if self.global_step > run.total_steps {
            return refuse(format!(
                "global_step is {}, past the {} steps of this run (train.epochs / train.max_steps)",
                self.global_step, run.total_steps
            ));
        }
        if self.cursor.position > run.rows {
            return refuse(format!("cursor.position is {}, past the {} rows of the training data", self.cursor.position, run.rows));
        }
        // Each epoch takes at least one step, and a run over epochs stops within the last one.
        let epoch_limit = if run.max_steps == 0 { run.epochs.saturating_sub(1) } else { run.total_steps };
        if self.cursor.epoch > epoch_limit as u64 {
            return refuse(format!("cursor.epoch is {}, past this run's last epoch ({epoch_limit})", self.cursor.epoch));
        }
        Ok(())
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Pretrain => "pretrain",
        Stage::Instruct => "instruct",
    }
}

/// Names for a message: the first few, and how many there are.
fn some_names(names: &[&String]) -> String {
    match names {
        [] => "none".into(),
        [one] => one.to_string(),
        [first, ..] => format!("{first} and {} more", names.len() - 1),
    }
}

/// Restores trainable weights and optimizer moments into `trainer`; refuses a checkpoint whose
/// trainable parameters differ from the run's, saying what differs, and one whose tensors do not
/// fit the parameters, naming the file and the tensor.
pub fn restore<B: AutodiffBackend>(dir: &Path, trainer: &mut Trainer<B>, state: &TrainerState) -> Result<(), TrainError> {
    let sizes: BTreeMap<String, usize> = trainer.trainable_values().into_iter().map(|(n, t)| (n, t.dims()[0])).collect();
    let expected: Vec<String> = trainer.trainable.keys().cloned().collect();
    if state.trainable != expected {
        let missing: Vec<&String> = expected.iter().filter(|n| !state.trainable.contains(n)).collect();
        let extra: Vec<&String> = state.trainable.iter().filter(|n| !expected.contains(n)).collect();
        return Err(TrainError::Checkpoint(format!(
            "{}: trainable: the checkpoint trains different parameters than this recipe (only in the recipe: {}; only in the checkpoint: {})",
            dir.join("trainer_state.json").display(),
            some_names(&missing),
            some_names(&extra)
        )));
    }
    let device = trainer.model.device();
    // The tensor `name` of `file`, which holds the values (or moments) of parameter `param`.
    let to_tensor = |file: &Path, name: &str, param: &str, raw: &weights::RawTensor| -> Result<Tensor<B::InnerBackend, 1>, TrainError> {
        let v = raw.to_f32()?;
        let n = v.len();
        let want = sizes.get(param).copied().unwrap_or(0);
        if n != want {
            return Err(TrainError::Checkpoint(format!(
                "{}: tensor {name} has {n} values, the model's parameter {param} has {want}",
                file.display()
            )));
        }
        Ok(Tensor::from_data(TensorData::new(v, [n]), &device))
    };
    let values_path = dir.join("trainable.safetensors");
    let raw = read_checkpoint_tensors(&values_path)?;
    let mut values = BTreeMap::new();
    for name in &expected {
        let t = raw.get(name).ok_or_else(|| TrainError::Checkpoint(format!("{}: no tensor {name}", values_path.display())))?;
        values.insert(name.clone(), to_tensor(&values_path, name, name, t)?);
    }
    let opt_path = dir.join("optimizer.safetensors");
    let raw = read_checkpoint_tensors(&opt_path)?;
    let mut moments = BTreeMap::new();
    for name in &expected {
        let (m, v) = (format!("exp_avg.{name}"), format!("exp_avg_sq.{name}"));
        if let (Some(mt), Some(vt)) = (raw.get(&m), raw.get(&v)) {
            moments.insert(name.clone(), Moments { exp_avg: to_tensor(&opt_path, &m, name, mt)?, exp_avg_sq: to_tensor(&opt_path, &v, name, vt)? });
        } else if state.optimizer_step > 0 {
            return Err(TrainError::Checkpoint(format!("{}: no moments for {name} (tensors {m} and {v})", opt_path.display())));
        }
    }
    // Only a checkpoint that checked out whole changes the trainer.
    trainer.set_trainable_values(values);
    trainer.optimizer.state = moments;
    trainer.optimizer.step = state.optimizer_step;
    Ok(())
}

/// A checkpoint's tensor file; a missing one is named as part of the checkpoint.
fn read_checkpoint_tensors(path: &Path) -> Result<BTreeMap<String, weights::RawTensor>, TrainError> {
    if !path.exists() {
        return Err(TrainError::Checkpoint(format!("{}: missing from the checkpoint", path.display())));
    }
    Ok(read_tensor_file(path)?)
}
