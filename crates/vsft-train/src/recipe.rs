//! TOML recipes: the whole training run in one file that reads top to bottom.
//!
//! Validated once, on load, key by key ([`KNOWN_KEYS`] for the types, [`LIMITS`] for the
//! ranges): an unknown key is an error that suggests the nearest known one; a value of the wrong
//! type or out of range names the dotted key, what is allowed and what was found; a syntax error
//! gives the line and column. `--set section.key=value` overrides any key and is checked the
//! same way. The resolved recipe is written to `output_dir/recipe.toml`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vsft_model::lora::TargetModules;

use crate::error::{read_text_limited, TrainError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub hub: HubSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Local Hugging Face model directory or Hub id.
    pub path: String,
    /// Compute dtype: `float32` (CPU), `bfloat16` (frozen weights on GPU).
    #[serde(default = "d::dtype")]
    pub dtype: String,
    /// Start the projector from a stage-1 checkpoint (a checkpoint directory or its
    /// `projector.safetensors`), as LLaVA's stage 2 does.
    #[serde(default)]
    pub projector: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Parquet file, directory, glob, LLaVA JSON file, or Hub dataset id.
    pub train: String,
    #[serde(default)]
    pub eval: Option<String>,
    /// Folder of images for LLaVA JSON datasets.
    #[serde(default)]
    pub image_folder: Option<String>,
    #[serde(default = "d::max_length")]
    pub max_length: usize,
    #[serde(default = "d::label_mask")]
    pub label_mask: String,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default = "d::yes")]
    pub add_special_tokens: bool,
    #[serde(default = "d::on_bad_row")]
    pub on_bad_row: String,
    #[serde(default = "d::num_workers")]
    pub num_workers: usize,
    #[serde(default)]
    pub pad_to_multiple_of: Option<usize>,
    /// Qwen2-VL's image budget: images are resized to at least / at most this many pixels
    /// (defaults: the model's processor files). Fewer pixels, fewer image tokens.
    #[serde(default)]
    pub min_pixels: Option<u64>,
    #[serde(default)]
    pub max_pixels: Option<u64>,
    /// Images whose header claims more pixels are bad rows (0 or absent: Pillow's
    /// decompression-bomb limit, 2 × 89478485).
    #[serde(default)]
    pub max_image_pixels: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Stage 1: only the projector trains; vision tower and decoder frozen.
    Pretrain,
    /// Stage 2: the projector trains in full and the decoder through LoRA adapters.
    Instruct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Constant,
    Linear,
    Cosine,
}

