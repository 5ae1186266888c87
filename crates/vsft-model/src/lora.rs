//! LoRA on the language model, as PEFT computes, initialises, names and stores it.
//!
//! - `y = W x + b + scale · B(A(dropout(x)))`, `scale = alpha / r` (or `alpha / √r` with rsLoRA).
//! - A is Kaiming-uniform with a = √5 (`U(±1/√in)`), B is zero, so training starts at the base model.
//! - Suffix lists reach only the language model's linear layers (PEFT's suffix lists and
//!   `all-linear` would silently hit CLIP's `q_proj`… too); a regex may also name the vision
//!   tower's (`model.vision_tower.encoder.layers.N.self_attn.q_proj`), for recipes that train it.
//! - Adapter files use PEFT's names in the current transformers layout:
//!   `base_model.model.model.language_model.layers.N.self_attn.q_proj.lora_A.weight`, and the
//!   projector (PEFT `modules_to_save`) as `base_model.model.model.multi_modal_projector.*`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::{read_json_file, Count};
use crate::error::ModelError;
use crate::family::VlmModel;
use crate::llama::LlamaForCausalLM;
use crate::nn::{Linear, LoraAdapter};
use crate::weights::{self, read_tensor_file, PendingTensor, RandomInit, StoredDtype, TensorRef};

/// The decoder's linear layers, by the names PEFT matches.
pub const LANGUAGE_MODEL_LINEARS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Which modules get adapters: name suffixes (PEFT's list form) or one regex matched against the
/// whole module name (PEFT's string form, `re.fullmatch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Suffixes(Vec<String>),
    Regex(String),
}

/// As a recipe writes it: `["q_proj", "v_proj"]` or `"regex"`.
impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetModules::Suffixes(s) => write!(f, "[{}]", s.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", ")),
            TargetModules::Regex(r) => write!(f, "{r:?}"),
        }
    }
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Suffixes(LANGUAGE_MODEL_LINEARS.iter().map(|s| s.to_string()).collect())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { r: 8, alpha: 16.0, dropout: 0.05, target_modules: TargetModules::default(), rslora: false }
    }
}

/// What `r`, `alpha` and `dropout` are called in a recipe and in PEFT's `adapter_config.json`.
const RECIPE_KEYS: [&str; 3] = ["lora.r", "lora.alpha", "lora.dropout"];
const PEFT_KEYS: [&str; 3] = ["r", "lora_alpha", "lora_dropout"];

impl LoraConfig {
    /// `r` positive, `alpha` finite, `dropout` in [0, 1); `keys` name the three as the source does.
    pub fn validate(&self, [r, alpha, dropout]: [&str; 3]) -> Result<(), String> {
        crate::config::check::positive(r, self.r)?;
        if !self.alpha.is_finite() {
            return Err(format!("`{alpha}` must be a finite number, found {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("`{dropout}` must be a probability in [0, 1), found {}", self.dropout));
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// A matcher over module names in the current transformers layout
    /// (`model.language_model.layers.N.self_attn.q_proj`).
    pub fn matcher(&self) -> Result<Box<dyn Fn(&str) -> bool>, ModelError> {
        match &self.target_modules {
            TargetModules::Suffixes(s) => {
                let s = s.clone();
                Ok(Box::new(move |name: &str| s.iter().any(|suf| name == suf || name.ends_with(&format!(".{suf}")))))
            }
            TargetModules::Regex(r) => {
                let re = regex::Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| ModelError::Input(format!("lora.target_modules: invalid regex {r:?}: {e}")))?;
                Ok(Box::new(move |name: &str| re.is_match(name)))
            }
        }
    }

    /// The regex written to `adapter_config.json`: the language model's targeted suffixes, and
    /// the vision tower's when it has adapters, each scoped to its part.
    pub fn peft_target_regex(&self, targeted: &[String]) -> String {
        let part = |prefix: &str, scope: &str| {
            let mut suffixes: Vec<&str> = targeted.iter().filter(|n| n.starts_with(prefix)).filter_map(|n| n.rsplit('.').next()).collect();
            suffixes.sort();
            suffixes.dedup();
            (!suffixes.is_empty()).then(|| format!(r".*{scope}.*\.({})", suffixes.join("|")))
        };
        [part("model.language_model.", "language_model"), part("model.vision_tower.", "vision_tower")].into_iter().flatten().collect::<Vec<_>>().join("|")
    }
}

/// Whether `lora.target_modules` may reach `module` at all. Suffix lists (PEFT's list form, and
/// vsft's default) only ever reach language-model linears: users report PEFT's suffixes landing
/// on the vision tower's `q_proj`… by surprise. A regex is explicit, so it may name the tower.
fn reachable(targets: &TargetModules, module: &str) -> bool {
    matches!(targets, TargetModules::Regex(_)) || module.starts_with("model.language_model.")
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Every decoder linear with its PEFT module name (`model.language_model.layers.N.…`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (which, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("model.language_model.layers.{i}.{which}"), lin));
            }
        }
        out
    }
}

