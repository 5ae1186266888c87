//! Causal self-attention with RoPE and grouped-query heads, forward and backward in one node.
//!
//! Inputs stay in the projections' layout, `[batch, seq, heads·head_dim]`; every matmul reads
//! them through strides. Work is split over (batch, kv head) pairs, so the query heads that
//! share a kv head accumulate their K and V gradients without contention. Only the causal
//! lower triangle is computed, in row blocks of [`BLOCK`].

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::cpu::{self, gemm, Mat, Shared, SharedMut};
use crate::dispatch::{contiguous, flex_from_vec, from_host, slice, supported, to_host, track, Host};

/// Query rows per block of the causal triangle.
const BLOCK: usize = 64;

/// What the attention needs besides Q, K and V.
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Causal (a decoder) or every key visible (an encoder such as CLIP's).
    pub causal: bool,
    /// RoPE tables `(cos, sin)`, `[seq, head_dim]` each (transformers' `cat(freqs, freqs)`
    /// layout), or `[batch·seq, head_dim]` when each row has its own positions (Qwen2-VL's
    /// multimodal RoPE, images packed for the vision tower); `None`: no rotary embedding.
    pub rope: Option<(Arc<Vec<f32>>, Arc<Vec<f32>>)>,
    /// `[batch, seq]`, true where the key is padding (attention_mask 0); `None`: no padding.
    pub key_padding: Option<Arc<Vec<bool>>>,
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    d: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.h / self.kv
    }
}

/// `softmax(rope(Q)·rope(K)ᵀ/√d + causal & padding mask)·V`, returned as `[batch, seq,
/// heads·head_dim]` (ready for `o_proj`). `q: [batch, seq, heads·head_dim]`, `k`, `v: [batch,
/// seq, kv_heads·head_dim]`. A query with no visible key attends uniformly to every key, as
/// the composed path (a mask filled with `f32::MIN`) does. Gives the inputs back when the
/// backend is not Flex.
#[allow(clippy::type_complexity)]
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    spec: &AttentionSpec,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>)> {
    if !supported(&[&q, &k, &v]) {
        return Err((q, k, v));
    }
    let [b, t, hd] = q.dims();
    let dims = Dims { b, t, h: spec.num_heads, kv: spec.num_kv_heads, d: spec.head_dim };
    assert_eq!(hd, dims.h * dims.d, "attention: q has {hd} features for {} heads of {}", dims.h, dims.d);
    assert_eq!(k.dims(), [b, t, dims.kv * dims.d], "attention: k's shape");
    assert_eq!(v.dims(), [b, t, dims.kv * dims.d], "attention: v's shape");
    assert!(
        dims.h % dims.kv == 0 && (spec.rope.is_none() || dims.d % 2 == 0),
        "attention: heads {} / kv heads {} / head_dim {}",
        dims.h,
        dims.kv,
        dims.d
    );
    if let Some((cos, _)) = &spec.rope {
        assert!(cos.len() == t * dims.d || cos.len() == b * t * dims.d, "attention: RoPE tables for another shape");
    }
    if let Some(p) = &spec.key_padding {
        assert_eq!(p.len(), b * t, "attention: key padding for another shape");
    }
    let (q, k, v) = (to_host(q), to_host(k), to_host(v));
    let keep = q.requires_grad() || k.requires_grad() || v.requires_grad();
    let (qs, ks, vs) = (contiguous(q.flex()), contiguous(k.flex()), contiguous(v.flex()));
    let (out, saved) = forward(slice(&qs), slice(&ks), slice(&vs), dims, spec, keep);
    let out = flex_from_vec(out, &[b, t, dims.h * dims.d]);
    Ok(from_host(match (q, k, v) {
        (Host::Tracked(q), Host::Tracked(k), Host::Tracked(v)) => Host::Tracked(track(AttentionBackward, [&q, &k, &v], out, || {
            AttentionState { saved: saved.expect("kept for backward"), v: vs, dims, spec: spec.clone() }
        })),
        _ => Host::Plain(out),
    }))
}

