//! Push/pull against the loopback test Hub (`vsft_hub::testserver`). Each test has its own
//! server, temp dirs and explicit `HubConfig` (no process-global env).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vsft_hub::testserver::{TestServer, TestServerConfig};
use vsft_hub::{HubClient, HubConfig, HubError, PushOptions, RepoType};

fn client(server: &TestServer, cache: &Path, token: Option<String>) -> HubClient {
    HubClient::new(HubConfig {
        endpoint: format!("{}/", server.endpoint()),
        token,
        cache_dir: cache.to_path_buf(),
        offline: false,
        max_tries: 5,
        retry_base_delay: Duration::from_millis(2),
        progress: false,
    })
}

/// Small server thresholds so a ~100 KB file goes multipart and a ~5 KB one basic.
fn server_cfg() -> TestServerConfig {
    TestServerConfig { multipart_threshold: 64 * 1024, chunk_size: 16 * 1024, ..TestServerConfig::default() }
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A safetensors-shaped file: 8-byte header length, JSON header, raw data.
fn safetensors_like(data_len: usize, seed: u64) -> Vec<u8> {
    let header = format!(
        "{{\"base_model.model.lm_head.lora_A.weight\":{{\"dtype\":\"F32\",\"shape\":[{},1],\"data_offsets\":[0,{}]}}}}",
        data_len / 4,
        data_len / 4 * 4
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(bytes(data_len / 4 * 4, seed));
    out
}

fn write_folder(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (p, d) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, d).unwrap();
    }
}

