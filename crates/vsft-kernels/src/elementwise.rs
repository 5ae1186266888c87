//! Row-wise and element-wise kernels: RMSNorm, the SiLU-gated product of Llama's MLP, and
//! CLIP's QuickGELU (Qwen2-VL's vision MLP).

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{binary, Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::cpu;
use crate::dispatch::{contiguous, flex_from_vec, from_host, give_back, slice, supported, to_host, track, Host};

/// An output element before the kernel writes it (outputs are not zero-filled first).
type Uninit = std::mem::MaybeUninit<f32>;

/// Rows per parallel task for the row-wise kernels.
const ROWS_PER_TASK: usize = 16;

/// Finishes a two-input node: plain for inference, tracked when either input needs a gradient.
fn finish2<BO, S>(op: BO, a: Host, b: Host, out: FlexTensor, state: impl FnOnce() -> S) -> Host
where
    BO: Backward<Flex, 2, State = S>,
    S: Clone + Send + std::fmt::Debug + 'static,
{
    match (a, b) {
        (Host::Tracked(a), Host::Tracked(b)) => Host::Tracked(track(op, [&a, &b], out, state)),
        _ => Host::Plain(out),
    }
}

/// Llama's RMSNorm, `weight · x / sqrt(mean(x²) + eps)` over the last dimension, with f32
/// statistics as transformers computes them. Gives the inputs back when unsupported.
#[allow(clippy::type_complexity)]
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>)> {
    if !supported(&[&x]) || weight.dtype() != DType::F32 {
        return Err((x, weight));
    }
    let shape = x.shape();
    let dim = shape[D - 1];
    let (x, w) = (to_host(x), to_host(weight));
    let (xs, ws) = (contiguous(x.flex()), contiguous(w.flex()));
    let (xv, wv) = (slice(&xs), slice(&ws));
    let rows = xv.len() / dim.max(1);
    let mut out = cpu::alloc_uninit(xv.len());
    let mut rstd = vec![0f32; rows];
    out.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(xv.par_chunks(dim * ROWS_PER_TASK))
        .for_each(|((o, r), xc)| {
            for ((orow, r), xrow) in o.chunks_mut(dim).zip(r.iter_mut()).zip(xc.chunks(dim)) {
                let ms = cpu::dot(xrow, xrow) / dim as f32;
                *r = 1.0 / (ms + eps as f32).sqrt();
                rms_norm_row(orow, xrow, wv, *r);
            }
        });
    // SAFETY: rms_norm_row wrote every row.
    let out = flex_from_vec(unsafe { cpu::assume_init(out) }, shape.as_slice());
    let state = || RmsNormState { x: xs.clone(), weight: ws.clone(), rstd: Arc::new(rstd), dim };
    Ok(from_host(finish2(RmsNormBackward, x, w, out, state)))
}

#[derive(Clone, Debug)]
struct RmsNormState {
    x: FlexTensor,
    weight: FlexTensor,
    rstd: Arc<Vec<f32>>,
    dim: usize,
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = RmsNormState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let shape = s.x.layout().shape().clone();
        let s2 = s.clone();
        binary::<Flex, _, _>(
            ops.parents,
            ops.node,
            grads,
            move |grad| {
                let g = contiguous(&grad);
                let (gv, xv, wv, dim) = (slice(&g), slice(&s.x), slice(&s.weight), s.dim);
                let mut dx = cpu::alloc_uninit(xv.len());
                dx.par_chunks_mut(dim * ROWS_PER_TASK)
                    .zip(gv.par_chunks(dim * ROWS_PER_TASK))
                    .zip(xv.par_chunks(dim * ROWS_PER_TASK))
                    .zip(s.rstd.par_chunks(ROWS_PER_TASK))
                    .for_each(|(((d, gc), xc), rc)| {
                        for (((drow, grow), xrow), &r) in d.chunks_mut(dim).zip(gc.chunks(dim)).zip(xc.chunks(dim)).zip(rc) {
                            rms_norm_backward_row(drow, grow, xrow, wv, r);
                        }
                    });
                // SAFETY: rms_norm_backward_row wrote every row.
                flex_from_vec(unsafe { cpu::assume_init(dx) }, shape.as_slice())
            },
            move |grad| {
                let g = contiguous(&grad);
                let (gv, xv, dim) = (slice(&g), slice(&s2.x), s2.dim);
                let dw = gv
                    .par_chunks(dim * ROWS_PER_TASK)
                    .zip(xv.par_chunks(dim * ROWS_PER_TASK))
                    .zip(s2.rstd.par_chunks(ROWS_PER_TASK))
                    .fold(
                        || vec![0f32; dim],
                        |mut acc, ((gc, xc), rc)| {
                            for ((grow, xrow), &r) in gc.chunks(dim).zip(xc.chunks(dim)).zip(rc) {
                                for ((a, &g), &x) in acc.iter_mut().zip(grow).zip(xrow) {
                                    *a += g * x * r;
                                }
                            }
                            acc
                        },
                    )
                    .reduce(|| vec![0f32; dim], |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect());
                flex_from_vec(dw, &[dim])
            },
        );
    }
}

