//! The Qwen2-VL and Qwen2.5-VL vision tower (`visual.*`), as transformers 5.24 computes it
//! (`Qwen2VisionTransformerPretrainedModel`, `Qwen2_5_VisionTransformerPretrainedModel`):
//!
//! 1. patch embed: a Conv3d whose stride equals its kernel and that has no bias, i.e. one matmul
//!    of the processor's `[patches, C·T·P·P]` rows with the weight reshaped to `[E, C·T·P·P]`;
//! 2. (Qwen2.5-VL) the patches permuted into window order, in groups of `merge²` patches (one
//!    merged token each);
//! 3. `depth` pre-norm blocks: `x += proj(attn(norm1 x))`, `x += mlp(norm2 x)`, attention
//!    bidirectional inside segments (each image/frame, or for Qwen2.5-VL's windowed blocks each
//!    window), 2D rotary embedding on q and k computed and applied in f32;
//! 4. PatchMerger: norm, `merge²` consecutive patches viewed as one row, Linear → GELU (erf) →
//!    Linear; (Qwen2.5-VL) the merged tokens put back in the processor's order.
//!
//! Differences between the versions: Qwen2-VL uses LayerNorm (eps 1e-6, with bias) and an
//! `fc1 → act → fc2` MLP (`quick_gelu` by default), width `embed_dim`, merger output
//! `hidden_size`; Qwen2.5-VL uses RMSNorm (eps 1e-6, weight only), a SwiGLU MLP with biases
//! (`gate_proj`/`up_proj`/`down_proj`, `silu`), width `hidden_size`, merger output
//! `out_hidden_size`, and window attention outside `fullatt_block_indexes`.
//!
//! Grid metadata (`image_grid_thw`) stays on the host: [`QwenVisionTower::context`] turns it into
//! a [`VisionContext`] (rotary tables, attention segments, permutations), which the step-by-step
//! API ([`QwenVisionTower::stem`] → [`QwenVisionTower::layer`] → [`QwenVisionTower::merge`]) shares
//! so that a caller can checkpoint each layer.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{activation, DType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{check, linear_count, Count};
use crate::error::ModelError;
use crate::nn::{in_dtype, matmul_weight_t, Activation, LayerNorm, Linear, RmsNorm};
use crate::weights::{Builder, Init};

/// Which architecture a `vision_config` describes; decided by the caller from the top-level
/// `model_type` (`qwen2_vl` / `qwen2_5_vl`), since the keys alone are ambiguous
/// (`hidden_size` changes meaning between the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionVersion {
    #[default]
    Qwen2,
    Qwen25,
}

impl VisionVersion {
    /// From the top-level `model_type` of config.json.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen2_vl" => Some(Self::Qwen2),
            "qwen2_5_vl" => Some(Self::Qwen25),
            _ => None,
        }
    }
}

/// `vision_config` of Qwen2-VL (`Qwen2VLVisionConfig`) or Qwen2.5-VL (`Qwen2_5_VLVisionConfig`),
/// with the class defaults for absent keys. Keys whose default depends on the version are
/// `Option`s (absent stays absent when saved); read them through the accessors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QwenVisionConfig {
    /// Not a Hub key: the caller sets it from the top-level `model_type` (or inserts
    /// `"version": "qwen2" | "qwen25"` before deserialising, and strips it when saving for the Hub).
    #[serde(default)]
    pub version: VisionVersion,
    #[serde(default = "d::depth", alias = "num_hidden_layers")]
    pub depth: usize,
    /// Qwen2-VL: the ViT width (default 1280). Unused by Qwen2.5-VL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_dim: Option<usize>,
    /// Qwen2-VL: the merger's output (= the LLM width); Qwen2.5-VL: the ViT width. 3584 by
    /// default in both classes.
    #[serde(default = "d::hidden")]
    pub hidden_size: usize,
    /// Qwen2-VL: MLP width = `embed_dim · mlp_ratio` (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_ratio: Option<usize>,
    /// Qwen2.5-VL: MLP width (default 3420).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// Qwen2.5-VL: the merger's output (default 3584).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_hidden_size: Option<usize>,
    #[serde(default = "d::heads", alias = "num_attention_heads")]
    pub num_heads: usize,
    /// transformers ignores the Hub's `in_chans` (kept in `extra`) and reads `in_channels`.
    #[serde(default = "d::three")]
    pub in_channels: usize,
    #[serde(default = "d::patch")]
    pub patch_size: usize,
    #[serde(default = "d::two")]
    pub spatial_merge_size: usize,
    #[serde(default = "d::two")]
    pub temporal_patch_size: usize,
    /// Default `quick_gelu` (Qwen2-VL), `silu` (Qwen2.5-VL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Qwen2.5-VL: the attention window in pixels (default 112).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_size: Option<usize>,
    /// Qwen2.5-VL: blocks that attend over the whole image (default `[7, 15, 23, 31]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fullatt_block_indexes: Option<Vec<usize>>,
    /// Keys not interpreted here (`in_chans`, `rope_parameters`, `tokens_per_second`, …), kept so
    /// that a saved config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

mod d {
    pub fn depth() -> usize {
        32
    }
    pub fn hidden() -> usize {
        3584
    }
    pub fn heads() -> usize {
        16
    }
    pub fn three() -> usize {
        3
    }
    pub fn two() -> usize {
        2
    }
    pub fn patch() -> usize {
        14
    }
}

