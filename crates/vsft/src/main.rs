//! The `vsft` command line: train, evaluate, generate, export, push and inspect data.
//!
//! Exit codes: 0 success, 1 an error (the message names the file, key or row), 2 a usage
//! error, 130 training interrupted with Ctrl-C after saving a checkpoint.

mod backend;
mod builtin;
mod cmd_bench;
mod cmd_data;
mod cmd_export;
mod cmd_generate;
mod cmd_init;
mod cmd_train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vsft", version, about = "Supervised fine-tuning of LLaVA-style vision-language models", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a TOML recipe (stage 1 projector pretraining or stage 2 LoRA instruction tuning).
    #[command(after_help = "Example:\n  vsft train --config recipes/llava15_instruct.toml --set train.lr=1e-4 --resume auto")]
    Train(cmd_train::TrainArgs),
    /// Train on several data-parallel ranks: `vsft launch --nproc-per-node N -- train --config R`.
    #[command(after_help = "Example:\n  vsft launch --nproc-per-node 2 -- train --config recipes/demo.toml\n(CPU ranks, threads of one process; the global batch is train.batch_size × N per micro-batch)")]
    Launch(cmd_train::LaunchArgs),
    /// Mean loss over every label token of a dataset.
    #[command(after_help = "Example:\n  vsft eval --model llava-hf/llava-1.5-7b-hf --adapter out/checkpoint-500 --data data/test-00000-of-00001.parquet --json")]
    Eval(cmd_train::EvalArgs),
    /// Write a random-initialised model in Hugging Face layout from a config in configs/.
    #[command(after_help = "Example:\n  vsft init --config configs/tiny-llava-mha.json --tokenizer-from tests/fixtures/data/model --out /tmp/tiny")]
    Init(cmd_init::InitArgs),
    /// Answer a prompt about an image (KV cache, streamed; greedy by default).
    #[command(after_help = "Example:\n  vsft generate --model ~/.cache/vsft/builtin/demo-tiny-llava-v3 --adapter out/demo/instruct/checkpoint-<last step> --image out/demo/instruct/held-out-0.png --prompt \"What colour is the circle?\"\n(the paths the demo prints at its end)")]
    Generate(cmd_generate::GenerateArgs),
    /// Export a checkpoint: a PEFT adapter (or stage-1 projector), or with --merge a full model.
    #[command(after_help = "Examples:\n  vsft export --checkpoint out/llava15-instruct/checkpoint-2000 --out out/lora\n  vsft export --checkpoint out/llava15-instruct/checkpoint-2000 --out out/merged --merge --dtype bfloat16")]
    Export(cmd_export::ExportArgs),
    /// Upload a directory to the Hugging Face Hub (token from HF_TOKEN or $HF_HOME/token).
    #[command(after_help = "Example:\n  vsft push out/lora --repo you/llava-1.5-7b-lora --private")]
    Push(cmd_export::PushArgs),
    /// Write a model's logits on given inputs (for parity checks).
    #[command(hide = true)]
    Logits(cmd_export::LogitsArgs),
    /// Benchmarks (speed and memory of the training step).
    #[command(subcommand)]
    Bench(cmd_bench::BenchCommand),
    /// Write OUTPUT_DIR/report.html: curves, what trains, skipped rows, sample answers, the recipe.
    Report(ReportArgs),
    /// Look at what the model will be trained on.
    #[command(subcommand)]
    Data(cmd_data::DataCommand),
}

/// Keeps freed tensor buffers in the heap instead of returning them to the kernel: Burn's CPU
/// backend allocates a fresh buffer per op, and with glibc's defaults every buffer over 32 MB
/// is a new mmap whose pages fault and are zeroed again (~8 % of a training step, NOTES.md).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[derive(clap::Args)]
struct ReportArgs {
    /// A training output_dir (holding metrics.jsonl).
    output_dir: std::path::PathBuf,
}

fn report(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let path = vsft_track::report::write_report(&a.output_dir)?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    // GPU backends: cubecl's autotune results (and CUDA's compiled kernels) persist under the
    // cache directory, so only the first run pays for them in full.
    vsft_train::kernel_cache::use_cache_dir(&builtin::cache_root().join("cubecl"));
    let result = match cli.command {
        Command::Train(a) => cmd_train::train(a),
        Command::Launch(a) => cmd_train::launch(a),
        Command::Eval(a) => cmd_train::eval(a),
        Command::Init(a) => cmd_init::init(a),
        Command::Data(c) => cmd_data::run(c),
        Command::Bench(c) => cmd_bench::run(c),
        Command::Generate(a) => cmd_generate::generate(a),
        Command::Export(a) => cmd_export::export(a),
        Command::Push(a) => cmd_export::push(a),
        Command::Logits(a) => cmd_export::logits(a),
        Command::Report(a) => report(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes, `: `-joined, each text once: some error types of the libraries
/// show their source in their own message and also chain it, and the OS text would otherwise
/// appear twice ("File exists (os error 17): File exists (os error 17)").
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
