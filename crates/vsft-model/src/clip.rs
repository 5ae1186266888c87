//! CLIP vision tower, as transformers' `CLIPVisionModel` computes it for LLaVA: patch conv
//! (no bias) + class embedding + position embeddings, `pre_layrnorm`, pre-LN encoder layers.
//! `post_layernorm` is loaded and saved (it is in every checkpoint) but LLaVA never uses it.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;

use crate::config::ClipVisionConfig;
use crate::nn::{Activation, LayerNorm, Linear};
use crate::weights::{Builder, Init};

#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: Backend> {
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: PatchConv<B>,
    pub position_embedding: crate::nn::Embedding<B>,
}

#[derive(Module, Debug)]
pub struct PatchConv<B: Backend> {
    /// `[hidden, channels, patch, patch]`.
    pub weight: Param<Tensor<B, 4>>,
    pub patch_size: usize,
}

#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// `vision_model` inside `vision_tower` in the Hub's layout.
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    pub embeddings: ClipEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: ClipEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct ClipVisionTower<B: Backend> {
    pub vision_model: ClipVisionTransformer<B>,
}

impl<B: Backend> ClipVisionTower<B> {
    pub fn new(b: &mut Builder<'_, B>, cfg: &ClipVisionConfig) -> Self {
        let mut b = b.scope("vision_tower");
        let mut b = b.scope("vision_model");
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let act = Activation::parse(&cfg.hidden_act).expect("validated config");
        let num_positions = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        let embeddings = {
            let mut e = b.scope("embeddings");
            let class_embedding = e.param([h], "class_embedding", Init::Normal(0.02));
            let patch_weight = e.scope("patch_embedding").param(
                [h, cfg.num_channels, cfg.patch_size, cfg.patch_size],
                "weight",
                Init::Normal(0.02),
            );
            ClipEmbeddings {
                class_embedding,
                patch_embedding: PatchConv { weight: patch_weight, patch_size: cfg.patch_size },
                // A random tower's positions get std 0.5 rather than 0.02, comparable to the patch
                // content after the conv, so that the features say where a patch is (a trained
                // CLIP's do); checkpoints are unaffected.
                position_embedding: crate::nn::Embedding::with_init(&mut e, "position_embedding", num_positions, h, Init::Normal(0.5)),
            }
        };
        let pre_layrnorm = LayerNorm::new(&mut b, "pre_layrnorm", h, eps);
        let layers = {
            let mut enc = b.scope("encoder");
            let mut layers_scope = enc.scope("layers");
            (0..cfg.num_hidden_layers)
                .map(|i| {
                    let mut l = layers_scope.scope(&i.to_string());
                    let self_attn = {
                        let mut a = l.scope("self_attn");
                        ClipAttention {
                            q_proj: Linear::new(&mut a, "q_proj", h, h, true),
                            k_proj: Linear::new(&mut a, "k_proj", h, h, true),
                            v_proj: Linear::new(&mut a, "v_proj", h, h, true),
                            out_proj: Linear::new(&mut a, "out_proj", h, h, true),
                            num_heads: cfg.num_attention_heads,
                        }
                    };
                    let layer_norm1 = LayerNorm::new(&mut l, "layer_norm1", h, eps);
                    let mlp = {
                        let mut m = l.scope("mlp");
                        ClipMlp {
                            fc1: Linear::new(&mut m, "fc1", h, cfg.intermediate_size, true),
                            fc2: Linear::new(&mut m, "fc2", cfg.intermediate_size, h, true),
                            act,
                        }
                    };
                    let layer_norm2 = LayerNorm::new(&mut l, "layer_norm2", h, eps);
                    ClipEncoderLayer { self_attn, layer_norm1, mlp, layer_norm2 }
                })
                .collect()
        };
        let post_layernorm = LayerNorm::new(&mut b, "post_layernorm", h, eps);
        Self {
            vision_model: ClipVisionTransformer {
                embeddings,
                pre_layrnorm,
                encoder: ClipEncoder { layers },
                post_layernorm,
            },
        }
    }