fn adapter_folder(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let files = vec![
        ("adapter_model.safetensors", safetensors_like(100_000, 1)), // 7 parts of 16 KiB
        ("projector.safetensors", safetensors_like(5_000, 2)),       // basic LFS
        ("adapter_config.json", br#"{"peft_type":"LORA","r":8,"lora_alpha":16}"#.to_vec()),
        ("README.md", b"---\nlibrary_name: peft\n---\n# tiny adapter\n".to_vec()),
        ("tokenizer/chat_template.jinja", b"{% for m in messages %}{{ m.content }}{% endfor %}".to_vec()),
        ("empty.txt", Vec::new()),
    ];
    write_folder(dir, &files);
    files
}

fn count(server: &TestServer, method: &str, prefix: &str) -> usize {
    server.requests().iter().filter(|r| r.method == method && r.path.starts_with(prefix)).count()
}

#[test]
fn push_then_pull_round_trip_byte_for_byte() {
    let server = TestServer::start(server_cfg());
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("adapter");
    let files = adapter_folder(&src);
    let hub = client(&server, &tmp.path().join("cache"), Some(server.token()));

    let opts = PushOptions { private: true, message: Some("Upload adapter".into()), ..Default::default() };
    let info = hub.push_folder(&src, "me/tiny-adapter", &opts).unwrap();
    assert_eq!(server.violations(), Vec::<String>::new());
    assert_eq!(server.head(RepoType::Model, "me/tiny-adapter", "main").as_deref(), Some(info.commit_oid.as_str()));
    assert_eq!(server.is_private(RepoType::Model, "me/tiny-adapter"), Some(true));
    assert_eq!(info.lfs_files, vec!["adapter_model.safetensors", "projector.safetensors"]);
    assert_eq!(info.files.len(), files.len());

    // Transfers: 7 multipart parts + completion, 1 basic PUT, 2 verifies; uploads carry no token.
    assert_eq!(count(&server, "PUT", "/lfs-part/"), 7);
    assert_eq!(count(&server, "POST", "/lfs-complete/"), 1);
    assert_eq!(count(&server, "PUT", "/lfs-up/"), 1);
    assert_eq!(count(&server, "POST", "/lfs-verify/"), 2);
    assert!(server
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/lfs-"))
        .all(|r| !r.has_auth || r.path.starts_with("/lfs-verify/")));
    let stored = server.files(RepoType::Model, "me/tiny-adapter", "main").unwrap();
    for (p, d) in &files {
        assert_eq!(stored.get(*p), Some(d), "{p} on the server");
    }
    let mut lfs = server.lfs_paths(RepoType::Model, "me/tiny-adapter", "main");
    lfs.sort();
    assert_eq!(lfs, info.lfs_files);

    // Pull into a fresh cache and compare byte for byte.
    let cache = tmp.path().join("hf-cache");
    let puller = client(&server, &cache, Some(server.token()));
    let snap = puller.snapshot_download("me/tiny-adapter", RepoType::Model, None, &[]).unwrap();
    let repo_dir = cache.join("models--me--tiny-adapter");
    assert_eq!(snap, repo_dir.join("snapshots").join(&info.commit_oid));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), info.commit_oid);
    for (p, d) in &files {
        assert_eq!(&std::fs::read(snap.join(p)).unwrap(), d, "{p} pulled");
    }
    assert!(snap.join(".gitattributes").exists());
    // Python's layout: relative symlinks into blobs/, LFS blobs named by sha256.
    let oid = {
        use sha2::Digest;
        let h = sha2::Sha256::digest(&files[0].1);
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(
        std::fs::read_link(snap.join("adapter_model.safetensors")).unwrap(),
        PathBuf::from(format!("../../blobs/{oid}"))
    );
    assert_eq!(
        std::fs::read_link(snap.join("tokenizer/chat_template.jinja")).unwrap().parent().unwrap(),
        Path::new("../../../blobs")
    );
    assert!(repo_dir.join("blobs").join(&oid).is_file());
    // The CDN (another origin) never sees the token.
    assert!(server.requests().iter().any(|r| r.path.starts_with("/lfs-cdn/")));
    assert!(server.requests().iter().filter(|r| r.path.starts_with("/lfs-cdn/")).all(|r| !r.has_auth));
    assert!(server.requests().iter().filter(|r| r.path.contains("/resolve/")).all(|r| r.has_auth));

    // A second pull of the same revision downloads nothing.
    let gets = count(&server, "GET", "/lfs-cdn/") + count(&server, "GET", "/me/");
    let again = puller.snapshot_download("me/tiny-adapter", RepoType::Model, Some("main"), &["*.json"]).unwrap();
    assert_eq!(again, snap);
    assert_eq!(count(&server, "GET", "/lfs-cdn/") + count(&server, "GET", "/me/"), gets);

    // Pushing the same folder again: nothing changed, no commit.
    let uploads = count(&server, "PUT", "/lfs-");
    let same = hub.push_folder(&src, "me/tiny-adapter", &opts).unwrap();
    assert_eq!(same.commit_oid, info.commit_oid);
    assert!(same.files.is_empty() && same.unchanged.len() == files.len(), "{same:?}");
    assert_eq!(count(&server, "POST", "/api/models/me/tiny-adapter/commit/"), 1);
    // One file changed: a new commit with only that file; no LFS upload.
    std::fs::write(src.join("adapter_config.json"), br#"{"peft_type":"LORA","r":16}"#).unwrap();
    let info2 = hub.push_folder(&src, "me/tiny-adapter", &opts).unwrap();
    assert_ne!(info2.commit_oid, info.commit_oid);
    assert_eq!(info2.files, vec!["adapter_config.json"]);
    assert_eq!(count(&server, "PUT", "/lfs-"), uploads);
    // An LFS object the Hub already has (same content, new path) is committed without upload.
    std::fs::copy(src.join("projector.safetensors"), src.join("copy.safetensors")).unwrap();
    let info3 = hub.push_folder(&src, "me/tiny-adapter", &opts).unwrap();
    assert_eq!(info3.lfs_files, vec!["copy.safetensors"]);
    assert_eq!(count(&server, "PUT", "/lfs-"), uploads);
    std::fs::remove_file(src.join("copy.safetensors")).unwrap();
    let snap2 = puller.snapshot_download("me/tiny-adapter", RepoType::Model, None, &["adapter_config.json"]).unwrap();
    assert_eq!(std::fs::read(snap2.join("adapter_config.json")).unwrap(), br#"{"peft_type":"LORA","r":16}"#);
    assert_eq!(server.violations(), Vec::<String>::new());
}

#[test]
fn push_to_a_new_branch_and_dataset_repo() {
    let server = TestServer::start(server_cfg());
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("out");
    write_folder(&src, &[("weights.bin", bytes(3000, 7)), ("notes.txt", b"hello".to_vec())]);
    let hub = client(&server, &tmp.path().join("cache"), Some(server.token()));
    let opts = PushOptions { revision: Some("ckpt-100".into()), ..Default::default() };
    let info = hub.push_folder(&src, "me/run", &opts).unwrap();
    assert_eq!(server.head(RepoType::Model, "me/run", "ckpt-100").as_deref(), Some(info.commit_oid.as_str()));
    assert_ne!(server.head(RepoType::Model, "me/run", "main").as_deref(), Some(info.commit_oid.as_str()));
    let snap = hub.snapshot_download("me/run", RepoType::Model, Some("ckpt-100"), &[]).unwrap();
    assert_eq!(std::fs::read(snap.join("weights.bin")).unwrap(), bytes(3000, 7));
    assert!(tmp.path().join("cache/models--me--run/refs/ckpt-100").is_file());

    let opts = PushOptions { repo_type: RepoType::Dataset, ..Default::default() };
    hub.push_folder(&src, "me/data", &opts).unwrap();
    assert!(server.files(RepoType::Dataset, "me/data", "main").unwrap().contains_key("notes.txt"));
    assert_eq!(server.violations(), Vec::<String>::new());
}

#[test]
fn interrupted_download_resumes_with_range() {
    let server = TestServer::start(server_cfg());
    let tmp = tempfile::tempdir().unwrap();
    let big = bytes(300_000, 3);
    let small = b"{\"a\":1}".repeat(100);
    server.seed(RepoType::Model, "org/model", &[("model.safetensors", &big), ("config.json", &small)]);

    // 1) The connection drops mid-body: the client retries from where it stopped.
    server.truncate_next_downloads(1);
    let hub = client(&server, &tmp.path().join("c1"), None);
    let snap = hub.snapshot_download("org/model", RepoType::Model, None, &["*.safetensors"]).unwrap();
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), big);
    let ranges: Vec<String> = server.requests().into_iter().filter_map(|r| r.range).collect();
    assert_eq!(ranges, vec!["bytes=150000-".to_string()]);
    // Regular files too (each cut twice: .gitattributes, then config.json).
    server.truncate_next_downloads(4);
    let snap = hub.snapshot_download("org/model", RepoType::Model, None, &[]).unwrap();
    assert_eq!(std::fs::read(snap.join("config.json")).unwrap(), small);

    // 2) A partial blob left by an earlier run is resumed, not restarted.
    let oid = {
        use sha2::Digest;
        sha2::Sha256::digest(&big).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let cache2 = tmp.path().join("c2");
    let blobs = cache2.join("models--org--model/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{oid}.incomplete")), &big[..1234]).unwrap();
    let hub2 = client(&server, &cache2, None);
    let snap = hub2.snapshot_download("org/model", RepoType::Model, None, &["*.safetensors"]).unwrap();
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), big);
    assert!(!snap.join("config.json").exists());
    assert!(!blobs.join(format!("{oid}.incomplete")).exists());
    assert!(server.requests().iter().any(|r| r.range.as_deref() == Some("bytes=1234-")));

    // 3) Retries exhausted: the error says to rerun; the rerun resumes.
    let cache3 = tmp.path().join("c3");
    let mut cfg = hub2.config().clone();
    cfg.cache_dir = cache3.clone();
    cfg.max_tries = 2;
    let hub3 = HubClient::new(cfg);
    server.truncate_next_downloads(2);
    let err = hub3.snapshot_download("org/model", RepoType::Model, None, &["model.safetensors"]).unwrap_err();
    assert!(err.to_string().contains("rerun to resume"), "{err}");
    let partial = cache3.join(format!("models--org--model/blobs/{oid}.incomplete"));
    let have = std::fs::metadata(&partial).unwrap().len();
    assert!(have > 0 && have < big.len() as u64);
    let snap = hub3.snapshot_download("org/model", RepoType::Model, None, &["model.safetensors"]).unwrap();
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), big);
    assert!(server.requests().iter().any(|r| r.range.as_deref() == Some(format!("bytes={have}-").as_str())));
    assert_eq!(server.violations(), Vec::<String>::new());
}

