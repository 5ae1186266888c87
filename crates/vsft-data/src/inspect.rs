//! Entry points for `vsft data inspect` and the dataset summary.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::collator::{example_labels, CollatorConfig, LabelMask, IGNORE_INDEX};
use crate::dataset::{open_dataset, OnBadRow, SkipStats};
use crate::error::Result;
use crate::family::ProcessorOverrides;
use crate::guard::{read_row, row_guard};
use crate::pipeline::Processor;

/// Options shared by `inspect` and `summarize`.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    pub model_dir: PathBuf,
    /// Parquet file / directory / glob, or a LLaVA `.json`.
    pub data: String,
    /// `train` / `test` (parquet in the hub layout); `None` = all files.
    pub split: Option<String>,
    /// Image folder for LLaVA JSON (default: the JSON's directory).
    pub image_root: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    pub label_mask: LabelMask,
    pub add_special_tokens: bool,
    pub max_length: Option<usize>,
    /// Rows to look at (`None` = all).
    pub limit: Option<usize>,
    /// `Error` (the default): stop at the first bad row with its error; `Skip`: count bad rows.
    pub on_bad_row: OnBadRow,
    /// `data.min_pixels` / `data.max_pixels` (Qwen2-VL), to see their effect on the summary.
    pub overrides: ProcessorOverrides,
}

impl InspectOptions {
    pub fn new(model_dir: impl Into<PathBuf>, data: impl Into<String>) -> Self {
        InspectOptions {
            model_dir: model_dir.into(),
            data: data.into(),
            split: None,
            image_root: None,
            chat_template: None,
            label_mask: LabelMask::Pad,
            add_special_tokens: true,
            max_length: None,
            limit: None,
            on_bad_row: OnBadRow::Error,
            overrides: ProcessorOverrides::default(),
        }
    }

    fn collator(&self) -> CollatorConfig {
        CollatorConfig { label_mask: self.label_mask, max_length: self.max_length, pad_to_multiple_of: None, add_special_tokens: self.add_special_tokens }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageStat {
    pub pixel_mean: f64,
    pub pixel_abs_mean: f64,
    /// Original (height, width).
    pub height: usize,
    pub width: usize,
    /// Units (tiles) in `pixel_values` and `<image>` tokens.
    pub units: usize,
    pub tokens: usize,
}

impl ImageStat {
    /// Statistics of every image of an `ImageBatch`.
    pub fn of_batch(images: &crate::collator::ImageBatch) -> Vec<ImageStat> {
        images
            .meta
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let px = images.image_pixels(i);
                let n = px.len().max(1) as f64;
                ImageStat {
                    pixel_mean: px.iter().map(|&v| v as f64).sum::<f64>() / n,
                    pixel_abs_mean: px.iter().map(|&v| v.abs() as f64).sum::<f64>() / n,
                    height: m.original_hw.0,
                    width: m.original_hw.1,
                    units: m.units,
                    tokens: m.tokens,
                }
            })
            .collect()
    }
}

/// One inspected example.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InspectedExample {
    pub index: usize,
    /// Rendered chat text (before `<image>` expansion).
    pub text: String,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub images: Vec<ImageStat>,
    /// Text with trained spans in `[[...]]` and image runs as `<image>×N`.
    #[serde(skip)]
    pub marked: String,
    #[serde(skip)]
    pub source: String,
}

impl InspectedExample {
    pub fn n_tokens(&self) -> usize {
        self.input_ids.len()
    }
    pub fn n_trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
    /// `{"index","text","input_ids","labels","images":[{"pixel_mean","pixel_abs_mean","height","width","units","tokens"}]}`
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("serialisable")
    }
    /// Human-readable block.
    pub fn to_text(&self) -> String {
        format!(
            "=== example {} ({})\ntokens: {}  trained: {}  images: {}\n{}\n",
            self.index,
            self.source,
            self.n_tokens(),
            self.n_trained(),
            self.images.len(),
            self.marked
        )
    }
}

