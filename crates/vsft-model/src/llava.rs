//! LLaVA: CLIP features → projector → merged into the Llama input embeddings at the image-token
//! positions → decoder → logits. Field names follow the Hub's legacy layout, so Burn's module
//! paths are the checkpoint's tensor names.

use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use crate::clip::ClipVisionTower;
use crate::config::{LlavaConfig, SelectStrategy};
use crate::error::ModelError;
use crate::llama::LlamaForCausalLM;
use crate::loss::{shifted_targets, token_loss_sum, LossSum, IGNORE_INDEX};
use crate::nn::{Activation, Linear};
use crate::weights::{self, Builder, CheckpointReader, NamedParams, PendingTensor, RandomInit, StoredDtype, TensorProvider};

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

impl<B: Backend> LlavaModel<B> {
    /// Builds every parameter through `provider` (a checkpoint or a random initialisation).
    pub fn build(cfg: &LlavaConfig, provider: &mut dyn TensorProvider, device: &B::Device) -> Self {
        Self::build_with(cfg, provider, device, StoredDtype::F32)
    }

    /// [`Self::build`] with the frozen parameters (all but the projector) in `frozen_dtype`.
    pub fn build_with(cfg: &LlavaConfig, provider: &mut dyn TensorProvider, device: &B::Device, frozen_dtype: StoredDtype) -> Self {
        let mut b = Builder::<B>::new(provider, device).with_frozen_dtype(frozen_dtype);
        let vision_tower = ClipVisionTower::new(&mut b, &cfg.vision_config);
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
        let language_model = LlamaForCausalLM::new(&mut b, &cfg.text_config, cfg.tie_word_embeddings());
        Self { vision_tower, multi_modal_projector, language_model, config: cfg.clone() }
    }

    /// A seeded random model (for tests, demos and benchmarks).
    pub fn random(cfg: &LlavaConfig, seed: u64, device: &B::Device) -> Self {
        Self::build(cfg, &mut RandomInit::new(seed), device)
    }