#[test]
fn offline_mode_uses_the_cache_only() {
    let server = TestServer::start(server_cfg());
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let sha = server.seed(
        RepoType::Dataset,
        "org/ds",
        &[("data/train-00000-of-00001.parquet", b"PAR1train\0PAR1"), ("README.md", b"# ds")],
    );
    let online = client(&server, &cache, None);
    let snap = online.snapshot_download("org/ds", RepoType::Dataset, None, &[]).unwrap();

    let mut cfg = online.config().clone();
    cfg.offline = true;
    let offline = HubClient::new(cfg);
    let n = server.requests().len();
    assert_eq!(offline.snapshot_download("org/ds", RepoType::Dataset, None, &[]).unwrap(), snap);
    assert_eq!(offline.snapshot_download("org/ds", RepoType::Dataset, Some(&sha), &[]).unwrap(), snap);
    assert_eq!(
        offline.dataset_split_files("org/ds", None, "train").unwrap(),
        vec!["data/train-00000-of-00001.parquet"]
    );
    assert_eq!(offline.download_file("org/ds", RepoType::Dataset, None, "README.md").unwrap(), snap.join("README.md"));
    assert_eq!(offline.resolve_dataset_path("org/ds", "train").unwrap(), snap);
    assert_eq!(server.requests().len(), n, "offline mode made requests");

    for err in [
        offline.snapshot_download("org/ds", RepoType::Dataset, Some("v2"), &[]).unwrap_err(),
        offline.snapshot_download("org/other", RepoType::Model, None, &[]).unwrap_err(),
        offline.download_file("org/ds", RepoType::Dataset, None, "missing.txt").unwrap_err(),
        offline.push_folder(tmp.path(), "org/ds", &PushOptions::default()).unwrap_err(),
    ] {
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    }
    assert_eq!(server.requests().len(), n);
}

