//! Recipes: every key with values it cannot take (NaN, infinities, zero, negative, absurd sizes,
//! wrong types), unknown keys with typos, TOML syntax errors (one on a megabyte-long line),
//! `--set` overrides, an output directory that is a file, and recipe files that never end.
//! Each is `vsft train --config`; a recipe that is accepted trains one step of a tiny model.

use std::path::{Path, PathBuf};

use crate::common::root;
use crate::{args, endless, scratch, tiny_llava, Case, Rng};

const RANDOM_VALUES: usize = 24;

/// The recipe: `section.key = value` lines, in order.
pub fn base_recipe(output_dir: &Path, max_steps: usize) -> Vec<(String, String, String)> {
    let s = |a: &str, b: &str, c: String| (a.to_string(), b.to_string(), c);
    vec![
        s("model", "path", format!("{:?}", tiny_llava().to_str().unwrap())),
        s("data", "train", format!("{:?}", root().join("tests/fixtures/data/llava_instruct_mix").to_str().unwrap())),
        s("data", "max_length", "512".into()),
        s("data", "num_workers", "1".into()),
        s("train", "stage", "\"instruct\"".into()),
        s("train", "output_dir", format!("{:?}", output_dir.to_str().unwrap())),
        s("train", "max_steps", max_steps.to_string()),
        s("train", "batch_size", "1".into()),
        s("train", "lr", "1e-3".into()),
        s("train", "log_steps", "1".into()),
        s("train", "save_steps", "1".into()),
        s("lora", "r", "4".into()),
        s("lora", "alpha", "8".into()),
    ]
}

