//! Qwen2-VL and Qwen2.5-VL (`qwen2_vl`, `qwen2_5_vl`): a native-resolution ViT with 2D RoPE
//! ([`crate::qwen_vision`]; Qwen2.5-VL's with window attention), its patch merger as the
//! projector, and a Qwen2 decoder (q/k/v biases) with multimodal RoPE: image tokens take
//! (t, h, w) positions on their grid ([`Positions::Multimodal`], transformers' `get_rope_index`).

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{check, from_json, read_json_file, Count, LlamaConfig};
use crate::error::ModelError;
use crate::family::{Family, ImageInputs, PartNames, TowerStack, VisionLanguageModel};
use crate::llama::{LlamaForCausalLM, Positions};
use crate::nn::Linear;
use crate::qwen_vision::{QwenVisionConfig, QwenVisionTower, VisionVersion};
use crate::weights::{Builder, CheckpointReader, RandomInit, StoredDtype, TensorProvider};

/// The text keys a Hub Qwen2-VL `config.json` keeps at its top level (transformers 5 moves
/// them into `text_config`).
const FLAT_TEXT_KEYS: [&str; 16] = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "use_sliding_window", "sliding_window", "max_window_layers",
    "attention_dropout",
];

/// A Qwen2-VL / Qwen2.5-VL `config.json`, flat (Hub) or nested (transformers 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2VlConfig {
    pub model_type: String,
    pub vision_config: QwenVisionConfig,
    pub text_config: LlamaConfig,
    #[serde(default = "d::image_token", alias = "image_token_index")]
    pub image_token_id: i64,
    #[serde(default = "d::video_token")]
    pub video_token_id: i64,
    #[serde(default = "d::vision_start")]
    pub vision_start_token_id: i64,
    #[serde(default = "d::vision_end")]
    pub vision_end_token_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

mod d {
    pub fn image_token() -> i64 { 151655 }
    pub fn video_token() -> i64 { 151656 }
    pub fn vision_start() -> i64 { 151652 }
    pub fn vision_end() -> i64 { 151653 }
}

