//! Data parallelism: which rank this process is (torchrun's and SLURM's environment), the
//! communicator a training step reduces through, and the bucketed gradient all-reduce.
//!
//! A step on `world` ranks equals one device's step over the global batch because every rank
//! divides its summed token losses by the label tokens of the whole step (all ranks, all
//! micro-batches), and the gradients are summed across ranks, not averaged
//! ([`crate::Trainer::step_across`]). Every rank issues the same collectives in the same order
//! whatever its data: a parameter without a gradient on a rank (the projector on text-only
//! rows) is reduced as zeros, with a presence flag so that a parameter no rank touched is left
//! alone as on one device.
//!
//! Engines: [`SingleRank`] (no communication); [`LocalRanks`], ranks as threads of one
//! process through burn-collective's local level (any Burn backend, Flex included); and, with
//! `--features cuda`, `nccl::NcclRanks` for ranks in separate processes, one per GPU, joined by
//! [`crate::rendezvous`] and watched by its [`crate::rendezvous::Watchdog`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use crate::error::TrainError;

/// Where this process sits in a job, read from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldInfo {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    /// Where rank 0 listens for the rendezvous.
    pub master_addr: String,
    pub master_port: u16,
    /// `torchrun` or `slurm`: which variables it came from (for messages).
    pub launcher: &'static str,
}

/// torchrun's default `--master-port`.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl WorldInfo {
    /// The job this process belongs to, from the environment: torchrun's `RANK`, `LOCAL_RANK`,
    /// `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` first, else SLURM's
    /// `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`, `SLURM_NTASKS_PER_NODE`,
    /// `SLURM_NODELIST` (its first host is the master, as by convention). `None` when neither
    /// launcher set them: a single-process run.
    pub fn from_env() -> Result<Option<WorldInfo>, TrainError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`WorldInfo::from_env`] over any source of variables (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<WorldInfo>, TrainError> {
        let num = |key: &str| -> Result<Option<usize>, TrainError> {
            match var(key) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| TrainError::Other(format!("environment variable {key}={v:?} is not a non-negative integer"))),
            }
        };
        let need = |key: &str, launcher: &str| -> Result<usize, TrainError> {
            num(key)?.ok_or_else(|| TrainError::Other(format!("{launcher} environment incomplete: {key} is not set")))
        };
        let info = if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            let (rank, world_size) = (need("RANK", "torchrun")?, need("WORLD_SIZE", "torchrun")?);
            let port = match var("MASTER_PORT") {
                None => DEFAULT_MASTER_PORT,
                Some(p) => p.trim().parse::<u16>().map_err(|_| TrainError::Other(format!("environment variable MASTER_PORT={p:?} is not a port number")))?,
            };
            WorldInfo {
                rank,
                local_rank: num("LOCAL_RANK")?.unwrap_or(rank),
                world_size,
                local_world_size: num("LOCAL_WORLD_SIZE")?.unwrap_or(world_size),
                master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: port,
                launcher: "torchrun",
            }
        } else if var("SLURM_PROCID").is_some() {
            let (rank, world_size) = (need("SLURM_PROCID", "SLURM")?, need("SLURM_NTASKS", "SLURM")?);
            let nodelist = var("SLURM_NODELIST").or_else(|| var("SLURM_JOB_NODELIST")).unwrap_or_else(|| "127.0.0.1".into());
            // `SLURM_NTASKS_PER_NODE` may read "4" or "4(x2)": the count before the bracket.
            let per_node = var("SLURM_NTASKS_PER_NODE").and_then(|v| v.split('(').next().and_then(|n| n.trim().parse::<usize>().ok()));
            WorldInfo {
                rank,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(0),
                world_size,
                local_world_size: per_node.unwrap_or(world_size),
                master_addr: first_host(&nodelist)?,
                master_port: DEFAULT_MASTER_PORT,
                launcher: "slurm",
            }
        } else {
            return Ok(None);
        };
        info.validate()?;
        Ok(Some(info))
    }

    /// The GPU this rank trains on: `LOCAL_RANK`, unless the launcher left this process a single
    /// visible GPU (`CUDA_VISIBLE_DEVICES` with one entry, as SLURM's `--gpus-per-task 1` sets
    /// it), which is then device 0.
    pub fn gpu_index(&self, cuda_visible_devices: Option<&str>) -> usize {
        match cuda_visible_devices {
            Some(v) if v.split(',').filter(|d| !d.trim().is_empty()).count() == 1 => 0,
            _ => self.local_rank,
        }
    }

    fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Other(format!("{} environment: {m}", self.launcher)));
        if self.world_size == 0 {
            return bad("the world size is 0".into());
        }
        if self.rank >= self.world_size {
            return bad(format!("rank {} is not below the world size {}", self.rank, self.world_size));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size || self.local_rank >= self.local_world_size {
            return bad(format!("local rank {} of {} on a node does not fit a world of {}", self.local_rank, self.local_world_size, self.world_size));
        }
        Ok(())
    }
}