/// Decodes runs of tokens, marking trained runs with `[[`/`]]` and collapsing image runs.
pub fn mark_trained(processor: &Processor, ids: &[i64], labels: &[i64]) -> String {
    let tok = &processor.text.tokenizer;
    let img = processor.text.image_token_id as i64;
    let mut out = String::new();
    let mut k = 0;
    while k < ids.len() {
        let trained = labels[k] != IGNORE_INDEX;
        let is_img = ids[k] == img;
        let mut e = k + 1;
        while e < ids.len() && (labels[e] != IGNORE_INDEX) == trained && (ids[e] == img) == is_img {
            e += 1;
        }
        let piece = if is_img {
            format!("{}×{}", processor.text.image.image_token, e - k)
        } else {
            let run: Vec<u32> = ids[k..e].iter().map(|&t| t as u32).collect();
            // Decode with one leading context token so that a leading space survives.
            tok.decode(&run, false).unwrap_or_else(|_| format!("{run:?}"))
        };
        if trained {
            out.push_str("[[");
            out.push_str(&piece);
            out.push_str("]]");
        } else {
            out.push_str(&piece);
        }
        k = e;
    }
    out
}

/// Renders, tokenizes and masks the first `limit` rows (in file order).
pub fn inspect(opts: &InspectOptions) -> Result<(Vec<InspectedExample>, SkipStats)> {
    let processor = Processor::from_model_dir_with(&opts.model_dir, opts.chat_template.as_deref(), &opts.overrides)?;
    inspect_with(&processor, opts)
}

pub fn inspect_with(processor: &Processor, opts: &InspectOptions) -> Result<(Vec<InspectedExample>, SkipStats)> {
    let mut source = open_dataset(&opts.data, opts.split.as_deref(), opts.image_root.as_deref())?;
    let cfg = opts.collator();
    let n = opts.limit.unwrap_or(usize::MAX).min(source.len());
    let mut out = Vec::new();
    let mut skipped = SkipStats::default();
    for i in 0..n {
        let r = read_row(source.as_mut(), i).and_then(|row| {
            let src = format!("{}:{}", row.file.display(), row.file_row);
            row_guard(&row, || processor.process_row(&row, &cfg)).map(|ex| (ex, src))
        });
        match r {
            Ok((ex, src)) => {
                let labels = example_labels(&ex.encoded, cfg.label_mask, processor.text.image_token_id);
                let ids: Vec<i64> = ex.encoded.input_ids.iter().map(|&t| t as i64).collect();
                let marked = mark_trained(processor, &ids, &labels);
                out.push(InspectedExample {
                    index: i,
                    text: ex.encoded.text.clone(),
                    input_ids: ids,
                    labels,
                    images: ImageStat::of_batch(&ex.images),
                    marked,
                    source: src,
                });
            }
            Err(e) if opts.on_bad_row == OnBadRow::Skip && e.bad_row_kind().is_some() => skipped.record(&e),
            Err(e) => return Err(e),
        }
    }
    Ok((out, skipped))
}

/// Dataset summary: rows, images, token-length percentiles, skipped rows and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub rows: usize,
    pub rows_ok: usize,
    pub images: usize,
    pub tokens_total: usize,
    pub trained_tokens_total: usize,
    /// (percentile, tokens) for 0, 50, 90, 95, 99, 100.
    pub length_percentiles: Vec<(u32, usize)>,
    /// Image tokens of all rows.
    pub image_tokens_total: usize,
    /// Rows with at least one image.
    pub rows_with_images: usize,
    /// (percentile, image tokens per row) for 0, 50, 90, 95, 99, 100, over the rows with
    /// images: what `max_length` and, for Qwen2-VL, `data.max_pixels` must accommodate.
    pub image_tokens_percentiles: Vec<(u32, usize)>,
    /// Most image tokens of one image.
    pub max_image_tokens_per_image: usize,
    #[serde(serialize_with = "ser_skips")]
    pub skipped: SkipStats,
}