impl Qwen2VlConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_value(read_json_file(path)?).map_err(|message| ModelError::Config { path: path.to_path_buf(), message })
    }

    /// Reads either layout, completing absent keys with `Qwen2VLTextConfig`'s defaults; a
    /// pre-v5 `text_config.tie_word_embeddings` is forwarded to the top level, as transformers does.
    pub fn from_value(mut v: Value) -> Result<Self, String> {
        let map = v.as_object_mut().ok_or("config.json is not an object")?;
        let model_type = map.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
        let version = match model_type.as_str() {
            "qwen2_vl" => VisionVersion::Qwen2,
            "qwen2_5_vl" => VisionVersion::Qwen25,
            t => return Err(format!("model_type {t:?} is not qwen2_vl or qwen2_5_vl")),
        };
        let nested = matches!(map.get("text_config"), Some(Value::Object(_)));
        let mut text = match map.remove("text_config") {
            Some(Value::Object(t)) => t,
            _ => {
                let mut t = serde_json::Map::new();
                for k in FLAT_TEXT_KEYS {
                    if let Some(x) = map.remove(k) {
                        t.insert(k.to_string(), x);
                    }
                }
                t
            }
        };
        if !map.contains_key("tie_word_embeddings") {
            if let Some(tie) = text.get("tie_word_embeddings").cloned() {
                map.insert("tie_word_embeddings".into(), tie);
            }
        }
        text.insert("model_type".into(), format!("{model_type}_text").into());
        for (key, default) in [
            ("vocab_size", serde_json::json!(152064)),
            ("hidden_size", serde_json::json!(8192)),
            ("intermediate_size", serde_json::json!(29568)),
            ("num_hidden_layers", serde_json::json!(80)),
            ("num_attention_heads", serde_json::json!(64)),
            ("num_key_value_heads", serde_json::json!(8)),
            ("max_position_embeddings", serde_json::json!(32768)),
            ("rms_norm_eps", serde_json::json!(1e-5)),
            ("rope_theta", serde_json::json!(1e6)),
        ] {
            text.entry(key).or_insert(default);
        }
        if text.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err("use_sliding_window = true is not supported (no Qwen2-VL checkpoint uses it)".into());
        }
        let has_section = [text.get("rope_parameters"), text.get("rope_scaling")].into_iter().flatten().any(|r| r.get("mrope_section").is_some());
        if !has_section {
            text.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": text["rope_theta"]}));
        }
        let mut vision = map.remove("vision_config").unwrap_or_else(|| serde_json::json!({}));
        if let Some(o) = vision.as_object_mut() {
            o.insert("version".into(), serde_json::to_value(version).map_err(|e| e.to_string())?);
        }
        map.insert("vision_config".into(), vision);
        map.insert("text_config".into(), Value::Object(text));
        let cfg: Self = from_json(v)?;
        cfg.validate_in(if nested { "text_config." } else { "" })?;
        Ok(cfg)
    }

    /// Checks a config whose text keys sit in `text_config` (transformers 5's layout).
    pub fn validate(&self) -> Result<(), String> {
        self.validate_in("text_config.")
    }

    /// Checks the config; `text_prefix` is where its text keys sit (`text_config.`, or nothing
    /// in the Hub's flat layout), so that errors name the key as the file spells it.
    fn validate_in(&self, text_prefix: &str) -> Result<(), String> {
        self.vision_config.validate()?;
        let t = &self.text_config;
        let key = |name: &str| format!("{text_prefix}{name}");
        if t.hidden_act != "silu" {
            return Err(format!("`{}` must be \"silu\" (Qwen2's decoder), found {:?}", key("hidden_act"), t.hidden_act));
        }
        t.validate_sizes(text_prefix)?;
        let (source, section) = t.mrope_entry().unwrap_or(("rope_scaling", &Value::Null));
        let entries: Option<Vec<u64>> = section.as_array().and_then(|a| a.iter().map(Value::as_u64).collect());
        let sum = entries.and_then(|e| e.iter().try_fold(0u64, |sum, &x| sum.checked_add(x)));
        if sum.and_then(|s| s.checked_mul(2)) != Some(t.head_dim() as u64) {
            return Err(format!(
                "`{}` must be non-negative integers summing to head_dim / 2 = {}, found {section}",
                key(&format!("{source}.mrope_section")),
                t.head_dim() / 2
            ));
        }
        let [_, out_key, _] = self.vision_config.size_keys();
        if self.vision_config.out_dim() != t.hidden_size {
            return Err(format!(
                "`{out_key}` (the merger's output) must equal `{}` ({}), found {}",
                key("hidden_size"),
                t.hidden_size,
                self.vision_config.out_dim()
            ));
        }
        let vocab_key = key("vocab_size");
        for (name, id) in [
            ("image_token_id", self.image_token_id),
            ("video_token_id", self.video_token_id),
            ("vision_start_token_id", self.vision_start_token_id),
            ("vision_end_token_id", self.vision_end_token_id),
        ] {
            check::token_id(name, id, &vocab_key, t.vocab_size)?;
        }
        Ok(())
    }

    /// Parameters of the vision tower (merger included) and the decoder.
    pub fn parameter_count(&self) -> Count {
        self.vision_config.parameter_count() + self.text_config.parameter_count(self.tie_word_embeddings())
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }

    pub fn family(&self) -> Family {
        if self.model_type == "qwen2_5_vl" { Family::Qwen25Vl } else { Family::Qwen2Vl }
    }

    /// The Hub's flat `config.json`: the text keys at the top level, as Qwen's repos ship it.
    pub fn to_hub_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let map = v.as_object_mut().expect("object");
        if let Some(Value::Object(text)) = map.remove("text_config") {
            for (k, x) in text {
                if k != "model_type" {
                    map.entry(k).or_insert(x);
                }
            }
        }
        if let Some(Value::Object(vision)) = map.get_mut("vision_config") {
            vision.remove("version");
        }
        v
    }
}

/// A stored key in any of Qwen's layouts → vsft's name for it. Hub layout: `model.*`
/// (decoder), `lm_head.*`, `visual.*`; transformers 4.52–4.57 and runtime names:
/// `model.language_model.*`, `model.visual.*`, `lm_head.*`.
pub fn canonical_name(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("lm_head.") {
        format!("language_model.lm_head.{rest}")
    } else if let Some(rest) = key.strip_prefix("model.language_model.") {
        format!("language_model.model.{rest}")
    } else if let Some(rest) = key.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = key.strip_prefix("model.") {
        format!("language_model.model.{rest}")
    } else {
        key.to_string()
    }
}

/// vsft's name → the Hub layout's key (what vsft writes).
pub fn hub_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        format!("model.{rest}")
    } else if let Some(rest) = name.strip_prefix("language_model.") {
        rest.to_string()
    } else {
        name.to_string()
    }
}

#[derive(Module, Debug)]
pub struct Qwen2VlModel<B: Backend> {
    pub visual: QwenVisionTower<B>,
    pub language_model: LlamaForCausalLM<B>,
    #[module(skip)]
    pub config: Qwen2VlConfig,
}

impl<B: Backend> Qwen2VlModel<B> {
    pub fn build_with(cfg: &Qwen2VlConfig, provider: &mut dyn TensorProvider, device: &B::Device, frozen_dtype: StoredDtype) -> Self {
        let mut b = Builder::<B>::new(provider, device).with_frozen_dtype(frozen_dtype).with_projector(PARTS.projector);
        let visual = QwenVisionTower::new(&mut b, &cfg.vision_config);
        let language_model = LlamaForCausalLM::new(&mut b, &cfg.text_config, cfg.tie_word_embeddings());
        Self { visual, language_model, config: cfg.clone() }
    }

    pub fn random(cfg: &Qwen2VlConfig, seed: u64, device: &B::Device) -> Self {
        Self::build_with(cfg, &mut RandomInit::new(seed), device, StoredDtype::F32)
    }

