//! LLaVA-NeXT (`llava_next`, LLaVA-1.6) "anyres" preprocessing, equal to transformers
//! 5.24's `LlavaNextImageProcessorPil` + `LlavaNextProcessor`:
//!
//! 1. `select_best_resolution` over `image_grid_pinpoints` ((h, w) pairs, f64 arithmetic,
//!    truncation, first candidate wins ties);
//! 2. aspect-preserving resize to fit it (`get_patch_output_size`: ceil, evaluated in
//!    Python's f64 order), Pillow BICUBIC on 8-bit;
//! 3. black (0) padding to the best resolution *before* normalisation, the image at
//!    `((ph−nh)//2, (pw−nw)//2)`;
//! 4. square tiles of `crop_size.height`, row-major, after a base tile: the original
//!    squashed to `size` (shortest_edge², or height×width);
//! 5. per tile the CLIP steps (shortest-edge resize, centre crop: no-ops for the Hub
//!    settings), rescale and normalise.
//!
//! The `<image>` count per image is `LlavaNextProcessor._get_number_of_features` (with
//! `int(round(x, 7))`) minus one for the "default" feature strategy, for any tile / patch size.

use std::path::Path;

use crate::collator::ImageMeta;
use crate::error::{DataError, Result};
use crate::image_proc::{read_json, resize_bicubic_pil, ImageProcessor, ImageProcessorConfig, RgbImage};

/// `LlavaNextImageProcessor.image_grid_pinpoints`' class default, (height, width) pairs.
pub const DEFAULT_PINPOINTS: [(usize, usize); 5] = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

/// Largest pinpoint side accepted (a canvas is allocated at this size).
pub const MAX_PINPOINT_SIDE: usize = 16384;

/// `vision_feature_select_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureStrategy {
    /// Drop the CLS feature: one token less per image.
    Default,
    Full,
}

/// The settings of a LLaVA-NeXT processor (image processor + the processor's token rule).
#[derive(Debug, Clone, PartialEq)]
pub struct AnyResConfig {
    /// The CLIP part (size, crop, resample, rescale, normalisation).
    pub image: ImageProcessorConfig,
    /// (height, width) candidates.
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    /// The vision tower's patch size (`processor_config.json` `patch_size`).
    pub patch_size: usize,
    pub num_additional_image_tokens: usize,
    pub vision_feature_select_strategy: FeatureStrategy,
}

/// The anyres image processor.
#[derive(Debug, Clone)]
pub struct AnyResProcessor {
    pub config: AnyResConfig,
    /// Per-tile resize / crop and normalisation.
    pub clip: ImageProcessor,
    /// Side of the square tiles cut from the padded canvas (`crop_size.height`).
    pub tile: usize,
    /// (height, width) the original is squashed to for the base tile.
    pub base_hw: (usize, usize),
    /// (height, width) of every unit (tile) after the per-tile steps.
    pub unit_hw: (usize, usize),
}

/// Python's `int(round(x, 7))` for `x >= 0`: `round` rounds the exact binary value to 7
/// decimals (ties to even), `int` truncates. The result can only differ from `floor(x)` when
/// `x` lies within 5e-8 below an integer `k`; then it is `k` (a tie goes to `k`, whose 7th
/// decimal is even).
pub fn py_int_round7(x: f64) -> i64 {
    let k = x.ceil();
    if k - x <= 5e-8 {
        k as i64
    } else {
        x.floor() as i64
    }
}

/// transformers' `select_best_resolution((h, w), pinpoints)`.
pub fn select_best_resolution(h: usize, w: usize, pinpoints: &[(usize, usize)]) -> (usize, usize) {
    let (oh, ow) = (h as f64, w as f64);
    let mut best = pinpoints[0];
    let mut max_eff: i128 = 0;
    let mut min_waste: Option<i128> = None; // Python: float("inf")
    for &(ph, pw) in pinpoints {
        let scale = (pw as f64 / ow).min(ph as f64 / oh);
        let dw = (ow * scale) as i128;
        let dh = (oh * scale) as i128;
        let eff = (dw * dh).min(h as i128 * w as i128);
        let waste = (ph as i128 * pw as i128) - eff;
        if eff > max_eff || (eff == max_eff && min_waste.is_none_or(|m| waste < m)) {
            max_eff = eff;
            min_waste = Some(waste);
            best = (ph, pw);
        }
    }
    best
}

