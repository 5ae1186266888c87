//! The robustness suite: a seeded generator of malformed inputs of every class that issue 13
//! names (images and decompression bombs, dataset structure, templates and tokenizers, model
//! directories, recipes, checkpoints), each run through the `vsft` binary as a user would,
//! under an 8 GiB address-space limit and a 20 s timeout. For every case: no panic, no hang,
//! no abort for memory, and either success (only where a random mutation may leave the input
//! valid) or exit 1 with a message that names the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
mod common;
mod checkpoints;
mod data;
mod images;
mod model_dir;
mod recipes;

/// What a runaway allocation hits: the limit (a 7B model's real needs are not tested here).
const ADDRESS_SPACE_LIMIT: u64 = 8 << 30;
const TIMEOUT: Duration = Duration::from_secs(20);

/// One malformed input and the command that reads it.
pub struct Case {
    pub class: &'static str,
    pub name: String,
    pub args: Vec<OsString>,
    /// What the error must name: the file (a path or a file name), and the key or field where there is one.
    pub must_name: Vec<String>,
    /// A random mutation may leave the input valid; a targeted one must be refused.
    pub may_succeed: bool,
}

impl Case {
    pub fn new(class: &'static str, name: impl Into<String>, args: Vec<OsString>, must_name: impl Into<String>) -> Self {
        Case { class, name: name.into(), args, must_name: vec![must_name.into()], may_succeed: false }
    }

    /// The error must also name `what` (a key, a field, a tensor).
    pub fn naming(mut self, what: impl Into<String>) -> Self {
        self.must_name.push(what.into());
        self
    }

    pub fn may_succeed(mut self) -> Self {
        self.may_succeed = true;
        self
    }
}

/// Turns `["data", path, ...]` pieces into a command line.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(std::ffi::OsString::from($a)),*] };
}

/// splitmix64: the suite's cases are the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A fresh directory for one class's cases.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("robustness").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of `base` in which every file is a link to the original except those written after.
pub fn linked_copy(base: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(base).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::os::unix::fs::symlink(std::fs::canonicalize(e.path()).unwrap(), dir.join(e.file_name())).unwrap();
        }
    }
    dir.to_path_buf()
}

/// Replaces a (linked) file of a case directory.
pub fn replace(path: &Path, bytes: impl AsRef<[u8]>) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).unwrap();
}

/// Makes `path` a link to /dev/zero: a read that never ends unless it is bounded.
pub fn endless(path: &Path) {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink("/dev/zero", path).unwrap();
}

enum Outcome {
    Success,
    Refused(String),
    Failed(String),
}

fn run_case(case: &Case) -> Outcome {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vsft"));
    cmd.args(&case.args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // Keeps the children from sharing the two cores with each other's thread pools.
    cmd.env("RAYON_NUM_THREADS", "1");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: ADDRESS_SPACE_LIMIT, rlim_max: ADDRESS_SPACE_LIMIT };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn vsft");
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = stderr.take(1 << 20).read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = reader.join().unwrap();
    let tail = |s: &str| s.chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect::<String>();
    match status {
        None => Outcome::Failed(format!("hung (killed after {TIMEOUT:?}): {}", tail(&err))),
        Some(st) if st.signal().is_some() => Outcome::Failed(format!("killed by signal {} (memory?): {}", st.signal().unwrap(), tail(&err))),
        Some(_) if err.contains("panicked") => Outcome::Failed(format!("panicked: {}", tail(&err))),
        Some(st) if st.code() == Some(0) => {
            if case.may_succeed {
                Outcome::Success
            } else {
                Outcome::Failed("accepted input that must be refused".into())
            }
        }
        Some(st) if st.code() == Some(1) => {
            if let Some(missing) = case.must_name.iter().find(|n| !err.contains(n.as_str())) {
                Outcome::Failed(format!("error does not name {missing:?}: {}", tail(&err)))
            } else if err.lines().any(|l| l.len() > 2000) {
                Outcome::Failed(format!("a line of the message is over 2000 characters: {}", tail(&err)))
            } else {
                Outcome::Refused(err)
            }
        }
        Some(st) => Outcome::Failed(format!("exit {:?}: {}", st.code(), tail(&err))),
    }
}

