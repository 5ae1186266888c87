//! Per-decoder-layer gradient checkpointing against the plain training step. Its own test
//! binary: the dropout check needs the backend's RNG to itself (tests in one binary run in
//! parallel threads and share it).

use burn::backend::{Autodiff, Flex};
use vsft_model::weights::read_tensor_file;
use vsft_model::VlmModel;
use vsft_train::{Stage, Trainer};

type Train = Autodiff<Flex>;

mod common;
use common::{batch_from, fixtures, plain_settings};

/// Stage 2 (LoRA on every projection, plus the projector): per-layer gradient checkpointing
/// computes the plain step's gradients (dropout 0), so two AdamW steps land on the same
/// parameters; with dropout it runs and repeats itself from the same seed.
#[test]
fn gradient_checkpointing_matches_the_plain_step_with_lora() {
    let t = read_tensor_file(&fixtures().join("train/stage1_batches.safetensors")).unwrap();
    let run = |checkpointing: bool, dropout: f64| {
        let mut model = VlmModel::<Train>::load(&fixtures().join("model/tiny-llava-mha/legacy"), &Default::default()).unwrap();
        let lora = vsft_model::lora::LoraConfig { r: 4, alpha: 8.0, dropout, ..Default::default() };
        model.add_lora(&lora, 3).unwrap();
        let mut tr = Trainer::new(model, Stage::Instruct, plain_settings(5)).unwrap();
        tr.gradient_checkpointing = checkpointing;
        let losses: Vec<f64> = (0..3).map(|step| tr.step(&[batch_from(&t, step, 0..2, false)], 1e-3, step, false).unwrap().unwrap().loss).collect();
        (losses, tr.trainable_values())
    };
    let (plain, plain_values) = run(false, 0.0);
    let (ckpt, ckpt_values) = run(true, 0.0);
    for (a, b) in plain.iter().zip(&ckpt) {
        assert!(((a - b) / a).abs() <= 1e-6, "losses {plain:?} vs {ckpt:?}");
    }
    let mut worst = 0f32;
    for (name, v) in &plain_values {
        let a = v.to_data().convert::<f32>().into_vec::<f32>().unwrap();
        let b = ckpt_values[name].to_data().convert::<f32>().into_vec::<f32>().unwrap();
        worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
    }
    println!("checkpointed vs plain, 3 LoRA steps: losses {ckpt:?} vs {plain:?}; parameters max abs diff {worst:.2e}");
    assert!(worst <= 1e-5, "parameters differ by {worst}");
    let (d1, _) = run(true, 0.1);
    let (d2, _) = run(true, 0.1);
    println!("checkpointed with dropout 0.1: {d1:?}");
    assert!(d1.iter().all(|l| l.is_finite()));
    assert_ne!(d1, ckpt, "dropout 0.1 changed nothing");
    assert_eq!(d1, d2, "a seeded checkpointed run with dropout repeats itself");
}
