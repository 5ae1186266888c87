//! LLaVA-NeXT (LLaVA-1.6, `llava_next`): LLaVA's parts (CLIP tower, MLP projector, Llama or
//! Mistral decoder) with any-resolution images. The processor cuts each image into a squashed
//! base tile plus a grid of tiles of its best-fitting resolution; the model projects every tile,
//! lays the grid's features out as one map, crops the padding the processor added (`unpad`),
//! closes every row with the learned `image_newline`, and puts the base tile's features first
//! (transformers' `pack_image_features`).

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vsft_data::family::llava_next::{py_int_round7, select_best_resolution};

use crate::clip::ClipVisionTower;
use crate::config::{from_json, read_json_file, Count, LlavaConfig, SelectStrategy};
use crate::error::ModelError;
use crate::family::{Family, ImageInfo, ImageInputs, VisionLanguageModel};
use crate::llama::LlamaForCausalLM;
use crate::llava::{clip_features, clip_stack, llava_linears, open_checkpoint, LlavaParts, MultiModalProjector};
use crate::nn::Linear;
use crate::weights::{Builder, Init, RandomInit, StoredDtype, TensorProvider};

/// A LLaVA-NeXT `config.json` (transformers `LlavaNextConfig`): LLaVA's keys plus the
/// resolutions an image may be tiled at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaNextConfig {
    /// `(height, width)` canvases, in the order `select_best_resolution` tries them.
    #[serde(default = "default_pinpoints")]
    pub image_grid_pinpoints: Vec<[usize; 2]>,
    #[serde(flatten)]
    pub base: LlavaConfig,
}

/// Tiles a pinpoint may have along a side: the Hub's checkpoints use at most 6; the bound keeps
/// the tile grids (and the image tokens they become) far from overflowing.
const MAX_TILES_PER_SIDE: usize = 64;

/// `LlavaNextConfig`'s default pinpoints (those of the llava-hf v1.6 checkpoints).
fn default_pinpoints() -> Vec<[usize; 2]> {
    vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
}

impl LlavaNextConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_value(read_json_file(path)?).map_err(|message| ModelError::Config { path: path.to_path_buf(), message })
    }

    /// Parses and validates a `config.json` value.
    pub fn from_value(value: Value) -> Result<Self, String> {
        // LLaVA's keys are parsed on their own first: through `flatten` a bad value's error
        // would lose its key (`text_config.vocab_size`).
        from_json::<LlavaConfig>(value.clone())?;
        let cfg: Self = from_json(value)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.base.model_type != "llava_next" {
            return Err(format!("model_type {:?} is not \"llava_next\"", self.base.model_type));
        }
        self.base.validate_parts()?;
        if self.base.vision_feature_select_strategy != SelectStrategy::Default {
            // pack_image_features views each tile as an n×n grid: a CLS row does not fit it.
            return Err("vision_feature_select_strategy \"full\" cannot be packed into LLaVA-NeXT's tile grid; use \"default\"".into());
        }
        let tile = self.base.vision_config.image_size;
        if self.image_grid_pinpoints.is_empty() {
            return Err("image_grid_pinpoints is empty".into());
        }
        let fits = |side: usize| side > 0 && side % tile == 0 && side / tile <= MAX_TILES_PER_SIDE;
        if let Some(p) = self.image_grid_pinpoints.iter().find(|[h, w]| !fits(*h) || !fits(*w)) {
            return Err(format!(
                "`image_grid_pinpoints` entries must be positive multiples of `vision_config.image_size` ({tile}) of at most \
                 {MAX_TILES_PER_SIDE} tiles a side, found {p:?}"
            ));
        }
        Ok(())
    }

    /// Parameters of LLaVA's parts plus `image_newline`.
    pub fn parameter_count(&self) -> Count {
        self.base.parameter_count() + Count::of(self.base.text_config.hidden_size)
    }

    /// Tokens per side of one tile (`image_size / patch_size`).
    pub fn tile_side(&self) -> usize {
        self.base.vision_config.image_size / self.base.vision_config.patch_size
    }

    /// The `(1, rows, columns)` tile grid of an image of `original_hw`: its best resolution
    /// over the tile size (transformers' `get_anyres_image_grid_shape`).
    pub fn grid(&self, original_hw: (usize, usize)) -> (usize, usize, usize) {
        let pinpoints: Vec<(usize, usize)> = self.image_grid_pinpoints.iter().map(|&[h, w]| (h, w)).collect();
        let (h, w) = select_best_resolution(original_hw.0, original_hw.1, &pinpoints);
        let tile = self.base.vision_config.image_size;
        (1, h / tile, w / tile)
    }

    /// transformers' batch layout (`pixel_values [images, max tiles, 3, H, W]` with the tile axis
    /// zero-padded, `image_sizes [images, 2]`) → vsft's: padding tiles dropped, one
    /// [`ImageInfo`] per image. For parity checks and `vsft logits`.
    pub fn from_hf_inputs(&self, pixel_values: &[f32], shape: [usize; 5], image_sizes: &[(usize, usize)]) -> Result<(Vec<f32>, [usize; 4], Vec<ImageInfo>), ModelError> {
        let [n, max_tiles, c, h, w] = shape;
        if image_sizes.len() != n || pixel_values.len() != shape.iter().product::<usize>() {
            return Err(ModelError::Input(format!("pixel_values {shape:?} ({} values) and {} image_sizes do not fit", pixel_values.len(), image_sizes.len())));
        }
        let unit = c * h * w;
        let mut pixels = Vec::new();
        let mut infos = Vec::new();
        for (i, &hw) in image_sizes.iter().enumerate() {
            let grid = self.grid(hw);
            let units = 1 + grid.1 * grid.2;
            if units > max_tiles {
                return Err(ModelError::Input(format!("image {i} of size {hw:?} needs {units} tiles, pixel_values holds {max_tiles}")));
            }
            let start = i * max_tiles * unit;
            pixels.extend_from_slice(&pixel_values[start..start + units * unit]);
            infos.push(ImageInfo { original_hw: hw, units, grid });
        }
        let total = infos.iter().map(|i| i.units).sum();
        Ok((pixels, [total, c, h, w], infos))
    }
}