/// `train.report_to`: one name or a list, as transformers takes it; `jsonl` is always on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReportToNames {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl ReportToNames {
    pub fn is_unset(&self) -> bool {
        *self == ReportToNames::None
    }

    /// The sinks, `jsonl` first; an unknown or cloud tracker is refused with what is allowed.
    pub fn parsed(&self) -> Result<Vec<vsft_track::ReportTo>, String> {
        let names: Vec<&str> = match self {
            ReportToNames::None => vec![],
            ReportToNames::One(n) => vec![n.as_str()],
            ReportToNames::Many(v) => v.iter().map(String::as_str).collect(),
        };
        let mut out = vec![vsft_track::ReportTo::Jsonl];
        for n in names.into_iter().filter(|n| !matches!(*n, "none" | "jsonl")) {
            out.push(vsft_track::ReportTo::parse(n).map_err(|e| format!("train.report_to: {e}"))?);
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub stage: Stage,
    pub output_dir: String,
    #[serde(default = "d::one")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (0 = run the epochs).
    #[serde(default)]
    pub max_steps: usize,
    #[serde(default = "d::one")]
    pub batch_size: usize,
    #[serde(default = "d::one")]
    pub grad_accum: usize,
    pub lr: f64,
    /// Learning rate of the projector in the instruct stage (defaults to `lr`).
    #[serde(default)]
    pub projector_lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d::beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d::beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d::eps")]
    pub adam_eps: f64,
    #[serde(default = "d::scheduler")]
    pub scheduler: Scheduler,
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Overrides `warmup_ratio` when > 0.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Global gradient-norm clipping; 0 disables.
    #[serde(default = "d::max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "d::seed")]
    pub seed: u64,
    #[serde(default = "d::yes")]
    pub shuffle: bool,
    #[serde(default = "d::log_steps")]
    pub log_steps: usize,
    /// 0 = no evaluation during training.
    #[serde(default)]
    pub eval_steps: usize,
    /// 0 = only the final checkpoint.
    #[serde(default)]
    pub save_steps: usize,
    /// Keep at most this many checkpoints (0 = keep all).
    #[serde(default)]
    pub save_total_limit: usize,
    /// What a NaN/inf loss does: `error` stops naming the step, `skip` drops the step.
    #[serde(default = "d::on_nan")]
    pub on_nan: String,
    /// Where metrics go besides `metrics.jsonl`: `"tensorboard"` (event files under
    /// `output_dir/runs/`), as transformers' `report_to`; cloud trackers are not built in.
    #[serde(default, skip_serializing_if = "ReportToNames::is_unset")]
    pub report_to: ReportToNames,
    /// Keep only each decoder layer's input in the forward and re-run the layers one at a time
    /// in backward: activation memory of one layer instead of all, for one more forward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Keep the vision tower frozen (LLaVA's stages, LLaMA-Factory's `freeze_vision_tower`).
    /// `false` trains it in full at `vision_lr`, with a graph through it.
    #[serde(default = "d::yes")]
    pub freeze_vision_tower: bool,
    /// Learning rate of the vision tower's trained parameters (its weights when it is unfrozen,
    /// its LoRA adapters when `lora.target_modules` names it); defaults to `lr`.
    #[serde(default)]
    pub vision_lr: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "d::lora_r")]
    pub r: usize,
    #[serde(default = "d::lora_alpha")]
    pub alpha: f64,
    #[serde(default = "d::lora_dropout")]
    pub dropout: f64,
    /// Suffixes (list) or a regex (string) over language-model module names.
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: d::lora_r(),
            alpha: d::lora_alpha(),
            dropout: d::lora_dropout(),
            target_modules: TargetModules::default(),
            rslora: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    /// Push the adapter to this repo at the end of training.
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub private: bool,
    /// Also push every checkpoint.
    #[serde(default)]
    pub push_checkpoints: bool,
}

mod d {
    use super::*;
    pub fn dtype() -> String { "float32".into() }
    pub fn max_length() -> usize { 2048 }
    pub fn label_mask() -> String { "pad".into() }
    pub fn yes() -> bool { true }
    pub fn on_bad_row() -> String { "error".into() }
    pub fn num_workers() -> usize { 2 }
    pub fn one() -> usize { 1 }
    pub fn beta1() -> f64 { 0.9 }
    pub fn beta2() -> f64 { 0.999 }
    pub fn eps() -> f64 { 1e-8 }
    pub fn scheduler() -> Scheduler { Scheduler::Constant }
    pub fn max_grad_norm() -> f64 { 1.0 }
    pub fn seed() -> u64 { 42 }
    pub fn log_steps() -> usize { 10 }
    pub fn on_nan() -> String { "error".into() }
    pub fn lora_r() -> usize { 8 }
    pub fn lora_alpha() -> f64 { 16.0 }
    pub fn lora_dropout() -> f64 { 0.05 }
    pub fn ge_limit() -> usize { 100 }
    pub fn ge_show() -> usize { 5 }
    pub fn ge_tokens() -> usize { 8 }
}