#[test]
fn auth_and_not_found_errors_say_what_to_do() {
    let server = TestServer::start(server_cfg());
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_folder(&src, &[("a.txt", b"a".to_vec())]);

    for token in [None, Some("hf_wrong".to_string())] {
        let hub = client(&server, &tmp.path().join("cache"), token);
        let err = hub.push_folder(&src, "me/x", &PushOptions::default()).unwrap_err();
        assert!(matches!(err, HubError::Auth { status: 401, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("HF_TOKEN") && msg.contains("huggingface-cli login") && msg.contains("write access"),
            "{msg}"
        );
    }

    let owner = client(&server, &tmp.path().join("cache"), Some(server.token()));
    owner.push_folder(&src, "me/private", &PushOptions { private: true, ..Default::default() }).unwrap();
    let anon = client(&server, &tmp.path().join("cache2"), None);
    let err = anon.snapshot_download("me/private", RepoType::Model, None, &[]).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("me/private") && err.to_string().contains("HF_TOKEN"), "{err}");

    let err = owner.snapshot_download("me/nope", RepoType::Model, None, &[]).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }) && err.to_string().contains("\"me/nope\""), "{err}");
    let err = owner.snapshot_download("me/private", RepoType::Model, Some("v9"), &[]).unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }) && err.to_string().contains("\"v9\""), "{err}");
    let err = owner.download_file("me/private", RepoType::Model, None, "nope.bin").unwrap_err();
    assert!(matches!(err, HubError::EntryNotFound { .. }) && err.to_string().contains("nope.bin"), "{err}");
    let err = owner.push_folder(&src, "not a repo id", &PushOptions::default()).unwrap_err();
    assert!(matches!(err, HubError::Invalid(_)), "{err:?}");
    assert_eq!(server.violations(), Vec::<String>::new());
}

