//! Datasets, chat templates and tokenizers: broken parquet files, LLaVA-JSON records of every
//! wrong shape, hostile templates (runaway loops, string doubling, recursion) and broken
//! tokenizer files, read by `vsft data inspect`.

use std::path::{Path, PathBuf};

use crate::common::root;
use crate::{args, endless, linked_copy, replace, scratch, Case, Rng};

const PARQUET_MUTATIONS: usize = 40;
const JSON_MUTATIONS: usize = 40;

fn llava_processor() -> PathBuf {
    root().join("tests/fixtures/data/model")
}

fn inspect(data: &Path, model: &Path) -> Vec<std::ffi::OsString> {
    args!["data", "inspect", "--model", model, "--data", data]
}

fn parquet_cases(dir: &Path, rng: &mut Rng) -> Vec<Case> {
    let mut cases = Vec::new();
    let base = std::fs::read(root().join("tests/fixtures/data/llava_instruct_mix/data/test-00000-of-00001.parquet")).unwrap();
    let n = base.len();
    let mut write = |name: String, bytes: Vec<u8>, may_succeed: bool| {
        let p = dir.join(format!("p{}.parquet", cases.len()));
        std::fs::write(&p, bytes).unwrap();
        let c = Case::new("dataset", name, inspect(&p, &llava_processor()), p.file_name().unwrap().to_string_lossy());
        cases.push(if may_succeed { c.may_succeed() } else { c });
    };
    for _ in 0..PARQUET_MUTATIONS {
        let mut b = base.clone();
        match rng.below(4) {
            0 => {
                let at = rng.below(n);
                b.truncate(at);
                write(format!("parquet truncated at {at}"), b, false);
            }
            1 => {
                // The footer: metadata length, then "PAR1".
                let len = *rng.pick(&[u32::MAX, (n as u32) * 2, n as u32 - 8, 0, 1]);
                b[n - 8..n - 4].copy_from_slice(&len.to_le_bytes());
                write(format!("parquet footer length {len}"), b, false);
            }
            2 => {
                let meta_len = u32::from_le_bytes(b[n - 8..n - 4].try_into().unwrap()) as usize;
                let start = n - 8 - meta_len;
                for _ in 0..1 + rng.below(4) {
                    let i = start + rng.below(meta_len);
                    b[i] = rng.next() as u8;
                }
                write(format!("parquet metadata bytes randomised ({meta_len} bytes)"), b, true);
            }
            _ => {
                for _ in 0..1 + rng.below(16) {
                    let i = 4 + rng.below(n - 12);
                    b[i] ^= 1 << rng.below(8);
                }
                write("parquet page bit flips".into(), b, true);
            }
        }
    }
    let mut bad: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures/data/bad")).unwrap().map(|e| e.unwrap().path()).collect();
    bad.sort();
    for p in bad.iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        cases.push(Case::new("dataset", format!("fixture {name}"), inspect(p, &llava_processor()), name));
    }
    cases
}

