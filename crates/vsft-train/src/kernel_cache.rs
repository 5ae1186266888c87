//! cubecl's persistent caches, for the GPU backends (wgpu, CUDA): the first training step on
//! them compiles and autotunes Burn's kernels, and cubecl can keep part of that work on disk.
//!
//! What cubecl 0.10 offers (`CubeClRuntimeConfig`, read from a `cubecl.toml` or a `burn.toml`
//! `[cubecl]` section in the working directory or above it, else defaults; `CUBECL_AUTOTUNE_LEVEL`
//! overrides the autotune level):
//! - `autotune.cache`: the autotune results (which kernel variant won for each key), one file per
//!   device and operation. On by default, under the `target/` directory of the nearest
//!   `Cargo.toml` above the working directory (else the user's cache directory), so an installed
//!   binary run from inside a Cargo project writes into that project.
//! - `compilation.cache` (off by default): compiled kernels, used by CUDA (PTX) and by wgpu's
//!   SPIR-V compiler (Burn's `vulkan` feature, which does not build offline here); wgpu's default
//!   WGSL path has none, and Mesa keeps its own shader cache (`~/.cache/mesa_shader_cache`).
//! - `autotune.level`: `minimal`, `balanced` (default), `extensive`, `full`.

use std::path::Path;

/// Puts cubecl's autotune cache, and its compilation cache, under `dir` (vsft passes
/// `~/.cache/vsft/cubecl`, or `$VSFT_CACHE/cubecl`). A configuration file that names another
/// place for either cache is kept. Call it before the first tensor operation on a cubecl
/// backend: cubecl reads its configuration once. Returns false (and changes nothing) when the
/// configuration was already read.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn use_cache_dir(dir: &Path) -> bool {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    if CubeClRuntimeConfig::storage().lock().is_some() {
        return false;
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if matches!(config.autotune.cache, CacheConfig::Target) {
        config.autotune.cache = CacheConfig::File(dir.to_path_buf());
    }
    if config.compilation.cache.is_none() {
        config.compilation.cache = Some(CacheConfig::File(dir.to_path_buf()));
    }
    let mut slot = CubeClRuntimeConfig::storage().lock();
    if slot.is_some() {
        return false;
    }
    *slot = Some(std::sync::Arc::new(config));
    true
}

/// Without a cubecl backend there is nothing to cache.
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
pub fn use_cache_dir(_dir: &Path) -> bool {
    false
}
