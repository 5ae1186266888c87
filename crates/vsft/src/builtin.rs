//! Built-in assets for the demo, named `builtin:…` in recipes, generated deterministically on
//! first use into `$VSFT_CACHE` (default `$XDG_CACHE_HOME/vsft` or `~/.cache/vsft`):
//! - `builtin:demo-tiny-llava`: a random tiny LLaVA with the demo tokenizer and processor files;
//! - `builtin:shapes/captions`, `builtin:shapes/qa`: the synthetic shapes datasets.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vsft_model::{LlavaConfig, LlavaModel, StoredDtype, VlmModel};

use crate::backend::{device, Compute};

pub const PREFIX: &str = "builtin:";

pub fn cache_root() -> PathBuf {
    if let Ok(d) = std::env::var("VSFT_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache"));
    base.join("vsft")
}

/// Builds `dir` with `make` into a temporary sibling, then renames it into place.
fn materialise(dir: &Path, make: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    if dir.join(".complete").exists() {
        return Ok(dir.to_path_buf());
    }
    let tmp = dir.with_file_name(format!(".tmp-{}-{}", dir.file_name().unwrap().to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    make(&tmp)?;
    std::fs::write(tmp.join(".complete"), b"")?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).with_context(|| dir.display().to_string())?;
    Ok(dir.to_path_buf())
}

fn shapes_root() -> Result<PathBuf> {
    let dir = cache_root().join("builtin/shapes-v2");
    materialise(&dir, |tmp| {
        eprintln!("vsft: generating the synthetic shapes dataset in {}", dir.display());
        vsft_demo::write_shapes_dataset(tmp, &vsft_demo::ShapesSpec::default())?;
        Ok(())
    })
}

/// The local path of a `builtin:` name, generating it if needed.
pub fn resolve(name: &str) -> Result<PathBuf> {
    let what = name.strip_prefix(PREFIX).unwrap_or(name);
    match what {
        "demo-tiny-llava" => {
            let dir = cache_root().join("builtin/demo-tiny-llava-v3");
            materialise(&dir, |tmp| {
                let vocab = vsft_demo::write_demo_model_files(tmp)?;
                let cfg: LlavaConfig = serde_json::from_value(vsft_demo::demo_model_config(&vocab))?;
                cfg.validate().map_err(anyhow::Error::msg)?;
                let model = VlmModel::Llava(LlavaModel::<Compute>::random(&cfg, 0, &device()));
                model.save(tmp, StoredDtype::F32, u64::MAX)?;
                Ok(())
            })
        }
        "shapes/captions" => Ok(shapes_root()?.join("captions")),
        "shapes/qa" => Ok(shapes_root()?.join("qa")),
        "shapes" => shapes_root(),
        _ => bail!("unknown built-in {name:?}: use builtin:demo-tiny-llava, builtin:shapes/captions or builtin:shapes/qa"),
    }
}
