//! Stage 1 (projector only) against torch + transformers (scripts/make_train_fixtures.py):
//! six AdamW steps, batch 2, constant lr, no clipping — each step's loss within 1e-4 relative;
//! the same steps as token-weighted gradient accumulation; transformers' schedules.

use burn::backend::{Autodiff, Flex};
use vsft_model::weights::read_tensor_file;
use vsft_model::VlmModel;
use vsft_train::optim::{lr_lambda, AdamWConfig};
use vsft_train::recipe::Scheduler;
use vsft_train::trainer::OptimSettings;
use vsft_train::{Stage, Trainer};

type Train = Autodiff<Flex>;

mod common;
use common::{batch_from, fixtures};

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("train/stage1_reference.json")).unwrap()).unwrap()
}

fn trainer(r: &serde_json::Value) -> Trainer<Train> {
    trainer_on::<Train>(r)
}

fn trainer_on<B: burn::tensor::backend::AutodiffBackend>(r: &serde_json::Value) -> Trainer<B> {
    let model = VlmModel::<B>::load(&fixtures().join("model/tiny-llava-mha/legacy"), &Default::default()).unwrap();
    let settings = OptimSettings {
        lr: r["lr"].as_f64().unwrap(),
        projector_lr: None,
        vision_lr: None,
        weight_decay: r["weight_decay"].as_f64().unwrap(),
        adam: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        max_grad_norm: 0.0,
        seed: 0,
    };
    Trainer::new(model, Stage::Pretrain, settings).unwrap()
}

#[test]
fn six_adamw_steps_match_torch() {
    six_adamw_steps_match_torch_on::<Train>(false);
}

/// `[train] gradient_checkpointing`: the decoder re-run layer by layer in backward must give
/// the same steps.
#[test]
fn six_adamw_steps_match_torch_with_gradient_checkpointing() {
    six_adamw_steps_match_torch_on::<Train>(true);
}

fn six_adamw_steps_match_torch_on<B: burn::tensor::backend::AutodiffBackend>(gradient_checkpointing: bool) {
    let r = reference();
    let t = read_tensor_file(&fixtures().join("train/stage1_batches.safetensors")).unwrap();
    let mut tr = trainer_on::<B>(&r);
    tr.gradient_checkpointing = gradient_checkpointing;
    let lr = r["lr"].as_f64().unwrap();
    let want: Vec<f64> = r["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let want_norms: Vec<f64> = r["grad_norms"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    for (step, (w, wn)) in want.iter().zip(&want_norms).enumerate() {
        let b = batch_from(&t, step % 3, 0..2, false);
        let s = tr.step(&[b], lr, step, false).unwrap().unwrap();
        let rel = ((s.loss - w) / w).abs();
        let rel_norm = ((s.grad_norm - wn) / wn).abs();
        println!("step {}: loss {:.7} vs torch {:.7} (rel {rel:.2e}); grad norm rel {rel_norm:.2e}", step + 1, s.loss, w);
        assert!(rel <= 1e-4, "step {}: loss relative diff {rel}", step + 1);
        assert!(rel_norm <= 1e-4, "step {}: grad norm relative diff {rel_norm}", step + 1);
    }
    // The frozen parts did not move and the projector ended where torch's did.
    let values = tr.trainable_values();
    for name in ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"] {
        let got = values[&format!("multi_modal_projector.{name}")].to_data().convert::<f32>().into_vec::<f32>().unwrap();
        let want = t[&format!("final.multi_modal_projector.{name}")].to_f32().unwrap();
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!("final {name}: max abs diff {max:.2e}");
        assert!(max <= 1e-5, "{name} after 6 steps differs by {max}");
    }
    assert_eq!(tr.trainable.len(), 4, "stage 1 trains only the projector");
}

#[test]
fn token_weighted_accumulation_matches_transformers_num_items_in_batch() {
    let r = reference();
    let t = read_tensor_file(&fixtures().join("train/stage1_batches.safetensors")).unwrap();
    let mut tr = trainer(&r);
    let lr = r["lr"].as_f64().unwrap();
    let want: Vec<f64> = r["accumulated_losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    for (step, w) in want.iter().enumerate() {
        let micro = [batch_from(&t, step % 3, 0..1, true), batch_from(&t, step % 3, 1..2, true)];
        let s = tr.step(&micro, lr, step, false).unwrap().unwrap();
        let rel = ((s.loss - w) / w).abs();
        println!("accumulated step {}: loss {:.7} vs torch {:.7} (rel {rel:.2e})", step + 1, s.loss, w);
        assert!(rel <= 1e-4, "step {}: relative diff {rel}", step + 1);
    }
}

#[test]
fn schedules_match_transformers_get_scheduler() {
    let r = reference();
    let s = &r["schedules_warmup3_total10"];
    for (kind, name) in [(Scheduler::Constant, "constant_with_warmup"), (Scheduler::Linear, "linear"), (Scheduler::Cosine, "cosine")] {
        for (step, want) in s[name].as_array().unwrap().iter().enumerate() {
            let got = lr_lambda(kind, step, 3, 10);
            assert!((got - want.as_f64().unwrap()).abs() < 1e-9, "{name} step {step}: {got} vs {want}");
        }
    }
}
