//! LLaVA-1.5 (`llava`): one CLIP-preprocessed image per `<image>`, a fixed token count.
//! The pixel work is `image_proc::ImageProcessor` (Pillow-exact BICUBIC, centre crop).

use std::path::Path;

use crate::collator::ImageMeta;
use crate::error::{DataError, Result};
use crate::image_proc::{ImageProcessor, ImageProcessorConfig, RgbImage, MAX_IMAGE_PIXELS};
use crate::template::ImageTokenSpec;

/// `CLIPImageProcessor` + the fixed `<image>` count of `LlavaProcessor`.
#[derive(Debug, Clone)]
pub struct ClipImages {
    pub clip: ImageProcessor,
    /// (height, width) of every processed image.
    pub output_hw: (usize, usize),
    /// Image tokens per image (`image_seq_length`, or (crop/patch)² + extra − 1 for "default").
    pub tokens: usize,
}

impl ClipImages {
    /// `config` is the image processor's entry read from `path`; `dir` holds
    /// `processor_config.json` / `config.json` for the token count.
    pub fn new(config: ImageProcessorConfig, dir: &Path, path: &Path) -> Result<Self> {
        let clip = ImageProcessor::new(config).map_err(|e| DataError::Config { path: path.to_path_buf(), msg: e.to_string() })?;
        let output_hw = clip.config.output_hw().ok_or_else(|| DataError::Config {
            path: path.to_path_buf(),
            msg: "the image processor's output size is not fixed (no centre crop, no height/width size): images of a batch could not be stacked".into(),
        })?;
        let tokens = ImageTokenSpec::from_model_dir(dir, Some(output_hw))?.image_seq_length;
        Ok(ClipImages { clip, output_hw, tokens })
    }

    /// The layout of an (h, w) image; an error when the resize would make it larger than
    /// `MAX_IMAGE_PIXELS` (a shortest-edge resize of a very thin image: Pillow would run
    /// out of memory).
    pub fn meta(&self, h: usize, w: usize) -> Result<ImageMeta> {
        if self.clip.config.do_resize {
            let (rh, rw) = self.clip.config.resize_hw(h, w);
            if rh as u64 * rw as u64 > MAX_IMAGE_PIXELS {
                return Err(DataError::Other(format!("resizing this {w}x{h} image gives {rw}x{rh}, more than {MAX_IMAGE_PIXELS} pixels")));
            }
        }
        Ok(ImageMeta { original_hw: (h, w), units: 1, grid: (1, 1, 1), tokens: self.tokens })
    }

    /// Resize + centre crop (8-bit): the one unit of this image.
    pub fn prepare(&self, img: &RgbImage) -> RgbImage {
        self.clip.resize_and_crop(img)
    }
}