impl QwenVisionConfig {
    /// Parses a `vision_config` object for `version`.
    pub fn from_value(value: &Value, version: VisionVersion) -> Result<Self, String> {
        let mut cfg: Self = serde_json::from_value(value.clone()).map_err(|e| format!("vision_config: {e}"))?;
        cfg.version = version;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The ViT width.
    pub fn width(&self) -> usize {
        match self.version {
            VisionVersion::Qwen2 => self.embed_dim.unwrap_or(1280),
            VisionVersion::Qwen25 => self.hidden_size,
        }
    }

    /// The merger's output width (= the language model's width).
    pub fn out_dim(&self) -> usize {
        match self.version {
            VisionVersion::Qwen2 => self.hidden_size,
            VisionVersion::Qwen25 => self.out_hidden_size.unwrap_or(3584),
        }
    }

    pub fn spatial_merge_size(&self) -> usize {
        self.spatial_merge_size
    }

    pub fn heads(&self) -> usize {
        self.num_heads
    }

    pub fn head_dim(&self) -> usize {
        self.width() / self.num_heads.max(1)
    }

    /// The block MLP's inner width.
    pub fn mlp_dim(&self) -> usize {
        match self.version {
            VisionVersion::Qwen2 => self.width() * self.mlp_setting(),
            VisionVersion::Qwen25 => self.mlp_setting(),
        }
    }

    pub fn act_name(&self) -> &str {
        match (&self.hidden_act, self.version) {
            (Some(a), _) => a,
            (None, VisionVersion::Qwen2) => "quick_gelu",
            (None, VisionVersion::Qwen25) => "silu",
        }
    }

    /// Values per pixel row: `in_channels · temporal_patch_size · patch_size²` (1176).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches per merged token (`spatial_merge_size²`).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Qwen2.5-VL: the window's side in merged tokens (`window_size / merge / patch`, 4 on the
    /// Hub); `None` for Qwen2-VL.
    pub fn window_tokens(&self) -> Option<usize> {
        match self.version {
            VisionVersion::Qwen2 => None,
            VisionVersion::Qwen25 => {
                Some(self.window_size.unwrap_or(112) / self.spatial_merge_size.max(1) / self.patch_size.max(1))
            }
        }
    }

    /// Whether block `i` attends over each whole image (else within windows).
    pub fn full_attention(&self, i: usize) -> bool {
        match self.version {
            VisionVersion::Qwen2 => true,
            VisionVersion::Qwen25 => match &self.fullatt_block_indexes {
                Some(v) => v.contains(&i),
                None => [7, 15, 23, 31].contains(&i),
            },
        }
    }

    /// `rope_parameters.rope_theta`, else a top-level `rope_theta`, else 10000.
    pub fn rope_theta(&self) -> f64 {
        self.extra
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| self.extra.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0)
    }

    /// The keys that hold the width, the merger's output and the MLP's width in this version.
    pub(crate) fn size_keys(&self) -> [&'static str; 3] {
        match self.version {
            VisionVersion::Qwen2 => ["vision_config.embed_dim", "vision_config.hidden_size", "vision_config.mlp_ratio"],
            VisionVersion::Qwen25 => ["vision_config.hidden_size", "vision_config.out_hidden_size", "vision_config.intermediate_size"],
        }
    }

    /// What [`QwenVisionTower::new`] relies on; errors name the key (`vision_config.num_heads`).
    pub fn validate(&self) -> Result<(), String> {
        let [width_key, out_key, mlp_key] = self.size_keys();
        let w = self.width();
        for (key, value) in [
            ("vision_config.depth", self.depth),
            (width_key, w),
            (out_key, self.out_dim()),
            (mlp_key, self.mlp_setting()),
            ("vision_config.in_channels", self.in_channels),
            ("vision_config.patch_size", self.patch_size),
            ("vision_config.spatial_merge_size", self.spatial_merge_size),
            ("vision_config.temporal_patch_size", self.temporal_patch_size),
        ] {
            check::positive(key, value)?;
        }
        check::divides("vision_config.num_heads", self.num_heads, width_key, w)?;
        if self.head_dim() % 4 != 0 {
            return Err(format!(
                "`{width_key}` / `vision_config.num_heads` (the head size) must be a multiple of 4 (2D rotary embedding), found {}",
                self.head_dim()
            ));
        }
        if Activation::parse(self.act_name()).is_none() {
            return Err(format!(
                "`vision_config.hidden_act` must be one of quick_gelu, gelu, gelu_pytorch_tanh, silu, found {:?}",
                self.act_name()
            ));
        }
        if self.version == VisionVersion::Qwen25 {
            let window = self.window_size.unwrap_or(112);
            let merged_patch = self.spatial_merge_size.saturating_mul(self.patch_size);
            if window < merged_patch {
                return Err(format!(
                    "`vision_config.window_size` must be at least `spatial_merge_size` · `patch_size` ({merged_patch}), found {window}"
                ));
            }
            if let Some(i) = self.fullatt_block_indexes.iter().flatten().find(|&&i| i >= self.depth) {
                return Err(format!("`vision_config.fullatt_block_indexes` must lie in 0..{} (`vision_config.depth`), found {i}", self.depth));
            }
        }
        let thetas = [
            ("rope_parameters.rope_theta", self.extra.get("rope_parameters").and_then(|r| r.get("rope_theta"))),
            ("rope_theta", self.extra.get("rope_theta")),
        ];
        for (key, theta) in thetas {
            if let Some(theta) = theta {
                let key = format!("vision_config.{key}");
                check::positive_number(&key, theta.as_f64().ok_or_else(|| format!("`{key}` must be a number, found {theta}"))?)?;
            }
        }
        let rope_type = self.extra.get("rope_parameters").and_then(|r| r.get("rope_type")).and_then(Value::as_str);
        if let Some(t) = rope_type.filter(|t| *t != "axial") {
            return Err(format!("`vision_config.rope_parameters.rope_type` must be \"axial\", found {t:?}"));
        }
        Ok(())
    }

