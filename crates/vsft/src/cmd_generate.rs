use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use vsft_data::{Content, ImageBatch, Message, Processor};
use vsft_model::generate::GenerateOptions;
use vsft_model::VlmModel;
use vsft_train::trainer::{image_infos, image_inputs};

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
    /// Refuse an image whose header claims more pixels (default: Pillow's
    /// decompression-bomb limit, as the recipe key `data.max_image_pixels`).
    #[arg(long)]
    pub max_image_pixels: Option<u64>,
}

/// Prompt ids for one user turn (the image, then the text) with the generation prompt, through
/// the model's chat template, and the image as the model's processor lays it out.
pub fn encode_prompt(processor: &Processor, prompt: &str, image: &Path) -> Result<(Vec<i64>, ImageBatch)> {
    let decoded = processor.load_image(image)?;
    let messages = [Message::new("user", vec![Content::image(0), Content::text(prompt)])];
    let (ids, images) = processor.encode_prompt_with_images(&messages, &[decoded]).with_context(|| image.display().to_string())?;
    Ok((ids.into_iter().map(i64::from).collect(), images))
}

/// Generates from prompt ids and their images.
pub fn generate_from(model: &VlmModel<Compute>, ids: &[i64], images: &ImageBatch, opts: &GenerateOptions, on_token: &mut dyn FnMut(i64) -> bool) -> Result<Vec<i64>> {
    let infos = image_infos(images);
    let inputs = image_inputs(images, &infos);
    Ok(model.as_dyn().generate(ids, (!infos.is_empty()).then_some(&inputs), opts, on_token)?)
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
    let mut model = VlmModel::<Compute>::load(&model_dir, &device())?;
    if let Some(ad) = &a.adapter {
        model = crate::cmd_train::load_adapter_or_projector(model, ad)?;
    }
    let overrides = vsft_data::ProcessorOverrides { max_image_pixels: a.max_image_pixels, ..Default::default() };
    let processor = Processor::from_model_dir_with(&model_dir, a.chat_template.as_deref(), &overrides)?;
    vsft_train::run::check_image_token(&model, &processor, &model_dir)?;
    let (ids, images) = encode_prompt(&processor, &a.prompt, &a.image)?;
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
    generate_from(&model, &ids, &images, &opts, &mut |t| {
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

/// `[generate_eval]`: answer held-out questions by greedy generation; exact match on the first
/// word of the answer, overall and per question kind (for the demo's shapes data).
/// How many `[generate_eval]` answers the report shows.
const REPORT_SAMPLES: usize = 24;

pub fn generate_eval(ge: &vsft_train::GenerateEval, model_dir: &Path, checkpoint: &Path) -> Result<()> {
    let model = VlmModel::<Compute>::load(model_dir, &device())?;
    let model = crate::cmd_train::load_adapter_or_projector(model, checkpoint)?;
    let processor = Processor::from_model_dir(model_dir, None)?;
    vsft_train::run::check_image_token(&model, &processor, model_dir)?;
    let data = crate::cmd_train::resolve_data(&ge.data, "test")?;
    let mut source = vsft_data::open_dataset(&data, Some("test"), None)?;
    let opts = GenerateOptions { max_new_tokens: ge.max_new_tokens, eos_token_ids: eos_ids(model_dir, &processor), ..Default::default() };
    let first_word = |s: &str| -> String {
        s.split_whitespace().next().unwrap_or("").trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()
    };
    let mut per_kind: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    // The first answers with their pictures, for the report.
    let mut answered: Vec<vsft_track::report::Sample> = Vec::new();
    let n = source.len().min(ge.limit);
    let started = std::time::Instant::now();
    println!("\nHeld-out pictures: the model's answers");
    for i in 0..n {
        let row = source.get(i)?;
        let Some(user) = row.messages.iter().find(|m| m.role == "user") else { continue };
        let Some(answer) = row.messages.iter().find(|m| m.role == "assistant") else { continue };
        let question: String = user.content.iter().filter_map(|c| c.text.clone()).collect::<Vec<_>>().join(" ");
        let expected: String = answer.content.iter().filter_map(|c| c.text.clone()).collect::<Vec<_>>().join(" ");
        let decoded = processor.decode_row_images(&row)?;
        let (ids, images) = processor.encode_prompt_with_images(std::slice::from_ref(user), &decoded)?;
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let out = generate_from(&model, &ids, &images, &opts, &mut |_| true)?;
        let tokens: Vec<u32> = out.iter().map(|&t| t as u32).collect();
        let text = processor.text.tokenizer.decode(&tokens, true).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
        let correct = first_word(&text) == first_word(&expected);
        let kind = vsft_demo::QuestionKind::of_question(&question).map(|k| k.name().to_string()).unwrap_or_else(|| "all".into());
        let e = per_kind.entry(kind.clone()).or_default();
        e.0 += usize::from(correct);
        e.1 += 1;
        if i < ge.show {
            println!("  Q: {question}\n  A: {}   (expected {expected}) {}", text.trim(), if correct { "✓" } else { "✗" });
        }
        if answered.len() < REPORT_SAMPLES {
            let picture = row.images.first().and_then(|src| src.load().ok());
            answered.push(vsft_track::report::Sample { question, answer: text.trim().to_string(), expected, correct, kind, image: picture.map(|b| b.to_vec()) });
        }
    }
    let (right, total) = per_kind.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    println!("\nAccuracy on {total} held-out questions: {:.1}% ({right}/{total}), {:.1} s", 100.0 * right as f64 / total.max(1) as f64, started.elapsed().as_secs_f64());
    for (kind, (r, t)) in &per_kind {
        println!("  {kind:<10} {:>5.1}% ({r}/{t})", 100.0 * *r as f64 / (*t).max(1) as f64);
    }
    // The stage's output directory: the report shows these answers with their pictures.
    if let Some(out) = checkpoint.parent().filter(|d| d.join("metrics.jsonl").exists()) {
        vsft_track::report::write_samples(out, &answered, &per_kind)?;
        println!("\nReport: {}", vsft_track::report::write_report(out)?.display());
        // One held-out picture as a file, so that the next command has something to look at.
        if let Some(vsft_track::report::Sample { question, image: Some(picture), .. }) = answered.first() {
            let png = out.join("held-out-0.png");
            std::fs::write(&png, picture).with_context(|| png.display().to_string())?;
            println!("\nNext:\n  vsft report {}\n  vsft generate --model {} --adapter {} --image {} --prompt {question:?}", out.display(), model_dir.display(), checkpoint.display(), png.display());
        }
    }
    Ok(())
}
