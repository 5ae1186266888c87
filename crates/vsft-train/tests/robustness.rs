//! Broken recipes and checkpoints: every one is refused with a message that names the file and
//! the key or field, says what is allowed and what was found, and nothing panics. The bad inputs
//! come from a seeded generator (SplitMix64), so a failure repeats.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use vsft_data::Cursor;
use vsft_model::weights::{write_safetensors, PendingTensor, StoredDtype};
use vsft_model::VlmModel;
use vsft_train::checkpoint::{self, CheckpointContent, ResumeTarget, TrainerState};
use vsft_train::recipe::{Recipe, GENERATE_EVAL_KEYS, KNOWN_KEYS};
use vsft_train::{Stage, Trainer};

mod common;

const FILE: &str = "bad.toml";

const VALID: &str = r#"[model]
path = "m"
[data]
train = "d"
[train]
stage = "instruct"
output_dir = "out"
lr = 1e-3
[lora]
r = 4
[hub]
private = false
[generate_eval]
data = "q"
"#;

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Parses a recipe text (with overrides) as `vsft train` does, catching any panic.
fn parse(text: &str, overrides: &[String]) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| Recipe::parse_stages(text, FILE, overrides))) {
        Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
        Err(_) => panic!("panic on recipe {text:?} with {overrides:?}"),
    }
}

/// Values that no key of the type accepts.
fn bad_values(ty: &str) -> &'static [&'static str] {
    match ty {
        "integer" => &["-1", "1.5", "\"7\"", "true", "[1]", "{ a = 1 }", "-9223372036854775808"],
        "float" => &["nan", "inf", "-inf", "-1.0", "\"1e-3\"", "false", "[0.1]"],
        "string" => &["1", "true", "\"\"", "\"   \"", "[\"a\"]", "2.5"],
        "boolean" => &["1", "\"yes\"", "[true]", "0.0"],
        "list or string" => &["1", "[]", "[1]", "[\"\"]", "\"\"", "true"],
        other => panic!("no bad values for type {other}"),
    }
}

fn every_key() -> Vec<(&'static str, &'static str, &'static str)> {
    let mut keys: Vec<_> = KNOWN_KEYS.iter().flat_map(|(s, ks)| ks.iter().map(move |(k, t)| (*s, *k, *t))).collect();
    keys.extend(GENERATE_EVAL_KEYS.iter().map(|(k, t)| ("generate_eval", *k, *t)));
    keys
}

/// `VALID` with `section.key = value` put into its section (replacing the key if present).
fn with_value(section: &str, key: &str, value: &str) -> String {
    let mut out = String::new();
    let mut current = "";
    for line in VALID.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = if name == section { "here" } else { "" };
            out += line;
            out += "\n";
            if current == "here" {
                out += &format!("{key} = {value}\n");
            }
            continue;
        }
        if current == "here" && line.split('=').next().is_some_and(|k| k.trim() == key) {
            continue;
        }
        out += line;
        out += "\n";
    }
    out
}

/// Every key × every value its type refuses, in the file and through `--set`: an error naming
/// the file and the dotted key, saying what is allowed and what was found.
#[test]
fn every_key_refuses_bad_values_naming_the_file_and_the_key() {
    assert_eq!(parse(VALID, &[]), Ok(()), "the base recipe is valid");
    let mut cases = 0;
    for (section, key, ty) in every_key() {
        for value in bad_values(ty) {
            let dotted = format!("{section}.{key}");
            let in_file = parse(&with_value(section, key, value), &[]).expect_err(&format!("{dotted} = {value} accepted"));
            let by_set = parse(VALID, &[format!("{dotted}={value}")]).expect_err(&format!("--set {dotted}={value} accepted"));
            for err in [&in_file, &by_set] {
                assert!(err.starts_with(FILE), "{dotted} = {value}: the message names the file: {err}");
                assert!(err.contains(&format!("{dotted} must be")), "{dotted} = {value}: the message names the key: {err}");
                assert!(err.contains("found"), "{dotted} = {value}: the message says what was found: {err}");
                assert!(!err.contains("Value(") && !err.contains("Suffixes("), "{dotted} = {value}: Debug text: {err}");
            }
            assert!(by_set.contains("with --set"), "the message says the value came from --set: {by_set}");
            cases += 2;
        }
    }
    println!("{cases} bad key values refused");
}

