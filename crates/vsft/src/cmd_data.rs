use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use vsft_data::inspect::{inspect, summarize, InspectOptions};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Each example's rendered text with the trained tokens marked, token and image counts.
    #[command(after_help = "Example:\n  vsft data inspect --model tests/fixtures/data/model --data tests/fixtures/data/llava_instruct_mix --label-mask assistant --limit 2")]
    Inspect(InspectArgs),
    /// Rows, images, length percentiles, rows skipped and why.
    #[command(after_help = "Example:\n  vsft data summary --model tests/fixtures/data/model --data tests/fixtures/data/llava_instruct_mix")]
    Summary(InspectArgs),
}

#[derive(Args)]
pub struct InspectArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value = "pad")]
    pub label_mask: String,
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long)]
    pub split: Option<String>,
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Tokenize without BOS (TRL 1.16 passes add_special_tokens=False).
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Image folder of a LLaVA JSON dataset (default: the JSON file's folder).
    #[arg(long)]
    pub image_folder: Option<PathBuf>,
    /// Count bad rows instead of stopping at the first (summary always counts them).
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

fn options(a: &InspectArgs) -> Result<InspectOptions> {
    let model_dir = crate::cmd_train::resolve_model(&a.model)?;
    let data = crate::cmd_train::resolve_data(&a.data, a.split.as_deref().unwrap_or("train"))?;
    let mut o = InspectOptions::new(model_dir, data);
    o.split = a.split.clone();
    o.chat_template = a.chat_template.clone();
    o.label_mask = a.label_mask.parse().map_err(anyhow::Error::msg)?;
    o.add_special_tokens = !a.no_special_tokens;
    o.max_length = a.max_length;
    o.limit = a.limit;
    o.image_root = a.image_folder.clone();
    o.on_bad_row = if a.skip_bad_rows { vsft_data::OnBadRow::Skip } else { vsft_data::OnBadRow::Error };
    Ok(o)
}

pub fn run(c: DataCommand) -> Result<ExitCode> {
    match c {
        DataCommand::Inspect(a) => {
            let (examples, skipped) = inspect(&options(&a)?)?;
            for e in &examples {
                if a.json {
                    println!("{}", e.to_json_line());
                } else {
                    println!("{}", e.to_text());
                }
            }
            if skipped.total() > 0 {
                eprintln!("vsft: rows skipped: {}", skipped.report());
            }
        }
        DataCommand::Summary(a) => {
            // A summary's purpose is to count bad rows and say why they are bad.
            let o = InspectOptions { on_bad_row: vsft_data::OnBadRow::Skip, ..options(&a)? };
            let s = summarize(&o, 2)?;
            println!("{}", s.to_text());
        }
    }
    Ok(ExitCode::SUCCESS)
}
