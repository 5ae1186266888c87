//! `vsft train` end to end on a tiny model and the committed llava-instruct-mix fixture:
//! exact resume (losses equal the uninterrupted run's), a SIGKILL in the middle of a checkpoint
//! write, a resume that would change what trains, and `vsft eval` agreeing with training's eval.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{vsft, root, tiny_model};

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn recipe(dir: &Path, model: &Path, out: &Path) -> PathBuf {
    let text = format!(
        r#"[model]
path = "{}"
[data]
train = "{}"
eval = "{}"
max_length = 512
label_mask = "assistant"
num_workers = 2
[train]
stage = "instruct"
output_dir = "{}"
max_steps = 6
batch_size = 2
grad_accum = 2
lr = 1e-3
projector_lr = 5e-4
weight_decay = 0.01
scheduler = "cosine"
warmup_ratio = 0.1
max_grad_norm = 1.0
log_steps = 1
save_steps = 2
[lora]
r = 4
alpha = 8
dropout = 0.1
"#,
        model.display(),
        root().join("tests/fixtures/data/llava_instruct_mix").display(),
        root().join("tests/fixtures/data/llava_instruct_mix").display(),
        out.display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The newest complete checkpoint's step.
fn vsft_last_step(out: &Path) -> usize {
    std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("trainer_state.json").exists())
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("checkpoint-").and_then(|s| s.parse().ok()))
        .max()
        .unwrap()
}

/// step → loss (the last line written for each step wins: a resumed run appends).
fn losses(out: &Path) -> BTreeMap<u64, f64> {
    let mut m = BTreeMap::new();
    for line in std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let (Some(s), Some(l)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            m.insert(s, l);
        }
    }
    m
}