/// What the forward keeps for the backward.
#[derive(Clone, Debug)]
struct Saved {
    /// `[b, h, t, d]`, rotated queries.
    qr: Arc<Vec<f32>>,
    /// `[b, kv, t, d]`, rotated keys.
    kr: Arc<Vec<f32>>,
    /// The probabilities, laid out as [`ProbLayout`] says.
    p: Arc<Vec<f32>>,
    layout: Arc<ProbLayout>,
}

/// First key index that is not padding, per batch row (`t` when all are padding).
fn first_visible(dims: Dims, spec: &AttentionSpec) -> Vec<usize> {
    (0..dims.b)
        .map(|bi| match &spec.key_padding {
            None => 0,
            Some(p) => p[bi * dims.t..(bi + 1) * dims.t].iter().position(|&pad| !pad).unwrap_or(dims.t),
        })
        .collect()
}

/// The rotary tables of position `ti` of batch row `bi` in sequences of `t` (`None` without
/// RoPE): row `ti` of shared tables, row `bi·t + ti` of per-row ones.
fn tables(spec: &AttentionSpec, bi: usize, t: usize, ti: usize, d: usize) -> Option<(&[f32], &[f32])> {
    spec.rope.as_ref().map(|(c, s)| {
        let row = if c.len() == t * d { ti } else { bi * t + ti };
        (&c[row * d..][..d], &s[row * d..][..d])
    })
}

/// [`rotate`] at position `ti` of batch row `bi`, or a copy without RoPE.
#[inline]
fn rotate_at(x: &[f32], spec: &AttentionSpec, (bi, t, ti): (usize, usize, usize), y: &mut [f32]) {
    match tables(spec, bi, t, ti, x.len()) {
        Some((cos, sin)) => rotate(x, cos, sin, y),
        None => y.copy_from_slice(x),
    }
}

/// [`rotate_back`] at position `ti` of batch row `bi`, or a copy without RoPE.
#[inline]
fn rotate_back_at(dy: &[f32], spec: &AttentionSpec, (bi, t, ti): (usize, usize, usize), dx: &mut [f32]) {
    match tables(spec, bi, t, ti, dy.len()) {
        Some((cos, sin)) => rotate_back(dy, cos, sin, dx),
        None => dx.copy_from_slice(dy),
    }
}