    /// Parameters of the tower and its merger ([`QwenVisionTower::new`]).
    pub fn parameter_count(&self) -> Count {
        let c = Count::of;
        let (e, f) = (c(self.width()), self.mlp_count());
        let norm = match self.version {
            VisionVersion::Qwen2 => c(2) * e,
            VisionVersion::Qwen25 => e,
        };
        let mlp = match self.version {
            VisionVersion::Qwen2 => linear_count(e, f, true) + linear_count(f, e, true),
            VisionVersion::Qwen25 => c(2) * linear_count(e, f, true) + linear_count(f, e, true),
        };
        let block = c(2) * norm + linear_count(e, c(3) * e, true) + linear_count(e, e, true) + mlp;
        let patch = c(self.patch_size);
        let patch_embed = e * c(self.in_channels) * c(self.temporal_patch_size) * patch * patch;
        let wide = e * c(self.spatial_merge_size) * c(self.spatial_merge_size);
        let merger = norm + linear_count(wide, wide, true) + linear_count(wide, c(self.out_dim()), true);
        patch_embed + c(self.depth) * block + merger
    }

    /// The configured MLP size: Qwen2-VL's `mlp_ratio`, Qwen2.5-VL's `intermediate_size`.
    fn mlp_setting(&self) -> usize {
        match self.version {
            VisionVersion::Qwen2 => self.mlp_ratio.unwrap_or(4),
            VisionVersion::Qwen25 => self.intermediate_size.unwrap_or(3420),
        }
    }

    /// [`Self::mlp_dim`] with checked arithmetic (Qwen2-VL's is a product).
    fn mlp_count(&self) -> Count {
        match self.version {
            VisionVersion::Qwen2 => Count::of(self.width()) * Count::of(self.mlp_setting()),
            VisionVersion::Qwen25 => Count::of(self.mlp_setting()),
        }
    }
}

/// `visual.patch_embed.proj`: the Conv3d weight `[E, C, T, P, P]`, no bias.
#[derive(Module, Debug)]
pub struct PatchProj<B: Backend> {
    pub weight: Param<Tensor<B, 5>>,
}

#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: PatchProj<B>,
}

/// LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL), both eps 1e-6.
#[derive(Module, Debug)]
pub enum VisionNorm<B: Backend> {
    Layer(LayerNorm<B>),
    Rms(RmsNorm<B>),
}

impl<B: Backend> VisionNorm<B> {
    fn new(b: &mut Builder<'_, B>, name: &str, dim: usize, version: VisionVersion) -> Self {
        match version {
            VisionVersion::Qwen2 => Self::Layer(LayerNorm::new(b, name, dim, 1e-6)),
            VisionVersion::Qwen25 => Self::Rms(RmsNorm::new(b, name, dim, 1e-6)),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Layer(n) => n.forward(x),
            Self::Rms(n) => n.forward(x),
        }
    }
}

/// `attn.qkv` (`[3E, E]`, bias) and `attn.proj`.
#[derive(Module, Debug)]
pub struct VisionAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub num_heads: usize,
}

/// Qwen2-VL's `mlp.fc1 → act → mlp.fc2`.
#[derive(Module, Debug)]
pub struct FcMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

/// Qwen2.5-VL's `down_proj(act(gate_proj x) · up_proj x)`, all three with biases.
#[derive(Module, Debug)]
pub struct GatedMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

#[derive(Module, Debug)]
pub enum VisionMlp<B: Backend> {
    Fc(FcMlp<B>),
    Gated(GatedMlp<B>),
}

impl<B: Backend> VisionMlp<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Fc(m) => m.fc2.forward(m.act.apply(m.fc1.forward(x))),
            Self::Gated(m) => {
                let (gate, up) = (m.gate_proj.forward(x.clone()), m.up_proj.forward(x));
                let gated = match m.act {
                    Activation::Silu => match vsft_kernels::swiglu(gate, up) {
                        Ok(y) => y,
                        Err((gate, up)) => activation::silu(gate) * up,
                    },
                    act => act.apply(gate) * up,
                };
                m.down_proj.forward(gated)
            }
        }
    }
}

/// `visual.blocks.N`.
#[derive(Module, Debug)]
pub struct VisionBlock<B: Backend> {
    pub norm1: VisionNorm<B>,
    pub norm2: VisionNorm<B>,
    pub attn: VisionAttention<B>,
    pub mlp: VisionMlp<B>,
}

/// `visual.merger`: `ln_q`, then `mlp.0` → GELU → `mlp.2` (`mlp` is a Vec of three slots, the
/// GELU's empty, so that the parameter names are `mlp.0.*` and `mlp.2.*` as in the checkpoint).
#[derive(Module, Debug)]
pub struct PatchMerger<B: Backend> {
    pub ln_q: VisionNorm<B>,
    pub mlp: Vec<Option<Linear<B>>>,
}

