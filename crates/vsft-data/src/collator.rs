//! Collation: right padding, optional padding to a multiple, truncation that never cuts an
//! image, and the label masks of TRL / the HF VLM blog.

use serde::{Deserialize, Serialize};

use crate::image_proc::PixelValues;
use crate::template::Encoded;

/// Label id ignored by the loss.
pub const IGNORE_INDEX: i64 = -100;

/// Which tokens are trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LabelMask {
    /// labels = input_ids, pad positions -100 (TRL 1.16's default, the blog's LLavaDataCollator).
    #[default]
    #[serde(rename = "pad")]
    Pad,
    /// Also image tokens -100.
    #[serde(rename = "pad+image")]
    PadImage,
    /// Only assistant-turn tokens (image and pad excluded).
    #[serde(rename = "assistant")]
    Assistant,
}

impl std::str::FromStr for LabelMask {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pad" => Ok(LabelMask::Pad),
            "pad+image" | "pad_image" => Ok(LabelMask::PadImage),
            "assistant" => Ok(LabelMask::Assistant),
            o => Err(format!("unknown label mask {o:?} (pad | pad+image | assistant)")),
        }
    }
}

impl std::fmt::Display for LabelMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LabelMask::Pad => "pad",
            LabelMask::PadImage => "pad+image",
            LabelMask::Assistant => "assistant",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollatorConfig {
    pub label_mask: LabelMask,
    /// Truncate to this many tokens (rows whose images would be cut are skipped).
    pub max_length: Option<usize>,
    pub pad_to_multiple_of: Option<usize>,
    /// Tokenizer special tokens (BOS); default true as `processor(text, images)`; TRL passes false.
    pub add_special_tokens: bool,
}

impl Default for CollatorConfig {
    fn default() -> Self {
        CollatorConfig { label_mask: LabelMask::Pad, max_length: None, pad_to_multiple_of: None, add_special_tokens: true }
    }
}

/// One example ready for collation.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Global index of the row in its split (before shuffling).
    pub index: usize,
    pub encoded: Encoded,
    pub pixel_values: Vec<PixelValues>,
}

/// Outcome of truncating one example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    Fits,
    Truncated,
    /// The cut would go through an image's tokens: the row must be skipped.
    CutsImage,
}

/// Checks `max_length` against an example and truncates it in place when that is safe.
pub fn truncate(ex: &mut Encoded, max_length: Option<usize>) -> Truncation {
    let Some(max) = max_length else { return Truncation::Fits };
    if ex.input_ids.len() <= max {
        return Truncation::Fits;
    }
    if ex.image_spans.iter().any(|&(_, e)| e > max) {
        return Truncation::CutsImage;
    }
    ex.input_ids.truncate(max);
    if let Some(m) = ex.assistant_mask.as_mut() {
        m.truncate(max);
    }
    Truncation::Truncated
}

/// A padded batch, plain row-major buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// `[batch_size, seq_len]`
    pub input_ids: Vec<i64>,
    /// `[batch_size, seq_len]`
    pub attention_mask: Vec<i64>,
    /// `[batch_size, seq_len]`
    pub labels: Vec<i64>,
    /// `[n_images, 3, image_hw.0, image_hw.1]`, images in row order.
    pub pixel_values: Vec<f32>,
    pub n_images: usize,
    pub image_hw: (usize, usize),
    /// Row index (in the split) of each batch row.
    pub rows: Vec<usize>,
    /// Number of labels that are not -100.
    pub n_label_tokens: usize,
    /// True when every label is -100 (nothing to train on): report it, don't train silently.
    pub all_labels_masked: bool,
}

impl Batch {
    pub fn row_ids(&self, b: usize) -> &[i64] {
        &self.input_ids[b * self.seq_len..(b + 1) * self.seq_len]
    }
    pub fn row_labels(&self, b: usize) -> &[i64] {
        &self.labels[b * self.seq_len..(b + 1) * self.seq_len]
    }
    pub fn row_attention(&self, b: usize) -> &[i64] {
        &self.attention_mask[b * self.seq_len..(b + 1) * self.seq_len]
    }
}

