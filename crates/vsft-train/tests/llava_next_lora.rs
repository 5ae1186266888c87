//! Stage 2 on LLaVA-NeXT against transformers + PEFT (scripts/make_llava_next_model_fixtures.py):
//! starting from PEFT's own initial adapter, six AdamW steps (LoRA lr 1e-3, projector 2e-4,
//! weight decay 0.1 on weights, global clipping at 1.0, three batches of real photographs
//! cycled) give PEFT's losses and gradient norms; the adapter vsft writes has PEFT's keys, and
//! loaded again it gives the loss PEFT computes with its own final adapter.

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use vsft_model::weights::read_tensor_file;
use vsft_model::{LlavaNextConfig, VlmModel};
use vsft_train::optim::AdamWConfig;
use vsft_train::trainer::OptimSettings;
use vsft_train::{Stage, Trainer};

type Train = Autodiff<Flex>;

mod common;
use common::{fixtures, llava_next_batch, mean_loss};

fn dir() -> std::path::PathBuf {
    fixtures().join("llava_next/model")
}

#[test]
fn six_lora_steps_match_peft_and_the_adapter_round_trips() {
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap();
    let r = &reference["lora"];
    let cfg = LlavaNextConfig::from_file(&dir().join("legacy/config.json")).unwrap();
    let base = VlmModel::<Train>::load(&dir().join("legacy"), &Default::default()).unwrap();
    let (model, lora_cfg) = base.load_adapter(&dir().join("lora_init")).unwrap();
    assert_eq!(lora_cfg.dropout, 0.0);
    let settings = OptimSettings {
        lr: r["lr"]["lora"].as_f64().unwrap(),
        projector_lr: r["lr"]["projector"].as_f64(),
        vision_lr: None,
        weight_decay: r["weight_decay"].as_f64().unwrap(),
        adam: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        max_grad_norm: r["max_grad_norm"].as_f64().unwrap(),
        seed: 0,
    };
    let mut trainer = Trainer::new(model, Stage::Instruct, settings).unwrap();
    let n_peft_trainable = r["trainable_parameter_order"].as_array().unwrap().len();
    assert_eq!(trainer.trainable.len(), n_peft_trainable, "vsft trains what PEFT trains (LoRA A/B + projector; image_newline frozen)");
    let batches = read_tensor_file(&dir().join("lora_batches.safetensors")).unwrap();
    let losses: Vec<f64> = r["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let norms: Vec<f64> = r["grad_norms_preclip"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let lr = r["lr"]["lora"].as_f64().unwrap();
    for (step, (want, want_norm)) in losses.iter().zip(&norms).enumerate() {
        let b = llava_next_batch(&batches, &format!("batch{}.", step % 3), &cfg);
        let stats = trainer.step(&[b], lr, step, false).unwrap().unwrap();
        let (rel, rel_norm) = ((stats.loss - want).abs() / want, (stats.grad_norm - want_norm).abs() / want_norm);
        println!("step {step}: loss {:.6} vs {want:.6} (rel {rel:.2e}), grad norm {:.4} vs {want_norm:.4} (rel {rel_norm:.2e})", stats.loss, stats.grad_norm);
        assert!(rel <= 1e-4, "step {step}: loss differs by {rel}");
        assert!(rel_norm <= 1e-4, "step {step}: gradient norm differs by {rel_norm}");
    }

    // The adapter as a checkpoint writes it, then loaded into a fresh base.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("llava-next-adapter");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    trainer.model.save_adapter_weights(&out, &|_| false).unwrap();
    let targeted: Vec<String> = trainer.trainable.keys().filter_map(|k| k.split_once(".lora.")).map(|(m, _)| m.replacen("language_model.model.", "model.language_model.", 1)).collect();
    std::fs::write(out.join("adapter_config.json"), lora_cfg.to_peft_json(&targeted, "base", vsft_model::PartNames::LLAVA, false).to_string()).unwrap();
    let ours = read_tensor_file(&out.join("adapter_model.safetensors")).unwrap();
    let peft = read_tensor_file(&dir().join("lora_final/adapter_model.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>(), "adapter keys differ from PEFT's");
    let (reloaded, _) = VlmModel::<Flex>::load(&dir().join("legacy"), &Default::default()).unwrap().load_adapter(&out).unwrap();
    let inputs = read_tensor_file(&dir().join("inputs.safetensors")).unwrap();
    let ours_loss = mean_loss(&reloaded, &llava_next_batch(&inputs, "", &cfg));
    let want = r["final_loss_on_inputs"].as_f64().unwrap();
    let rel = (ours_loss - want).abs() / want;
    println!("final adapter: loss {ours_loss:.6} vs PEFT {want:.6} (rel {rel:.2e})");
    assert!(rel <= 1e-4, "the exported adapter's loss differs from PEFT's final adapter by {rel}");
}