impl<B: Backend> PatchMerger<B> {
    pub fn fc1(&self) -> &Linear<B> {
        self.mlp[0].as_ref().expect("merger.mlp.0")
    }
    pub fn fc2(&self) -> &Linear<B> {
        self.mlp[2].as_ref().expect("merger.mlp.2")
    }
}

/// What the forward needs of the config (kept on the module, not a parameter).
#[derive(Debug, Clone)]
pub struct VisionGeometry {
    pub version: VisionVersion,
    pub width: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub patch_dim: usize,
    pub merge: usize,
    pub window_tokens: Option<usize>,
    /// Per block: attends over each whole image (else within windows).
    pub full_attention: Vec<bool>,
    pub rope_theta: f64,
}

/// `visual` of Qwen2-VL / Qwen2.5-VL.
#[derive(Module, Debug)]
pub struct QwenVisionTower<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub blocks: Vec<VisionBlock<B>>,
    pub merger: PatchMerger<B>,
    #[module(skip)]
    pub geometry: VisionGeometry,
}

/// Host-side metadata of one batch of images, shared by every step of a forward pass.
#[derive(Debug, Clone)]
pub struct VisionContext<B: Backend> {
    /// The images' `(t, h, w)` patch grids.
    pub grids: Vec<(usize, usize, usize)>,
    /// Σ t·h·w.
    pub n_patches: usize,
    /// Merged tokens per image (`t·h·w / merge²`), the features' rows.
    pub tokens_per_image: Vec<usize>,
    /// Rotary tables `[n_patches, head_dim]` (f32) in the order the blocks see the patches
    /// (Qwen2.5-VL: window order).
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
    /// The same tables on the host, for the fused attention kernel, which rotates each row
    /// as it packs q and k.
    host_rope: (Arc<Vec<f32>>, Arc<Vec<f32>>),
    /// Built on first use, where the kernel does not run (other backends, other dtypes).
    rope_tensors: OnceCell<RopeTensors<B>>,
    /// Attention segment lengths of full-attention blocks (each frame of each image).
    pub full_segments: Vec<usize>,
    /// Attention segment lengths of windowed blocks (Qwen2.5-VL; = `full_segments` for Qwen2-VL).
    pub window_segments: Vec<usize>,
    /// Qwen2.5-VL: transformers' `window_index` (merged-token order of the blocks); `None` for
    /// Qwen2-VL (processor order throughout).
    pub window_index: Option<Vec<usize>>,
    /// Patch-level permutation into window order, and its inverse.
    patch_perm: Option<Tensor<B, 1, Int>>,
    patch_inverse: Option<Tensor<B, 1, Int>>,
    /// Merged-token inverse of `window_index` (`argsort`).
    token_inverse: Option<Tensor<B, 1, Int>>,
}

/// The rotary tables for Burn's ops: repeated for every head, `[n_patches·heads, head_dim]`,
/// and the signed half-swap `rotate_half` as a `[head_dim, head_dim]` matrix. Rotating q and k
/// is then two products over contiguous rows and one small GEMM (slicing and concatenating
/// halves of strided rows cost more than the attention's own GEMMs).
#[derive(Debug, Clone)]
struct RopeTensors<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    rotate_half: Tensor<B, 2>,
}

impl<B: Backend> VisionContext<B> {
    pub fn n_tokens(&self) -> usize {
        self.tokens_per_image.iter().sum()
    }

    /// [`RopeTensors`] for `heads` heads, from the host tables.
    fn rope_tensors(&self, heads: usize, device: &B::Device) -> &RopeTensors<B> {
        self.rope_tensors.get_or_init(|| {
            let hd = self.host_rope.0.len() / self.n_patches.max(1);
            let per_head = |v: &[f32]| {
                let rows: Vec<f32> = v.chunks(hd).flat_map(|row| std::iter::repeat_n(row, heads).flatten().copied()).collect();
                Tensor::<B, 2>::from_data(TensorData::new(rows, [self.n_patches * heads, hd]), (device, DType::F32))
            };
            let half = hd / 2;
            let mut swap = vec![0f32; hd * hd];
            for i in 0..half {
                swap[(i + half) * hd + i] = -1.0; // out[i] = -x[i + half]
                swap[i * hd + i + half] = 1.0; // out[i + half] = x[i]
            }
            RopeTensors { cos: per_head(&self.host_rope.0), sin: per_head(&self.host_rope.1), rotate_half: Tensor::from_data(TensorData::new(swap, [hd, hd]), (device, DType::F32)) }
        })
    }
}

/// `inv_freq` of the 2D rope, the torch way: `1 / θ^(arange(0, d, 2) / d)` with `d = head_dim/2`,
/// f32 power and f32 division.
pub fn vision_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    let d = head_dim / 2;
    (0..d).step_by(2).map(|i| 1.0f32 / (theta as f32).powf(i as f32 / d as f32)).collect()
}

