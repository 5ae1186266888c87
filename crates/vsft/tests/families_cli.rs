//! The commands that work on LLaVA-1.5 work unchanged on LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL
//! directories, end to end through the binary: `data inspect --json`, `train` (stage 2),
//! `eval --json`, `generate` (the blog's example, greedy tokens equal to transformers'),
//! `export`, `export --merge`, `logits` and `push`. The models are the tiny fixtures in their
//! Hub repositories' file layouts (real Mistral and Qwen tokenizers); the data are real
//! photographs.

use std::path::Path;

use vsft_hub::testserver::{TestServer, TestServerConfig};
use vsft_model::weights::read_tensor_file;

mod common;
use common::{vsft, root, run};

#[test]
fn every_command_runs_on_a_llava_next_directory() {
    let fx = root().join("tests/fixtures/llava_next");
    every_command_runs("llava_next", &fx.join("model/legacy"), &fx.join("data/llava_instruct_mix"), &fx.join("model"), 32000, &["image_newline"]);
}

#[test]
fn every_command_runs_on_qwen2_vl_directories() {
    let fx = root().join("tests/fixtures/qwen_vl");
    for name in ["qwen2_vl", "qwen2_5_vl"] {
        let m = fx.join("model").join(name);
        every_command_runs(name, &m.join("hub"), &fx.join("data/llava_instruct_mix"), &m, 151655, &[]);
    }
}

/// `fixtures`: the model fixture directory with `generate.json`, `lora_final/` and `inputs.safetensors`;
/// `frozen_extra`: parameter groups the stage report must list as frozen.
fn every_command_runs(family: &str, model: &Path, data: &Path, fixtures: &Path, image_token: i64, frozen_extra: &[&str]) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{family}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // data inspect: every row's image tokens are what the family's placeholder rule gives.
    let out = run(vsft().args(["data", "inspect", "--json", "--limit", "3", "--model"]).arg(&model).arg("--data").arg(&data));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty(), "inspect printed no rows");
    for l in &lines {
        let ids = l["input_ids"].as_array().unwrap();
        let image_tokens = ids.iter().filter(|v| v.as_i64() == Some(image_token)).count();
        let per_image: usize = l["images"].as_array().unwrap().iter().map(|i| i["tokens"].as_u64().unwrap() as usize).sum();
        assert_eq!(image_tokens, per_image, "row {}: image tokens in the ids vs the processor counts", l["index"]);
    }

    // train: stage 2 (projector + LoRA), two steps, a checkpoint each.
    let run_dir = dir.join("run");
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\neval = \"{}\"\nmax_length = 4096\n[train]\nstage = \"instruct\"\noutput_dir = \"{}\"\nmax_steps = 2\nsave_steps = 1\nbatch_size = 2\nlr = 1e-2\nshuffle = false\n[lora]\nr = 8\nalpha = 16\ndropout = 0.0\n",
            model.display(),
            data.display(),
            data.join("data/train-00000-of-00001.parquet").display(),
            run_dir.display()
        ),
    )
    .unwrap();
    let train = run(vsft().arg("train").arg("--config").arg(&recipe));
    let log = String::from_utf8_lossy(&train.stderr);
    assert!(log.contains(&format!("model family {family}")), "{log}");
    for group in frozen_extra {
        assert!(log.lines().any(|l| l.contains(group) && l.contains("frozen")), "the stage report names {group} as frozen: {log}");
    }
    let ckpt = run_dir.join("checkpoint-2");
    assert!(ckpt.join("adapter_model.safetensors").exists());

    // eval --json with the adapter.
    let out = run(vsft().arg("eval").arg("--model").arg(&model).arg("--adapter").arg(&ckpt).arg("--data").arg(&data).args(["--split", "all", "--json", "--max-length", "4096"]));
    let e: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert!(e["loss"].as_f64().unwrap().is_finite() && e["label_tokens"].as_u64().unwrap() > 0, "{e}");

    // generate: the blog's prompt through the model's template; greedy = transformers.
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures.join("generate.json")).unwrap()).unwrap();
    let image = fixtures.join(want["image"].as_str().unwrap());
    let out = run(vsft().arg("generate").arg("--model").arg(&model).arg("--image").arg(&image).args(["--prompt", "What is shown in this image?", "--max-new-tokens", "12"]));
    let tokenizer = vsft_data::template::load_tokenizer(&model.join("tokenizer.json")).unwrap();
    let tokens: Vec<u32> = want["new_tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let expected = tokenizer.decode(&tokens, true).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), expected, "generated text");

    // export: PEFT's key set (the same targets as PEFT's own adapter fixture).
    let adapter = dir.join("adapter");
    run(vsft().arg("export").arg("--checkpoint").arg(&ckpt).arg("--out").arg(&adapter));
    let ours = read_tensor_file(&adapter.join("adapter_model.safetensors")).unwrap();
    let peft = read_tensor_file(&fixtures.join("lora_final/adapter_model.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>());
    let card = std::fs::read_to_string(adapter.join("README.md")).unwrap();
    let class = vsft_model::Family::from_model_type(family).unwrap().architecture();
    assert!(card.contains(class) && card.contains(&format!("- {family}")), "{card}");

    // export --merge: the Hub's legacy layout; its logits equal base + adapter's (transformers'
    // batch layout in, tiles padded, image_sizes).
    let merged = dir.join("merged");
    run(vsft().arg("export").arg("--merge").arg("--checkpoint").arg(&ckpt).arg("--out").arg(&merged));
    // The Hub layout of the family: the base model's own tensor names.
    let names = read_tensor_file(&merged.join("model.safetensors")).unwrap();
    let base_names = read_tensor_file(&model.join(if model.join("model.safetensors").exists() { "model.safetensors" } else { "model-00002-of-00002.safetensors" })).unwrap();
    assert!(base_names.keys().all(|k| names.contains_key(k)), "the merged model uses the base model's tensor names");
    assert!(merged.join("preprocessor_config.json").exists() && merged.join("chat_template.json").exists());
    let inputs = fixtures.join("inputs.safetensors");
    let logits_of = |model_dir: &Path, adapter: Option<&Path>, out: &Path| common::logits_of(model_dir, adapter, &inputs, out);
    let with_adapter = logits_of(&model, Some(&adapter), &dir.join("l1.safetensors"));
    let merged_logits = logits_of(&merged, None, &dir.join("l2.safetensors"));
    let base = logits_of(&model, None, &dir.join("l3.safetensors"));
    let diff = with_adapter.iter().zip(&merged_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let moved = with_adapter.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!("merged vs adapter logits max abs diff {diff:.2e}; training moved them by {moved:.2e}");
    assert!(diff <= 1e-4 && moved > 1e-4, "merged {diff}, moved {moved}");

    // push to the Hub test server.
    let server = TestServer::start(TestServerConfig::default());
    let out = run(vsft()
        .arg("push")
        .arg(&adapter)
        .args(["--repo", &format!("me/{family}-lora")])
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_TOKEN", server.token())
        .env("HF_HOME", dir.join("hf-home")));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("me/{family}-lora")));
    assert!(server.head(vsft_hub::RepoType::Model, &format!("me/{family}-lora"), "main").is_some());
}
