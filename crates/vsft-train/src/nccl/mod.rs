//! NCCL for ranks in separate processes, one per GPU: the library, found and opened on every
//! build (so its search is tested on the CPU), and the communicator ([`NcclRanks`], with
//! `--features cuda`).
//!
//! libnccl is opened at run time, so the build needs neither CUDA nor NCCL: under the name that
//! pip's `nvidia-nccl-cu12/13` and the distributions' `libnccl2` ship (`libnccl.so.2`), then
//! `libnccl.so`, or the file `VSFT_NCCL_LIBRARY` names. (cudarc's own loader does not try
//! `libnccl.so.2`; the eight functions used here are NCCL's stable C API.)
//!
//! Rank 0 makes NCCL's unique id and hands it to the others through the TCP rendezvous
//! ([`crate::rendezvous`]), whose connections then stay open as the job's watchdog. Every
//! collective is launched on a stream of this rank's GPU and waited for by polling: the stream,
//! NCCL's asynchronous error, the watchdog (a peer that exited, was killed or failed) and a
//! timeout (`VSFT_NCCL_TIMEOUT`, 600 s as torch's). On any of those the communicator is
//! aborted (`ncclCommAbort`) and the step returns an error naming why: no rank hangs.
//!
//! The reduced tensors (a bucket of LoRA and projector gradients, tens of MB at 7B) are staged
//! through host memory; the device-to-device path through cubecl's buffers is the next step.

// Without `cuda` only the library search is used; the rest serves the communicator.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::ffi::{c_char, c_void, CStr};

use crate::error::TrainError;

#[cfg(feature = "cuda")]
mod ranks;
#[cfg(feature = "cuda")]
pub use ranks::NcclRanks;

type NcclResult = i32;
type NcclComm = *mut c_void;
/// `cudaStream_t` (a CUDA driver `CUstream`).
type RawStream = *mut c_void;
const NCCL_SUCCESS: NcclResult = 0;
/// `ncclInProgress`: a non-blocking call still running (not an error).
const NCCL_IN_PROGRESS: NcclResult = 7;
const NCCL_FLOAT32: i32 = 7;
const NCCL_SUM: i32 = 0;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UniqueId {
    pub(crate) internal: [u8; 128],
}

/// `ncclAllReduce(send, recv, count, datatype, op, comm, stream)`.
type Collective = unsafe extern "C" fn(*const c_void, *mut c_void, usize, i32, i32, NcclComm, RawStream) -> NcclResult;

/// The NCCL functions vsft calls, resolved once from the library.
struct Api {
    _lib: libloading::Library,
    path: String,
    get_version: unsafe extern "C" fn(*mut i32) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut NcclComm, i32, UniqueId, i32) -> NcclResult,
    all_reduce: Collective,
    /// `ncclBroadcast`: the same arguments, with the root's rank where all-reduce has the op.
    broadcast: Collective,
    comm_abort: unsafe extern "C" fn(NcclComm) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(NcclComm) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(NcclComm, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

/// The names tried, in order, after `VSFT_NCCL_LIBRARY`.
pub const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

fn err(msg: String) -> TrainError {
    TrainError::Other(msg)
}

/// Where libnccl is looked for, in order: the file `VSFT_NCCL_LIBRARY` names, then
/// [`LIBRARY_NAMES`].
pub fn library_candidates() -> Vec<String> {
    std::env::var("VSFT_NCCL_LIBRARY").into_iter().chain(LIBRARY_NAMES.iter().map(|s| s.to_string())).collect()
}

/// Opens the first of `names` that loads, as a rank does before training: its NCCL version and
/// the name it loaded, or an error naming every name tried and how to install NCCL.
pub fn probe_library(names: &[String]) -> Result<(String, String), TrainError> {
    let api = Api::open(names).map_err(err)?;
    Ok((api.version(), api.path.clone()))
}

/// The function `name` of `lib`, or which one is missing.
///
/// # Safety
/// `T` must be the function's C signature.
unsafe fn symbol<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
    let c_name = format!("{name}\0");
    unsafe { lib.get::<T>(c_name.as_bytes()) }.map(|f| *f).map_err(|_| format!("it has no {name}"))
}

impl Api {
    /// The library of [`library_candidates`], opened once per process.
    fn load() -> Result<&'static Api, TrainError> {
        static API: std::sync::OnceLock<Result<Api, String>> = std::sync::OnceLock::new();
        API.get_or_init(|| Api::open(&library_candidates())).as_ref().map_err(|m| err(m.clone()))
    }

    fn open(names: &[String]) -> Result<Api, String> {
        let mut tried = Vec::new();
        for name in names {
            // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Api::resolve(lib, name).map_err(|e| format!("{name}: {e}: not a usable NCCL library")),
                Err(e) => tried.push(format!("{name} ({e})")),
            }
        }
        Err(format!(
            "NCCL not found; tried {}. Install it (`pip install nvidia-nccl-cu12`, or the distribution's libnccl2) and put its directory on \
             LD_LIBRARY_PATH, or set VSFT_NCCL_LIBRARY to the file",
            tried.join(", ")
        ))
    }

    fn resolve(lib: libloading::Library, path: &str) -> Result<Api, String> {
        // SAFETY: the signatures are those of nccl.h (NCCL 2.x), whose C ABI is stable.
        unsafe {
            Ok(Api {
                get_version: symbol(&lib, "ncclGetVersion")?,
                get_unique_id: symbol(&lib, "ncclGetUniqueId")?,
                comm_init_rank: symbol(&lib, "ncclCommInitRank")?,
                all_reduce: symbol(&lib, "ncclAllReduce")?,
                broadcast: symbol(&lib, "ncclBroadcast")?,
                comm_abort: symbol(&lib, "ncclCommAbort")?,
                comm_destroy: symbol(&lib, "ncclCommDestroy")?,
                comm_get_async_error: symbol(&lib, "ncclCommGetAsyncError")?,
                get_error_string: symbol(&lib, "ncclGetErrorString")?,
                path: path.to_string(),
                _lib: lib,
            })
        }
    }

    fn describe(&self, code: NcclResult) -> String {
        // SAFETY: NCCL returns a static string for every code.
        let text = unsafe { (self.get_error_string)(code) };
        if text.is_null() {
            return format!("NCCL error {code}");
        }
        format!(
            "NCCL error {code}: {}",
            unsafe { CStr::from_ptr(text) }.to_string_lossy()
        )
    }

    fn check(&self, code: NcclResult, what: &str) -> Result<(), TrainError> {
        match code {
            NCCL_SUCCESS | NCCL_IN_PROGRESS => Ok(()),
            c => Err(err(format!("{what}: {}", self.describe(c)))),
        }
    }

    /// `2.21.5` from NCCL's 22105.
    fn version(&self) -> String {
        let mut v = 0;
        // SAFETY: writes one int.
        unsafe { (self.get_version)(&mut v) };
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    }
}