impl<B: Backend> VlmModel<B> {
    /// Adds fresh adapters (PEFT's initialisation, seeded) to the targeted linears and returns
    /// their module names. Targeting nothing is an error.
    /// The adapters' size is estimated first (`r · (in + out)` per layer): one that cannot fit
    /// in memory is refused before any is made.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<Vec<String>, ModelError> {
        cfg.validate(RECIPE_KEYS).map_err(ModelError::Input)?;
        let matcher = cfg.matcher()?;
        let mut rng = RandomInit::new(seed);
        let device = self.device();
        let mut linears: Vec<(String, &mut Linear<B>)> = self
            .as_dyn_mut()
            .linears_mut()
            .into_iter()
            .filter(|(name, _)| reachable(&cfg.target_modules, name) && matcher(name))
            .collect();
        let adapter_params = linears.iter().fold(Count::of(0), |sum, (_, l)| sum + Count::of(cfg.r) * (Count::of(l.d_in()) + Count::of(l.d_out())));
        // Each adapter value also gets a gradient and two Adam moments while it trains.
        weights::fits_in_memory(adapter_params * Count::of(4), StoredDtype::F32.size() as u64).map_err(|m| {
            ModelError::Input(format!(
                "lora.r = {}: adapters on {} linear layers (with their gradients and optimizer moments) do not fit in memory: {m}",
                cfg.r,
                linears.len()
            ))
        })?;
        let mut targeted = Vec::new();
        for (name, linear) in linears.iter_mut() {
            let (d_in, d_out) = (linear.d_in(), linear.d_out());
            let bound = 1.0 / (d_in as f64).sqrt();
            let a = rng.fill(cfg.r * d_in, weights::Init::Uniform(bound));
            linear.lora = Some(LoraAdapter {
                lora_a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [cfg.r, d_in]), &device)),
                lora_b: Param::from_tensor(Tensor::zeros([d_out, cfg.r], &device)),
                scale: cfg.scale(),
                dropout: burn::nn::DropoutConfig::new(cfg.dropout).init(),
            });
            targeted.push(name.clone());
        }
        if targeted.is_empty() {
            return Err(ModelError::Input(format!(
                "lora.target_modules = {} matches no linear layer (names look like model.language_model.layers.0.self_attn.q_proj; \
                 a regex may also name the vision tower's, e.g. model.vision_tower.encoder.layers.0.self_attn.q_proj)",
                cfg.target_modules
            )));
        }
        Ok(targeted)
    }

    /// The adapter and projector tensors under PEFT's names (what `adapter_model.safetensors` holds).
    pub fn adapter_tensors(&self) -> Vec<(String, TensorRef<B>)> {
        self.adapter_tensors_with(&|_| false)
    }

    /// [`Self::adapter_tensors`] plus every other parameter `trained_in_full` names (a vision
    /// tower trained in full, which PEFT saves as a module to save).
    pub fn adapter_tensors_with(&self, trained_in_full: &dyn Fn(&str) -> bool) -> Vec<(String, TensorRef<B>)> {
        let mut out = Vec::new();
        let mut full = Vec::new();
        let parts = self.as_dyn().part_names();
        for (name, _, t) in self.named_tensors() {
            match name.split_once(".lora.") {
                Some((module, which)) => {
                    let which = if which == "lora_a" { "lora_A" } else { "lora_B" };
                    out.push((format!("base_model.model.{}.{which}.weight", peft_module_name(module)), t));
                }
                None if parts.is_projector(&name) || trained_in_full(&name) => {
                    let (module, param) = name.rsplit_once('.').unwrap_or(("", &name));
                    full.push((format!("base_model.model.{}.{param}", peft_module_name(module)), t));
                }
                None => {}
            }
        }
        out.extend(full);
        out
    }

    /// Writes `adapter_model.safetensors` (f32) into `dir`; `trained_in_full` as for
    /// [`Self::adapter_tensors_with`].
    pub fn save_adapter_weights(&self, dir: &Path, trained_in_full: &dyn Fn(&str) -> bool) -> Result<(), ModelError> {
        let tensors = self.adapter_tensors_with(trained_in_full);
        let pending = tensors.iter().map(|(n, t)| PendingTensor::from_tensor(n.clone(), t)).collect();
        weights::write_safetensors(&dir.join("adapter_model.safetensors"), pending, StoredDtype::F32)
    }

    /// Loads a PEFT LoRA adapter directory (vsft's exports and PEFT's own): `adapter_config.json`
    /// and `adapter_model.safetensors`, legacy or current key layout. The projector, and the vision
    /// tower when it was trained in full (`modules_to_save`), are replaced when the adapter
    /// carries them. Returns the model and the adapter's config.
    pub fn load_adapter(mut self, dir: &Path) -> Result<(Self, LoraConfig), ModelError> {
        let cfg_path = dir.join("adapter_config.json");
        let peft = read_json_file(&cfg_path)?;
        let lora_cfg = LoraConfig::from_peft_json(&peft)
            .map_err(|message| ModelError::Config { path: cfg_path.clone(), message })?;
        let weights_path = dir.join("adapter_model.safetensors");
        let tensors = read_tensor_file(&weights_path)?;
        let device = self.device();
        let parts = self.as_dyn().part_names();
        // Normalise keys: drop `base_model.model.` and PEFT's adapter name.
        let mut by_module: BTreeMap<String, [Option<weights::RawTensor>; 2]> = BTreeMap::new();
        let mut in_full = Vec::new();
        for (key, raw) in &tensors {
            let k = key.strip_prefix("base_model.model.").unwrap_or(key).replace(".default.", ".");
            let k = k.replace(".modules_to_save.", ".");
            let (module, slot) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                let canonical = weights::canonical_name(&k);
                if parts.is_projector(&canonical) || parts.is_tower(&canonical) {
                    in_full.push((canonical, raw.clone()));
                    continue;
                }
                return Err(ModelError::Input(format!("{}: unsupported tensor {key}", weights_path.display())));
            };
            by_module.entry(peft_module_name(module)).or_default()[slot] = Some(raw.clone());
        }
        let scale = lora_cfg.scale();
        let mut linears: BTreeMap<String, &mut Linear<B>> = self.as_dyn_mut().linears_mut().into_iter().collect();
        for (module, [a, b]) in by_module {
            let linear = linears.get_mut(&module).ok_or_else(|| {
                ModelError::Input(format!("{}: adapter targets {module}, which this model does not have", weights_path.display()))
            })?;
            let (Some(a), Some(b)) = (a, b) else {
                return Err(ModelError::Input(format!("{}: {module} needs both lora_A and lora_B", weights_path.display())));
            };
            if a.shape != [lora_cfg.r, linear.d_in()] || b.shape != [linear.d_out(), lora_cfg.r] {
                return Err(ModelError::Input(format!(
                    "{}: {module}: lora_A {:?} / lora_B {:?} do not fit r={} and the layer's [{}, {}]",
                    weights_path.display(),
                    a.shape,
                    b.shape,
                    lora_cfg.r,
                    linear.d_out(),
                    linear.d_in()
                )));
            }
            linear.lora = Some(LoraAdapter {
                lora_a: Param::from_tensor(Tensor::from_data(TensorData::new(a.to_f32()?, [a.shape[0], a.shape[1]]), &device)),
                lora_b: Param::from_tensor(Tensor::from_data(TensorData::new(b.to_f32()?, [b.shape[0], b.shape[1]]), &device)),
                scale,
                dropout: burn::nn::DropoutConfig::new(lora_cfg.dropout).init(),
            });
        }
        let model = if in_full.is_empty() { self } else { self.with_tensors(&in_full, &weights_path)? };
        Ok((model, lora_cfg))
    }

    /// Folds every adapter into its base weight (`W + scale·B·A`) and removes the adapters.
    pub fn merge_lora(&mut self) {
        for (_, linear) in self.as_dyn_mut().linears_mut() {
            if linear.lora.is_some() {
                let merged = linear.merged_weight();
                linear.weight = Param::from_tensor(merged);
                linear.lora = None;
            }
        }
    }
}