    /// Loads a Hugging Face model directory (`config.json` + safetensors, single or sharded, any
    /// of the three key layouts, f16/bf16/f32 converted to f32).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        Self::load_with(dir, device, StoredDtype::F32)
    }

    /// [`Self::load`] with the frozen parameters held in `frozen_dtype` (`model.dtype` in a
    /// recipe): with bf16, linear layers compute in bf16 as `torch.autocast` does, while the
    /// projector, LoRA adapters and optimizer state stay f32.
    pub fn load_with(dir: &Path, device: &B::Device, frozen_dtype: StoredDtype) -> Result<Self, ModelError> {
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let mut reader = CheckpointReader::open(dir)?;
        if cfg.tie_word_embeddings() {
            reader.ignore("language_model.lm_head.weight");
        }
        let model = Self::build_with(&cfg, &mut reader, device, frozen_dtype);
        reader.finish()?;
        Ok(model)
    }

    /// Every parameter with its tensor name in the Hub's legacy layout.
    pub fn named_tensors(&self) -> Vec<(String, burn::module::ParamId, weights::TensorRef<B>)> {
        NamedParams::collect(self)
    }

    /// Writes `config.json` and the weights (legacy layout, sharded at `max_shard_bytes`) into
    /// `dir`, which must exist.
    pub fn save(&self, dir: &Path, dtype: StoredDtype, max_shard_bytes: u64) -> Result<(), ModelError> {
        let named = self.named_tensors();
        let pending = named.iter().map(|(n, _, t)| PendingTensor::from_tensor(n.clone(), t)).collect();
        weights::write_sharded(dir, pending, dtype, max_shard_bytes)?;
        let mut cfg = serde_json::to_value(&self.config).expect("config serialises");
        cfg["torch_dtype"] = dtype.torch_name().into();
        cfg["architectures"] = serde_json::json!(["LlavaForConditionalGeneration"]);
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).expect("json")).map_err(|e| ModelError::io(&path, e))
    }

    /// Projected image features `[images, tokens_per_image, text_hidden]`.
    pub fn image_features(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        self.multi_modal_projector.forward(self.vision_features(pixel_values))
    }

    /// The selected vision hidden states (before the projector), `[images, tokens, vision_hidden·k]`.
    pub fn vision_features(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let indices = self.config.vision_hidden_state_indices();
        let states = self.vision_tower.hidden_states(pixel_values, &indices);
        let x = if states.len() == 1 { states.into_iter().next().expect("one") } else { Tensor::cat(states, 2) };
        match self.config.vision_feature_select_strategy {
            SelectStrategy::Default => {
                let [n, t, h] = x.dims();
                x.slice([0..n, 1..t, 0..h])
            }
            SelectStrategy::Full => x,
        }
    }

    /// Token embeddings with the image features scattered into the image-token positions,
    /// row-major over the batch (as `masked_scatter` fills them).
    pub fn merge_embeddings(
        &self,
        input_ids: Tensor<B, 2, Int>,
        image_features: Option<Tensor<B, 3>>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let [batch, seq] = input_ids.dims();
        let ids_host: Vec<i64> = input_ids.to_data().convert::<i64>().into_vec().expect("int data");
        let embeds = self.language_model.model.embed_tokens.forward(input_ids);
        let hidden = embeds.dims()[2];
        let image_token = self.config.image_token_index;
        let per_row: Vec<usize> =
            ids_host.chunks(seq).map(|row| row.iter().filter(|&&t| t == image_token).count()).collect();
        let total_tokens: usize = per_row.iter().sum();
        let (n_feat, feats) = match image_features {
            Some(f) => {
                let [n, p, h] = f.dims();
                (n * p, Some((f.reshape([n * p, h]), p)))
            }
            None => (0, None),
        };
        if total_tokens != n_feat {
            let per_image = feats.as_ref().map(|(_, p)| *p).unwrap_or(0).max(1);
            let row = per_row.iter().position(|&c| c % per_image != 0).unwrap_or(0);
            return Err(ModelError::Input(format!(
                "image tokens ({total_tokens}) and image features ({n_feat}) do not match: row {row} has {} image tokens ({} per image)",
                per_row[row], per_image
            )));
        }
        let Some((feats, _)) = feats else { return Ok(embeds) };
        if n_feat == 0 {
            return Ok(embeds);
        }
        // One gather over [token embeddings; image features] puts each feature in its slot and
        // keeps both sources differentiable.
        let mut next_feature = batch * seq;
        let index: Vec<i64> = ids_host
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == image_token {
                    next_feature += 1;
                    (next_feature - 1) as i64
                } else {
                    i as i64
                }
            })
            .collect();
        let device = embeds.device();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [batch * seq]), &device);
        let table = Tensor::cat(vec![embeds.reshape([batch * seq, hidden]), feats], 0);
        Ok(table.select(0, index).reshape([batch, seq, hidden]))
    }

    /// Full forward: logits `[batch, seq, vocab]`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
        pixel_values: Option<Tensor<B, 4>>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let feats = pixel_values.map(|p| self.image_features(p));
        self.forward_with_features(input_ids, attention_mask, feats)
    }

    /// Summed token loss from already projected image features and host labels `[batch, seq]`,
    /// computing logits only at positions that have a label. The LM head over the vocabulary is
    /// the largest matmul of a step and its logits the largest activation; image and prompt
    /// positions are usually masked, so this saves most of both. Same value as
    /// `causal_lm_loss(forward_with_features(..))`.
    pub fn loss_with_features(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
        image_features: Option<Tensor<B, 3>>,
        labels: &[i64],
    ) -> Result<LossSum<B>, ModelError> {
        let [batch, seq] = input_ids.dims();
        if labels.len() != batch * seq {
            return Err(ModelError::Input(format!("{} labels for a batch of {batch} × {seq} tokens", labels.len())));
        }
        let embeds = self.merge_embeddings(input_ids, image_features)?;
        let hidden = self.language_model.decode(embeds, attention_mask);
        Ok(self.loss_from_hidden(hidden, labels))
    }

    /// Summed token loss from the decoder's final hidden states `[batch, seq, hidden]` (after
    /// its norm) and host labels, with logits only where a label exists.
    pub fn loss_from_hidden(&self, hidden: Tensor<B, 3>, labels: &[i64]) -> LossSum<B> {
        let [batch, seq, width] = hidden.dims();
        let hidden = hidden.reshape([batch * seq, width]);
        let targets = shifted_targets(labels, seq);
        let kept: Vec<i64> = (0..targets.len()).filter(|&i| targets[i] != IGNORE_INDEX).map(|i| i as i64).collect();
        if kept.is_empty() {
            // Zero, but still in the graph, so backward over an all-masked micro-batch works.
            return LossSum { sum: hidden.sum().mul_scalar(0.0), label_tokens: 0 };
        }
        let (hidden, targets) = if kept.len() == targets.len() {
            (hidden, targets)
        } else {
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(kept.clone(), [kept.len()]), &hidden.device());
            (hidden.select(0, index), kept.iter().map(|&i| targets[i as usize]).collect())
        };
        let logits = self.language_model.logits(hidden.unsqueeze_dim::<3>(0));
        let [_, rows, vocab] = logits.dims();
        token_loss_sum(logits.reshape([rows, vocab]), &targets)
    }

    /// Forward from already projected image features.
    pub fn forward_with_features(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
        image_features: Option<Tensor<B, 3>>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let embeds = self.merge_embeddings(input_ids, image_features)?;
        let hidden = self.language_model.decode(embeds, attention_mask);
        Ok(self.language_model.logits(hidden))
    }
}

/// The vision tower never trains in LLaVA's recipe: run it on the inner (non-autodiff) backend
/// so no graph is built for it, then hand its features to the trainable projector.
pub fn vision_features_no_grad<B: AutodiffBackend>(model: &LlavaModel<B>, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
    let inner_tower = model.vision_tower.valid();
    let indices = model.config.vision_hidden_state_indices();
    let states = inner_tower.hidden_states(pixel_values.inner(), &indices);
    let x = if states.len() == 1 { states.into_iter().next().expect("one") } else { Tensor::cat(states, 2) };
    let x = match model.config.vision_feature_select_strategy {
        SelectStrategy::Default => {
            let [n, t, h] = x.dims();
            x.slice([0..n, 1..t, 0..h])
        }
        SelectStrategy::Full => x,
    };
    Tensor::from_inner(x)
}
