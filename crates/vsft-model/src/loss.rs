//! transformers' `ForCausalLMLoss`: shift labels left by one, ignore -100, cross-entropy.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

pub const IGNORE_INDEX: i64 = -100;

/// Summed token cross-entropy and the number of label tokens it covers, so that gradient
/// accumulation can weight micro-batches by tokens (transformers' `num_items_in_batch`).
#[derive(Debug, Clone)]
pub struct LossSum<B: Backend> {
    /// Scalar `[1]`.
    pub sum: Tensor<B, 1>,
    pub label_tokens: usize,
}

impl<B: Backend> LossSum<B> {
    /// Mean over label tokens (transformers' default reduction). Zero tokens give 0.
    pub fn mean(&self) -> Tensor<B, 1> {
        self.sum.clone() / (self.label_tokens.max(1) as f64)
    }
}

/// `logits: [batch, seq, vocab]`, `labels: [batch, seq]` (unshifted, -100 = ignore).
///
/// On the CPU backend this is one fused kernel ([`vsft_kernels::cross_entropy_sum`]): the
/// shifted targets are built on the host, so nothing is sliced, and backward keeps one
/// `[rows, vocab]` buffer. Elsewhere it is [`causal_lm_loss_composed`].
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> LossSum<B> {
    let [batch, seq, _] = logits.dims();
    if seq < 2 || !vsft_kernels::supported(&[&logits]) {
        return causal_lm_loss_composed(logits, labels);
    }
    let labels: Vec<i64> = labels.into_data().iter::<i64>().collect();
    // Row (b, t) predicts label (b, t + 1); the last position of each row predicts nothing.
    let targets: Vec<i64> = (0..batch * seq)
        .map(|i| if (i + 1) % seq == 0 { IGNORE_INDEX } else { labels[i + 1] })
        .collect();
    let label_tokens = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    match vsft_kernels::cross_entropy_sum(logits, &targets) {
        Ok(sum) => LossSum { sum, label_tokens },
        Err(_) => unreachable!("supported() was checked"),
    }
}

/// The loss from Burn's own ops (log_softmax, gather): the reference the fused kernel is
/// tested against, and the path on GPU backends.
pub fn causal_lm_loss_composed<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> LossSum<B> {
    let [batch, seq, vocab] = logits.dims();
    let device = logits.device();
    if seq < 2 {
        return LossSum { sum: Tensor::zeros([1], &device), label_tokens: 0 };
    }
    let logits = logits.slice([0..batch, 0..seq - 1, 0..vocab]).reshape([batch * (seq - 1), vocab]);
    let targets = labels.slice([0..batch, 1..seq]).reshape([batch * (seq - 1)]);
    let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
    let label_tokens = valid.clone().int().sum().into_scalar().elem::<i64>() as usize;
    let safe_targets = targets.mask_fill(valid.clone().bool_not(), 0);
    let logp = log_softmax(logits, 1);
    let picked = logp.gather(1, safe_targets.unsqueeze_dim(1)).reshape([batch * (seq - 1)]);
    let picked = picked.mask_fill(valid.bool_not(), 0.0);
    LossSum { sum: picked.sum().neg(), label_tokens }
}

use burn::tensor::ElementConversion;