/// The first host of a SLURM hostlist: `gpu[07-09,12],cpu1` → `gpu07`, `node3,node4` → `node3`.
pub fn first_host(nodelist: &str) -> Result<String, TrainError> {
    let bad = || TrainError::Other(format!("SLURM_NODELIST {nodelist:?} is not a hostlist"));
    let s = nodelist.trim();
    let end = s.find([',', '[']).unwrap_or(s.len());
    let prefix = &s[..end];
    if s[end..].starts_with('[') {
        let inner = &s[end + 1..s[end..].find(']').map(|i| end + i).ok_or_else(bad)?];
        let first = inner.split([',', '-']).next().filter(|f| !f.is_empty()).ok_or_else(bad)?;
        return Ok(format!("{prefix}{first}"));
    }
    if prefix.is_empty() {
        return Err(bad());
    }
    Ok(prefix.to_string())
}

/// What a step needs from the other ranks. Calls must come in the same order on every rank.
pub trait Communicator<B: Backend>: Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum of every rank's `tensor` (same shape on all), on every rank.
    fn all_reduce_sum(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, TrainError>;
    /// Rank 0's `tensor` on every rank.
    fn broadcast_from_first(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, TrainError>;
}

/// One rank: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl<B: Backend> Communicator<B> for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, TrainError> {
        Ok(tensor)
    }
    fn broadcast_from_first(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, TrainError> {
        Ok(tensor)
    }
}

/// Ranks as threads of this process, through burn-collective's local level. Made by
/// [`run_local_ranks`], which owns the group's lifetime.
pub struct LocalRanks<B: Backend> {
    rank: usize,
    world_size: usize,
    device: B::Device,
    /// Set when a rank of the group failed: no rank starts another collective.
    aborted: Arc<AtomicBool>,
}

impl<B: Backend> LocalRanks<B> {
    fn check_alive(&self) -> Result<(), TrainError> {
        match self.aborted.load(Ordering::SeqCst) {
            true => Err(TrainError::Other(format!("rank {}: stopped because another rank stopped", self.rank))),
            false => Ok(()),
        }
    }
}

fn collective_error(what: &str, rank: usize, e: burn_collective::CollectiveError) -> TrainError {
    TrainError::Other(format!("rank {rank}: {what} failed ({e:?}); another rank stopped, or the ranks issued different collectives"))
}

impl<B: Backend> Communicator<B> for LocalRanks<B> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, TrainError> {
        self.check_alive()?;
        let out = burn_collective::all_reduce::<B>(PeerId::from(self.rank), tensor.into_primitive().tensor(), ReduceOperation::Sum)
            .map_err(|e| collective_error("all-reduce", self.rank, e))?;
        Ok(Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out)).to_device(&self.device))
    }
    fn broadcast_from_first(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, TrainError> {
        self.check_alive()?;
        let mine = (self.rank == 0).then(|| tensor.into_primitive().tensor());
        let out = burn_collective::broadcast::<B>(PeerId::from(self.rank), mine).map_err(|e| collective_error("broadcast", self.rank, e))?;
        Ok(Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out)).to_device(&self.device))
    }
}

/// burn-collective keeps one local server per backend and process: one group at a time.
static LOCAL_GROUP: Mutex<()> = Mutex::new(());