/// transformers' `get_patch_output_size`: the (height, width) an (h, w) image is resized to
/// inside a (th, tw) canvas.
pub fn patch_output_size(h: usize, w: usize, th: usize, tw: usize) -> (usize, usize) {
    let sw = tw as f64 / w as f64;
    let sh = th as f64 / h as f64;
    if sw < sh {
        (((h as f64 * sw).ceil() as usize).min(th), tw)
    } else {
        (th, ((w as f64 * sh).ceil() as usize).min(tw))
    }
}

/// `LlavaNextProcessor._get_unpadded_features`: (unpadded features, newline features).
pub fn unpadded_features(height: usize, width: usize, patches_h: usize, patches_w: usize, scale_h: usize, scale_w: usize) -> (usize, usize) {
    let mut ch = (patches_h * scale_h) as i64;
    let mut cw = (patches_w * scale_w) as i64;
    let original_ar = width as f64 / height as f64;
    let current_ar = cw as f64 / ch as f64;
    if original_ar > current_ar {
        let new_h = py_int_round7(height as f64 * (cw as f64 / width as f64));
        let pad = (ch - new_h).div_euclid(2);
        ch -= pad * 2;
    } else {
        let new_w = py_int_round7(width as f64 * (ch as f64 / height as f64));
        let pad = (cw - new_w).div_euclid(2);
        cw -= pad * 2;
    }
    let (ch, cw) = (ch.max(0) as usize, cw.max(0) as usize);
    (ch * cw, ch)
}

fn bad(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Config { path: path.to_path_buf(), msg: msg.into() }
}

/// The processor-level settings (`patch_size`, `num_additional_image_tokens`,
/// `vision_feature_select_strategy`): `processor_config.json`, else the model's `config.json`
/// (vision tower patch size; the CLS token counted, as the Hub processors set it).
fn processor_settings(dir: &Path) -> Result<(usize, usize, FeatureStrategy)> {
    // LlavaNextProcessor subtracts one token only for "default"; an absent strategy (None)
    // subtracts nothing. The model config's default is "default".
    let strategy = |s: Option<&str>, absent: FeatureStrategy, path: &Path| -> Result<FeatureStrategy> {
        match s {
            None => Ok(absent),
            Some("default") => Ok(FeatureStrategy::Default),
            Some("full") => Ok(FeatureStrategy::Full),
            Some(o) => Err(bad(path, format!("vision_feature_select_strategy {o:?} is not supported (\"default\" | \"full\")"))),
        }
    };
    let pc = dir.join("processor_config.json");
    if pc.exists() {
        let v = read_json(&pc)?;
        if let Some(p) = v.get("patch_size").filter(|p| !p.is_null()) {
            let patch = p.as_u64().filter(|&p| p > 0).ok_or_else(|| bad(&pc, format!("patch_size {p} is not a positive integer")))? as usize;
            let extra = match v.get("num_additional_image_tokens") {
                None | Some(serde_json::Value::Null) => 0, // LlavaNextProcessor's default
                Some(x) => x.as_u64().ok_or_else(|| bad(&pc, format!("num_additional_image_tokens {x} is not an integer")))? as usize,
            };
            let s = strategy(v.get("vision_feature_select_strategy").and_then(|s| s.as_str()), FeatureStrategy::Full, &pc)?;
            return Ok((patch, extra, s));
        }
    }
    let cfg = dir.join("config.json");
    if cfg.exists() {
        let v = read_json(&cfg)?;
        if let Some(p) = v.pointer("/vision_config/patch_size").and_then(|p| p.as_u64()).filter(|&p| p > 0) {
            let s = strategy(v.get("vision_feature_select_strategy").and_then(|s| s.as_str()), FeatureStrategy::Default, &cfg)?;
            return Ok((p as usize, 1, s));
        }
    }
    Err(bad(dir, "LLaVA-NeXT needs the vision patch size: processor_config.json `patch_size` or config.json `vision_config.patch_size`"))
}

