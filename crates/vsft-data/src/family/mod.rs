//! The model families of the data side: which image processor a model directory uses, how
//! it lays out `pixel_values` and how many `<image>` tokens each image becomes.
//!
//! | family | image processor | units per image | tokens per image |
//! |---|---|---|---|
//! | `llava` | `CLIPImageProcessor` | 1 | fixed (`image_seq_length`) |
//! | `llava_next` | `LlavaNextImageProcessor` (anyres) | 1 + gh·gw tiles | depends on the size |
//! | `qwen2_vl` | `Qwen2VLImageProcessor` (Qwen2-VL and Qwen2.5-VL) | gh·gw patch rows of 1176 | gh·gw/4 |
//!
//! The family is chosen from the image processor's JSON (`preprocessor_config.json`, else
//! `processor_config.json`'s `image_processor` entry, the transformers 5.24 layout):
//! `image_processor_type` containing "LlavaNext", or an `image_grid_pinpoints` key, selects
//! LLaVA-NeXT; a type starting with "Qwen2VLImageProcessor" (or, without a type, a
//! `temporal_patch_size` / `merge_size` key) selects Qwen2-VL; a CLIP type (or none) selects
//! LLaVA; anything else is an error.

pub mod llava;
pub mod llava_next;
pub mod qwen2_vl;

use std::path::{Path, PathBuf};

pub use llava::ClipImages;
pub use llava_next::{AnyResConfig, AnyResProcessor, FeatureStrategy};
pub use qwen2_vl::{rope_index, ProcessorOverrides, Qwen2VlConfig, Qwen2VlProcessor};

use crate::collator::{ImageBatch, ImageMeta};
use crate::error::{DataError, Result};
use crate::image_proc::{decode_image, read_json, ImageProcessor, ImageProcessorConfig, RgbImage};

/// Image processor types this crate implements.
pub const SUPPORTED_IMAGE_PROCESSORS: &[&str] =
    &["CLIPImageProcessor (llava)", "LlavaNextImageProcessor (llava_next)", "Qwen2VLImageProcessor (qwen2_vl, qwen2_5_vl)"];

/// The image side of a model family.
#[derive(Debug, Clone)]
pub enum VisionProcessor {
    /// LLaVA-1.5: CLIP preprocessing, a fixed token count.
    Llava(ClipImages),
    /// LLaVA-NeXT: anyres tiles, a per-image token count.
    LlavaNext(AnyResProcessor),
    /// Qwen2-VL / Qwen2.5-VL: smart resize, patch rows `[Σ gh·gw, 1176]`, gh·gw/4 tokens.
    Qwen2Vl(Qwen2VlProcessor),
}

/// One image after the 8-bit stage (resize, pad, tiles): normalisation is all that is left.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    pub meta: ImageMeta,
    /// LLaVA / LLaVA-NeXT: `meta.units` images of the family's unit size. Qwen2-VL: one
    /// image, resized to `(grid.1·patch, grid.2·patch)` (its `meta.units` patch rows are cut
    /// at normalisation).
    pub units: Vec<RgbImage>,
}

/// The image processor's JSON entry of a model directory and the file it came from:
/// `preprocessor_config.json`, else `processor_config.json`'s `image_processor`.
pub fn image_processor_json(dir: &Path) -> Result<(serde_json::Value, PathBuf)> {
    let pre = dir.join("preprocessor_config.json");
    if pre.exists() {
        return Ok((read_json(&pre)?, pre));
    }
    let pc = dir.join("processor_config.json");
    if pc.exists() {
        let v = read_json(&pc)?;
        if let Some(ip) = v.get("image_processor") {
            return Ok((ip.clone(), pc));
        }
    }
    Err(DataError::Config {
        path: dir.to_path_buf(),
        msg: "neither preprocessor_config.json nor processor_config.json with an `image_processor` entry".into(),
    })
}