    /// Loads the Hub layout or transformers 4.52+'s; a tied checkpoint may or may not hold
    /// `lm_head.weight` (5.x omits it).
    pub fn load_with(dir: &Path, device: &B::Device, frozen_dtype: StoredDtype) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let cfg = Qwen2VlConfig::from_file(&config_path)?;
        crate::weights::refuse_unless_fits(&config_path, cfg.parameter_count(), frozen_dtype)?;
        let mut reader = CheckpointReader::open_with(dir, canonical_name)?;
        if cfg.tie_word_embeddings() {
            reader.ignore("language_model.lm_head.weight");
        }
        let model = Self::build_with(&cfg, &mut reader, device, frozen_dtype);
        reader.finish()?;
        Ok(model)
    }

    fn grids(images: &ImageInputs) -> Vec<(usize, usize, usize)> {
        images.images.iter().map(|i| i.grid).collect()
    }

    fn pixels(&self, images: &ImageInputs) -> Result<Tensor<B, 2>, ModelError> {
        let shape: [usize; 2] = images.shape.try_into().map_err(|_| ModelError::Input(format!("Qwen's pixel_values are [patches, {}], got {:?}", self.config.vision_config.patch_dim(), images.shape)))?;
        if shape[0] * shape[1] != images.pixel_values.len() {
            return Err(ModelError::Input(format!("pixel_values has {} values for a shape {shape:?}", images.pixel_values.len())));
        }
        Ok(Tensor::from_data(burn::tensor::TensorData::new(images.pixel_values.to_vec(), shape), &self.device()))
    }
}

/// `[1, n, e]` → `[n, e]` (the trait's stack and states are batched; Qwen's ViT is not).
fn flat<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 2> {
    let [_, n, e] = x.dims();
    x.reshape([n, e])
}

const PARTS: PartNames = PartNames { projector: "visual.merger.", tower: "visual.", projector_module: "visual.merger", tower_module: "visual" };

impl<B: Backend> VisionLanguageModel<B> for Qwen2VlModel<B> {
    fn family(&self) -> Family {
        self.config.family()
    }
    fn language_model(&self) -> &LlamaForCausalLM<B> {
        &self.language_model
    }
    fn language_model_mut(&mut self) -> &mut LlamaForCausalLM<B> {
        &mut self.language_model
    }
    fn image_token_id(&self) -> i64 {
        self.config.image_token_id
    }
    fn positions(&self, input_ids: &[i64], attention_mask: &[i64], seq: usize, images: &[crate::ImageInfo]) -> Result<Positions, ModelError> {
        let grids: Vec<(usize, usize, usize)> = images.iter().map(|i| i.grid).collect();
        let (positions, _) = vsft_data::family::qwen2_vl::rope_index(
            input_ids,
            attention_mask,
            seq,
            &grids,
            self.config.image_token_id,
            self.config.vision_start_token_id,
            self.config.vision_config.spatial_merge_size(),
        )
        .map_err(|e| ModelError::Input(e.to_string()))?;
        Ok(Positions::Multimodal(positions))
    }
    /// The ViT's blocks over all patches (`[1, patches, width]`), in window order for 2.5-VL.
    fn vision_states(&self, images: &ImageInputs) -> Result<Tensor<B, 3>, ModelError> {
        let ctx = self.visual.context(&Self::grids(images), &self.device())?;
        let mut x = self.visual.stem(self.pixels(images)?, &ctx)?;
        for i in 0..self.visual.depth() {
            x = self.visual.layer(i, x, &ctx);
        }
        Ok(x.unsqueeze_dim(0))
    }
    /// The patch merger: 2×2 patches → one token of the decoder's width, in image order.
    fn project(&self, states: Tensor<B, 3>, images: &ImageInputs) -> Result<Tensor<B, 2>, ModelError> {
        let ctx = self.visual.context(&Self::grids(images), &self.device())?;
        Ok(self.visual.merge(flat(states), &ctx))
    }
    fn tower_stack(&self, images: &ImageInputs) -> Option<TowerStack<'_, B>> {
        let ctx = std::rc::Rc::new(self.visual.context(&Self::grids(images), &self.device()).ok()?);
        let (c1, c2) = (ctx.clone(), ctx);
        Some(TowerStack {
            depth: self.visual.depth(),
            stem: Box::new(move |images: &ImageInputs| Ok(self.visual.stem(self.pixels(images)?, &c1)?.unsqueeze_dim(0))),
            layer: Box::new(move |i, x: Tensor<B, 3>| self.visual.layer(i, flat(x), &c2).unsqueeze_dim(0)),
            head: Box::new(|x| x),
        })
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = self.language_model.linears_mut();
        out.extend(self.visual.linears_mut("model.visual"));
        out
    }
    fn part_names(&self) -> PartNames {
        PARTS
    }
    fn hub_name(&self, name: &str) -> String {
        hub_name(name)
    }
    fn config_json(&self) -> Value {
        self.config.to_hub_json()
    }
}
