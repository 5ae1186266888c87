//! Training the vision tower (LLaVA-NeXT's own recipe does, at a small learning rate):
//! `train.freeze_vision_tower = false` trains its weights at `vision_lr`; a `lora.target_modules`
//! regex may put adapters on it, a suffix list never does; gradient checkpointing re-runs the
//! tower's layers too and gives the plain step's result. Its own test binary: the backend's RNG
//! is seeded per step.

use burn::backend::{Autodiff, Flex};
use vsft_model::lora::{LoraConfig, TargetModules};
use vsft_model::weights::read_tensor_file;
use vsft_model::{LlavaNextConfig, VlmModel};
use vsft_train::optim::AdamWConfig;
use vsft_train::trainer::{OptimSettings, TrainParts};
use vsft_train::{Stage, Trainer};

type Train = Autodiff<Flex>;

mod common;
use common::{fixtures, llava_next_batch};

fn model_dir() -> std::path::PathBuf {
    fixtures().join("llava_next/model/legacy")
}

fn settings() -> OptimSettings {
    OptimSettings {
        lr: 1e-3,
        projector_lr: Some(2e-4),
        vision_lr: Some(1e-4),
        weight_decay: 0.0,
        adam: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        max_grad_norm: 1.0,
        seed: 3,
    }
}

#[test]
fn suffix_targets_stay_off_the_tower_and_a_regex_reaches_it() {
    let mut model = VlmModel::<Train>::load(&model_dir(), &Default::default()).unwrap();
    let default = model.add_lora(&LoraConfig::default(), 0).unwrap();
    assert!(default.iter().all(|n| n.starts_with("model.language_model.")), "{default:?}");
    let mut model = VlmModel::<Train>::load(&model_dir(), &Default::default()).unwrap();
    let cfg = LoraConfig { target_modules: TargetModules::Regex(r".*vision_tower.*\.(q_proj|v_proj|fc1)".into()), dropout: 0.0, ..Default::default() };
    let targeted = model.add_lora(&cfg, 0).unwrap();
    assert_eq!(targeted.len(), 2 * 3, "2 CLIP layers × q, v, fc1: {targeted:?}");
    assert!(targeted.contains(&"model.vision_tower.encoder.layers.0.self_attn.q_proj".to_string()), "{targeted:?}");
    assert_eq!(cfg.peft_target_regex(&targeted), r".*vision_tower.*\.(fc1|q_proj|v_proj)");
}

#[test]
fn a_trained_tower_learns_and_checkpointing_gives_the_plain_steps() {
    let cfg = LlavaNextConfig::from_file(&model_dir().join("config.json")).unwrap();
    let batches = read_tensor_file(&fixtures().join("llava_next/model/lora_batches.safetensors")).unwrap();
    let run = |checkpointing: bool| {
        let mut model = VlmModel::<Train>::load(&model_dir(), &Default::default()).unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Regex(r".*language_model.*\.(q_proj|down_proj)|.*vision_tower.*\.(v_proj|fc2)".into()),
            rslora: false,
        };
        model.add_lora(&lora, 1).unwrap();
        let mut tr = Trainer::new(model, TrainParts { stage: Stage::Instruct, vision_tower: true }, settings()).unwrap();
        tr.gradient_checkpointing = checkpointing;
        assert!(tr.tower_trains && tr.tower_trains_in_full());
        let report = tr.group_report();
        let tower = report.iter().find(|g| g.name == "vision tower").unwrap();
        assert!(tower.trains && tower.lr == Some(1e-4), "{tower:?}");
        let before = tr.trainable_values();
        let losses: Vec<f64> = (0..2).map(|step| tr.step(&[llava_next_batch(&batches, &format!("batch{step}."), &cfg)], 1e-3, step, false).unwrap().unwrap().loss).collect();
        (losses, before, tr.trainable_values())
    };
    let (plain, before, plain_after) = run(false);
    let (ckpt, _, ckpt_after) = run(true);
    println!("losses plain {plain:?} checkpointed {ckpt:?}");
    for (a, b) in plain.iter().zip(&ckpt) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "losses differ: {plain:?} vs {ckpt:?}");
    }
    let mut worst = 0f32;
    let mut tower_moved = 0;
    for (name, p) in &plain_after {
        let a: Vec<f32> = p.clone().into_data().convert::<f32>().into_vec().unwrap();
        let b: Vec<f32> = ckpt_after[name].clone().into_data().convert::<f32>().into_vec().unwrap();
        let s: Vec<f32> = before[name].clone().into_data().convert::<f32>().into_vec().unwrap();
        let moved = a.iter().zip(&s).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        // A key bias adds a constant to each query's scores, which softmax ignores: its gradient
        // is zero in exact arithmetic, so the two runs' updates there are rounding noise that
        // Adam scales up to a step (it differed by 1.7× its tiny size once the vision kernels
        // changed the rounding).
        if !name.ends_with("k_proj.bias") {
            worst = worst.max(d / moved.max(1e-12));
        }
        if name.starts_with("vision_tower.") && moved > 0.0 {
            tower_moved += 1;
        }
    }
    println!("{} trainable tensors; checkpointed vs plain: worst difference {worst:.2e} of the step's change; {tower_moved} tower tensors moved", plain_after.len());
    assert!(worst <= 1e-3, "checkpointing changes the update by {worst} of its size");
    assert!(tower_moved >= 20, "only {tower_moved} vision tower tensors trained");
}

/// The same on Qwen2.5-VL, whose tower is a stack of windowed and full-attention blocks: with
/// the tower trained in full, checkpointing re-runs each block and gives the plain steps.
#[test]
fn qwen_tower_checkpointing_gives_the_plain_steps() {
    let dir = fixtures().join("qwen_vl/model/qwen2_5_vl");
    let batches = read_tensor_file(&dir.join("lora_batches.safetensors")).unwrap();
    let run = |checkpointing: bool| {
        let mut model = VlmModel::<Train>::load(&dir.join("hub"), &Default::default()).unwrap();
        model.add_lora(&LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, ..Default::default() }, 1).unwrap();
        let image_token = model.as_dyn().image_token_id();
        let mut tr = Trainer::new(model, TrainParts { stage: Stage::Instruct, vision_tower: true }, settings()).unwrap();
        tr.gradient_checkpointing = checkpointing;
        assert!(tr.tower_trains_in_full());
        let losses: Vec<f64> = (0..2).map(|step| tr.step(&[common::qwen_batch(&batches, &format!("batch{step}."), image_token, 2)], 1e-3, step, false).unwrap().unwrap().loss).collect();
        (losses, tr.trainable_values())
    };
    let (plain, plain_after) = run(false);
    let (ckpt, ckpt_after) = run(true);
    println!("qwen2_5_vl losses plain {plain:?} checkpointed {ckpt:?}");
    assert_eq!(plain, ckpt);
    let tower = plain_after.keys().filter(|k| k.starts_with("visual.blocks.")).count();
    assert!(tower > 10, "{tower} tower tensors train");
    for (name, p) in &plain_after {
        let a: Vec<f32> = p.clone().into_data().convert::<f32>().into_vec().unwrap();
        let b: Vec<f32> = ckpt_after[name].clone().into_data().convert::<f32>().into_vec().unwrap();
        assert_eq!(a, b, "{name} differs with checkpointing");
    }
}