/// `silu(gate) · up`, Llama's gated MLP activation. Gives the inputs back when unsupported.
#[allow(clippy::type_complexity)]
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if !supported(&[&gate, &up]) || gate.dims() != up.dims() {
        return Err((gate, up));
    }
    let shape = gate.shape();
    let (g, u) = (to_host(gate), to_host(up));
    let (gs, us) = (contiguous(g.flex()), contiguous(u.flex()));
    let mut out = cpu::alloc_uninit(shape.num_elements());
    out.par_chunks_mut(CHUNK).zip(slice(&gs).par_chunks(CHUNK)).zip(slice(&us).par_chunks(CHUNK)).for_each(|((o, gc), uc)| {
        swiglu_chunk(o, gc, uc);
    });
    // SAFETY: swiglu_chunk wrote every element.
    let out = flex_from_vec(unsafe { cpu::assume_init(out) }, shape.as_slice());
    let state = || (gs.clone(), us.clone());
    Ok(from_host(finish2(SwigluBackward, g, u, out, state)))
}

/// LayerNorm over the last dimension, `(x − mean) / sqrt(var + eps) · weight + bias` with the
/// biased variance, in one pass per row: for frozen layers (CLIP's and Qwen2-VL's vision
/// towers when they do not train). Gives the inputs back when unsupported or when any of them
/// needs a gradient (the caller's composed ops then build the graph).
#[allow(clippy::type_complexity)]
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>)> {
    let dim = x.dims()[D - 1];
    if !supported(&[&x]) || weight.dtype() != DType::F32 || bias.dtype() != DType::F32 || weight.dims() != [dim] || bias.dims() != [dim] {
        return Err((x, weight, bias));
    }
    let shape = x.shape();
    let (x, w, b) = (to_host(x), to_host(weight), to_host(bias));
    if x.requires_grad() || w.requires_grad() || b.requires_grad() {
        return Err((give_back(x), give_back(w), give_back(b)));
    }
    let (xs, ws, bs) = (contiguous(x.flex()), contiguous(w.flex()), contiguous(b.flex()));
    let (xv, wv, bv) = (slice(&xs), slice(&ws), slice(&bs));
    let mut out = cpu::alloc_uninit(xv.len());
    out.par_chunks_mut(dim * ROWS_PER_TASK).zip(xv.par_chunks(dim * ROWS_PER_TASK)).for_each(|(o, xc)| {
        for (orow, xrow) in o.chunks_mut(dim).zip(xc.chunks(dim)) {
            let mean = cpu::sum(xrow) / dim as f32;
            let var = centred_square_sum(xrow, mean) / dim as f32;
            layer_norm_row(orow, xrow, wv, bv, mean, 1.0 / (var + eps as f32).sqrt());
        }
    });
    // SAFETY: layer_norm_row wrote every row.
    let out = flex_from_vec(unsafe { cpu::assume_init(out) }, shape.as_slice());
    Ok(from_host(match x {
        Host::Tracked(x) => Host::Tracked(track(NoBackward, [&x], out, || ())),
        Host::Plain(_) => Host::Plain(out),
    }))
}

/// The node of a kernel whose inputs need no gradient ([`track`] leaves it untracked).
#[derive(Debug)]
struct NoBackward;

impl Backward<Flex, 1> for NoBackward {
    type State = ();

    fn backward(self, _: Ops<Self::State, 1>, _: &mut Gradients, _: &mut Checkpointer) {
        unreachable!("built only for inputs that need no gradient")
    }
}

