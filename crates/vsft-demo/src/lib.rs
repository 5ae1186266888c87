//! vsft-demo: everything the built-in demo (`vsft train --config recipes/demo.toml`) needs
//! that is not a model — generated offline and deterministically, so the demo downloads
//! nothing and a fresh clone learns the same thing every time.
//!
//! **The dataset** ([`write_shapes_dataset`], sizes and difficulty in [`ShapesSpec`]):
//! pictures (84×84 by default, the tiny CLIP tower's size) of one or two shapes (circle,
//! square, triangle) in six colours on a light background, placed left/right, top/bottom, or alone at one of those places. Drawn with
//! the `image` crate from a seeded splitmix64 generator, written as PNG inside parquet in
//! the `HuggingFaceH4/llava-instruct-mix-vsft` schema, laid out as on the Hub:
//!
//! ```text
//! DIR/captions/data/train-00000-of-00001.parquet   stage 1: "Describe the picture." -> caption
//! DIR/qa/data/train-00000-of-00001.parquet         stage 2: 1-3 question/answer turns per picture
//! DIR/qa/data/test-00000-of-00001.parquet          held-out pictures, one question each
//! ```
//!
//! Answers are one word and a full stop ("red.", "circle.", "left.", "two."), so a
//! generated answer is scored by exact match on its first word, per [`QuestionKind`].
//! The task needs the picture (colour, shape and place are random) and is graded: counting
//! and lone objects are learnt first, then places, then shapes (and with them the colour of a
//! named shape when there are two). scripts/torch_reference.py trains the demo config in
//! PyTorch for comparison (all parameters trained): about 70% overall after 500 steps of
//! batch 16 and 80% after 1500 (colour questions 75-88%), ~0.13 s/step on one CPU thread.
//!
//! **The tokenizer** ([`write_demo_tokenizer`], [`write_demo_model_files`]): a word-level
//! `tokenizer.json` whose vocabulary is exactly the words the dataset and the chat template
//! use (so the embedding is tiny and nothing is `<unk>`), with `<unk> <s> </s> <pad> <image>`
//! as special tokens, a llava-hf style chat template that ends assistant turns with `</s>`
//! inside `{% generation %}` (the model learns to stop; the `assistant` label mask works),
//! and the CLIP processor files for an 84 px / patch-14 tower. [`demo_model_config`] is the
//! matching LLaVA `config.json` (also stored as `configs/demo-tiny-llava.json`).
//!
//! No Burn here: the binary adds random weights (`vsft init`), trains and evaluates;
//! [`held_out_questions`] gives it the test questions.

mod error;
mod parquet_io;
mod rng;
mod shapes;
mod tokenizer;

pub use error::{DemoError, Result};
pub use rng::SplitMix64;
pub use shapes::{
    held_out_questions, write_shapes_dataset, Colour, DemoFiles, DemoQuestion, Geometry, Object, Place, QuestionKind, Scene, Score, Shape, ShapesSpec,
};
pub use tokenizer::{
    all_texts, chat_template, demo_model_config, demo_vocab_ids, pre_tokenize, vocabulary, write_demo_model_files, write_demo_tokenizer, write_processor_files,
    DemoVocab, CHAT_TEMPLATE, IMAGE_SIZE, PATCH_SIZE, SPECIAL_TOKENS,
};
