//! Qwen2-VL / Qwen2.5-VL (`qwen2_vl`; both use `Qwen2VLImageProcessor`), equal to
//! transformers 5.24's `Qwen2VLImageProcessorPil` + `Qwen2VLProcessor`:
//!
//! 1. `smart_resize(h, w, factor = patch·merge)` in f64 with Python's semantics (round half
//!    to even, floor/ceil, the aspect-ratio limit of 200), between `min_pixels` and
//!    `max_pixels`;
//! 2. Pillow BICUBIC on 8-bit (`image_proc::resize_bicubic_pil`; no-op at the same size);
//! 3. rescale (`f64·factor → f32`) and normalise (f32), as CLIP;
//! 4. patch rows in merge-block order (`bh, bw, ih, iw`), each the `(C, 14, 14)` patch
//!    repeated `temporal_patch_size` times on a temporal axis and flattened `(C, T, p, p)`:
//!    `pixel_values` `[Σ gh·gw, C·T·p·p]` (1176 for the released models), `image_grid_thw`
//!    `[1, gh, gw]`.
//!
//! Each image becomes `t·gh·gw / merge²` `<|image_pad|>` tokens; the chat template writes the
//! `<|vision_start|>` / `<|vision_end|>` around the single `<|image_pad|>` per image.
//! [`rope_index`] is `get_rope_index` (M-RoPE position ids) for images.

use std::path::Path;

use crate::collator::ImageMeta;
use crate::error::{DataError, Result};
use crate::image_proc::{resize_bicubic_pil, ImageProcessor, ImageProcessorConfig, RgbImage, MAX_IMAGE_PIXELS};

/// `Qwen2VLImageProcessor.size["shortest_edge"]`'s class default (`min_pixels`).
pub const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
/// `Qwen2VLImageProcessor.size["longest_edge"]`'s class default (`max_pixels`); the Hub's
/// processor files set 12845056.
pub const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 1280;
/// The image token of `Qwen2VLProcessor`.
pub const IMAGE_TOKEN: &str = "<|image_pad|>";
pub const VISION_START_TOKEN: &str = "<|vision_start|>";
pub const VISION_END_TOKEN: &str = "<|vision_end|>";
/// Largest aspect ratio `smart_resize` accepts.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// User overrides of the processor files' settings: recipe keys `data.min_pixels` and
/// `data.max_pixels` (the `qwen2_vl` family only) and `data.max_image_pixels` (every family).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessorOverrides {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// The largest image decoded, in pixels (`None` or 0: `image_proc::MAX_IMAGE_PIXELS`,
    /// Pillow's decompression-bomb limit).
    pub max_image_pixels: Option<u64>,
}

impl ProcessorOverrides {
    /// The Qwen2-VL-only recipe keys that are set (`data.min_pixels`, `data.max_pixels`).
    pub fn qwen_keys(&self) -> Vec<&'static str> {
        let mut k = Vec::new();
        if self.min_pixels.is_some() {
            k.push("data.min_pixels");
        }
        if self.max_pixels.is_some() {
            k.push("data.max_pixels");
        }
        k
    }

    /// The pixel limit of image decoding.
    pub fn max_image_pixels(&self) -> u64 {
        self.max_image_pixels.filter(|&n| n > 0).unwrap_or(crate::image_proc::MAX_IMAGE_PIXELS)
    }
}

/// The settings of a Qwen2-VL image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    /// `size.shortest_edge` (`min_pixels`).
    pub min_pixels: u64,
    /// `size.longest_edge` (`max_pixels`).
    pub max_pixels: u64,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub do_resize: bool,
    pub resample: u32,
    /// Rescale / normalise settings (`do_rescale`, `rescale_factor`, `do_normalize`,
    /// `image_mean`, `image_std`); its resize / crop fields are unused.
    pub norm: ImageProcessorConfig,
}

