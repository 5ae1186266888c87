//! LLaVA: CLIP features → projector → merged into the Llama input embeddings at the image-token
//! positions → decoder → logits. Field names follow the Hub's legacy layout, so Burn's module
//! paths are the checkpoint's tensor names.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::clip::ClipVisionTower;
use crate::config::{LlavaConfig, SelectStrategy};
use crate::error::ModelError;
use crate::family::{Family, ImageInputs, VisionLanguageModel};
use crate::llama::LlamaForCausalLM;
use crate::nn::{Activation, Linear};
use crate::weights::{Builder, CheckpointReader, RandomInit, StoredDtype, TensorProvider};

#[derive(Module, Debug)]
pub struct MultiModalProjector<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> MultiModalProjector<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.linear_2.forward(self.act.apply(self.linear_1.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct LlavaModel<B: Backend> {
    pub vision_tower: ClipVisionTower<B>,
    pub multi_modal_projector: MultiModalProjector<B>,
    pub language_model: LlamaForCausalLM<B>,
    #[module(skip)]
    pub config: LlavaConfig,
}

/// The parts every LLaVA-style family is made of, built under the Hub's legacy names.
pub struct LlavaParts<B: Backend> {
    pub vision_tower: ClipVisionTower<B>,
    pub multi_modal_projector: MultiModalProjector<B>,
    pub language_model: LlamaForCausalLM<B>,
}

impl<B: Backend> LlavaParts<B> {
    pub fn build(cfg: &LlavaConfig, b: &mut Builder<'_, B>) -> Self {
        let vision_tower = ClipVisionTower::new(b, &cfg.vision_config);
        let (v, t) = (cfg.vision_config.hidden_size, cfg.text_config.hidden_size);
        let n_layers = cfg.vision_feature_layer.layers().len();
        let bias = cfg.multimodal_projector_bias;
        let multi_modal_projector = {
            let mut p = b.scope("multi_modal_projector");
            MultiModalProjector {
                linear_1: Linear::new(&mut p, "linear_1", v * n_layers, t, bias),
                linear_2: Linear::new(&mut p, "linear_2", t, t, bias),
                act: Activation::parse(&cfg.projector_hidden_act).expect("validated config"),
            }
        };
        let language_model = LlamaForCausalLM::new(b, &cfg.text_config, cfg.tie_word_embeddings());
        Self { vision_tower, multi_modal_projector, language_model }
    }
}

/// Opens a checkpoint for a LLaVA-style config, ignoring a tied head's tensor.
pub fn open_checkpoint(dir: &Path, cfg: &LlavaConfig) -> Result<CheckpointReader, ModelError> {
    let mut reader = CheckpointReader::open(dir)?;
    if cfg.tie_word_embeddings() {
        reader.ignore("language_model.lm_head.weight");
    }
    Ok(reader)
}

/// The selected hidden states of a CLIP tower (`vision_feature_layer`, `…_select_strategy`),
/// `[images, tokens, vision_hidden·k]`: what LLaVA's projector reads.
pub fn clip_features<B: Backend>(tower: &ClipVisionTower<B>, cfg: &LlavaConfig, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
    let states = tower.hidden_states(pixel_values, &cfg.vision_hidden_state_indices());
    let x = if states.len() == 1 { states.into_iter().next().expect("one") } else { Tensor::cat(states, 2) };
    select_tokens(cfg, x)
}

/// `vision_feature_select_strategy`: "default" drops the CLS token.
pub fn select_tokens<B: Backend>(cfg: &LlavaConfig, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match cfg.vision_feature_select_strategy {
        SelectStrategy::Default => {
            let [n, t, h] = x.dims();
            x.slice([0..n, 1..t, 0..h])
        }
        SelectStrategy::Full => x,
    }
}

/// The linears of a LLaVA-style model under PEFT's names: the decoder's, then the tower's.
pub fn llava_linears<'a, B: Backend>(lm: &'a mut LlamaForCausalLM<B>, tower: &'a mut ClipVisionTower<B>) -> Vec<(String, &'a mut Linear<B>)> {
    let mut out = lm.linears_mut();
    out.extend(tower.linears_mut("model.vision_tower"));
    out
}

/// A CLIP tower as a stack for per-layer checkpointing ([`crate::family::TowerStack`]): one
/// selected hidden state is the output of layer `index − 1` (several selected states are not a
/// stack: their tower trains with a whole graph).
pub fn clip_stack<'a, B: Backend>(tower: &'a ClipVisionTower<B>, cfg: &'a LlavaConfig) -> Option<crate::family::TowerStack<'a, B>> {
    let [depth] = cfg.vision_hidden_state_indices()[..] else { return None };
    Some(crate::family::TowerStack {
        depth,
        stem: Box::new(move |images: &ImageInputs| Ok(tower.stem(images.pixels_4d(&tower.vision_model.post_layernorm.weight.val().device())?))),
        layer: Box::new(move |i, x| tower.layer(i, x)),
        head: Box::new(move |x| select_tokens(cfg, x)),
    })
}

impl<B: Backend> LlavaModel<B> {
    /// Builds every parameter through `provider` (a checkpoint or a random initialisation).
    pub fn build(cfg: &LlavaConfig, provider: &mut dyn TensorProvider, device: &B::Device) -> Self {
        Self::build_with(cfg, provider, device, StoredDtype::F32)
    }

    /// [`Self::build`] with the frozen parameters (all but the projector) in `frozen_dtype`.
    pub fn build_with(cfg: &LlavaConfig, provider: &mut dyn TensorProvider, device: &B::Device, frozen_dtype: StoredDtype) -> Self {
        let mut b = Builder::<B>::new(provider, device).with_frozen_dtype(frozen_dtype);
        let LlavaParts { vision_tower, multi_modal_projector, language_model } = LlavaParts::build(cfg, &mut b);
        Self { vision_tower, multi_modal_projector, language_model, config: cfg.clone() }
    }

    /// A seeded random model (for tests, demos and benchmarks).
    pub fn random(cfg: &LlavaConfig, seed: u64, device: &B::Device) -> Self {
        Self::build(cfg, &mut RandomInit::new(seed), device)
    }

    /// Loads a Hugging Face model directory (`config.json` + safetensors, single or sharded, any
    /// of the three key layouts, f16/bf16/f32 converted to f32), the frozen parameters held in
    /// `frozen_dtype` (`model.dtype` in a recipe): with bf16, linear layers compute in bf16 as
    /// `torch.autocast` does, while the projector, LoRA adapters and optimizer state stay f32.
    pub fn load_with(dir: &Path, device: &B::Device, frozen_dtype: StoredDtype) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let cfg = LlavaConfig::from_file(&config_path)?;
        crate::weights::refuse_unless_fits(&config_path, cfg.parameter_count(), frozen_dtype)?;
        let mut reader = open_checkpoint(dir, &cfg)?;
        let model = Self::build_with(&cfg, &mut reader, device, frozen_dtype);
        reader.finish()?;
        Ok(model)
    }

    /// The projector's input, one fixed-size image per unit.
    pub fn vision_features(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        clip_features(&self.vision_tower, &self.config, pixel_values)
    }
}