#[test]
fn retries_5xx_and_connection_errors() {
    let server = TestServer::start(TestServerConfig { fail_first: 3, ..server_cfg() });
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_folder(&src, &[("model.safetensors", safetensors_like(70_000, 9)), ("config.json", b"{}".to_vec())]);
    let hub = client(&server, &tmp.path().join("cache"), Some(server.token()));
    hub.push_folder(&src, "me/flaky", &PushOptions::default()).unwrap();
    assert_eq!(server.requests().iter().filter(|r| r.status == 503).count(), 3);

    // Failures in the middle of a multipart upload (a part, the completion, the commit) and
    // of a download (the HEAD, the blob GET).
    std::fs::write(src.join("model.safetensors"), safetensors_like(90_000, 10)).unwrap();
    server.fail_next_matching("PUT", "/lfs-part/", 2);
    server.fail_next_matching("POST", "/lfs-complete/", 1);
    server.fail_next_matching("POST", "/api/models/me/flaky/commit/", 1);
    let info = hub.push_folder(&src, "me/flaky", &PushOptions::default()).unwrap();
    assert_eq!(server.requests().iter().filter(|r| r.status == 503).count(), 3 + 4);
    assert_eq!(server.requests().iter().filter(|r| r.path.starts_with("/lfs-part/") && r.status == 200).count(), 5 + 6);
    server.fail_next_matching("HEAD", "/me/flaky/resolve/", 1);
    server.fail_next_matching("GET", "/lfs-cdn/", 2);
    let snap = hub.snapshot_download("me/flaky", RepoType::Model, None, &[]).unwrap();
    assert!(snap.ends_with(&info.commit_oid));
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), safetensors_like(90_000, 10));

    // Bounded: a Hub that keeps failing gives up after max_tries with the status.
    let mut cfg = hub.config().clone();
    cfg.max_tries = 3;
    let impatient = HubClient::new(cfg);
    server.fail_next(1000);
    let n = server.requests().len();
    let err = impatient.repo_info("me/flaky", RepoType::Model, "main").unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    assert_eq!(server.requests().len() - n, 3);
    server.fail_next(0);
    assert_eq!(server.violations(), Vec::<String>::new());

    // Nothing listening: connection errors are retried, then reported.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cfg = hub.config().clone();
    cfg.endpoint = format!("http://127.0.0.1:{port}");
    cfg.max_tries = 2;
    let err = HubClient::new(cfg).repo_info("me/flaky", RepoType::Model, "main").unwrap_err();
    assert!(matches!(err, HubError::Transport { .. }) && err.to_string().contains("HF_ENDPOINT"), "{err}");
}

