//! Collation: right padding, optional padding to a multiple, truncation that never cuts an
//! image, and the label masks of TRL / the HF VLM blog.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result as DataResult};
use crate::template::Encoded;

/// Most tokens in one padded batch (batch size × padded length): the collator's three
/// `[batch, seq]` buffers then take at most 384 MiB.
pub const MAX_BATCH_TOKENS: usize = 1 << 24;
/// Largest `data.pad_to_multiple_of` (real values are 8 to 128; no model here takes
/// sequences this long).
pub const MAX_PAD_TO_MULTIPLE_OF: usize = 1 << 16;

/// Label id ignored by the loss.
pub const IGNORE_INDEX: i64 = -100;

/// Which tokens are trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LabelMask {
    /// labels = input_ids, pad positions -100 (TRL 1.16's default, the blog's LLavaDataCollator).
    #[default]
    #[serde(rename = "pad")]
    Pad,
    /// Also image tokens -100, with the vision wrappers around them (Qwen's
    /// `<|vision_start|>` / `<|vision_end|>`).
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

impl CollatorConfig {
    /// Refuses settings no batch can honour, naming the recipe key.
    pub fn validate(&self) -> DataResult<()> {
        match self.pad_to_multiple_of {
            Some(m) if m > MAX_PAD_TO_MULTIPLE_OF => Err(DataError::Setting {
                key: "data.pad_to_multiple_of",
                msg: format!("{m} is larger than the {MAX_PAD_TO_MULTIPLE_OF} allowed (typical values are 8 to 128)"),
            }),
            _ => Ok(()),
        }
    }

    /// The length `longest` tokens are padded to, if a batch of `rows` rows of that length
    /// stays within `MAX_BATCH_TOKENS`.
    pub fn padded_len(&self, rows: usize, longest: usize) -> DataResult<usize> {
        let padded = match self.pad_to_multiple_of {
            Some(m) if m > 0 => longest.div_ceil(m).checked_mul(m),
            _ => Some(longest),
        };
        match padded.filter(|&len| len.checked_mul(rows).is_some_and(|t| t <= MAX_BATCH_TOKENS)) {
            Some(len) => Ok(len),
            None if self.pad_to_multiple_of.is_some_and(|m| m > 1) && longest.saturating_mul(rows) <= MAX_BATCH_TOKENS => Err(DataError::Setting {
                key: "data.pad_to_multiple_of",
                msg: format!(
                    "padding {rows} rows of up to {longest} tokens to a multiple of {} exceeds the {MAX_BATCH_TOKENS} tokens a batch may hold",
                    self.pad_to_multiple_of.unwrap_or(0)
                ),
            }),
            None => Err(DataError::Setting {
                key: "data.max_length",
                msg: format!("a batch of {rows} rows of up to {longest} tokens exceeds the {MAX_BATCH_TOKENS} tokens a batch may hold: set a smaller max_length or batch size"),
            }),
        }
    }
}

impl Default for CollatorConfig {
    fn default() -> Self {
        CollatorConfig { label_mask: LabelMask::Pad, max_length: None, pad_to_multiple_of: None, add_special_tokens: true }
    }
}

/// What the model needs to know about one image besides its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageMeta {
    /// Original (height, width) before any resize: transformers' `image_sizes`.
    pub original_hw: (usize, usize),
    /// Leading-axis entries of `pixel_values` this image occupies: 1 for CLIP, 1 + gh·gw tiles
    /// for LLaVA-NeXT, gh·gw patch rows for Qwen2-VL.
    pub units: usize,
    /// (t, h, w) grid: LLaVA-NeXT (1, gh, gw) = best resolution / tile size (base tile not
    /// counted); Qwen2-VL (1, gh, gw) = resized size / patch size (`image_grid_thw`); CLIP (1, 1, 1).
    pub grid: (usize, usize, usize),
    /// Image tokens this image becomes in input_ids.
    pub tokens: usize,
}

