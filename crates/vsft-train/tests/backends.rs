//! The backend suite: the parity checks of the CPU tests, run through another Burn backend —
//! Burn's composed ops and cubecl kernels, the path every GPU takes (vsft's fused kernels are for
//! Flex only). One generic body per check, shared with the CPU tests that run it on Flex
//! (`tests/common` here and in vsft-model); this file instantiates it per backend feature:
//!
//! ```sh
//! cargo test --release -p vsft-train --features wgpu --test backends   # Vulkan (lavapipe in CI)
//! cargo test --release -p vsft-train --features cuda --test backends   # an NVIDIA GPU
//! ```
//!
//! Thresholds are the CPU tests' times `FACTOR` (10). Without a backend feature the file
//! compiles and holds no tests (the CPU tests run the same bodies on Flex).
//!
//! Checks, on the tiny fixture models against the committed transformers / PEFT / torch
//! references: logits, loss and projector gradients (two LLaVA-1.5 configs); greedy generation
//! with the KV cache; a PEFT adapter's logits, one LoRA linear and the merged model; six
//! stage-1 AdamW steps, plain and with gradient checkpointing; six stage-2 LoRA steps on
//! LLaVA-NeXT against PEFT, then the exported adapter reloaded.
#![allow(dead_code, unused_imports)]

use burn::tensor::backend::AutodiffBackend;

mod common;
#[path = "../../vsft-model/tests/common/mod.rs"]
mod model_common;

/// The suite's thresholds: the CPU tests' times this.
const FACTOR: f32 = 10.0;

/// cubecl's autotune results (and CUDA's compiled kernels) persist under `target/tmp/cubecl`
/// between runs of the suite, through the same call the `vsft` binary makes.
fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        vsft_train::kernel_cache::use_cache_dir(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cubecl"));
    });
}

fn model_parity<B: AutodiffBackend>() {
    setup();
    for name in model_common::CONFIGS {
        model_common::check_logits::<B::InnerBackend>(name, "legacy", FACTOR);
        model_common::check_loss::<B::InnerBackend>(name, FACTOR);
        model_common::check_projector_grads::<B>(name, FACTOR);
    }
}

fn generation<B: AutodiffBackend>() {
    setup();
    for name in model_common::CONFIGS {
        model_common::check_greedy_generation::<B::InnerBackend>(name);
    }
}

fn peft_adapter_and_merge<B: AutodiffBackend>() {
    setup();
    for name in ["plain", "rslora"] {
        model_common::check_peft_adapter::<B::InnerBackend>(name, FACTOR);
    }
}

fn stage1_six_steps<B: AutodiffBackend>() {
    setup();
    common::check_stage1_steps::<B>(false, FACTOR as f64);
    common::check_stage1_steps::<B>(true, FACTOR as f64);
}

fn stage2_lora_and_export<B: AutodiffBackend>(out: &str) {
    setup();
    common::check_llava_next_lora::<B>(FACTOR as f64, out);
}

#[allow(unused_macros)]
macro_rules! backend_suite {
    ($backend:ident, $B:ty) => {
        mod $backend {
            type B = burn::backend::Autodiff<$B>;
            #[test]
            fn logits_loss_and_projector_gradients_match_transformers() {
                super::model_parity::<B>();
            }
            #[test]
            fn greedy_generation_matches_transformers() {
                super::generation::<B>();
            }
            #[test]
            fn peft_adapters_and_merge_match_peft() {
                super::peft_adapter_and_merge::<B>();
            }
            #[test]
            fn six_stage1_steps_match_torch() {
                super::stage1_six_steps::<B>();
            }
            #[test]
            fn six_lora_steps_match_peft_and_the_exported_adapter_reloads() {
                super::stage2_lora_and_export::<B>(concat!(stringify!($backend), "-llava-next-adapter"));
            }
        }
    };
}

#[cfg(feature = "wgpu")]
backend_suite!(wgpu, burn::backend::Wgpu);
#[cfg(feature = "cuda")]
backend_suite!(cuda, burn::backend::Cuda);
