//! Stage 2 on LLaVA-NeXT against transformers + PEFT (scripts/make_llava_next_model_fixtures.py):
//! starting from PEFT's own initial adapter, six AdamW steps (LoRA lr 1e-3, projector 2e-4,
//! weight decay 0.1 on weights, global clipping at 1.0, three batches of real photographs
//! cycled) give PEFT's losses and gradient norms; the adapter vsft writes has PEFT's keys, and
//! loaded again it gives the loss PEFT computes with its own final adapter.




use vsft_model::weights::read_tensor_file;
use vsft_model::LlavaNextConfig;

mod common;
use common::{export_and_reload, fixtures, llava_next_batch, mean_loss, peft_trainer, replay_steps};

fn dir() -> std::path::PathBuf {
    fixtures().join("llava_next/model")
}

#[test]
fn six_lora_steps_match_peft_and_the_adapter_round_trips() {
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap();
    let r = &reference["lora"];
    let cfg = LlavaNextConfig::from_file(&dir().join("legacy/config.json")).unwrap();
    let (mut trainer, lora_cfg) = peft_trainer(&dir().join("legacy"), &dir(), r, "projector");
    assert_eq!(lora_cfg.dropout, 0.0);
    let n_peft_trainable = r["trainable_parameter_order"].as_array().unwrap().len();
    assert_eq!(trainer.trainable.len(), n_peft_trainable, "vsft trains what PEFT trains (LoRA A/B + projector; image_newline frozen)");
    let batches = read_tensor_file(&dir().join("lora_batches.safetensors")).unwrap();
    replay_steps(&mut trainer, r, "llava_next", |step| llava_next_batch(&batches, &format!("batch{}.", step % 3), &cfg));

    // The adapter as a checkpoint writes it, then loaded into a fresh base.
    let reloaded = export_and_reload(&trainer, &lora_cfg, &dir().join("legacy"), &dir(), "llava-next-adapter");
    let inputs = read_tensor_file(&dir().join("inputs.safetensors")).unwrap();
    let ours_loss = mean_loss(&reloaded, &llava_next_batch(&inputs, "", &cfg));
    let want = r["final_loss_on_inputs"].as_f64().unwrap();
    let rel = (ours_loss - want).abs() / want;
    println!("final adapter: loss {ours_loss:.6} vs PEFT {want:.6} (rel {rel:.2e})");
    assert!(rel <= 1e-4, "the exported adapter's loss differs from PEFT's final adapter by {rel}");
}
