//! The processor: one dataset row -> one example (images preprocessed by the model
//! family's image processor, text tokenized with each image's `<image>` count), the
//! equivalent of `LlavaProcessor` / `LlavaNextProcessor` + the collator's per-row work.

use std::path::Path;

use crate::collator::{self, Batch, CollatorConfig, Example, ImageBatch, ImageMeta, LabelMask, Truncation};
use crate::dataset::{validate_row, ImageSource, Row};
use crate::error::{BadRowKind, DataError, Result};
use crate::family::{qwen2_vl, PreparedImage, ProcessorOverrides, VisionProcessor};
use crate::guard::read_bounded;
use crate::image_proc::{decode_image_limited, RgbImage, MAX_IMAGE_FILE_BYTES};
use crate::template::{AssistantSpans, Encoded, ImageTokenSpec, Message, TextProcessor};

/// A row processed up to its 8-bit images (resized, cropped / tiled): what a batch needs
/// before normalisation (which then writes straight into the batch buffer).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub index: usize,
    pub encoded: Encoded,
    pub images: Vec<PreparedImage>,
}

/// Image processor (of the model's family) + text processor of a model directory.
#[derive(Debug)]
pub struct Processor {
    pub image: VisionProcessor,
    pub text: TextProcessor,
    /// Images whose header claims more pixels are refused before decoding
    /// (`data.max_image_pixels`; default `image_proc::MAX_IMAGE_PIXELS`).
    pub max_image_pixels: u64,
}

impl Processor {
    /// Loads everything from a model directory (`tokenizer.json`, `tokenizer_config.json`,
    /// `preprocessor_config.json` / `processor_config.json`, chat template). `chat_template`
    /// overrides the model's template.
    pub fn from_model_dir(dir: &Path, chat_template: Option<&Path>) -> Result<Self> {
        Self::from_model_dir_with(dir, chat_template, &ProcessorOverrides::default())
    }

    /// `from_model_dir` with user overrides of the processor files' settings
    /// (`data.min_pixels` / `data.max_pixels`, Qwen2-VL only: an error naming the key on
    /// other families; `data.max_image_pixels`).
    pub fn from_model_dir_with(dir: &Path, chat_template: Option<&Path>, overrides: &ProcessorOverrides) -> Result<Self> {
        let image = VisionProcessor::from_model_dir_with(dir, overrides)?;
        let text = match &image {
            VisionProcessor::Llava(p) => {
                let mut text = TextProcessor::from_model_dir(dir, chat_template, Some(image.unit_hw()))?;
                text.image.image_seq_length = p.tokens;
                text
            }
            VisionProcessor::LlavaNext(_) => {
                let mut text = TextProcessor::from_model_dir(dir, chat_template, Some(image.unit_hw()))?;
                text.image.dynamic = true;
                text
            }
            VisionProcessor::Qwen2Vl(_) => {
                // Qwen2VLProcessor: `<|image_pad|>`, each image's count from its grid; the
                // template writes <|vision_start|> / <|vision_end|> around it.
                let spec = ImageTokenSpec { image_token: qwen2_vl::IMAGE_TOKEN.to_string(), image_seq_length: 1, dynamic: true };
                let mut text = TextProcessor::from_model_dir_with_spec(dir, chat_template, spec)?;
                let tok_path = dir.join("tokenizer.json");
                let id = |t: &str| {
                    text.tokenizer.token_to_id(t).ok_or_else(|| DataError::Tokenizer { path: tok_path.clone(), msg: format!("{t} is not in the vocabulary") })
                };
                text.vision_wrappers = Some((id(qwen2_vl::VISION_START_TOKEN)?, id(qwen2_vl::VISION_END_TOKEN)?));
                text
            }
        };
        Ok(Processor { image, text, max_image_pixels: overrides.max_image_pixels() })
    }

