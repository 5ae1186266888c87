//! The Llama decoder as transformers' `LlamaModel` computes it: RMSNorm, RoPE with rotate_half,
//! grouped-query attention with a causal + key-padding mask, SiLU-gated MLP.

use std::cell::OnceCell;
use std::sync::Arc;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{activation, Bool, Int, Tensor, TensorData};

use crate::config::LlamaConfig;
use crate::nn::{Embedding, Linear, RmsNorm};
use crate::weights::Builder;

#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct LlamaMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

#[derive(Module, Debug)]
pub struct LlamaDecoderLayer<B: Backend> {
    pub self_attn: LlamaAttention<B>,
    pub mlp: LlamaMlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

/// `language_model.model` in the Hub's layout.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<LlamaDecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    pub rope_theta: f64,
    /// Multimodal RoPE (Qwen2-VL): how many frequency slots the t, h and w positions fill.
    #[module(skip)]
    pub mrope_section: Option<Vec<usize>>,
    /// Mistral's sliding window: a query sees this many keys, itself included (`None`: all).
    #[module(skip)]
    pub sliding_window: Option<usize>,
}

/// `language_model` in the Hub's layout: the decoder and its head (absent when tied).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    pub model: LlamaModel<B>,
    pub lm_head: Option<Linear<B>>,
}

/// Where each token sits for the rotary embedding.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Positions {
    /// `0..seq` in every row (1-D RoPE).
    #[default]
    Sequential,
    /// `(t, h, w)` per token, `[batch·seq]` (Qwen2-VL's `get_rope_index`).
    Multimodal(Vec<[i64; 3]>),
}

/// The rotary tables for one sequence length, shared by every layer of a forward pass.
#[derive(Clone, Debug)]
pub struct Rope<B: Backend> {
    /// `[1 or batch, 1, seq, head_dim]`.
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    /// The same tables on the host for the fused attention kernel: `[seq, head_dim]`, or
    /// `[batch·seq, head_dim]` when each row has its own (multimodal RoPE).
    pub host: (Arc<Vec<f32>>, Arc<Vec<f32>>),
}

/// `inv_freq = 1/θ^(2i/d)` computed as torch computes it: f32 power, f32 division.
fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect()
}

impl<B: Backend> Rope<B> {
    /// `emb = cat(freqs, freqs)` with `freqs = position · inv_freq` in f32, as transformers
    /// computes it. `positions` holds one position per token (`arange` in training).
    pub fn new(positions: &[usize], head_dim: usize, theta: f64, device: &B::Device) -> Self {
        let inv = inv_freq(head_dim, theta);
        let seq = positions.len();
        let mut cos = Vec::with_capacity(seq * head_dim);
        let mut sin = Vec::with_capacity(seq * head_dim);
        for &p in positions {
            let freqs: Vec<f32> = inv.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|f| f.cos()));
                sin.extend(freqs.iter().map(|f| f.sin()));
            }
        }
        let shape = [1, 1, seq, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos.clone(), shape), device),
            sin: Tensor::from_data(TensorData::new(sin.clone(), shape), device),
            host: (Arc::new(cos), Arc::new(sin)),
        }
    }

    /// Multimodal RoPE: frequency slot `i` takes its angle from the t, h or w position as
    /// `section` assigns the slots in order (`[16, 24, 24]`: 16 from t, 24 from h, 24 from w),
    /// per row. `positions: [batch·seq]`.
    pub fn multimodal(positions: &[[i64; 3]], batch: usize, head_dim: usize, theta: f64, section: &[usize], device: &B::Device) -> Self {
        let inv = inv_freq(head_dim, theta);
        let component: Vec<usize> = section.iter().enumerate().flat_map(|(c, &n)| std::iter::repeat_n(c % 3, n)).collect();
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for p in positions {
            let freqs: Vec<f32> = inv.iter().zip(&component).map(|(f, &c)| p[c] as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|f| f.cos()));
                sin.extend(freqs.iter().map(|f| f.sin()));
            }
        }
        let shape = [batch, 1, positions.len() / batch.max(1), head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos.clone(), shape), device),
            sin: Tensor::from_data(TensorData::new(sin.clone(), shape), device),
            host: (Arc::new(cos), Arc::new(sin)),
        }
    }

    /// `x·cos + rotate_half(x)·sin` with `rotate_half(x) = cat(-x[d/2:], x[:d/2])`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// The causal + key-padding mask of a full forward pass, in the two forms the attention paths
