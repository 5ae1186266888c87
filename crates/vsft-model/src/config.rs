//! Serde mirrors of a LLaVA `config.json`, completed with the defaults that transformers'
//! `LlavaConfig`, `LlamaConfig` and `CLIPVisionConfig` apply when a key is absent
//! (llava-hf/llava-1.5-7b-hf ships a partial `text_config`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ops::{Add, Mul};
use std::path::Path;

use crate::error::ModelError;

/// Which hidden state(s) of the vision tower feed the projector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayer {
    One(i64),
    Many(Vec<i64>),
}

impl FeatureLayer {
    pub fn layers(&self) -> Vec<i64> {
        match self {
            FeatureLayer::One(l) => vec![*l],
            FeatureLayer::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectStrategy {
    /// Drop the CLS token.
    Default,
    /// Keep every token, CLS included.
    Full,
}

/// Reads and parses a JSON file of a model directory, at most
/// [`vsft_data::guard::MAX_CONFIG_FILE_BYTES`] of it.
pub fn read_json_file(path: &Path) -> Result<Value, ModelError> {
    let bad = |message: String| ModelError::Config { path: path.to_path_buf(), message };
    let bytes = vsft_data::guard::read_bounded(path, vsft_data::guard::MAX_CONFIG_FILE_BYTES, "a JSON file of a model directory").map_err(|e| {
        if vsft_data::guard::is_refusal(&e) {
            bad(e.to_string())
        } else {
            ModelError::io(path, e)
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))
}

/// A config value as `T`; a value of the wrong type is reported with its dotted key
/// (`text_config.hidden_size: invalid value: integer `-1`, expected usize`).
pub fn from_json<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let (key, inner) = (e.path().to_string(), e.inner().to_string());
        match (key.as_str(), inner.strip_prefix('`')) {
            (".", _) => inner,
            // A nested `from_json` (a section completed with defaults first) already named its key.
            (_, Some(nested)) => format!("`{key}.{nested}"),
            _ => format!("`{key}`: {inner}"),
        }
    })
}

/// Checks of config values; each error names the dotted key, what is allowed and what was found.
pub mod check {
    pub fn positive(key: &str, value: usize) -> Result<(), String> {
        if value == 0 {
            return Err(format!("`{key}` must be a positive integer, found 0"));
        }
        Ok(())
    }

    /// A finite number above zero (epsilons, rotary bases).
    pub fn positive_number(key: &str, value: f64) -> Result<(), String> {
        if !(value.is_finite() && value > 0.0) {
            return Err(format!("`{key}` must be a finite number > 0, found {value}"));
        }
        Ok(())
    }

    /// `value` (positive) divides `whole`.
    pub fn divides(key: &str, value: usize, whole_key: &str, whole: usize) -> Result<(), String> {
        positive(key, value)?;
        if whole % value != 0 {
            return Err(format!("`{key}` must divide `{whole_key}` ({whole}), found {value}"));
        }
        Ok(())
    }

    pub fn even(key: &str, value: usize) -> Result<(), String> {
        positive(key, value)?;
        if value % 2 != 0 {
            return Err(format!("`{key}` must be even (rotary embedding halves), found {value}"));
        }
        Ok(())
    }