impl<B: Backend> QwenVisionTower<B> {
    /// Builds `visual.*` under `b` (scoped here at `visual`). `cfg` must pass
    /// [`QwenVisionConfig::validate`] (panics otherwise).
    pub fn new(b: &mut Builder<'_, B>, cfg: &QwenVisionConfig) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("QwenVisionTower::new on an invalid config: {e}");
        }
        let mut b = b.scope("visual");
        let (e, version) = (cfg.width(), cfg.version);
        let act = Activation::parse(cfg.act_name()).expect("validated config");
        let patch_embed = PatchEmbed {
            proj: PatchProj {
                weight: b.scope("patch_embed").scope("proj").param(
                    [e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size],
                    "weight",
                    Init::Normal(0.02),
                ),
            },
        };
        let blocks = {
            let mut bs = b.scope("blocks");
            (0..cfg.depth)
                .map(|i| {
                    let mut l = bs.scope(&i.to_string());
                    let norm1 = VisionNorm::new(&mut l, "norm1", e, version);
                    let norm2 = VisionNorm::new(&mut l, "norm2", e, version);
                    let attn = {
                        let mut a = l.scope("attn");
                        VisionAttention {
                            qkv: Linear::new(&mut a, "qkv", e, 3 * e, true),
                            proj: Linear::new(&mut a, "proj", e, e, true),
                            num_heads: cfg.num_heads,
                        }
                    };
                    let mut m = l.scope("mlp");
                    let f = cfg.mlp_dim();
                    let mlp = match version {
                        VisionVersion::Qwen2 => VisionMlp::Fc(FcMlp {
                            fc1: Linear::new(&mut m, "fc1", e, f, true),
                            fc2: Linear::new(&mut m, "fc2", f, e, true),
                            act,
                        }),
                        VisionVersion::Qwen25 => VisionMlp::Gated(GatedMlp {
                            gate_proj: Linear::new(&mut m, "gate_proj", e, f, true),
                            up_proj: Linear::new(&mut m, "up_proj", e, f, true),
                            down_proj: Linear::new(&mut m, "down_proj", f, e, true),
                            act,
                        }),
                    };
                    VisionBlock { norm1, norm2, attn, mlp }
                })
                .collect()
        };
        let merger = {
            let mut s = b.scope("merger");
            let wide = e * cfg.merge_unit();
            let ln_q = VisionNorm::new(&mut s, "ln_q", e, version);
            let mut m = s.scope("mlp");
            PatchMerger {
                ln_q,
                mlp: vec![Some(Linear::new(&mut m, "0", wide, wide, true)), None, Some(Linear::new(&mut m, "2", wide, cfg.out_dim(), true))],
            }
        };
        let geometry = VisionGeometry {
            version,
            width: e,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
            patch_dim: cfg.patch_dim(),
            merge: cfg.spatial_merge_size,
            window_tokens: cfg.window_tokens(),
            full_attention: (0..cfg.depth).map(|i| cfg.full_attention(i)).collect(),
            rope_theta: cfg.rope_theta(),
        };
        Self { patch_embed, blocks, merger, geometry }
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Every linear layer with its PEFT module name under `prefix` (`model.visual`): the blocks'
    /// `attn.qkv`, `attn.proj`, `mlp.{fc1,fc2}` or `mlp.{gate_proj,up_proj,down_proj}`, and the
    /// merger's `merger.mlp.0`, `merger.mlp.2`.
    pub fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            out.push((format!("{prefix}.blocks.{i}.attn.qkv"), &mut block.attn.qkv));
            out.push((format!("{prefix}.blocks.{i}.attn.proj"), &mut block.attn.proj));
            match &mut block.mlp {
                VisionMlp::Fc(m) => {
                    out.push((format!("{prefix}.blocks.{i}.mlp.fc1"), &mut m.fc1));
                    out.push((format!("{prefix}.blocks.{i}.mlp.fc2"), &mut m.fc2));
                }
                VisionMlp::Gated(m) => {
                    out.push((format!("{prefix}.blocks.{i}.mlp.gate_proj"), &mut m.gate_proj));
                    out.push((format!("{prefix}.blocks.{i}.mlp.up_proj"), &mut m.up_proj));
                    out.push((format!("{prefix}.blocks.{i}.mlp.down_proj"), &mut m.down_proj));
                }
            }
        }
        for (j, slot) in self.merger.mlp.iter_mut().enumerate() {
            if let Some(lin) = slot {
                out.push((format!("{prefix}.merger.mlp.{j}"), lin));
            }
        }
        out
    }

    /// `[patches, patch_dim]` → `[patches, width]`: the Conv3d as one matmul with the weight
    /// reshaped to `[width, patch_dim]` (no bias), in the weight's dtype. The caller guarantees
    /// `patch_dim` columns ([`Self::stem`] checks).
    pub fn patch_embed(&self, pixels: Tensor<B, 2>) -> Tensor<B, 2> {
        let w = self.patch_embed.proj.weight.val();
        let e = w.dims()[0];
        matmul_weight_t(pixels, w.reshape([e, self.geometry.patch_dim]))
    }

    /// The host-side metadata of `grids` (`(t, h, w)` per image, in patches, as
    /// `image_grid_thw`): rotary tables, attention segments, window permutation.
    pub fn context(&self, grids: &[(usize, usize, usize)], device: &B::Device) -> Result<VisionContext<B>, ModelError> {
        let g = &self.geometry;
        let m = g.merge;
        let mu = m * m;
        let mut n_patches = 0usize;
        for (i, &(t, h, w)) in grids.iter().enumerate() {
            if t == 0 || h == 0 || w == 0 {
                return Err(ModelError::Input(format!("image {i}: empty grid (t, h, w) = ({t}, {h}, {w})")));
            }
            if h % m != 0 || w % m != 0 {
                return Err(ModelError::Input(format!(
                    "image {i}: grid (t, h, w) = ({t}, {h}, {w}) is not divisible by spatial_merge_size {m}"
                )));
            }
            n_patches = t
                .checked_mul(h)
                .and_then(|x| x.checked_mul(w))
                .and_then(|x| x.checked_add(n_patches))
                .ok_or_else(|| ModelError::Input(format!("image {i}: grid ({t}, {h}, {w}) is too large")))?;
        }
        // Patch positions (row, col) in the processor's merge-block-major order, each frame.
        let mut pos: Vec<(u32, u32)> = Vec::with_capacity(n_patches);
        let mut full_segments = Vec::new();
        let mut tokens_per_image = Vec::with_capacity(grids.len());
        for &(t, h, w) in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                pos.push(((bh * m + ih) as u32, (bw * m + iw) as u32));
                            }
                        }
                    }
                }
                full_segments.push(h * w);
            }
            tokens_per_image.push(t * h * w / mu);
        }
        // Qwen2.5-VL windows: transformers' `get_vision_window_index`.
        let (window_index, window_segments) = match g.window_tokens {
            None => (None, full_segments.clone()),
            Some(ws) => {
                let mut index = Vec::with_capacity(n_patches / mu);
                let mut segments = Vec::new();
                let mut offset = 0;
                for &(t, h, w) in grids {
                    let (lh, lw) = (h / m, w / m);
                    for frame in 0..t {
                        let base = offset + frame * lh * lw;
                        for wh in 0..lh.div_ceil(ws) {
                            for ww in 0..lw.div_ceil(ws) {
                                let (r0, r1) = (wh * ws, ((wh + 1) * ws).min(lh));
                                let (c0, c1) = (ww * ws, ((ww + 1) * ws).min(lw));
                                for r in r0..r1 {
                                    for c in c0..c1 {
                                        index.push(base + r * lw + c);
                                    }
                                }
                                segments.push((r1 - r0) * (c1 - c0) * mu);
                            }
                        }
                    }
                    offset += t * lh * lw;
                }
                (Some(index), segments)
            }
        };
        let patch_order: Option<Vec<usize>> =
            window_index.as_ref().map(|wi| wi.iter().flat_map(|&tok| (0..mu).map(move |j| tok * mu + j)).collect());
        // Rotary tables: angles `[h·inv, w·inv, h·inv, w·inv]` (f32 products), cos/sin in f32.
        let inv = vision_inv_freq(g.head_dim, g.rope_theta);
        let hd = g.head_dim;
        let mut cos = Vec::with_capacity(n_patches * hd);
        let mut sin = Vec::with_capacity(n_patches * hd);
        let mut push_row = |(r, c): (u32, u32)| {
            let angles: Vec<f32> = inv.iter().map(|f| r as f32 * f).chain(inv.iter().map(|f| c as f32 * f)).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        };
        match &patch_order {
            Some(order) => order.iter().for_each(|&p| push_row(pos[p])),
            None => pos.iter().for_each(|&p| push_row(p)),
        }
        let table = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [n_patches, hd]), (device, DType::F32));
        let index_tensor = |v: &[usize]| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v.iter().map(|&i| i as i64).collect::<Vec<_>>(), [n]), device)
        };
        let inverse = |v: &[usize]| {
            let mut inv = vec![0usize; v.len()];
            v.iter().enumerate().for_each(|(i, &p)| inv[p] = i);
            inv
        };
        Ok(VisionContext {
            grids: grids.to_vec(),
            n_patches,
            tokens_per_image,
            cos: table(cos.clone()),
            sin: table(sin.clone()),
            host_rope: (Arc::new(cos), Arc::new(sin)),
            rope_tensors: OnceCell::new(),
            full_segments,
            window_segments,
            patch_perm: patch_order.as_deref().map(index_tensor),
            patch_inverse: patch_order.as_deref().map(|o| index_tensor(&inverse(o))),
            token_inverse: window_index.as_deref().map(|wi| index_tensor(&inverse(wi))),
            window_index,
        })
    }

    /// Patch embedding, then (Qwen2.5-VL) the window permutation: the first block's input.
    /// Errors when `pixels` is not `[Σ t·h·w, patch_dim]` for `ctx`'s grids.
    pub fn stem(&self, pixels: Tensor<B, 2>, ctx: &VisionContext<B>) -> Result<Tensor<B, 2>, ModelError> {
        let [rows, cols] = pixels.dims();
        if cols != self.geometry.patch_dim {
            return Err(ModelError::Input(format!(
                "pixel_values has {cols} values per row; this vision tower takes {} (channels · temporal_patch_size · patch_size²)",
                self.geometry.patch_dim
            )));
        }
        if rows != ctx.n_patches {
            let mut start = 0;
            let mut culprit = String::new();
            for (i, &(t, h, w)) in ctx.grids.iter().enumerate() {
                let end = start + t * h * w;
                if end > rows {
                    culprit = format!(": image {i} (grid ({t}, {h}, {w})) needs rows {start}..{end}");
                    break;
                }
                start = end;
            }
            if culprit.is_empty() {
                culprit = format!(": {} rows are left over after the last image", rows - ctx.n_patches);
            }
            return Err(ModelError::Input(format!(
                "pixel_values has {rows} rows but image_grid_thw gives Σ t·h·w = {}{culprit}",
                ctx.n_patches
            )));
        }
        let x = self.patch_embed(pixels);
        Ok(match &ctx.patch_perm {
            Some(perm) => x.select(0, perm.clone()),
            None => x,
        })
    }

    /// Block `i`, attending within each image (full-attention blocks) or each window.
    pub fn layer(&self, i: usize, x: Tensor<B, 2>, ctx: &VisionContext<B>) -> Tensor<B, 2> {
        let segments = if self.geometry.full_attention[i] { &ctx.full_segments } else { &ctx.window_segments };
        self.blocks[i].forward(x, ctx, segments)
    }

    /// The PatchMerger, then (Qwen2.5-VL) the merged tokens back in the processor's order:
    /// `[Σ tokens, out_dim]`, row-major over each image's merged grid, images in order.
    pub fn merge(&self, x: Tensor<B, 2>, ctx: &VisionContext<B>) -> Tensor<B, 2> {
        let [n, e] = x.dims();
        let mu = self.geometry.merge * self.geometry.merge;
        let h = self.merger.ln_q.forward(x).reshape([n / mu, e * mu]);
        let h = self.merger.fc2().forward(crate::nn::gelu(self.merger.fc1().forward(h)));
        match &ctx.token_inverse {
            Some(inv) => h.select(0, inv.clone()),
            None => h,
        }
    }

    /// Block outputs `[patches, width]` back in the processor's patch order (transformers'
    /// `last_hidden_state` is in window order for Qwen2.5-VL; this undoes it).
    pub fn unpermute_patches(&self, x: Tensor<B, 2>, ctx: &VisionContext<B>) -> Tensor<B, 2> {
        match &ctx.patch_inverse {
            Some(inv) => x.select(0, inv.clone()),
            None => x,
        }
    }

    /// The whole tower: `merge(layers(stem(pixels)))`, `[Σ tokens, out_dim]`.
    pub fn features(&self, pixels: Tensor<B, 2>, grids: &[(usize, usize, usize)]) -> Result<Tensor<B, 2>, ModelError> {
        let ctx = self.context(grids, &pixels.device())?;
        let mut x = self.stem(pixels, &ctx)?;
        for i in 0..self.depth() {
            x = self.layer(i, x, &ctx);
        }
        Ok(self.merge(x, &ctx))
    }
}

