//! Fused training kernels for Burn's Flex CPU backend.
//!
//! Burn composes a Llama layer from small tensor ops, each a pass over memory, a fresh
//! allocation and an autodiff node: on two cores that overhead cost more than the matmuls
//! (benches/NOTES.md). Each kernel here is one node with a hand-written backward:
//!
//! | kernel | replaces | backward keeps |
//! |---|---|---|
//! | [`linear`] | `x·Wᵀ`, bias add, and LoRA's two matmuls, scale and add | the input, `scale·x·Aᵀ` |
//! | [`cross_entropy_sum`] | log_softmax, gather, mask, sum over a 32k vocabulary | `softmax − onehot`, written over the logits in place |
//! | [`rms_norm`] | square, mean, sqrt, recip, two muls | the input and one 1/rms per row |
//! | [`swiglu`] | sigmoid, two muls | gate and up |
//! | [`quick_gelu`] | a scalar mul, sigmoid, a mul | the input |
//! | [`layer_norm`] | mean, subtract, square, mean, sqrt, divide, mul, add | nothing: frozen layers only |
//! | [`attention`] | RoPE (slices, cat), swap_dims, repeat_kv, QKᵀ, mask, softmax, PV | the rotated Q, K and the probabilities |
//!
//! Attention computes only the causal lower triangle in row blocks of 64 and reads Q, K, V
//! in the projections' `[batch, seq, heads·dim]` layout, so nothing is transposed or copied.
//!
//! Dispatch is by type at run time: each entry point takes any Burn tensor and returns `None`
//! unless the backend is `Flex` or `Autodiff<Flex>` with f32 data and the kernels are enabled.
//! Callers keep Burn's composed version as the fallback (CUDA, WGPU, bf16) and as the
//! reference the parity tests compare against. `VSFT_FUSED=0` (or [`set_enabled`]) turns
//! the kernels off, for A/B measurements.
//!
//! Limits: f32 only; attention is self-attention without a KV cache (generation uses the
//! composed path); RMSNorm's and SwiGLU's backward cover any input that requires a gradient.

mod attention;
mod cpu;
mod cross_entropy;
mod dispatch;
mod elementwise;
mod linear;

pub use attention::{attention, AttentionSpec};
pub use cross_entropy::cross_entropy_sum;
pub use dispatch::{enabled, fused_calls, set_enabled, supported};
pub use elementwise::{layer_norm, quick_gelu, rms_norm, swiglu};
pub use linear::{linear, LoraBranch};