/// Every key a recipe may hold, with the type it takes (for suggestions and type errors).
pub const KNOWN_KEYS: &[(&str, &[(&str, &str)])] = &[
    ("model", &[("path", "string"), ("dtype", "string"), ("projector", "string")]),
    (
        "data",
        &[
            ("train", "string"), ("eval", "string"), ("image_folder", "string"), ("max_length", "integer"),
            ("label_mask", "string"), ("chat_template", "string"), ("add_special_tokens", "boolean"),
            ("on_bad_row", "string"), ("num_workers", "integer"), ("pad_to_multiple_of", "integer"),
            ("min_pixels", "integer"), ("max_pixels", "integer"), ("max_image_pixels", "integer"),
        ],
    ),
    (
        "train",
        &[
            ("stage", "string"), ("output_dir", "string"), ("epochs", "integer"), ("max_steps", "integer"),
            ("batch_size", "integer"), ("grad_accum", "integer"), ("lr", "float"), ("projector_lr", "float"),
            ("weight_decay", "float"), ("adam_beta1", "float"), ("adam_beta2", "float"), ("adam_eps", "float"),
            ("scheduler", "string"), ("warmup_ratio", "float"), ("warmup_steps", "integer"),
            ("max_grad_norm", "float"), ("seed", "integer"), ("shuffle", "boolean"), ("log_steps", "integer"),
            ("eval_steps", "integer"), ("save_steps", "integer"), ("save_total_limit", "integer"),
            ("on_nan", "string"), ("gradient_checkpointing", "boolean"),
            ("freeze_vision_tower", "boolean"), ("vision_lr", "float"), ("report_to", "list or string"),
        ],
    ),
    ("lora", &[("r", "integer"), ("alpha", "float"), ("dropout", "float"), ("target_modules", "list or string"), ("rslora", "boolean")]),
    ("hub", &[("repo", "string"), ("private", "boolean"), ("push_checkpoints", "boolean")]),
];

/// Keys of the optional `[generate_eval]` section, with their types.
pub const GENERATE_EVAL_KEYS: &[(&str, &str)] =
    &[("data", "string"), ("limit", "integer"), ("show", "integer"), ("max_new_tokens", "integer")];

/// The largest recipe file read: a recipe is a short text file.
pub const MAX_RECIPE_BYTES: u64 = vsft_data::guard::MAX_CONFIG_FILE_BYTES;

/// What a key allows, beyond its type in [`KNOWN_KEYS`]. Checked on the TOML values of the
/// file (and `--set`) before anything runs, so every value out of range is refused with the key,
/// what is allowed and what was found. A key not listed here takes any non-negative integer, any
/// finite float or any non-empty string, by its type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Allowed {
    /// An integer in `min..=max`.
    Int(i64, i64),
    /// A finite float between `lo` and `hi`, each bound inclusive or not.
    Float { lo: f64, lo_inclusive: bool, hi: f64, hi_inclusive: bool },
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// A non-empty string.
    NonEmpty,
}

/// Steps, epochs and counts beyond this are no training run anyone means; the bound also
/// keeps every product of them far from overflow.
const MAX_COUNT: i64 = 1_000_000_000;

const fn positive_float() -> Allowed {
    Allowed::Float { lo: 0.0, lo_inclusive: false, hi: f64::MAX, hi_inclusive: true }
}
const fn non_negative_float(hi: f64) -> Allowed {
    Allowed::Float { lo: 0.0, lo_inclusive: true, hi, hi_inclusive: true }
}
const fn fraction(hi_inclusive: bool) -> Allowed {
    Allowed::Float { lo: 0.0, lo_inclusive: true, hi: 1.0, hi_inclusive }
}