    /// Every linear layer with its PEFT module name under `prefix` (`model.vision_tower`), as
    /// transformers 5 names CLIP's modules (no `vision_model.` level).
    pub fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.vision_model.encoder.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (which, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.out_proj", &mut a.out_proj),
                ("mlp.fc1", &mut m.fc1),
                ("mlp.fc2", &mut m.fc2),
            ] {
                out.push((format!("{prefix}.encoder.layers.{i}.{which}"), lin));
            }
        }
        out
    }

    /// `hidden_states[0]`: the embeddings after `pre_layrnorm`, the first layer's input.
    pub fn stem(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let vm = &self.vision_model;
        vm.pre_layrnorm.forward(vm.embeddings.forward(pixel_values))
    }

    /// Encoder layer `i` (its output is `hidden_states[i + 1]`).
    pub fn layer(&self, i: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.vision_model.encoder.layers[i].forward(x)
    }

    /// `hidden_states[i]` for each requested `i` (0 = embeddings after `pre_layrnorm`, i = output
    /// of encoder layer i-1). Layers past the deepest requested one are not run.
    pub fn hidden_states(&self, pixel_values: Tensor<B, 4>, indices: &[usize]) -> Vec<Tensor<B, 3>> {
        let vm = &self.vision_model;
        let mut x = self.stem(pixel_values);
        let deepest = indices.iter().copied().max().unwrap_or(0);
        let mut out: Vec<Option<Tensor<B, 3>>> = vec![None; indices.len()];
        for depth in 0..=deepest {
            if depth > 0 {
                x = vm.encoder.layers[depth - 1].forward(x);
            }
            for (slot, &want) in out.iter_mut().zip(indices) {
                if want == depth {
                    *slot = Some(x.clone());
                }
            }
        }
        out.into_iter().map(|t| t.expect("every index is reached")).collect()
    }
}

impl<B: Backend> ClipEmbeddings<B> {
    fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let p = self.patch_embedding.patch_size;
        let act = pixel_values.dtype();
        let patches = conv2d(
            pixel_values,
            crate::nn::in_dtype(self.patch_embedding.weight.val(), act),
            None,
            ConvOptions::new([p, p], [0, 0], [1, 1], 1),
        );
        let [n, c, gh, gw] = patches.dims();
        let patches = patches.reshape([n, c, gh * gw]).swap_dims(1, 2);
        let cls = crate::nn::in_dtype(self.class_embedding.val(), act).reshape([1, 1, c]).expand([n, 1, c]);
        let x = Tensor::cat(vec![cls, patches], 1);
        let positions = crate::nn::in_dtype(self.position_embedding.weight.val().slice([0..gh * gw + 1]), act);
        x + positions.unsqueeze_dim(0)
    }
}

impl<B: Backend> ClipEncoderLayer<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let h = self.mlp.fc2.forward(self.mlp.act.apply(self.mlp.fc1.forward(self.layer_norm2.forward(x.clone()))));
        x + h
    }
}

impl<B: Backend> ClipAttention<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, t, h] = x.dims();
        let heads = self.num_heads;
        let hd = h / heads;
        let (q, k, v) = (self.q_proj.forward(x.clone()), self.k_proj.forward(x.clone()), self.v_proj.forward(x));
        let spec = vsft_kernels::AttentionSpec { num_heads: heads, num_kv_heads: heads, head_dim: hd, causal: false, rope: None, key_padding: None };
        let ctx = match vsft_kernels::attention(q, k, v, &spec) {
            Ok(ctx) => ctx,
            Err((q, k, v)) => {
                let split = |y: Tensor<B, 3>| y.reshape([n, t, heads, hd]).swap_dims(1, 2);
                // Burn's attention op: fused (no [n, heads, t, t] score matrix) on backends
                // that have a kernel for it, e.g. flash attention on CUDA.
                burn::tensor::module::attention(split(q), split(k), split(v), None, None, Default::default())
                    .swap_dims(1, 2)
                    .reshape([n, t, h])
            }
        };
        self.out_proj.forward(ctx)
    }
}