impl<B: Backend> VisionLanguageModel<B> for LlavaModel<B> {
    fn family(&self) -> Family {
        Family::Llava
    }
    fn language_model(&self) -> &LlamaForCausalLM<B> {
        &self.language_model
    }
    fn language_model_mut(&mut self) -> &mut LlamaForCausalLM<B> {
        &mut self.language_model
    }
    fn image_token_id(&self) -> i64 {
        self.config.image_token_index
    }
    fn vision_states(&self, images: &ImageInputs) -> Result<Tensor<B, 3>, ModelError> {
        if let Some(i) = images.images.iter().position(|i| i.units != 1) {
            return Err(ModelError::Input(format!("image {i} has {} pixel units; LLaVA takes one per image", images.images[i].units)));
        }
        Ok(self.vision_features(images.pixels_4d(&self.device())?))
    }
    fn project(&self, states: Tensor<B, 3>, _images: &ImageInputs) -> Result<Tensor<B, 2>, ModelError> {
        let [n, t, _] = states.dims();
        let f = self.multi_modal_projector.forward(states);
        let h = f.dims()[2];
        Ok(f.reshape([n * t, h]))
    }
    fn tower_stack(&self, _images: &ImageInputs) -> Option<crate::family::TowerStack<'_, B>> {
        clip_stack(&self.vision_tower, &self.config)
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        llava_linears(&mut self.language_model, &mut self.vision_tower)
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config serialises")
    }
}
