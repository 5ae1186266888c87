//! `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` (a linear layer with an optional LoRA branch) in one node.
//!
//! Burn's composed version spends more on the LoRA branch's element-wise scale and add, and
//! on summing `dx` from two matmuls, than on the rank-r matmuls themselves; its CPU matmul also
//! zero-fills and then copies every output buffer (an alignment fix-up in `FlexTensor::empty`).
//! Here every product is one GEMM that writes or accumulates into its final buffer.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::cpu::{alloc_uninit, assume_init, gemm_parallel, Mat};

/// A buffer of `n` floats filled by `write` without being zero-filled first.
///
/// # Safety
/// `write` must write all `n` elements through the pointer.
unsafe fn written_by(n: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut buf = alloc_uninit(n);
    write(buf.as_mut_ptr().cast::<f32>());
    // SAFETY: the caller's `write` initialised every element.
    unsafe { assume_init(buf) }
}
use crate::dispatch::{contiguous, flex_from_vec, from_host, slice, supported, to_host, track, Host};

/// A LoRA branch: `a: [r, in]`, `b: [out, r]`, `scale = alpha / r`.
pub struct LoraBranch<B: Backend> {
    pub a: Tensor<B, 2>,
    pub b: Tensor<B, 2>,
    pub scale: f64,
    /// PEFT's `lora_dropout` on the branch's input while training: drop probability and a seed
    /// the caller draws from the backend's RNG (so a seeded run, and a resumed one, repeats).
    pub dropout: Option<(f64, u64)>,
}

/// The dropout multiplier of input element `index`: 0 with probability `p`, else `1/(1−p)`.
/// A counter-based hash (SplitMix64), so backward recomputes the mask instead of storing it.
#[inline]
fn keep_scale(seed: u64, index: usize, p: f64) -> f32 {
    let mut z = seed.wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    if u < p {
        0.0
    } else {
        (1.0 / (1.0 - p)) as f32
    }
}

/// `x: [rows, in]`, `weight: [out, in]` (PyTorch's layout), `bias: [out]`. With a LoRA branch
/// the weight and bias must be frozen (LoRA's premise); otherwise any of them may train.
/// Gives `x` back when the backend is not Flex or the combination is not covered.
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: Option<LoraBranch<B>>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let frozen_base = !weight.is_require_grad() && !bias.as_ref().is_some_and(|b| b.is_require_grad());
    let f32s = weight.dtype() == DType::F32
        && bias.as_ref().is_none_or(|b| b.dtype() == DType::F32)
        && lora.as_ref().is_none_or(|l| l.a.dtype() == DType::F32 && l.b.dtype() == DType::F32);
    if !supported(&[&x]) || !f32s || (lora.is_some() && !frozen_base) {
        return Err(x);
    }
    let [rows, d_in] = x.dims();
    let d_out = weight.dims()[0];
    let x = to_host(x);
    let w = to_host(weight);
    let xs = contiguous(x.flex());
    let ws = contiguous(w.flex());
    let (xv, wv) = (slice(&xs), slice(&ws));
    // SAFETY (every gemm here): the views cover exactly the buffers' shapes; a gemm that does
    // not accumulate writes every element of its output (what `written_by` needs).
    let mut y = unsafe { written_by(rows * d_out, |y| gemm_parallel(rows, d_out, d_in, y, d_out, false, Mat::rows(xv.as_ptr(), d_in), Mat::t(wv.as_ptr(), d_in), 1.0)) };
    let bias = bias.map(to_host);
    if let Some(b) = &bias {
        let bs = contiguous(b.flex());
        let bv = slice(&bs);
        y.chunks_mut(d_out).for_each(|row| row.iter_mut().zip(bv).for_each(|(y, b)| *y += b));
    }
    let out = |y: Vec<f32>| flex_from_vec(y, &[rows, d_out]);
    match lora {
        None => {
            let y = out(y);
            let state = || LinearState { x: xs, weight: ws, lora: None };
            Ok(from_host(match (x, w, bias) {
                (Host::Tracked(x), Host::Tracked(w), None) => Host::Tracked(track(LinearBackward, [&x, &w], y, state)),
                (Host::Tracked(x), Host::Tracked(w), Some(Host::Tracked(b))) => Host::Tracked(track(LinearBackward, [&x, &w, &b], y, state)),
                _ => Host::Plain(y),
            }))
        }
        Some(LoraBranch { a, b, scale, dropout }) => {
            let r = a.dims()[0];
            let (a, b) = (to_host(a), to_host(b));
            let (a_s, b_s) = (contiguous(a.flex()), contiguous(b.flex()));
            // The branch's input: x, or x with dropout applied (kept for dA).
            let dropout = dropout.filter(|&(p, _)| p > 0.0);
            let x_branch = match dropout {
                Some((p, seed)) => {
                    flex_from_vec(xv.par_iter().enumerate().map(|(i, &v)| v * keep_scale(seed, i, p)).collect(), &[rows, d_in])
                }
                None => xs.clone(),
            };
            // hs = scale · x·Aᵀ, kept for dB; y += hs·Bᵀ.
            let mut hs = vec![0f32; rows * r];
            unsafe {
                gemm_parallel(rows, r, d_in, hs.as_mut_ptr(), r, false, Mat::rows(slice(&x_branch).as_ptr(), d_in), Mat::t(slice(&a_s).as_ptr(), d_in), scale as f32);
                gemm_parallel(rows, d_out, r, y.as_mut_ptr(), d_out, true, Mat::rows(hs.as_ptr(), r), Mat::t(slice(&b_s).as_ptr(), r), 1.0);
            }
            let y = out(y);
            Ok(from_host(match (x, a, b) {
                (Host::Tracked(x), Host::Tracked(a), Host::Tracked(b)) => Host::Tracked(track(LinearBackward, [&x, &a, &b], y, || {
                    let lora = LoraState { a: a_s, b: b_s, hs: flex_from_vec(hs, &[rows, r]), scale: scale as f32, x_branch, dropout };
                    LinearState { x: xs, weight: ws, lora: Some(lora) }
                })),
                _ => Host::Plain(y),
            }))
        }
    }
}