/// The images of a batch (or of one example), in row order, as the family's processor laid them out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageBatch {
    pub pixel_values: Vec<f32>,
    /// Shape of `pixel_values`: `[Σ units, 3, H, W]` (CLIP-style towers: LLaVA, LLaVA-NeXT) or
    /// `[Σ patches, 1176]` (Qwen2-VL: `C·T·p·p` values per patch row, every image's rows in
    /// merge-block order, images concatenated). LLaVA-NeXT tiles are not padded to a batch
    /// maximum here (the model drops padding tiles anyway); see [`ImageBatch::padded_tiles`]
    /// for transformers' padded layout. Empty for `ImageBatch::default()`; `[0, ..unit]` for a
    /// processed example without images.
    pub shape: Vec<usize>,
    pub meta: Vec<ImageMeta>,
}

impl ImageBatch {
    /// An empty batch whose units are `[3, h, w]` images.
    pub fn empty(unit_hw: (usize, usize)) -> Self {
        Self::empty_units(&[3, unit_hw.0, unit_hw.1])
    }

    /// An empty batch whose units have shape `unit` (`[3, H, W]`, or `[1176]` for Qwen2-VL).
    pub fn empty_units(unit: &[usize]) -> Self {
        let mut shape = Vec::with_capacity(1 + unit.len());
        shape.push(0);
        shape.extend_from_slice(unit);
        ImageBatch { pixel_values: Vec::new(), shape, meta: Vec::new() }
    }

    pub fn n_images(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Σ units: the leading axis of `pixel_values`.
    pub fn n_units(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Shape of one unit: `shape[1..]` (empty when unknown).
    pub fn unit_shape(&self) -> &[usize] {
        self.shape.get(1..).unwrap_or(&[])
    }

    /// (height, width) of one unit (tile / image) for `[N, 3, H, W]` layouts; (0, 0) when
    /// unknown or for the 2-D patch layout of Qwen2-VL.
    pub fn unit_hw(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [_, _, h, w] => (*h, *w),
            _ => (0, 0),
        }
    }

    /// f32 values of one unit (the product of `unit_shape()`; 0 when unknown).
    pub fn unit_len(&self) -> usize {
        let u = self.unit_shape();
        if u.is_empty() {
            0
        } else {
            u.iter().product()
        }
    }

    /// Original (height, width) of each image: transformers' `image_sizes`.
    pub fn image_sizes(&self) -> Vec<(usize, usize)> {
        self.meta.iter().map(|m| m.original_hw).collect()
    }

    /// `(t, h, w)` grid of each image: transformers' `image_grid_thw` for Qwen2-VL (patch
    /// units), `(1, gh, gw)` tiles for LLaVA-NeXT, `(1, 1, 1)` for LLaVA.
    pub fn grid_thw(&self) -> Vec<(usize, usize, usize)> {
        self.meta.iter().map(|m| m.grid).collect()
    }

    /// Image tokens of all images.
    pub fn total_tokens(&self) -> usize {
        self.meta.iter().map(|m| m.tokens).sum()
    }

    /// Range of units of image `i` along the leading axis.
    pub fn unit_range(&self, i: usize) -> std::ops::Range<usize> {
        let start: usize = self.meta[..i].iter().map(|m| m.units).sum();
        start..start + self.meta[i].units
    }

    /// The pixel values of image `i` (its `units` units).
    pub fn image_pixels(&self, i: usize) -> &[f32] {
        let r = self.unit_range(i);
        let n = self.unit_len();
        &self.pixel_values[r.start * n..r.end * n]
    }

    /// Appends the images of `other` (same unit shape; an empty part of any shape is fine).
    pub fn extend(&mut self, other: &ImageBatch) {
        if other.n_units() == 0 && other.meta.is_empty() {
            if self.shape.is_empty() {
                self.shape = other.shape.clone();
            }
            return;
        }
        if self.n_units() == 0 && self.meta.is_empty() {
            self.shape = other.shape.clone();
            self.shape[0] = 0;
        } else {
            assert_eq!(self.unit_shape(), other.unit_shape(), "all images of a batch must have the same unit shape");
        }
        self.pixel_values.extend_from_slice(&other.pixel_values);
        self.shape[0] += other.n_units();
        self.meta.extend_from_slice(&other.meta);
    }

    /// Concatenation of parts, in order.
    pub fn concat<'a>(parts: impl IntoIterator<Item = &'a ImageBatch>) -> ImageBatch {
        let mut out = ImageBatch::default();
        for p in parts {
            out.extend(p);
        }
        out
    }

