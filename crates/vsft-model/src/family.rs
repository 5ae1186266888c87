//! Model families: what every vision-language model vsft trains has in common, and the registry
//! that picks a family from a Hugging Face `config.json`.
//!
//! A family is a module that owns its config (a serde mirror of `config.json`), its model and
//! the way its image features are computed and laid out ([`crate::llava`], [`crate::llava_next`]).
//! The trainer, eval, generate and export talk to [`VlmModel`], which dispatches to the family
//! through the [`VisionLanguageModel`] trait. The computation after the image features (merge
//! into the embeddings, decoder, loss over labelled positions, KV-cache decoding) is written once,
//! as the trait's provided methods.
//!
//! Adding a family: a module with its config and model implementing [`VisionLanguageModel`],
//! one variant in [`VlmModel`] (and its arm in `as_dyn`/`as_dyn_mut`), and one line in
//! [`Family::from_model_type`].

use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::Value;

use crate::error::ModelError;
use crate::generate::{pick_token, GenerateOptions};
use crate::llama::{KvCache, LlamaForCausalLM, Positions};
use crate::llava::LlavaModel;
use crate::llava_next::LlavaNextModel;
use crate::qwen2_vl::{Qwen2VlConfig, Qwen2VlModel};
use crate::loss::{shifted_targets, token_loss_sum, LossSum, IGNORE_INDEX};
use crate::nn::Linear;
use crate::weights::{self, ModulePath, NamedParams, RandomInit, StoredDtype, TensorRef};

/// The families vsft implements, by the `model_type` of their `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed-size image, 576 tokens at 336 px.
    Llava,
    /// LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): any-resolution tiles,
    /// unpadded and closed by `image_newline` rows.
    LlavaNext,
    /// Qwen2-VL: native-resolution ViT with 2D RoPE, patch merger, Qwen2 decoder with
    /// multimodal RoPE.
    Qwen2Vl,
    /// Qwen2.5-VL: Qwen2-VL with window attention, RMSNorm and SwiGLU in the ViT.
    Qwen25Vl,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Llava, Family::LlavaNext, Family::Qwen2Vl, Family::Qwen25Vl];

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llava => "llava",
            Family::LlavaNext => "llava_next",
            Family::Qwen2Vl => "qwen2_vl",
            Family::Qwen25Vl => "qwen2_5_vl",
        }
    }

    /// transformers' class, written to `architectures` and named in model cards.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llava => "LlavaForConditionalGeneration",
            Family::LlavaNext => "LlavaNextForConditionalGeneration",
            Family::Qwen2Vl => "Qwen2VLForConditionalGeneration",
            Family::Qwen25Vl => "Qwen2_5_VLForConditionalGeneration",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    /// The family of a `config.json`: its `model_type`, or failing that its `architectures`.
    /// An unknown type is an error that lists the supported ones.
    pub fn from_config_file(path: &Path) -> Result<Family, ModelError> {
        let v = crate::config::read_json_file(path)?;
        Self::from_config(&v).map_err(|message| ModelError::Config { path: path.to_path_buf(), message })
    }

    pub fn from_config(v: &Value) -> Result<Family, String> {
        let model_type = v.get("model_type").and_then(Value::as_str);
        if let Some(f) = model_type.and_then(Family::from_model_type) {
            return Ok(f);
        }
        let archs: Vec<&str> = v.get("architectures").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        if model_type.is_none() {
            if let Some(f) = Family::ALL.into_iter().find(|f| archs.contains(&f.architecture())) {
                return Ok(f);
            }
        }
        let supported: Vec<String> = Family::ALL.iter().map(|f| format!("\"{}\" ({})", f.model_type(), f.architecture())).collect();
        Err(format!(
            "unsupported model_type {:?} (architectures {archs:?}): vsft supports {}",
            model_type.unwrap_or("<absent>"),
            supported.join(", ")
        ))
    }
}