/// `Qwen2VLImageProcessor` (PIL backend) + the placeholder rule of `Qwen2VLProcessor`.
#[derive(Debug, Clone)]
pub struct Qwen2VlProcessor {
    pub config: Qwen2VlConfig,
    /// Does the rescale + normalisation (its look-up table).
    pub norm: ImageProcessor,
}

fn bad(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Config { path: path.to_path_buf(), msg: msg.into() }
}

/// transformers' `smart_resize(height, width, factor, min_pixels, max_pixels)`: the
/// (height, width) an image is resized to, multiples of `factor`. Errors (as transformers'
/// ValueError) when the aspect ratio exceeds 200.
pub fn smart_resize(height: usize, width: usize, factor: usize, min_pixels: u64, max_pixels: u64) -> std::result::Result<(usize, usize), String> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(format!("cannot resize an image of {width}x{height} to multiples of {factor}"));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(format!("absolute aspect ratio must be smaller than 200, got {ratio} ({width}x{height})"));
    }
    // Python's round() on a float rounds half to even.
    let mut h_bar = (h / f).round_ties_even() as u64 * factor as u64;
    let mut w_bar = (w / f).round_ties_even() as u64 * factor as u64;
    let pixels = height as u64 * width as u64;
    if h_bar as u128 * w_bar as u128 > max_pixels as u128 {
        let beta = (pixels as f64 / max_pixels as f64).sqrt();
        h_bar = (factor as u64).max(((h / beta / f).floor() as u64) * factor as u64);
        w_bar = (factor as u64).max(((w / beta / f).floor() as u64) * factor as u64);
    } else if (h_bar as u128 * w_bar as u128) < min_pixels as u128 {
        let beta = (min_pixels as f64 / pixels as f64).sqrt();
        h_bar = ((h * beta / f).ceil() as u64) * factor as u64;
        w_bar = ((w * beta / f).ceil() as u64) * factor as u64;
    }
    Ok((h_bar as usize, w_bar as usize))
}

fn get_usize(v: &serde_json::Value, key: &str, default: usize, path: &Path) -> Result<usize> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(x) => x.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| bad(path, format!("{key} {x} is not a positive integer"))),
    }
}

fn get_pixels(v: Option<&serde_json::Value>, key: &str, path: &Path) -> Result<Option<u64>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| bad(path, format!("{key} {x} is not a non-negative integer"))),
    }
}

