//! vsft-train: LLaVA's two-stage recipe over Burn autodiff.
//!
//! Data path: recipe ([`recipe`]) → batches (vsft-data) → [`trainer`] (forward, token-weighted
//! loss, backward, clipping, [`optim`] AdamW; across ranks through [`distributed`]) → [`checkpoint`] (safetensors, atomic, exact resume).

pub mod checkpoint;
pub mod distributed;
pub mod error;
pub mod export;
pub mod kernel_cache;
pub mod metrics;
pub mod nccl;
pub mod optim;
pub mod progress;
pub mod recipe;
pub mod rendezvous;
pub mod run;
pub mod trainer;

pub use error::{read_text_limited, TrainError};
pub use recipe::{GenerateEval, Recipe, Stage};
pub use trainer::Trainer;