/// A batch's images as the model reads them: the pixels the family's processor produced, and
/// per image what the model needs besides pixels (vsft-data's `ImageBatch`, borrowed).
#[derive(Debug, Clone, Copy)]
pub struct ImageInputs<'a> {
    /// Row-major `shape`, e.g. `[Σ units, 3, H, W]` for CLIP towers.
    pub pixel_values: &'a [f32],
    pub shape: &'a [usize],
    pub images: &'a [ImageInfo],
}

/// One image: its original size, how many leading-axis entries of the pixels it occupies, and
/// the grid its processor laid out (LLaVA-NeXT: `(1, tile rows, tile columns)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageInfo {
    pub original_hw: (usize, usize),
    pub units: usize,
    pub grid: (usize, usize, usize),
}

impl ImageInputs<'_> {
    pub fn n_images(&self) -> usize {
        self.images.len()
    }

    /// The pixels as a `[units, C, H, W]` tensor (CLIP-style towers), checked against the
    /// per-image unit counts.
    pub fn pixels_4d<B: Backend>(&self, device: &B::Device) -> Result<Tensor<B, 4>, ModelError> {
        let shape: [usize; 4] = self.shape.try_into().map_err(|_| ModelError::Input(format!("pixel_values must be 4-D [units, C, H, W], got {:?}", self.shape)))?;
        if shape.iter().product::<usize>() != self.pixel_values.len() {
            return Err(ModelError::Input(format!("pixel_values has {} values, its shape {:?} needs {}", self.pixel_values.len(), shape, shape.iter().product::<usize>())));
        }
        let units: usize = self.images.iter().map(|i| i.units).sum();
        if units != shape[0] {
            return Err(ModelError::Input(format!("the images claim {units} pixel units, pixel_values holds {}", shape[0])));
        }
        Ok(Tensor::from_data(TensorData::new(self.pixel_values.to_vec(), shape), device))
    }
}

/// Images in transformers' batch layout converted to vsft's (owned; borrow with [`Self::inputs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HfImages {
    pub pixel_values: Vec<f32>,
    pub shape: Vec<usize>,
    pub infos: Vec<ImageInfo>,
}

impl HfImages {
    pub fn inputs(&self) -> ImageInputs<'_> {
        ImageInputs { pixel_values: &self.pixel_values, shape: &self.shape, images: &self.infos }
    }
}

/// A vision tower seen as a stack of layers, for per-layer gradient checkpointing when it
/// trains: the first layer's input, `depth` layers, and the states the projector reads from the
/// last layer's output. `vision_states = head(layer(depth−1, … layer(0, stem(images))))`.
pub struct TowerStack<'a, B: Backend> {
    pub depth: usize,
    pub stem: Box<dyn Fn(&ImageInputs) -> Result<Tensor<B, 3>, ModelError> + 'a>,
    pub layer: Box<dyn Fn(usize, Tensor<B, 3>) -> Tensor<B, 3> + 'a>,
    pub head: Box<dyn Fn(Tensor<B, 3>) -> Tensor<B, 3> + 'a>,
}

/// Where a family's parts live, by tensor-name prefix, and the module names PEFT saves them under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartNames {
    /// The part that trains in every stage (`multi_modal_projector.`, Qwen's `visual.merger.`).
    pub projector: &'static str,
    /// The vision tower (`vision_tower.`, Qwen's `visual.`, which holds its merger too).
    pub tower: &'static str,
    /// PEFT `modules_to_save` names of the projector and of a tower trained in full.
    pub projector_module: &'static str,
    pub tower_module: &'static str,
}

impl PartNames {
    /// LLaVA's names, shared by LLaVA-NeXT.
    pub const LLAVA: PartNames = PartNames {
        projector: "multi_modal_projector.",
        tower: "vision_tower.",
        projector_module: "multi_modal_projector",
        tower_module: "vision_tower",
    };

    pub fn is_projector(&self, name: &str) -> bool {
        name.starts_with(self.projector)
    }