/// Ranges of the numeric keys and the values of the enumerated ones (dotted keys).
pub const LIMITS: &[(&str, Allowed)] = &[
    ("data.max_length", Allowed::Int(1, 1 << 20)),
    ("data.label_mask", Allowed::OneOf(&["pad", "pad+image", "assistant"])),
    ("data.on_bad_row", Allowed::OneOf(&["error", "skip"])),
    ("data.num_workers", Allowed::Int(0, 256)),
    ("data.pad_to_multiple_of", Allowed::Int(1, 4096)),
    ("data.min_pixels", Allowed::Int(1, 1 << 28)),
    ("data.max_pixels", Allowed::Int(1, 1 << 28)),
    ("train.stage", Allowed::OneOf(&["pretrain", "instruct"])),
    ("train.epochs", Allowed::Int(0, 100_000)),
    ("train.max_steps", Allowed::Int(0, MAX_COUNT)),
    ("train.batch_size", Allowed::Int(1, 4096)),
    ("train.grad_accum", Allowed::Int(1, 65_536)),
    ("train.lr", positive_float()),
    ("train.projector_lr", positive_float()),
    ("train.vision_lr", positive_float()),
    ("train.weight_decay", non_negative_float(f64::MAX)),
    ("train.adam_beta1", fraction(false)),
    ("train.adam_beta2", fraction(false)),
    ("train.adam_eps", Allowed::Float { lo: 0.0, lo_inclusive: false, hi: 1.0, hi_inclusive: true }),
    ("train.scheduler", Allowed::OneOf(&["constant", "linear", "cosine"])),
    ("train.warmup_ratio", fraction(true)),
    ("train.warmup_steps", Allowed::Int(0, MAX_COUNT)),
    ("train.max_grad_norm", non_negative_float(f64::MAX)),
    ("train.log_steps", Allowed::Int(1, MAX_COUNT)),
    ("train.eval_steps", Allowed::Int(0, MAX_COUNT)),
    ("train.save_steps", Allowed::Int(0, MAX_COUNT)),
    ("train.save_total_limit", Allowed::Int(0, 1_000_000)),
    ("train.on_nan", Allowed::OneOf(&["error", "skip"])),
    ("lora.r", Allowed::Int(1, 4096)),
    ("lora.alpha", positive_float()),
    ("lora.dropout", fraction(false)),
    ("generate_eval.limit", Allowed::Int(1, MAX_COUNT)),
    ("generate_eval.show", Allowed::Int(0, MAX_COUNT)),
    ("generate_eval.max_new_tokens", Allowed::Int(1, 65_536)),
];

/// What `key` (dotted) of type `ty` allows: its entry in [`LIMITS`], else the default of its type.
fn allowed(key: &str, ty: &str) -> Option<Allowed> {
    LIMITS.iter().find(|(k, _)| *k == key).map(|(_, a)| *a).or(match ty {
        "integer" => Some(Allowed::Int(0, i64::MAX)),
        "float" => Some(Allowed::Float { lo: f64::MIN, lo_inclusive: true, hi: f64::MAX, hi_inclusive: true }),
        "string" => Some(Allowed::NonEmpty),
        _ => None,
    })
}

impl Allowed {
    /// What the key allows, in words.
    fn describe(&self) -> String {
        match *self {
            Allowed::Int(min, i64::MAX) => format!("an integer ≥ {min}"),
            Allowed::Int(min, max) => format!("an integer in {min}..={max}"),
            Allowed::Float { lo, lo_inclusive, hi, hi_inclusive } => match (lo == f64::MIN, hi == f64::MAX) {
                (true, true) => "a finite float".into(),
                (false, true) => format!("a finite float {} {lo}", if lo_inclusive { "≥" } else { ">" }),
                _ => format!("a float in {}{lo}, {hi}{}", if lo_inclusive { "[" } else { "(" }, if hi_inclusive { "]" } else { ")" }),
            },
            Allowed::OneOf(values) => match values {
                [.., last] if values.len() > 1 => {
                    let quoted: Vec<String> = values[..values.len() - 1].iter().map(|v| format!("\"{v}\"")).collect();
                    format!("{} or \"{last}\"", quoted.join(", "))
                }
                _ => values.iter().map(|v| format!("\"{v}\"")).collect(),
            },
            Allowed::NonEmpty => "a non-empty string".into(),
        }
    }

    fn admits(&self, v: &toml::Value) -> bool {
        match (*self, v) {
            (Allowed::Int(min, max), toml::Value::Integer(i)) => (min..=max).contains(i),
            (Allowed::Float { lo, lo_inclusive, hi, hi_inclusive }, v) => {
                let Some(x) = v.as_float().or(v.as_integer().map(|i| i as f64)) else { return false };
                x.is_finite() && (if lo_inclusive { x >= lo } else { x > lo }) && (if hi_inclusive { x <= hi } else { x < hi })
            }
            (Allowed::OneOf(values), toml::Value::String(s)) => values.contains(&s.as_str()),
            (Allowed::NonEmpty, toml::Value::String(s)) => !s.trim().is_empty(),
            _ => false,
        }
    }
}

/// A value as a message shows it: its type when that is not what the key takes, and at most
/// a short excerpt of it.
fn found(v: &toml::Value, type_ok: bool) -> String {
    let shown = crate::error::excerpt(&v.to_string());
    if type_ok {
        shown
    } else {
        format!("{} {shown}", v.type_str())
    }
}

