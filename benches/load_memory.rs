//! Peak resident memory and time of loading a checkpoint of S bytes (issue: loading must not hold
//! the checkpoint twice: peak RSS < 1.3·S + 200 MB).
//!
//! Writes a synthetic ~1 GB f32 LLaVA checkpoint (configs/bench-load-1gb.json, random weights)
//! once, then loads it in a fresh child process, which reports its own peak RSS (VmHWM).
//!     cargo bench -p vsft-benches --bench load_memory [-- --dir DIR]

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Flex;
use vsft_model::{LlavaConfig, LlavaModel, StoredDtype};

fn vm_hwm_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let dir = PathBuf::from(&args[i + 1]);
        let before = vm_hwm_mb();
        let t = Instant::now();
        let model = LlavaModel::<Flex>::load(&dir, &Default::default()).expect("load");
        let secs = t.elapsed().as_secs_f64();
        let n = model.named_tensors().len();
        println!(
            "{}",
            serde_json::json!({"load_s": secs, "peak_rss_mb": vm_hwm_mb(), "rss_before_mb": before, "tensors": n})
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .map(|i| PathBuf::from(&args[i + 1]))
        .unwrap_or_else(|| root.join("target/bench-load-1gb"));
    if !dir.join("model.safetensors.index.json").exists() {
        let cfg = LlavaConfig::from_file(&root.join("configs/bench-load-1gb.json")).expect("config");
        std::fs::create_dir_all(&dir).unwrap();
        let model = LlavaModel::<Flex>::random(&cfg, 7, &Default::default());
        model.save(&dir, StoredDtype::F32, 400_000_000).expect("save");
    }
    let size = dir_bytes(&dir);
    let out = std::process::Command::new(&args[0]).arg("--child").arg(&dir).output().expect("child");
    let child: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("child failed: {}", String::from_utf8_lossy(&out.stderr))
    });
    let s_mb = size as f64 / 1e6;
    let peak = child["peak_rss_mb"].as_f64().unwrap() * 1.048576; // MiB → MB
    let limit = 1.3 * s_mb + 200.0;
    println!(
        "{}",
        serde_json::json!({
            "checkpoint_mb": s_mb, "peak_rss_mb": peak, "peak_over_checkpoint": peak / s_mb,
            "limit_mb": limit, "within_limit": peak < limit, "load_s": child["load_s"],
        })
    );
}