/// QuickGELU, `x · σ(1.702 x)` (CLIP's and Qwen2-VL's vision MLP), in one pass. Gives the
/// input back when unsupported.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !supported(&[&x]) {
        return Err(x);
    }
    let shape = x.shape();
    let x = to_host(x);
    let xs = contiguous(x.flex());
    let mut out = cpu::alloc_uninit(shape.num_elements());
    out.par_chunks_mut(CHUNK).zip(slice(&xs).par_chunks(CHUNK)).for_each(|(o, xc)| quick_gelu_chunk(o, xc));
    // SAFETY: quick_gelu_chunk wrote every element.
    let out = flex_from_vec(unsafe { cpu::assume_init(out) }, shape.as_slice());
    Ok(from_host(match x {
        Host::Tracked(x) => Host::Tracked(track(QuickGeluBackward, [&x], out, || xs.clone())),
        Host::Plain(_) => Host::Plain(out),
    }))
}

#[derive(Debug)]
struct QuickGeluBackward;

impl Backward<Flex, 1> for QuickGeluBackward {
    /// The input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        let shape: Shape = x.layout().shape().clone();
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let mut dx = cpu::alloc_uninit(shape.num_elements());
        dx.par_chunks_mut(CHUNK)
            .zip(slice(&dy).par_chunks(CHUNK).zip(slice(&x).par_chunks(CHUNK)))
            .for_each(|(dx, (dy, x))| quick_gelu_backward_chunk(dx, dy, x));
        if let [Some(node)] = ops.parents {
            // SAFETY: quick_gelu_backward_chunk wrote every element.
            grads.register::<Flex>(node.id, flex_from_vec(unsafe { cpu::assume_init(dx) }, shape.as_slice()));
        }
    }
}

/// Elements per parallel task for element-wise loops.
const CHUNK: usize = 1 << 14;

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// gate, up.
    type State = (FlexTensor, FlexTensor);

    /// Both gradients in one pass (one sigmoid per element), registered for the inputs that
    /// need them.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (g, u) = ops.state;
        let shape: Shape = g.layout().shape().clone();
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let n = shape.num_elements();
        let (mut dg, mut du) = (cpu::alloc_uninit(n), cpu::alloc_uninit(n));
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(slice(&dy).par_chunks(CHUNK))
            .zip(slice(&g).par_chunks(CHUNK).zip(slice(&u).par_chunks(CHUNK)))
            .for_each(|(((dg, du), dy), (g, u))| swiglu_backward_chunk(dg, du, dy, g, u));
        // SAFETY: swiglu_backward_chunk wrote every element of both.
        let (dg, du) = unsafe { (cpu::assume_init(dg), cpu::assume_init(du)) };
        let [pg, pu] = ops.parents;
        if let Some(node) = pg {
            grads.register::<Flex>(node.id, flex_from_vec(dg, shape.as_slice()));
        }
        if let Some(node) = pu {
            grads.register::<Flex>(node.id, flex_from_vec(du, shape.as_slice()));
        }
    }
}

cpu::multiversion! {
    /// `out = (x · r) · w`.
    fn rms_norm_row(out: &mut [Uninit], x: &[f32], w: &[f32], r: f32) {
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
            o.write((x * r) * w);
        }
    }
}

cpu::multiversion! {
    /// `dx = r·g⊙w − x · r³·Σ(g⊙w⊙x)/dim`.
    fn rms_norm_backward_row(dx: &mut [Uninit], g: &[f32], x: &[f32], w: &[f32], r: f32) {
        let mut acc = [0f32; 16];
        let (cg, cw, cx) = (g.chunks_exact(16), w.chunks_exact(16), x.chunks_exact(16));
        let tail: f32 = cg.remainder().iter().zip(cw.remainder()).zip(cx.remainder()).map(|((g, w), x)| g * w * x).sum();
        for ((g, w), x) in cg.zip(cw).zip(cx) {
            for (((a, &g), &w), &x) in acc.iter_mut().zip(g).zip(w).zip(x) {
                *a += g * w * x;
            }
        }
        let c = r * r * r * (acc.iter().sum::<f32>() + tail) / x.len() as f32;
        for (((d, &g), &w), &x) in dx.iter_mut().zip(g).zip(w).zip(x) {
            d.write(r * g * w - x * c);
        }
    }
}

cpu::multiversion! {
    /// `out = g·σ(g)·u`.
    fn swiglu_chunk(out: &mut [Uninit], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            o.write(g * cpu::sigmoid(g) * u);
        }
    }
}