#[derive(Clone, Debug)]
struct LoraState {
    a: FlexTensor,
    b: FlexTensor,
    /// `scale · x·Aᵀ`, `[rows, r]`.
    hs: FlexTensor,
    scale: f32,
    /// The branch's input after dropout (`x` itself without).
    x_branch: FlexTensor,
    dropout: Option<(f64, u64)>,
}

#[derive(Clone, Debug)]
struct LinearState {
    x: FlexTensor,
    weight: FlexTensor,
    lora: Option<LoraState>,
}

/// Parents: `[x, weight]`, `[x, weight, bias]`, or with LoRA `[x, lora_a, lora_b]`.
#[derive(Debug)]
struct LinearBackward;

impl<const N: usize> Backward<Flex, N> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let (xv, wv, dyv) = (slice(&s.x), slice(&s.weight), slice(&dy));
        let (d_out, d_in) = (s.weight.layout().shape()[0], s.weight.layout().shape()[1]);
        let rows = xv.len() / d_in.max(1);
        let parents = ops.parents;
        let x_ = Mat::rows(xv.as_ptr(), d_in);
        let dy_ = Mat::rows(dyv.as_ptr(), d_out);
        let dy_t = Mat::t(dyv.as_ptr(), d_out);
        // SAFETY (every gemm here): the views cover exactly the buffers' shapes.
        match &s.lora {
            None => {
                if let Some(node) = &parents[0] {
                    let dx = unsafe { written_by(rows * d_in, |dx| gemm_parallel(rows, d_in, d_out, dx, d_in, false, dy_, Mat::rows(wv.as_ptr(), d_in), 1.0)) };
                    grads.register::<Flex>(node.id, flex_from_vec(dx, &[rows, d_in]));
                }
                if let Some(node) = &parents[1] {
                    let mut dw = vec![0f32; d_out * d_in];
                    unsafe { gemm_parallel(d_out, d_in, rows, dw.as_mut_ptr(), d_in, false, dy_t, x_, 1.0) };
                    grads.register::<Flex>(node.id, flex_from_vec(dw, &[d_out, d_in]));
                }
                if let Some(node) = parents.get(2).and_then(|p| p.as_ref()) {
                    let mut db = vec![0f32; d_out];
                    dyv.chunks(d_out).for_each(|row| db.iter_mut().zip(row).for_each(|(d, g)| *d += g));
                    grads.register::<Flex>(node.id, flex_from_vec(db, &[d_out]));
                }
            }
            Some(l) => {
                let (av, bv, hv) = (slice(&l.a), slice(&l.b), slice(&l.hs));
                let r = l.a.layout().shape()[0];
                // g = dy·B, [rows, r]
                let mut g = vec![0f32; rows * r];
                unsafe { gemm_parallel(rows, r, d_out, g.as_mut_ptr(), r, false, dy_, Mat::rows(bv.as_ptr(), r), 1.0) };
                if let Some(node) = &parents[0] {
                    // dx = dy·W + scale · (g·A ⊙ dropout mask)
                    let mut dx = unsafe { written_by(rows * d_in, |dx| gemm_parallel(rows, d_in, d_out, dx, d_in, false, dy_, Mat::rows(wv.as_ptr(), d_in), 1.0)) };
                    match l.dropout {
                        None => unsafe {
                            gemm_parallel(rows, d_in, r, dx.as_mut_ptr(), d_in, true, Mat::rows(g.as_ptr(), r), Mat::rows(av.as_ptr(), d_in), l.scale)
                        },
                        Some((p, seed)) => {
                            let mut branch = vec![0f32; rows * d_in];
                            unsafe {
                                gemm_parallel(rows, d_in, r, branch.as_mut_ptr(), d_in, false, Mat::rows(g.as_ptr(), r), Mat::rows(av.as_ptr(), d_in), l.scale)
                            };
                            dx.par_iter_mut().zip(branch.par_iter()).enumerate().for_each(|(i, (d, b))| *d += b * keep_scale(seed, i, p));
                        }
                    }
                    grads.register::<Flex>(node.id, flex_from_vec(dx, &[rows, d_in]));
                }
                if let Some(node) = &parents[1] {
                    // dA = scale · gᵀ·x_branch
                    let mut da = vec![0f32; r * d_in];
                    let xb = Mat::rows(slice(&l.x_branch).as_ptr(), d_in);
                    unsafe { gemm_parallel(r, d_in, rows, da.as_mut_ptr(), d_in, false, Mat::t(g.as_ptr(), r), xb, l.scale) };
                    grads.register::<Flex>(node.id, flex_from_vec(da, &[r, d_in]));
                }
                if let Some(node) = parents.get(2).and_then(|p| p.as_ref()) {
                    // dB = dyᵀ·hs
                    let mut db = vec![0f32; d_out * r];
                    unsafe { gemm_parallel(d_out, r, rows, db.as_mut_ptr(), r, false, dy_t, Mat::rows(hv.as_ptr(), r), 1.0) };
                    grads.register::<Flex>(node.id, flex_from_vec(db, &[d_out, r]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor, TensorData};

    use super::*;
    use crate::dispatch::values;

    type Ad = crate::dispatch::FlexAd;

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// With dropout, the fused LoRA linear equals the composed formula under the same mask.
    #[test]
    fn lora_dropout_matches_the_composed_formula_with_the_same_mask() {
        let dev = Default::default();
        let (rows, d_in, d_out, r, p, seed, scale) = (37, 24, 20, 4, 0.3, 12345u64, 2.0);
        let rand = |shape: [usize; 2]| Tensor::<Ad, 2>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let (x0, w, a0, b0) = (rand([rows, d_in]), rand([d_out, d_in]), rand([r, d_in]), rand([d_out, r]));
        let mask: Vec<f32> = (0..rows * d_in).map(|i| keep_scale(seed, i, p)).collect();
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - p).abs() < 0.06, "dropped {dropped}");
        let mask = Tensor::<Ad, 2>::from_data(TensorData::new(mask, [rows, d_in]), &dev);
        let upstream = rand([rows, d_out]);

        let grads_of = |fused: bool| {
            let (x, a, b) = (x0.clone().require_grad(), a0.clone().require_grad(), b0.clone().require_grad());
            let y = if fused {
                let lora = LoraBranch { a: a.clone(), b: b.clone(), scale, dropout: Some((p, seed)) };
                linear(x.clone(), w.clone(), None, Some(lora)).ok().expect("fused")
            } else {
                x.clone().matmul(w.clone().transpose())
                    + (x.clone() * mask.clone()).matmul(a.clone().transpose()).matmul(b.clone().transpose()) * scale
            };
            let g = (y.clone() * upstream.clone()).sum().backward();
            [values(y), values(x.grad(&g).unwrap()), values(a.grad(&g).unwrap()), values(b.grad(&g).unwrap())]
        };
        let (fused, composed) = (grads_of(true), grads_of(false));
        for (name, (f, c)) in ["y", "dx", "dA", "dB"].iter().zip(fused.iter().zip(&composed)) {
            let d = rel(f, c);
            assert!(d < 1e-5, "{name} differs by {d}");
        }
    }
}
