use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use vsft_data::{Content, Message, Processor};
use vsft_model::generate::GenerateOptions;
use vsft_model::LlavaModel;

use crate::backend::{device, Compute};

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: String,
    /// A LoRA adapter or a stage-1 checkpoint.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

/// Prompt ids for generation: the chat template with the generation prompt, `<image>` expanded
/// to the model's image tokens, BOS as the tokenizer adds it (unless the template already did).
pub fn encode_prompt(processor: &Processor, prompt: &str, with_image: bool) -> Result<Vec<i64>> {
    let mut content = Vec::new();
    if with_image {
        content.push(Content::image(0));
    }
    content.push(Content::text(prompt));
    let text = &processor.text;
    let rendered = text.render(&[Message::new("user", content)], true)?;
    let add_special = !text.special.bos_token.as_deref().is_some_and(|b| rendered.text.starts_with(b));
    let enc = text.tokenizer.encode(rendered.text.as_str(), add_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let mut ids = Vec::new();
    for &id in enc.get_ids() {
        let n = if id == text.image_token_id { text.image.image_seq_length } else { 1 };
        ids.extend(std::iter::repeat_n(id as i64, n));
    }
    Ok(ids)
}

/// Preprocessed pixels of one image file, `[1, 3, H, W]`.
pub fn image_tensor(processor: &Processor, path: &Path) -> Result<Tensor<Compute, 4>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let px = processor.image.process_bytes(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Tensor::from_data(TensorData::new(px.data, [1, 3, px.height, px.width]), &device()))
}

/// EOS ids: the tokenizer's eos token and generation_config.json's `eos_token_id`.
pub fn eos_ids(model_dir: &Path, processor: &Processor) -> Vec<i64> {
    let mut ids = Vec::new();
    if let Some(e) = processor.text.special.eos_token.as_deref().and_then(|e| processor.text.tokenizer.token_to_id(e)) {
        ids.push(e as i64);
    }
    if let Ok(text) = std::fs::read_to_string(model_dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match &v["eos_token_id"] {
                serde_json::Value::Number(n) => ids.extend(n.as_i64()),
                serde_json::Value::Array(a) => ids.extend(a.iter().filter_map(|x| x.as_i64())),
                _ => {}
            }
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

pub fn generate(a: GenerateArgs) -> Result<ExitCode> {
    let model_dir = crate::cmd_train::resolve_model(&a.model)?;
    let mut model = LlavaModel::<Compute>::load(&model_dir, &device())?;
    if let Some(ad) = &a.adapter {
        crate::cmd_train::load_adapter_or_projector(&mut model, ad)?;
    }
    let processor = Processor::from_model_dir(&model_dir, a.chat_template.as_deref())?;
    let ids = encode_prompt(&processor, &a.prompt, true)?;
    let pixels = image_tensor(&processor, &a.image)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        eos_token_ids: eos_ids(&model_dir, &processor),
    };
    // Stream: decode everything so far and print what is new (tokens may merge into words).
    let tokenizer = processor.text.tokenizer.clone();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout();
    model.generate(&ids, Some(pixels), &opts, &mut |t| {
        generated.push(t as u32);
        if let Ok(text) = tokenizer.decode(&generated, true) {
            if text.len() > printed && text.is_char_boundary(printed) {
                let _ = write!(stdout, "{}", &text[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        }
        true
    })?;
    println!();
    Ok(ExitCode::SUCCESS)
}