    /// A token id the embedding table has a row for.
    pub fn token_id(key: &str, value: i64, vocab_key: &str, vocab: usize) -> Result<(), String> {
        if value < 0 || value as u64 >= vocab as u64 {
            return Err(format!("`{key}` must be a token id in 0..{vocab} (`{vocab_key}`), found {value}"));
        }
        Ok(())
    }
}

/// A parameter count computed from config values with checked arithmetic (`None` once it
/// overflows), so that absurd sizes are refused before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub Option<u64>);

impl Count {
    pub fn of(n: usize) -> Self {
        Count(Some(n as u64))
    }
    /// `n` when `condition` holds, else zero (optional biases, untied heads).
    pub fn when(condition: bool, n: Count) -> Self {
        if condition { n } else { Count::of(0) }
    }
}

impl Add for Count {
    type Output = Count;
    fn add(self, other: Count) -> Count {
        Count(self.0.zip(other.0).and_then(|(a, b)| a.checked_add(b)))
    }
}

impl Mul for Count {
    type Output = Count;
    fn mul(self, other: Count) -> Count {
        Count(self.0.zip(other.0).and_then(|(a, b)| a.checked_mul(b)))
    }
}

/// Parameters of a `Linear` (`[d_out, d_in]`, optional bias).
pub fn linear_count(d_in: Count, d_out: Count, bias: bool) -> Count {
    d_in * d_out + Count::when(bias, d_out)
}

/// `vision_config` (transformers `CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d::clip_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d::clip_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d::clip_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d::clip_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d::three")]
    pub num_channels: usize,
    #[serde(default = "d::clip_image")]
    pub image_size: usize,
    #[serde(default = "d::clip_patch")]
    pub patch_size: usize,
    #[serde(default = "d::quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d::eps5")]
    pub layer_norm_eps: f64,
    #[serde(default = "d::clip_projection")]
    pub projection_dim: usize,
    #[serde(default = "d::clip_type")]
    pub model_type: String,
    /// Keys we do not interpret, kept so that a saved config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl ClipVisionConfig {
    /// Sizes the tower is built from; `prefix` is where the config sits (`vision_config.`).
    pub fn validate_sizes(&self, prefix: &str) -> Result<(), String> {
        let key = |name: &str| format!("{prefix}{name}");
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ] {
            check::positive(&key(name), value)?;
        }
        check::divides(&key("num_attention_heads"), self.num_attention_heads, &key("hidden_size"), self.hidden_size)?;
        if self.patch_size > self.image_size {
            return Err(format!(
                "`{}` must be at most `{}` ({}), found {}",
                key("patch_size"),
                key("image_size"),
                self.image_size,
                self.patch_size
            ));
        }
        check::positive_number(&key("layer_norm_eps"), self.layer_norm_eps)
    }

    /// Parameters of the tower ([`crate::clip::ClipVisionTower::new`]).
    pub fn parameter_count(&self) -> Count {
        let c = Count::of;
        let (h, i) = (c(self.hidden_size), c(self.intermediate_size));
        let side = c(self.image_size.checked_div(self.patch_size).unwrap_or(0));
        let layer_norm = c(2) * h;
        let patch = c(self.patch_size);
        let embeddings = h + h * c(self.num_channels) * patch * patch + (side * side + c(1)) * h;
        let layer = c(4) * linear_count(h, h, true) + linear_count(h, i, true) + linear_count(i, h, true) + c(2) * layer_norm;
        embeddings + c(2) * layer_norm + c(self.num_hidden_layers) * layer
    }
}

/// `text_config` (transformers `LlamaConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "d::llama_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d::llama_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d::llama_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d::llama_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d::llama_heads")]
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "d::silu")]
    pub hidden_act: String,
    #[serde(default = "d::llama_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d::eps6")]
    pub rms_norm_eps: f64,
    /// Legacy top-level key; newer configs use `rope_parameters.rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Mistral's `sliding_window`: absent (outer `None`) means 4096, `null` means none.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub sliding_window: Option<Option<usize>>,
    #[serde(default = "d::llama_type")]
    pub model_type: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// The decoders a LLaVA-style `text_config` may name; they share the Llama computation.
pub const SUPPORTED_DECODERS: [&str; 2] = ["llama", "mistral"];

/// Deserialises a key that may be `null`: absent stays `None` (via `default`), present becomes
/// `Some(value)`, so `null` and absence can mean different things.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `text_config` completed with the defaults of its own config class: `MistralConfig` differs
/// from `LlamaConfig` in the keys below, and llava-hf's configs omit some of them.
fn text_config_with_defaults<'de, D: serde::Deserializer<'de>>(d: D) -> Result<LlamaConfig, D::Error> {
    let mut v = Value::deserialize(d)?;
    if let Some(map) = v.as_object_mut() {
        if map.get("model_type").and_then(Value::as_str) == Some("mistral") {
            for (key, default) in [
                ("intermediate_size", serde_json::json!(14336)),
                ("num_key_value_heads", serde_json::json!(8)),
                ("max_position_embeddings", serde_json::json!(4096 * 32)),
                ("sliding_window", serde_json::json!(4096)),
            ] {
                map.entry(key).or_insert(default);
            }
        }
    }
    from_json(v).map_err(serde::de::Error::custom)
}

