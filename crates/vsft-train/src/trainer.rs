//! One optimizer step of vision-language training over Burn autodiff, for every model family:
//! forward (a frozen vision tower without a graph), token-weighted loss over the micro-batches of the step, backward, global-norm
//! clipping, AdamW on the trainable parameters only.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use vsft_data::{Batch, ImageBatch};
use vsft_model::loss::IGNORE_INDEX;
use vsft_model::weights::ModulePath;
use vsft_model::{ImageInfo, ImageInputs, PartNames, VisionLanguageModel, VlmModel};

use crate::distributed::{all_reduce_bucketed, all_reduce_scalars, pack, unpack, Communicator, SingleRank, BUCKET_BYTES};
use crate::error::TrainError;
use crate::optim::{clip_coefficient, global_norm, AdamW, AdamWConfig, GroupSettings};
use crate::recipe::Stage;

/// The optimisation settings of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimSettings {
    pub lr: f64,
    pub projector_lr: Option<f64>,
    /// The vision tower's parameters and adapters (`train.vision_lr`); defaults to `lr`.
    pub vision_lr: Option<f64>,
    pub weight_decay: f64,
    pub adam: AdamWConfig,
    pub max_grad_norm: f64,
    pub seed: u64,
}

/// A named parameter group and whether it trains (what the log shows at start).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupReport {
    pub name: &'static str,
    pub trains: bool,
    pub params: usize,
    pub lr: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean loss over the step's label tokens.
    pub loss: f64,
    /// Gradient norm before clipping (what transformers logs).
    pub grad_norm: f64,
    pub label_tokens: usize,
    /// Non-pad tokens processed.
    pub tokens: usize,
    pub samples: usize,
    pub images: usize,
    /// The mean over micro-batches of the share of label tokens predicted right (TRL's).
    pub mean_token_accuracy: f64,
    /// Seconds this rank spent in collectives during the step (waiting for the others
    /// included); 0 on one rank.
    pub communication_seconds: f64,
}

/// Model + optimizer + which parameters train.
pub struct Trainer<B: AutodiffBackend> {
    pub model: VlmModel<B>,
    pub optimizer: AdamW<B::InnerBackend>,
    /// Trainable parameter (module path) → its group settings.
    pub trainable: BTreeMap<String, GroupSettings>,
    pub settings: OptimSettings,
    pub stage: Stage,
    /// `[train] gradient_checkpointing`: keep only each decoder layer's input in the forward
    /// and re-run one layer at a time in backward ([`Trainer::checkpointed_grads`]).
    pub gradient_checkpointing: bool,
    /// Some vision-tower parameter trains (its weights or adapters): the tower then runs with a
    /// graph; otherwise on the inner backend, building none.
    pub tower_trains: bool,
}

/// What trains in a run besides the stage's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainParts {
    pub stage: Stage,
    /// `train.freeze_vision_tower = false`: every tower weight trains.
    pub vision_tower: bool,
}

impl From<Stage> for TrainParts {
    fn from(stage: Stage) -> Self {
        TrainParts { stage, vision_tower: false }
    }
}

/// Label tokens that count for the loss: `labels[:, 1:] != -100`, as transformers counts
/// `num_items_in_batch`.
pub fn shifted_label_tokens(batch: &Batch) -> usize {
    (0..batch.batch_size).map(|b| batch.row_labels(b)[1..].iter().filter(|&&l| l != IGNORE_INDEX).count()).sum()
}

/// transformers Trainer's rule for which parameters skip weight decay: those inside a
/// LayerNorm, and those whose lower-cased name has `bias`, `layernorm`, `rmsnorm`, a `norm`
/// segment or a segment ending in `_norm`. (So an RMSNorm named `ln_q` or `norm1` decays,
/// as it does in transformers.)
pub fn is_no_decay(name: &str, in_layer_norm: bool) -> bool {
    let n = name.to_lowercase();
    in_layer_norm
        || n.contains("bias")
        || n.contains("layernorm")
        || n.contains("rmsnorm")
        || n.split('.').any(|seg| seg == "norm" || seg.ends_with("_norm"))
}