fn type_matches(expected: &str, v: &toml::Value) -> bool {
    match expected {
        "string" => v.is_str(),
        "integer" => v.is_integer(),
        "float" => v.is_float() || v.is_integer(),
        "boolean" => v.is_bool(),
        "list or string" => v.is_str() || v.is_array(),
        _ => true,
    }
}

/// `lora.target_modules`: a non-empty list of non-empty suffixes, or a regex (checked when the
/// recipe is validated).
fn target_modules_ok(v: &toml::Value) -> bool {
    match v {
        toml::Value::String(s) => !s.is_empty(),
        toml::Value::Array(a) => !a.is_empty() && a.iter().all(|x| x.as_str().is_some_and(|s| !s.is_empty())),
        _ => false,
    }
}

/// A problem with one key: the dotted key (or `[section]`) and the message.
type KeyProblem = (String, String);

/// Checks one value against its type and [`LIMITS`].
fn check_value(key: &str, ty: &str, v: &toml::Value) -> Result<(), KeyProblem> {
    let type_ok = type_matches(ty, v);
    let (ok, what) = match ty {
        "boolean" => (type_ok, "true or false".to_string()),
        "list or string" => (
            target_modules_ok(v),
            "a non-empty list of module-name suffixes (e.g. [\"q_proj\", \"v_proj\"]) or a regex string".to_string(),
        ),
        _ => match allowed(key, ty) {
            Some(a) => (type_ok && a.admits(v), a.describe()),
            None => (type_ok, format!("a {ty}")),
        },
    };
    if ok {
        Ok(())
    } else {
        Err((key.to_string(), format!("{key} must be {what}, found {}", found(v, type_ok))))
    }
}

/// Checks a section's keys and values, with suggestions for unknown keys.
fn check_section(section: &str, value: &toml::Value, keys: &[(&str, &str)]) -> Result<(), KeyProblem> {
    let Some(table) = value.as_table() else {
        return Err((format!("[{section}]"), format!("[{section}] must be a table, found {}", found(value, false))));
    };
    for (key, v) in table {
        let dotted = format!("{section}.{}", crate::error::excerpt(key));
        match keys.iter().find(|(k, _)| k == key) {
            None => {
                let hint = nearest(key, keys.iter().map(|(k, _)| *k))
                    .map(|k| format!(" (did you mean {section}.{k}?)"))
                    .unwrap_or_else(|| format!(" (known keys: {})", keys.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")));
                return Err((dotted.clone(), format!("unknown key {dotted}{hint}")));
            }
            Some((_, ty)) => check_value(&dotted, ty, v)?,
        }
    }
    Ok(())
}

/// Keys a recipe must give (no default).
const REQUIRED: &[(&str, &str)] = &[("model", "path"), ("data", "train"), ("train", "stage"), ("train", "output_dir"), ("train", "lr")];

/// Checks sections, keys, types and ranges against [`KNOWN_KEYS`] and [`LIMITS`].
fn check_keys(doc: &toml::Table) -> Result<(), KeyProblem> {
    let sections = || KNOWN_KEYS.iter().map(|(s, _)| *s);
    for (section, value) in doc {
        let Some((_, keys)) = KNOWN_KEYS.iter().find(|(s, _)| s == section) else {
            let section = crate::error::excerpt(section);
            let hint = nearest(&section, sections())
                .map(|s| format!(" (did you mean [{s}]?)"))
                .unwrap_or_else(|| format!(" (known sections: {})", sections().map(|s| format!("[{s}]")).collect::<Vec<_>>().join(", ")));
            return Err((section.clone(), format!("unknown section [{section}]{hint}")));
        };
        check_section(section, value, keys)?;
    }
    for (section, key) in REQUIRED {
        if doc.get(*section).and_then(|s| s.get(*key)).is_none() {
            return Err((format!("{section}.{key}"), format!("missing key {section}.{key} (in [{section}]; it has no default)")));
        }
    }
    Ok(())
}

/// The `--set` assignment that gave `key` (a dotted key or a `[section]`), if any.
fn override_of<'a>(overrides: &'a [String], key: &str) -> Option<&'a str> {
    let section = key.trim_start_matches('[').trim_end_matches(']');
    overrides.iter().map(String::as_str).rev().find(|o| {
        let path = o.split_once('=').map_or(*o, |(p, _)| p).trim();
        path == key || path.split_once('.').is_some_and(|(s, _)| s == section)
    })
}

