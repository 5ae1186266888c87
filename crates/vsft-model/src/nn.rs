//! Layers with Hugging Face parameter names and layouts (`weight` is `[out, in]` as PyTorch
//! stores it), so a module path in Burn is the tensor name in the checkpoint and loading needs
//! no transposes or renames.

use burn::module::{Module, Param};
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, ElementConversion, Tensor};

use crate::weights::{Builder, Init};

thread_local! {
    static TRAINING_OUTSIDE_AUTODIFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with LoRA dropout active even on a non-autodiff backend. Per-layer gradient
/// checkpointing runs each layer twice, first without a graph and then again with one inside
/// backward; both runs must draw the same dropout masks from the same seed.
pub fn with_training_dropout<R>(f: impl FnOnce() -> R) -> R {
    let before = TRAINING_OUTSIDE_AUTODIFF.with(|c| c.replace(true));
    let out = f();
    TRAINING_OUTSIDE_AUTODIFF.with(|c| c.set(before));
    out
}

/// Whether dropout acts: under autodiff (training), or inside [`with_training_dropout`].
fn training<B: Backend>(device: &B::Device) -> bool {
    B::ad_enabled(device) || TRAINING_OUTSIDE_AUTODIFF.with(|c| c.get())
}

/// `t` in `dtype`: frozen weights may be held in bf16 while activations stay f32.
pub fn in_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// `x·wᵀ` in the weight's dtype when it differs from the activations' (as `torch.autocast`
/// computes a linear), returned in the activations' dtype. Casting the input rather than the
/// weight means the autodiff graph keeps a bf16 input, never an f32 copy of a frozen weight.
pub fn matmul_weight_t<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let act = x.dtype();
    if weight.dtype() == act {
        x.matmul(weight.transpose())
    } else {
        x.cast(weight.dtype()).matmul(weight.transpose()).cast(act)
    }
}

/// Activations named as transformers' `ACT2FN` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
    /// Exact erf GELU (`nn.functional.gelu`).
    Gelu,
    /// tanh approximation.
    GeluTanh,
    Silu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Self::GeluTanh),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    pub fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::QuickGelu => vsft_kernels::quick_gelu(x).unwrap_or_else(|x| x.clone() * activation::sigmoid(x * 1.702)),
            Self::Gelu => gelu(x),
            Self::GeluTanh => activation::gelu_approximate(x),
            Self::Silu => activation::silu(x),
        }
    }
}

/// Exact erf GELU with an exact gradient. Flex's `gelu` differentiates the erf form; Burn's
/// other backends (cubecl: wgpu, CUDA) differentiate the tanh approximation, which put the
/// projector's first-layer gradients 6.6e-4 (relative) from torch's on wgpu. There, GELU is
/// composed from `erf`, whose backward is exact (2/√π·e^(−x²)).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if vsft_kernels::supported(&[&x]) {
        return activation::gelu(x);
    }
    x.clone() * ((x * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0) * 0.5
}

/// A low-rank adapter on a [`Linear`]: `scale · B(A(dropout(x)))`, PEFT's LoRA.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[r, in]`, PEFT's `lora_A.weight`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[out, r]`, PEFT's `lora_B.weight`.
    pub lora_b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: burn::nn::Dropout,
}