/// Which module paths train: the projector always; LoRA adapters in the instruct stage; the
/// vision tower's weights when it is unfrozen. LLaVA-NeXT's `image_newline` never does: LLaVA-
/// NeXT's own code trains it only with the whole language model.
pub fn is_trainable(parts: TrainParts, names: PartNames, path: &str) -> bool {
    names.is_projector(path) || (parts.stage == Stage::Instruct && path.contains(".lora.")) || (parts.vision_tower && names.is_tower(path))
}

/// Where a batch's tokens sit for the decoder's rotary embedding.
pub fn batch_positions<B: Backend>(model: &dyn VisionLanguageModel<B>, batch: &Batch) -> Result<vsft_model::Positions, TrainError> {
    Ok(model.positions(&batch.input_ids, &batch.attention_mask, batch.seq_len, &image_infos(&batch.images))?)
}

/// The images of a batch as the model reads them.
pub fn image_infos(images: &ImageBatch) -> Vec<ImageInfo> {
    images.meta.iter().map(|m| ImageInfo { original_hw: m.original_hw, units: m.units, grid: m.grid }).collect()
}

/// Borrows a batch's images for the model (`infos` from [`image_infos`]).
pub fn image_inputs<'a>(images: &'a ImageBatch, infos: &'a [ImageInfo]) -> ImageInputs<'a> {
    ImageInputs { pixel_values: &images.pixel_values, shape: &images.shape, images: infos }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Freezes everything that does not train in `stage` (LoRA adapters must already be added
    /// for `instruct`) and sets up AdamW with HF's no-decay rule (biases and norms).
    pub fn new(model: VlmModel<B>, parts: impl Into<TrainParts>, settings: OptimSettings) -> Result<Self, TrainError> {
        let parts = parts.into();
        let stage = parts.stage;
        let names = model.as_dyn().part_names();
        let mut freezer = Freezer { path: ModulePath::default(), parts, names, trainable: BTreeMap::new(), in_layer_norm: Default::default() };
        let model = model.map(&mut freezer);
        let mut trainable = BTreeMap::new();
        for name in freezer.trainable.keys() {
            let lr = if names.is_projector(name) && stage == Stage::Instruct {
                settings.projector_lr.unwrap_or(settings.lr)
            } else if names.is_tower(name) {
                settings.vision_lr.unwrap_or(settings.lr)
            } else {
                settings.lr
            };
            let weight_decay = if is_no_decay(name, freezer.in_layer_norm.contains(name)) { 0.0 } else { settings.weight_decay };
            trainable.insert(name.clone(), GroupSettings { lr_scale: lr / settings.lr, weight_decay });
        }
        if stage == Stage::Instruct && !trainable.keys().any(|k| k.contains(".lora.")) {
            return Err(TrainError::Other("stage instruct needs LoRA adapters on the language model".into()));
        }
        let tower_trains = trainable.keys().any(|k| names.is_tower(k));
        Ok(Self { model, optimizer: AdamW::new(settings.adam), trainable, settings, stage, gradient_checkpointing: false, tower_trains })
    }

    /// The vision tower's own weights train (not only adapters on it).
    pub fn tower_trains_in_full(&self) -> bool {
        let names = self.model.as_dyn().part_names();
        self.trainable.keys().any(|k| names.is_tower(k) && !k.contains(".lora."))
    }

    /// Parameter counts per group, for the start-of-run log (Prismatic's explicit stage report).
    pub fn group_report(&self) -> Vec<GroupReport> {
        let named = vsft_model::weights::NamedParams::collect(&self.model);
        let names = self.model.as_dyn().part_names();
        // "tower" is the tower without its projector; other prefixes count as they are.
        let count = |prefix: &str, lora: Option<bool>| -> usize {
            named
                .iter()
                .filter(|(n, _, _)| if prefix == names.tower { names.is_tower(n) } else { n.starts_with(prefix) })
                .filter(|(n, _, _)| lora.is_none_or(|l| n.contains(".lora.") == l))
                .map(|(_, _, t)| t.shape.iter().product::<usize>())
                .sum()
        };
        let lora_params = count("language_model.", Some(true));
        let vision_lora = count(names.tower, Some(true));
        let proj_lr = if self.stage == Stage::Instruct { self.settings.projector_lr.unwrap_or(self.settings.lr) } else { self.settings.lr };
        let vision_lr = Some(self.settings.vision_lr.unwrap_or(self.settings.lr));
        let tower_base = self.tower_trains_in_full();
        let mut groups = vec![
            GroupReport { name: "vision tower", trains: tower_base, params: count(names.tower, Some(false)), lr: vision_lr.filter(|_| tower_base) },
            GroupReport { name: "projector", trains: true, params: count(names.projector, None), lr: Some(proj_lr) },
        ];
        let newline = count("image_newline", None);
        if newline > 0 {
            groups.push(GroupReport { name: "image_newline", trains: false, params: newline, lr: None });
        }
        groups.push(GroupReport { name: "language model (base)", trains: false, params: count("language_model.", Some(false)), lr: None });
        if vision_lora > 0 {
            groups.push(GroupReport { name: "vision tower LoRA adapters", trains: true, params: vision_lora, lr: vision_lr });
        }
        if lora_params > 0 {
            groups.push(GroupReport { name: "LoRA adapters", trains: true, params: lora_params, lr: Some(self.settings.lr) });
        }
        groups
    }

    /// Forward of one batch → (summed token loss, label tokens), in the autodiff graph.
    pub fn loss_sum(&self, batch: &Batch) -> Result<vsft_model::loss::LossSum<B>, TrainError> {
        let (ids, mask, feats) = self.inputs(batch)?;
        let positions = batch_positions(self.model.as_dyn(), batch)?;
        let loss = self.model.as_dyn().loss_with_features(ids, mask, feats, &batch.labels, &positions)?;
        Ok(loss)
    }

    /// A batch's ids and attention mask on the device, and its image features through the
    /// (trainable) projector; the vision tower runs without a graph.
    fn inputs(&self, batch: &Batch) -> Result<(Tensor<B, 2, Int>, Tensor<B, 2, Int>, Option<Tensor<B, 2>>), TrainError> {
        let (ids, mask, _) = batch_tensors::<B>(batch, &self.device());
        let infos = image_infos(&batch.images);
        let feats = if infos.is_empty() {
            None
        } else {
            Some(self.model.image_features_for_training(&image_inputs(&batch.images, &infos), self.tower_trains)?)
        };
        Ok((ids, mask, feats))
    }

    fn device(&self) -> B::Device {
        self.model.device()
    }

    /// Per-layer gradient checkpointing for one micro-batch: the loss (already divided by
    /// `num_items`), the label tokens predicted right, and the gradients, in parts. The forward runs the decoder (and a trained
    /// vision tower) without a graph, keeping only each layer's input; backward goes from the
    /// top down, re-running one layer at a time with a graph and handing its input gradient to
    /// the layer below. Costs one more forward; activation memory is one layer's graph plus the
    /// inputs. Each layer's dropout seed depends on `seed` and the layer, so both runs draw the
    /// same masks.
    pub fn checkpointed_grads(&self, batch: &Batch, num_items: usize, seed: u64) -> Result<(f64, usize, Vec<B::Gradients>), TrainError> {
        let device = self.device();
        let model = self.model.as_dyn();
        let layer_seed = |l: usize| seed ^ (l as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let tower_seed = |l: usize| layer_seed(l + 1_000_000);
        let frozen = self.model.valid();

        // A trained tower that is a stack of layers: checkpointed like the decoder.
        let infos = image_infos(&batch.images);
        let images = image_inputs(&batch.images, &infos);
        let stacks = match (self.tower_trains && !infos.is_empty(), frozen.as_dyn().tower_stack(&images), model.tower_stack(&images)) {
            (true, Some(inner), Some(outer)) => Some((inner, outer)),
            _ => None,
        };
        let (ids, mask, feats, tower) = match stacks {
            Some((inner, outer)) => {
                let (ids, mask, _) = batch_tensors::<B>(batch, &device);
                let (top, inputs) = forward_keeping_inputs((inner.stem)(&images)?, inner.depth, |i, x| {
                    B::seed(&device, tower_seed(i));
                    vsft_model::nn::with_training_dropout(|| (inner.layer)(i, x))
                });
                let top = Tensor::<B, 3>::from_inner(top).require_grad();
                let feats = model.project((outer.head)(top.clone()), &images)?;
                (ids, mask, Some(feats), Some((top, inputs, outer)))
            }
            None => {
                let (ids, mask, feats) = self.inputs(batch)?;
                (ids, mask, feats, None)
            }
        };
        let embeds = model.merge_embeddings(ids, feats)?;
        let lm = model.language_model();
        let positions = batch_positions(model, batch)?;

        // The decoder without a graph, keeping each layer's input.
        let frozen_lm = frozen.language_model();
        let (rope, layer_mask) = frozen_lm.layer_inputs_at(&embeds.clone().inner(), mask.clone().inner(), &positions);
        let (x, inputs) = forward_keeping_inputs(embeds.clone().inner(), frozen_lm.model.layers.len(), |l, x| {
            B::seed(&device, layer_seed(l));
            vsft_model::nn::with_training_dropout(|| frozen_lm.model.layers[l].forward(x, &rope, &layer_mask))
        });

        // The top (final norm, head, loss) with a graph from the last layer's output.
        let top = Tensor::<B, 3>::from_inner(x).require_grad();
        let loss_sum = model.loss_from_hidden(lm.model.norm.forward(top.clone()), &batch.labels);
        let correct = loss_sum.correct_tokens;
        let loss = loss_sum.sum / num_items as f64;
        let value = loss.clone().into_scalar().elem::<f64>();
        let grads = loss.backward();
        let upstream = top.grad(&grads).ok_or_else(|| TrainError::Other("checkpointing: the loss does not depend on the decoder".into()))?;
        let mut all = vec![grads];

        // Each decoder layer again, top down, with a graph; then the embeddings (and through them
        // the projector, and the tower's top when it trains).
        let (rope, layer_mask) = lm.layer_inputs_at(&embeds, mask, &positions);
        let upstream = backward_through_layers::<B>(&inputs, upstream, &mut all, "decoder layer", |l, x| {
            B::seed(&device, layer_seed(l));
            lm.model.layers[l].forward(x, &rope, &layer_mask)
        })?;
        all.push((embeds * Tensor::from_inner(upstream)).sum().backward());

        // The tower's layers, top down, then its stem (embeddings).
        if let Some((top, inputs, stack)) = tower {
            let upstream = top.grad(all.last().expect("one")).ok_or_else(|| TrainError::Other("checkpointing: the features do not depend on the vision tower".into()))?;
            let upstream = backward_through_layers::<B>(&inputs, upstream, &mut all, "vision layer", |i, x| {
                B::seed(&device, tower_seed(i));
                (stack.layer)(i, x)
            })?;
            all.push(((stack.stem)(&images)? * Tensor::from_inner(upstream)).sum().backward());
        }
        Ok((value, correct, all))
    }

    /// One optimizer step over `micro_batches` (gradient accumulation), weighting each by its
    /// label tokens: every micro-batch's summed loss is divided by the step's total label
    /// tokens, as transformers does with `num_items_in_batch`. `global_step` seeds dropout so
    /// that a resumed run draws the same masks.
    pub fn step(&mut self, micro_batches: &[Batch], lr: f64, global_step: usize, skip_non_finite: bool) -> Result<Option<StepStats>, TrainError> {
        self.step_across(micro_batches, lr, global_step, skip_non_finite, &SingleRank)
    }

    /// [`Trainer::step`] as one rank of a data-parallel job (see [`crate::distributed`]): the
    /// loss is divided by the label tokens of every rank's micro-batches, the gradients are
    /// summed across ranks in buckets, and every rank clips and updates the same way. Every
    /// rank must call it with the same number of micro-batches. The stats are the whole
    /// job's (loss, tokens, samples, images, accuracy over all ranks' micro-batches).
    pub fn step_across(&mut self, micro_batches: &[Batch], lr: f64, global_step: usize, skip_non_finite: bool, comm: &dyn Communicator<B::InnerBackend>) -> Result<Option<StepStats>, TrainError> {
        let device = self.device();
        let inner_device = self.inner_device();
        let local_items: usize = micro_batches.iter().map(shifted_label_tokens).sum();
        let started = Instant::now();
        let num_items = all_reduce_scalars(comm, &[local_items as f64], &inner_device)?[0].round() as usize;
        let mut communication = started.elapsed();
        if num_items == 0 {
            return Err(TrainError::Other(format!(
                "step {}: every label of the step's {} batch(es) is -100: nothing to train on (check data.label_mask and max_length)",
                global_step + 1,
                micro_batches.len()
            )));
        }
        let mut acc: BTreeMap<String, Tensor<B::InnerBackend, 1>> = BTreeMap::new();
        let mut loss_total = 0.0;
        let mut accuracy_sum = 0.0;
        for (i, batch) in micro_batches.iter().enumerate() {
            let seed = self.settings.seed.wrapping_mul(1_000_003).wrapping_add((global_step * 1024 + i) as u64);
            B::seed(&device, seed);
            let (loss, correct, all_grads) = if self.gradient_checkpointing {
                self.checkpointed_grads(batch, num_items, seed)?
            } else {
                let sum = self.loss_sum(batch)?;
                let loss = sum.sum / num_items as f64;
                (loss.clone().into_scalar().elem::<f64>(), sum.correct_tokens, vec![loss.backward()])
            };
            loss_total += loss;
            // TRL: the accuracy of each forward (micro-batch), averaged when logged.
            accuracy_sum += correct as f64 / shifted_label_tokens(batch).max(1) as f64;
            for grads in &all_grads {
                for (name, g) in TrainableCollector::collect(&self.model, &self.trainable, Some(grads)) {
                    let merged = match acc.remove(&name) {
                        Some(prev) => prev + g,
                        None => g,
                    };
                    acc.insert(name, merged);
                }
            }
        }
        let params = self.trainable_values();
        let mut stats = StepStats {
            loss: loss_total,
            grad_norm: 0.0,
            label_tokens: num_items,
            tokens: micro_batches.iter().map(|b| b.attention_mask.iter().filter(|&&m| m != 0).count()).sum(),
            samples: micro_batches.iter().map(|b| b.batch_size).sum(),
            images: micro_batches.iter().map(|b| b.images.meta.len()).sum(),
            mean_token_accuracy: accuracy_sum / micro_batches.len() as f64,
            communication_seconds: 0.0,
        };
        if comm.world_size() > 1 {
            let started = Instant::now();
            self.reduce_across(comm, &mut acc, &params, &mut stats, accuracy_sum, micro_batches.len())?;
            communication += started.elapsed();
            stats.communication_seconds = communication.as_secs_f64();
        }
        // Clipping and AdamW over the (reduced) gradients, the same on every rank.
        let loss_total = stats.loss;
        if !loss_total.is_finite() {
            if skip_non_finite {
                return Ok(None);
            }
            return Err(TrainError::NonFinite { step: global_step + 1, loss: loss_total });
        }
        let grad_norm = global_norm(&acc);
        let coef = clip_coefficient(grad_norm, self.settings.max_grad_norm);
        self.optimizer.begin_step();
        let mut updated = BTreeMap::new();
        for (name, settings) in &self.trainable {
            let (Some(p), Some(g)) = (params.get(name), acc.remove(name)) else { continue };
            let g = if coef < 1.0 { g * coef } else { g };
            let new = self.optimizer.update(name, p.clone(), g, lr * settings.lr_scale, settings.weight_decay);
            updated.insert(name.clone(), new);
        }
        self.set_trainable_values(updated);
        stats.grad_norm = grad_norm;
        Ok(Some(stats))
    }

    /// The cross-rank part of [`Trainer::step_across`]: the job's stats, then the gradients.
    /// Every trainable tensor travels, as zeros where this rank has no gradient, and a presence
    /// flag per tensor says whether any rank had one (a tensor no rank touched is then left out,
    /// as on one device).
    fn reduce_across(
        &self,
        comm: &dyn Communicator<B::InnerBackend>,
        acc: &mut BTreeMap<String, Tensor<B::InnerBackend, 1>>,
        params: &BTreeMap<String, Tensor<B::InnerBackend, 1>>,
        stats: &mut StepStats,
        accuracy_sum: f64,
        micro_batches: usize,
    ) -> Result<(), TrainError> {
        let device = self.inner_device();
        let names: Vec<&String> = self.trainable.keys().collect();
        let mut scalars = vec![stats.loss, accuracy_sum, micro_batches as f64, stats.tokens as f64, stats.samples as f64, stats.images as f64];
        scalars.extend(names.iter().map(|n| acc.contains_key(*n) as u8 as f64));
        let r = all_reduce_scalars(comm, &scalars, &device)?;
        stats.loss = r[0];
        stats.mean_token_accuracy = r[1] / r[2];
        (stats.tokens, stats.samples, stats.images) = (r[3].round() as usize, r[4].round() as usize, r[5].round() as usize);
        let grads = names.iter().map(|n| acc.remove(*n).unwrap_or_else(|| Tensor::zeros([params[*n].dims()[0]], &device))).collect();
        let summed = all_reduce_bucketed(comm, grads, BUCKET_BYTES)?;
        for ((name, g), present) in names.into_iter().zip(summed).zip(&r[6..]) {
            if *present > 0.0 {
                acc.insert(name.clone(), g);
            }
        }
        Ok(())
    }


    /// Makes every rank start from rank 0's trainable weights (adapters initialised from
    /// another seed, a rank that loaded another checkpoint), in one broadcast.
    pub fn broadcast_trainable(&mut self, comm: &dyn Communicator<B::InnerBackend>) -> Result<(), TrainError> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        let (names, tensors): (Vec<String>, Vec<_>) = self.trainable_values().into_iter().unzip();
        let (packed, sizes) = pack(tensors);
        let out = names.into_iter().zip(unpack(comm.broadcast_from_first(packed)?, &sizes)).collect();
        self.set_trainable_values(out);
        Ok(())
    }

    /// A digest of the trainable weights' bits (names, shapes and values, in name order).
    pub fn trainable_digest(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for (name, t) in self.trainable_values() {
            h.update(name.as_bytes());
            h.update((t.dims()[0] as u64).to_le_bytes());
            for v in t.into_data().convert::<f32>().as_slice::<f32>().expect("f32 after convert") {
                h.update(v.to_bits().to_le_bytes());
            }
        }
        h.finalize().into()
    }

    /// Checks that every rank holds the same trainable weights (what a data-parallel run checks
    /// at each checkpoint): the digest travels as sixteen 16-bit pieces, exact in f32.
    pub fn check_ranks_agree(&self, comm: &dyn Communicator<B::InnerBackend>) -> Result<(), TrainError> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        let digest = self.trainable_digest();
        let pieces: Vec<f64> = digest.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as f64).collect();
        let summed = all_reduce_scalars(comm, &pieces, &self.inner_device())?;
        let world = comm.world_size() as f64;
        if pieces.iter().zip(&summed).any(|(mine, all)| (mine * world - all).abs() > 0.5) {
            return Err(TrainError::Other(format!("rank {}: the ranks' trainable weights differ (their digests disagree)", comm.rank())));
        }
        Ok(())
    }

    pub fn inner_device(&self) -> burn::tensor::Device<B::InnerBackend> {
        Tensor::<B, 1>::zeros([1], &self.device()).inner().device()
    }

    /// Current values of the trainable parameters, flattened, by name.
    pub fn trainable_values(&self) -> BTreeMap<String, Tensor<B::InnerBackend, 1>> {
        TrainableCollector::collect(&self.model, &self.trainable, None)
    }

    /// Replaces trainable parameters by name (keeps their ids, shapes and `require_grad`).
    pub fn set_trainable_values(&mut self, values: BTreeMap<String, Tensor<B::InnerBackend, 1>>) {
        let mut setter = Setter::<B> { path: ModulePath::default(), values };
        let model = self.model.clone();
        self.model = model.map(&mut setter);
    }
}