#[test]
fn no_malformed_input_panics_hangs_or_runs_away() {
    let started = Instant::now();
    let mut cases = Vec::new();
    cases.extend(images::cases());
    cases.extend(data::cases());
    cases.extend(model_dir::cases());
    cases.extend(recipes::cases());
    cases.extend(checkpoints::cases());
    // `ROBUSTNESS_CLASS=images` runs one class while working on it.
    if let Ok(only) = std::env::var("ROBUSTNESS_CLASS") {
        cases.retain(|c| c.class == only);
    }
    println!("{} cases generated in {:.1} s", cases.len(), started.elapsed().as_secs_f64());

    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Outcome, Duration)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = cases.get(i) else { break };
                let t = Instant::now();
                let outcome = run_case(case);
                results.lock().unwrap().push((i, outcome, t.elapsed()));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(_, _, t)| std::cmp::Reverse(*t));
    for (i, _, t) in results.iter().take(5) {
        println!("slowest: {:.1} s [{}] {}", t.as_secs_f64(), cases[*i].class, cases[*i].name);
    }
    results.sort_by_key(|(i, _, _)| *i);

    // class → (cases, refused, accepted, failed)
    let mut table: std::collections::BTreeMap<&str, [usize; 4]> = Default::default();
    let mut failures = Vec::new();
    let mut samples: std::collections::BTreeMap<&str, String> = Default::default();
    for (i, outcome, _) in &results {
        let case = &cases[*i];
        let row = table.entry(case.class).or_default();
        row[0] += 1;
        match outcome {
            Outcome::Refused(msg) => {
                row[1] += 1;
                samples.entry(case.class).or_insert_with(|| msg.trim().lines().last().unwrap_or("").to_string());
            }
            Outcome::Success => row[2] += 1,
            Outcome::Failed(why) => {
                row[3] += 1;
                failures.push(format!("[{}] {}: {why}", case.class, case.name));
            }
        }
    }
    println!("{:<12} {:>6} {:>8} {:>9} {:>7}", "class", "cases", "refused", "accepted", "failed");
    for (class, [n, refused, accepted, failed]) in &table {
        println!("{class:<12} {n:>6} {refused:>8} {accepted:>9} {failed:>7}");
    }
    for (class, msg) in &samples {
        println!("  e.g. {class}: {msg}");
    }
    println!("{} cases in {:.1} s", cases.len(), started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// The paths (object keys; array indices as numbers) of every number in a JSON document.
pub fn number_paths(v: &serde_json::Value) -> Vec<Vec<String>> {
    fn walk(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            serde_json::Value::Number(_) => out.push(path.clone()),
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    path.push(k.clone());
                    walk(x, path, out);
                    path.pop();
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    path.push(i.to_string());
                    walk(x, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// `v` with the value at `path` replaced.
pub fn with_value(v: &serde_json::Value, path: &[String], new: serde_json::Value) -> serde_json::Value {
    let mut out = v.clone();
    let mut cur = &mut out;
    for p in path {
        cur = match cur {
            serde_json::Value::Array(a) => &mut a[p.parse::<usize>().unwrap()],
            other => &mut other[p.as_str()],
        };
    }
    *cur = new;
    out
}

/// A tiny LLaVA made once by `vsft init` (random weights, the fixture tokenizer and processor).
pub fn tiny_llava() -> PathBuf {
    static MODEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = scratch("tiny-llava").join("model");
            common::run(
                common::vsft()
                    .args(["init", "--config"])
                    .arg(common::root().join("configs/tiny-llava-e2e.json"))
                    .arg("--tokenizer-from")
                    .arg(common::root().join("tests/fixtures/data/model"))
                    .arg("--out")
                    .arg(&dir),
            );
            dir
        })
        .clone()
}
