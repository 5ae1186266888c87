//! Interop with the Python `huggingface_hub` client, when `python3` has it (skipped otherwise):
//! - Python uploads to the test server and the server's checks pass (the server is faithful);
//! - Python downloads what vsft pushed, into its cache; vsft reads that cache offline;
//! - vsft downloads what Python pushed; Python reads vsft's cache with `local_files_only`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vsft_hub::testserver::{TestServer, TestServerConfig};
use vsft_hub::{HubClient, HubConfig, PushOptions, RepoType};

const SCRIPT: &str = r#"
import os, sys
from huggingface_hub import HfApi, snapshot_download, hf_hub_download

def same_tree(src, dst):
    n = 0
    for root, _, files in os.walk(src):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, src)
            with open(p, "rb") as a, open(os.path.join(dst, rel), "rb") as b:
                assert a.read() == b.read(), rel
            n += 1
    assert n > 0

phase = sys.argv[1]
if phase == "online":
    ep, tok, py_src, rs_src, py_cache = sys.argv[2:7]
    api = HfApi(endpoint=ep, token=tok)
    api.create_repo("py/model", exist_ok=True)
    api.upload_folder(folder_path=py_src, repo_id="py/model", commit_message="from python")
    p = snapshot_download("rs/model", cache_dir=py_cache, endpoint=ep, token=tok)
    same_tree(rs_src, p)
    print("PY_SNAPSHOT=" + p)
elif phase == "offline":
    rs_cache, py_src, expected = sys.argv[2:5]
    p = snapshot_download("py/model", cache_dir=rs_cache, local_files_only=True)
    assert os.path.realpath(p) == os.path.realpath(expected), (p, expected)
    same_tree(py_src, p)
    f = hf_hub_download("py/model", "sub/big.bin", cache_dir=rs_cache, local_files_only=True)
    with open(f, "rb") as a, open(os.path.join(py_src, "sub/big.bin"), "rb") as b:
        assert a.read() == b.read()
print("OK")
"#;

fn has_python_hub() -> bool {
    Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the script with a clean HF environment; bounded by a timeout.
fn python(tmp: &Path, args: &[&str]) -> String {
    let script = tmp.join("interop.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let mut cmd = Command::new("python3");
    cmd.arg(&script).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("HF_") || k.starts_with("HUGGING") || k.to_ascii_lowercase().ends_with("_proxy") {
            cmd.env_remove(k);
        }
    }
    cmd.env("HF_HOME", tmp.join("py-home"))
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("NO_PROXY", "127.0.0.1,localhost");
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.contains("OK"),
        "python {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn write(dir: &Path, rel: &str, data: &[u8]) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

#[test]
fn python_huggingface_hub_interop() {
    if !has_python_hub() {
        eprintln!("skipping: python3 with huggingface_hub not available");
        return;
    }
    let server = TestServer::start(TestServerConfig {
        multipart_threshold: 64 * 1024,
        chunk_size: 16 * 1024,
        ..TestServerConfig::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let big: Vec<u8> = (0..150_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let rs_src = t.join("rs-src");
    write(&rs_src, "model.safetensors", &big[..100_000]);
    write(&rs_src, "config.json", br#"{"model_type":"llava"}"#);
    write(&rs_src, "nested/dir/README.md", b"# hi\n");
    let py_src = t.join("py-src");
    write(&py_src, "sub/big.bin", &big);
    write(&py_src, "small.bin", &big[..3000]);
    write(&py_src, "config.json", br#"{"from":"python"}"#);

    let cfg = HubConfig {
        endpoint: server.endpoint(),
        token: Some(server.token()),
        cache_dir: t.join("rs-cache"),
        offline: false,
        max_tries: 3,
        retry_base_delay: Duration::from_millis(5),
        progress: false,
    };
    let hub = HubClient::new(cfg.clone());
    hub.push_folder(&rs_src, "rs/model", &PushOptions::default()).unwrap();

    let n_before = server.requests().len();
    let out = python(
        t,
        &[
            "online",
            &server.endpoint(),
            &server.token(),
            py_src.to_str().unwrap(),
            rs_src.to_str().unwrap(),
            t.join("py-cache").to_str().unwrap(),
        ],
    );
    assert_eq!(server.violations(), Vec::<String>::new(), "python's requests failed the server's checks");
    let py_reqs = server.requests()[n_before..].to_vec();
    for r in &py_reqs {
        eprintln!("python: {} {} -> {}", r.method, r.path, r.status);
    }
    assert!(py_reqs.iter().any(|r| r.path.starts_with("/lfs-part/")), "python used multipart");
    assert!(py_reqs.iter().any(|r| r.path.starts_with("/lfs-up/")), "python used a basic transfer");
    assert!(py_reqs.iter().all(|r| r.status < 400), "python got errors");
    let py_snapshot = out.lines().find_map(|l| l.strip_prefix("PY_SNAPSHOT=")).unwrap().to_string();

    // vsft reads Python's cache offline.
    let offline = HubClient::new(HubConfig { cache_dir: t.join("py-cache"), offline: true, ..cfg.clone() });
    let snap = offline.snapshot_download("rs/model", RepoType::Model, None, &[]).unwrap();
    assert_eq!(std::fs::canonicalize(&snap).unwrap(), std::fs::canonicalize(&py_snapshot).unwrap());
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), &big[..100_000]);

    // Python reads vsft's cache.
    let snap = hub.snapshot_download("py/model", RepoType::Model, None, &[]).unwrap();
    assert_eq!(std::fs::read(snap.join("sub/big.bin")).unwrap(), big);
    python(t, &["offline", t.join("rs-cache").to_str().unwrap(), py_src.to_str().unwrap(), snap.to_str().unwrap()]);
    assert_eq!(server.violations(), Vec::<String>::new());
}
