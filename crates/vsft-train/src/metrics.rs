//! What a run logs, under the names TRL uses where one exists: `loss`, `learning_rate`,
//! `grad_norm`, `mean_token_accuracy`, `num_tokens`, `epoch`, `eval_loss`,
//! `eval_mean_token_accuracy`; and vsft's own throughput figures (tokens, samples and images
//! per second, the share of the step spent waiting for data, peak memory).

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use serde_json::{json, Value};

use crate::checkpoint::TrainerState;
use crate::error::TrainError;
use crate::recipe::TrainSection;
use crate::run::EvalResult;
use crate::trainer::{StepStats, Trainer};

static DEVICE_MEMORY: OnceLock<fn() -> Option<u64>> = OnceLock::new();

/// Set once by the binary, which knows its backend: how many bytes the device's memory pool
/// holds. Logged as `device_memory_mb` at each log step (GPU backends only).
pub fn set_device_memory_probe(probe: fn() -> Option<u64>) {
    let _ = DEVICE_MEMORY.set(probe);
}

/// What accumulates between two log steps.
pub struct LogWindow {
    since: Instant,
    steps: usize,
    loss: f64,
    accuracy: f64,
    pub tokens: usize,
    samples: usize,
    images: usize,
    pub data_wait: Duration,
}

impl LogWindow {
    pub fn new() -> Self {
        LogWindow { since: Instant::now(), steps: 0, loss: 0.0, accuracy: 0.0, tokens: 0, samples: 0, images: 0, data_wait: Duration::ZERO }
    }

    pub fn add(&mut self, s: &StepStats) {
        self.steps += 1;
        self.loss += s.loss;
        self.accuracy += s.mean_token_accuracy;
        self.tokens += s.tokens;
        self.samples += s.samples;
        self.images += s.images;
    }

    pub fn per_second(&self, n: usize) -> f64 {
        n as f64 / self.since.elapsed().as_secs_f64().max(1e-9)
    }

    /// The log record of the window: means over its steps, rates over its wall time.
    pub fn record(&self, state: &TrainerState, lr: f64, last: &StepStats) -> Value {
        let steps = self.steps.max(1) as f64;
        let mut r = json!({
            "step": state.global_step,
            "epoch": state.epoch,
            "loss": self.loss / steps,
            "learning_rate": lr,
            "grad_norm": last.grad_norm,
            "mean_token_accuracy": self.accuracy / steps,
            "num_tokens": state.num_tokens,
            "tokens_per_s": self.per_second(self.tokens),
            "samples_per_s": self.per_second(self.samples),
            "images_per_s": self.per_second(self.images),
            "data_wait_share": self.data_wait.as_secs_f64() / self.since.elapsed().as_secs_f64().max(1e-9),
        });
        if let Some(mb) = peak_rss_mb() {
            r["peak_rss_mb"] = json!(mb);
        }
        if let Some(bytes) = DEVICE_MEMORY.get().and_then(|probe| probe()) {
            r["device_memory_mb"] = json!(bytes as f64 / (1024.0 * 1024.0));
        }
        r
    }
}

impl Default for LogWindow {
    fn default() -> Self {
        Self::new()
    }
}

/// The record of an evaluation.
pub fn eval_record(state: &TrainerState, r: &EvalResult) -> Value {
    json!({
        "step": state.global_step, "epoch": state.epoch, "eval_loss": r.loss,
        "eval_mean_token_accuracy": r.mean_token_accuracy, "eval_label_tokens": r.label_tokens,
    })
}

/// The process's peak resident memory (`VmHWM`), in MB; `None` off Linux.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// `run_info.json` for the report: the stage, the parameter groups and what trains, and at the
/// end the skipped rows. Written atomically.
pub fn write_run_info<B: AutodiffBackend>(out: &Path, trainer: &Trainer<B>, t: &TrainSection, skipped: Option<String>) -> Result<(), TrainError> {
    let groups: Vec<Value> = trainer.group_report().iter().map(|g| json!({"name": g.name, "trains": g.trains, "params": g.params, "lr": g.lr})).collect();
    let info = json!({
        "summary": format!("stage {:?}, {} steps of batch {} × {} accumulation", t.stage, t.max_steps, t.batch_size, t.grad_accum),
        "groups": groups,
        "skipped": skipped.unwrap_or_default(),
    });
    let path = out.join("run_info.json");
    let tmp = out.join(".run_info.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&info).expect("JSON")).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))
}