#[test]
fn dataset_split_discovery_pulls_only_that_split() {
    let server = TestServer::start(server_cfg());
    let tmp = tempfile::tempdir().unwrap();
    let shard = |i: u64| {
        let mut b = b"PAR1".to_vec();
        b.extend(bytes(2000, i));
        b.extend_from_slice(b"PAR1");
        b
    };
    let (t0, t1, e0) = (shard(1), shard(2), shard(3));
    server.seed(
        RepoType::Dataset,
        "HuggingFaceH4/tiny-vsft",
        &[
            ("data/train-00000-of-00002.parquet", &t0),
            ("data/train-00001-of-00002.parquet", &t1),
            ("data/test-00000-of-00001.parquet", &e0),
            ("README.md", b"---\ndataset_info: {}\n---\n"),
        ],
    );
    let hub = client(&server, &tmp.path().join("cache"), None);
    let splits = hub.dataset_splits("HuggingFaceH4/tiny-vsft", None).unwrap();
    let expect: BTreeMap<String, Vec<String>> = [
        ("test".to_string(), vec!["data/test-00000-of-00001.parquet".to_string()]),
        (
            "train".to_string(),
            vec!["data/train-00000-of-00002.parquet".to_string(), "data/train-00001-of-00002.parquet".to_string()],
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(splits, expect);
    assert_eq!(hub.dataset_split_files("HuggingFaceH4/tiny-vsft", None, "train").unwrap(), expect["train"]);

    let (snap, paths) = hub.download_dataset_split("HuggingFaceH4/tiny-vsft", None, "train").unwrap();
    assert_eq!(
        paths,
        vec![snap.join("data/train-00000-of-00002.parquet"), snap.join("data/train-00001-of-00002.parquet")]
    );
    assert_eq!(std::fs::read(&paths[0]).unwrap(), t0);
    assert_eq!(std::fs::read(&paths[1]).unwrap(), t1);
    assert!(!snap.join("data/test-00000-of-00001.parquet").exists());
    assert!(!snap.join("README.md").exists());
    assert_eq!(hub.resolve_dataset_path("HuggingFaceH4/tiny-vsft", "test").unwrap(), snap);
    assert_eq!(std::fs::read(snap.join("data/test-00000-of-00001.parquet")).unwrap(), e0);

    // Shards without split names are all `train` (as vsft-data reads a local directory).
    server.seed(RepoType::Dataset, "org/unsplit", &[("data/part-0.parquet", &t0), ("data/part-1.parquet", &t1)]);
    assert_eq!(
        hub.dataset_split_files("org/unsplit", None, "train").unwrap(),
        vec!["data/part-0.parquet", "data/part-1.parquet"]
    );
    assert!(hub.dataset_split_files("org/unsplit", None, "test").is_err());

    let err = hub.dataset_split_files("HuggingFaceH4/tiny-vsft", None, "validation").unwrap_err();
    assert!(err.to_string().contains("test, train"), "{err}");
    assert_eq!(server.violations(), Vec::<String>::new());
}

#[test]
fn resolve_paths_local_or_hub() {
    let server = TestServer::start(server_cfg());
    let tmp = tempfile::tempdir().unwrap();
    let hub = client(&server, &tmp.path().join("cache"), None);
    // A local path wins, even when it looks like a Hub id.
    let local = tmp.path().join("llava-hf/llava-1.5-7b-hf");
    std::fs::create_dir_all(&local).unwrap();
    assert_eq!(hub.resolve_model_path(local.to_str().unwrap()).unwrap(), local);

    let w = bytes(4000, 5);
    server.seed(
        RepoType::Model,
        "llava-hf/llava-tiny",
        &[("config.json", b"{}"), ("model.safetensors", &w), ("pytorch_model.bin", &w)],
    );
    let dir = hub.resolve_model_path("llava-hf/llava-tiny").unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), w);
    assert!(dir.join("config.json").is_file());
    assert!(!dir.join("pytorch_model.bin").exists(), "other weight formats are skipped");
    let sha = server.head(RepoType::Model, "llava-hf/llava-tiny", "main").unwrap();
    assert_eq!(hub.resolve_model_path(&format!("llava-hf/llava-tiny@{sha}")).unwrap(), dir);

    let err = hub.resolve_model_path("checkpoints/run1").unwrap_err();
    assert!(err.to_string().contains("neither an existing local path nor a Hub repo"), "{err}");
    let err = hub.resolve_model_path("./no/such/dir").unwrap_err();
    assert!(err.to_string().contains("not a Hub id"), "{err}");
    assert_eq!(server.violations(), Vec::<String>::new());
}