impl AnyResProcessor {
    /// From the image processor's JSON entry `v` (read from `path`) and the processor
    /// settings of `dir`.
    pub fn from_value(dir: &Path, v: &serde_json::Value, path: &Path) -> Result<Self> {
        let image: ImageProcessorConfig = serde_json::from_value(v.clone()).map_err(|e| bad(path, e.to_string()))?;
        let pinpoints = match v.get("image_grid_pinpoints") {
            None | Some(serde_json::Value::Null) => DEFAULT_PINPOINTS.to_vec(),
            Some(p) => {
                let list = p.as_array().ok_or_else(|| bad(path, "image_grid_pinpoints must be a list of [height, width]"))?;
                list.iter()
                    .map(|e| match e.as_array().map(|a| a.iter().map(|x| x.as_u64()).collect::<Vec<_>>()).as_deref() {
                        Some([Some(h), Some(w)]) => Ok((*h as usize, *w as usize)),
                        _ => Err(bad(path, format!("image_grid_pinpoints entry {e} is not [height, width]"))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let (patch_size, extra, strategy) = processor_settings(dir)?;
        Self::new(AnyResConfig { image, image_grid_pinpoints: pinpoints, patch_size, num_additional_image_tokens: extra, vision_feature_select_strategy: strategy }, path)
    }

    /// Validates a configuration (`path` names it in errors).
    pub fn new(config: AnyResConfig, path: &Path) -> Result<Self> {
        let c = &config.image;
        if c.resample != 3 {
            return Err(bad(path, format!("resample={} is not supported (only 3 = BICUBIC)", c.resample)));
        }
        let clip = ImageProcessor::new(c.clone()).map_err(|e| bad(path, e.to_string()))?;
        let size = match &c.size {
            crate::image_proc::SizeOrInt::Int(n) => (None, None, Some(*n as usize)),
            crate::image_proc::SizeOrInt::Spec(s) => (s.height.map(|x| x as usize), s.width.map(|x| x as usize), s.shortest_edge.map(|x| x as usize)),
        };
        let crop = match &c.crop_size {
            crate::image_proc::SizeOrInt::Int(n) => (Some(*n as usize), Some(*n as usize)),
            crate::image_proc::SizeOrInt::Spec(s) => (s.height.map(|x| x as usize), s.width.map(|x| x as usize)),
        };
        // transformers: size_tuple = (size.height, size.width) if both, else shortest_edge²;
        // tile = crop_size.height, else size.height, else size.shortest_edge.
        let base_hw = match size {
            (Some(h), Some(w), _) => (h, w),
            (_, _, Some(se)) => (se, se),
            _ => return Err(bad(path, "size needs shortest_edge or height and width")),
        };
        let tile = crop.0.or(size.0).or(size.2).ok_or_else(|| bad(path, "no tile size (crop_size.height, size.height or size.shortest_edge)"))?;
        if tile == 0 || base_hw.0 == 0 || base_hw.1 == 0 {
            return Err(bad(path, "sizes must be positive"));
        }
        // (height, width) of a unit after the per-tile resize and crop.
        let finish_hw = |hw: (usize, usize)| -> Result<(usize, usize)> {
            let r = if c.do_resize { c.resize_hw(hw.0, hw.1) } else { hw };
            if c.do_center_crop {
                match crop {
                    (Some(h), Some(w)) => Ok((h, w)),
                    _ => Err(bad(path, "crop_size needs height and width")),
                }
            } else {
                Ok(r)
            }
        };
        let unit_hw = finish_hw((tile, tile))?;
        let base_unit = finish_hw(base_hw)?;
        if unit_hw != base_unit {
            return Err(bad(path, format!("the base tile comes out {base_unit:?} but the grid tiles {unit_hw:?}: they could not be stacked")));
        }
        if unit_hw.0 == 0 || unit_hw.1 == 0 {
            return Err(bad(path, "tiles of zero size"));
        }
        if config.image_grid_pinpoints.is_empty() {
            return Err(bad(path, "image_grid_pinpoints is empty"));
        }
        for &(h, w) in &config.image_grid_pinpoints {
            if h == 0 || w == 0 || h % tile != 0 || w % tile != 0 || h > MAX_PINPOINT_SIDE || w > MAX_PINPOINT_SIDE || h < unit_hw.0 || w < unit_hw.1 {
                return Err(bad(
                    path,
                    format!("image_grid_pinpoints entry [{h}, {w}] must be positive multiples of the tile size {tile}, at least {unit_hw:?} and at most {MAX_PINPOINT_SIDE}"),
                ));
            }
        }
        if config.patch_size == 0 || unit_hw.0 < config.patch_size || unit_hw.1 < config.patch_size {
            return Err(bad(path, format!("patch_size {} does not fit tiles of {unit_hw:?}", config.patch_size)));
        }
        Ok(AnyResProcessor { config, clip, tile, base_hw, unit_hw })
    }

    /// Best resolution (height, width) for an (h, w) image.
    pub fn best_resolution(&self, h: usize, w: usize) -> (usize, usize) {
        select_best_resolution(h, w, &self.config.image_grid_pinpoints)
    }

    /// `<image>` tokens of an (h, w) image (`LlavaNextProcessor.replace_image_token`).
    pub fn num_image_tokens(&self, h: usize, w: usize) -> usize {
        let (bh, bw) = self.best_resolution(h, w);
        let (uh, uw) = self.unit_hw;
        let (scale_h, scale_w) = (bh / uh, bw / uw);
        let p = self.config.patch_size;
        let (ph, pw) = (uh / p, uw / p);
        let (unpadded, newline) = unpadded_features(h, w, ph, pw, scale_h, scale_w);
        let n = unpadded + newline + ph * pw + self.config.num_additional_image_tokens;
        match self.config.vision_feature_select_strategy {
            FeatureStrategy::Default => n.saturating_sub(1),
            FeatureStrategy::Full => n,
        }
    }

    pub fn meta(&self, h: usize, w: usize) -> ImageMeta {
        let (bh, bw) = self.best_resolution(h, w);
        let (gh, gw) = (bh / self.tile, bw / self.tile);
        ImageMeta { original_hw: (h, w), units: 1 + gh * gw, grid: (1, gh, gw), tokens: self.num_image_tokens(h, w) }
    }

    /// Per-tile resize + centre crop (no-ops for the Hub settings).
    fn finish(&self, tile: RgbImage) -> RgbImage {
        let c = &self.clip.config;
        let resize_noop = !c.do_resize || c.resize_hw(tile.height, tile.width) == (tile.height, tile.width);
        let crop_noop = !c.do_center_crop || (tile.height, tile.width) == self.unit_hw;
        if resize_noop && crop_noop {
            tile
        } else {
            self.clip.resize_and_crop(&tile)
        }
    }

    /// The 8-bit units of an image: the base tile, then the grid tiles row-major.
    pub fn prepare(&self, img: &RgbImage) -> Vec<RgbImage> {
        let (h, w) = (img.height, img.width);
        let (bh, bw) = self.best_resolution(h, w);
        let (nh, nw) = patch_output_size(h, w, bh, bw);
        let resized = resize_bicubic_pil(img, nw, nh);
        let (top, left) = ((bh - nh) / 2, (bw - nw) / 2);
        let t = self.tile;
        let mut units = Vec::with_capacity(1 + (bh / t) * (bw / t));
        units.push(self.finish(resize_bicubic_pil(img, self.base_hw.1, self.base_hw.0)));
        for ty in 0..bh / t {
            for tx in 0..bw / t {
                // tile (ty, tx) of the zero-padded canvas, cut straight from `resized`
                let mut data = vec![0u8; t * t * 3];
                let (y0, x0) = (ty * t, tx * t);
                let xs = x0.max(left)..(x0 + t).min(left + nw);
                if !xs.is_empty() {
                    for y in y0.max(top)..(y0 + t).min(top + nh) {
                        let src = ((y - top) * nw + (xs.start - left)) * 3;
                        let dst = ((y - y0) * t + (xs.start - x0)) * 3;
                        data[dst..dst + xs.len() * 3].copy_from_slice(&resized.data[src..src + xs.len() * 3]);
                    }
                }
                units.push(self.finish(RgbImage::new(t, t, data)));
            }
        }
        units
    }
}
