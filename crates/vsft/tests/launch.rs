//! `vsft launch --nproc-per-node 2 -- train` (two CPU ranks) against `vsft train` at the same
//! global batch: the same losses, gradient norms, token counts and eval loss step for step, the
//! same final weights; and resuming across world sizes (a 2-rank checkpoint continued on one
//! rank, a 1-rank checkpoint continued on two) gives the uninterrupted run's steps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::{root, run, tiny_model, vsft};

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `dir/recipe.toml`: LoRA r 4 (no dropout) on `model`, six steps at accumulation 2
/// into `dir/out`, with the `[data]` and `[train]` keys given.
fn write_recipe(dir: &Path, model: &Path, data: &str, train: &str) -> PathBuf {
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\n{data}max_length = 512\nlabel_mask = \"assistant\"\n\
         [train]\nstage = \"instruct\"\noutput_dir = \"{}\"\nmax_steps = 6\ngrad_accum = 2\nlr = 1e-3\nlog_steps = 1\nsave_steps = 2\n{train}\
         [lora]\nr = 4\nalpha = 8\ndropout = 0.0\n",
        model.display(),
        dir.join("out").display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Six stage-2 steps of LoRA + projector at a global batch of 2 × accumulation 2 over the
/// 10-row fixture (an epoch is 4 + 4 + 2 rows: its last step is short), evaluated every 3.
fn recipe(dir: &Path, model: &Path) -> PathBuf {
    let data = root().join("tests/fixtures/data/llava_instruct_mix");
    write_recipe(
        dir,
        model,
        &format!("train = \"{0}\"\neval = \"{0}\"\nnum_workers = 1\n", data.display()),
        "batch_size = 2\nprojector_lr = 5e-4\nweight_decay = 0.01\nscheduler = \"cosine\"\nwarmup_ratio = 0.1\nmax_grad_norm = 1.0\neval_steps = 3\n",
    )
}

/// step → (loss, grad_norm, num_tokens), and step → eval_loss.
type Curve = (BTreeMap<u64, (f64, f64, u64)>, BTreeMap<u64, f64>);

fn curve(out: &Path) -> Curve {
    let (mut train, mut eval) = (BTreeMap::new(), BTreeMap::new());
    for line in std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        if let Some(l) = v["loss"].as_f64() {
            train.insert(step, (l, v["grad_norm"].as_f64().unwrap(), v["num_tokens"].as_u64().unwrap()));
        }
        if let Some(e) = v["eval_loss"].as_f64() {
            eval.insert(step, e);
        }
    }
    (train, eval)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// The worst relative difference of two curves over the steps of `b`.
fn compare(a: &Curve, b: &Curve, what: &str) -> f64 {
    let mut worst = 0f64;
    for (step, (l, g, n)) in &b.0 {
        let (la, ga, na) = a.0.get(step).unwrap_or_else(|| panic!("{what}: step {step} missing"));
        assert_eq!(na, n, "{what}: step {step}: num_tokens");
        worst = worst.max(rel(*la, *l)).max(rel(*ga, *g));
    }
    for (step, e) in &b.1 {
        worst = worst.max(rel(a.1[step], *e));
    }
    worst
}

/// The trainable tensors of a checkpoint, by name.
fn weights(checkpoint: &Path) -> BTreeMap<String, Vec<f32>> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(checkpoint).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") && !p.file_name().unwrap().to_string_lossy().starts_with("optimizer") {
            for (k, v) in vsft_model::weights::read_tensor_file(&p).unwrap() {
                all.insert(format!("{}:{k}", p.file_name().unwrap().to_string_lossy()), v.to_f32().unwrap());
            }
        }
    }
    assert!(!all.is_empty(), "{}: no tensors", checkpoint.display());
    all
}

fn train_cmd(recipe: &Path, ranks: usize, extra: &[String]) -> std::process::Output {
    let mut c = vsft();
    if ranks > 1 {
        c.args(["launch", "--nproc-per-node", &ranks.to_string(), "--"]);
    }
    c.arg("train").arg("--config").arg(recipe).args(extra);
    run(&mut c)
}

fn set(key_values: &[(&str, String)]) -> Vec<String> {
    key_values.iter().flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")]).collect()
}