/// `y = x Wᵀ + b`, plus an optional LoRA branch whose base weight stays frozen.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    pub fn new(b: &mut Builder<'_, B>, name: &str, d_in: usize, d_out: usize, bias: bool) -> Self {
        Self::with_init(b, name, d_in, d_out, bias, Init::Normal(0.02))
    }

    /// `weight_init` applies when the model is randomly initialised (checkpoints ignore it).
    pub fn with_init(b: &mut Builder<'_, B>, name: &str, d_in: usize, d_out: usize, bias: bool, weight_init: Init) -> Self {
        let mut s = b.scope(name);
        let weight = s.param([d_out, d_in], "weight", weight_init);
        let bias = bias.then(|| s.param([d_out], "bias", Init::Zeros));
        Self { weight, bias, lora: None }
    }

    pub fn d_in(&self) -> usize {
        self.weight.val().dims()[1]
    }
    pub fn d_out(&self) -> usize {
        self.weight.val().dims()[0]
    }

    /// One fused node on the CPU backend ([`vsft_kernels::linear`], unless LoRA dropout is on),
    /// Burn's matmuls elsewhere.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let d_in = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let x2: Tensor<B, 2> = x.reshape([rows, d_in]);
        let y = match vsft_kernels::supported(&[&x2]) {
            true => {
                let lora = self.lora.as_ref().map(|l| {
                    // Dropout acts only under autodiff (training), as Burn's Dropout does. Its
                    // seed comes from the backend's RNG, which the trainer seeds per micro-batch.
                    let dropout = (training::<B>(&x2.device()) && l.dropout.prob > 0.0).then(|| {
                        let u: f64 = Tensor::<B, 1>::random([1], Distribution::Uniform(0.0, 1.0), &x2.device()).into_scalar().elem();
                        (l.dropout.prob, (u * (1u64 << 53) as f64) as u64)
                    });
                    vsft_kernels::LoraBranch { a: l.lora_a.val(), b: l.lora_b.val(), scale: l.scale, dropout }
                });
                vsft_kernels::linear(x2, self.weight.val(), self.bias.as_ref().map(|b| b.val()), lora).unwrap_or_else(|x2| self.forward_composed(x2))
            }
            false => self.forward_composed(x2),
        };
        dims[D - 1] = y.dims()[1];
        y.reshape(dims)
    }

    /// Burn's own ops over `[rows, in]`: the reference for the fused kernel.
    pub fn forward_composed(&self, x2: Tensor<B, 2>) -> Tensor<B, 2> {
        let act = x2.dtype();
        let mut y = matmul_weight_t(x2.clone(), self.weight.val());
        if let Some(bias) = &self.bias {
            y = y + in_dtype(bias.val(), act).unsqueeze_dim(0);
        }
        if let Some(lora) = &self.lora {
            // Low-rank path: never materialise B·A, so backward stays rank-sized.
            // Burn's Dropout, written out so that it also acts inside `with_training_dropout`.
            let p = lora.dropout.prob;
            let dropped = if training::<B>(&x2.device()) && p > 0.0 {
                let keep = x2.random_like(Distribution::Bernoulli(1.0 - p));
                (x2 * keep) * (1.0 / (1.0 - p))
            } else {
                x2
            };
            let h = dropped.matmul(lora.lora_a.val().transpose());
            y = y + h.matmul(lora.lora_b.val().transpose()) * lora.scale;
        }
        y
    }

    /// `W + scale · B·A` (PEFT's `merge_and_unload`), for export.
    pub fn merged_weight(&self) -> Tensor<B, 2> {
        match &self.lora {
            Some(l) => in_dtype(self.weight.val(), DType::F32) + l.lora_b.val().matmul(l.lora_a.val()) * l.scale,
            None => self.weight.val(),
        }
    }
}

#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(b: &mut Builder<'_, B>, name: &str, dim: usize, eps: f64) -> Self {
        let mut s = b.scope(name);
        Self { weight: s.param([dim], "weight", Init::Ones), bias: s.param([dim], "bias", Init::Zeros), eps }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match vsft_kernels::layer_norm(x, self.weight.val(), self.bias.val(), self.eps) {
            Ok(y) => return y,
            Err((x, ..)) => x,
        };
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = centered / (var + self.eps).sqrt();
        let act = normed.dtype();
        normed * in_dtype(self.weight.val(), act).unsqueeze() + in_dtype(self.bias.val(), act).unsqueeze()
    }
}

/// Llama's RMSNorm: `weight * (x / sqrt(mean(x²) + eps))`, the weight applied after the
/// normalisation (computed in f32 as transformers does).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(b: &mut Builder<'_, B>, name: &str, dim: usize, eps: f64) -> Self {
        let mut s = b.scope(name);
        Self { weight: s.param([dim], "weight", Init::Ones), eps }
    }

    /// Fused on the CPU backend ([`vsft_kernels::rms_norm`]), composed elsewhere.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match vsft_kernels::rms_norm(x, self.weight.val(), self.eps) {
            Ok(y) => y,
            Err((x, _)) => self.forward_composed(x),
        }
    }

    /// Burn's own ops: the reference for the fused kernel.
    pub fn forward_composed<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let ms = x.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = x * (ms + self.eps).sqrt().recip();
        let act = normed.dtype();
        normed * in_dtype(self.weight.val(), act).unsqueeze()
    }
}

#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, dim]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    pub fn new(b: &mut Builder<'_, B>, name: &str, vocab: usize, dim: usize) -> Self {
        Self::with_init(b, name, vocab, dim, Init::Normal(0.02))
    }

    /// `init` applies when the model is randomly initialised (checkpoints ignore it).
    pub fn with_init(b: &mut Builder<'_, B>, name: &str, vocab: usize, dim: usize, init: Init) -> Self {
        let mut s = b.scope(name);
        Self { weight: s.param([vocab, dim], "weight", init) }
    }

    /// `ids: [batch, seq]` → `[batch, seq, dim]`.
    pub fn forward(&self, ids: Tensor<B, 2, burn::tensor::Int>) -> Tensor<B, 3> {
        let [batch, seq] = ids.dims();
        let flat = ids.reshape([batch * seq]);
        let rows = in_dtype(self.weight.val().select(0, flat), DType::F32);
        let dim = rows.dims()[1];
        rows.reshape([batch, seq, dim])
    }
}