cpu::multiversion! {
    /// `∂/∂gate = dy·u·σ(g)·(1 + g·(1 − σ(g)))`, `∂/∂up = dy·g·σ(g)`.
    fn swiglu_backward_chunk(dg: &mut [Uninit], du: &mut [Uninit], dy: &[f32], g: &[f32], u: &[f32]) {
        for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(dy).zip(g).zip(u) {
            let s = cpu::sigmoid(g);
            dg.write(d * u * s * (1.0 + g * (1.0 - s)));
            du.write(d * g * s);
        }
    }
}

cpu::multiversion! {
    /// `Σ (x − m)²`.
    fn centred_square_sum(xs: &[f32], m: f32) -> f32 {
        let mut acc = [0f32; 16];
        let chunks = xs.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|&x| (x - m) * (x - m)).sum();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += (x - m) * (x - m);
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

cpu::multiversion! {
    /// `out = (x − mean)·rstd·w + b`.
    fn layer_norm_row(out: &mut [Uninit], x: &[f32], w: &[f32], b: &[f32], mean: f32, rstd: f32) {
        for (((o, &x), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
            o.write((x - mean) * rstd * w + b);
        }
    }
}

/// QuickGELU's slope.
const QUICK_GELU_ALPHA: f32 = 1.702;

cpu::multiversion! {
    /// `out = x·σ(1.702 x)`.
    fn quick_gelu_chunk(out: &mut [Uninit], x: &[f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            o.write(x * cpu::sigmoid(QUICK_GELU_ALPHA * x));
        }
    }
}

cpu::multiversion! {
    /// `dx = dy·(σ + 1.702·x·σ·(1 − σ))` with `σ = σ(1.702 x)`.
    fn quick_gelu_backward_chunk(dx: &mut [Uninit], dy: &[f32], x: &[f32]) {
        for ((d, &g), &x) in dx.iter_mut().zip(dy).zip(x) {
            let s = cpu::sigmoid(QUICK_GELU_ALPHA * x);
            d.write(g * (s + QUICK_GELU_ALPHA * x * s * (1.0 - s)));
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{activation, Distribution, Tensor};

    use super::*;
    use crate::dispatch::values;

    type Ad = crate::dispatch::FlexAd;

    /// LayerNorm against Burn's ops (as vsft-model composes it) on inputs that need no
    /// gradient, and handed back when one does.
    #[test]
    fn layer_norm_matches_composed_ops() {
        let dev = Default::default();
        let x = Tensor::<Ad, 2>::random([45, 384], Distribution::Normal(0.7, 3.0), &dev);
        let w = Tensor::<Ad, 1>::random([384], Distribution::Normal(1.0, 0.2), &dev);
        let b = Tensor::<Ad, 1>::random([384], Distribution::Normal(0.0, 0.2), &dev);
        let mean = x.clone().mean_dim(1);
        let centred = x.clone() - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(1);
        let composed = values(centred / (var + 1e-6).sqrt() * w.clone().unsqueeze() + b.clone().unsqueeze());
        let fused = values(layer_norm(x.clone(), w.clone(), b.clone(), 1e-6).ok().unwrap());
        let worst = fused.iter().zip(&composed).fold(0f32, |m, (a, c)| m.max((a - c).abs()));
        assert!(worst < 1e-5, "max abs diff {worst}");
        assert!(layer_norm(x.clone(), w.clone().require_grad(), b.clone(), 1e-6).is_err(), "a weight that trains needs the composed graph");
        assert!(layer_norm(x.require_grad(), w, b, 1e-6).is_err(), "an input that needs a gradient needs the composed graph");
    }

    /// QuickGELU against `x·sigmoid(1.702 x)` from Burn's ops, value and gradient.
    #[test]
    fn quick_gelu_matches_composed_ops() {
        let dev = Default::default();
        let x0 = Tensor::<Ad, 2>::random([37, 1000], Distribution::Normal(0.0, 3.0), &dev);
        let up = Tensor::<Ad, 2>::random([37, 1000], Distribution::Normal(0.0, 1.0), &dev);
        let run = |fused: bool| {
            let x = x0.clone().require_grad();
            let y = if fused { quick_gelu(x.clone()).ok().unwrap() } else { x.clone() * activation::sigmoid(x.clone() * 1.702) };
            let g = (y.clone() * up.clone()).sum().backward();
            [values(y), values(x.grad(&g).unwrap())]
        };
        let (f, c) = (run(true), run(false));
        for (name, (f, c)) in ["y", "dx"].iter().zip(f.iter().zip(&c)) {
            let worst = f.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs() / (1.0 + b.abs())));
            assert!(worst < 2e-6, "{name}: worst difference {worst}");
        }
    }
}
