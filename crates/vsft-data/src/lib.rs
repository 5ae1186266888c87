//! vsft-data: the data pipeline of vsft — datasets (parquet in the llava-instruct-mix-vsft
//! schema, LLaVA JSON), images (CLIP preprocessing equal to transformers' PIL backend),
//! chat templates and tokenizers (equal to `LlavaProcessor`), and the collator (equal to
//! TRL's `DataCollatorForVisionLanguageModeling` / the HF VLM blog's collator).
//!
//! Batches are plain buffers (`Vec<i64>` ids/mask/labels `[batch, seq]`, `Vec<f32>` pixels
//! `[n_images, 3, H, W]`); no tensor library is involved.

pub mod collator;
pub mod dataset;
pub mod error;
pub mod image_proc;
pub mod inspect;
pub mod jpeg;
pub mod loader;
pub mod pipeline;
pub mod template;

pub use collator::{Batch, CollatorConfig, Example, LabelMask, IGNORE_INDEX};
pub use dataset::{open_dataset, Cursor, ImageSource, OnBadRow, Row, RowSource, SkipStats};
pub use error::{BadRowKind, DataError, Result};
pub use image_proc::{ImageProcessor, ImageProcessorConfig, PixelValues};
pub use loader::{DataLoader, LoaderConfig};
pub use pipeline::Processor;
pub use template::{ChatTemplate, Content, Message, TextProcessor};