/// Runs `body` on `world_size` ranks, one thread each, joined in a burn-collective local group
/// on `device`. When a rank fails, the group is marked aborted and reset until every other rank
/// has returned: a rank waiting in a collective (or about to start one) stops with an error
/// instead of waiting forever. The failing rank's own error is returned.
pub fn run_local_ranks<B, T, F>(world_size: usize, device: &B::Device, body: F) -> Result<Vec<T>, TrainError>
where
    B: Backend,
    T: Send,
    F: Fn(&LocalRanks<B>) -> Result<T, TrainError> + Sync,
{
    if world_size == 0 {
        return Err(TrainError::Other("a group of 0 ranks".into()));
    }
    let _group = LOCAL_GROUP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    burn_collective::reset_collective::<B>();
    let config = CollectiveConfig::default().with_num_devices(world_size);
    let aborted = Arc::new(AtomicBool::new(false));
    let live = AtomicUsize::new(world_size);
    let results: Vec<Result<T, TrainError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let (config, body, live) = (config.clone(), &body, &live);
                let comm = LocalRanks::<B> { rank, world_size, device: device.clone(), aborted: aborted.clone() };
                s.spawn(move || {
                    let out = burn_collective::register::<B>(PeerId::from(rank), device.clone(), config)
                        .map_err(|e| collective_error("joining the group", rank, e))
                        .and_then(|()| body(&comm));
                    live.fetch_sub(1, Ordering::SeqCst);
                    if out.is_err() {
                        comm.aborted.store(true, Ordering::SeqCst);
                        // A reset drops the pending collectives, so their callers wake with an
                        // error; repeated until the others returned, for one that was just
                        // starting a collective as the first reset went through.
                        while live.load(Ordering::SeqCst) > 0 {
                            burn_collective::reset_collective::<B>();
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| h.join().unwrap_or_else(|_| Err(TrainError::Other(format!("rank {rank} panicked")))))
            .collect()
    });
    burn_collective::reset_collective::<B>();
    // The root cause first: a rank's own error rather than the "another rank stopped" it caused.
    let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
    if let Some(first) = failed.iter().find(|r| !matches!(r, Err(TrainError::Other(m)) if m.contains("another rank stopped") || m.contains("stopped because"))).or(failed.first()) {
        return Err(match first {
            Err(TrainError::Other(m)) => TrainError::Other(m.clone()),
            Err(e) => TrainError::Other(e.to_string()),
            Ok(_) => unreachable!(),
        });
    }
    Ok(ok.into_iter().map(|r| r.ok().expect("ok")).collect())
}

/// PyTorch DDP's default `bucket_cap_mb` (25 MiB): gradients travel in buckets of about this
/// size, one all-reduce per bucket.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Sums `tensors` across ranks, packed into buckets of at most `bucket_bytes` (a tensor larger
/// than that travels alone): one all-reduce per bucket, in the order given.
pub fn all_reduce_bucketed<B: Backend>(comm: &dyn Communicator<B>, tensors: Vec<Tensor<B, 1>>, bucket_bytes: usize) -> Result<Vec<Tensor<B, 1>>, TrainError> {
    if comm.world_size() == 1 {
        return Ok(tensors);
    }
    let limit = (bucket_bytes / 4).max(1);
    let mut out = Vec::with_capacity(tensors.len());
    let mut bucket: Vec<Tensor<B, 1>> = Vec::new();
    let mut filled = 0;
    let flush = |bucket: &mut Vec<Tensor<B, 1>>, out: &mut Vec<Tensor<B, 1>>| -> Result<(), TrainError> {
        if bucket.is_empty() {
            return Ok(());
        }
        let (packed, sizes) = pack(std::mem::take(bucket));
        out.extend(unpack(comm.all_reduce_sum(packed)?, &sizes));
        Ok(())
    };
    for t in tensors {
        let n = t.dims()[0];
        if filled + n > limit {
            flush(&mut bucket, &mut out)?;
            filled = 0;
        }
        filled += n;
        bucket.push(t);
    }
    flush(&mut bucket, &mut out)?;
    Ok(out)
}

/// Flat tensors as one (what travels in one collective) and their lengths.
pub fn pack<B: Backend>(mut tensors: Vec<Tensor<B, 1>>) -> (Tensor<B, 1>, Vec<usize>) {
    let sizes = tensors.iter().map(|t| t.dims()[0]).collect();
    let packed = if tensors.len() == 1 { tensors.pop().expect("one") } else { Tensor::cat(tensors, 0) };
    (packed, sizes)
}

/// [`pack`] undone: the pieces of `packed`, `sizes` long each, in order.
pub fn unpack<B: Backend>(packed: Tensor<B, 1>, sizes: &[usize]) -> Vec<Tensor<B, 1>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            at += n;
            packed.clone().narrow(0, at - n, n)
        })
        .collect()
}