impl LlamaConfig {
    /// Keys beyond this many positions back are not attended to (Mistral); `None`: all are.
    pub fn sliding_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window.unwrap_or(Some(4096)),
            _ => None,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0))
    }

    /// Sizes the decoder is built from; `prefix` is where they sit (`text_config.`, or nothing
    /// in a flat Qwen2-VL config).
    pub fn validate_sizes(&self, prefix: &str) -> Result<(), String> {
        let key = |name: &str| format!("{prefix}{name}");
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            check::positive(&key(name), value)?;
        }
        check::divides(&key("num_key_value_heads"), self.num_kv_heads(), &key("num_attention_heads"), self.num_attention_heads)?;
        match self.head_dim {
            Some(d) => check::even(&key("head_dim"), d)?,
            None => {
                check::divides(&key("num_attention_heads"), self.num_attention_heads, &key("hidden_size"), self.hidden_size)?;
                check::even(&format!("{} / {} (the head size)", key("hidden_size"), key("num_attention_heads")), self.head_dim())?;
            }
        }
        check::positive_number(&key("rms_norm_eps"), self.rms_norm_eps)?;
        for (name, rope) in [("rope_parameters", &self.rope_parameters), ("rope_scaling", &self.rope_scaling)] {
            if let Some(theta) = rope.as_ref().and_then(|r| r.get("rope_theta")) {
                let name = key(&format!("{name}.rope_theta"));
                let theta = theta.as_f64().ok_or_else(|| format!("`{name}` must be a number, found {theta}"))?;
                check::positive_number(&name, theta)?;
            }
        }
        if let Some(theta) = self.rope_theta {
            check::positive_number(&key("rope_theta"), theta)?;
        }
        if let Some(window) = self.sliding_window() {
            check::positive(&key("sliding_window"), window)?;
        }
        Ok(())
    }

    /// Parameters of the decoder and its head ([`crate::llama::LlamaForCausalLM::new`]).
    pub fn parameter_count(&self, tie_word_embeddings: bool) -> Count {
        let c = Count::of;
        let (h, i) = (c(self.hidden_size), c(self.intermediate_size));
        let q = c(self.num_attention_heads) * c(self.head_dim());
        let kv = c(self.num_kv_heads()) * c(self.head_dim());
        let attention = linear_count(h, q, self.qkv_bias())
            + c(2) * linear_count(h, kv, self.qkv_bias())
            + linear_count(q, h, self.attention_bias);
        let mlp = c(2) * linear_count(h, i, self.mlp_bias) + linear_count(i, h, self.mlp_bias);
        let layer = attention + mlp + c(2) * h;
        let embeddings = c(self.vocab_size) * h;
        embeddings + c(self.num_hidden_layers) * layer + h + Count::when(!tie_word_embeddings, embeddings)
    }
    /// `rope_theta` from `rope_parameters` (transformers 5) or the legacy top-level key.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }
    /// Qwen2's decoders put biases on q, k and v (not on o); Llama's follow `attention_bias`.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type.starts_with("qwen2")
    }

    /// `mrope_section` (multimodal RoPE: frequency slots taken from the t, h and w positions),
    /// from `rope_parameters` (transformers 5) or the Hub's `rope_scaling`.
    pub fn mrope_section(&self) -> Option<Vec<usize>> {
        self.mrope_entry()?.1.as_array().map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
    }

    /// `mrope_section` as written, and the key that holds it (`rope_parameters` or `rope_scaling`).
    pub fn mrope_entry(&self) -> Option<(&'static str, &Value)> {
        [("rope_parameters", &self.rope_parameters), ("rope_scaling", &self.rope_scaling)]
            .into_iter()
            .find_map(|(key, rope)| rope.as_ref()?.get("mrope_section").map(|section| (key, section)))
    }

    pub fn rope_type(&self) -> Option<String> {
        for v in [&self.rope_parameters, &self.rope_scaling].into_iter().flatten() {
            if let Some(t) = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str) {
                return Some(t.to_string());
            }
        }
        None
    }
}

