//! Serde mirrors of a LLaVA `config.json`, completed with the defaults that transformers'
//! `LlavaConfig`, `LlamaConfig` and `CLIPVisionConfig` apply when a key is absent
//! (llava-hf/llava-1.5-7b-hf ships a partial `text_config`).

use serde::{Deserialize, Serialize};
use serde_json::Value;
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
    serde_json::from_value(v).map_err(serde::de::Error::custom)
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
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
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
        [&self.rope_parameters, &self.rope_scaling].into_iter().flatten().find_map(|v| {
            v.get("mrope_section").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
        })
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
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: LlavaConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
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
        let t = &self.text_config;
        if t.num_attention_heads % t.num_kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads,
                t.num_kv_heads()
            ));
        }
        let n = self.vision_config.num_hidden_layers as i64;
        for l in self.vision_feature_layer.layers() {
            if l < -(n + 1) || l > n {
                return Err(format!("vision_feature_layer {l} is out of range for {n} vision layers"));
            }
        }
        Ok(())
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