/// The issue's cases, each refused with the allowed range in the message.
#[test]
fn absurd_values_are_refused_with_the_allowed_range() {
    let cases = [
        ("train.lr", "nan", "a finite float > 0"),
        ("train.lr", "inf", "a finite float > 0"),
        ("train.lr", "-inf", "a finite float > 0"),
        ("train.adam_beta1", "1.0", "a float in [0, 1)"),
        ("train.adam_beta2", "1.5", "a float in [0, 1)"),
        ("train.adam_eps", "0", "a float in (0, 1]"),
        ("train.adam_eps", "nan", "a float in (0, 1]"),
        ("train.weight_decay", "-0.1", "a finite float ≥ 0"),
        ("train.warmup_ratio", "1.5", "a float in [0, 1]"),
        ("train.max_grad_norm", "inf", "a finite float ≥ 0"),
        ("train.log_steps", "0", "an integer in 1..=1000000000"),
        ("train.batch_size", "-1", "an integer in 1..=4096"),
        ("train.batch_size", "100000", "an integer in 1..=4096"),
        ("train.grad_accum", "0", "an integer in 1..=65536"),
        ("train.epochs", "1000000000", "an integer in 0..=100000"),
        ("train.max_steps", "99999999999", "an integer in 0..=1000000000"),
        ("train.seed", "-3", "an integer ≥ 0"),
        ("train.scheduler", "\"cosin\"", "\"constant\", \"linear\" or \"cosine\""),
        ("train.stage", "\"finetune\"", "\"pretrain\" or \"instruct\""),
        ("train.output_dir", "\"\"", "a non-empty string"),
        ("data.num_workers", "100000", "an integer in 0..=256"),
        ("data.pad_to_multiple_of", "0", "an integer in 1..=4096"),
        ("data.pad_to_multiple_of", "1000000", "an integer in 1..=4096"),
        ("data.max_length", "0", "an integer in 1..=1048576"),
        ("data.label_mask", "\"all\"", "\"pad\", \"pad+image\" or \"assistant\""),
        ("lora.r", "0", "an integer in 1..=4096"),
        ("lora.r", "5000", "an integer in 1..=4096"),
        ("lora.alpha", "nan", "a finite float > 0"),
        ("lora.dropout", "1.0", "a float in [0, 1)"),
        ("lora.target_modules", "[]", "a non-empty list of module-name suffixes (e.g. [\"q_proj\", \"v_proj\"]) or a regex string"),
        ("generate_eval.max_new_tokens", "0", "an integer in 1..=65536"),
    ];
    for (key, value, allowed) in cases {
        let err = parse(VALID, &[format!("{key}={value}")]).expect_err(&format!("{key}={value} accepted"));
        assert!(err.contains(&format!("{key} must be {allowed}, found ")), "{key}={value}: {err}");
    }
    // A negative integer is not "a integer, found integer".
    let err = parse(&with_value("train", "batch_size", "-1"), &[]).unwrap_err();
    assert_eq!(err, "bad.toml: train.batch_size must be an integer in 1..=4096, found -1");
}

/// Keys that must agree, and values only the model crate can judge.
#[test]
fn cross_key_problems_name_a_key() {
    let cases: [(&[&str], &str); 5] = [
        (&["train.epochs=0"], "train.epochs and train.max_steps are both 0"),
        (&["data.min_pixels=1000", "data.max_pixels=10"], "data.min_pixels must be at most data.max_pixels (10), found 1000"),
        (&["model.dtype=\"float64\""], "model.dtype must be \"float32\", \"bfloat16\" or \"float16\", found \"float64\""),
        (&["lora.target_modules=\"(unclosed\""], "lora.target_modules: invalid regex"),
        (&["train.nope=1"], "unknown key train.nope"),
    ];
    for (sets, want) in cases {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let err = parse(VALID, &sets).unwrap_err();
        assert!(err.starts_with(FILE) && err.contains(want), "{sets:?}: {err}");
    }
    let err = parse(&VALID.replace("lr = 1e-3\n", ""), &[]).unwrap_err();
    assert!(err.contains("missing key train.lr"), "{err}");
    let err = parse(&format!("{VALID}\n[[stages]]\nname = 3\n"), &[]).unwrap_err();
    assert!(err.contains("stages[0].name must be a string, found integer 3"), "{err}");
    let err = parse(&format!("stages = []\n{VALID}"), &[]).unwrap_err();
    assert!(err.contains("stages must be a non-empty array"), "{err}");
}

