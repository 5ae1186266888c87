//! Generation options and token picking; the loop is [`crate::family::VisionLanguageModel::generate`]:
//! the vision tower runs once, the prompt fills a KV cache, then one token at a
//! time (greedy, or temperature + top-p sampling with a seeded RNG) until EOS or the limit.

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
