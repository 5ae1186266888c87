use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use vsft_data::{open_dataset, CollatorConfig, Cursor, DataLoader, LoaderConfig, Processor};
use vsft_model::VlmModel;
use vsft_train::distributed::{Communicator, WorldInfo};
use vsft_train::run::{evaluate, Inputs, Resume};
use vsft_train::Recipe;

use crate::backend::{device, Compute, Train};

#[derive(Args)]
pub struct TrainArgs {
    /// The recipe (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a recipe key: `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// `auto` (newest complete checkpoint in output_dir) or a checkpoint directory.
    #[arg(long)]
    pub resume: Option<String>,
}

/// A local path, or a Hub id downloaded into the Hugging Face cache.
pub fn resolve_model(path: &str) -> Result<PathBuf> {
    if path.starts_with(crate::builtin::PREFIX) {
        return crate::builtin::resolve(path);
    }
    if Path::new(path).exists() {
        return Ok(PathBuf::from(path));
    }
    vsft_hub::resolve_model_path(path).with_context(|| format!("model {path:?} is neither a local directory nor a Hub model id"))
}

pub fn resolve_data(path: &str, split: &str) -> Result<String> {
    if path.starts_with(crate::builtin::PREFIX) {
        return Ok(crate::builtin::resolve(path)?.display().to_string());
    }
    if Path::new(path).exists() || path.contains('*') {
        return Ok(path.to_string());
    }
    let p = vsft_hub::resolve_dataset_path(path, split)
        .with_context(|| format!("data {path:?} is neither a local path nor a Hub dataset id"))?;
    Ok(p.display().to_string())
}

pub fn train(a: TrainArgs) -> Result<ExitCode> {
    match WorldInfo::from_env()? {
        Some(world) if world.world_size > 1 => train_in_job(a, &world),
        // A launched world of 1 on a GPU build goes through NCCL too, as torch DDP's would
        // (what gpu_check.sh compares with the plain step); without libnccl it needs none.
        Some(world) if cfg!(feature = "cuda") => match vsft_train::nccl::probe_library(&vsft_train::nccl::library_candidates()) {
            Ok(_) => train_in_job(a, &world),
            Err(e) => {
                eprintln!("vsft: a world of 1 ({} environment) trains without NCCL: {e}", world.launcher);
                train_on_ranks(a, Ranks::One, &device())
            }
        },
        _ => train_on_ranks(a, Ranks::One, &device()),
    }
}

/// How a run's ranks are laid out.
#[derive(Clone, Copy)]
enum Ranks<'a> {
    /// One device, no communication.
    One,
    /// N ranks as threads of this process (CPU builds), joined by burn-collective's in-process engine.
    Threads(usize),
    /// This process is one rank of a job launched by torchrun, srun or `vsft launch` (NCCL).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Process(&'a dyn Communicator<Compute>),
}

impl Ranks<'_> {
    fn lead(&self) -> bool {
        match self {
            Ranks::Process(comm) => comm.rank() == 0,
            _ => true,
        }
    }
}

/// Seconds every rank may take to reach the rendezvous (`VSFT_RENDEZVOUS_TIMEOUT`, 300 s by
/// default: processes of a large job start over a minute or two).
#[cfg(feature = "cuda")]
fn rendezvous_timeout() -> Duration {
    Duration::from_secs(std::env::var("VSFT_RENDEZVOUS_TIMEOUT").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(300))
}

/// Joins the job `world` describes over NCCL, on this rank's GPU ([`WorldInfo::gpu_index`]).
#[cfg(feature = "cuda")]
pub(crate) fn join_nccl(world: &WorldInfo) -> Result<(vsft_train::nccl::NcclRanks<Compute>, burn::tensor::Device<Compute>)> {
    let gpu = world.gpu_index(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref());
    let device = crate::backend::device_at(gpu);
    let comm = vsft_train::nccl::NcclRanks::<Compute>::join(world, gpu, device.clone(), rendezvous_timeout(), Default::default())?;
    Ok((comm, device))
}