/// Runs `n` layers without a graph from `x`, keeping each layer's input: (output, inputs).
fn forward_keeping_inputs<B: Backend>(mut x: Tensor<B, 3>, n: usize, layer: impl Fn(usize, Tensor<B, 3>) -> Tensor<B, 3>) -> (Tensor<B, 3>, Vec<Tensor<B, 3>>) {
    let mut inputs = Vec::with_capacity(n);
    for l in 0..n {
        inputs.push(x.clone());
        x = layer(l, x);
    }
    (x, inputs)
}

/// Re-runs the layers whose `inputs` a graph-less forward kept, top down, each with a graph,
/// carrying the gradient of its output (`upstream`) to its input; pushes each layer's gradients
/// and returns the gradient of the first layer's input.
fn backward_through_layers<B: AutodiffBackend>(
    inputs: &[Tensor<B::InnerBackend, 3>],
    mut upstream: Tensor<B::InnerBackend, 3>,
    all: &mut Vec<B::Gradients>,
    what: &str,
    layer: impl Fn(usize, Tensor<B, 3>) -> Tensor<B, 3>,
) -> Result<Tensor<B::InnerBackend, 3>, TrainError> {
    for (l, input) in inputs.iter().enumerate().rev() {
        let input = Tensor::<B, 3>::from_inner(input.clone()).require_grad();
        let grads = (layer(l, input.clone()) * Tensor::from_inner(upstream)).sum().backward();
        upstream = input.grad(&grads).ok_or_else(|| TrainError::Other(format!("checkpointing: {what} {l} has no input gradient")))?;
        all.push(grads);
    }
    Ok(upstream)
}

