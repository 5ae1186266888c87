//! vsft-model: LLaVA-1.5 in Burn, computing what transformers computes, and Hugging Face
//! checkpoints in and out.
//!
//! Layout: [`config`] (serde mirrors of config.json) → [`nn`] (layers with HF names) →
//! [`clip`] (vision tower), [`llama`] (decoder), [`llava`] (projector + merge) → [`loss`];
//! [`weights`] reads and writes safetensors.

pub mod clip;
pub mod config;
pub mod error;
pub mod generate;
pub mod llama;
pub mod llava;
pub mod lora;
pub mod loss;
pub mod nn;
pub mod weights;

pub use config::LlavaConfig;
pub use error::ModelError;
pub use llava::LlavaModel;
pub use weights::StoredDtype;