/// Sums a few numbers across ranks in one all-reduce (f32 on the wire: counts stay exact
/// below 2^24).
pub fn all_reduce_scalars<B: Backend>(comm: &dyn Communicator<B>, values: &[f64], device: &B::Device) -> Result<Vec<f64>, TrainError> {
    if comm.world_size() == 1 {
        return Ok(values.to_vec());
    }
    let t = Tensor::<B, 1>::from_data(TensorData::new(values.iter().map(|&v| v as f32).collect::<Vec<f32>>(), [values.len()]), device);
    let reduced = comm.all_reduce_sum(t)?;
    let data = reduced.into_data().convert::<f32>();
    Ok(data.as_slice::<f32>().map_err(|e| TrainError::Other(format!("all-reduce result: {e:?}")))?.iter().map(|&v| v.elem::<f64>()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn torchrun_and_slurm_environments() {
        let t = WorldInfo::from_vars(env(&[("RANK", "3"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "1234")])).unwrap().unwrap();
        assert_eq!((t.rank, t.local_rank, t.world_size, t.local_world_size, t.master_addr.as_str(), t.master_port, t.launcher), (3, 1, 4, 2, "10.0.0.1", 1234, "torchrun"));
        let s = WorldInfo::from_vars(env(&[("SLURM_PROCID", "5"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS", "8"), ("SLURM_NTASKS_PER_NODE", "4(x2)"), ("SLURM_NODELIST", "gpu[07-08]")])).unwrap().unwrap();
        assert_eq!((s.rank, s.local_rank, s.world_size, s.local_world_size, s.master_addr.as_str(), s.master_port, s.launcher), (5, 1, 8, 4, "gpu07", DEFAULT_MASTER_PORT, "slurm"));
        assert_eq!(WorldInfo::from_vars(env(&[])).unwrap(), None);
    }

    #[test]
    fn bad_environments_are_named() {
        let err = |pairs: &[(&str, &str)]| WorldInfo::from_vars(env(pairs)).unwrap_err().to_string();
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not set"));
        assert!(err(&[("RANK", "4"), ("WORLD_SIZE", "4")]).contains("rank 4 is not below the world size 4"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "4")]).contains("RANK=\"x\""));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")]).contains("MASTER_PORT"));
        assert!(err(&[("SLURM_PROCID", "0")]).contains("SLURM_NTASKS is not set"));
    }

    #[test]
    fn the_gpu_of_a_rank() {
        let w = WorldInfo::from_vars(env(&[("RANK", "5"), ("LOCAL_RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_WORLD_SIZE", "4")])).unwrap().unwrap();
        assert_eq!(w.gpu_index(None), 3);
        assert_eq!(w.gpu_index(Some("0,1,2,3")), 3);
        // srun --gpus-per-task 1: each task sees its own GPU as device 0.
        assert_eq!(w.gpu_index(Some("6")), 0);
        assert_eq!(w.gpu_index(Some("")), 3);
    }

    #[test]
    fn slurm_hostlists() {
        assert_eq!(first_host("gpu[07-09,12],cpu1").unwrap(), "gpu07");
        assert_eq!(first_host("node3,node4").unwrap(), "node3");
        assert_eq!(first_host("a100-[1,3]").unwrap(), "a100-1");
        assert_eq!(first_host("solo").unwrap(), "solo");
        assert!(first_host("[1-2]").is_ok());
        assert!(first_host("gpu[").is_err());
        assert!(first_host("").is_err());
    }
}