/// A batch's ids, attention mask and labels as tensors on `device`.
pub fn batch_tensors<B: Backend>(batch: &Batch, device: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let shape = [batch.batch_size, batch.seq_len];
    let int = |v: &Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v.clone(), shape), device);
    (int(&batch.input_ids), int(&batch.attention_mask), int(&batch.labels))
}

struct Freezer {
    path: ModulePath,
    parts: TrainParts,
    names: PartNames,
    trainable: BTreeMap<String, ()>,
    /// Trainable parameters held by a LayerNorm (no weight decay in transformers).
    in_layer_norm: std::collections::BTreeSet<String>,
}

impl<B: Backend> ModuleMapper<B> for Freezer {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, container_type: &str) {
        self.path.exit(container_type);
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join();
        let trains = is_trainable(self.parts, self.names, &name);
        if trains {
            if self.path.holder() == Some("Struct:LayerNorm") {
                self.in_layer_norm.insert(name.clone());
            }
            self.trainable.insert(name, ());
        }
        param.set_require_grad(trains)
    }
}

/// Collects the trainable parameters, flattened by name: their gradients when `grads` is given,
/// else their values.
struct TrainableCollector<'a, B: AutodiffBackend> {
    path: ModulePath,
    grads: Option<&'a B::Gradients>,
    trainable: &'a BTreeMap<String, GroupSettings>,
    out: BTreeMap<String, Tensor<B::InnerBackend, 1>>,
}