/// A module name (any transformers layout) in PEFT's current naming: transformers 5's runtime
/// names (`model.language_model.…`, `model.vision_tower.…` without `vision_model.`,
/// `model.multi_modal_projector.…`).
fn peft_module_name(module: &str) -> String {
    let canonical = weights::canonical_name(module);
    if let Some(rest) = canonical.strip_prefix("language_model.model.") {
        format!("model.language_model.{rest}")
    } else if let Some(rest) = canonical.strip_prefix("vision_tower.vision_model.") {
        format!("model.vision_tower.{rest}")
    } else if canonical.starts_with("language_model.lm_head") {
        canonical.replacen("language_model.", "", 1)
    } else {
        format!("model.{canonical}")
    }
}

impl LoraConfig {
    /// Reads PEFT's `adapter_config.json` fields.
    pub fn from_peft_json(v: &serde_json::Value) -> Result<Self, String> {
        if v.get("peft_type").and_then(|t| t.as_str()).unwrap_or("LORA") != "LORA" {
            return Err(format!("peft_type {} is not supported (vsft reads LORA adapters)", v["peft_type"]));
        }
        let r = v.get("r").and_then(|x| x.as_u64()).ok_or("no integer \"r\"")? as usize;
        let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0);
        let dropout = v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0);
        let rslora = v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false);
        if v.get("use_dora").and_then(|x| x.as_bool()).unwrap_or(false) {
            return Err("use_dora adapters are not supported".into());
        }
        let target_modules = match v.get("target_modules") {
            Some(serde_json::Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(serde_json::Value::Array(a)) => {
                TargetModules::Suffixes(a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            }
            _ => TargetModules::default(),
        };
        let cfg = Self { r, alpha, dropout, target_modules, rslora };
        cfg.validate(PEFT_KEYS)?;
        Ok(cfg)
    }

    /// `adapter_config.json` as PEFT writes it (the fields PEFT 0.21 needs, plus the usual ones);
    /// `vision_tower_in_full` adds the tower to `modules_to_save`.
    pub fn to_peft_json(&self, targeted: &[String], base_model: &str, parts: crate::family::PartNames, vision_tower_in_full: bool) -> serde_json::Value {
        let mut modules_to_save = vec![parts.projector_module];
        if vision_tower_in_full {
            modules_to_save.push(parts.tower_module);
        }
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            // PEFT writes an integer alpha as an integer.
            "lora_alpha": if self.alpha.fract() == 0.0 { serde_json::json!(self.alpha as i64) } else { serde_json::json!(self.alpha) },
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": false,
            "target_modules": self.peft_target_regex(targeted),
            "modules_to_save": modules_to_save,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }
}