    /// In the tower and not its projector (Qwen's merger sits inside `visual.`).
    pub fn is_tower(&self, name: &str) -> bool {
        name.starts_with(self.tower) && !self.is_projector(name)
    }
}

/// What every family computes. Object safe: [`VlmModel`] hands out `&dyn VisionLanguageModel`.
pub trait VisionLanguageModel<B: Backend> {
    fn family(&self) -> Family;
    fn language_model(&self) -> &LlamaForCausalLM<B>;
    fn language_model_mut(&mut self) -> &mut LlamaForCausalLM<B>;
    /// The placeholder id whose positions receive image features.
    fn image_token_id(&self) -> i64;
    /// The vision tower's selected hidden states for a batch's pixels, `[units, tokens, width]`.
    fn vision_states(&self, images: &ImageInputs) -> Result<Tensor<B, 3>, ModelError>;
    /// Vision states → the features that fill the image tokens, in token order over all images
    /// `[image tokens, hidden]` (projector, then the family's layout: LLaVA-NeXT's packing).
    fn project(&self, states: Tensor<B, 3>, images: &ImageInputs) -> Result<Tensor<B, 2>, ModelError>;
    /// The tower as a stack of layers for a batch's images ([`TowerStack`]); `None` when it is
    /// not one (then a trained tower keeps its whole graph even with gradient checkpointing).
    fn tower_stack(&self, images: &ImageInputs) -> Option<TowerStack<'_, B>>;
    /// Every linear layer an adapter can sit on, language model first, under PEFT's module
    /// names (`model.language_model.layers.N.self_attn.q_proj`, `model.vision_tower.…`).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)>;
    /// Where the projector and the tower live ([`PartNames`]).
    fn part_names(&self) -> PartNames {
        PartNames::LLAVA
    }
    /// The tensor name a checkpoint of the family's Hub layout uses for a parameter (vsft's
    /// names are the LLaVA families' legacy layout, which they write as is).
    fn hub_name(&self, name: &str) -> String {
        name.to_string()
    }
    /// The family's `config.json` (`architectures` and `torch_dtype` are added on saving).
    fn config_json(&self) -> Value;

    fn device(&self) -> B::Device {
        self.language_model().model.norm.weight.val().device()
    }

    /// Where the tokens sit for the decoder's rotary embedding, from host `input_ids` and
    /// `attention_mask` (`[batch·seq]`) and the batch's images: `0..seq` per row unless the
    /// family places image tokens on a grid (Qwen2-VL's multimodal RoPE).
    fn positions(&self, _input_ids: &[i64], _attention_mask: &[i64], _seq: usize, _images: &[ImageInfo]) -> Result<Positions, ModelError> {
        Ok(Positions::Sequential)
    }

    /// Image features through the whole model (tower with a graph if the backend has one).
    fn image_features(&self, images: &ImageInputs) -> Result<Tensor<B, 2>, ModelError> {
        self.project(self.vision_states(images)?, images)
    }