impl<'a, B: AutodiffBackend> TrainableCollector<'a, B> {
    fn collect(model: &VlmModel<B>, trainable: &'a BTreeMap<String, GroupSettings>, grads: Option<&'a B::Gradients>) -> BTreeMap<String, Tensor<B::InnerBackend, 1>> {
        let mut c = Self { path: ModulePath::default(), grads, trainable, out: BTreeMap::new() };
        model.visit(&mut c);
        c.out
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for TrainableCollector<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, container_type: &str) {
        self.path.exit(container_type);
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = self.path.join();
        if !self.trainable.contains_key(&name) {
            return;
        }
        let tensor = match self.grads {
            Some(grads) => param.val().grad(grads),
            None => Some(param.val().inner()),
        };
        if let Some(t) = tensor {
            let n = t.shape().num_elements();
            self.out.insert(name, t.reshape([n]));
        }
    }
}

struct Setter<B: AutodiffBackend> {
    path: ModulePath,
    values: BTreeMap<String, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Setter<B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, container_type: &str) {
        self.path.exit(container_type);
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join();
        match self.values.remove(&name) {
            Some(v) => {
                let (id, old, mapper) = param.consume();
                let dims = old.dims();
                let new = Tensor::<B, D>::from_inner(v.reshape(dims)).require_grad();
                Param::from_mapped_value(id, new, mapper)
            }
            None => param,
        }
    }
}