/// The TOML text of `lines` with `key` in `section` set to `value` (added when absent).
pub fn render(lines: &[(String, String, String)], section: &str, key: &str, value: &str) -> String {
    let mut lines = lines.to_vec();
    match lines.iter_mut().find(|(s, k, _)| s == section && k == key) {
        Some(l) => l.2 = value.to_string(),
        None => lines.push((section.into(), key.into(), value.into())),
    }
    let mut out = String::new();
    for sec in ["model", "data", "train", "lora"] {
        out.push_str(&format!("[{sec}]\n"));
        for (_, k, v) in lines.iter().filter(|(s, _, _)| s == sec) {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out
}

fn train(recipe: &Path) -> Vec<std::ffi::OsString> {
    args!["train", "--config", recipe]
}

pub fn cases() -> Vec<Case> {
    let dir = scratch("recipes");
    let mut cases = Vec::new();
    let write = |name: &str, text: String| -> PathBuf {
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let refused: Vec<(&str, &str, &str)> = vec![
        ("train", "lr", "nan"),
        ("train", "lr", "inf"),
        ("train", "lr", "-inf"),
        ("train", "adam_beta1", "1.0"),
        ("train", "adam_beta1", "1.5"),
        ("train", "adam_beta2", "1.0"),
        ("train", "adam_eps", "0.0"),
        ("train", "adam_eps", "-1e-8"),
        ("train", "adam_eps", "nan"),
        ("train", "weight_decay", "nan"),
        ("train", "weight_decay", "-1.0"),
        ("train", "warmup_ratio", "2.0"),
        ("train", "max_grad_norm", "nan"),
        ("train", "log_steps", "0"),
        ("train", "batch_size", "-1"),
        ("train", "batch_size", "0"),
        ("train", "batch_size", "1000000000"),
        ("train", "grad_accum", "0"),
        ("train", "stage", "\"alien\""),
        ("train", "scheduler", "\"alien\""),
        ("train", "projector_lr", "nan"),
        ("data", "pad_to_multiple_of", "0"),
        ("data", "pad_to_multiple_of", "1000000"),
        ("data", "num_workers", "100000"),
        ("data", "max_length", "0"),
        ("data", "label_mask", "\"alien\""),
        ("data", "on_bad_row", "\"ignore\""),
        ("lora", "r", "1000000000"),
        ("lora", "r", "0"),
        ("lora", "alpha", "nan"),
        ("lora", "dropout", "1.5"),
        ("lora", "dropout", "-0.1"),
        ("train", "batch_size", "\"two\""),
        ("train", "lr", "[1, 2]"),
    ];
    for (k, (section, key, value)) in refused.iter().enumerate() {
        let out = dir.join(format!("out-r{k}"));
        let p = write(&format!("r{k}"), render(&base_recipe(&out, 1), section, key, value));
        cases.push(Case::new("recipe", format!("{section}.{key} = {value}"), train(&p), format!("r{k}.toml")).naming(*key));
        let set = format!("{section}.{key}={value}");
        let p = write(&format!("set{k}"), render(&base_recipe(&dir.join(format!("out-set{k}")), 1), "train", "seed", "1"));
        cases.push(Case::new("recipe", format!("--set {set}"), args!["train", "--config", &p, "--set", &set], key.to_string()));
    }

    let mut rng = Rng::new(1301);
    let keys = [("train", "lr"), ("train", "weight_decay"), ("train", "warmup_ratio"), ("train", "max_grad_norm"), ("train", "epochs"), ("train", "grad_accum"), ("train", "eval_steps"), ("train", "save_total_limit"), ("train", "seed"), ("train", "vision_lr"), ("data", "max_length"), ("data", "min_pixels"), ("data", "max_pixels"), ("lora", "alpha"), ("lora", "r"), ("lora", "dropout")];
    let values = ["nan", "inf", "-1", "0", "1e18", "18446744073709551615", "\"x\"", "[]", "true", "0.5"];
    for k in 0..RANDOM_VALUES {
        let (section, key) = *rng.pick(&keys);
        let value = *rng.pick(&values);
        let out = dir.join(format!("out-rand{k}"));
        let p = write(&format!("rand{k}"), render(&base_recipe(&out, 1), section, key, value));
        cases.push(Case::new("recipe", format!("random: {section}.{key} = {value}"), train(&p), format!("rand{k}.toml")).may_succeed());
    }

    let base = |name: &str| render(&base_recipe(&dir.join(format!("out-{name}")), 1), "train", "seed", "1");
    let p = write("typo", base("typo").replace("batch_size", "batch_sise"));
    cases.push(Case::new("recipe", "unknown key batch_sise", train(&p), "typo.toml").naming("batch_sise").naming("batch_size"));
    let p = write("typo_section", base("typo_section").replace("[lora]", "[loar]"));
    cases.push(Case::new("recipe", "unknown section loar", train(&p), "typo_section.toml").naming("loar"));
    let p = write("syntax", base("syntax").replace("lr = 1e-3", "lr = = 1e-3"));
    cases.push(Case::new("recipe", "TOML syntax error", train(&p), "syntax.toml").naming("line"));
    let p = write("long_line", format!("{}\nnote = \"{}\n", base("long_line"), "a".repeat(1 << 20)));
    cases.push(Case::new("recipe", "syntax error on a 1 MiB line", train(&p), "long_line.toml").naming("line"));
    let p = write("binary", "\u{0}\u{1}\u{2}[[[".to_string());
    cases.push(Case::new("recipe", "binary garbage", train(&p), "binary.toml"));
    let as_file = dir.join("output-is-a-file");
    std::fs::write(&as_file, "x").unwrap();
    let p = write("out_file", render(&base_recipe(&as_file, 1), "train", "seed", "1"));
    cases.push(Case::new("recipe", "output_dir is a file", train(&p), "output_dir"));
    let p = write("no_model", render(&base_recipe(&dir.join("out-no-model"), 1), "model", "path", "\"/nonexistent/model\""));
    cases.push(Case::new("recipe", "model path missing", train(&p), "/nonexistent/model"));
    let z = dir.join("zero.toml");
    endless(&z);
    cases.push(Case::new("recipe", "recipe is /dev/zero", train(&z), "zero.toml"));
    cases.push(Case::new("recipe", "recipe is a directory", train(&dir), dir.to_string_lossy()));
    cases
}
