//! vsft-data: the data pipeline of vsft — datasets (parquet in the llava-instruct-mix-vsft
//! schema, LLaVA JSON), images (CLIP preprocessing equal to transformers' PIL backend),
//! chat templates and tokenizers (equal to `LlavaProcessor`), and the collator (equal to
//! TRL's `DataCollatorForVisionLanguageModeling` / the HF VLM blog's collator).
//!
//! Batches are plain buffers (`Vec<i64>` ids/mask/labels `[batch, seq]`, an `ImageBatch` of
//! `Vec<f32>` pixels `[Σ units, 3, H, W]` with per-image `ImageMeta`); no tensor library is
//! involved. Model families (`family`): `llava` (CLIP, fixed `<image>` count),
//! `llava_next` (anyres tiles, per-image count) and `qwen2_vl` (Qwen2-VL / Qwen2.5-VL: patch
//! rows `[Σ patches, 1176]`, `<|image_pad|>` × gh·gw/4, M-RoPE positions by `rope_index`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use vsft_data::{open_dataset, CollatorConfig, Cursor, DataLoader, LabelMask, LoaderConfig, OnBadRow, Processor};
//!
//! # fn main() -> vsft_data::Result<()> {
//! let processor = Arc::new(Processor::from_model_dir("llava-1.5-7b-hf".as_ref(), None)?);
//! let source = open_dataset("llava-instruct-mix-vsft/data", Some("train"), None)?;
//! let cfg = LoaderConfig {
//!     batch_size: 8,
//!     collator: CollatorConfig { label_mask: LabelMask::Pad, max_length: Some(2048), pad_to_multiple_of: None, add_special_tokens: false },
//!     on_bad_row: OnBadRow::Skip,
//!     ..Default::default()
//! };
//! let mut loader = DataLoader::new(source, processor, cfg, Cursor { seed: 42, epoch: 0, position: 0 });
//! while let Some(batch) = loader.next() {
//!     let batch = batch?;
//!     if batch.all_labels_masked { /* report, don't train */ }
//!     let _checkpoint_cursor = loader.cursor(); // store with the checkpoint to resume here
//! }
//! eprintln!("skipped: {}", loader.skipped().report());
//! # Ok(()) }
//! ```

pub mod collator;
pub mod dataset;
pub mod error;
pub mod family;
pub mod guard;
pub mod image_proc;
pub mod inspect;
pub mod jpeg;
pub mod loader;
pub mod pipeline;
pub mod template;

pub use collator::{Batch, CollatorConfig, Example, ImageBatch, ImageMeta, LabelMask, IGNORE_INDEX};
pub use dataset::{open_dataset, Cursor, ImageSource, OnBadRow, Row, RowSource, SkipStats};
pub use inspect::{inspect, summarize, InspectOptions, InspectedExample, Summary};
pub use error::{BadRowKind, DataError, Result};
pub use family::{rope_index, AnyResProcessor, ClipImages, PreparedImage, ProcessorOverrides, Qwen2VlProcessor, VisionProcessor};
pub use image_proc::{ImageProcessor, ImageProcessorConfig, PixelValues, RgbImage};
pub use loader::{DataLoader, LoaderConfig, Shard};
pub use pipeline::{Prepared, Processor};
pub use template::{ChatTemplate, Content, Message, TextProcessor};