/// A LLaVA `config.json` (transformers `LlavaConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaConfig {
    #[serde(default = "d::llava_type")]
    pub model_type: String,
    #[serde(default = "d::llava_vision")]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "d::llava_text", deserialize_with = "text_config_with_defaults")]
    pub text_config: LlamaConfig,
    #[serde(default = "d::image_token", alias = "image_token_id")]
    pub image_token_index: i64,
    #[serde(default = "d::gelu")]
    pub projector_hidden_act: String,
    #[serde(default = "d::select_default")]
    pub vision_feature_select_strategy: SelectStrategy,
    #[serde(default = "d::feature_layer")]
    pub vision_feature_layer: FeatureLayer,
    #[serde(default = "d::image_seq_length")]
    pub image_seq_length: usize,
    #[serde(default = "d::yes")]
    pub multimodal_projector_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl LlavaConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let cfg: LlavaConfig = from_json(read_json_file(path)?).map_err(|message| ModelError::Config { path: path.to_path_buf(), message })?;
        cfg.validate().map_err(|message| ModelError::Config { path: path.to_path_buf(), message })?;
        Ok(cfg)
    }

    /// Checks that vsft implements what the config asks for, and says what is supported otherwise.
    pub fn validate(&self) -> Result<(), String> {
        if self.model_type != "llava" {
            return Err(format!("unsupported model_type {:?}: vsft supports \"llava\"", self.model_type));
        }
        self.validate_parts()
    }

    /// The checks shared by every family built on LLaVA's parts (CLIP tower, MLP projector,
    /// Llama-style decoder).
    pub fn validate_parts(&self) -> Result<(), String> {
        if !SUPPORTED_DECODERS.contains(&self.text_config.model_type.as_str()) {
            return Err(format!(
                "unsupported text_config.model_type {:?}: vsft supports {SUPPORTED_DECODERS:?}",
                self.text_config.model_type
            ));
        }
        if self.vision_config.model_type != "clip_vision_model" {
            return Err(format!(
                "unsupported vision_config.model_type {:?}: vsft supports \"clip_vision_model\"",
                self.vision_config.model_type
            ));
        }
        if crate::nn::Activation::parse(&self.vision_config.hidden_act).is_none() {
            return Err(format!(
                "unsupported vision_config.hidden_act {:?}: supported are quick_gelu, gelu, gelu_pytorch_tanh",
                self.vision_config.hidden_act
            ));
        }
        if crate::nn::Activation::parse(&self.projector_hidden_act).is_none() {
            return Err(format!(
                "unsupported projector_hidden_act {:?}: supported are gelu, quick_gelu, gelu_pytorch_tanh, silu",
                self.projector_hidden_act
            ));
        }
        if self.text_config.hidden_act != "silu" {
            return Err(format!(
                "unsupported text_config.hidden_act {:?}: vsft supports \"silu\"",
                self.text_config.hidden_act
            ));
        }
        if let Some(t) = self.text_config.rope_type() {
            if t != "default" {
                return Err(format!("unsupported rope_type {t:?}: vsft supports \"default\""));
            }
        }
        self.vision_config.validate_sizes("vision_config.")?;
        self.text_config.validate_sizes("text_config.")?;
        let n = self.vision_config.num_hidden_layers as i64;
        let layers = self.vision_feature_layer.layers();
        if layers.is_empty() {
            return Err("`vision_feature_layer` must name at least one layer, found []".into());
        }
        if let Some(l) = layers.iter().find(|&&l| l < -(n + 1) || l > n) {
            return Err(format!(
                "`vision_feature_layer` must lie in -{}..={n} (`vision_config.num_hidden_layers` is {n}), found {l}",
                n + 1
            ));
        }
        check::token_id("image_token_index", self.image_token_index, "text_config.vocab_size", self.text_config.vocab_size)
    }

    /// Parameters of the tower, projector and decoder ([`crate::llava::LlavaParts::build`]).
    pub fn parameter_count(&self) -> Count {
        let (v, t) = (Count::of(self.vision_config.hidden_size), Count::of(self.text_config.hidden_size));
        let selected = Count::of(self.vision_feature_layer.layers().len());
        let bias = self.multimodal_projector_bias;
        self.vision_config.parameter_count()
            + linear_count(v * selected, t, bias)
            + linear_count(t, t, bias)
            + self.text_config.parameter_count(self.tie_word_embeddings())
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.or(self.text_config.tie_word_embeddings).unwrap_or(false)
    }

    /// Index into the vision tower's `hidden_states` (0 = embeddings after `pre_layrnorm`).
    pub fn vision_hidden_state_indices(&self) -> Vec<usize> {
        let n = self.vision_config.num_hidden_layers as i64 + 1;
        self.vision_feature_layer.layers().iter().map(|&l| if l < 0 { (n + l) as usize } else { l as usize }).collect()
    }

    /// Number of image tokens one image becomes (what the processor expands `<image>` to).
    pub fn image_tokens_per_image(&self) -> usize {
        let g = self.vision_config.image_size / self.vision_config.patch_size;
        match self.vision_feature_select_strategy {
            SelectStrategy::Default => g * g,
            SelectStrategy::Full => g * g + 1,
        }
    }
}