fn train(recipe: &Path, extra: &[&str]) -> std::process::Output {
    let out = vsft().arg("train").arg("--config").arg(recipe).args(extra).output().unwrap();
    assert!(out.status.success(), "vsft train failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn resume_kill_and_eval() {
    let dir = tmp("e2e-resume");
    let model = tiny_model(&dir);

    // The uninterrupted run.
    let full_out = dir.join("full");
    train(&recipe(&dir, &model, &full_out), &[]);
    let full = losses(&full_out);
    assert_eq!(full.len(), 6);
    let log = String::from_utf8(train(&recipe(&dir, &model, &dir.join("log")), &[]).stderr).unwrap();
    assert!(log.contains("vision tower") && log.contains("frozen") && log.contains("LoRA adapters"), "{log}");
    // stderr is a pipe here, not a terminal: no bar, one plain line per log step.
    for step in 1..=6 {
        assert!(log.contains(&format!("vsft: step {step}/6  loss ")), "no line for step {step}: {log}");
    }
    assert!(!log.contains('\r') && !log.contains('\x1b'), "control characters without a terminal: {log:?}");

    // Resume from checkpoint-4 after losing the rest.
    let resumed_out = dir.join("resumed");
    let r = recipe(&dir, &model, &resumed_out);
    train(&r, &[]);
    std::fs::remove_dir_all(resumed_out.join("checkpoint-6")).unwrap();
    std::fs::remove_file(resumed_out.join("metrics.jsonl")).unwrap();
    let out = train(&r, &["--resume", "auto"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed from"), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = losses(&resumed_out);
    assert_eq!(resumed.keys().copied().collect::<Vec<_>>(), vec![5, 6], "the resumed run continues at step 5");
    for (step, l) in &resumed {
        let d = (l - full[step]).abs();
        println!("resume: step {step} loss {l} vs uninterrupted {} (diff {d:.2e})", full[step]);
        assert!(d <= 1e-6, "step {step}: resumed loss differs by {d}");
    }

    // SIGKILL while checkpoint-4 is being written: checkpoint-2 survives and the run resumes from it.
    let killed_out = dir.join("killed");
    let r = recipe(&dir, &model, &killed_out);
    let mut child = train_pausing_in_checkpoints(&r, 1500);
    wait_for(&killed_out.join(".tmp-checkpoint-4"), "checkpoint-4 never started");
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(killed_out.join("checkpoint-2/trainer_state.json").exists());
    assert!(!killed_out.join("checkpoint-4").exists(), "a half-written checkpoint must not look complete");
    train(&r, &["--resume", "auto"]);
    let after = losses(&killed_out);
    for step in 3..=6u64 {
        let d = (after[&step] - full[&step]).abs();
        println!("kill: step {step} loss diff {d:.2e}");
        assert!(d <= 1e-6, "step {step}: after the kill, loss differs by {d}");
    }

    // Resuming with a recipe that changes what trains is refused, saying why.
    let out = vsft()
        .arg("train")
        .arg("--config")
        .arg(&r)
        .args(["--set", "lora.r=8", "--resume", "auto"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("changes what is trained"), "{err}");

    // Ctrl-C: a checkpoint at the step reached, exit code 130, and the run resumes from it.
    let int_out = dir.join("interrupted");
    let r = recipe(&dir, &model, &int_out);
    let mut child = train_pausing_in_checkpoints(&r, 800);
    wait_for(&int_out.join("checkpoint-2/trainer_state.json"), "checkpoint-2 never appeared");
    let st = Command::new("kill").arg("-INT").arg(child.id().to_string()).status().unwrap();
    assert!(st.success());
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "Ctrl-C exits with 130 after saving");
    let saved = vsft_last_step(&int_out);
    assert!((2..6).contains(&saved), "the interrupt saved step {saved}");
    train(&r, &["--resume", "auto"]);
    let after = losses(&int_out);
    for step in (saved as u64 + 1)..=6 {
        assert!((after[&step] - full[&step]).abs() <= 1e-6, "step {step} after Ctrl-C + resume");
    }

    // A loss that overflows stops the run with an error naming the step.
    let out = vsft()
        .arg("train")
        .arg("--config")
        .arg(&r)
        .args(["--set", "train.lr=1e30", "--set", "train.max_grad_norm=0", "--set", &format!("train.output_dir=\"{}\"", dir.join("nan").display())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step ") && err.contains("the loss is") && err.contains("on_nan"), "{err}");

    // `vsft eval` with the final adapter gives training's final eval loss.
    assert_eval_matches_training(&model, &full_out.join("checkpoint-6"));
}

/// `vsft eval` of `checkpoint` (as an adapter on `model`) gives the eval loss training recorded in it.
fn assert_eval_matches_training(model: &Path, checkpoint: &Path) {
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap()).unwrap();
    let out = vsft()
        .args(["eval", "--json", "--label-mask", "assistant", "--batch-size", "2", "--max-length", "512", "--model"])
        .arg(model)
        .arg("--adapter")
        .arg(checkpoint)
        .arg("--data")
        .arg(root().join("tests/fixtures/data/llava_instruct_mix"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let trained_eval = state["last_eval_loss"].as_f64().unwrap();
    println!("eval: {v} vs training's eval loss {trained_eval}");
    assert!((v["loss"].as_f64().unwrap() - trained_eval).abs() < 1e-5);
}

/// A vision tower trained in full travels in the adapter (PEFT's `modules_to_save`): `vsft eval`
/// and `generate` load it back and give training's eval loss.
#[test]
fn a_trained_tower_travels_in_the_adapter() {
    let dir = tmp("e2e-tower");
    let model = tiny_model(&dir);
    let out = dir.join("out");
    let r = recipe(&dir, &model, &out);
    let text = std::fs::read_to_string(&r).unwrap().replace("max_steps = 6", "max_steps = 2").replace("[lora]", "freeze_vision_tower = false\nvision_lr = 1e-3\n[lora]");
    std::fs::write(&r, text).unwrap();
    train(&r, &[]);
    assert_eval_matches_training(&model, &out.join("checkpoint-2"));
}

/// `vsft train` in the background, pausing inside each checkpoint write for `ms`
/// (so a test can interrupt it there).
/// On a terminal (a pseudo-terminal from util-linux's `script`), the bar is drawn in place with
/// step/total, loss, lr, tokens/s and the ETA, and the plain per-step lines are not printed.
#[test]
fn on_a_terminal_the_progress_bar_is_drawn() {
    let dir = tmp("e2e-tty");
    let model = tiny_model(&dir);
    let r = recipe(&dir, &model, &dir.join("out"));
    let cmd = format!("{} train --config {}", env!("CARGO_BIN_EXE_vsft"), r.display());
    let out = Command::new("script").args(["-qefc", &cmd, "/dev/null"]).env("COLUMNS", "160").output().expect("util-linux's script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains('\r') || text.contains('\x1b'), "the bar is redrawn in place: {text:?}");
    assert!(text.contains("/6 steps") && text.contains(" tok/s") && text.contains("lr "), "bar fields: {text:?}");
    assert!(!text.contains("vsft: step 1/6"), "plain lines on a terminal: {text:?}");
}

fn train_pausing_in_checkpoints(recipe: &Path, ms: u64) -> std::process::Child {
    vsft()
        .arg("train")
        .arg("--config")
        .arg(recipe)
        .env("VSFT_TEST_PAUSE_IN_CHECKPOINT_MS", ms.to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits up to 2 minutes for `path` to exist.
fn wait_for(path: &Path, never: &str) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "{never}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `torchrun --nproc-per-node 2 vsft train` or `srun -n 2 vsft train` would start two copies
/// training the whole dataset into one output_dir: refused before anything is written, naming
/// the rank and the launcher; world size 1 trains as usual.
#[test]
fn multi_process_launches_are_refused_until_ranks_exist() {
    let dir = tmp("multi_process");
    let model = tiny_model(&dir);
    let out = dir.join("out");
    let r = recipe(&dir, &model, &out);
    for (vars, want) in [
        (&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")][..], "rank 1 of 2 (torchrun environment)"),
        (&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_NODELIST", "gpu[1-2]")][..], "rank 0 of 4 (slurm environment)"),
        (&[("RANK", "2"), ("WORLD_SIZE", "2")][..], "rank 2 is not below the world size 2"),
    ] {
        let o = vsft().arg("train").arg("--config").arg(&r).envs(vars.iter().copied()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{vars:?}: {err}");
        assert!(err.contains(want), "{vars:?}: {err}");
        assert!(!out.exists(), "{vars:?}: nothing may be written");
    }
    let o = vsft().arg("train").arg("--config").arg(&r).args(["--set", "train.max_steps=1"]).envs([("RANK", "0"), ("WORLD_SIZE", "1")]).output().unwrap();
    assert!(o.status.success(), "world size 1: {}", String::from_utf8_lossy(&o.stderr));
}