/// Labels of one (unpadded) example under a mask mode.
pub fn example_labels(enc: &Encoded, mode: LabelMask, image_token_id: u32) -> Vec<i64> {
    let mut labels: Vec<i64> = enc.input_ids.iter().map(|&t| t as i64).collect();
    match mode {
        LabelMask::Pad => {}
        LabelMask::PadImage => {
            for (l, &t) in labels.iter_mut().zip(&enc.input_ids) {
                if t == image_token_id {
                    *l = IGNORE_INDEX;
                }
            }
        }
        LabelMask::Assistant => {
            match &enc.assistant_mask {
                Some(m) => {
                    for (l, &keep) in labels.iter_mut().zip(m) {
                        if !keep {
                            *l = IGNORE_INDEX;
                        }
                    }
                }
                None => labels.iter_mut().for_each(|l| *l = IGNORE_INDEX),
            }
            // Image tokens never lie inside generation spans; mask them regardless.
            for (l, &t) in labels.iter_mut().zip(&enc.input_ids) {
                if t == image_token_id {
                    *l = IGNORE_INDEX;
                }
            }
        }
    }
    labels
}

/// Pads and stacks examples (already truncated) into a batch.
pub fn collate(examples: &[Example], cfg: &CollatorConfig, pad_token_id: u32, image_token_id: u32) -> Batch {
    let mut n_images = 0;
    let mut image_hw = (0, 0);
    for e in examples {
        for p in &e.pixel_values {
            n_images += 1;
            image_hw = (p.height, p.width);
        }
    }
    let mut pixel_values = Vec::with_capacity(n_images * 3 * image_hw.0 * image_hw.1);
    for e in examples {
        for p in &e.pixel_values {
            assert_eq!((p.height, p.width), image_hw, "all images of a batch must have the same size");
            pixel_values.extend_from_slice(&p.data);
        }
    }
    let text: Vec<(usize, &Encoded)> = examples.iter().map(|e| (e.index, &e.encoded)).collect();
    collate_text(&text, cfg, pad_token_id, image_token_id, pixel_values, n_images, image_hw)
}

/// Pads token sequences into a batch around already stacked `pixel_values`.
pub fn collate_text(
    rows: &[(usize, &Encoded)],
    cfg: &CollatorConfig,
    pad_token_id: u32,
    image_token_id: u32,
    pixel_values: Vec<f32>,
    n_images: usize,
    image_hw: (usize, usize),
) -> Batch {
    let bsz = rows.len();
    let longest = rows.iter().map(|e| e.1.input_ids.len()).max().unwrap_or(0);
    let seq_len = match cfg.pad_to_multiple_of {
        Some(m) if m > 0 => longest.div_ceil(m) * m,
        _ => longest,
    };
    let mut input_ids = vec![pad_token_id as i64; bsz * seq_len];
    let mut attention_mask = vec![0i64; bsz * seq_len];
    let mut labels = vec![IGNORE_INDEX; bsz * seq_len];
    let mut n_label_tokens = 0;
    for (b, (_, enc)) in rows.iter().enumerate() {
        let row = b * seq_len;
        for (k, &t) in enc.input_ids.iter().enumerate() {
            input_ids[row + k] = t as i64;
            attention_mask[row + k] = 1;
        }
        let l = example_labels(enc, cfg.label_mask, image_token_id);
        for (k, v) in l.into_iter().enumerate() {
            if v != IGNORE_INDEX {
                n_label_tokens += 1;
            }
            labels[row + k] = v;
        }
    }
    Batch {
        batch_size: bsz,
        seq_len,
        input_ids,
        attention_mask,
        labels,
        pixel_values,
        n_images,
        image_hw,
        rows: rows.iter().map(|e| e.0).collect(),
        n_label_tokens,
        all_labels_masked: n_label_tokens == 0,
    }
}