impl Qwen2VlProcessor {
    /// From the image processor's JSON entry `v` (read from `path`), with `overrides` applied
    /// last. `min_pixels` / `max_pixels` follow `Qwen2VLImageProcessorPil.__init__`: `size`
    /// (`shortest_edge`, `longest_edge`) if given, else the class default
    /// {3136, 1003520}; top-level `min_pixels` / `max_pixels` replace its entries.
    pub fn from_value(v: &serde_json::Value, path: &Path, overrides: &ProcessorOverrides) -> Result<Self> {
        let (mut min_pixels, mut max_pixels) = match v.get("size") {
            None | Some(serde_json::Value::Null) => (Some(DEFAULT_MIN_PIXELS), Some(DEFAULT_MAX_PIXELS)),
            Some(s) if s.is_object() => (get_pixels(s.get("shortest_edge"), "size.shortest_edge", path)?, get_pixels(s.get("longest_edge"), "size.longest_edge", path)?),
            Some(s) => return Err(bad(path, format!("size {s} is not {{\"shortest_edge\": .., \"longest_edge\": ..}}"))),
        };
        if let Some(m) = get_pixels(v.get("min_pixels"), "min_pixels", path)? {
            min_pixels = Some(m);
        }
        if let Some(m) = get_pixels(v.get("max_pixels"), "max_pixels", path)? {
            max_pixels = Some(m);
        }
        // transformers raises at the first resize when either is missing or 0
        let (Some(min_pixels), Some(max_pixels)) = (min_pixels.filter(|&m| m > 0), max_pixels.filter(|&m| m > 0)) else {
            return Err(bad(path, "the Qwen2-VL image processor needs size.shortest_edge / min_pixels and size.longest_edge / max_pixels (positive)"));
        };
        let mut norm: ImageProcessorConfig = serde_json::from_value(v.clone()).map_err(|e| bad(path, e.to_string()))?;
        let do_resize = norm.do_resize;
        let resample = match v.get("resample") {
            None | Some(serde_json::Value::Null) => 3,
            Some(_) => norm.resample,
        };
        // only the rescale / normalise fields are used: the rest is neutral
        let neutral = ImageProcessorConfig::default();
        norm.do_resize = false;
        norm.do_center_crop = false;
        norm.size = neutral.size;
        norm.crop_size = neutral.crop_size;
        let mut config = Qwen2VlConfig {
            min_pixels,
            max_pixels,
            patch_size: get_usize(v, "patch_size", 14, path)?,
            temporal_patch_size: get_usize(v, "temporal_patch_size", 2, path)?,
            merge_size: get_usize(v, "merge_size", 2, path)?,
            do_resize,
            resample,
            norm,
        };
        if let Some(m) = overrides.min_pixels {
            config.min_pixels = m;
        }
        if let Some(m) = overrides.max_pixels {
            config.max_pixels = m;
        }
        if config.min_pixels == 0 || config.max_pixels == 0 {
            return Err(bad(path, format!("data.min_pixels / data.max_pixels must be positive (got {} / {})", config.min_pixels, config.max_pixels)));
        }
        if config.min_pixels > config.max_pixels {
            let keys = if overrides.qwen_keys().is_empty() { "min_pixels / max_pixels" } else { "data.min_pixels / data.max_pixels (after the overrides)" };
            return Err(bad(path, format!("{keys}: the minimum {} is larger than the maximum {}", config.min_pixels, config.max_pixels)));
        }
        if config.max_pixels > MAX_IMAGE_PIXELS {
            return Err(bad(
                path,
                format!(
                    "max_pixels {} is more than {MAX_IMAGE_PIXELS}, Pillow's decompression-bomb limit: a resized image that large would not fit a batch",
                    config.max_pixels
                ),
            ));
        }
        Self::new(config, path)
    }

    /// Validates a configuration (`path` names it in errors).
    pub fn new(config: Qwen2VlConfig, path: &Path) -> Result<Self> {
        if config.do_resize && config.resample != 3 {
            return Err(bad(path, format!("resample={} is not supported (only 3 = BICUBIC)", config.resample)));
        }
        // Released models use 14 or 16, 2 and 2; the bounds keep one patch row
        // (3·temporal·patch² values) and the resize factor sane.
        for (key, v, max) in [("patch_size", config.patch_size, 128), ("merge_size", config.merge_size, 16), ("temporal_patch_size", config.temporal_patch_size, 16)] {
            if v == 0 || v > max {
                return Err(bad(path, format!("{key} {v} is out of range (1..={max})")));
            }
        }
        let norm = ImageProcessor::new(config.norm.clone()).map_err(|e| bad(path, e.to_string()))?;
        Ok(Qwen2VlProcessor { config, norm })
    }

    /// `patch_size · merge_size`: the resized sides are multiples of it.
    pub fn factor(&self) -> usize {
        self.config.patch_size * self.config.merge_size
    }

    /// f32 values per patch row: `3 · temporal_patch_size · patch_size²` (1176).
    pub fn patch_len(&self) -> usize {
        3 * self.config.temporal_patch_size * self.config.patch_size * self.config.patch_size
    }

