//! The metric sinks: every log record goes to `metrics.jsonl`, and to TensorBoard when the
//! recipe asks (`train.report_to = ["jsonl", "tensorboard"]`), under `output_dir/runs/`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrackError};
use crate::tensorboard::EventWriter;

/// Where metrics go, by the names transformers' `report_to` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportTo {
    Jsonl,
    Tensorboard,
}

impl ReportTo {
    pub const NAMES: &'static [&'static str] = &["jsonl", "tensorboard"];

    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "jsonl" => Ok(ReportTo::Jsonl),
            "tensorboard" => Ok(ReportTo::Tensorboard),
            "wandb" | "mlflow" | "comet_ml" | "clearml" | "neptune" | "dvclive" | "swanlab" | "trackio" => Err(format!(
                "{name:?} is a cloud tracker, which vsft does not send to; use \"tensorboard\" (event files under output_dir/runs/, which W&B and others can import)"
            )),
            other => Err(format!("must be one of {:?}, found {other:?}", Self::NAMES)),
        }
    }
}

/// The TensorBoard tag of a log key, as transformers' `rewrite_logs` makes it:
/// `eval_loss` → `eval/loss`, `loss` → `train/loss`.
pub fn tensorboard_tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

pub struct Tracker {
    jsonl_path: PathBuf,
    jsonl: std::fs::File,
    tensorboard: Option<EventWriter>,
}

impl Tracker {
    /// Appends to `output_dir/metrics.jsonl` (a resumed run continues it) and, with
    /// TensorBoard, starts a new event file under `output_dir/runs/`.
    pub fn open(output_dir: &Path, report_to: &[ReportTo]) -> Result<Self> {
        let jsonl_path = output_dir.join("metrics.jsonl");
        let jsonl = std::fs::OpenOptions::new().create(true).append(true).open(&jsonl_path).map_err(|e| TrackError::io(&jsonl_path, e))?;
        let tensorboard = if report_to.contains(&ReportTo::Tensorboard) { Some(EventWriter::create(&output_dir.join("runs"), now())?) } else { None };
        Ok(Tracker { jsonl_path, jsonl, tensorboard })
    }

    /// The event file being written, if any.
    pub fn event_file(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(|w| w.path())
    }

    /// One log record: an object with `step` and numeric (or null) values.
    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.jsonl, "{record}").and_then(|_| self.jsonl.flush()).map_err(|e| TrackError::io(&self.jsonl_path, e))?;
        if let Some(tb) = &mut self.tensorboard {
            let step = record["step"].as_u64().unwrap_or(0);
            let wall = now();
            if let Some(fields) = record.as_object() {
                for (key, value) in fields {
                    if key == "step" {
                        continue;
                    }
                    if let Some(v) = value.as_f64() {
                        tb.scalar(&tensorboard_tag(key), step, v as f32, wall)?;
                    }
                }
            }
            tb.flush()?;
        }
        Ok(())
    }
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
