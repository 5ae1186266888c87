//! Generation: the vision tower runs once, the prompt fills a KV cache, then one token at a
//! time (greedy, or temperature + top-p sampling with a seeded RNG) until EOS or the limit.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::ModelError;
use crate::llama::KvCache;
use crate::llava::LlavaModel;
use crate::weights::RandomInit;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub eos_token_ids: Vec<i64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, eos_token_ids: vec![] }
    }
}

/// Picks the next token from one position's logits.
pub fn pick_token(logits: &[f32], opts: &GenerateOptions, rng: &mut RandomInit) -> i64 {
    if opts.temperature <= 0.0 {
        // Greedy; ties go to the lowest id, as torch.argmax does.
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as i64;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &v)| (i, ((v as f64 - max) / opts.temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= opts.top_p {
            break;
        }
    }
    let probs = &probs[..kept];
    let mut u = rng.uniform() * mass;
    for &(i, p) in probs {
        if u < p {
            return i as i64;
        }
        u -= p;
    }
    probs.last().map(|p| p.0 as i64).unwrap_or(0)
}

impl<B: Backend> LlavaModel<B> {
    /// Generates after `prompt_ids` (one sequence, image tokens already expanded), calling
    /// `on_token` with each new token (return false to stop). Returns the new tokens.
    pub fn generate(
        &self,
        prompt_ids: &[i64],
        pixel_values: Option<Tensor<B, 4>>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(i64) -> bool,
    ) -> Result<Vec<i64>, ModelError> {
        let device = self.language_model.model.norm.weight.val().device();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(prompt_ids.to_vec(), [1, prompt_ids.len()]), &device);
        let features = pixel_values.map(|p| self.image_features(p));
        let embeds = self.merge_embeddings(ids, features)?;
        let mut cache = KvCache::default();
        let mut rng = RandomInit::new(opts.seed);
        let mut hidden = self.language_model.decode_cached(embeds, &mut cache);
        let mut out = Vec::new();
        for _ in 0..opts.max_new_tokens {
            let [_, t, h] = hidden.dims();
            let last = hidden.slice([0..1, t - 1..t, 0..h]);
            let logits: Vec<f32> = self.language_model.logits(last).into_data().convert::<f32>().into_vec().expect("f32");
            let token = pick_token(&logits, opts, &mut rng);
            out.push(token);
            if opts.eos_token_ids.contains(&token) || !on_token(token) {
                break;
            }
            let next = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![token], [1, 1]), &device);
            let embeds = self.language_model.model.embed_tokens.forward(next);
            hidden = self.language_model.decode_cached(embeds, &mut cache);
        }
        Ok(out)
    }
}
