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

pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", p.display())))
}

/// Restores trainable weights and optimizer moments into `trainer`; refuses a checkpoint whose
/// trainable parameters differ from the run's, saying what differs.
pub fn restore<B: AutodiffBackend>(dir: &Path, trainer: &mut Trainer<B>, state: &TrainerState) -> Result<(), TrainError> {
    let expected: Vec<String> = trainer.trainable.keys().cloned().collect();
    if state.trainable != expected {
        let missing: Vec<&String> = expected.iter().filter(|n| !state.trainable.contains(n)).collect();
        let extra: Vec<&String> = state.trainable.iter().filter(|n| !expected.contains(n)).collect();
        return Err(TrainError::Checkpoint(format!(
            "{}: the checkpoint trains different parameters than this recipe ({} only in the recipe, e.g. {:?}; {} only in the checkpoint, e.g. {:?})",
            dir.display(),
            missing.len(),
            missing.first(),
            extra.len(),
            extra.first()
        )));
    }
    let device = trainer.model.device();
    let shapes: BTreeMap<String, Vec<usize>> = trainer.model.named_tensors().into_iter().map(|(n, _, t)| (n, t.shape)).collect();
    // A tensor of another size than its parameter is refused by name, not reshaped into it
    // (moments are stored flat, so sizes are compared, not shapes).
    let checked = |path: &Path, key: &str, name: &str, raw: &weights::RawTensor| -> Result<(), TrainError> {
        let size = |shape: &[usize]| shape.iter().product::<usize>();
        match shapes.get(name) {
            Some(shape) if size(shape) == size(&raw.shape) => Ok(()),
            shape => Err(TrainError::Checkpoint(format!(
                "{}: tensor {key} has shape {:?}, the model's {name} has {}",
                path.display(),
                raw.shape,
                shape.map_or("no such parameter".to_string(), |s| format!("shape {s:?}"))
            ))),
        }
    };
    let to_tensor = |raw: &weights::RawTensor| -> Result<Tensor<B::InnerBackend, 1>, TrainError> {
        let v = raw.to_f32()?;
        let n = v.len();
        Ok(Tensor::from_data(TensorData::new(v, [n]), &device))
    };
    let values_path = dir.join("trainable.safetensors");
    let raw = read_tensor_file(&values_path)?;
    let mut values = BTreeMap::new();
    for name in &expected {
        let t = raw.get(name).ok_or_else(|| TrainError::Checkpoint(format!("{}: no tensor {name}", values_path.display())))?;
        checked(&values_path, name, name, t)?;
        values.insert(name.clone(), to_tensor(t)?);
    }
    trainer.set_trainable_values(values);
    let opt_path = dir.join("optimizer.safetensors");
    let raw = read_tensor_file(&opt_path)?;
    trainer.optimizer.state.clear();
    for name in &expected {
        let get = |k: String| raw.get(&k).ok_or_else(|| TrainError::Checkpoint(format!("{}: no tensor {k}", opt_path.display())));
        if let (Ok(m), Ok(v)) = (get(format!("exp_avg.{name}")), get(format!("exp_avg_sq.{name}"))) {
            checked(&opt_path, &format!("exp_avg.{name}"), name, m)?;
            checked(&opt_path, &format!("exp_avg_sq.{name}"), name, v)?;
            trainer.optimizer.state.insert(name.clone(), Moments { exp_avg: to_tensor(m)?, exp_avg_sq: to_tensor(v)? });
        } else if state.optimizer_step > 0 {
            return Err(TrainError::Checkpoint(format!("{}: no moments for {name}", opt_path.display())));
        }
    }
    trainer.optimizer.step = state.optimizer_step;
    Ok(())
}