/// A recipe error: the file, the `--set` that gave the value if one did, and the message.
fn recipe_error(source: &str, overrides: &[String], (key, message): KeyProblem) -> TrainError {
    match override_of(overrides, &key) {
        Some(o) => TrainError::Recipe(format!("{source}, with --set {}: {message}", crate::error::excerpt(o))),
        None => TrainError::Recipe(format!("{source}: {message}")),
    }
}

/// A TOML syntax error: the file, line and column, the message, and a short excerpt of the line
/// with a caret under the column (long lines are cut around it).
fn syntax_error(source: &str, text: &str, e: &toml::de::Error) -> TrainError {
    let message = e.message().trim().replace('\n', "; ");
    let Some(span) = e.span() else {
        return TrainError::Recipe(format!("{source}: invalid TOML: {message}"));
    };
    let mut at = span.start.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..at].matches('\n').count() + 1;
    let column = text[line_start..at].chars().count() + 1;
    let line = text[line_start..].split('\n').next().unwrap_or("").trim_end_matches('\r');
    // A window of the line around the column, so a megabyte-long line stays one short line.
    const SIDE: usize = 40;
    let chars: Vec<char> = line.chars().collect();
    let from = (column - 1).saturating_sub(SIDE);
    let to = (column - 1 + SIDE).min(chars.len());
    let prefix = if from > 0 { "…" } else { "" };
    let suffix = if to < chars.len() { "…" } else { "" };
    let window: String = chars[from.min(to)..to].iter().map(|c| if c.is_control() { ' ' } else { *c }).collect();
    let caret = " ".repeat(prefix.chars().count() + column - 1 - from);
    TrainError::Recipe(format!(
        "{source}: line {line_no}, column {column}: invalid TOML: {message}\n  | {prefix}{window}{suffix}\n  | {caret}^"
    ))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    // Names are short; a long word is no typo of any of them (and the distance would cost its
    // length times theirs).
    if word.chars().count() > 64 {
        return None;
    }
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 2).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Applies `section.key=value` (the value parsed as TOML, or taken as a string).
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<(), TrainError> {
    let usage = || TrainError::Recipe(format!("--set {}: expected section.key=value, e.g. train.lr=1e-4", crate::error::excerpt(assignment)));
    let (path, raw) = assignment.split_once('=').ok_or_else(usage)?;
    let (section, key) = path.trim().split_once('.').ok_or_else(usage)?;
    if section.is_empty() || key.is_empty() {
        return Err(usage());
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let table = doc
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| TrainError::Recipe(format!("--set {}: [{section}] is not a table", crate::error::excerpt(assignment))))?;
    table.insert(key.to_string(), value);
    Ok(())
}

/// Merges `over` into `base`, table by table (values of `over` win).
fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The optional `[generate_eval]` section: after the last stage, answer the questions of a
/// held-out dataset by generation and report exact-match accuracy on the first word.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateEval {
    pub data: String,
    #[serde(default = "d::ge_limit")]
    pub limit: usize,
    #[serde(default = "d::ge_show")]
    pub show: usize,
    #[serde(default = "d::ge_tokens")]
    pub max_new_tokens: usize,
}

impl GenerateEval {
    /// The `[generate_eval]` table of a recipe, checked like the other sections.
    fn from_value(value: toml::Value, source: &str, overrides: &[String]) -> Result<Self, TrainError> {
        let problem = |p: KeyProblem| recipe_error(source, overrides, p);
        check_section("generate_eval", &value, GENERATE_EVAL_KEYS).map_err(problem)?;
        if value.get("data").is_none() {
            return Err(problem(("generate_eval.data".into(), "missing key generate_eval.data (in [generate_eval]; it has no default)".into())));
        }
        value.try_into().map_err(|e: toml::de::Error| TrainError::Recipe(format!("{source}: [generate_eval]: {}", e.message())))
    }
}