#[derive(Module, Debug)]
pub struct LlavaNextModel<B: Backend> {
    pub vision_tower: ClipVisionTower<B>,
    pub multi_modal_projector: MultiModalProjector<B>,
    pub language_model: LlamaForCausalLM<B>,
    /// `[text hidden]`: closes every row of an image's feature map.
    pub image_newline: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub config: LlavaNextConfig,
}

impl<B: Backend> LlavaNextModel<B> {
    pub fn build_with(cfg: &LlavaNextConfig, provider: &mut dyn TensorProvider, device: &B::Device, frozen_dtype: StoredDtype) -> Self {
        let mut b = Builder::<B>::new(provider, device).with_frozen_dtype(frozen_dtype);
        let LlavaParts { vision_tower, multi_modal_projector, language_model } = LlavaParts::build(&cfg.base, &mut b);
        let hidden = cfg.base.text_config.hidden_size;
        // LLaVA-NeXT initialises it as randn · 1/√hidden.
        let image_newline = b.param([hidden], "image_newline", Init::Normal(1.0 / (hidden as f64).sqrt()));
        Self { vision_tower, multi_modal_projector, language_model, image_newline, config: cfg.clone() }
    }

    pub fn random(cfg: &LlavaNextConfig, seed: u64, device: &B::Device) -> Self {
        Self::build_with(cfg, &mut RandomInit::new(seed), device, StoredDtype::F32)
    }

