use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use vsft_model::{StoredDtype, VlmModel};

use crate::backend::{device, Compute};

#[derive(Args)]
pub struct InitArgs {
    /// A LLaVA config.json (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Copy tokenizer.json, tokenizer_config.json and the chat template from this directory.
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
    /// Shard size, e.g. 5GB.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

pub const TOKENIZER_FILES: [&str; 5] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"];

/// `preprocessor_config.json` and `processor_config.json` that match a model's vision config
/// (the Hub's files for llava-1.5 and llava-v1.6 models).
pub fn write_processor_files(model: &VlmModel<Compute>, dir: &Path) -> Result<()> {
    let (cfg, pinpoints) = match model {
        VlmModel::Llava(m) => (&m.config, None),
        VlmModel::LlavaNext(m) => (&m.config.base, Some(&m.config.image_grid_pinpoints)),
        VlmModel::QwenVl(m) => return write_qwen_processor_files(&m.config, dir),
    };
    let size = cfg.vision_config.image_size;
    let processor_class = if pinpoints.is_some() { "LlavaNextProcessor" } else { "LlavaProcessor" };
    let mut image_processor = serde_json::json!({
        "crop_size": {"height": size, "width": size}, "do_center_crop": true, "do_convert_rgb": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": size}, "processor_class": processor_class
    });
    if let Some(p) = pinpoints {
        image_processor["image_processor_type"] = "LlavaNextImageProcessor".into();
        image_processor["image_grid_pinpoints"] = serde_json::to_value(p)?;
        image_processor["do_pad"] = true.into();
    }
    let strategy = serde_json::to_value(cfg.vision_feature_select_strategy)?;
    let processor = serde_json::json!({
        "image_processor": image_processor, "image_token": "<image>", "num_additional_image_tokens": 1,
        "patch_size": cfg.vision_config.patch_size, "processor_class": processor_class,
        "vision_feature_select_strategy": strategy
    });
    write_json(&dir.join("preprocessor_config.json"), &image_processor)?;
    write_json(&dir.join("processor_config.json"), &processor)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?).with_context(|| path.display().to_string())
}

/// Qwen2-VL's processor files, as the Hub's Qwen2-VL / Qwen2.5-VL repos ship them.
fn write_qwen_processor_files(cfg: &vsft_model::Qwen2VlConfig, dir: &Path) -> Result<()> {
    let v = &cfg.vision_config;
    let image_processor = serde_json::json!({
        "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "merge_size": v.spatial_merge_size, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "resample": 3, "rescale_factor": 1.0 / 255.0, "processor_class": "Qwen2VLProcessor"
    });
    let processor = serde_json::json!({"image_processor": image_processor, "processor_class": "Qwen2VLProcessor"});
    write_json(&dir.join("preprocessor_config.json"), &image_processor)?;
    write_json(&dir.join("processor_config.json"), &processor)
}

pub fn init(a: InitArgs) -> Result<ExitCode> {
    let text = vsft_train::read_text_limited(&a.config, vsft_data::guard::MAX_CONFIG_FILE_BYTES, "a model config (JSON)")?;
    let cfg: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", a.config.display()))?;
    let dtype = StoredDtype::from_torch_name(&a.dtype).with_context(|| format!("--dtype {}: use float32, bfloat16 or float16", a.dtype))?;
    let shard = vsft_model::weights::parse_size(&a.max_shard_size).with_context(|| format!("--max-shard-size {}", a.max_shard_size))?;
    // Everything that can be refused is refused before --out is created.
    if let Some(src) = &a.tokenizer_from {
        if !src.join("tokenizer.json").is_file() {
            bail!("--tokenizer-from {}: no tokenizer.json there", src.display());
        }
    }
    let model = VlmModel::<Compute>::random_from_config(&cfg, a.seed, &device()).map_err(|e| anyhow::anyhow!("{}: {e}", a.config.display()))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    model.save(&a.out, dtype, shard)?;
    write_processor_files(&model, &a.out)?;
    if let Some(src) = &a.tokenizer_from {
        let mut copied = 0;
        for f in TOKENIZER_FILES {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), a.out.join(f)).with_context(|| src.join(f).display().to_string())?;
                copied += 1;
            }
        }
        eprintln!("vsft: copied {copied} tokenizer files from {}", src.display());
    }
    eprintln!("vsft: wrote a random {} model to {}", model.family().model_type(), a.out.display());
    Ok(ExitCode::SUCCESS)
}
