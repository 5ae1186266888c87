//! TOML recipes: the whole training run in one file that reads top to bottom.
//!
//! Validated on load: an unknown key is an error that suggests the nearest known one, a wrong
//! type names the key and the expected type. `--set section.key=value` overrides any key.
//! The resolved recipe is written to `output_dir/recipe.toml`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vsft_model::lora::TargetModules;

use crate::error::TrainError;

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
            ("freeze_vision_tower", "boolean"), ("vision_lr", "float"),
        ],
    ),
    ("lora", &[("r", "integer"), ("alpha", "float"), ("dropout", "float"), ("target_modules", "list or string"), ("rslora", "boolean")]),
    ("hub", &[("repo", "string"), ("private", "boolean"), ("push_checkpoints", "boolean")]),
];

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
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 2).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn type_matches(expected: &str, v: &toml::Value) -> bool {
    match expected {
        "string" => v.is_str(),
        "integer" => v.as_integer().is_some_and(|i| i >= 0),
        "float" => v.is_float() || v.is_integer(),
        "boolean" => v.is_bool(),
        "list or string" => v.is_str() || v.is_array(),
        _ => true,
    }
}

/// Checks keys and types against [`KNOWN_KEYS`], with suggestions.
fn check_keys(doc: &toml::Table, source: &str) -> Result<(), TrainError> {
    let sections = || KNOWN_KEYS.iter().map(|(s, _)| *s);
    for (section, value) in doc {
        let Some((_, keys)) = KNOWN_KEYS.iter().find(|(s, _)| s == section) else {
            let hint = nearest(section, sections()).map(|s| format!(" (did you mean [{s}]?)")).unwrap_or_default();
            return Err(TrainError::Recipe(format!("{source}: unknown section [{section}]{hint}")));
        };
        let Some(table) = value.as_table() else {
            return Err(TrainError::Recipe(format!("{source}: [{section}] must be a table")));
        };
        for (key, v) in table {
            match keys.iter().find(|(k, _)| k == key) {
                None => {
                    let hint = nearest(key, keys.iter().map(|(k, _)| *k))
                        .map(|k| format!(" (did you mean {section}.{k}?)"))
                        .unwrap_or_default();
                    return Err(TrainError::Recipe(format!("{source}: unknown key {section}.{key}{hint}")));
                }
                Some((_, ty)) if !type_matches(ty, v) => {
                    return Err(TrainError::Recipe(format!(
                        "{source}: {section}.{key} must be a {ty}, found {} ({v})",
                        v.type_str()
                    )));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Applies `section.key=value` (the value parsed as TOML, or taken as a string).
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<(), TrainError> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| TrainError::Recipe(format!("--set {assignment:?}: expected section.key=value")))?;
    let (section, key) = path
        .trim()
        .split_once('.')
        .ok_or_else(|| TrainError::Recipe(format!("--set {assignment:?}: expected section.key=value")))?;
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let table = doc
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| TrainError::Recipe(format!("--set: [{section}] is not a table")))?;
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

impl Recipe {
    /// A recipe file's stages, in order: one recipe, or one per `[[stages]]` table, each merged
    /// over the top-level sections. Also the `[generate_eval]` section, if any.
    pub fn parse_stages(text: &str, source: &str, overrides: &[String]) -> Result<(Vec<Self>, Option<GenerateEval>), TrainError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| TrainError::Recipe(format!("{source}: {}", e.message())))?;
        let generate_eval = match doc.remove("generate_eval") {
            Some(v) => Some(v.try_into::<GenerateEval>().map_err(|e| TrainError::Recipe(format!("{source}: [generate_eval]: {}", e.message())))?),
            None => None,
        };
        let Some(stages) = doc.remove("stages") else {
            return Ok((vec![Self::from_doc(doc, source, overrides)?], generate_eval));
        };
        let stages = stages
            .as_array()
            .cloned()
            .ok_or_else(|| TrainError::Recipe(format!("{source}: stages must be an array of tables ([[stages]])")))?;
        let mut out = Vec::new();
        for (i, stage) in stages.into_iter().enumerate() {
            let mut stage = match stage {
                toml::Value::Table(t) => t,
                _ => return Err(TrainError::Recipe(format!("{source}: stages[{i}] must be a table"))),
            };
            let name = stage.remove("name").and_then(|n| n.as_str().map(str::to_string)).unwrap_or_else(|| i.to_string());
            let mut merged = doc.clone();
            deep_merge(&mut merged, stage);
            out.push(Self::from_doc(merged, &format!("{source} (stage {name})"), overrides)?);
        }
        Ok((out, generate_eval))
    }

    /// Parses and validates a recipe text with `--set` overrides applied.
    pub fn parse(text: &str, source: &str, overrides: &[String]) -> Result<Self, TrainError> {
        let doc: toml::Table =
            toml::from_str(text).map_err(|e| TrainError::Recipe(format!("{source}: {}", e.message())))?;
        Self::from_doc(doc, source, overrides)
    }

    fn from_doc(mut doc: toml::Table, source: &str, overrides: &[String]) -> Result<Self, TrainError> {
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        check_keys(&doc, source)?;
        let recipe: Recipe = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Recipe(format!("{source}: {}", e.message())))?;
        recipe.validate().map_err(|m| TrainError::Recipe(format!("{source}: {m}")))?;
        Ok(recipe)
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Every stage of a recipe file (see [`Recipe::parse_stages`]).
    pub fn stages_from_file(path: &Path, overrides: &[String]) -> Result<(Vec<Self>, Option<GenerateEval>), TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::parse_stages(&text, &path.display().to_string(), overrides)
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        if !["pad", "pad+image", "assistant"].contains(&self.data.label_mask.as_str()) {
            return Err(format!("data.label_mask must be pad, pad+image or assistant, found {:?}", self.data.label_mask));
        }
        if !["error", "skip"].contains(&self.data.on_bad_row.as_str()) {
            return Err(format!("data.on_bad_row must be error or skip, found {:?}", self.data.on_bad_row));
        }
        if !["error", "skip"].contains(&t.on_nan.as_str()) {
            return Err(format!("train.on_nan must be error or skip, found {:?}", t.on_nan));
        }
        if t.batch_size == 0 || t.grad_accum == 0 {
            return Err("train.batch_size and train.grad_accum must be at least 1".into());
        }
        if t.epochs == 0 && t.max_steps == 0 {
            return Err("set train.epochs or train.max_steps".into());
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(format!("train.warmup_ratio must be in [0, 1), found {}", t.warmup_ratio));
        }
        if t.lr <= 0.0 {
            return Err(format!("train.lr must be positive, found {}", t.lr));
        }
        if self.lora.r == 0 {
            return Err("lora.r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err(format!("lora.dropout must be in [0, 1), found {}", self.lora.dropout));
        }
        if vsft_model::StoredDtype::from_torch_name(&self.model.dtype).is_none() {
            return Err(format!("model.dtype must be float32, bfloat16 or float16, found {:?}", self.model.dtype));
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
        assert!(err.contains("train.lr must be a float, found string"), "{err}");
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