/// This process is one rank of a job (torchrun's or SLURM's environment, or `vsft launch` on
/// GPUs): join the others over NCCL on GPU `LOCAL_RANK`, train, and tell the others through the
/// watchdog if this rank fails, so that they stop instead of waiting.
fn train_in_job(a: TrainArgs, world: &WorldInfo) -> Result<ExitCode> {
    #[cfg(feature = "cuda")]
    {
        let (comm, device) = join_nccl(world)?;
        let result = train_on_ranks(a, Ranks::Process(&comm), &device);
        match &result {
            Err(e) => comm.watchdog().report_failure(&crate::describe(e)),
            Ok(_) => comm.watchdog().finish(),
        }
        result
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = a;
        anyhow::bail!(
            "this process is rank {} of {} ({} environment): ranks in separate processes train over NCCL, in a build with `--features cuda`, \
             and this is the {} build. On CPU cores, launch one process: `vsft launch --nproc-per-node N -- train …` runs N ranks as threads.",
            world.rank,
            world.world_size,
            world.launcher,
            crate::backend::name()
        )
    }
}

/// `vsft launch … -- train …`: the recipe's stages on data-parallel ranks: on GPU builds one
/// process per GPU, as torchrun starts them; on the CPU, threads of this process joined by
/// burn-collective's in-process engine.
#[derive(Args)]
pub struct LaunchArgs {
    /// Ranks on this machine (torchrun's `--nproc-per-node`).
    #[arg(long = "nproc-per-node", default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Machines in the job (torchrun's `--nnodes`).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's index in the job.
    #[arg(long = "node-rank", default_value_t = 0)]
    pub node_rank: usize,
    /// Where rank 0 listens for the others (torchrun's `--master-addr`).
    #[arg(long = "master-addr", default_value = "127.0.0.1")]
    pub master_addr: String,
    #[arg(long = "master-port", default_value_t = vsft_train::distributed::DEFAULT_MASTER_PORT)]
    pub master_port: u16,
    /// `train --config R [--set …] [--resume …]`, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(clap::Parser)]
#[command(name = "vsft launch … --", no_binary_name = true)]
enum Launched {
    Train(TrainArgs),
}

pub fn launch(a: LaunchArgs) -> Result<ExitCode> {
    let Launched::Train(train_args) = <Launched as clap::Parser>::try_parse_from(&a.command).map_err(|e| anyhow::anyhow!("vsft launch: the command after `--`: {e}"))?;
    anyhow::ensure!(a.nproc_per_node >= 1 && a.nnodes >= 1, "vsft launch: --nproc-per-node and --nnodes must be at least 1");
    anyhow::ensure!(a.node_rank < a.nnodes, "vsft launch: --node-rank {} is not below --nnodes {}", a.node_rank, a.nnodes);
    if let Some(w) = WorldInfo::from_env()?.filter(|w| w.world_size > 1) {
        anyhow::bail!("vsft launch: this process is already rank {} of {} ({} environment); run `vsft train` under torchrun or srun, or `vsft launch` alone", w.rank, w.world_size, w.launcher);
    }
    if cfg!(feature = "cuda") {
        if a.nproc_per_node * a.nnodes == 1 {
            return train_on_ranks(train_args, Ranks::One, &device());
        }
        return launch_processes(&a);
    }
    anyhow::ensure!(
        a.nnodes == 1,
        "vsft launch: --nnodes {}: ranks on several machines train over NCCL, in a build with `--features cuda`; this {} build runs ranks as threads of one machine",
        a.nnodes,
        crate::backend::name()
    );
    anyhow::ensure!(
        a.nproc_per_node == 1 || crate::backend::name().contains("cpu"),
        "vsft launch: {} ranks on the {} backend: GPU ranks train over NCCL, in a build with `--features cuda`; this build runs CPU ranks as threads",
        a.nproc_per_node,
        crate::backend::name()
    );
    match a.nproc_per_node {
        1 => train_on_ranks(train_args, Ranks::One, &device()),
        n => train_on_ranks(train_args, Ranks::Threads(n), &device()),
    }
}

/// How long the other ranks get to stop on their own (their watchdog sees the failure within
/// seconds) after one failed, before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// One process per GPU of this machine, with torchrun's variables, supervised as torchrun
/// does: when one rank fails the others stop through the watchdog (or are killed after
/// [`STOP_GRACE`]), and the exit code is the first failure's.
fn launch_processes(a: &LaunchArgs) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("vsft launch: locating this executable")?;
    let world = a.nnodes * a.nproc_per_node;
    eprintln!("vsft launch: ranks {}..{} of {world} on this machine, rendezvous at {}:{}", a.node_rank * a.nproc_per_node, (a.node_rank + 1) * a.nproc_per_node, a.master_addr, a.master_port);
    let mut children = Vec::new();
    for local in 0..a.nproc_per_node {
        let rank = a.node_rank * a.nproc_per_node + local;
        let child = std::process::Command::new(&exe)
            .args(&a.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc_per_node.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", a.master_port.to_string())
            .spawn()
            .with_context(|| format!("vsft launch: starting rank {rank}"))?;
        children.push((rank, child));
    }
    let mut first_failure: Option<(usize, i32, Instant)> = None;
    loop {
        let mut running = 0;
        for (rank, child) in children.iter_mut() {
            match child.try_wait().with_context(|| format!("vsft launch: waiting for rank {rank}"))? {
                Some(status) if !status.success() && first_failure.is_none() => {
                    first_failure = Some((*rank, status.code().unwrap_or(1), Instant::now()));
                }
                Some(_) => {}
                None => running += 1,
            }
        }
        if running == 0 {
            break;
        }
        if first_failure.is_some_and(|(_, _, at)| at.elapsed() > STOP_GRACE) {
            for (_, child) in children.iter_mut() {
                let _ = child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match first_failure {
        None => Ok(ExitCode::SUCCESS),
        Some((rank, code, _)) => {
            eprintln!("vsft launch: rank {rank} failed (exit code {code}); the job stopped");
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1).max(1)))
        }
    }
}

fn train_on_ranks(a: TrainArgs, ranks: Ranks<'_>, device: &burn::tensor::Device<Compute>) -> Result<ExitCode> {
    let (stages, generate_eval) = Recipe::stages_from_file(&a.config, &a.set)?;
    let lead = ranks.lead();
    if lead {
        eprintln!("vsft: backend {}", crate::backend::name());
    }
    vsft_train::metrics::set_device_memory_probe(crate::backend::device_memory_reserved);
    let started = std::time::Instant::now();
    let mut previous: Option<PathBuf> = None;
    let mut last_model = None;
    for (i, mut recipe) in stages.into_iter().enumerate() {
        // Each later stage starts from the previous stage's projector, as LLaVA's stage 2 does.
        if let (Some(prev), None) = (&previous, &recipe.model.projector) {
            recipe.model.projector = Some(prev.display().to_string());
        }
        if i > 0 && lead {
            eprintln!("vsft: stage {} ({:?}) from {}", i + 1, recipe.train.stage, previous.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
        }
        let summary = train_stage(&recipe, &a.resume, ranks, device)?;
        if summary.interrupted {
            return Ok(ExitCode::from(130));
        }
        previous = Some(summary.last_checkpoint.clone());
        last_model = Some((resolve_model(&recipe.model.path)?, summary.last_checkpoint));
    }
    if !lead {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("vsft: training took {:.0} s", started.elapsed().as_secs_f64());
    if let (Some(ge), Some((model_dir, checkpoint))) = (generate_eval, last_model) {
        crate::cmd_generate::generate_eval(&ge, &model_dir, &checkpoint)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn train_stage(recipe: &Recipe, resume: &Option<String>, ranks: Ranks<'_>, device: &burn::tensor::Device<Compute>) -> Result<vsft_train::run::RunSummary> {
    let inputs = Inputs {
        model_dir: resolve_model(&recipe.model.path)?,
        train: resolve_data(&recipe.data.train, "train")?,
        eval: recipe.data.eval.as_deref().map(|e| resolve_data(e, "test")).transpose()?,
    };
    let resume = match resume.as_deref() {
        None => Resume::No,
        Some("auto") => Resume::Auto,
        Some(dir) => Resume::Dir(PathBuf::from(dir)),
    };
    let hub = recipe.hub.clone();
    let push_each = |dir: &Path| -> Result<(), vsft_train::TrainError> {
        if let (Some(repo), true) = (&hub.repo, hub.push_checkpoints) {
            let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            push_export(dir, repo, hub.private, Some(name)).map_err(|e| vsft_train::TrainError::Other(crate::describe(&e)))?;
        }
        Ok(())
    };
    let summary = match ranks {
        Ranks::One => vsft_train::run::train_with::<Train>(recipe, &inputs, resume, device, &mut { push_each })?,
        Ranks::Threads(n) => {
            eprintln!("vsft: {n} data-parallel ranks (threads of this process), global batch {} × {n} per micro-batch", recipe.train.batch_size);
            let mut summaries = vsft_train::distributed::run_local_ranks::<Compute, _, _>(n, device, |comm| {
                // Only rank 0 calls it (train_rank checks).
                let mut push = push_each;
                vsft_train::run::train_rank::<Train>(recipe, &inputs, resume.clone(), device, &mut push, comm)
            })?;
            summaries.swap_remove(0)
        }
        Ranks::Process(comm) => {
            if comm.rank() == 0 {
                eprintln!("vsft: {} data-parallel ranks (processes), global batch {} × {} per micro-batch", comm.world_size(), recipe.train.batch_size, comm.world_size());
            }
            vsft_train::run::train_rank::<Train>(recipe, &inputs, resume, device, &mut { push_each }, comm)?
        }
    };
    if !ranks.lead() {
        return Ok(summary);
    }
    eprintln!(
        "vsft: {} steps, final loss {}, checkpoint {}",
        summary.steps,
        summary.final_loss.map(|l| format!("{l:.4}")).unwrap_or("-".into()),
        summary.last_checkpoint.display()
    );
    if !summary.interrupted {
        if let Some(repo) = &recipe.hub.repo {
            push_export(&summary.last_checkpoint, repo, recipe.hub.private, None)?;
        }
    }
    Ok(summary)
}

/// Exports a checkpoint (adapter or projector, with its model card) next to it and pushes the
/// export: to `main`, or to the branch `revision` (one per checkpoint).
pub fn push_export(checkpoint: &Path, repo: &str, private: bool, revision: Option<String>) -> Result<()> {
    let name = checkpoint.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let export_dir = checkpoint.with_file_name(format!("export-{name}"));
    vsft_train::export::export_adapter(checkpoint, &export_dir)?;
    let client = vsft_hub::HubClient::from_env();
    let opts = vsft_hub::PushOptions { private, revision, message: Some(format!("vsft: {name}")), ..Default::default() };
    let info = client.push_folder(&export_dir, repo, &opts)?;
    eprintln!("vsft: pushed {} to {repo}: {}", export_dir.display(), info.commit_url);
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory or Hub id.
    #[arg(long)]
    pub model: String,
    /// A LoRA adapter (vsft checkpoint or export, or a PEFT adapter directory).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Parquet file/directory/glob, LLaVA JSON, or Hub dataset id.
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value = "pad")]
    pub label_mask: String,
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Split of a Hub-layout dataset directory (`data/test-*.parquet`); `all` takes every file.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Folder of images for LLaVA JSON data.
    #[arg(long)]
    pub image_folder: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Print `{"loss", "label_tokens", "examples"}`.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(a: EvalArgs) -> Result<ExitCode> {
    let model_dir = resolve_model(&a.model)?;
    let mut model = VlmModel::<Compute>::load(&model_dir, &device())?;
    if let Some(adapter) = &a.adapter {
        model = load_adapter_or_projector(model, adapter)?;
    }
    let processor = Arc::new(Processor::from_model_dir(&model_dir, a.chat_template.as_deref())?);
    vsft_train::run::check_image_token(&model, &processor, &model_dir)?;
    let data = resolve_data(&a.data, &a.split)?;
    let split = (a.split != "all").then_some(a.split.as_str());
    let source = open_dataset(&data, split, a.image_folder.as_deref())?;
    let cfg = LoaderConfig {
        batch_size: a.batch_size,
        collator: CollatorConfig {
            label_mask: a.label_mask.parse().map_err(anyhow::Error::msg)?,
            max_length: Some(a.max_length),
            ..Default::default()
        },
        shuffle: false,
        ..Default::default()
    };
    let loader = DataLoader::new(source, processor, cfg, Cursor::default());
    let r = evaluate(&model, loader)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("loss {:.6} over {} label tokens in {} examples", r.loss, r.label_tokens, r.examples);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--adapter DIR`: a LoRA adapter (with `adapter_config.json`) or a stage-1 checkpoint's projector.
pub fn load_adapter_or_projector<B: burn::tensor::backend::Backend>(model: VlmModel<B>, dir: &Path) -> Result<VlmModel<B>> {
    if !dir.exists() {
        anyhow::bail!("--adapter {}: does not exist; expected an adapter or checkpoint directory", dir.display());
    }
    if dir.join("adapter_config.json").exists() {
        Ok(model.load_adapter(dir).with_context(|| format!("loading adapter {}", dir.display()))?.0)
    } else {
        Ok(vsft_train::run::load_projector(model, dir).with_context(|| format!("loading projector {}", dir.display()))?)
    }
}