/// use: the fused kernel reads which keys are padding; Burn's composed attention a dense
/// `[batch, 1, seq, seq]` boolean mask, built only if some layer needs it.
pub struct CausalMask<B: Backend> {
    attention_mask: Tensor<B, 2, Int>,
    /// A sliding window shorter than the sequence: the fused kernel (causal only) cannot run.
    window: Option<usize>,
    /// `[batch, seq]`, true where attention_mask is 0; `None` when nothing is padded or the
    /// fused kernel cannot run on this backend (then the mask is not read back to the host).
    key_padding: Option<Arc<Vec<bool>>>,
    dense: OnceCell<Tensor<B, 4, Bool>>,
}

impl<B: Backend> CausalMask<B> {
    /// `attention_mask: [batch, seq]` of 0/1; `sliding_window` as the decoder's config says.
    pub fn new(attention_mask: Tensor<B, 2, Int>, read_padding: bool, sliding_window: Option<usize>) -> Self {
        let seq = attention_mask.dims()[1];
        // A window at least as long as the sequence never hides a key: same as none.
        let window = sliding_window.filter(|&w| w < seq);
        let key_padding = (read_padding && window.is_none())
            .then(|| attention_mask.to_data().iter::<i64>().map(|m| m == 0).collect::<Vec<bool>>())
            .filter(|pad| pad.iter().any(|&p| p))
            .map(Arc::new);
        Self { attention_mask, window, key_padding, dense: OnceCell::new() }
    }

    /// Whether the fused causal kernel computes this mask.
    pub fn fused_ok(&self) -> bool {
        self.window.is_none()
    }

    /// `[batch, 1, seq, seq]`, true where attention is forbidden.
    pub fn dense(&self) -> Tensor<B, 4, Bool> {
        self.dense
            .get_or_init(|| {
                let mask = causal_padding_mask(self.attention_mask.clone());
                match self.window {
                    Some(w) => {
                        let [batch, _, seq, _] = mask.dims();
                        mask.bool_or(window_mask::<B>(seq, seq, 0, w, &self.attention_mask.device()).expand([batch, 1, seq, seq]))
                    }
                    None => mask,
                }
            })
            .clone()
    }
}

/// `[1, 1, t, s]`, true where key `j` lies `window` or more positions before query `start + i`
/// (Mistral's sliding window: `key > query − window` is visible).
pub fn window_mask<B: Backend>(t: usize, s: usize, start: usize, window: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let hidden: Vec<bool> = (0..t).flat_map(|i| (0..s).map(move |j| j + window <= start + i)).collect();
    Tensor::from_data(TensorData::new(hidden, [1, 1, t, s]), device)
}

/// `true` where attention is forbidden: future keys, and keys whose attention_mask is 0.
/// `attention_mask: [batch, seq]` of 0/1 → `[batch, 1, seq, seq]`.
pub fn causal_padding_mask<B: Backend>(attention_mask: Tensor<B, 2, Int>) -> Tensor<B, 4, Bool> {
    let [batch, seq] = attention_mask.dims();
    let device = attention_mask.device();
    let future = Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, &device).reshape([1, 1, seq, seq]);
    let padded_key = attention_mask.equal_elem(0).reshape([batch, 1, 1, seq]);
    future.expand([batch, 1, seq, seq]).bool_or(padded_key.expand([batch, 1, seq, seq]))
}

