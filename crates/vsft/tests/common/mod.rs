//! What the end-to-end tests share: the binary, the repository root, and running a command
//! that must succeed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn vsft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vsft"))
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `vsft init` of the end-to-end tests' tiny random LLaVA (`configs/tiny-llava-e2e.json`, the
/// fixture tokenizer) into `dir/model`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    run(vsft()
        .args(["init", "--config"])
        .arg(root().join("configs/tiny-llava-e2e.json"))
        .arg("--tokenizer-from")
        .arg(root().join("tests/fixtures/data/model"))
        .arg("--out")
        .arg(&model));
    model
}

/// Runs `cmd`, failing the test with its stderr if it does not succeed.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    out
}

/// `vsft logits` of a model (with an adapter) on an inputs file, read back.
pub fn logits_of(model_dir: &Path, adapter: Option<&Path>, inputs: &Path, out: &Path) -> Vec<f32> {
    let mut c = vsft();
    c.arg("logits").arg("--model").arg(model_dir).arg("--inputs").arg(inputs).arg("--out").arg(out);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    run(&mut c);
    vsft_model::weights::read_tensor_file(out).unwrap()["logits"].to_f32().unwrap()
}
