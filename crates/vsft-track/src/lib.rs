//! What a run leaves to watch: `metrics.jsonl` (always), TensorBoard event files (opt-in,
//! `train.report_to`), and `report.html`, a self-contained page of curves, the recipe, what
//! trains, skipped rows and sample answers.

pub mod error;
pub mod report;
pub mod tensorboard;
pub mod tracker;

pub use error::{Result, TrackError};
pub use tracker::{ReportTo, Tracker};