    /// Token embeddings with the image features scattered into the image-token positions,
    /// row-major over the batch (as `masked_scatter` fills them).
    fn merge_embeddings(&self, input_ids: Tensor<B, 2, Int>, image_features: Option<Tensor<B, 2>>) -> Result<Tensor<B, 3>, ModelError> {
        let [batch, seq] = input_ids.dims();
        let ids_host: Vec<i64> = input_ids.to_data().convert::<i64>().into_vec().expect("int data");
        let lm = self.language_model();
        let embeds = lm.model.embed_tokens.forward(input_ids);
        let hidden = embeds.dims()[2];
        let image_token = self.image_token_id();
        let per_row: Vec<usize> = ids_host.chunks(seq).map(|row| row.iter().filter(|&&t| t == image_token).count()).collect();
        let total_tokens: usize = per_row.iter().sum();
        let n_feat = image_features.as_ref().map(|f| f.dims()[0]).unwrap_or(0);
        if total_tokens != n_feat {
            return Err(ModelError::Input(format!(
                "image tokens ({total_tokens}; per row {per_row:?}) and image features ({n_feat}) do not match"
            )));
        }
        let Some(feats) = image_features.filter(|_| n_feat > 0) else { return Ok(embeds) };
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

    /// [`Self::positions`] from device tensors.
    fn positions_of(&self, input_ids: &Tensor<B, 2, Int>, attention_mask: &Tensor<B, 2, Int>, images: &[ImageInfo]) -> Result<Positions, ModelError> {
        let host = |t: &Tensor<B, 2, Int>| t.to_data().convert::<i64>().into_vec::<i64>().expect("int data");
        self.positions(&host(input_ids), &host(attention_mask), input_ids.dims()[1], images)
    }

    /// Full forward: logits `[batch, seq, vocab]`.
    fn forward(&self, input_ids: Tensor<B, 2, Int>, attention_mask: Tensor<B, 2, Int>, images: Option<&ImageInputs>) -> Result<Tensor<B, 3>, ModelError> {
        let images = images.filter(|i| i.n_images() > 0);
        let positions = self.positions_of(&input_ids, &attention_mask, images.map(|i| i.images).unwrap_or(&[]))?;
        let feats = images.map(|i| self.image_features(i)).transpose()?;
        self.forward_with_features(input_ids, attention_mask, feats, &positions)
    }

    /// Forward from already computed image features.
    fn forward_with_features(&self, input_ids: Tensor<B, 2, Int>, attention_mask: Tensor<B, 2, Int>, image_features: Option<Tensor<B, 2>>, positions: &Positions) -> Result<Tensor<B, 3>, ModelError> {
        let embeds = self.merge_embeddings(input_ids, image_features)?;
        let lm = self.language_model();
        Ok(lm.logits(lm.decode_at(embeds, attention_mask, positions)))
    }

    /// Summed token loss from image features and host labels `[batch, seq]`, computing logits
    /// only at positions that have a label. The LM head over the vocabulary is the largest
    /// matmul of a step and its logits the largest activation; image and prompt positions are
    /// usually masked, so this saves most of both. Same value as the loss over `forward`'s logits.
    fn loss_with_features(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
        image_features: Option<Tensor<B, 2>>,
        labels: &[i64],
        positions: &Positions,
    ) -> Result<LossSum<B>, ModelError> {
        let [batch, seq] = input_ids.dims();
        if labels.len() != batch * seq {
            return Err(ModelError::Input(format!("{} labels for a batch of {batch} × {seq} tokens", labels.len())));
        }
        let embeds = self.merge_embeddings(input_ids, image_features)?;
        let hidden = self.language_model().decode_at(embeds, attention_mask, positions);
        Ok(self.loss_from_hidden(hidden, labels))
    }

    /// Summed token loss from the decoder's final hidden states `[batch, seq, hidden]` (after
    /// its norm) and host labels, with logits only where a label exists.
    fn loss_from_hidden(&self, hidden: Tensor<B, 3>, labels: &[i64]) -> LossSum<B> {
        let [batch, seq, width] = hidden.dims();
        let hidden = hidden.reshape([batch * seq, width]);
        let targets = shifted_targets(labels, seq);
        let kept: Vec<i64> = (0..targets.len()).filter(|&i| targets[i] != IGNORE_INDEX).map(|i| i as i64).collect();
        if kept.is_empty() {
            // Zero, but still in the graph, so backward over an all-masked micro-batch works.
            return LossSum { sum: hidden.sum().mul_scalar(0.0), label_tokens: 0, correct_tokens: 0 };
        }
        let (hidden, targets) = if kept.len() == targets.len() {
            (hidden, targets)
        } else {
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(kept.clone(), [kept.len()]), &hidden.device());
            (hidden.select(0, index), kept.iter().map(|&i| targets[i as usize]).collect())
        };
        let logits = self.language_model().logits(hidden.unsqueeze_dim::<3>(0));
        let [_, rows, vocab] = logits.dims();
        token_loss_sum(logits.reshape([rows, vocab]), &targets)
    }