impl<B: Backend> LlamaForCausalLM<B> {
    pub fn new(b: &mut Builder<'_, B>, cfg: &LlamaConfig, tie_word_embeddings: bool) -> Self {
        let mut lm = b.scope("language_model");
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let eps = cfg.rms_norm_eps;
        let model = {
            let mut m = lm.scope("model");
            let embed_tokens = Embedding::new(&mut m, "embed_tokens", cfg.vocab_size, h);
            let layers = {
                let mut ls = m.scope("layers");
                (0..cfg.num_hidden_layers)
                    .map(|i| {
                        let mut l = ls.scope(&i.to_string());
                        let self_attn = {
                            let mut a = l.scope("self_attn");
                            let (qkv_bias, o_bias) = (cfg.qkv_bias(), cfg.attention_bias);
                            LlamaAttention {
                                q_proj: Linear::new(&mut a, "q_proj", h, nh * hd, qkv_bias),
                                k_proj: Linear::new(&mut a, "k_proj", h, nkv * hd, qkv_bias),
                                v_proj: Linear::new(&mut a, "v_proj", h, nkv * hd, qkv_bias),
                                o_proj: Linear::new(&mut a, "o_proj", nh * hd, h, o_bias),
                                num_heads: nh,
                                num_kv_heads: nkv,
                                head_dim: hd,
                            }
                        };
                        let mlp = {
                            let mut p = l.scope("mlp");
                            let (i_size, bias) = (cfg.intermediate_size, cfg.mlp_bias);
                            LlamaMlp {
                                gate_proj: Linear::new(&mut p, "gate_proj", h, i_size, bias),
                                up_proj: Linear::new(&mut p, "up_proj", h, i_size, bias),
                                down_proj: Linear::new(&mut p, "down_proj", i_size, h, bias),
                            }
                        };
                        LlamaDecoderLayer {
                            self_attn,
                            mlp,
                            input_layernorm: RmsNorm::new(&mut l, "input_layernorm", h, eps),
                            post_attention_layernorm: RmsNorm::new(&mut l, "post_attention_layernorm", h, eps),
                        }
                    })
                    .collect()
            };
            let norm = RmsNorm::new(&mut m, "norm", h, eps);
            LlamaModel { embed_tokens, layers, norm, rope_theta: cfg.rope_theta(), mrope_section: cfg.mrope_section(), sliding_window: cfg.sliding_window() }
        };
        // A random model's head gets std 1/√hidden rather than transformers' 0.02: with a frozen
        // head after RMSNorm, 0.02 caps every logit near ±2.6, and a LoRA-only run (the demo) could
        // then never become confident. Checkpoints are unaffected.
        let head_init = crate::weights::Init::Normal(1.0 / (h as f64).sqrt());
        let lm_head = (!tie_word_embeddings).then(|| Linear::with_init(&mut lm, "lm_head", h, cfg.vocab_size, false, head_init));
        Self { model, lm_head }
    }

    /// Decoder over `inputs_embeds: [batch, seq, hidden]` → final hidden states (after `norm`).
    pub fn decode(&self, inputs_embeds: Tensor<B, 3>, attention_mask: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.decode_at(inputs_embeds, attention_mask, &Positions::Sequential)
    }

    /// [`Self::decode`] with the tokens at `positions`.
    pub fn decode_at(&self, inputs_embeds: Tensor<B, 3>, attention_mask: Tensor<B, 2, Int>, positions: &Positions) -> Tensor<B, 3> {
        let (rope, mask) = self.layer_inputs_at(&inputs_embeds, attention_mask, positions);
        let mut x = inputs_embeds;
        for layer in &self.model.layers {
            x = layer.forward(x, &rope, &mask);
        }
        self.model.norm.forward(x)
    }

    /// The rotary tables and the mask every layer of a full pass over `inputs_embeds` reads.
    pub fn layer_inputs(&self, inputs_embeds: &Tensor<B, 3>, attention_mask: Tensor<B, 2, Int>) -> (Rope<B>, CausalMask<B>) {
        self.layer_inputs_at(inputs_embeds, attention_mask, &Positions::Sequential)
    }