    /// transformers' batch layout: `[n_images, max units, 3, H, W]`, each image's units
    /// followed by zero units up to the batch maximum (LLaVA-NeXT's `do_pad`). For `[N, 3, H, W]`
    /// layouts only (Qwen2-VL's patch rows are never padded: use `pixel_values` as is).
    pub fn padded_tiles(&self) -> (Vec<f32>, [usize; 5]) {
        let (h, w) = self.unit_hw();
        let max = self.meta.iter().map(|m| m.units).max().unwrap_or(0);
        let n = self.unit_len();
        let shape = [self.n_images(), max, 3, h, w];
        let mut out = vec![0f32; self.n_images() * max * n];
        let mut src = 0;
        for (i, m) in self.meta.iter().enumerate() {
            let len = m.units * n;
            out[i * max * n..i * max * n + len].copy_from_slice(&self.pixel_values[src..src + len]);
            src += len;
        }
        (out, shape)
    }
}

/// One example ready for collation.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Global index of the row in its split (before shuffling).
    pub index: usize,
    pub encoded: Encoded,
    /// The row's images, preprocessed by the model family's processor.
    pub images: ImageBatch,
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
    if ex.image_spans.iter().chain(&ex.vision_spans).any(|&(_, e)| e > max) {
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
    /// The images of all rows, in row order.
    pub images: ImageBatch,
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
            mask_vision_spans(&mut labels, enc);
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
            mask_vision_spans(&mut labels, enc);
        }
    }
    labels
}

/// Masks each image's tokens with their `<|vision_start|>` / `<|vision_end|>` wrappers.
fn mask_vision_spans(labels: &mut [i64], enc: &Encoded) {
    let n = labels.len();
    for &(s, e) in &enc.vision_spans {
        for l in &mut labels[s.min(n)..e.min(n)] {
            *l = IGNORE_INDEX;
        }
    }
}

/// Pads and stacks examples (already truncated) into a batch; images are concatenated.
/// Fails when the padded batch would exceed `MAX_BATCH_TOKENS`.
pub fn collate(examples: &[Example], cfg: &CollatorConfig, pad_token_id: u32, image_token_id: u32) -> DataResult<Batch> {
    let images = ImageBatch::concat(examples.iter().map(|e| &e.images));
    let text: Vec<(usize, &Encoded)> = examples.iter().map(|e| (e.index, &e.encoded)).collect();
    collate_text(&text, cfg, pad_token_id, image_token_id, images)
}

/// Pads token sequences into a batch around already concatenated images.
pub fn collate_text(rows: &[(usize, &Encoded)], cfg: &CollatorConfig, pad_token_id: u32, image_token_id: u32, images: ImageBatch) -> DataResult<Batch> {
    let bsz = rows.len();
    let longest = rows.iter().map(|e| e.1.input_ids.len()).max().unwrap_or(0);
    let seq_len = cfg.padded_len(bsz, longest)?;
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
    Ok(Batch {
        batch_size: bsz,
        seq_len,
        input_ids,
        attention_mask,
        labels,
        images,
        rows: rows.iter().map(|e| e.0).collect(),
        n_label_tokens,
        all_labels_masked: n_label_tokens == 0,
    })
}