/// The server's checks catch what a broken client would send.
#[test]
fn test_server_flags_protocol_violations() {
    let server = TestServer::start(server_cfg());
    let base = server.endpoint();
    let auth = format!("Bearer {}", server.token());
    let post = |path: &str, ctype: &str, body: &str, with_auth: bool| {
        let mut r = ureq::post(&format!("{base}{path}")).set("content-type", ctype);
        if with_auth {
            r = r.set("authorization", &auth);
        }
        match r.send_string(body) {
            Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    };
    let lfs = "application/vnd.git-lfs+json";
    assert_eq!(post("/api/repos/create", "application/json", r#"{"name":"x","organization":"me"}"#, true).0, 200);
    // Preupload: sample must be the first min(512, size) bytes.
    let (st, _) = post(
        "/api/models/me/x/preupload/main",
        "application/json",
        r#"{"files":[{"path":"a.bin","sample":"AAEC","size":10}]}"#,
        true,
    );
    assert_eq!(st, 400);
    // Commit: the header line must come first; unknown LFS objects are refused.
    let (st, _) = post(
        "/api/models/me/x/commit/main",
        "application/x-ndjson",
        "{\"key\":\"file\",\"value\":{\"path\":\"a\",\"content\":\"YQ==\",\"encoding\":\"base64\"}}\n",
        true,
    );
    assert_eq!(st, 400);
    let oid = "a".repeat(64);
    let body = format!(
        "{{\"key\":\"header\",\"value\":{{\"summary\":\"s\"}}}}\n{{\"key\":\"lfsFile\",\"value\":{{\"path\":\"m\",\"algo\":\"sha256\",\"oid\":\"{oid}\",\"size\":3}}}}\n"
    );
    assert_eq!(post("/api/models/me/x/commit/main", "application/x-ndjson", &body, true).0, 400);
    // Multipart: announce 100_000 bytes (7 parts), complete with 2 parts listed.
    let batch = format!(
        r#"{{"operation":"upload","transfers":["basic","multipart"],"objects":[{{"oid":"{oid}","size":100000}}],"hash_algo":"sha256","ref":{{"name":"main"}}}}"#
    );
    let r = ureq::post(&format!("{base}/me/x.git/info/lfs/objects/batch"))
        .set("accept", lfs)
        .set("content-type", lfs)
        .set("authorization", &auth)
        .send_string(&batch)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    let header = &v["objects"][0]["actions"]["upload"]["header"];
    assert_eq!(header["chunk_size"], "16384");
    assert_eq!(header.as_object().unwrap().len(), 1 + 7);
    let complete =
        format!(r#"{{"oid":"{oid}","parts":[{{"partNumber":1,"etag":"x"}},{{"partNumber":2,"etag":"y"}}]}}"#);
    assert_eq!(post(&format!("/lfs-complete/{oid}"), lfs, &complete, false).0, 400);
    // Presigned upload URLs must not get the token.
    assert_eq!(post(&format!("/lfs-complete/{oid}"), lfs, &complete, true).0, 400);
    // Writes need the token.
    assert_eq!(post("/api/repos/create", "application/json", r#"{"name":"y","organization":"me"}"#, false).0, 401);
    let v = server.violations();
    assert_eq!(v.len(), 5, "{v:#?}");
    assert!(v[3].contains("expected ceil(100000/16384) = 7"), "{}", v[3]);
}

/// A real HF checkpoint from the repo's fixtures (sharded safetensors + index + config) goes
/// up (multipart for the large shard) and comes back byte for byte through `resolve_model_path`.
#[test]
fn real_checkpoint_fixture_round_trip() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model/tiny-llava-gqa/sharded");
    if !fixture.join("model.safetensors.index.json").exists() {
        eprintln!("skipping: {fixture:?} not present");
        return;
    }
    let server =
        TestServer::start(TestServerConfig { multipart_threshold: 100_000, chunk_size: 64 * 1024, ..server_cfg() });
    let tmp = tempfile::tempdir().unwrap();
    let hub = client(&server, &tmp.path().join("cache"), Some(server.token()));
    let info = hub.push_folder(&fixture, "vsft-test/tiny-llava", &PushOptions::default()).unwrap();
    assert!(info.lfs_files.iter().all(|f| f.ends_with(".safetensors")) && info.lfs_files.len() == 2, "{info:?}");
    assert!(count(&server, "PUT", "/lfs-part/") >= 2);
    let snap = hub.resolve_model_path("vsft-test/tiny-llava").unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(&fixture).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        assert_eq!(std::fs::read(snap.join(name)).unwrap(), std::fs::read(&p).unwrap(), "{name:?}");
        n += 1;
    }
    assert_eq!(n, 4);
    assert_eq!(server.violations(), Vec::<String>::new());
}