    /// `"llava"` / `"llava_next"` / `"qwen2_vl"` (also for Qwen2.5-VL: same processor).
    pub fn family(&self) -> &'static str {
        self.image.family()
    }

    /// Decodes image `k` of a row; errors name the image field. An image file over
    /// `image_proc::MAX_IMAGE_FILE_BYTES` or an image over `max_image_pixels` is a
    /// `CorruptImage` row (skipped and counted under `on_bad_row = "skip"`).
    fn decode_row_image(&self, row: &Row, k: usize, src: &ImageSource) -> Result<RgbImage> {
        let bytes = src.load().map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::FileTooLarge { BadRowKind::CorruptImage } else { BadRowKind::MissingImageFile };
            DataError::bad_row(&row.file, row.file_row, format!("images[{k}].path"), kind, e.to_string())
        })?;
        decode_image_limited(&bytes, self.max_image_pixels).map_err(|e| {
            DataError::bad_row(&row.file, row.file_row, format!("images[{k}].bytes"), BadRowKind::CorruptImage, format!("cannot decode image: {e}"))
        })
    }

    /// Decodes the images of a row; errors name the image field.
    pub fn decode_row_images(&self, row: &Row) -> Result<Vec<RgbImage>> {
        row.images.iter().enumerate().map(|(k, src)| self.decode_row_image(row, k, src)).collect()
    }

    /// Reads (up to `image_proc::MAX_IMAGE_FILE_BYTES`) and decodes an image file under
    /// `max_image_pixels`; errors name the file.
    pub fn load_image(&self, path: &Path) -> Result<RgbImage> {
        let bytes = read_bounded(path, MAX_IMAGE_FILE_BYTES, "image files").map_err(|e| DataError::io(path, e))?;
        decode_image_limited(&bytes, self.max_image_pixels).map_err(|e| DataError::Image(format!("{}: cannot decode: {e}", path.display())))
    }

    /// Decodes and preprocesses the images of a row; errors name the image field.
    pub fn row_images(&self, row: &Row) -> Result<ImageBatch> {
        Ok(self.image.batch(&self.row_images_u8(row)?))
    }

    /// Decoded 8-bit units (resized and cropped / tiled) of the images of a row, with their
    /// layout and token counts. Each image is prepared as soon as it is decoded, so a row of
    /// several large images holds one full-size image at a time.
    pub fn row_images_u8(&self, row: &Row) -> Result<Vec<PreparedImage>> {
        row.images
            .iter()
            .enumerate()
            .map(|(k, src)| {
                let img = self.decode_row_image(row, k, src)?;
                self.image.prepare(&img).map_err(|e| {
                    DataError::bad_row(&row.file, row.file_row, format!("images[{k}].bytes"), BadRowKind::CorruptImage, e.to_string())
                })
            })
            .collect()
    }

    /// Tokenizes (each image expanded to its own token count) and truncates a validated row.
    fn encode_checked(&self, row: &Row, cfg: &CollatorConfig, meta: &[ImageMeta]) -> Result<Encoded> {
        let assistant = (cfg.label_mask == LabelMask::Assistant).then_some(AssistantSpans::Auto);
        let counts: Vec<usize> = meta.iter().map(|m| m.tokens).collect();
        let mut encoded = self.text.encode_row(&row.messages, &counts, cfg.add_special_tokens, assistant, &row.file, row.file_row)?;
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

    /// Validates, decodes and prepares the images (their sizes set the `<image>` counts),
    /// tokenizes, truncates and returns the 8-bit images.
    fn prepare_parts(&self, row: &Row, cfg: &CollatorConfig) -> Result<(Encoded, Vec<PreparedImage>)> {
        validate_row(row)?;
        let prepared = self.row_images_u8(row)?;
        let meta: Vec<ImageMeta> = prepared.iter().map(|p| p.meta).collect();
        let encoded = self.encode_checked(row, cfg, &meta)?;
        Ok((encoded, prepared))
    }

    /// Validates, tokenizes and truncates a row, and preprocesses its images.
    pub fn process_row(&self, row: &Row, cfg: &CollatorConfig) -> Result<Example> {
        let (encoded, prepared) = self.prepare_parts(row, cfg)?;
        Ok(Example { index: row.index, encoded, images: self.image.batch(&prepared) })
    }

    /// Like `process_row`, stopping before normalisation.
    pub fn prepare_row(&self, row: &Row, cfg: &CollatorConfig) -> Result<Prepared> {
        let (encoded, images) = self.prepare_parts(row, cfg)?;
        Ok(Prepared { index: row.index, encoded, images })
    }

    /// Collates prepared rows, normalising images directly into the batch's pixel buffer.
    pub fn collate_prepared(&self, rows: &[Prepared], cfg: &CollatorConfig) -> Result<Batch> {
        let images = self.image.batch(rows.iter().flat_map(|r| r.images.iter()));
        let text: Vec<(usize, &Encoded)> = rows.iter().map(|r| (r.index, &r.encoded)).collect();
        collator::collate_text(&text, cfg, self.text.pad_token_id, self.text.image_token_id, images)
    }

    pub fn collate(&self, examples: &[Example], cfg: &CollatorConfig) -> Result<Batch> {
        collator::collate(examples, cfg, self.text.pad_token_id, self.text.image_token_id)
    }

    /// A generation prompt with its images: the template rendered with
    /// `add_generation_prompt=true`, BOS as the tokenizer adds it (unless the template
    /// already did), each `<image>` expanded to its image's token count.
    pub fn encode_prompt_with_images(&self, messages: &[Message], images: &[RgbImage]) -> Result<(Vec<u32>, ImageBatch)> {
        let prepared = images.iter().map(|i| self.image.prepare(i)).collect::<Result<Vec<_>>>()?;
        let counts: Vec<usize> = prepared.iter().map(|p| p.meta.tokens).collect();
        let enc = self.text.encode_images(messages, &counts, true, true, None)?;
        Ok((enc.input_ids, self.image.batch(&prepared)))
    }
}