fn ser_skips<S: serde::Serializer>(s: &SkipStats, ser: S) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = ser.serialize_map(Some(s.counts.len()))?;
    for (k, v) in &s.counts {
        m.serialize_entry(k.as_str(), v)?;
    }
    m.end()
}

impl Summary {
    pub fn to_text(&self) -> String {
        let pct = |v: &[(u32, usize)]| v.iter().map(|(q, v)| format!("p{q}={v}")).collect::<Vec<_>>().join(" ");
        format!(
            "rows: {} ({} ok, {} skipped)\nimages: {}\ntokens: {} (trained {})\nlength: {}\nimage tokens/row: {} ({} rows with images; total {}, at most {} per image)\nskipped: {}\n",
            self.rows,
            self.rows_ok,
            self.skipped.total(),
            self.images,
            self.tokens_total,
            self.trained_tokens_total,
            pct(&self.length_percentiles),
            pct(&self.image_tokens_percentiles),
            self.rows_with_images,
            self.image_tokens_total,
            self.max_image_tokens_per_image,
            self.skipped.report()
        )
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[usize], q: u32) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q as f64 / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Processes every row (or `limit`) on `workers` threads and summarises. Bad rows are
/// counted (with `on_bad_row = error` the first one is returned as the error).
pub fn summarize(opts: &InspectOptions, workers: usize) -> Result<Summary> {
    let processor = Arc::new(Processor::from_model_dir_with(&opts.model_dir, opts.chat_template.as_deref(), &opts.overrides)?);
    let source = open_dataset(&opts.data, opts.split.as_deref(), opts.image_root.as_deref())?;
    let rows = opts.limit.unwrap_or(usize::MAX).min(source.len());
    let cfg = crate::loader::LoaderConfig {
        batch_size: 1,
        collator: opts.collator(),
        shuffle: false,
        shuffle_window: 1,
        num_workers: workers,
        prefetch: 8,
        on_bad_row: opts.on_bad_row,
        drop_last: false,
        shard: Default::default(),
    };
    let loader = crate::loader::DataLoader::try_new(source, processor, cfg, crate::dataset::Cursor::default())?;
    let mut lens = Vec::new();
    let mut image_tokens = Vec::new();
    let mut max_per_image = 0;
    let mut images = 0;
    let mut trained = 0;
    let mut loader = loader;
    loop {
        if lens.len() + loader.skipped().total() >= rows {
            break;
        }
        match loader.next() {
            None => break,
            Some(Ok(b)) => {
                lens.push(b.seq_len);
                images += b.images.n_images();
                if !b.images.is_empty() {
                    image_tokens.push(b.images.total_tokens());
                    max_per_image = max_per_image.max(b.images.meta.iter().map(|m| m.tokens).max().unwrap_or(0));
                }
                trained += b.n_label_tokens;
            }
            Some(Err(e)) => return Err(e),
        }
    }
    let skipped = loader.skipped().clone();
    let tokens_total = lens.iter().sum();
    lens.sort_unstable();
    let image_tokens_total = image_tokens.iter().sum();
    image_tokens.sort_unstable();
    const Q: [u32; 6] = [0, 50, 90, 95, 99, 100];
    Ok(Summary {
        rows: lens.len() + skipped.total(),
        rows_ok: lens.len(),
        images,
        tokens_total,
        trained_tokens_total: trained,
        length_percentiles: Q.iter().map(|&q| (q, percentile(&lens, q))).collect(),
        image_tokens_total,
        rows_with_images: image_tokens.len(),
        image_tokens_percentiles: Q.iter().map(|&q| (q, percentile(&image_tokens, q))).collect(),
        max_image_tokens_per_image: max_per_image,
        skipped,
    })
}