    /// [`Self::layer_inputs`] with the tokens at `positions`.
    pub fn layer_inputs_at(&self, inputs_embeds: &Tensor<B, 3>, attention_mask: Tensor<B, 2, Int>, positions: &Positions) -> (Rope<B>, CausalMask<B>) {
        let [batch, seq, _] = inputs_embeds.dims();
        let head_dim = self.head_dim();
        let device = inputs_embeds.device();
        let rope = match (positions, &self.model.mrope_section) {
            (Positions::Multimodal(p), Some(section)) => Rope::multimodal(p, batch, head_dim, self.model.rope_theta, section, &device),
            _ => Rope::new(&(0..seq).collect::<Vec<_>>(), head_dim, self.model.rope_theta, &device),
        };
        (rope, CausalMask::new(attention_mask, vsft_kernels::supported(&[inputs_embeds]), self.model.sliding_window))
    }

    fn head_dim(&self) -> usize {
        self.model.layers.first().map(|l| l.self_attn.head_dim).unwrap_or(2)
    }

    /// Decoder over new positions of one sequence, reading and extending `cache` (generation).
    /// `positions` places the new tokens (multimodal RoPE for a prompt with images); without it
    /// they follow the cache, shifted by its `position_delta`.
    pub fn decode_cached(&self, inputs_embeds: Tensor<B, 3>, cache: &mut KvCache<B>, positions: Option<&Positions>) -> Tensor<B, 3> {
        let [_, t, _] = inputs_embeds.dims();
        let device = inputs_embeds.device();
        let head_dim = self.head_dim();
        let start = cache.len;
        let rope = match (positions, &self.model.mrope_section) {
            (Some(Positions::Multimodal(p)), Some(section)) => Rope::multimodal(p, 1, head_dim, self.model.rope_theta, section, &device),
            (_, Some(section)) => {
                let p: Vec<[i64; 3]> = (start..start + t).map(|i| [i as i64 + cache.position_delta; 3]).collect();
                Rope::multimodal(&p, 1, head_dim, self.model.rope_theta, section, &device)
            }
            _ => Rope::new(&(start..start + t).collect::<Vec<_>>(), head_dim, self.model.rope_theta, &device),
        };
        // Query i (absolute start + i) must not see keys after it, nor keys a sliding window has
        // left behind; one new token within the window sees everything.
        let s = start + t;
        let window = self.model.sliding_window.filter(|&w| w < s);
        let mask = (t > 1 || window.is_some()).then(|| {
            let forbidden: Vec<bool> =
                (0..t).flat_map(|i| (0..s).map(move |j| j > start + i || window.is_some_and(|w| j + w <= start + i))).collect();
            Tensor::<B, 4, Bool>::from_data(TensorData::new(forbidden, [1, 1, t, s]), &device)
        });
        if cache.layers.len() != self.model.layers.len() {
            cache.layers = vec![None; self.model.layers.len()];
        }
        let mut x = inputs_embeds;
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_cached(x, &rope, mask.clone(), Some(slot));
        }
        cache.len += t;
        self.model.norm.forward(x)
    }

    /// Hidden states → logits `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, t, h] = hidden.dims();
                let w = self.model.embed_tokens.weight.val();
                let v = w.dims()[0];
                crate::nn::matmul_weight_t(hidden.reshape([b * t, h]), w).reshape([b, t, v])
            }
        }
    }
}

/// One layer's cached keys and values (`[1, kv_heads, past, head_dim]`, keys after RoPE).
pub type LayerCache<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// Keys and values of past positions, per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerCache<B>>,
    /// Positions already in the cache.
    pub len: usize,
    /// Multimodal RoPE: the next token's position minus `len` (transformers' `rope_deltas`).
    pub position_delta: i64,
}

impl<B: Backend> LlamaDecoderLayer<B> {
    /// A full causal pass (training, scoring).
    pub fn forward(&self, x: Tensor<B, 3>, rope: &Rope<B>, mask: &CausalMask<B>) -> Tensor<B, 3> {
        self.residual_blocks(x, |n| self.self_attn.forward(n, rope, mask))
    }