impl<B: Backend> VisionBlock<B> {
    pub fn forward(&self, x: Tensor<B, 2>, ctx: &VisionContext<B>, segments: &[usize]) -> Tensor<B, 2> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), ctx, segments);
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

/// `q·cos + rotate_half(q)·sin` over `[n, heads·hd]`, in f32 (`apply_rotary_pos_emb_vision`),
/// with the tables repeated per head.
fn rotate<B: Backend>(x: Tensor<B, 2>, r: &RopeTensors<B>, heads: usize) -> Tensor<B, 2> {
    let act = x.dtype();
    let [n, e] = x.dims();
    let x = in_dtype(x, DType::F32).reshape([n * heads, e / heads]);
    let y = x.clone() * r.cos.clone() + x.matmul(r.rotate_half.clone()) * r.sin.clone();
    in_dtype(y.reshape([n, e]), act)
}

impl<B: Backend> VisionAttention<B> {
    /// Bidirectional attention inside each segment (consecutive rows, lengths summing to the
    /// rows of `x`); consecutive segments of one length run as one batch.
    pub fn forward(&self, x: Tensor<B, 2>, ctx: &VisionContext<B>, segments: &[usize]) -> Tensor<B, 2> {
        let [n, e] = x.dims();
        let heads = self.num_heads;
        let hd = e / heads;
        let qkv = self.qkv.forward(x);
        let (q, k) = (qkv.clone().narrow(1, 0, e), qkv.clone().narrow(1, e, e));
        // The fused kernel rotates q and k itself (`attend` hands it each run's table rows);
        // elsewhere Burn's ops rotate them here.
        let kernel = vsft_kernels::supported(&[&qkv]);
        let (q, k) = if kernel {
            (q, k)
        } else {
            let r = ctx.rope_tensors(heads, &qkv.device());
            (rotate(q, r, heads), rotate(k, r, heads))
        };
        let v = qkv.narrow(1, 2 * e, e);
        // Runs of equal-length consecutive segments: (first row, length, count).
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        let mut start = 0;
        for &len in segments.iter().filter(|&&l| l > 0) {
            match runs.last_mut() {
                Some((_, l, c)) if *l == len => *c += 1,
                _ => runs.push((start, len, 1)),
            }
            start += len;
        }
        debug_assert_eq!(start, n, "attention segments cover every row");
        let whole = runs.len() == 1;
        let outs: Vec<Tensor<B, 2>> = runs
            .into_iter()
            .map(|(s, len, count)| {
                let part = |t: &Tensor<B, 2>| {
                    let t = if whole { t.clone() } else { t.clone().narrow(0, s, len * count) };
                    t.reshape([count, len, e])
                };
                let (cos, sin) = &ctx.host_rope;
                let rope = match (kernel, whole) {
                    (false, _) => None,
                    (true, true) => Some((cos.clone(), sin.clone())),
                    (true, false) => {
                        let rows = |v: &[f32]| Arc::new(v[s * hd..(s + len * count) * hd].to_vec());
                        Some((rows(cos), rows(sin)))
                    }
                };
                attend(part(&q), part(&k), part(&v), heads, hd, rope).reshape([count * len, e])
            })
            .collect();
        let ctx_rows = if outs.len() == 1 { outs.into_iter().next().expect("one run") } else { Tensor::cat(outs, 0) };
        self.proj.forward(ctx_rows)
    }
}

