//! LoRA against PEFT (fixtures from scripts/make_train_fixtures.py): a PEFT-written adapter with
//! fixed non-zero A/B gives PEFT's logits (≤ 1e-5), merged too; vsft writes the same keys.

use std::path::Path;

use burn::backend::Flex;
use vsft_model::lora::LoraConfig;
use vsft_model::weights::read_tensor_file;
use vsft_model::VlmModel;

type Cpu = Flex;

mod common;

fn base() -> VlmModel<Cpu> {
    VlmModel::load(&common::model_dir("tiny-llava-mha").join("legacy"), &Default::default()).unwrap()
}

fn logits(model: &VlmModel<Cpu>, r: &std::collections::BTreeMap<String, vsft_model::weights::RawTensor>) -> Vec<f32> {
    common::logits_of(model, &common::inputs(r))
}

#[test]
fn peft_adapters_give_peft_logits_plain_and_rslora() {
    for name in ["plain", "rslora"] {
        common::check_peft_adapter::<Cpu>(name, 1.0);
    }
}

#[test]
fn vsft_adapter_files_use_peft_keys_and_config_fields() {
    let dir = common::fixtures("lora/plain");
    let (model, _) = base().load_adapter(&dir).unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("adapter-keys");
    std::fs::create_dir_all(&out).unwrap();
    model.save_adapter_weights(&out, &|_| false).unwrap();
    let peft = read_tensor_file(&dir.join("adapter_model.safetensors")).unwrap();
    let ours = read_tensor_file(&out.join("adapter_model.safetensors")).unwrap();
    let pk: Vec<&String> = peft.keys().collect();
    let ok: Vec<&String> = ours.keys().collect();
    assert_eq!(ok, pk, "adapter tensor names differ from PEFT's");
    for (k, t) in &peft {
        assert_eq!(ours[k].shape, t.shape, "{k}");
        assert_eq!(ours[k].to_f32().unwrap(), t.to_f32().unwrap(), "{k} changed through load/save");
    }
    let peft_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let cfg = LoraConfig::from_peft_json(&peft_cfg).unwrap();
    let mut model = model;
    let targeted: Vec<String> = model.as_dyn_mut().language_model_mut().linears_mut().into_iter().map(|(n, _)| n).collect();
    let ours_cfg = cfg.to_peft_json(&targeted, "base", vsft_model::PartNames::LLAVA, false);
    for field in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "modules_to_save", "bias"] {
        assert_eq!(ours_cfg[field], peft_cfg[field], "adapter_config.json field {field}");
    }
    // The target regex selects the same modules as PEFT's (same re.fullmatch semantics).
    let ours_re = LoraConfig { target_modules: vsft_model::lora::TargetModules::Regex(ours_cfg["target_modules"].as_str().unwrap().into()), ..cfg.clone() };
    let m1 = cfg.matcher().unwrap();
    let m2 = ours_re.matcher().unwrap();
    for n in &targeted {
        assert_eq!(m1(n), m2(n), "{n}");
    }
}

#[test]
fn fresh_adapters_start_at_the_base_model() {
    let r = read_tensor_file(&common::fixtures("lora/plain/reference.safetensors")).unwrap();
    let model = base();
    let before = logits(&model, &r);
    let mut adapted = base();
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, ..Default::default() };
    let targeted = adapted.add_lora(&cfg, 3).unwrap();
    assert_eq!(targeted.len(), 7 * 2, "7 linears × 2 layers, none in the vision tower");
    assert!(targeted.iter().all(|n| n.starts_with("model.language_model.layers.")));
    assert_eq!(before, logits(&adapted, &r), "B = 0 at init: the adapter adds nothing");
    let bad = LoraConfig { target_modules: vsft_model::lora::TargetModules::Suffixes(vec!["fc1".into()]), ..cfg };
    let err = adapted.add_lora(&bad, 3).unwrap_err().to_string();
    assert!(err.contains("matches no linear layer"), "{err}");
}