/// LLaVA-JSON documents that must be refused, each with a real image beside it.
fn json_cases(dir: &Path, rng: &mut Rng) -> Vec<Case> {
    let turn = |from: serde_json::Value, value: serde_json::Value| serde_json::json!({"from": from, "value": value});
    let ok_turns = serde_json::json!([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let docs: Vec<(&str, String)> = vec![
        ("an object, not a list", serde_json::json!({"image": "img.jpg"}).to_string()),
        ("a list of numbers", "[1, 2, 3]".into()),
        ("conversations a number", serde_json::json!([{"image": "img.jpg", "conversations": 5}]).to_string()),
        ("conversations missing", serde_json::json!([{"image": "img.jpg"}]).to_string()),
        ("conversations empty", serde_json::json!([{"image": "img.jpg", "conversations": []}]).to_string()),
        ("from a number", serde_json::json!([{"image": "img.jpg", "conversations": [turn(3.into(), "<image>\nhi".into()), turn("gpt".into(), "x".into())]}]).to_string()),
        ("value null", serde_json::json!([{"image": "img.jpg", "conversations": [turn("human".into(), serde_json::Value::Null), turn("gpt".into(), "x".into())]}]).to_string()),
        ("unknown role", serde_json::json!([{"image": "img.jpg", "conversations": [turn("alien".into(), "<image>\nhi".into()), turn("gpt".into(), "x".into())]}]).to_string()),
        ("image a number", serde_json::json!([{"image": 7, "conversations": ok_turns}]).to_string()),
        ("two placeholders, one image", serde_json::json!([{"image": "img.jpg", "conversations": [turn("human".into(), "<image><image>\nhi".into()), turn("gpt".into(), "x".into())]}]).to_string()),
        ("placeholder without image", serde_json::json!([{"conversations": ok_turns}]).to_string()),
        ("image file missing", serde_json::json!([{"image": "nowhere.jpg", "conversations": ok_turns}]).to_string()),
        ("image path a directory", serde_json::json!([{"image": ".", "conversations": ok_turns}]).to_string()),
        ("nesting 100000 deep", deep),
        ("truncated", "[{\"image\": \"img.jpg\", \"conversations\": [".into()),
        ("not JSON", "\u{0}\u{1}garbage\u{ff}".into()),
        ("empty file", String::new()),
        ("an empty key", serde_json::json!([{"": "x", "image": "img.jpg", "conversations": 5}]).to_string()),
    ];
    let img = std::fs::read(root().join("tests/fixtures/data/images/chelsea.jpg")).unwrap();
    let mut cases = Vec::new();
    for (k, (what, text)) in docs.into_iter().enumerate() {
        let d = dir.join(format!("j{k}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("img.jpg"), &img).unwrap();
        let p = d.join("data.json");
        std::fs::write(&p, text).unwrap();
        cases.push(Case::new("dataset", format!("LLaVA JSON: {what}"), inspect(&p, &llava_processor()), "data.json"));
    }
    // JSONL with one bad line among good ones.
    let d = dir.join("jsonl");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("img.jpg"), &img).unwrap();
    let good = serde_json::json!({"image": "img.jpg", "conversations": ok_turns}).to_string();
    std::fs::write(d.join("data.jsonl"), format!("{good}\n{good}\n{{\"image\": \"img.jpg\", \"conv\n{good}\n")).unwrap();
    cases.push(Case::new("dataset", "JSONL: a broken line", inspect(&d.join("data.jsonl"), &llava_processor()), "data.jsonl"));

    // Random byte mutations of a real LLaVA JSON file.
    let base = std::fs::read(root().join("tests/fixtures/data/llava.json")).unwrap();
    for k in 0..JSON_MUTATIONS {
        let d = dir.join(format!("jm{k}"));
        linked_copy(&root().join("tests/fixtures/data/images"), &d);
        let mut b = base.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            b[i] = *rng.pick(b"{}[]\",:0\\\n x\xff");
        }
        let p = d.join("data.json");
        std::fs::write(&p, b).unwrap();
        cases.push(Case::new("dataset", format!("LLaVA JSON byte mutation {k}"), inspect(&p, &llava_processor()), "data.json").may_succeed());
    }
    // The dataset path itself unreadable or endless.
    cases.push(Case::new("dataset", "data is /dev/zero", inspect(Path::new("/dev/zero"), &llava_processor()), "/dev/zero"));
    let z = dir.join("zero.json");
    endless(&z);
    cases.push(Case::new("dataset", "JSON data linked to /dev/zero", inspect(&z, &llava_processor()), "zero.json"));
    cases
}

/// Hostile chat templates given with `--chat-template`.
fn template_cases(dir: &Path) -> Vec<Case> {
    let data = root().join("tests/fixtures/data/llava_instruct_mix");
    let templates: Vec<(&str, &str)> = vec![
        ("runaway loop", "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}"),
        ("string doubling by recursion", "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s }}{% endif %}{% endmacro %}{{ d('xxxxxxxx', 40) }}"),
        ("string doubling in a namespace", "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"),
        ("endless recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        ("huge output", "{% for i in range(100000) %}{% for m in messages %}{{ m | tojson }}{% for j in range(1000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}{% endfor %}"),
        ("syntax error", "{% for m in messages %}{{ m.content }"),
        ("raise_exception", "{{ raise_exception('no system role allowed') }}"),
        ("unknown filter", "{{ messages | explode }}"),
    ];
    let mut cases = Vec::new();
    for (k, (what, text)) in templates.into_iter().enumerate() {
        let p = dir.join(format!("t{k}.jinja"));
        std::fs::write(&p, text).unwrap();
        cases.push(Case::new("template", format!("template: {what}"), args!["data", "inspect", "--model", llava_processor(), "--data", &data, "--chat-template", &p], p.file_name().unwrap().to_string_lossy()));
    }
    // An empty template renders no image placeholder: the row is refused (naming the data file).
    let p = dir.join("empty.jinja");
    std::fs::write(&p, "").unwrap();
    cases.push(Case::new("template", "template: empty", args!["data", "inspect", "--model", llava_processor(), "--data", &data, "--chat-template", &p], "llava_instruct_mix").naming("<image>"));
    let z = dir.join("zero.jinja");
    endless(&z);
    cases.push(Case::new("template", "template: /dev/zero", args!["data", "inspect", "--model", llava_processor(), "--data", &data, "--chat-template", &z], "zero.jinja"));
    cases
}

/// The processor directory with one of its tokenizer or template files broken.
fn tokenizer_cases(dir: &Path) -> Vec<Case> {
    let data = root().join("tests/fixtures/data/llava_instruct_mix");
    let tok = std::fs::read(llava_processor().join("tokenizer.json")).unwrap();
    let broken: Vec<(&str, &str, Option<Vec<u8>>)> = vec![
        ("tokenizer.json", "truncated", Some(tok[..tok.len() / 2].to_vec())),
        ("tokenizer.json", "not JSON", Some(b"\x00garbage".to_vec())),
        ("tokenizer.json", "a list", Some(b"[]".to_vec())),
        ("tokenizer.json", "an empty object", Some(b"{}".to_vec())),
        ("tokenizer.json", "an unknown model type", Some(br#"{"version":"1.0","model":{"type":"Alien"}}"#.to_vec())),
        ("tokenizer.json", "/dev/zero", None),
        ("tokenizer_config.json", "not JSON", Some(b"{\"chat_template\": ".to_vec())),
        ("tokenizer_config.json", "a number", Some(b"5".to_vec())),
        ("tokenizer_config.json", "/dev/zero", None),
        ("chat_template.jinja", "/dev/zero", None),
        ("chat_template.jinja", "a runaway loop", Some(b"{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}".to_vec())),
        ("processor_config.json", "/dev/zero", None),
    ];
    let mut cases = Vec::new();
    for (k, (file, what, bytes)) in broken.into_iter().enumerate() {
        let d = linked_copy(&llava_processor(), &dir.join(format!("tok{k}")));
        match bytes {
            Some(b) => replace(&d.join(file), b),
            None => endless(&d.join(file)),
        }
        cases.push(Case::new("tokenizer", format!("{file}: {what}"), inspect(&data, &d), file));
    }
    cases
}

pub fn cases() -> Vec<Case> {
    let dir = scratch("data");
    let mut rng = Rng::new(1313);
    let mut cases = parquet_cases(&dir, &mut rng);
    cases.extend(json_cases(&dir, &mut rng));
    cases.extend(template_cases(&dir));
    cases.extend(tokenizer_cases(&dir));
    cases
}
