use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use vsft_model::weights::{parse_size, read_tensor_file, StoredDtype};
use vsft_model::VlmModel;

use crate::backend::{device, Compute};

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint directory written by `vsft train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Write the full model with the adapter merged (and the trained projector), legacy layout.
    #[arg(long)]
    pub merge: bool,
    /// Base model for --merge (default: the recipe's model.path).
    #[arg(long)]
    pub base: Option<String>,
    /// Storage dtype of a merged model: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

pub fn export(a: ExportArgs) -> Result<ExitCode> {
    let summary = if a.merge {
        let base = match &a.base {
            Some(b) => b.clone(),
            None => vsft_train::checkpoint::read_state(&a.checkpoint)?.base_model,
        };
        let base_dir = crate::cmd_train::resolve_model(&base)?;
        let dtype = StoredDtype::from_torch_name(&a.dtype).with_context(|| format!("--dtype {}", a.dtype))?;
        let shard = parse_size(&a.max_shard_size).with_context(|| format!("--max-shard-size {}", a.max_shard_size))?;
        vsft_train::export::export_merged::<Compute>(&a.checkpoint, &base_dir, &a.out, dtype, shard, &device())?
    } else {
        vsft_train::export::export_adapter(&a.checkpoint, &a.out)?
    };
    eprintln!("vsft: exported {} ({})", summary.out.display(), summary.files.join(", "));
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct PushArgs {
    /// The directory to upload (an export, a checkpoint, a model).
    pub dir: PathBuf,
    #[arg(long)]
    pub repo: String,
    #[arg(long)]
    pub private: bool,
    #[arg(long)]
    pub revision: Option<String>,
    #[arg(long)]
    pub message: Option<String>,
}

pub fn push(a: PushArgs) -> Result<ExitCode> {
    let client = vsft_hub::HubClient::from_env();
    let opts = vsft_hub::PushOptions { private: a.private, revision: a.revision, message: a.message, ..Default::default() };
    let info = client.push_folder(&a.dir, &a.repo, &opts)?;
    println!("{}", info.commit_url);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct LogitsArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// safetensors with input_ids, attention_mask (int64 [B, T]) and optionally pixel_values.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write `logits` (safetensors, f32).
    #[arg(long)]
    pub out: PathBuf,
}

/// Logits of a model on given inputs, for parity checks against transformers/PEFT.
pub fn logits(a: LogitsArgs) -> Result<ExitCode> {
    use burn::tensor::{Int, Tensor, TensorData};
    let dir = crate::cmd_train::resolve_model(&a.model)?;
    let mut model = VlmModel::<Compute>::load(&dir, &device())?;
    if let Some(ad) = &a.adapter {
        model = crate::cmd_train::load_adapter_or_projector(model, ad)?;
    }
    let t = read_tensor_file(&a.inputs)?;
    let get = |k: &str| t.get(k).with_context(|| format!("{}: no tensor {k}", a.inputs.display()));
    let ids = get("input_ids")?;
    let shape = [ids.shape[0], ids.shape[1]];
    let int = |k: &str| -> Result<Tensor<Compute, 2, Int>> {
        Ok(Tensor::from_data(TensorData::new(get(k)?.to_i64()?, shape), &device()))
    };
    let images = t.get("pixel_values").map(|p| model.images_from_hf(p, t.get("image_sizes").or_else(|| t.get("image_grid_thw")))).transpose()?;
    let inputs = images.as_ref().map(|i| i.inputs());
    let logits = model.as_dyn().forward(int("input_ids")?, int("attention_mask")?, inputs.as_ref())?;
    let dims = logits.dims().to_vec();
    let n: usize = dims.iter().product();
    let r = vsft_model::weights::TensorRef { shape: dims, flat: logits.reshape([n]) };
    vsft_model::weights::write_safetensors(
        &a.out,
        vec![vsft_model::weights::PendingTensor::from_tensor("logits".into(), &r)],
        StoredDtype::F32,
    )?;
    Ok(ExitCode::SUCCESS)
}
