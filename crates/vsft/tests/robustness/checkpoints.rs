//! Checkpoints: a real two-step run's checkpoint, then resumes from copies in which one file is
//! damaged: trainer_state.json fields that change the stage or point past the data, absurd
//! steps, truncated or endless state files, safetensors files cut short or lying about shapes,
//! missing files.

use std::path::Path;

use serde_json::{json, Value};

use crate::common::{run, vsft};
use crate::recipes::{base_recipe, render};
use crate::{args, endless, replace, scratch, tiny_llava, with_value, Case};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// What reads `file` of a run's checkpoint-2: a resume reads the trainer state, the trainable
/// values and the optimizer; `vsft generate --adapter` reads the PEFT adapter files.
fn reader(dir: &Path, k: usize, run: &Path, file: &str) -> Vec<std::ffi::OsString> {
    let checkpoint = run.join("checkpoint-2");
    if file.starts_with("adapter_") {
        let image = crate::common::root().join("tests/fixtures/data/images/chelsea.jpg");
        return args!["generate", "--model", tiny_llava(), "--adapter", checkpoint, "--image", image, "--prompt", "What?", "--max-new-tokens", "1"];
    }
    let r = dir.join(format!("resume{k}.toml"));
    std::fs::write(&r, render(&base_recipe(run, 3), "train", "seed", "1")).unwrap();
    args!["train", "--config", &r, "--resume", checkpoint]
}

pub fn cases() -> Vec<Case> {
    let dir = scratch("checkpoints");
    let out = dir.join("base-run");
    let recipe = dir.join("base.toml");
    std::fs::write(&recipe, render(&base_recipe(&out, 2), "train", "seed", "1")).unwrap();
    run(vsft().arg("train").arg("--config").arg(&recipe));
    let state: Value = serde_json::from_slice(&std::fs::read(out.join("checkpoint-2/trainer_state.json")).unwrap()).unwrap();
    let state_edit = |path: &[&str], v: Value| with_value(&state, &path.iter().map(|s| s.to_string()).collect::<Vec<_>>(), v).to_string().into_bytes();

    // (file, what, new bytes or None for /dev/zero or Some(empty marker) for removal, field to name)
    let mut damage: Vec<(&str, String, Option<Vec<u8>>, Option<&str>)> = vec![
        ("trainer_state.json", "stage changed".into(), Some(state_edit(&["stage"], json!("pretrain"))), Some("stage")),
        ("trainer_state.json", "model_type changed".into(), Some(state_edit(&["model_type"], json!("qwen2_vl"))), Some("model_type")),
        ("trainer_state.json", "cursor past the data".into(), Some(state_edit(&["cursor", "position"], json!(1_000_000_000u64))), Some("position")),
        ("trainer_state.json", "cursor epoch absurd".into(), Some(state_edit(&["cursor", "epoch"], json!(1_000_000_000u64))), Some("epoch")),
        ("trainer_state.json", "global_step absurd".into(), Some(state_edit(&["global_step"], json!(u64::MAX))), Some("global_step")),
        ("trainer_state.json", "global_step negative".into(), Some(state_edit(&["global_step"], json!(-1))), Some("global_step")),
        ("trainer_state.json", "trainable names unknown".into(), Some(state_edit(&["trainable"], json!(["no.such.tensor"]))), None),
        ("trainer_state.json", "truncated".into(), Some(state.to_string().as_bytes()[..40].to_vec()), None),
        ("trainer_state.json", "not JSON".into(), Some(b"\x00garbage".to_vec()), None),
        ("trainer_state.json", "/dev/zero".into(), None, None),
    ];
    for file in ["adapter_model.safetensors", "trainable.safetensors", "optimizer.safetensors"] {
        let bytes = std::fs::read(out.join("checkpoint-2").join(file)).unwrap();
        damage.push((file, "truncated".into(), Some(bytes[..bytes.len() * 2 / 3].to_vec()), None));
        let mut lie = bytes.clone();
        lie[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        damage.push((file, "header length u64::MAX".into(), Some(lie), None));
        damage.push((file, "empty".into(), Some(Vec::new()), None));
    }
    damage.push(("adapter_config.json", "not JSON".into(), Some(b"{\"r\": ".to_vec()), None));
    damage.push(("adapter_config.json", "r changed".into(), Some(with_value(&serde_json::from_slice(&std::fs::read(out.join("checkpoint-2/adapter_config.json")).unwrap()).unwrap(), &["r".into()], json!(8)).to_string().into_bytes()), None));

    let mut cases = Vec::new();
    for (k, (file, what, bytes, field)) in damage.into_iter().enumerate() {
        let copy = dir.join(format!("run{k}"));
        copy_dir(&out, &copy);
        let target = copy.join("checkpoint-2").join(file);
        match bytes {
            Some(b) => replace(&target, b),
            None => endless(&target),
        }
        let mut case = Case::new("checkpoint", format!("{file}: {what}"), reader(&dir, k, &copy, file), file);
        if let Some(f) = field {
            case = case.naming(f);
        }
        if what == "r changed" {
            // The tensors are what no longer fits: the error names them and the r they miss.
            case.must_name = vec!["adapter_model.safetensors".into(), "r=8".into()];
        }
        cases.push(case);
    }
    for file in ["trainer_state.json", "optimizer.safetensors", "adapter_model.safetensors"] {
        let copy = dir.join(format!("missing-{file}"));
        copy_dir(&out, &copy);
        std::fs::remove_file(copy.join("checkpoint-2").join(file)).unwrap();
        cases.push(Case::new("checkpoint", format!("{file} missing"), reader(&dir, 1000 + cases.len(), &copy, file), file));
    }
    cases
}