impl VisionProcessor {
    /// Reads the image processor of a model directory and picks the family.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::from_model_dir_with(dir, &ProcessorOverrides::default())
    }

    /// `from_model_dir` with user overrides of the processor files (`data.min_pixels` /
    /// `data.max_pixels`: Qwen2-VL only; an error naming the key on other families).
    pub fn from_model_dir_with(dir: &Path, overrides: &ProcessorOverrides) -> Result<Self> {
        let (v, path) = image_processor_json(dir)?;
        Self::from_value_with(dir, &v, &path, overrides)
    }

    /// From an image processor JSON entry `v` (read from `path`); `dir` holds the
    /// processor / model config for the token count.
    pub fn from_value(dir: &Path, v: &serde_json::Value, path: &Path) -> Result<Self> {
        Self::from_value_with(dir, v, path, &ProcessorOverrides::default())
    }

    /// `from_value` with overrides.
    pub fn from_value_with(dir: &Path, v: &serde_json::Value, path: &Path, overrides: &ProcessorOverrides) -> Result<Self> {
        let p = Self::select(dir, v, path, overrides)?;
        let qwen_keys = overrides.qwen_keys();
        if !qwen_keys.is_empty() && !matches!(p, VisionProcessor::Qwen2Vl(_)) {
            return Err(DataError::Config {
                path: path.to_path_buf(),
                msg: format!(
                    "{} only applies to the qwen2_vl family (Qwen2VLImageProcessor); this model's image processor is {}",
                    qwen_keys.join(" / "),
                    p.family()
                ),
            });
        }
        Ok(p)
    }

    fn select(dir: &Path, v: &serde_json::Value, path: &Path, overrides: &ProcessorOverrides) -> Result<Self> {
        if !v.is_object() {
            return Err(DataError::Config { path: path.to_path_buf(), msg: "the image processor config is not a JSON object".into() });
        }
        let ty = v.get("image_processor_type").and_then(|t| t.as_str());
        let qwen = match ty {
            Some(t) => t.starts_with("Qwen2VLImageProcessor"),
            None => v.get("temporal_patch_size").is_some() || v.get("merge_size").is_some(),
        };
        if qwen {
            return Ok(VisionProcessor::Qwen2Vl(Qwen2VlProcessor::from_value(v, path, overrides)?));
        }
        let next = ty.is_some_and(|t| t.contains("LlavaNext")) || v.get("image_grid_pinpoints").is_some_and(|p| !p.is_null());
        if next {
            return Ok(VisionProcessor::LlavaNext(AnyResProcessor::from_value(dir, v, path)?));
        }
        match ty {
            None => {}
            Some(t) if t.contains("CLIPImageProcessor") => {}
            Some(t) => {
                return Err(DataError::Config {
                    path: path.to_path_buf(),
                    msg: format!("image_processor_type {t:?} is not supported; supported: {}", SUPPORTED_IMAGE_PROCESSORS.join(", ")),
                })
            }
        }
        let config: ImageProcessorConfig =
            serde_json::from_value(v.clone()).map_err(|e| DataError::Config { path: path.to_path_buf(), msg: e.to_string() })?;
        Ok(VisionProcessor::Llava(ClipImages::new(config, dir, path)?))
    }

    /// `"llava"` or `"llava_next"` (the `model_type` of the family).
    pub fn family(&self) -> &'static str {
        match self {
            VisionProcessor::Llava(_) => "llava",
            VisionProcessor::LlavaNext(_) => "llava_next",
            VisionProcessor::Qwen2Vl(_) => "qwen2_vl",
        }
    }

    /// Whether the token count depends on the image size.
    pub fn is_dynamic(&self) -> bool {
        matches!(self, VisionProcessor::LlavaNext(_) | VisionProcessor::Qwen2Vl(_))
    }

    /// The CLIP processor doing the per-unit resize / crop and the normalisation (Qwen2-VL:
    /// the normalisation only).
    pub fn clip(&self) -> &ImageProcessor {
        match self {
            VisionProcessor::Llava(p) => &p.clip,
            VisionProcessor::LlavaNext(p) => &p.clip,
            VisionProcessor::Qwen2Vl(p) => &p.norm,
        }
    }

    /// (height, width) of one unit of `pixel_values` for the image families with `[N, 3, H, W]`
    /// units; Qwen2-VL (units are flattened patch rows, see `unit_shape`): (patch, patch).
    pub fn unit_hw(&self) -> (usize, usize) {
        match self {
            VisionProcessor::Llava(p) => p.output_hw,
            VisionProcessor::LlavaNext(p) => p.unit_hw,
            VisionProcessor::Qwen2Vl(p) => (p.config.patch_size, p.config.patch_size),
        }
    }

    /// Shape of one unit of `pixel_values` (`ImageBatch.shape[1..]`): `[3, H, W]`, or
    /// `[1176]` for Qwen2-VL.
    pub fn unit_shape(&self) -> Vec<usize> {
        match self {
            VisionProcessor::Qwen2Vl(p) => vec![p.patch_len()],
            _ => {
                let (h, w) = self.unit_hw();
                vec![3, h, w]
            }
        }
    }

    /// Layout and token count of an image of original size (h, w), without its pixels.
    pub fn meta(&self, h: usize, w: usize) -> Result<ImageMeta> {
        if h == 0 || w == 0 {
            return Err(DataError::Other(format!("image of size {w}x{h}")));
        }
        Ok(match self {
            VisionProcessor::Llava(p) => p.meta(h, w)?,
            VisionProcessor::LlavaNext(p) => p.meta(h, w),
            VisionProcessor::Qwen2Vl(p) => p.meta(h, w)?,
        })
    }

    /// Image tokens of an image of original size (h, w).
    pub fn image_tokens(&self, h: usize, w: usize) -> Result<usize> {
        Ok(self.meta(h, w)?.tokens)
    }

    /// The 8-bit stage of one decoded image.
    pub fn prepare(&self, img: &RgbImage) -> Result<PreparedImage> {
        let meta = self.meta(img.height, img.width)?;
        if img.data.len() != img.width * img.height * 3 {
            return Err(DataError::Other(format!("image buffer of {} bytes for {}x{} RGB", img.data.len(), img.width, img.height)));
        }
        let units = match self {
            VisionProcessor::Llava(p) => vec![p.prepare(img)],
            VisionProcessor::LlavaNext(p) => p.prepare(img),
            VisionProcessor::Qwen2Vl(p) => vec![p.prepare(img)?],
        };
        debug_assert_eq!(units.len(), if let VisionProcessor::Qwen2Vl(_) = self { 1 } else { meta.units });
        Ok(PreparedImage { meta, units })
    }

    /// Rescales and normalises one 8-bit unit, appending its `pixel_values` to `out`: CHW
    /// planes, or for Qwen2-VL the patch rows of the resized image.
    pub fn normalize_into(&self, unit: &RgbImage, out: &mut Vec<f32>) {
        match self {
            VisionProcessor::Qwen2Vl(p) => p.patchify_into(unit, out),
            _ => self.clip().normalize_into(unit, out),
        }
    }

    /// Normalises prepared images into one `ImageBatch` (in order).
    pub fn batch<'a>(&self, prepared: impl IntoIterator<Item = &'a PreparedImage>) -> ImageBatch {
        let prepared: Vec<&PreparedImage> = prepared.into_iter().collect();
        let unit = self.unit_shape();
        let unit_len: usize = unit.iter().product();
        let n_units: usize = prepared.iter().map(|p| p.meta.units).sum();
        let mut out = ImageBatch::empty_units(&unit);
        out.pixel_values.reserve_exact(n_units * unit_len);
        for p in prepared {
            let start = out.pixel_values.len();
            for u in &p.units {
                self.normalize_into(u, &mut out.pixel_values);
            }
            debug_assert_eq!(out.pixel_values.len() - start, p.meta.units * unit_len, "units of {:?}", p.meta);
            out.meta.push(p.meta);
        }
        out.shape[0] = n_units;
        out
    }

    /// Full preprocessing of decoded images.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<ImageBatch> {
        let prepared = images.iter().map(|i| self.prepare(i)).collect::<Result<Vec<_>>>()?;
        Ok(self.batch(&prepared))
    }

    /// Decode + preprocess one image.
    pub fn process_bytes(&self, bytes: &[u8]) -> std::result::Result<ImageBatch, String> {
        let img = decode_image(bytes)?;
        self.preprocess(std::slice::from_ref(&img)).map_err(|e| e.to_string())
    }
}
