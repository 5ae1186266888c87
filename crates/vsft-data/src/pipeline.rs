//! The processor: one dataset row -> one example (images preprocessed, text tokenized),
//! the equivalent of `LlavaProcessor` + the collator's per-row work.

use std::path::Path;

use crate::collator::{self, Batch, CollatorConfig, Example, LabelMask, Truncation};
use crate::dataset::{validate_row, Row};
use crate::error::{BadRowKind, DataError, Result};
use crate::image_proc::{decode_image, ImageProcessor, PixelValues, RgbImage};
use crate::template::Encoded;

/// A row processed up to its resized and cropped 8-bit images: what a batch needs before
/// normalisation (which then writes straight into the batch buffer).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub index: usize,
    pub encoded: Encoded,
    pub images: Vec<RgbImage>,
}
use crate::template::{AssistantSpans, TextProcessor};

/// Image processor + text processor of a model directory.
#[derive(Debug)]
pub struct Processor {
    pub image: ImageProcessor,
    pub text: TextProcessor,
}

impl Processor {
    /// Loads everything from a model directory (`tokenizer.json`, `tokenizer_config.json`,
    /// `preprocessor_config.json` / `processor_config.json`, chat template). `chat_template`
    /// overrides the model's template.
    pub fn from_model_dir(dir: &Path, chat_template: Option<&Path>) -> Result<Self> {
        let image = ImageProcessor::from_model_dir(dir)?;
        if image.config.output_hw().is_none() {
            return Err(crate::error::DataError::Config {
                path: dir.to_path_buf(),
                msg: "the image processor's output size is not fixed (no centre crop, no height/width size): images of a batch could not be stacked".into(),
            });
        }
        let text = TextProcessor::from_model_dir(dir, chat_template, image.config.output_hw())?;
        Ok(Processor { image, text })
    }

    /// Decodes the images of a row; errors name the image field.
    fn decode_row_images(&self, row: &Row) -> Result<Vec<RgbImage>> {
        row.images
            .iter()
            .enumerate()
            .map(|(k, src)| {
                let bytes = src.load().map_err(|e| {
                    DataError::bad_row(&row.file, row.file_row, format!("images[{k}].path"), BadRowKind::MissingImageFile, e.to_string())
                })?;
                decode_image(&bytes).map_err(|e| {
                    DataError::bad_row(&row.file, row.file_row, format!("images[{k}].bytes"), BadRowKind::CorruptImage, format!("cannot decode image: {e}"))
                })
            })
            .collect()
    }

    /// Decodes and preprocesses the images of a row; errors name the image field.
    pub fn row_images(&self, row: &Row) -> Result<Vec<PixelValues>> {
        Ok(self.decode_row_images(row)?.iter().map(|img| self.image.preprocess(img)).collect())
    }

    /// Validates, tokenizes and truncates a row (no images touched).
    fn encode_checked(&self, row: &Row, cfg: &CollatorConfig) -> Result<Encoded> {
        validate_row(row)?;
        let assistant = (cfg.label_mask == LabelMask::Assistant).then_some(AssistantSpans::Auto);
        let mut encoded = self.text.encode_row(&row.messages, row.images.len(), cfg.add_special_tokens, assistant, &row.file, row.file_row)?;
        if collator::truncate(&mut encoded, cfg.max_length) == Truncation::CutsImage {
            return Err(DataError::bad_row(
                &row.file,
                row.file_row,
                "messages",
                BadRowKind::ImageTruncated,
                format!(
                    "{} tokens; truncating to max_length {} would cut through an image's tokens",
                    encoded.input_ids.len(),
                    cfg.max_length.unwrap_or(0)
                ),
            ));
        }
        Ok(encoded)
    }

    /// Validates, tokenizes and truncates a row, and preprocesses its images.
    pub fn process_row(&self, row: &Row, cfg: &CollatorConfig) -> Result<Example> {
        let encoded = self.encode_checked(row, cfg)?;
        let pixel_values = self.row_images(row)?;
        Ok(Example { index: row.index, encoded, pixel_values })
    }

    /// Decoded, resized and cropped 8-bit images of a row; errors name the image field.
    pub fn row_images_u8(&self, row: &Row) -> Result<Vec<RgbImage>> {
        Ok(self.decode_row_images(row)?.iter().map(|img| self.image.resize_and_crop(img)).collect())
    }

    /// Like `process_row`, stopping before normalisation.
    pub fn prepare_row(&self, row: &Row, cfg: &CollatorConfig) -> Result<Prepared> {
        let ex = self.encode_checked(row, cfg)?;
        let images = self.row_images_u8(row)?;
        Ok(Prepared { index: row.index, encoded: ex, images })
    }

    /// Collates prepared rows, normalising images directly into the batch's pixel buffer.
    pub fn collate_prepared(&self, rows: &[Prepared], cfg: &CollatorConfig) -> Batch {
        let n_images: usize = rows.iter().map(|r| r.images.len()).sum();
        let hw = rows.iter().flat_map(|r| r.images.iter()).map(|i| (i.height, i.width)).next().unwrap_or((0, 0));
        let mut pixels = Vec::with_capacity(n_images * 3 * hw.0 * hw.1);
        for img in rows.iter().flat_map(|r| r.images.iter()) {
            assert_eq!((img.height, img.width), hw, "all images of a batch must have the same size");
            self.image.normalize_into(img, &mut pixels);
        }
        let text: Vec<(usize, &Encoded)> = rows.iter().map(|r| (r.index, &r.encoded)).collect();
        collator::collate_text(&text, cfg, self.text.pad_token_id, self.text.image_token_id, pixels, n_images, hw)
    }

    pub fn collate(&self, examples: &[Example], cfg: &CollatorConfig) -> Batch {
        collator::collate(examples, cfg, self.text.pad_token_id, self.text.image_token_id)
    }
}
