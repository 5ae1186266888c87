//! Summed token cross-entropy over the vocabulary, forward and backward in one node.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::cpu;
use crate::dispatch::{contiguous, flex_from_vec, from_host, slice, supported, to_host, track, Host};

/// The target that contributes nothing (transformers' `ignore_index`).
const IGNORE: i64 = -100;

/// `Σ_rows −log softmax(logits[row])[targets[row]]` over rows whose target is not -100, as a
/// `[1]` tensor. `logits: [rows…, vocab]` (any leading shape), `targets`: one per row, already
/// shifted by the caller. Gives `logits` back when the backend is not Flex (see [`crate::supported`]).
///
/// The backward's `softmax − onehot` is computed in the forward, over the logits' own buffer
/// when nothing else holds it: the `[rows, vocab]` matrix exists once.
///
/// # Panics
/// If a target is outside `[0, vocab)` and not -100, naming the row.
pub fn cross_entropy_sum<B: Backend, const D: usize>(logits: Tensor<B, D>, targets: &[i64]) -> Result<Tensor<B, 1>, Tensor<B, D>> {
    if !supported(&[&logits]) {
        return Err(logits);
    }
    let vocab = logits.dims()[D - 1];
    let rows = logits.shape().num_elements() / vocab.max(1);
    assert_eq!(targets.len(), rows, "cross_entropy_sum: {} targets for {rows} rows", targets.len());
    let mut logits = to_host(logits);
    let want_grad = logits.requires_grad();
    let original = logits.take_flex();
    let shape = original.layout().shape().clone();
    let mut buffer = contiguous(&original).reshape(vec![rows, vocab].into());
    drop(original);
    let loss = if want_grad {
        forward_with_grad(buffer.storage_mut::<f32>(), vocab, targets)
    } else {
        forward(slice(&buffer), vocab, targets)
    };
    let out = flex_from_vec(vec![loss as f32], &[1]);
    Ok(from_host(match logits {
        Host::Plain(_) => Host::Plain(out),
        Host::Tracked(t) => Host::Tracked(track(CrossEntropyBackward, [&t], out, || (buffer, shape))),
    }))
}

fn check_target(t: i64, vocab: usize, row: usize) -> Option<usize> {
    if t == IGNORE {
        return None;
    }
    assert!(t >= 0 && (t as usize) < vocab, "cross-entropy: row {row} has target {t}, outside the vocabulary of {vocab}");
    Some(t as usize)
}

fn forward(logits: &[f32], vocab: usize, targets: &[i64]) -> f64 {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .enumerate()
        .map(|(r, (row, &t))| match check_target(t, vocab, r) {
            None => 0.0,
            Some(t) => {
                let m = cpu::max(row);
                let lse = m + cpu::sum_exp_shifted(row, m).ln();
                (lse - row[t]) as f64
            }
        })
        .sum()
}

/// The loss, leaving `softmax(row) − onehot(target)` in each row (zeros for ignored rows).
fn forward_with_grad(logits: &mut [f32], vocab: usize, targets: &[i64]) -> f64 {
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .enumerate()
        .map(|(r, (row, &t))| match check_target(t, vocab, r) {
            None => {
                row.fill(0.0);
                0.0
            }
            Some(t) => {
                let m = cpu::max(row);
                let picked = row[t];
                let sum = cpu::exp_shifted_sum(row, m);
                cpu::scale(row, 1.0 / sum);
                row[t] -= 1.0;
                (m + sum.ln() - picked) as f64
            }
        })
        .sum()
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// `softmax − onehot` as `[rows, vocab]`, and the logits' original shape.
    type State = (FlexTensor, burn::tensor::Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (mut buffer, shape) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let g = slice(&contiguous(&grad))[0];
            buffer.storage_mut::<f32>().par_chunks_mut(1 << 14).for_each(|c| cpu::scale(c, g));
            buffer.reshape(shape)
        });
    }
}
