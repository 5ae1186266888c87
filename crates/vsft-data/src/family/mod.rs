//! The model families of the data side: which image processor a model directory uses, how
//! it lays out `pixel_values` and how many `<image>` tokens each image becomes.
//!
//! | family | image processor | units per image | tokens per image |
//! |---|---|---|---|
//! | `llava` | `CLIPImageProcessor` | 1 | fixed (`image_seq_length`) |
//! | `llava_next` | `LlavaNextImageProcessor` (anyres) | 1 + gh·gw tiles | depends on the size |
//!
//! The family is chosen from the image processor's JSON (`preprocessor_config.json`, else
//! `processor_config.json`'s `image_processor` entry, the transformers 5.24 layout):
//! `image_processor_type` containing "LlavaNext", or an `image_grid_pinpoints` key, selects
//! LLaVA-NeXT; a CLIP type (or none) selects LLaVA; anything else is an error.

pub mod llava;
pub mod llava_next;

use std::path::{Path, PathBuf};

pub use llava::ClipImages;
pub use llava_next::{AnyResConfig, AnyResProcessor, FeatureStrategy};

use crate::collator::{ImageBatch, ImageMeta};
use crate::error::{DataError, Result};
use crate::image_proc::{decode_image, read_json, ImageProcessor, ImageProcessorConfig, RgbImage};

/// Image processor types this crate implements.
pub const SUPPORTED_IMAGE_PROCESSORS: &[&str] = &["CLIPImageProcessor (llava)", "LlavaNextImageProcessor (llava_next)"];

/// The image side of a model family.
#[derive(Debug, Clone)]
pub enum VisionProcessor {
    /// LLaVA-1.5: CLIP preprocessing, a fixed token count.
    Llava(ClipImages),
    /// LLaVA-NeXT: anyres tiles, a per-image token count.
    LlavaNext(AnyResProcessor),
}

/// One image after the 8-bit stage (resize, pad, tiles): normalisation is all that is left.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    pub meta: ImageMeta,
    /// `meta.units` images of the family's unit size.
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
        let (v, path) = image_processor_json(dir)?;
        Self::from_value(dir, &v, &path)
    }

    /// From an image processor JSON entry `v` (read from `path`); `dir` holds the
    /// processor / model config for the token count.
    pub fn from_value(dir: &Path, v: &serde_json::Value, path: &Path) -> Result<Self> {
        if !v.is_object() {
            return Err(DataError::Config { path: path.to_path_buf(), msg: "the image processor config is not a JSON object".into() });
        }
        let ty = v.get("image_processor_type").and_then(|t| t.as_str());
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
        }
    }

    /// Whether the token count depends on the image size.
    pub fn is_dynamic(&self) -> bool {
        matches!(self, VisionProcessor::LlavaNext(_))
    }

    /// The CLIP processor doing the per-unit resize / crop and the normalisation.
    pub fn clip(&self) -> &ImageProcessor {
        match self {
            VisionProcessor::Llava(p) => &p.clip,
            VisionProcessor::LlavaNext(p) => &p.clip,
        }
    }

    /// (height, width) of one unit of `pixel_values`.
    pub fn unit_hw(&self) -> (usize, usize) {
        match self {
            VisionProcessor::Llava(p) => p.output_hw,
            VisionProcessor::LlavaNext(p) => p.unit_hw,
        }
    }

    /// Layout and token count of an image of original size (h, w), without its pixels.
    pub fn meta(&self, h: usize, w: usize) -> Result<ImageMeta> {
        if h == 0 || w == 0 {
            return Err(DataError::Other(format!("image of size {w}x{h}")));
        }
        Ok(match self {
            VisionProcessor::Llava(p) => p.meta(h, w),
            VisionProcessor::LlavaNext(p) => p.meta(h, w),
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
        };
        debug_assert_eq!(units.len(), meta.units);
        Ok(PreparedImage { meta, units })
    }

    /// Rescales and normalises one 8-bit unit, appending its CHW planes to `out`.
    pub fn normalize_into(&self, unit: &RgbImage, out: &mut Vec<f32>) {
        self.clip().normalize_into(unit, out)
    }

    /// Normalises prepared images into one `ImageBatch` (in order).
    pub fn batch<'a>(&self, prepared: impl IntoIterator<Item = &'a PreparedImage>) -> ImageBatch {
        let prepared: Vec<&PreparedImage> = prepared.into_iter().collect();
        let (h, w) = self.unit_hw();
        let n_units: usize = prepared.iter().map(|p| p.units.len()).sum();
        let mut out = ImageBatch::empty((h, w));
        out.pixel_values.reserve_exact(n_units * 3 * h * w);
        for p in prepared {
            for u in &p.units {
                debug_assert_eq!((u.height, u.width), (h, w));
                self.normalize_into(u, &mut out.pixel_values);
            }
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