/// `y = x·cos + rotate_half(x)·sin`.
#[inline]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        y[i] = x[i] * cos[i] - x[i + half] * sin[i];
        y[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

/// The transpose of [`rotate`]: the gradient of `x` from the gradient of `y`.
#[inline]
fn rotate_back(dy: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
    let half = dy.len() / 2;
    for i in 0..half {
        dx[i] = dy[i] * cos[i] + dy[i + half] * sin[i + half];
        dx[i + half] = dy[i + half] * cos[i + half] - dy[i] * sin[i];
    }
}

/// Softmax over the first `visible` scores of `row` (the causal prefix), skipping padded
/// keys; everything after the prefix becomes 0.
fn softmax_causal_row(row: &mut [f32], visible: usize, padding: Option<&[bool]>) {
    let (prefix, future) = row.split_at_mut(visible);
    future.fill(0.0);
    let sum = match padding {
        None => {
            let m = cpu::max(prefix);
            cpu::exp_shifted_sum(prefix, m)
        }
        Some(pad) => {
            let m = prefix.iter().zip(pad).filter(|(_, &p)| !p).fold(f32::NEG_INFINITY, |m, (&s, _)| m.max(s));
            cpu::exp_shifted(prefix, m);
            prefix.iter_mut().zip(pad).filter(|(_, &p)| p).for_each(|(s, _)| *s = 0.0);
            cpu::sum(prefix)
        }
    };
    cpu::scale(prefix, 1.0 / sum);
}

cpu::multiversion! {
    /// `dS = P ⊙ (dP − Σ P⊙dP)` over one row, in place of `dP`.
    fn softmax_backward_row(dp: &mut [f32], p: &[f32]) {
        let dot = cpu::dot(p, dp);
        for (d, &p) in dp.iter_mut().zip(p) {
            *d = p * (*d - dot);
        }
    }
}

/// Columns a block of query rows `[i0, i1)` reads: the causal triangle, or every key when a
/// row in it sees none (it then attends uniformly to all), or every key without a causal mask.
fn block_cols(i0: usize, i1: usize, first: usize, t: usize, causal: bool) -> usize {
    if !causal || i0 < first {
        t
    } else {
        i1
    }
}

/// Whether query `i` sees no key at all (`first`: the first key that is not padding).
fn sees_nothing(i: usize, first: usize, t: usize, causal: bool) -> bool {
    if causal {
        i < first
    } else {
        first >= t
    }
}

/// Where the probabilities of each block of query rows live: the blocks of the causal triangle
/// packed one after another (`[rows, cols]` each, row stride `cols`), per (batch, head). Every
/// stored float is written by the forward, so nothing is zero-filled, and the half of the
/// `[seq, seq]` matrix above the triangle is never allocated.
#[derive(Clone, Debug)]
struct ProbLayout {
    /// Per batch row: `(first row, end row, columns, offset within a head)` of each block.
    blocks: Vec<Vec<(usize, usize, usize, usize)>>,
    /// Per batch row: floats per head.
    per_head: Vec<usize>,
    /// Per batch row: offset of its first head.
    batch_base: Vec<usize>,
    total: usize,
}

impl ProbLayout {
    fn new(dims: Dims, first: &[usize], causal: bool) -> Self {
        let (mut blocks, mut per_head, mut batch_base, mut total) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for &f in first {
            let mut off = 0;
            let list: Vec<_> = (0..dims.t)
                .step_by(BLOCK)
                .map(|i0| {
                    let i1 = (i0 + BLOCK).min(dims.t);
                    let n = block_cols(i0, i1, f, dims.t, causal);
                    off += (i1 - i0) * n;
                    (i0, i1, n, off - (i1 - i0) * n)
                })
                .collect();
            blocks.push(list);
            per_head.push(off);
            batch_base.push(total);
            total += off * dims.h;
        }
        Self { blocks, per_head, batch_base, total }
    }

    /// Offset of `(batch row, head)`'s first block.
    fn head_base(&self, bi: usize, head: usize) -> usize {
        self.batch_base[bi] + head * self.per_head[bi]
    }
}

fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, spec: &AttentionSpec, keep: bool) -> (Vec<f32>, Option<Saved>) {
    let Dims { b, t, h, kv, d } = dims;
    let group = dims.group();
    let scale = (d as f32).powf(-0.5);
    let first = first_visible(dims, spec);
    let layout = ProbLayout::new(dims, &first, spec.causal);
    // Every element of these is written below (see ProbLayout for p).
    let mut out = cpu::alloc_uninit(b * t * h * d);
    let mut qr = cpu::alloc_uninit(b * h * t * d);
    let mut kr = cpu::alloc_uninit(b * kv * t * d);
    let mut p = if keep { cpu::alloc_uninit(layout.total) } else { Vec::new() };
    let ptr = |v: &mut Vec<std::mem::MaybeUninit<f32>>| SharedMut(v.as_mut_ptr().cast::<f32>());
    let (out_ptr, qr_ptr, kr_ptr, p_ptr) = (ptr(&mut out), ptr(&mut qr), ptr(&mut kr), ptr(&mut p));
    let padding = spec.key_padding.as_deref();
    let layout_ref = &layout;
    (0..b * kv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / kv, task % kv);
        // SAFETY: each task writes only its own (batch, kv head)'s slices of kr, and its own
        // query heads' slices of qr, p and out; rotate() writes every element of its slice.
        let kr_bg = unsafe { std::slice::from_raw_parts_mut({ kr_ptr }.0.add((bi * kv + g) * t * d), t * d) };
        for ti in 0..t {
            let src = &k[((bi * t + ti) * kv + g) * d..][..d];
            rotate_at(src, spec, (bi, t, ti), &mut kr_bg[ti * d..][..d]);
        }
        let per_head = layout_ref.per_head[bi];
        let mut scratch = if keep { Vec::new() } else { vec![0f32; per_head] };
        for hh in 0..group {
            let head = g * group + hh;
            let qr_bh = unsafe { std::slice::from_raw_parts_mut({ qr_ptr }.0.add((bi * h + head) * t * d), t * d) };
            for ti in 0..t {
                let src = &q[((bi * t + ti) * h + head) * d..][..d];
                rotate_at(src, spec, (bi, t, ti), &mut qr_bh[ti * d..][..d]);
            }
            let p_bh: *mut f32 = if keep { unsafe { { p_ptr }.0.add(layout_ref.head_base(bi, head)) } } else { scratch.as_mut_ptr() };
            for &(i0, i1, n, off) in &layout_ref.blocks[bi] {
                let m = i1 - i0;
                // SAFETY: the block's [m, n] region lies inside this head's part of p; the
                // gemm writes all of it before the slice is formed.
                let block = unsafe {
                    let dst = p_bh.add(off);
                    gemm(m, n, d, dst, n, false, Mat::rows(qr_bh.as_ptr().add(i0 * d), d), Mat::t(kr_bg.as_ptr(), d), scale);
                    std::slice::from_raw_parts_mut(dst, m * n)
                };
                for (r, row) in block.chunks_mut(n).enumerate() {
                    let i = i0 + r;
                    if sees_nothing(i, first[bi], t, spec.causal) {
                        row.fill(1.0 / t as f32);
                        continue;
                    }
                    let visible = if spec.causal { i + 1 } else { t };
                    softmax_causal_row(row, visible, padding.map(|pad| &pad[bi * t..bi * t + visible]));
                }
                unsafe {
                    gemm(
                        m,
                        d,
                        n,
                        { out_ptr }.0.add(((bi * t + i0) * h + head) * d),
                        h * d,
                        false,
                        Mat::rows(block.as_ptr(), n),
                        Mat::rows(v.as_ptr().add((bi * t * kv + g) * d), kv * d),
                        1.0,
                    );
                }
            }
        }
    });
    // SAFETY: the loop above wrote every element of each buffer.
    let (out, qr, kr, p) = unsafe { (cpu::assume_init(out), cpu::assume_init(qr), cpu::assume_init(kr), cpu::assume_init(p)) };
    let saved = keep.then(|| Saved { qr: Arc::new(qr), kr: Arc::new(kr), p: Arc::new(p), layout: Arc::new(layout) });
    (out, saved)
}