/// A key with one typo suggests the key; a section with one suggests the section.
#[test]
fn typos_suggest_the_nearest_known_key() {
    let mut rng = SplitMix(0x7e57_0001);
    let keys = every_key();
    let mut cases = 0;
    for _ in 0..300 {
        let (section, key, _) = *rng.pick(&keys);
        if key.len() < 4 {
            continue;
        }
        let mut chars: Vec<char> = key.chars().collect();
        let i = rng.below(chars.len() - 1);
        match rng.below(3) {
            0 => chars.swap(i, i + 1),
            1 => {
                chars.remove(i);
            }
            _ => chars.insert(i, 'x'),
        }
        let typo: String = chars.into_iter().collect();
        if every_key().iter().any(|(s, k, _)| *s == section && *k == typo) {
            continue;
        }
        let err = parse(&with_value(section, &typo, "1"), &[]).unwrap_err();
        assert!(err.starts_with(FILE) && err.contains(&format!("unknown key {section}.{typo}")), "{err}");
        assert!(err.contains("did you mean "), "{section}.{typo}: no suggestion: {err}");
        cases += 1;
    }
    let err = parse(&VALID.replace("[hub]", "[hbu]"), &[]).unwrap_err();
    assert!(err.contains("unknown section [hbu] (did you mean [hub]?)"), "{err}");
    let err = parse(&VALID.replace("[hub]", "[zzzzzzzzzz]"), &[]).unwrap_err();
    assert!(err.contains("known sections: [model], [data]"), "{err}");
    println!("{cases} typos suggested");
}

/// TOML syntax errors give the file, line and column and a short excerpt of the line, however
/// long the line.
#[test]
fn syntax_errors_give_line_column_and_a_short_excerpt() {
    let err = parse(&VALID.replace("lr = 1e-3", "lr = = 1e-3"), &[]).unwrap_err();
    assert!(err.starts_with("bad.toml: line 8, column "), "{err}");
    assert!(err.contains("lr = = 1e-3") && err.contains('^'), "{err}");
    println!("{err}");

    let huge = format!("output_dir = \"{}", "a".repeat(1 << 20));
    let err = parse(&VALID.replace("output_dir = \"out\"", &huge), &[]).unwrap_err();
    assert!(err.starts_with("bad.toml: line 7, column "), "{}", &err[..200.min(err.len())]);
    assert!(err.len() < 400, "a 1 MiB line gives a {}-byte message", err.len());
    assert!(err.contains('…'), "{err}");
    println!("{err}");

    let long_value = format!("path = \"{}\"\n", "é".repeat(100_000));
    let err = parse(&format!("[model]\n{long_value}[junk\n"), &[]).unwrap_err();
    assert!(err.contains("line 3, column ") && err.len() < 400, "{err}");
}

/// Random byte-level damage to a valid recipe: never a panic; an error names the file.
#[test]
fn mutated_recipes_never_panic_and_name_the_file() {
    let mut rng = SplitMix(0x7e57_0002);
    let junk = ["=", "[", "]", "\"", "\n", "nan", "-", "{", "#", "[[stages]]\n", "\u{0}", "é", "9999999999999999999999"];
    let mut refused = 0;
    for case in 0..600 {
        let mut text: Vec<char> = VALID.chars().collect();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(text.len() + 1);
            match rng.below(3) {
                0 if at < text.len() => {
                    text.remove(at);
                }
                1 => text.truncate(at),
                _ => {
                    for (i, c) in rng.pick(&junk).chars().enumerate() {
                        text.insert((at + i).min(text.len()), c);
                    }
                }
            }
        }
        let text: String = text.into_iter().collect();
        if let Err(e) = parse(&text, &[]) {
            assert!(e.starts_with(FILE), "case {case}: {e}\nrecipe:\n{text}");
            assert!(e.len() < 2000, "case {case}: a {}-byte message", e.len());
            refused += 1;
        }
    }
    println!("600 mutated recipes: {refused} refused, none panicked");
}

/// Random keys × random values, in the file or by --set: any error names the file.
#[test]
fn random_values_never_panic() {
    let mut rng = SplitMix(0x7e57_0003);
    let values = [
        "0", "1", "-1", "4097", "65537", "9223372036854775807", "0.5", "1.0", "-0.0", "1e308", "nan", "+inf", "\"x\"", "\"\"",
        "true", "[]", "[\"q_proj\"]", "{}", "\"pretrain\"", "\"instruct\"", "\"cosine\"", "\"skip\"",
    ];
    let keys = every_key();
    for case in 0..800 {
        let (section, key, _) = *rng.pick(&keys);
        let value = rng.pick(&values);
        let r = if rng.below(2) == 0 { parse(&with_value(section, key, value), &[]) } else { parse(VALID, &[format!("{section}.{key}={value}")]) };
        if let Err(e) = r {
            assert!(e.starts_with(FILE), "case {case}: {section}.{key} = {value}: {e}");
        }
    }
}

