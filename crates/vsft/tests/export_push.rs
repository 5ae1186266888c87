//! Export and the Hub, end to end through the binary: a trained checkpoint exports as a PEFT
//! adapter whose keys are exactly the ones PEFT writes (fixture from PEFT), merges into a model
//! that vsft loads with the adapter's logits, pushes to the Hub test server and pulls back byte
//! for byte into the Hugging Face cache layout.

use std::path::Path;

use vsft_hub::testserver::{TestServer, TestServerConfig};
use vsft_model::weights::read_tensor_file;

mod common;
use common::{vsft, root, run, tiny_model};

#[test]
fn export_merge_push_pull() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-export");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(&dir);
    let server = TestServer::start(TestServerConfig { lfs_threshold: 1024, multipart_threshold: 64 * 1024, chunk_size: 16 * 1024, ..Default::default() });
    let out = dir.join("run");
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_length = 512\n[train]\nstage = \"instruct\"\noutput_dir = \"{}\"\nmax_steps = 2\nsave_steps = 1\nbatch_size = 2\nlr = 1e-2\n[lora]\nr = 4\nalpha = 8\ndropout = 0.0\n[hub]\nrepo = \"me/run-lora\"\npush_checkpoints = true\n",
            model.display(),
            root().join("tests/fixtures/data/llava_instruct_mix").display(),
            out.display()
        ),
    )
    .unwrap();
    // `[hub] repo` pushes each checkpoint to its own branch and the final adapter to main.
    run(vsft()
        .arg("train")
        .arg("--config")
        .arg(&recipe)
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_TOKEN", server.token())
        .env("HF_HOME", dir.join("hf-home-train")));
    assert!(server.head(vsft_hub::RepoType::Model, "me/run-lora", "checkpoint-1").is_some(), "checkpoint-1 pushed");
    assert!(server.head(vsft_hub::RepoType::Model, "me/run-lora", "main").is_some(), "final adapter pushed");
    let ckpt = out.join("checkpoint-2");

    // A stage-1 checkpoint exports the projector under transformers' names.
    let pre = dir.join("pretrain.toml");
    std::fs::write(
        &pre,
        std::fs::read_to_string(&recipe).unwrap().replace("stage = \"instruct\"", "stage = \"pretrain\"").replace(&out.display().to_string(), &dir.join("pre").display().to_string()).replace("[hub]\nrepo = \"me/run-lora\"\npush_checkpoints = true\n", ""),
    )
    .unwrap();
    run(vsft().arg("train").arg("--config").arg(&pre));
    run(vsft().arg("export").arg("--checkpoint").arg(dir.join("pre/checkpoint-2")).arg("--out").arg(dir.join("projector")));
    let proj = read_tensor_file(&dir.join("projector/projector.safetensors")).unwrap();
    assert_eq!(
        proj.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        ["multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias", "multi_modal_projector.linear_2.weight"]
    );
    assert!(std::fs::read_to_string(dir.join("projector/README.md")).unwrap().contains("projector pretraining"));

    // The adapter: PEFT's key set (same 2-layer shape and targets as the PEFT-written fixture).
    let adapter = dir.join("adapter");
    run(vsft().arg("export").arg("--checkpoint").arg(&ckpt).arg("--out").arg(&adapter));
    let ours = read_tensor_file(&adapter.join("adapter_model.safetensors")).unwrap();
    let peft = read_tensor_file(&root().join("tests/fixtures/lora/plain/adapter_model.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>());
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    let peft_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/lora/plain/adapter_config.json")).unwrap()).unwrap();
    for field in ["peft_type", "task_type", "modules_to_save", "bias", "use_rslora"] {
        assert_eq!(cfg[field], peft_cfg[field], "{field}");
    }
    assert_eq!(cfg["base_model_name_or_path"], model.display().to_string());
    let card = std::fs::read_to_string(adapter.join("README.md")).unwrap();
    assert!(card.starts_with("---\nbase_model: ") && card.contains("library_name: peft") && card.contains("steps: 2"), "{card}");

    // The merged model loads in vsft and gives the adapter's logits.
    let merged = dir.join("merged");
    run(vsft().arg("export").arg("--merge").arg("--checkpoint").arg(&ckpt).arg("--out").arg(&merged).args(["--max-shard-size", "3MB"]));
    assert!(merged.join("model.safetensors.index.json").exists() && merged.join("tokenizer.json").exists());
    // One row: BOS, the image's 36 tokens, a few words.
    let ids: Vec<i64> = std::iter::once(1).chain(std::iter::repeat_n(32000, 36)).chain([415, 2, 881, 13]).collect();
    let n = ids.len();
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert("input_ids".to_string(), (vec![1usize, n], ids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(), "I64"));
    tensors.insert("attention_mask".to_string(), (vec![1, n], std::iter::repeat_n(1i64, n).flat_map(|v| v.to_le_bytes()).collect(), "I64"));
    let pix: Vec<f32> = (0..3 * 84 * 84).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
    tensors.insert("pixel_values".to_string(), (vec![1, 3, 84, 84], pix.iter().flat_map(|v| v.to_le_bytes()).collect(), "F32"));
    let input_file = dir.join("inputs.safetensors");
    write_raw_safetensors(&input_file, &tensors);
    let logits_of = |model_dir: &Path, adapter: Option<&Path>, out: &Path| common::logits_of(model_dir, adapter, &input_file, out);
    let with_adapter = logits_of(&model, Some(&adapter), &dir.join("l1.safetensors"));
    let merged_logits = logits_of(&merged, None, &dir.join("l2.safetensors"));
    let base_logits = logits_of(&model, None, &dir.join("l3.safetensors"));
    let diff = with_adapter.iter().zip(&merged_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let moved = with_adapter.iter().zip(&base_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!("merged vs adapter logits max abs diff {diff:.2e}; training moved the logits by {moved:.2e}");
    assert!(diff <= 1e-4, "merged model differs from base+adapter by {diff}");
    assert!(moved > 1e-4, "the adapter must change the model");

    // Push the adapter to the Hub test server, pull it back into a fresh HF cache.
    let cache = dir.join("hf-home");
    let push = run(vsft()
        .arg("push")
        .arg(&adapter)
        .args(["--repo", "me/tiny-lora", "--private"])
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_TOKEN", server.token())
        .env("HF_HOME", &cache));
    assert!(String::from_utf8_lossy(&push.stdout).contains("me/tiny-lora"));
    assert_eq!(server.violations(), Vec::<String>::new());
    let client = vsft_hub::HubClient::new(vsft_hub::HubConfig {
        endpoint: server.endpoint(),
        token: Some(server.token()),
        cache_dir: cache.join("hub"),
        ..Default::default()
    });
    let snap = client.snapshot_download("me/tiny-lora", vsft_hub::RepoType::Model, None, &[]).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json", "README.md"] {
        assert_eq!(std::fs::read(snap.join(f)).unwrap(), std::fs::read(adapter.join(f)).unwrap(), "{f} changed in the round trip");
    }
    // The pulled adapter evaluates like the local one.
    let pulled_logits = logits_of(&model, Some(&snap), &dir.join("l4.safetensors"));
    assert_eq!(pulled_logits, with_adapter);
}

fn write_raw_safetensors(path: &Path, tensors: &std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>, &str)>) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, (shape, bytes, dtype)) in tensors {
        header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}));
        offset += bytes.len();
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, bytes, _) in tensors.values() {
        out.extend(bytes);
    }
    std::fs::write(path, out).unwrap();
}
