//! Stage 1 (projector only) against torch + transformers (scripts/make_train_fixtures.py):
//! six AdamW steps, batch 2, constant lr, no clipping — each step's loss within 1e-4 relative;
//! the same steps as token-weighted gradient accumulation; transformers' schedules.

use burn::backend::{Autodiff, Flex};
use vsft_model::weights::read_tensor_file;
use vsft_train::optim::lr_lambda;
use vsft_train::recipe::Scheduler;
use vsft_train::Trainer;

type Train = Autodiff<Flex>;

mod common;
use common::{batch_from, check_stage1_steps, fixtures, stage1_reference as reference};

fn trainer(r: &serde_json::Value) -> Trainer<Train> {
    common::stage1_trainer::<Train>(r)
}

#[test]
fn six_adamw_steps_match_torch() {
    check_stage1_steps::<Train>(false, 1.0);
}

/// `[train] gradient_checkpointing`: the decoder re-run layer by layer in backward must give
/// the same steps.
#[test]
fn six_adamw_steps_match_torch_with_gradient_checkpointing() {
    check_stage1_steps::<Train>(true, 1.0);
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