#[derive(Clone, Debug)]
struct AttentionState {
    saved: Saved,
    v: FlexTensor,
    dims: Dims,
    spec: AttentionSpec,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let (dq, dk, dv) = backward(slice(&grad), slice(&s.v), &s.saved, s.dims, &s.spec);
        let Dims { b, t, h, kv, d } = s.dims;
        let [pq, pk, pv] = ops.parents;
        if let Some(node) = pq {
            grads.register::<Flex>(node.id, flex_from_vec(dq, &[b, t, h * d]));
        }
        if let Some(node) = pk {
            grads.register::<Flex>(node.id, flex_from_vec(dk, &[b, t, kv * d]));
        }
        if let Some(node) = pv {
            grads.register::<Flex>(node.id, flex_from_vec(dv, &[b, t, kv * d]));
        }
    }
}

fn backward(dout: &[f32], v: &[f32], saved: &Saved, dims: Dims, spec: &AttentionSpec) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, t, h, kv, d } = dims;
    let group = dims.group();
    let scale = (d as f32).powf(-0.5);
    let first = first_visible(dims, spec);
    // Every element of these is written below.
    let (mut dq, mut dk, mut dv) = (cpu::alloc_uninit(b * t * h * d), cpu::alloc_uninit(b * t * kv * d), cpu::alloc_uninit(b * t * kv * d));
    let ptr = |v: &mut Vec<std::mem::MaybeUninit<f32>>| SharedMut(v.as_mut_ptr().cast::<f32>());
    let (dq_ptr, dk_ptr, dv_ptr) = (ptr(&mut dq), ptr(&mut dk), ptr(&mut dv));
    let (qr, kr, p) = (Shared(saved.qr.as_ptr()), Shared(saved.kr.as_ptr()), Shared(saved.p.as_ptr()));
    let layout = &*saved.layout;
    (0..b * kv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / kv, task % kv);
        let kr_bg = unsafe { { kr }.0.add((bi * kv + g) * t * d) };
        let v_bg = unsafe { v.as_ptr().add((bi * t * kv + g) * d) };
        let mut ds = vec![0f32; BLOCK * t];
        let mut dqr = vec![0f32; t * d];
        let mut dk_acc = vec![0f32; t * d];
        let mut dv_acc = vec![0f32; t * d];
        for hh in 0..group {
            let head = g * group + hh;
            let qr_bh = unsafe { { qr }.0.add((bi * h + head) * t * d) };
            let p_bh = unsafe { { p }.0.add(layout.head_base(bi, head)) };
            for &(i0, i1, n, off) in &layout.blocks[bi] {
                let m = i1 - i0;
                let d_out = Mat::rows(unsafe { dout.as_ptr().add(((bi * t + i0) * h + head) * d) }, h * d);
                // This block's probabilities: [m, n], row stride n.
                let p_blk = unsafe { p_bh.add(off) };
                // SAFETY (all gemms): views lie inside their buffers; scratch is task-local.
                unsafe {
                    // dP = dO·Vᵀ
                    gemm(m, n, d, ds.as_mut_ptr(), n, false, d_out, Mat::t(v_bg, kv * d), 1.0);
                }
                // dS = P ⊙ (dP − rowsum(P ⊙ dP)); zero for a row that sees no key, whose
                // uniform weights do not depend on the scores.
                for r in 0..m {
                    let drow = &mut ds[r * n..r * n + n];
                    if sees_nothing(i0 + r, first[bi], t, spec.causal) {
                        drow.fill(0.0);
                        continue;
                    }
                    let prow = unsafe { std::slice::from_raw_parts(p_blk.add(r * n), n) };
                    softmax_backward_row(drow, prow);
                }
                unsafe {
                    // dQr = scale · dS·Kr
                    gemm(m, d, n, dqr.as_mut_ptr().add(i0 * d), d, false, Mat::rows(ds.as_ptr(), n), Mat::rows(kr_bg, d), scale);
                    // dKr += scale · dSᵀ·Qr
                    gemm(n, d, m, dk_acc.as_mut_ptr(), d, true, Mat::t(ds.as_ptr(), n), Mat::rows(qr_bh.add(i0 * d), d), scale);
                    // dV += Pᵀ·dO
                    gemm(n, d, m, dv_acc.as_mut_ptr(), d, true, Mat::t(p_blk, n), d_out, 1.0);
                }
            }
            for ti in 0..t {
                // SAFETY: this (batch, head)'s rows of dq belong to this task alone.
                let dst = unsafe { std::slice::from_raw_parts_mut({ dq_ptr }.0.add(((bi * t + ti) * h + head) * d), d) };
                rotate_back_at(&dqr[ti * d..][..d], spec, (bi, t, ti), dst);
            }
        }
        for ti in 0..t {
            let at = ((bi * t + ti) * kv + g) * d;
            // SAFETY: this (batch, kv head)'s rows of dk and dv belong to this task alone.
            let (dk_dst, dv_dst) = unsafe { (std::slice::from_raw_parts_mut({ dk_ptr }.0.add(at), d), std::slice::from_raw_parts_mut({ dv_ptr }.0.add(at), d)) };
            rotate_back_at(&dk_acc[ti * d..][..d], spec, (bi, t, ti), dk_dst);
            dv_dst.copy_from_slice(&dv_acc[ti * d..][..d]);
        }
    });
    // SAFETY: the loop above wrote every element of the three buffers.
    let (dq, dk, dv) = unsafe { (cpu::assume_init(dq), cpu::assume_init(dk), cpu::assume_init(dv)) };
    (dq, dk, dv)
}