    /// With `cache`, this layer's past keys/values are prepended and the new ones appended.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        self.residual_blocks(x, |n| self.self_attn.forward_cached(n, rope, mask, cache))
    }

    /// `x + attn(norm(x))`, then `+ mlp(norm(·))`.
    fn residual_blocks(&self, x: Tensor<B, 3>, attention: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + attention(self.input_layernorm.forward(x));
        let n = self.post_attention_layernorm.forward(x.clone());
        let mlp = &self.mlp;
        let (gate, up) = (mlp.gate_proj.forward(n.clone()), mlp.up_proj.forward(n));
        let gated = match vsft_kernels::swiglu(gate, up) {
            Ok(y) => y,
            Err((gate, up)) => activation::silu(gate) * up,
        };
        x + mlp.down_proj.forward(gated)
    }
}

impl<B: Backend> LlamaAttention<B> {
    /// A full causal pass: the fused kernel on the CPU backend, Burn's ops elsewhere.
    pub fn forward(&self, x: Tensor<B, 3>, rope: &Rope<B>, mask: &CausalMask<B>) -> Tensor<B, 3> {
        let (q, k, v) = (self.q_proj.forward(x.clone()), self.k_proj.forward(x.clone()), self.v_proj.forward(x));
        if !mask.fused_ok() || !vsft_kernels::supported(&[&q]) {
            return self.attend(q, k, v, rope, Some(mask.dense()), None);
        }
        let spec = vsft_kernels::AttentionSpec {
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            causal: true,
            rope: Some(rope.host.clone()),
            key_padding: mask.key_padding.clone(),
        };
        match vsft_kernels::attention(q, k, v, &spec) {
            Ok(ctx) => self.o_proj.forward(ctx),
            // Not reached on the CPU backend (`supported` above).
            Err((q, k, v)) => self.attend(q, k, v, rope, Some(mask.dense()), None),
        }
    }

    /// `mask: [b|1, 1, t, past + t]`, true where attention is forbidden (`None`: attend to all).
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let (q, k, v) = (self.q_proj.forward(x.clone()), self.k_proj.forward(x.clone()), self.v_proj.forward(x));
        self.attend(q, k, v, rope, mask, cache)
    }

    /// Burn's composed attention over projected `q, k, v: [b, t, heads·head_dim]`: the
    /// reference for the fused kernel, and the path with a KV cache.
    fn attend(
        &self,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = q.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = q.reshape([b, t, nh, hd]).swap_dims(1, 2);
        let k = k.reshape([b, t, nkv, hd]).swap_dims(1, 2);
        let v = v.reshape([b, t, nkv, hd]).swap_dims(1, 2);
        self.attend_heads(rope.apply(q), rope.apply(k), v, mask, cache)
    }

    /// Attention over rotated `q: [b, heads, t, d]`, `k, v: [b, kv_heads, t, d]`, extending
    /// `cache` when given.
    fn attend_heads(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Tensor<B, 4, Bool>>, cache: Option<&mut LayerCache<B>>) -> Tensor<B, 3> {
        let [b, _, t, _] = q.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut k = k;
        let mut v = v;
        if let Some(cache) = cache {
            if let Some((pk, pv)) = cache.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let s = k.dims()[2];
        let k = repeat_kv(k, nh / nkv);
        let v = repeat_kv(v, nh / nkv);
        let mut scores = q.matmul(k.swap_dims(2, 3)) * (hd as f64).powf(-0.5);
        if let Some(mask) = mask {
            // transformers adds finfo.min at masked positions; filling with it gives the same softmax.
            scores = scores.mask_fill(mask.expand([b, nh, t, s]), f32::MIN);
        }
        let probs = activation::softmax(scores, 3);
        let ctx = probs.matmul(v).swap_dims(1, 2).reshape([b, t, nh * hd]);
        self.o_proj.forward(ctx)
    }
}

/// `[b, kv, t, d]` → `[b, kv·n_rep, t, d]`, each kv head repeated for its group of query heads.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, kv, n_rep, t, d]).reshape([b, kv * n_rep, t, d])
}
