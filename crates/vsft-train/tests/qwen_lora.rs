//! Stage 2 on Qwen2-VL and Qwen2.5-VL against transformers + PEFT
//! (scripts/make_qwen_vl_model_fixtures.py): from PEFT's own initial adapter, six AdamW steps
//! (LoRA lr 1e-3, merger 2e-4, weight decay 0.1 by transformers' rule, global clipping at 1.0,
//! three batches of real photographs cycled) give PEFT's losses and gradient norms; the adapter
//! vsft writes has PEFT's keys and, loaded again, PEFT's final loss.

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use vsft_model::weights::read_tensor_file;
use vsft_model::VlmModel;
use vsft_train::optim::AdamWConfig;
use vsft_train::trainer::OptimSettings;
use vsft_train::{Stage, Trainer};

type Train = Autodiff<Flex>;

mod common;
use common::{fixtures, mean_loss, qwen_batch};

#[test]
fn six_lora_steps_match_peft_and_the_adapter_round_trips() {
    for name in ["qwen2_vl", "qwen2_5_vl"] {
        let dir = fixtures().join("qwen_vl/model").join(name);
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let r = &reference["lora"];
        let base = VlmModel::<Train>::load(&dir.join("hub"), &Default::default()).unwrap();
        let (model, lora_cfg) = base.load_adapter(&dir.join("lora_init")).unwrap();
        let settings = OptimSettings {
            lr: r["lr"]["lora"].as_f64().unwrap(),
            projector_lr: r["lr"]["merger"].as_f64(),
            vision_lr: None,
            weight_decay: r["weight_decay"].as_f64().unwrap(),
            adam: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            max_grad_norm: r["max_grad_norm"].as_f64().unwrap(),
            seed: 0,
        };
        let mut trainer = Trainer::new(model, Stage::Instruct, settings).unwrap();
        let peft_trainable = r["trainable_parameter_order"].as_array().unwrap().len();
        assert_eq!(trainer.trainable.len(), peft_trainable, "{name}: vsft trains what PEFT trains");
        // transformers' decay rule, group by group (a LayerNorm merger norm does not decay, an RMSNorm one does).
        for g in r["param_groups"].as_array().unwrap() {
            let wd = g["weight_decay"].as_f64().unwrap();
            for p in g["params"].as_array().unwrap() {
                let p = p.as_str().unwrap().replace("base_model.model.", "").replace(".modules_to_save.default", "").replace(".default", "");
                let ours = vsft_model::qwen2_vl::canonical_name(&p).replace("lora_A.weight", "lora.lora_a").replace("lora_B.weight", "lora.lora_b");
                let got = trainer.trainable.get(&ours).unwrap_or_else(|| panic!("{name}: {ours} does not train")).weight_decay;
                assert_eq!(got, wd, "{name}: weight decay of {ours}");
            }
        }
        let batches = read_tensor_file(&dir.join("lora_batches.safetensors")).unwrap();
        let image_token = trainer.model.as_dyn().image_token_id();
        let losses: Vec<f64> = r["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let norms: Vec<f64> = r["grad_norms_preclip"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let lr = r["lr"]["lora"].as_f64().unwrap();
        for (step, (want, want_norm)) in losses.iter().zip(&norms).enumerate() {
            let b = qwen_batch(&batches, &format!("batch{}.", step % 3), image_token, 2);
            let stats = trainer.step(&[b], lr, step, false).unwrap().unwrap();
            let (rel, rel_norm) = ((stats.loss - want).abs() / want, (stats.grad_norm - want_norm).abs() / want_norm);
            println!("{name} step {step}: loss {:.6} vs {want:.6} (rel {rel:.2e}), grad norm rel {rel_norm:.2e}", stats.loss);
            assert!(rel <= 1e-4, "{name} step {step}: loss differs by {rel}");
            assert!(rel_norm <= 1e-4, "{name} step {step}: gradient norm differs by {rel_norm}");
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-adapter"));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        trainer.model.save_adapter_weights(&out, &|_| false).unwrap();
        let targeted: Vec<String> = trainer.trainable.keys().filter_map(|k| k.split_once(".lora.")).map(|(m, _)| m.replacen("language_model.model.", "model.language_model.", 1)).collect();
        let parts = trainer.model.as_dyn().part_names();
        std::fs::write(out.join("adapter_config.json"), lora_cfg.to_peft_json(&targeted, "base", parts, false).to_string()).unwrap();
        let ours = read_tensor_file(&out.join("adapter_model.safetensors")).unwrap();
        let peft = read_tensor_file(&dir.join("lora_final/adapter_model.safetensors")).unwrap();
        assert_eq!(ours.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>(), "{name}: adapter keys differ from PEFT's");
        let (reloaded, _) = VlmModel::<Flex>::load(&dir.join("hub"), &Default::default()).unwrap().load_adapter(&out).unwrap();
        let inputs = read_tensor_file(&dir.join("inputs.safetensors")).unwrap();
        let got = mean_loss(&reloaded, &qwen_batch(&inputs, "", reloaded.as_dyn().image_token_id(), 2));
        let want = r["final_loss_on_inputs"].as_f64().unwrap();
        let rel = (got - want).abs() / want;
        println!("{name} final adapter: loss {got:.6} vs PEFT {want:.6} (rel {rel:.2e})");
        assert!(rel <= 1e-4, "{name}: the exported adapter's loss differs from PEFT's by {rel}");
    }
}