#[cfg(test)]
mod speed {
    use std::sync::Arc;

    use burn::tensor::{Distribution, Tensor};

    use super::*;

    /// Forward + backward of one layer's attention at the benchmark's shape, with its GEMM
    /// rate: `cargo test --release -p vsft-kernels attention_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_speed() {
        type Ad = crate::dispatch::FlexAd;
        let (b, t, h, d) = (4, 512, 8, 64);
        let dev = Default::default();
        let spec = AttentionSpec {
            num_heads: h,
            num_kv_heads: h,
            head_dim: d,
            causal: true,
            rope: Some((Arc::new(vec![1.0; t * d]), Arc::new(vec![0.0; t * d]))),
            key_padding: None,
        };
        let x = || Tensor::<Ad, 3>::random([b, t, h * d], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let (q, k, v) = (x(), x(), x());
        for round in 0..3 {
            let start = std::time::Instant::now();
            let out = attention(q.clone(), k.clone(), v.clone(), &spec).ok().unwrap();
            let mid = start.elapsed();
            let _ = out.sum().backward();
            let total = start.elapsed();
            // Causal blocks of 64: 36/64 of the full T×T products; 2 GEMMs forward, 4 backward.
            let gemm = 2.0 * (b * h * t * t * d) as f64 * 36.0 / 64.0;
            println!(
                "round {round}: forward {:.1} ms ({:.0} GFLOP/s), backward {:.1} ms ({:.0} GFLOP/s)",
                mid.as_secs_f64() * 1e3,
                2.0 * gemm / mid.as_secs_f64() / 1e9,
                (total - mid).as_secs_f64() * 1e3,
                4.0 * gemm / (total - mid).as_secs_f64() / 1e9
            );
        }
    }
}