/// Defaults of the transformers config classes.
mod d {
    use super::*;
    pub fn clip_hidden() -> usize { 768 }
    pub fn clip_intermediate() -> usize { 3072 }
    pub fn clip_layers() -> usize { 12 }
    pub fn clip_heads() -> usize { 12 }
    pub fn three() -> usize { 3 }
    pub fn clip_image() -> usize { 224 }
    pub fn clip_patch() -> usize { 32 }
    pub fn quick_gelu() -> String { "quick_gelu".into() }
    pub fn eps5() -> f64 { 1e-5 }
    pub fn eps6() -> f64 { 1e-6 }
    pub fn clip_projection() -> usize { 512 }
    pub fn clip_type() -> String { "clip_vision_model".into() }
    pub fn llama_vocab() -> usize { 32000 }
    pub fn llama_hidden() -> usize { 4096 }
    pub fn llama_intermediate() -> usize { 11008 }
    pub fn llama_layers() -> usize { 32 }
    pub fn llama_heads() -> usize { 32 }
    pub fn silu() -> String { "silu".into() }
    pub fn llama_max_pos() -> usize { 2048 }
    pub fn llama_type() -> String { "llama".into() }
    pub fn llava_type() -> String { "llava".into() }
    pub fn image_token() -> i64 { 32000 }
    pub fn gelu() -> String { "gelu".into() }
    pub fn select_default() -> SelectStrategy { SelectStrategy::Default }
    pub fn feature_layer() -> FeatureLayer { FeatureLayer::One(-2) }
    pub fn image_seq_length() -> usize { 576 }
    pub fn yes() -> bool { true }
    /// `LlavaConfig` without a `vision_config` builds this CLIP-L/14-336.
    pub fn llava_vision() -> ClipVisionConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14, "image_size": 336,
            "num_hidden_layers": 24, "num_attention_heads": 16, "vocab_size": 32000, "projection_dim": 768
        }))
        .expect("static config")
    }
    pub fn llava_text() -> LlamaConfig {
        serde_json::from_value(serde_json::json!({})).expect("static config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_text_config_is_completed_with_transformers_defaults() {
        // The llava-hf/llava-1.5-7b-hf config.json (see shared/reference/hf-formats.md §1).
        let cfg: LlavaConfig = serde_json::from_str(r#"{"architectures":["LlavaForConditionalGeneration"],"ignore_index":-100,"image_token_index":32000,
 "model_type":"llava","pad_token_id":32001,"projector_hidden_act":"gelu",
 "text_config":{"_name_or_path":"lmsys/vicuna-7b-v1.5","architectures":["LlamaForCausalLM"],
   "max_position_embeddings":4096,"model_type":"llama","rms_norm_eps":1e-05,"torch_dtype":"float16","vocab_size":32064},
 "tie_word_embeddings":false,"torch_dtype":"float16","transformers_version":"4.36.0.dev0",
 "vision_config":{"hidden_size":1024,"image_size":336,"intermediate_size":4096,"model_type":"clip_vision_model",
   "num_attention_heads":16,"num_hidden_layers":24,"patch_size":14,"projection_dim":768,"vocab_size":32000},
 "vision_feature_layer":-2,"vision_feature_select_strategy":"default","vocab_size":32064}"#).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.text_config.hidden_size, 4096);
        assert_eq!(cfg.text_config.intermediate_size, 11008);
        assert_eq!(cfg.text_config.num_kv_heads(), 32);
        assert_eq!(cfg.text_config.head_dim(), 128);
        assert_eq!(cfg.text_config.rope_theta(), 10000.0);
        assert_eq!(cfg.vision_config.hidden_act, "quick_gelu");
        assert_eq!(cfg.image_tokens_per_image(), 576);
        assert_eq!(cfg.vision_hidden_state_indices(), vec![23]);
        assert!(!cfg.tie_word_embeddings());
    }

    #[test]
    fn unsupported_model_type_says_what_is_supported() {
        let cfg: LlavaConfig = serde_json::from_str(r#"{"model_type":"llava_next"}"#).unwrap();
        let err = cfg.validate().unwrap_err();
        assert!(err.contains("llava_next") && err.contains("supports \"llava\""), "{err}");
    }
}
