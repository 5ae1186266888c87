//! Writes the demo dataset and model files, e.g. to look at them or train elsewhere:
//!
//!     cargo run --release -p vsft-demo --example write_demo -- OUT [seed=N] [min_size=F] [max_size=F] [jitter=F]
//!
//! `OUT/data` gets the dataset, `OUT/model` the tokenizer and processor files and config.json.

use std::path::PathBuf;

use vsft_demo::{demo_model_config, write_demo_model_files, write_shapes_dataset, ShapesSpec};

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().expect("usage: write_demo OUT [key=value ...]"));
    let mut spec = ShapesSpec::default();
    for a in args {
        let (k, v) = a.split_once('=').unwrap_or_else(|| panic!("{a}: expected key=value"));
        let f = || v.parse::<f32>().unwrap_or_else(|e| panic!("{a}: {e}"));
        match k {
            "seed" => spec.seed = v.parse().unwrap(),
            "min_size" => spec.geometry.min_size = f(),
            "max_size" => spec.geometry.max_size = f(),
            "jitter" => spec.geometry.jitter = f(),
            "p_single" => spec.geometry.p_single = f() as f64,
            "n_captions" => spec.n_captions = v.parse().unwrap(),
            "n_qa_train" => spec.n_qa_train = v.parse().unwrap(),
            "n_qa_test" => spec.n_qa_test = v.parse().unwrap(),
            "max_turns" => spec.max_turns = v.parse().unwrap(),
            _ => panic!("unknown key {k}"),
        }
    }
    let files = write_shapes_dataset(&out.join("data"), &spec).unwrap_or_else(|e| panic!("{e}"));
    let vocab = write_demo_model_files(&out.join("model")).unwrap_or_else(|e| panic!("{e}"));
    let cfg = serde_json::to_string_pretty(&demo_model_config(&vocab)).unwrap();
    std::fs::write(out.join("model/config.json"), cfg).unwrap();
    eprintln!("wrote {} and {}", files.root.display(), out.join("model").display());
}