#[cfg(test)]
mod unmasked {
    use std::sync::Arc;

    use burn::tensor::{activation, Bool, Distribution, Tensor, TensorData};

    use super::*;
    use crate::dispatch::values;

    type Ad = crate::dispatch::FlexAd;

    /// The encoder mode (no causal mask, no RoPE, a padded key) against Burn's composed
    /// softmax(QKᵀ/√d)·V, forward and backward. (The causal mode is covered through the whole
    /// model in vsft-model/tests/fused.rs.)
    #[test]
    fn unmasked_attention_matches_composed_ops() {
        let (b, t, h, d) = (2, 7, 2, 4);
        let dev = Default::default();
        let padding: Vec<bool> = (0..b * t).map(|i| i == t + 5).collect();
        let spec = AttentionSpec { num_heads: h, num_kv_heads: h, head_dim: d, causal: false, rope: None, key_padding: Some(Arc::new(padding.clone())) };
        let x = || Tensor::<Ad, 3>::random([b, t, h * d], Distribution::Normal(0.0, 1.0), &dev);
        let (q0, k0, v0, up) = (x(), x(), x(), x());
        let run = |fused: bool| {
            let (q, k, v) = (q0.clone().require_grad(), k0.clone().require_grad(), v0.clone().require_grad());
            let out = if fused {
                attention(q.clone(), k.clone(), v.clone(), &spec).ok().unwrap()
            } else {
                let split = |y: Tensor<Ad, 3>| y.reshape([b, t, h, d]).swap_dims(1, 2);
                let scores = split(q.clone()).matmul(split(k.clone()).swap_dims(2, 3)) * (d as f64).powf(-0.5);
                let mask = Tensor::<Ad, 4, Bool>::from_data(TensorData::new(padding.clone(), [b, 1, 1, t]), &dev).expand([b, h, t, t]);
                let p = activation::softmax(scores.mask_fill(mask, f32::MIN), 3);
                p.matmul(split(v.clone())).swap_dims(1, 2).reshape([b, t, h * d])
            };
            let g = (out.clone() * up.clone()).sum().backward();
            [values(out), values(q.grad(&g).unwrap()), values(k.grad(&g).unwrap()), values(v.grad(&g).unwrap())]
        };
        let (f, c) = (run(true), run(false));
        for (name, (f, c)) in ["out", "dq", "dk", "dv"].iter().zip(f.iter().zip(&c)) {
            let worst = f.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-5, "{name}: max abs diff {worst}");
        }
    }
}