#[test]
fn two_ranks_train_what_one_device_trains_at_the_global_batch() {
    let dir = tmp("launch");
    let model = tiny_model(&dir);
    let r = recipe(&dir, &model);
    let out = |name: &str| dir.join(name);
    let at = |name: &str, batch: usize| set(&[("train.output_dir", out(name).display().to_string()), ("train.batch_size", batch.to_string())]);

    // One device at batch 2; two ranks at batch 1 each.
    train_cmd(&r, 1, &at("one", 2));
    let launched = train_cmd(&r, 2, &at("two", 1));
    let log = String::from_utf8_lossy(&launched.stderr);
    assert!(log.contains("2 data-parallel ranks") && log.contains("batch 2 ranks × 1×2 (global 4)"), "{log}");
    let (one, two) = (curve(&out("one")), curve(&out("two")));
    assert_eq!(one.0.len(), 6, "six logged steps");
    assert_eq!(one.1.len(), 2, "two evaluations");
    let worst = compare(&two, &one, "2 ranks vs 1");
    println!("2 ranks × batch 1 vs 1 × batch 2, 6 steps: losses, gradient norms and eval losses within {worst:.2e} (relative)");
    assert!(worst <= 1e-6, "{worst}");
    let metrics = std::fs::read_to_string(out("two").join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"world_size\":2") && metrics.contains("tokens_per_s_per_rank") && metrics.contains("communication_seconds"), "{metrics}");

    let (w1, w2) = (weights(&out("one").join("checkpoint-6")), weights(&out("two").join("checkpoint-6")));
    assert_eq!(w1.keys().collect::<Vec<_>>(), w2.keys().collect::<Vec<_>>());
    let mut max_abs = 0f32;
    for (k, a) in &w1 {
        max_abs = a.iter().zip(&w2[k]).fold(max_abs, |m, (x, y)| m.max((x - y).abs()));
    }
    println!("final trainable weights within {max_abs:.2e} (absolute)");
    assert!(max_abs <= 1e-6, "{max_abs}");

    // A 2-rank checkpoint continued on one device, and a one-device checkpoint on two ranks.
    for (name, from, ranks, batch) in [("two_then_one", "two", 1, 2), ("one_then_two", "one", 2, 1)] {
        let mut extra = at(name, batch);
        extra.extend(["--resume".to_string(), out(from).join("checkpoint-2").display().to_string()]);
        let resumed = train_cmd(&r, ranks, &extra);
        let c = curve(&out(name));
        assert_eq!(c.0.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5, 6], "{name}: {}", String::from_utf8_lossy(&resumed.stderr));
        let worst = compare(&one, &c, name);
        println!("{name}: steps 3-6 within {worst:.2e} of the uninterrupted run");
        assert!(worst <= 1e-6, "{name}: {worst}");
    }
}

#[test]
fn launch_refuses_what_it_cannot_run() {
    for (args, want) in [
        (&["launch", "--nproc-per-node", "2", "--nnodes", "2", "--", "train", "--config", "x.toml"][..], "ranks on several machines train over NCCL"),
        (&["launch", "--nproc-per-node", "0", "--", "train", "--config", "x.toml"][..], "at least 1"),
        (&["launch", "--nproc-per-node", "2", "--", "eval", "--config", "x.toml"][..], "the command after `--`"),
    ] {
        let o = vsft().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Under torchrun with a world above 1, a CPU build says where such ranks run.
    let o = vsft().args(["train", "--config", "x.toml"]).env("RANK", "1").env("WORLD_SIZE", "2").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("rank 1 of 2 (torchrun environment): ranks in separate processes train over NCCL, in a build with `--features cuda`"), "{err}");
}

/// A rank that fails mid-run (its part of step 3 holds a row whose image is missing) stops the
/// other rank too, without a hang: the run exits with the failing rank's error naming the file,
/// the last checkpoint (step 2) is intact, and once the data is fixed the run resumes from it.
#[test]
fn a_failing_rank_stops_the_job_and_the_run_resumes() {
    let dir = tmp("launch_fail");
    let model = tiny_model(&dir);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/data/llava.json")).unwrap()).unwrap();
    let with_images: Vec<_> = rows.into_iter().filter(|r| r.get("image").is_some()).collect();
    let mut data: Vec<serde_json::Value> = (0..12).map(|i| with_images[i % with_images.len()].clone()).collect();
    let good = data[9]["image"].clone();
    // Unshuffled, 2 ranks × 1 row × accumulation 2: step 3 is rows 8-11, and rank 1 holds row 9.
    data[9]["image"] = "missing.jpg".into();
    let json = dir.join("rows.json");
    std::fs::write(&json, serde_json::to_string(&data).unwrap()).unwrap();
    let images = root().join("tests/fixtures/data/images");
    let data_keys = format!("train = \"{}\"\nimage_folder = \"{}\"\nnum_workers = 0\n", json.display(), images.display());
    let r = write_recipe(&dir, &model, &data_keys, "shuffle = false\nbatch_size = 1\n");
    let launch = || vsft().args(["launch", "--nproc-per-node", "2", "--", "train", "--config"]).arg(&r).args(["--resume", "auto"]).output().unwrap();
    let started = std::time::Instant::now();
    let o = launch();
    let err = String::from_utf8_lossy(&o.stderr);
    println!("the failed run stopped after {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("missing.jpg"), "the error names the file: {err}");
    assert!(dir.join("out/checkpoint-2/trainer_state.json").exists(), "the step-2 checkpoint is intact");
    assert!(!dir.join("out/checkpoint-4").exists(), "nothing was saved after the failure");

    data[9]["image"] = good;
    std::fs::write(&json, serde_json::to_string(&data).unwrap()).unwrap();
    let o = launch();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("resumed from") && log.contains("checkpoint-2"), "{log}");
    assert!(dir.join("out/checkpoint-6/trainer_state.json").exists(), "{log}");
}

/// `vsft bench allreduce` on thread ranks: the sum is checked inside (each rank adds ones), and
/// the report names the engine and the sizes.
#[test]
fn bench_allreduce_on_thread_ranks() {
    let o = vsft().args(["bench", "allreduce", "--nproc", "2", "--elements", "1000", "--iters", "2"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(o.stdout.trim_ascii()).unwrap();
    assert_eq!((v["world_size"].as_u64(), v["elements"].as_u64(), v["engine"].as_str()), (Some(2), Some(1000), Some("burn-collective (threads)")));
    assert!(v["ms_median"].as_f64().unwrap() > 0.0);
}