    /// Loads a LLaVA-NeXT directory in any of its three key layouts (Hub legacy, transformers
    /// 4.52–4.57, transformers 5).
    pub fn load_with(dir: &Path, device: &B::Device, frozen_dtype: StoredDtype) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let cfg = LlavaNextConfig::from_file(&config_path)?;
        crate::weights::refuse_unless_fits(&config_path, cfg.parameter_count(), frozen_dtype)?;
        let mut reader = open_checkpoint(dir, &cfg.base)?;
        let model = Self::build_with(&cfg, &mut reader, device, frozen_dtype);
        reader.finish()?;
        Ok(model)
    }

    /// For each image, the rows of `[tile features…; image_newline]` that `pack_image_features`
    /// emits, in order: the base tile, then the unpadded grid row by row, each row closed by the
    /// newline (index `newline`). `tile_tokens = n²` rows per tile.
    fn pack_index(&self, images: &ImageInputs, newline: usize) -> Result<Vec<i64>, ModelError> {
        let n = self.config.tile_side();
        let tile_tokens = n * n;
        let mut index = Vec::new();
        let mut unit = 0;
        for (i, img) in images.images.iter().enumerate() {
            let (_, gh, gw) = img.grid;
            let first = unit * tile_tokens;
            unit += img.units;
            if img.units == 1 {
                // One tile and no grid: its features, then one newline (transformers' else-branch).
                index.extend((first..first + tile_tokens).map(|r| r as i64));
                index.push(newline as i64);
                continue;
            }
            if img.units != 1 + gh * gw {
                return Err(ModelError::Input(format!("image {i}: {} tiles for a {gh}×{gw} grid plus the base tile", img.units)));
            }
            index.extend((first..first + tile_tokens).map(|r| r as i64));
            let (rows, cols) = unpadded_region(img.original_hw, (gh * n, gw * n));
            for r in rows {
                for c in cols.clone() {
                    let tile = 1 + (r / n) * gw + c / n;
                    index.push((first + tile * tile_tokens + (r % n) * n + c % n) as i64);
                }
                index.push(newline as i64);
            }
        }
        Ok(index)
    }
}

/// The rows and columns of a `(height, width)` feature map that hold the image rather than the
/// processor's padding, as transformers' `unpad_image` computes them (Python float arithmetic,
/// `int(round(x, 7))`, the same padding cut from both sides).
pub fn unpadded_region(original_hw: (usize, usize), current_hw: (usize, usize)) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let (oh, ow) = (original_hw.0 as f64, original_hw.1 as f64);
    let (ch, cw) = current_hw;
    let round7 = |x: f64| py_int_round7(x).max(0) as usize;
    if ow / oh > cw as f64 / ch as f64 {
        let new_h = round7(oh * (cw as f64 / ow));
        let pad = ch.saturating_sub(new_h) / 2;
        (pad..ch - pad, 0..cw)
    } else {
        let new_w = round7(ow * (ch as f64 / oh));
        let pad = cw.saturating_sub(new_w) / 2;
        (0..ch, pad..cw - pad)
    }
}

impl<B: Backend> VisionLanguageModel<B> for LlavaNextModel<B> {
    fn family(&self) -> Family {
        Family::LlavaNext
    }
    fn language_model(&self) -> &LlamaForCausalLM<B> {
        &self.language_model
    }
    fn language_model_mut(&mut self) -> &mut LlamaForCausalLM<B> {
        &mut self.language_model
    }
    fn image_token_id(&self) -> i64 {
        self.config.base.image_token_index
    }
    fn vision_states(&self, images: &ImageInputs) -> Result<Tensor<B, 3>, ModelError> {
        Ok(clip_features(&self.vision_tower, &self.config.base, images.pixels_4d(&self.device())?))
    }
    /// Projector over every tile, then one gather that packs: base tile, unpadded grid rows,
    /// a newline after each row. The gather's backward sums the newline's gradient over rows.
    fn project(&self, states: Tensor<B, 3>, images: &ImageInputs) -> Result<Tensor<B, 2>, ModelError> {
        let [units, tokens, _] = states.dims();
        let n = self.config.tile_side();
        if tokens != n * n {
            return Err(ModelError::Input(format!("the vision tower gave {tokens} tokens per tile, LLaVA-NeXT's grid needs {}", n * n)));
        }
        let f = self.multi_modal_projector.forward(states);
        let hidden = f.dims()[2];
        let newline = crate::nn::in_dtype(self.image_newline.val(), f.dtype()).reshape([1, hidden]);
        let table = Tensor::cat(vec![f.reshape([units * tokens, hidden]), newline], 0);
        let index = self.pack_index(images, units * tokens)?;
        let len = index.len();
        Ok(table.select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(index, [len]), &self.device())))
    }
    fn tower_stack(&self, _images: &ImageInputs) -> Option<crate::family::TowerStack<'_, B>> {
        clip_stack(&self.vision_tower, &self.config.base)
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        llava_linears(&mut self.language_model, &mut self.vision_tower)
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config serialises")
    }
}