    /// (height, width) an (h, w) image is resized to.
    pub fn resized_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        if !self.config.do_resize {
            let f = self.factor();
            if h % f != 0 || w % f != 0 {
                return Err(DataError::Other(format!("do_resize is off and the image's {w}x{h} are not multiples of {f}")));
            }
            return Ok((h, w));
        }
        smart_resize(h, w, self.factor(), self.config.min_pixels, self.config.max_pixels).map_err(DataError::Other)
    }

    /// Patch grid (gh, gw) of an (h, w) image.
    pub fn grid(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (rh, rw) = self.resized_hw(h, w)?;
        Ok((rh / self.config.patch_size, rw / self.config.patch_size))
    }

    /// `ImageMeta { units: gh·gw patch rows, grid: (1, gh, gw), tokens: gh·gw / merge² }`.
    pub fn meta(&self, h: usize, w: usize) -> Result<ImageMeta> {
        let (gh, gw) = self.grid(h, w)?;
        let m = self.config.merge_size;
        Ok(ImageMeta { original_hw: (h, w), units: gh * gw, grid: (1, gh, gw), tokens: gh * gw / (m * m) })
    }

    /// The 8-bit resized image.
    pub fn prepare(&self, img: &RgbImage) -> Result<RgbImage> {
        let (rh, rw) = self.resized_hw(img.height, img.width)?;
        Ok(if (rh, rw) == (img.height, img.width) { img.clone() } else { resize_bicubic_pil(img, rw, rh) })
    }

    /// Rescales, normalises and patchifies a resized image, appending its `gh·gw` patch rows
    /// (`patch_len()` values each, merge-block order, temporal repeat) to `out`.
    pub fn patchify_into(&self, img: &RgbImage, out: &mut Vec<f32>) {
        let lut = self.norm.normalize_lut();
        let p = self.config.patch_size;
        let m = self.config.merge_size;
        let t = self.config.temporal_patch_size;
        let (gh, gw) = (img.height / p, img.width / p);
        debug_assert!(gh % m == 0 && gw % m == 0 && gh * p == img.height && gw * p == img.width);
        let w = img.width;
        let d = &img.data;
        out.reserve(gh * gw * self.patch_len());
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for ih in 0..m {
                    for iw in 0..m {
                        let (r, c) = (bh * m + ih, bw * m + iw);
                        for (ch, l) in lut.iter().enumerate() {
                            let start = out.len();
                            for py in 0..p {
                                let row = ((r * p + py) * w + c * p) * 3 + ch;
                                out.extend((0..p).map(|px| l[d[row + px * 3] as usize]));
                            }
                            for _ in 1..t {
                                out.extend_from_within(start..start + p * p);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// M-RoPE position ids for a padded batch, as transformers 5.24's
/// `Qwen2VLModel.get_rope_index` (and `Qwen2_5_VLModel`'s, identical for images) computes
/// them, plus what the model does when the batch has no image at all.
///
/// - `input_ids`, `attention_mask`: `[batch, seq_len]` row-major; left or right padding.
/// - `grids`: `image_grid_thw` of every image of the batch in order (patch units, as
///   `ImageMeta::grid`); they are consumed across rows in order.
/// - Per row, only tokens with `attention_mask != 0` take part. They are grouped into runs of
///   image tokens (`input_ids == image_token_id`, transformers' `mm_token_type_ids == 1`) and
///   text. A text run of length L gets `cur..cur+L` on all three axes, then `cur += L`; an
///   image run (t, h/m, w/m) gets (`cur+t_i`, `cur+row`, `cur+col`) row-major, then
///   `cur += max(h, w) / m`. Padding positions are 0.
/// - `rope_deltas[b] = max position + 1 − real tokens` (0 for a row without real tokens).
/// - No grids (text-only batch): `compute_3d_position_ids` returns None and the decoder uses
///   `arange(seq_len)` on every row and axis, pads included; deltas are 0.
///
/// Returns `([batch·seq_len] (t, h, w), rope_deltas per row)`. A run of image tokens whose
/// length is not its grid's `t·h·w/m²`, more image runs than grids, leftover grids, or image
/// tokens without grids are errors (transformers fails on them too). `vision_start_token_id`
/// is not needed by 5.24 (it groups by token type) and is only checked to be distinct from
/// the image token.
pub fn rope_index(
    input_ids: &[i64],
    attention_mask: &[i64],
    seq_len: usize,
    grids: &[(usize, usize, usize)],
    image_token_id: i64,
    vision_start_token_id: i64,
    spatial_merge_size: usize,
) -> Result<(Vec<[i64; 3]>, Vec<i64>)> {
    let err = |m: String| DataError::Other(format!("rope_index: {m}"));
    if input_ids.len() != attention_mask.len() {
        return Err(err(format!("{} input ids but {} attention mask entries", input_ids.len(), attention_mask.len())));
    }
    if seq_len == 0 {
        return if input_ids.is_empty() { Ok((Vec::new(), Vec::new())) } else { Err(err("seq_len 0 with a non-empty batch".into())) };
    }
    if input_ids.len() % seq_len != 0 {
        return Err(err(format!("{} ids are not a multiple of seq_len {seq_len}", input_ids.len())));
    }
    if spatial_merge_size == 0 {
        return Err(err("spatial_merge_size 0".into()));
    }
    if vision_start_token_id == image_token_id {
        return Err(err("vision_start_token_id equals image_token_id".into()));
    }
    let batch = input_ids.len() / seq_len;
    let m = spatial_merge_size;
    if grids.is_empty() {
        if let Some(k) = input_ids.iter().zip(attention_mask).position(|(&t, &a)| a != 0 && t == image_token_id) {
            return Err(err(format!("image token at row {}, position {} but no image grids", k / seq_len, k % seq_len)));
        }
        let pos = (0..batch).flat_map(|_| (0..seq_len as i64).map(|p| [p, p, p])).collect();
        return Ok((pos, vec![0; batch]));
    }
    let mut positions = vec![[0i64; 3]; input_ids.len()];
    let mut deltas = Vec::with_capacity(batch);
    let mut next_grid = 0usize;
    for b in 0..batch {
        let ids = &input_ids[b * seq_len..(b + 1) * seq_len];
        let mask = &attention_mask[b * seq_len..(b + 1) * seq_len];
        let out = &mut positions[b * seq_len..(b + 1) * seq_len];
        let real: Vec<usize> = (0..seq_len).filter(|&k| mask[k] != 0).collect();
        let mut cur: i64 = 0;
        let mut max_pos: Option<i64> = None;
        let mut i = 0;
        while i < real.len() {
            let is_img = ids[real[i]] == image_token_id;
            let mut j = i + 1;
            while j < real.len() && (ids[real[j]] == image_token_id) == is_img {
                j += 1;
            }
            if !is_img {
                for (n, &k) in real[i..j].iter().enumerate() {
                    let p = cur + n as i64;
                    out[k] = [p, p, p];
                }
                cur += (j - i) as i64;
                max_pos = Some(max_pos.unwrap_or(i64::MIN).max(cur - 1));
            } else {
                let Some(&(gt, gh, gw)) = grids.get(next_grid) else {
                    return Err(err(format!("row {b}: more image-token runs than the {} grids", grids.len())));
                };
                next_grid += 1;
                let (lt, lh, lw) = (gt, gh / m, gw / m);
                if lt * lh * lw != j - i {
                    return Err(err(format!(
                        "row {b}: an image-token run of {} tokens for grid ({gt}, {gh}, {gw}) which needs {} (merge {m})",
                        j - i,
                        lt * lh * lw
                    )));
                }
                let mut n = i;
                for ti in 0..lt {
                    for hi in 0..lh {
                        for wi in 0..lw {
                            out[real[n]] = [cur + ti as i64, cur + hi as i64, cur + wi as i64];
                            n += 1;
                        }
                    }
                }
                let top = cur + (lt.max(lh).max(lw) as i64) - 1;
                max_pos = Some(max_pos.unwrap_or(i64::MIN).max(top));
                cur += (gh.max(gw) / m) as i64;
            }
            i = j;
        }
        deltas.push(match max_pos {
            Some(mx) => mx + 1 - real.len() as i64,
            None => 0,
        });
    }
    if next_grid != grids.len() {
        return Err(err(format!("{} grids but only {next_grid} image-token runs", grids.len())));
    }
    Ok((positions, deltas))
}