/// `--set` assignments to `[generate_eval]`, which is not part of any stage.
fn is_generate_eval_override(o: &str) -> bool {
    o.trim_start().starts_with("generate_eval.")
}

impl Recipe {
    /// A recipe file's stages, in order: one recipe, or one per `[[stages]]` table, each merged
    /// over the top-level sections. Also the `[generate_eval]` section, if any.
    pub fn parse_stages(text: &str, source: &str, overrides: &[String]) -> Result<(Vec<Self>, Option<GenerateEval>), TrainError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| syntax_error(source, text, &e))?;
        let (ge_overrides, overrides): (Vec<String>, Vec<String>) = overrides.iter().cloned().partition(|o| is_generate_eval_override(o));
        let generate_eval = match doc.remove("generate_eval") {
            None if ge_overrides.is_empty() => None,
            section => {
                let mut holder = toml::Table::new();
                holder.insert("generate_eval".into(), section.unwrap_or_else(|| toml::Value::Table(toml::Table::new())));
                for o in &ge_overrides {
                    apply_override(&mut holder, o)?;
                }
                Some(GenerateEval::from_value(holder.remove("generate_eval").expect("inserted above"), source, &ge_overrides)?)
            }
        };
        let Some(stages) = doc.remove("stages") else {
            return Ok((vec![Self::from_doc(doc, source, &overrides)?], generate_eval));
        };
        let stages = match stages {
            toml::Value::Array(a) if !a.is_empty() => a,
            other => {
                return Err(TrainError::Recipe(format!(
                    "{source}: stages must be a non-empty array of tables ([[stages]]), found {}",
                    found(&other, false)
                )))
            }
        };
        let mut out = Vec::new();
        for (i, stage) in stages.into_iter().enumerate() {
            let mut stage = match stage {
                toml::Value::Table(t) => t,
                other => return Err(TrainError::Recipe(format!("{source}: stages[{i}] must be a table, found {}", found(&other, false)))),
            };
            let name = match stage.remove("name") {
                None => i.to_string(),
                Some(toml::Value::String(n)) => crate::error::excerpt(&n),
                Some(other) => return Err(TrainError::Recipe(format!("{source}: stages[{i}].name must be a string, found {}", found(&other, false)))),
            };
            let mut merged = doc.clone();
            deep_merge(&mut merged, stage);
            out.push(Self::from_doc(merged, &format!("{source} (stage {name})"), &overrides)?);
        }
        Ok((out, generate_eval))
    }

    /// Parses and validates a recipe text with `--set` overrides applied.
    pub fn parse(text: &str, source: &str, overrides: &[String]) -> Result<Self, TrainError> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| syntax_error(source, text, &e))?;
        Self::from_doc(doc, source, overrides)
    }

    fn from_doc(mut doc: toml::Table, source: &str, overrides: &[String]) -> Result<Self, TrainError> {
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        check_keys(&doc).map_err(|p| recipe_error(source, overrides, p))?;
        let recipe: Recipe = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Recipe(format!("{source}: {}", e.message())))?;
        recipe.validate().map_err(|p| recipe_error(source, overrides, p))?;
        Ok(recipe)
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let text = read_text_limited(path, MAX_RECIPE_BYTES, "a recipe (TOML)")?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Every stage of a recipe file (see [`Recipe::parse_stages`]).
    pub fn stages_from_file(path: &Path, overrides: &[String]) -> Result<(Vec<Self>, Option<GenerateEval>), TrainError> {
        let text = read_text_limited(path, MAX_RECIPE_BYTES, "a recipe (TOML)")?;
        Self::parse_stages(&text, &path.display().to_string(), overrides)
    }

    /// What single keys cannot say: keys that must agree, and values only the model crate can
    /// judge (dtype names, the target-module regex). Ranges are checked in [`check_keys`].
    fn validate(&self) -> Result<(), KeyProblem> {
        let t = &self.train;
        let problem = |key: &str, message: String| Err((key.to_string(), message));
        if t.epochs == 0 && t.max_steps == 0 {
            return problem("train.epochs", "train.epochs and train.max_steps are both 0: set one of them to at least 1".into());
        }
        if let (Some(min), Some(max)) = (self.data.min_pixels, self.data.max_pixels) {
            if min > max {
                return problem("data.min_pixels", format!("data.min_pixels must be at most data.max_pixels ({max}), found {min}"));
            }
        }
        if vsft_model::StoredDtype::from_torch_name(&self.model.dtype).is_none() {
            return problem(
                "model.dtype",
                format!("model.dtype must be \"float32\", \"bfloat16\" or \"float16\", found \"{}\"", crate::error::excerpt(&self.model.dtype)),
            );
        }
        if let Err(e) = t.report_to.parsed() {
            return problem("train.report_to", e);
        }
        let lora = vsft_model::lora::LoraConfig { target_modules: self.lora.target_modules.clone(), ..Default::default() };
        if let Err(e) = lora.matcher() {
            return problem("lora.target_modules", e.to_string());
        }
        Ok(())
    }

    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(&self.train.output_dir)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("recipe serialises")
    }

    /// A hash of what decides which parameters train (stage, LoRA shape and targets, model):
    /// resuming under a recipe whose hash differs is refused.
    pub fn trainable_fingerprint(&self) -> String {
        let v = serde_json::json!({
            "stage": self.train.stage,
            "model": self.model.path,
            "lora": if self.train.stage == Stage::Instruct { serde_json::to_value(&self.lora).unwrap() } else { serde_json::Value::Null },
        });
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "m"
[data]
train = "d"
[train]
stage = "pretrain"
output_dir = "out"
lr = 1e-3
"#;

    #[test]
    fn unknown_keys_suggest_the_nearest_known_one() {
        let err = Recipe::parse(&MINIMAL.replace("lr = 1e-3", "lr = 1e-3\nwarmup_ratoi = 0.03"), "r.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key train.warmup_ratoi (did you mean train.warmup_ratio?)"), "{err}");
        let err = Recipe::parse(&format!("{MINIMAL}\n[lroa]\nr = 8\n"), "r.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("unknown section [lroa] (did you mean [lora]?)"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_key_and_the_type() {
        let err = Recipe::parse(&MINIMAL.replace("lr = 1e-3", "lr = \"fast\""), "r.toml", &[]).unwrap_err().to_string();
        assert_eq!(err, "r.toml: train.lr must be a finite float > 0, found string \"fast\"");
    }

    #[test]
    fn stages_merge_over_the_top_level_sections() {
        let text = format!("{MINIMAL}\n[[stages]]\nname = \"one\"\n[stages.train]\nlr = 2e-3\n\n[[stages]]\n[stages.train]\nstage = \"instruct\"\noutput_dir = \"out2\"\n[stages.lora]\nr = 4\n");
        let (stages, ge) = Recipe::parse_stages(&text, "r.toml", &["train.seed=7".into()]).unwrap();
        assert!(ge.is_none());
        assert_eq!(stages.len(), 2);
        assert_eq!((stages[0].train.stage, stages[0].train.lr, stages[0].train.seed), (Stage::Pretrain, 2e-3, 7));
        assert_eq!((stages[1].train.stage, stages[1].train.lr, stages[1].lora.r), (Stage::Instruct, 1e-3, 4));
        assert_eq!(stages[1].train.output_dir, "out2");
        let bad = format!("{MINIMAL}\n[[stages]]\n[stages.trian]\nlr = 1.0\n");
        let err = Recipe::parse_stages(&bad, "r.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("(stage 0)") && err.contains("did you mean [train]"), "{err}");
    }

    #[test]
    fn set_overrides_any_key() {
        let r = Recipe::parse(MINIMAL, "r.toml", &["train.lr=5e-4".into(), "lora.r=16".into(), "data.label_mask=assistant".into()])
            .unwrap();
        assert_eq!(r.train.lr, 5e-4);
        assert_eq!(r.lora.r, 16);
        assert_eq!(r.data.label_mask, "assistant");
        let again = Recipe::parse(&r.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(again, r, "the resolved recipe reads back to itself");
    }

    #[test]
    fn shipped_recipes_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&p).unwrap();
                let (stages, _) = Recipe::parse_stages(&text, &p.display().to_string(), &[]).unwrap_or_else(|e| panic!("{e}"));
                assert!(!stages.is_empty());
            }
        }
    }
}
