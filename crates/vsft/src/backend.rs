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