    /// Generates after `prompt_ids` (one sequence, image tokens already expanded): the vision
    /// tower runs once, the prompt fills a KV cache, then one token at a time, calling
    /// `on_token` with each new token (return false to stop). Returns the new tokens.
    fn generate(&self, prompt_ids: &[i64], images: Option<&ImageInputs>, opts: &GenerateOptions, on_token: &mut dyn FnMut(i64) -> bool) -> Result<Vec<i64>, ModelError> {
        let device = self.device();
        let lm = self.language_model();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(prompt_ids.to_vec(), [1, prompt_ids.len()]), &device);
        let images = images.filter(|i| i.n_images() > 0);
        let positions = self.positions(prompt_ids, &vec![1; prompt_ids.len()], prompt_ids.len(), images.map(|i| i.images).unwrap_or(&[]))?;
        let features = images.map(|i| self.image_features(i)).transpose()?;
        let embeds = self.merge_embeddings(ids, features)?;
        let mut cache = KvCache::default();
        if let Positions::Multimodal(p) = &positions {
            // The tokens after the prompt continue from its largest position.
            cache.position_delta = p.iter().flatten().max().map_or(0, |m| m + 1) - prompt_ids.len() as i64;
        }
        let mut rng = RandomInit::new(opts.seed);
        let mut hidden = lm.decode_cached(embeds, &mut cache, Some(&positions));
        let mut out = Vec::new();
        for _ in 0..opts.max_new_tokens {
            let [_, t, h] = hidden.dims();
            let last = hidden.slice([0..1, t - 1..t, 0..h]);
            let logits: Vec<f32> = lm.logits(last).into_data().convert::<f32>().into_vec().expect("f32");
            let token = pick_token(&logits, opts, &mut rng);
            out.push(token);
            if opts.eos_token_ids.contains(&token) || !on_token(token) {
                break;
            }
            let next = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![token], [1, 1]), &device);
            let embeds = lm.model.embed_tokens.forward(next);
            hidden = lm.decode_cached(embeds, &mut cache, None);
        }
        Ok(out)
    }
}

/// A model of any supported family. Burn's module derive gives it visiting, mapping and the
/// autodiff conversions; [`ModulePath`] keeps the variant out of tensor names.
#[derive(Module, Debug)]
pub enum VlmModel<B: Backend> {
    Llava(LlavaModel<B>),
    LlavaNext(LlavaNextModel<B>),
    /// Qwen2-VL and Qwen2.5-VL.
    QwenVl(Qwen2VlModel<B>),
}

impl<B: Backend> VlmModel<B> {
    pub fn as_dyn(&self) -> &dyn VisionLanguageModel<B> {
        match self {
            VlmModel::Llava(m) => m,
            VlmModel::LlavaNext(m) => m,
            VlmModel::QwenVl(m) => m,
        }
    }

    pub fn as_dyn_mut(&mut self) -> &mut dyn VisionLanguageModel<B> {
        match self {
            VlmModel::Llava(m) => m,
            VlmModel::LlavaNext(m) => m,
            VlmModel::QwenVl(m) => m,
        }
    }