#[cfg(test)]
mod per_row_rope {
    use std::sync::Arc;

    use burn::tensor::{activation, Bool, Distribution, Tensor, TensorData};

    use super::*;
    use crate::dispatch::values;

    type Ad = crate::dispatch::FlexAd;

    /// Tables with one row per (batch row, position), as Qwen2-VL's multimodal RoPE and the
    /// packed images of its vision tower give them, causal and not: the kernel against Burn's
    /// ops rotating each row by its own table first, forward and backward.
    #[test]
    fn per_row_tables_match_composed_ops() {
        let (b, t, h, d) = (3, 9, 2, 8);
        let dev = Default::default();
        let angles: Vec<f32> = (0..b * t * d).map(|i| ((i * 7919) % 1000) as f32 * 0.013).collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
        for causal in [true, false] {
            let spec = AttentionSpec {
                num_heads: h,
                num_kv_heads: h,
                head_dim: d,
                causal,
                rope: Some((Arc::new(cos.clone()), Arc::new(sin.clone()))),
                key_padding: None,
            };
            let x = || Tensor::<Ad, 3>::random([b, t, h * d], Distribution::Normal(0.0, 1.0), &dev);
            let (q0, k0, v0, up) = (x(), x(), x(), x());
            let table = |v: &Vec<f32>| Tensor::<Ad, 4>::from_data(TensorData::new(v.clone(), [b, t, 1, d]), &dev);
            let (c, s) = (table(&cos), table(&sin));
            let run = |fused: bool| {
                let (q, k, v) = (q0.clone().require_grad(), k0.clone().require_grad(), v0.clone().require_grad());
                let out = if fused {
                    attention(q.clone(), k.clone(), v.clone(), &spec).ok().unwrap()
                } else {
                    let turn = |y: Tensor<Ad, 3>| {
                        let y = y.reshape([b, t, h, d]);
                        let halves = y.clone().chunk(2, 3);
                        let rotated = Tensor::cat(vec![halves[1].clone().neg(), halves[0].clone()], 3);
                        (y * c.clone() + rotated * s.clone()).swap_dims(1, 2)
                    };
                    let scores = turn(q.clone()).matmul(turn(k.clone()).swap_dims(2, 3)) * (d as f64).powf(-0.5);
                    let scores = if causal {
                        let mask = Tensor::<Ad, 2, Bool>::from_data(
                            TensorData::new((0..t * t).map(|i| i % t > i / t).collect::<Vec<_>>(), [t, t]),
                            &dev,
                        );
                        scores.mask_fill(mask.unsqueeze::<4>().expand([b, h, t, t]), f32::MIN)
                    } else {
                        scores
                    };
                    let p = activation::softmax(scores, 3);
                    p.matmul(v.clone().reshape([b, t, h, d]).swap_dims(1, 2)).swap_dims(1, 2).reshape([b, t, h * d])
                };
                let g = (out.clone() * up.clone()).sum().backward();
                [values(out), values(q.grad(&g).unwrap()), values(k.grad(&g).unwrap()), values(v.grad(&g).unwrap())]
            };
            let (f, c) = (run(true), run(false));
            for (name, (f, c)) in ["out", "dq", "dk", "dv"].iter().zip(f.iter().zip(&c)) {
                let worst = f.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(worst < 1e-5, "causal {causal}, {name}: max abs diff {worst}");
            }
        }
    }
}