/// `softmax(q·kᵀ/√hd)·v` per head over `[batch, seq, heads·hd]`, no mask: the fused CPU kernel
/// (rotating q and k by `rope`, `[batch·seq, hd]` tables), Burn's attention op elsewhere (q and
/// k rotated already: `rope` is given only where the kernel runs, the same `supported` check).
fn attend<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>, heads: usize, hd: usize, rope: Option<(Arc<Vec<f32>>, Arc<Vec<f32>>)>) -> Tensor<B, 3> {
    let spec = vsft_kernels::AttentionSpec { num_heads: heads, num_kv_heads: heads, head_dim: hd, causal: false, rope, key_padding: None };
    match vsft_kernels::attention(q, k, v, &spec) {
        Ok(ctx) => ctx,
        Err((q, k, v)) => {
            let [b, t, e] = q.dims();
            let split = |y: Tensor<B, 3>| y.reshape([b, t, heads, hd]).swap_dims(1, 2);
            burn::tensor::module::attention(split(q), split(k), split(v), None, None, Default::default())
                .swap_dims(1, 2)
                .reshape([b, t, e])
        }
    }
}

/// The `visual.*` tensors a tower of `cfg` reads, with their shapes (for checks and tools).
pub fn expected_tensors(cfg: &QwenVisionConfig) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    let (e, f, wide) = (cfg.width(), cfg.mlp_dim(), cfg.width() * cfg.merge_unit());
    let rms = cfg.version == VisionVersion::Qwen25;
    out.insert(
        "visual.patch_embed.proj.weight".to_string(),
        vec![e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size],
    );
    let mut linear = |name: String, d_in: usize, d_out: usize| {
        out.insert(format!("{name}.weight"), vec![d_out, d_in]);
        out.insert(format!("{name}.bias"), vec![d_out]);
    };
    for i in 0..cfg.depth {
        let p = format!("visual.blocks.{i}");
        linear(format!("{p}.attn.qkv"), e, 3 * e);
        linear(format!("{p}.attn.proj"), e, e);
        if rms {
            linear(format!("{p}.mlp.gate_proj"), e, f);
            linear(format!("{p}.mlp.up_proj"), e, f);
            linear(format!("{p}.mlp.down_proj"), f, e);
        } else {
            linear(format!("{p}.mlp.fc1"), e, f);
            linear(format!("{p}.mlp.fc2"), f, e);
        }
    }
    linear("visual.merger.mlp.0".into(), wide, wide);
    linear("visual.merger.mlp.2".into(), wide, cfg.out_dim());
    let norms: Vec<String> = (0..cfg.depth)
        .flat_map(|i| [format!("visual.blocks.{i}.norm1"), format!("visual.blocks.{i}.norm2")])
        .chain(["visual.merger.ln_q".to_string()])
        .collect();
    for n in norms {
        out.insert(format!("{n}.weight"), vec![e]);
        if !rms {
            out.insert(format!("{n}.bias"), vec![e]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn config_defaults_depend_on_the_version() {
        let v: Value = serde_json::json!({"depth": 2, "hidden_size": 32, "num_heads": 2, "in_chans": 3});
        let q2 = QwenVisionConfig::from_value(&v, VisionVersion::Qwen2).unwrap();
        assert_eq!((q2.width(), q2.out_dim(), q2.mlp_dim(), q2.act_name()), (1280, 32, 5120, "quick_gelu"));
        let q25 = QwenVisionConfig::from_value(&v, VisionVersion::Qwen25).unwrap();
        assert_eq!((q25.width(), q25.out_dim(), q25.mlp_dim(), q25.act_name()), (32, 3584, 3420, "silu"));
        assert_eq!(q25.window_tokens(), Some(4));
        assert!(q25.full_attention(7) && !q25.full_attention(1));
        assert_eq!(q25.rope_theta(), 10000.0);
        // Absent version-dependent keys stay absent; unknown keys survive.
        let back = serde_json::to_value(&q25).unwrap();
        assert!(back.get("out_hidden_size").is_none());
        assert_eq!(back["in_chans"], 3);
        assert_eq!(back["version"], "qwen25");
        let again: QwenVisionConfig = serde_json::from_value(back).unwrap();
        assert_eq!(again, q25);
    }

    #[test]
    fn windows_follow_transformers() {
        // 34×46 patches (17×23 merged tokens) with 4×4-token windows: 5×6 windows, the last
        // column 3 tokens wide and the last row 1 token high (model-families §2.6).
        let cfg: QwenVisionConfig = QwenVisionConfig::from_value(
            &serde_json::json!({"depth": 1, "hidden_size": 16, "num_heads": 1, "out_hidden_size": 8, "intermediate_size": 8}),
            VisionVersion::Qwen25,
        )
        .unwrap();
        let mut init = crate::weights::RandomInit::new(0);
        let tower = QwenVisionTower::<Flex>::new(&mut Builder::new(&mut init, &Default::default()), &cfg);
        let ctx = tower.context(&[(1, 34, 46)], &Default::default()).unwrap();
        assert_eq!(ctx.window_segments.len(), 30);
        let mut sizes = ctx.window_segments.clone();
        sizes.sort();
        sizes.dedup();
        assert_eq!(sizes, vec![12, 16, 48, 64]);
        assert_eq!(ctx.full_segments, vec![34 * 46]);
        let wi = ctx.window_index.as_ref().unwrap();
        assert_eq!(&wi[..5], &[0, 1, 2, 3, 23]);
        assert!(tower.context(&[(1, 34, 45)], &Default::default()).is_err());
        let pixels = Tensor::<Flex, 2>::zeros([10, cfg.patch_dim()], &Default::default());
        assert!(tower.features(pixels, &[(1, 34, 46)]).is_err());
    }
}