#[test]
fn recipe_files_are_read_with_a_bound() {
    let err = Recipe::stages_from_file(Path::new("/dev/zero"), &[]).unwrap_err().to_string();
    assert!(err.starts_with("/dev/zero: more than 16 MiB, the limit for a recipe"), "{err}");
    let dir = tmp("recipe-files");
    let err = Recipe::from_file(&dir, &[]).unwrap_err().to_string();
    assert!(err.starts_with(&dir.display().to_string()) && err.contains("is a directory"), "{err}");
    let latin1 = dir.join("latin1.toml");
    std::fs::write(&latin1, b"[model]\npath = \"caf\xe9\"\n").unwrap();
    let err = Recipe::from_file(&latin1, &[]).unwrap_err().to_string();
    assert!(err.contains("latin1.toml: not UTF-8 text (invalid byte at offset 19)"), "{err}");
    let missing = dir.join("missing.toml");
    let err = Recipe::from_file(&missing, &[]).unwrap_err();
    assert!(err.to_string().contains("missing.toml: No such file or directory"), "{err}");
    // The OS error is in the message, so it is not chained too (a chain printer would repeat it).
    assert!(std::error::Error::source(&err).is_none(), "{err}");
}

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn state() -> TrainerState {
    TrainerState {
        global_step: 4,
        total_steps: 10,
        epoch: 0.5,
        cursor: Cursor { seed: 42, epoch: 0, position: 8 },
        optimizer_step: 4,
        stage: Stage::Pretrain,
        trainable_fingerprint: "fp".into(),
        trainable: vec!["multi_modal_projector.linear_1.weight".into()],
        rows_skipped: 0,
        batches_all_masked: 0,
        last_loss: Some(1.5),
        last_eval_loss: None,
        base_model: "m".into(),
        model_type: "llava".into(),
        num_tokens: 0,
    }
}

fn target() -> ResumeTarget<'static> {
    ResumeTarget { stage: Stage::Pretrain, model_type: "llava", trainable_fingerprint: "fp", rows: 16, total_steps: 10, epochs: 1, max_steps: 0 }
}

fn write_state(dir: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("trainer_state.json");
    std::fs::write(&p, text).unwrap();
    p
}

/// A trainer_state.json that would change the stage, the model or what trains, or that holds a
/// cursor past the data or a step past the schedule, is refused naming the field.
#[test]
fn trainer_states_that_do_not_fit_the_run_are_refused_naming_the_field() {
    let dir = tmp("states");
    let good = state();
    let file = write_state(&dir, &serde_json::to_string(&good).unwrap());
    assert_eq!(checkpoint::read_state(&dir).unwrap(), good);
    good.check_resumable(&file, &target()).unwrap();

    let mismatches: Vec<(Box<dyn Fn(&mut TrainerState)>, &str)> = vec![
        (Box::new(|s| s.stage = Stage::Instruct), "stage is \"instruct\" but the recipe's train.stage is \"pretrain\""),
        (Box::new(|s| s.model_type = "qwen2_vl".into()), "model_type is \"qwen2_vl\""),
        (Box::new(|s| s.trainable_fingerprint = "other".into()), "the recipe changes what is trained"),
        (Box::new(|s| s.global_step = 11), "global_step is 11, past the 10 steps"),
        (Box::new(|s| s.cursor.position = 17), "cursor.position is 17, past the 16 rows"),
        (Box::new(|s| s.cursor.epoch = 1), "cursor.epoch is 1, past this run's last epoch (0)"),
    ];
    for (change, want) in &mismatches {
        let mut s = state();
        change(&mut s);
        let err = s.check_resumable(&file, &target()).unwrap_err().to_string();
        assert!(err.starts_with(&file.display().to_string()) && err.contains(want), "{err}");
    }

    // Values no run writes are refused on reading, naming the field.
    let absurd = [
        ("\"global_step\": 4", "\"global_step\": 18446744073709551615", "global_step must be at most"),
        ("\"epoch\": 0.5", "\"epoch\": -1.0", "epoch must be a finite number ≥ 0, found -1"),
        ("\"optimizer_step\": 4", "\"optimizer_step\": 5", "optimizer_step must be at most global_step (4), found 5"),
        ("\"rows_skipped\": 0", "\"rows_skipped\": 18446744073709551615", "rows_skipped must be at most"),
        ("\"epoch\": 0,", "\"epoch\": 18446744073709551615,", "cursor.epoch must be at most"),
        ("\"stage\": \"pretrain\"", "\"stage\": \"finetune\"", "not a valid trainer state: field `stage`: unknown variant `finetune`"),
        ("\"global_step\": 4", "\"global_step\": -4", "not a valid trainer state: field `global_step`: invalid value: integer `-4`"),
    ];
    let text = serde_json::to_string_pretty(&good).unwrap();
    for (from, to, want) in absurd {
        assert!(text.contains(from), "{from} in {text}");
        write_state(&dir, &text.replacen(from, to, 1));
        let err = checkpoint::read_state(&dir).unwrap_err().to_string();
        assert!(err.starts_with(&file.display().to_string()) && err.contains(want), "{to}: {err}");
    }
}

