//! AdamW as PyTorch computes it, over parameters keyed by name (so its state survives a reload,
//! unlike Burn's optimizer records keyed by random parameter ids), the Hugging Face learning-rate
//! schedules, and global-norm clipping as `clip_grad_norm_` does it.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

use crate::recipe::Scheduler;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// Per-parameter hyperparameters (its group's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupSettings {
    pub lr_scale: f64,
    pub weight_decay: f64,
}

#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
}

/// AdamW state keyed by parameter name.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub step: usize,
    pub state: BTreeMap<String, Moments<B>>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, state: BTreeMap::new() }
    }

    /// Begins an optimizer step (bias corrections use the step count).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// One parameter's update, `torch.optim.AdamW` (single-tensor path): decoupled weight
    /// decay first, then the moments, then `p -= lr/bc1 · m / (√v/√bc2 + eps)`.
    pub fn update(&mut self, name: &str, param: Tensor<B, 1>, grad: Tensor<B, 1>, lr: f64, decay: f64) -> Tensor<B, 1> {
        let c = self.config;
        let moments = self.state.entry(name.to_string()).or_insert_with(|| Moments {
            exp_avg: param.zeros_like(),
            exp_avg_sq: param.zeros_like(),
        });
        let param = if decay != 0.0 { param.clone() * (1.0 - lr * decay) } else { param };
        let exp_avg = moments.exp_avg.clone() * c.beta1 + grad.clone() * (1.0 - c.beta1);
        let exp_avg_sq = moments.exp_avg_sq.clone() * c.beta2 + grad.clone() * grad * (1.0 - c.beta2);
        moments.exp_avg = exp_avg.clone();
        moments.exp_avg_sq = exp_avg_sq.clone();
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let denom = exp_avg_sq.sqrt() / bc2.sqrt() + c.eps;
        param - exp_avg / denom * (lr / bc1)
    }
}

/// The learning-rate multiplier at optimizer step `step` (0-based), as transformers'
/// `get_constant_schedule_with_warmup` / `get_linear_schedule_with_warmup` /
/// `get_cosine_schedule_with_warmup` give it.
pub fn lr_lambda(kind: Scheduler, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step as f64;
    if step < warmup {
        return s / (warmup.max(1) as f64);
    }
    match kind {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => ((total as f64 - s) / ((total.saturating_sub(warmup)).max(1) as f64)).max(0.0),
        Scheduler::Cosine => {
            let progress = (s - warmup as f64) / ((total.saturating_sub(warmup)).max(1) as f64);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// `warmup_steps` if set, else `ceil(total · warmup_ratio)` (transformers' `get_warmup_steps`).
pub fn warmup_steps(total: usize, warmup_steps: usize, warmup_ratio: f64) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (total as f64 * warmup_ratio).ceil() as usize
    }
}

/// Global L2 norm over all gradients (what `clip_grad_norm_` returns).
pub fn global_norm<B: Backend>(grads: &BTreeMap<String, Tensor<B, 1>>) -> f64 {
    grads
        .values()
        .map(|g| g.clone().powi_scalar(2).sum().into_scalar().elem::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// `clip_grad_norm_`'s factor: `max_norm / (norm + 1e-6)` clamped to at most 1.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        1.0
    } else {
        (max_norm / (norm + 1e-6)).min(1.0)
    }
}
