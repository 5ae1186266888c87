//! vsft-model: LLaVA-1.5 in Burn, computing what transformers computes, and Hugging Face
//! checkpoints in and out.
//!
//! Layout: [`config`] (serde mirrors of config.json) → [`nn`] (layers with HF names) →
//! shared blocks [`clip`] (vision tower), [`llama`] (Llama/Mistral decoder), [`lora`], [`loss`] →
//! the families [`llava`] (LLaVA-1.5) and [`llava_next`] (LLaVA-NeXT), registered in [`family`],
//! which also holds what every family computes after its image features (merge, decoder, loss,
//! generation); [`weights`] reads and writes safetensors.

pub mod clip;
pub mod config;
pub mod error;
pub mod family;
pub mod generate;
pub mod llama;
pub mod llava;
pub mod llava_next;
pub mod lora;
pub mod loss;
pub mod nn;
pub mod qwen2_vl;
pub mod qwen_vision;
pub mod weights;

pub use config::LlavaConfig;
pub use error::ModelError;
pub use family::{Family, HfImages, ImageInfo, ImageInputs, PartNames, VisionLanguageModel, VlmModel};
pub use llama::Positions;
pub use llava::LlavaModel;
pub use llava_next::{LlavaNextConfig, LlavaNextModel};
pub use qwen2_vl::{Qwen2VlConfig, Qwen2VlModel};
pub use weights::StoredDtype;