/// Garbage, truncated or endless trainer_state.json, a missing one, a missing directory: an
/// error naming the file or directory, never a panic.
#[test]
fn damaged_trainer_states_name_the_file() {
    let dir = tmp("damaged-states");
    let text = serde_json::to_string_pretty(&state()).unwrap();
    let mut rng = SplitMix(0x7e57_0004);
    let file = dir.join("trainer_state.json").display().to_string();
    for case in 0..300 {
        let mut bytes = text.as_bytes().to_vec();
        match rng.below(3) {
            0 => bytes.truncate(rng.below(bytes.len())),
            1 => {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            _ => bytes = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
        }
        std::fs::write(dir.join("trainer_state.json"), &bytes).unwrap();
        let r = catch_unwind(|| checkpoint::read_state(&dir)).unwrap_or_else(|_| panic!("case {case}: panic on {:?}", String::from_utf8_lossy(&bytes)));
        if let Err(e) = r {
            assert!(e.to_string().starts_with(&file), "case {case}: {e}");
        }
    }
    std::fs::remove_file(dir.join("trainer_state.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("trainer_state.json")).unwrap();
    let err = checkpoint::read_state(&dir).unwrap_err().to_string();
    assert!(err.starts_with(&file) && err.contains("more than 64 MiB, the limit for a trainer state"), "{err}");
    std::fs::remove_file(dir.join("trainer_state.json")).unwrap();
    let err = checkpoint::read_state(&dir).unwrap_err().to_string();
    assert!(err.starts_with(&file) && err.contains("missing") && err.contains("not a complete vsft checkpoint"), "{err}");
    let err = checkpoint::read_state(&dir.join("nope")).unwrap_err().to_string();
    assert!(err.contains("nope: does not exist"), "{err}");
}

type Train = Autodiff<Flex>;

fn pretrain_trainer() -> Trainer<Train> {
    let model = VlmModel::<Train>::load(&common::fixtures().join("model/tiny-llava-mha/legacy"), &Default::default()).unwrap();
    Trainer::new(model, Stage::Pretrain, common::plain_settings(1)).unwrap()
}

/// A checkpoint whose tensor files are missing or do not fit the model's parameters: an error
/// naming the file and the tensor, and the trainer left as it was.
#[test]
fn checkpoint_tensors_that_do_not_fit_name_the_file_and_the_tensor() {
    let out = tmp("ckpt-tensors");
    let mut trainer = pretrain_trainer();
    let mut s = state();
    s.trainable = trainer.trainable.keys().cloned().collect();
    s.optimizer_step = 0;
    let dir = checkpoint::save(&out, CheckpointContent { trainer: &trainer, state: &s, lora: None, recipe_toml: "" }, 0).unwrap();
    checkpoint::restore(&dir, &mut trainer, &s).unwrap();

    let name = s.trainable[0].clone();
    let shrunk = vec![PendingTensor { name: name.clone(), shape: vec![3], values: Box::new(|| vec![0.0; 3]) }];
    write_safetensors(&dir.join("trainable.safetensors"), shrunk, StoredDtype::F32).unwrap();
    let err = checkpoint::restore(&dir, &mut trainer, &s).unwrap_err().to_string();
    assert!(err.contains("trainable.safetensors: tensor") && err.contains(&format!("{name} has 3 values")), "{err}");

    std::fs::remove_file(dir.join("trainable.safetensors")).unwrap();
    let err = checkpoint::restore(&dir, &mut trainer, &s).unwrap_err().to_string();
    assert!(err.contains("trainable.safetensors: missing from the checkpoint"), "{err}");

    let mut other = s.clone();
    other.trainable = vec!["language_model.x.weight".into()];
    let err = checkpoint::restore(&dir, &mut trainer, &other).unwrap_err().to_string();
    assert!(err.contains("trainer_state.json: trainable:") && err.contains("only in the checkpoint: language_model.x.weight"), "{err}");
    assert!(!err.contains("Some("), "{err}");
}
