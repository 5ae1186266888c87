//! transformers' `ForCausalLMLoss`: shift labels left by one, ignore -100, cross-entropy.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

pub const IGNORE_INDEX: i64 = -100;

/// Summed token cross-entropy and the number of label tokens it covers, so that gradient
/// accumulation can weight micro-batches by tokens (transformers' `num_items_in_batch`).
#[derive(Debug, Clone)]
pub struct LossSum<B: Backend> {
    /// Scalar `[1]`.
    pub sum: Tensor<B, 1>,
    pub label_tokens: usize,
    /// Label tokens whose argmax prediction is the label (TRL's `mean_token_accuracy`).
    pub correct_tokens: usize,
}

impl<B: Backend> LossSum<B> {
    /// Mean over label tokens (transformers' default reduction). Zero tokens give 0.
    pub fn mean(&self) -> Tensor<B, 1> {
        self.sum.clone() / (self.label_tokens.max(1) as f64)
    }
}

/// Row `(b, t)` of a `[batch, seq]` label matrix predicts label `(b, t + 1)`; the last position
/// of each sequence predicts nothing (-100). transformers' shift, done on the host.
pub fn shifted_targets(labels: &[i64], seq: usize) -> Vec<i64> {
    (0..labels.len()).map(|i| if (i + 1) % seq == 0 { IGNORE_INDEX } else { labels[i + 1] }).collect()
}

/// `logits: [batch, seq, vocab]`, `labels: [batch, seq]` (unshifted, -100 = ignore).
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> LossSum<B> {
    let [batch, seq, vocab] = logits.dims();
    let labels: Vec<i64> = labels.into_data().iter::<i64>().collect();
    token_loss_sum(logits.reshape([batch * seq, vocab]), &shifted_targets(&labels, seq))
}

/// `Σ −log softmax(logits[r])[targets[r]]` over rows whose target is not -100, with targets
/// already shifted. On the CPU backend one fused kernel ([`vsft_kernels::cross_entropy_sum`]:
/// backward keeps one `[rows, vocab]` buffer); elsewhere Burn's log_softmax and gather, which
/// are also the reference the kernel is tested against.
pub fn token_loss_sum<B: Backend>(logits: Tensor<B, 2>, targets: &[i64]) -> LossSum<B> {
    let label_tokens = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    // Before the loss: the fused kernel reuses the logits' buffer once nothing else holds it.
    let correct_tokens = correct_predictions(&logits, targets);
    let logits = match vsft_kernels::cross_entropy_sum(logits, targets) {
        Ok(sum) => return LossSum { sum, label_tokens, correct_tokens },
        Err(logits) => logits,
    };
    let [rows, _] = logits.dims();
    let device = logits.device();
    let ignored: Vec<bool> = targets.iter().map(|&t| t == IGNORE_INDEX).collect();
    let ignored = Tensor::<B, 1, Bool>::from_data(TensorData::new(ignored, [rows]), &device);
    let safe: Vec<i64> = targets.iter().map(|&t| if t == IGNORE_INDEX { 0 } else { t }).collect();
    let safe = Tensor::<B, 1, Int>::from_data(TensorData::new(safe, [rows]), &device);
    let picked = log_softmax(logits, 1).gather(1, safe.unsqueeze_dim(1)).reshape([rows]);
    LossSum { sum: picked.mask_fill(ignored, 0.0).sum().neg(), label_tokens, correct_tokens }
}

/// Rows whose argmax is their target, as TRL counts for `mean_token_accuracy`
/// (`(logits.argmax(-1) == labels) & (labels != -100)`).
fn correct_predictions<B: Backend>(logits: &Tensor<B, 2>, targets: &[i64]) -> usize {
    let predicted = logits.clone().argmax(1).into_data();
    predicted.iter::<i64>().zip(targets).filter(|(p, &t)| t != IGNORE_INDEX && *p == t).count()
}
