//! The NCCL communicator of one rank (one process, one GPU): see the parent module.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use cudarc::driver::{sys, CudaContext, CudaStream, DevicePtrMut};

use super::{err, Api, Collective, NcclComm, NcclResult, RawStream, UniqueId, NCCL_FLOAT32, NCCL_IN_PROGRESS, NCCL_SUCCESS, NCCL_SUM};
use crate::distributed::{Communicator, WorldInfo};
use crate::error::TrainError;
use crate::rendezvous::{join_group, WatchSettings, Watchdog};

/// The communicator handle; NCCL allows calls from any thread, one at a time.
struct Handle(NcclComm);
// SAFETY: an ncclComm_t may move between threads; `NcclRanks` serialises its use.
unsafe impl Send for Handle {}

/// How long a collective may take before the job is declared hung (`VSFT_NCCL_TIMEOUT`
/// seconds; torch's default is the same 10 minutes).
fn collective_timeout() -> Duration {
    let secs = std::env::var("VSFT_NCCL_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(600);
    Duration::from_secs(secs.max(1))
}

/// This process's rank of a job over NCCL, on one GPU.
pub struct NcclRanks<B: Backend> {
    rank: usize,
    world_size: usize,
    api: &'static Api,
    comm: Mutex<Option<Handle>>,
    stream: Arc<CudaStream>,
    device: B::Device,
    watchdog: Watchdog,
    timeout: Duration,
}

impl<B: Backend> NcclRanks<B> {
    /// Joins the job `world` describes on GPU `gpu` (whose Burn device is `device`): the
    /// rendezvous (within `rendezvous_timeout`), then NCCL's own set-up, waited for under the
    /// watchdog.
    pub fn join(
        world: &WorldInfo,
        gpu: usize,
        device: B::Device,
        rendezvous_timeout: Duration,
        watch: WatchSettings,
    ) -> Result<Self, TrainError> {
        let api = Api::load()?;
        let rank = world.rank;
        let id = if rank == 0 {
            let mut id = UniqueId { internal: [0; 128] };
            // SAFETY: writes the 128-byte id.
            api.check(
                unsafe { (api.get_unique_id)(&mut id) },
                "rank 0: ncclGetUniqueId",
            )?;
            Some(id.internal.to_vec())
        } else {
            None
        };
        let (bytes, watchdog) = join_group(world, id.as_deref(), rendezvous_timeout, watch)?;
        let internal: [u8; 128] = bytes.as_slice().try_into().map_err(|_| {
            err(format!(
                "rank {rank}: the NCCL id from rank 0 has {} bytes, not 128",
                bytes.len()
            ))
        })?;
        let cuda = |what: &str, e: cudarc::driver::DriverError| {
            err(format!("rank {rank}: GPU {gpu}: {what}: {e:?}"))
        };
        let ctx = CudaContext::new(gpu).map_err(|e| cuda("opening the device", e))?;
        let stream = ctx.new_stream().map_err(|e| cuda("creating a stream", e))?;
        // ncclCommInitRank blocks until every rank has called it: run it aside and wait under
        // the watchdog, so that a rank dying now stops the others too.
        let (size, r) = (world.world_size as i32, rank as i32);
        let init_ctx = ctx.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = init_ctx.bind_to_thread();
            let mut comm: NcclComm = std::ptr::null_mut();
            // SAFETY: `comm` receives the new communicator.
            let code = unsafe { (api.comm_init_rank)(&mut comm, size, UniqueId { internal }, r) };
            let _ = tx.send((code, Handle(comm)));
        });
        let timeout = collective_timeout();
        let started = Instant::now();
        let comm = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((code, comm)) => {
                    api.check(code, &format!("rank {rank}: ncclCommInitRank"))?;
                    break comm;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    watchdog.check()?;
                    if started.elapsed() > timeout {
                        return Err(err(format!("rank {rank}: NCCL's set-up did not finish within {} s (VSFT_NCCL_TIMEOUT)", timeout.as_secs())));
                    }
                }
                Err(e) => return Err(err(format!("rank {rank}: NCCL's set-up thread ended: {e}"))),
            }
        };
        if rank == 0 {
            eprintln!(
                "vsft: NCCL {} ({}), {} ranks",
                api.version(),
                api.path,
                world.world_size
            );
        }
        Ok(NcclRanks {
            rank,
            world_size: world.world_size,
            api,
            comm: Mutex::new(Some(comm)),
            stream,
            device,
            watchdog,
            timeout,
        })
    }

    /// The job's liveness channel: report this rank's failure through it before exiting.
    pub fn watchdog(&self) -> &Watchdog {
        &self.watchdog
    }

    /// Runs `op` in place on `tensor` (staged through the GPU) and returns the result; `arg`
    /// is the all-reduce's operation or the broadcast's root.
    fn collective(&self, what: &str, tensor: Tensor<B, 1>, op: Collective, arg: i32) -> Result<Tensor<B, 1>, TrainError> {
        self.watchdog.check()?;
        let rank = self.rank;
        let host = tensor.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| err(format!("rank {rank}: {what}: reading the tensor: {e:?}")))?;
        let cuda = |e: cudarc::driver::DriverError| err(format!("rank {rank}: {what}: {e:?}"));
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let comm = guard.as_ref().ok_or_else(|| err(format!("rank {rank}: {what} after the communicator was aborted")))?.0;
        let n = host.len();
        let mut buf = self.stream.clone_htod(&host).map_err(cuda)?;
        {
            let (ptr, _written) = buf.device_ptr_mut(&self.stream);
            let ptr = ptr as *mut c_void;
            // SAFETY: in place on a live device buffer of `n` f32 on this rank's stream.
            let code = unsafe { op(ptr, ptr, n, NCCL_FLOAT32, arg, comm, self.stream.cu_stream() as RawStream) };
            if let Err(e) = self.api.check(code, &format!("rank {rank}: {what}")) {
                drop(guard);
                self.abort();
                return Err(e);
            }
        }
        drop(guard);
        self.wait(what)?;
        let out = self.stream.clone_dtoh(&buf).map_err(cuda)?;
        Ok(Tensor::from_data(TensorData::new(out, [n]), &self.device))
    }

    /// Waits for the stream, watching NCCL's asynchronous error, the watchdog and the timeout;
    /// aborts the communicator on any of them.
    fn wait(&self, what: &str) -> Result<(), TrainError> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: queries a live stream of this context.
            match unsafe { sys::cuStreamQuery(self.stream.cu_stream()) } {
                sys::CUresult::CUDA_SUCCESS => return Ok(()),
                sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.fail(format!("{what}: the GPU stream failed: {e:?}"))),
            }
            if let Some(code) = self.async_error() {
                return Err(self.fail(format!("{what}: {}", self.api.describe(code))));
            }
            if let Err(e) = self.watchdog.check() {
                self.abort();
                return Err(e);
            }
            if started.elapsed() > self.timeout {
                return Err(self.fail(format!(
                    "{what} did not finish within {} s (VSFT_NCCL_TIMEOUT): a rank is hung or took another code path",
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    fn async_error(&self) -> Option<NcclResult> {
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let comm = guard.as_ref()?.0;
        let mut code = NCCL_SUCCESS;
        // SAFETY: reads the communicator's state.
        unsafe { (self.api.comm_get_async_error)(comm, &mut code) };
        (code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS).then_some(code)
    }

    /// Aborts the communicator, tells the other ranks why, and returns the error.
    fn fail(&self, why: String) -> TrainError {
        self.abort();
        self.watchdog.report_failure(&why);
        err(format!("rank {}: {why}", self.rank))
    }

    /// `ncclCommAbort`: every pending collective of this rank returns.
    fn abort(&self) {
        if let Some(Handle(comm)) = self.comm.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: the handle is live and taken, so it is aborted once.
            unsafe { (self.api.comm_abort)(comm) };
        }
    }
}

impl<B: Backend> Drop for NcclRanks<B> {
    fn drop(&mut self) {
        if let Some(Handle(comm)) = self.comm.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: the handle is live; after a failure it was already taken by `abort`.
            unsafe { (self.api.comm_destroy)(comm) };
        }
    }
}

impl<B: Backend> Communicator<B> for NcclRanks<B> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, TrainError> {
        self.collective("all-reduce", tensor, self.api.all_reduce, NCCL_SUM)
    }
    fn broadcast_from_first(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>, TrainError> {
        self.collective("broadcast", tensor, self.api.broadcast, 0)
    }
}
