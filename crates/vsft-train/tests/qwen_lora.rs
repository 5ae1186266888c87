//! Stage 2 on Qwen2-VL and Qwen2.5-VL against transformers + PEFT
//! (scripts/make_qwen_vl_model_fixtures.py): from PEFT's own initial adapter, six AdamW steps
//! (LoRA lr 1e-3, merger 2e-4, weight decay 0.1 by transformers' rule, global clipping at 1.0,
//! three batches of real photographs cycled) give PEFT's losses and gradient norms; the adapter
//! vsft writes has PEFT's keys and, loaded again, PEFT's final loss.




use vsft_model::weights::read_tensor_file;

mod common;
use common::{export_and_reload, fixtures, mean_loss, peft_trainer, qwen_batch, replay_steps};

#[test]
fn six_lora_steps_match_peft_and_the_adapter_round_trips() {
    for name in ["qwen2_vl", "qwen2_5_vl"] {
        let dir = fixtures().join("qwen_vl/model").join(name);
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let r = &reference["lora"];
        let (mut trainer, lora_cfg) = peft_trainer::<burn::backend::Autodiff<burn::backend::Flex>>(&dir.join("hub"), &dir, r, "merger");
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
        replay_steps(&mut trainer, r, name, 1.0, |step| qwen_batch(&batches, &format!("batch{}.", step % 3), image_token, 2));
        let reloaded = export_and_reload(&trainer, &lora_cfg, &dir.join("hub"), &dir, &format!("{name}-adapter"));
        let inputs = read_tensor_file(&dir.join("inputs.safetensors")).unwrap();
        let got = mean_loss(&reloaded, &qwen_batch(&inputs, "", reloaded.as_dyn().image_token_id(), 2));
        let want = r["final_loss_on_inputs"].as_f64().unwrap();
        let rel = (got - want).abs() / want;
        println!("{name} final adapter: loss {got:.6} vs PEFT {want:.6} (rel {rel:.2e})");
        assert!(rel <= 1e-4, "{name}: the exported adapter's loss differs from PEFT's by {rel}");
    }
}