    /// Loads a Hugging Face model directory of any supported family (`config.json` + safetensors,
    /// single or sharded, any of the family's key layouts, f16/bf16/f32).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        Self::load_with(dir, device, StoredDtype::F32)
    }

    /// [`Self::load`] with the frozen parameters held in `frozen_dtype` (`model.dtype`).
    pub fn load_with(dir: &Path, device: &B::Device, frozen_dtype: StoredDtype) -> Result<Self, ModelError> {
        Ok(match Family::from_config_file(&dir.join("config.json"))? {
            Family::Llava => VlmModel::Llava(LlavaModel::load_with(dir, device, frozen_dtype)?),
            Family::LlavaNext => VlmModel::LlavaNext(LlavaNextModel::load_with(dir, device, frozen_dtype)?),
            Family::Qwen2Vl | Family::Qwen25Vl => VlmModel::QwenVl(Qwen2VlModel::load_with(dir, device, frozen_dtype)?),
        })
    }

    /// A seeded random model from a `config.json` value of any family (tests, demo, `vsft init`),
    /// validated and refused if its f32 parameters cannot fit in memory, before any is made.
    pub fn random_from_config(config: &Value, seed: u64, device: &B::Device) -> Result<Self, String> {
        let fits = |params| weights::fits_in_memory(params, StoredDtype::F32.size() as u64).map_err(|m| format!("the model does not fit in memory: {m}"));
        Ok(match Family::from_config(config)? {
            Family::Llava => {
                let cfg: crate::LlavaConfig = crate::config::from_json(config.clone())?;
                cfg.validate()?;
                fits(cfg.parameter_count())?;
                VlmModel::Llava(LlavaModel::random(&cfg, seed, device))
            }
            Family::LlavaNext => {
                let cfg = crate::LlavaNextConfig::from_value(config.clone())?;
                fits(cfg.parameter_count())?;
                VlmModel::LlavaNext(LlavaNextModel::random(&cfg, seed, device))
            }
            Family::Qwen2Vl | Family::Qwen25Vl => {
                let cfg = Qwen2VlConfig::from_value(config.clone())?;
                fits(cfg.parameter_count())?;
                VlmModel::QwenVl(Qwen2VlModel::random(&cfg, seed, device))
            }
        })
    }

    pub fn family(&self) -> Family {
        self.as_dyn().family()
    }

    /// `pixel_values` (and `image_sizes`, or Qwen's `image_grid_thw`) as transformers' processor
    /// batches them for this family: LLaVA's `[images, 3, H, W]`; LLaVA-NeXT's
    /// `[images, max tiles, 3, H, W]` with the tile axis zero-padded; Qwen's `[patches, 1176]`.
    /// For parity checks and `vsft logits`.
    pub fn images_from_hf(&self, pixel_values: &weights::RawTensor, image_sizes: Option<&weights::RawTensor>) -> Result<HfImages, ModelError> {
        let values = pixel_values.to_f32()?;
        let shape = pixel_values.shape.clone();
        match (self, shape.len()) {
            (VlmModel::Llava(_), 4) => {
                let infos = vec![ImageInfo { original_hw: (shape[2], shape[3]), units: 1, grid: (1, 1, 1) }; shape[0]];
                Ok(HfImages { pixel_values: values, shape, infos })
            }
            (VlmModel::LlavaNext(m), 5) => {
                let sizes = image_sizes.ok_or_else(|| ModelError::Input("LLaVA-NeXT's pixel_values need image_sizes".into()))?.to_i64()?;
                let sizes: Vec<(usize, usize)> = sizes.chunks(2).map(|s| (s[0].max(1) as usize, s[1].max(1) as usize)).collect();
                let (pixel_values, shape, infos) = m.config.from_hf_inputs(&values, shape.try_into().expect("5-D"), &sizes)?;
                Ok(HfImages { pixel_values, shape: shape.to_vec(), infos })
            }
            (VlmModel::QwenVl(_), 2) => {
                let grids = image_sizes.ok_or_else(|| ModelError::Input("Qwen's pixel_values need image_grid_thw".into()))?.to_i64()?;
                let infos = grids
                    .chunks(3)
                    .map(|g| {
                        let (t, h, w) = (g[0].max(0) as usize, g[1].max(0) as usize, g[2].max(0) as usize);
                        ImageInfo { original_hw: (h, w), units: t * h * w, grid: (t, h, w) }
                    })
                    .collect();
                Ok(HfImages { pixel_values: values, shape, infos })
            }
            _ => Err(ModelError::Input(format!("pixel_values {shape:?} does not fit a {} model", self.family().model_type()))),
        }
    }

    pub fn language_model(&self) -> &LlamaForCausalLM<B> {
        self.as_dyn().language_model()
    }

    pub fn device(&self) -> B::Device {
        self.as_dyn().device()
    }

    /// Every parameter with its tensor name in the family's legacy Hub layout.
    pub fn named_tensors(&self) -> Vec<(String, burn::module::ParamId, TensorRef<B>)> {
        NamedParams::collect(self)
    }

    /// Writes `config.json` and the weights (the Hub's legacy layout, sharded at
    /// `max_shard_bytes`) into `dir`, which must exist.
    pub fn save(&self, dir: &Path, dtype: StoredDtype, max_shard_bytes: u64) -> Result<(), ModelError> {
        let named = self.named_tensors();
        let m = self.as_dyn();
        let pending = named.iter().map(|(n, _, t)| weights::PendingTensor::from_tensor(m.hub_name(n), t)).collect();
        weights::write_sharded(dir, pending, dtype, max_shard_bytes)?;
        let mut cfg = self.as_dyn().config_json();
        cfg["torch_dtype"] = dtype.torch_name().into();
        cfg["architectures"] = serde_json::json!([self.family().architecture()]);
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).expect("json")).map_err(|e| ModelError::io(&path, e))
    }

    /// The parameters that train with the projector in every stage (the projector, and
    /// LLaVA-NeXT's `image_newline`), by tensor name.
    pub fn projector_tensors(&self) -> Vec<(String, TensorRef<B>)> {
        let parts = self.as_dyn().part_names();
        self.named_tensors()
            .into_iter()
            .filter(|(n, _, _)| parts.is_projector(n))
            .map(|(n, _, t)| (n, t))
            .collect()
    }

    /// Replaces parameters by tensor name with raw tensors of the same shape (a stage-1
    /// projector, an adapter's saved projector). Every name must exist with its shape.
    pub fn with_tensors(self, tensors: &[(String, weights::RawTensor)], source: &Path) -> Result<Self, ModelError> {
        let shapes: std::collections::BTreeMap<String, Vec<usize>> = self.named_tensors().into_iter().map(|(n, _, t)| (n, t.shape)).collect();
        let mut values = std::collections::BTreeMap::new();
        for (name, raw) in tensors {
            let want = shapes.get(name).ok_or_else(|| ModelError::Input(format!("{}: {name} is not a parameter of this {} model", source.display(), self.family().model_type())))?;
            if &raw.shape != want {
                return Err(ModelError::Input(format!("{}: {name} has shape {:?}, the model needs {want:?}", source.display(), raw.shape)));
            }
            values.insert(name.clone(), raw.to_f32()?);
        }
        let device = self.device();
        Ok(self.map(&mut ParamSetter::<B> { path: ModulePath::default(), values, device }))
    }
}

