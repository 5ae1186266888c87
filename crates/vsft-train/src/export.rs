//! What a user takes away: a PEFT LoRA adapter (or a stage-1 projector) with a model card, or a
//! merged model in the Hub's legacy layout that transformers and vsft both load. Exports are
//! written to a temporary directory and renamed into place.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use vsft_model::weights::StoredDtype;
use vsft_model::{Family, VlmModel};

use crate::checkpoint::{read_state, TrainerState};
use crate::error::TrainError;
use crate::recipe::{Recipe, Stage};

/// Files of a model directory that a merged export copies from the base model.
pub const BASE_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
];

#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub out: PathBuf,
    pub files: Vec<String>,
    pub merged: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::io(path, e)
}

/// A fresh temporary sibling of `out`, and the final rename.
fn staging(out: &Path) -> Result<PathBuf, TrainError> {
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "export".into());
    let tmp = out.with_file_name(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

fn publish(tmp: &Path, out: &Path) -> Result<Vec<String>, TrainError> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::rename(tmp, out).map_err(io(out))?;
    let mut files: Vec<String> = std::fs::read_dir(out)
        .map_err(io(out))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .collect();
    files.sort();
    Ok(files)
}

/// A model card with the YAML front matter the Hub reads.
pub fn model_card(recipe: &Recipe, state: &TrainerState, merged: bool) -> String {
    let adapter = recipe.train.stage == Stage::Instruct && !merged;
    let family = Family::from_model_type(&state.model_type).unwrap_or(Family::Llava);
    let mut tags = vec!["vsft", family.model_type(), "image-text-to-text"];
    if recipe.train.stage == Stage::Instruct {
        tags.push("lora");
    }
    let datasets: Vec<&str> = [Some(recipe.data.train.as_str()), recipe.data.eval.as_deref()]
        .into_iter()
        .flatten()
        .filter(|d| d.split('/').count() == 2 && !Path::new(d).exists())
        .collect();
    let mut s = String::from("---\n");
    s += &format!("base_model: {}\n", recipe.model.path);
    if adapter {
        s += "library_name: peft\n";
    } else {
        s += "library_name: transformers\n";
    }
    if !datasets.is_empty() {
        s += "datasets:\n";
        for d in &datasets {
            s += &format!("- {d}\n");
        }
    }
    s += "tags:\n";
    for t in &tags {
        s += &format!("- {t}\n");
    }
    s += "pipeline_tag: image-text-to-text\n---\n\n";
    s += &format!("# {} fine-tuned with vsft\n\n", recipe.model.path);
    let what = match (recipe.train.stage, merged) {
        (Stage::Pretrain, _) => "LLaVA stage 1 (projector pretraining): the multimodal projector only.",
        (Stage::Instruct, false) => "LLaVA stage 2 (instruction tuning): a LoRA adapter on the language model plus the full projector (`modules_to_save`).",
        (Stage::Instruct, true) => "LLaVA stage 2 (instruction tuning) with the LoRA adapter merged into the weights.",
    };
    s += &format!("{what}\n\n## Training\n\n");
    s += &format!("- steps: {} (epoch {:.2})\n", state.global_step, state.epoch);
    if let Some(l) = state.last_loss {
        s += &format!("- final training loss: {l:.4}\n");
    }
    if let Some(l) = state.last_eval_loss {
        s += &format!("- final eval loss: {l:.4}\n");
    }
    s += &format!("- rows skipped: {}\n", state.rows_skipped);
    if adapter {
        let class = family.architecture();
        s += &format!("\n## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import {class}\n");
        s += &format!("base = {class}.from_pretrained(\"{}\")\n", recipe.model.path);
        s += "model = PeftModel.from_pretrained(base, \"<this repo>\")\n```\n";
    }
    s += "\n## Recipe\n\n```toml\n";
    s += &recipe.to_toml();
    s += "```\n";
    s
}

/// A checkpoint's trainer state and the recipe it was trained with.
fn read_checkpoint(checkpoint: &Path) -> Result<(TrainerState, Recipe), TrainError> {
    let state = read_state(checkpoint)?;
    let recipe = Recipe::from_file(&checkpoint.join("recipe.toml"), &[])?;
    Ok((state, recipe))
}

/// `vsft export --checkpoint DIR --out DIR`: the adapter (instruct) or the projector (pretrain).
pub fn export_adapter(checkpoint: &Path, out: &Path) -> Result<ExportSummary, TrainError> {
    let (state, recipe) = read_checkpoint(checkpoint)?;
    let tmp = staging(out)?;
    match state.stage {
        Stage::Instruct => {
            for f in ["adapter_model.safetensors", "adapter_config.json"] {
                std::fs::copy(checkpoint.join(f), tmp.join(f)).map_err(io(&checkpoint.join(f)))?;
            }
        }
        Stage::Pretrain => {
            let f = "projector.safetensors";
            std::fs::copy(checkpoint.join(f), tmp.join(f)).map_err(io(&checkpoint.join(f)))?;
        }
    }
    std::fs::write(tmp.join("README.md"), model_card(&recipe, &state, false)).map_err(io(&tmp))?;
    let files = publish(&tmp, out)?;
    Ok(ExportSummary { out: out.to_path_buf(), files, merged: false })
}

/// `vsft export --merge`: base model + trained projector + merged LoRA, legacy layout, sharded,
/// with the base model's tokenizer, chat template and processor files.
pub fn export_merged<B: Backend>(
    checkpoint: &Path,
    base_dir: &Path,
    out: &Path,
    dtype: StoredDtype,
    max_shard_bytes: u64,
    device: &B::Device,
) -> Result<ExportSummary, TrainError> {
    let (state, recipe) = read_checkpoint(checkpoint)?;
    let model = VlmModel::<B>::load(base_dir, device)?;
    let model = match state.stage {
        Stage::Instruct => {
            let (mut model, _) = model.load_adapter(checkpoint)?;
            model.merge_lora();
            model
        }
        Stage::Pretrain => crate::run::load_projector(model, checkpoint)?,
    };
    let tmp = staging(out)?;
    model.save(&tmp, dtype, max_shard_bytes)?;
    for f in BASE_FILES {
        let src = base_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, tmp.join(f)).map_err(io(&src))?;
        }
    }
    std::fs::write(tmp.join("README.md"), model_card(&recipe, &state, true)).map_err(io(&tmp))?;
    let files = publish(&tmp, out)?;
    Ok(ExportSummary { out: out.to_path_buf(), files, merged: true })
}
