//! The compute backend, chosen at build time: Flex on the CPU by default (see README: the
//! fastest and most precise of Burn's CPU backends here), CUDA or WGPU with the cargo features.

#[cfg(feature = "cuda")]
pub type Compute = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type Compute = burn::backend::Wgpu;
#[cfg(all(feature = "ndarray", not(any(feature = "cuda", feature = "wgpu"))))]
pub type Compute = burn::backend::NdArray;
#[cfg(not(any(feature = "cuda", feature = "wgpu", feature = "ndarray")))]
pub type Compute = burn::backend::Flex;

pub type Train = burn::backend::Autodiff<Compute>;

pub fn device() -> burn::tensor::Device<Compute> {
    Default::default()
}

/// GPU `index` of this machine (a rank's `LOCAL_RANK`).
#[cfg(feature = "cuda")]
pub fn device_at(index: usize) -> burn::tensor::Device<Compute> {
    burn::backend::cuda::CudaDevice::new(index)
}

/// Bytes held by the device's memory pool (as `torch.cuda.memory_reserved`), on the cubecl
/// backends; `None` on the CPU, where the log has the process's peak RSS instead.
pub fn device_memory_reserved() -> Option<u64> {
    #[cfg(feature = "cuda")]
    type Runtime = cubecl::cuda::CudaRuntime;
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    type Runtime = burn::backend::wgpu::WgpuRuntime;
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        use cubecl::Runtime as _;
        return Runtime::client(&device()).memory_usage().ok().map(|u| u.bytes_reserved);
    }
    #[allow(unreachable_code)]
    None
}

pub fn name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if cfg!(feature = "ndarray-openblas") {
        "ndarray + openblas (cpu)"
    } else if cfg!(feature = "ndarray") {
        "ndarray (cpu)"
    } else {
        "flex (cpu)"
    }
}