/// Replaces float parameters by tensor name (keeping their ids), values on the host.
struct ParamSetter<B: Backend> {
    path: ModulePath,
    values: std::collections::BTreeMap<String, Vec<f32>>,
    device: B::Device,
}

impl<B: Backend> ModuleMapper<B> for ParamSetter<B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, container_type: &str) {
        self.path.exit(container_type);
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        match self.values.remove(&self.path.join()) {
            Some(v) => {
                let (id, old, mapper) = param.consume();
                let new = Tensor::<B, D>::from_data(TensorData::new(v, old.dims()), &self.device).set_require_grad(old.is_require_grad());
                Param::from_mapped_value(id, new, mapper)
            }
            None => param,
        }
    }
}

impl<B: AutodiffBackend> VlmModel<B> {
    /// Image features for training: with the tower frozen it runs on the inner backend, so no
    /// graph is built for it; the projector (and packing) always build one.
    pub fn image_features_for_training(&self, images: &ImageInputs, tower_trains: bool) -> Result<Tensor<B, 2>, ModelError> {
        let states = if tower_trains {
            self.as_dyn().vision_states(images)?
        } else {
            Tensor::from_inner(self.valid().as_dyn().vision_states(images)?)
        };
        self.as_dyn().project(states, images)
    }
}
