//! From a generic Burn tensor to Flex storage and back, decided by the backend's type.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::ops::{Backward, OpsKind};
use burn_flex::{Flex, FlexTensor};

/// The autodiff backend the kernels register nodes on (no checkpointing strategy).
pub(crate) type FlexAd = burn_autodiff::Autodiff<Flex>;
/// `AutodiffTensor<Flex>` (burn-autodiff exports it only through the backend's associated type).
pub(crate) type AdTensor = burn::tensor::ops::FloatTensor<FlexAd>;

/// 0 = not read yet, 1 = on, 2 = off.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether the fused kernels are used (default on; `VSFT_FUSED=0` turns them off).
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("VSFT_FUSED").map(|v| v != "0").unwrap_or(true);
            ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

static CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many fused kernel calls this process has made (tests use it to prove the fused path ran).
pub fn fused_calls() -> usize {
    CALLS.load(Ordering::Relaxed)
}

/// Turns the fused kernels on or off for the whole process.
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

fn is_flex<B: Backend>() -> bool {
    let b = TypeId::of::<B>();
    b == TypeId::of::<Flex>() || b == TypeId::of::<FlexAd>()
}

/// True when the kernels would run on these tensors: enabled, Flex (plain or autodiff), f32.
pub fn supported<B: Backend, const D: usize>(tensors: &[&Tensor<B, D>]) -> bool {
    enabled() && is_flex::<B>() && tensors.iter().all(|t| t.dtype() == DType::F32)
}

/// A Flex tensor as the kernels see it: plain (inference) or carrying an autodiff node.
pub(crate) enum Host {
    Plain(FlexTensor),
    Tracked(AdTensor),
}

impl Host {
    pub(crate) fn flex(&self) -> &FlexTensor {
        match self {
            Host::Plain(t) => t,
            Host::Tracked(t) => &t.primitive,
        }
    }

    /// Moves the storage out (leaving an empty tensor), so that a kernel holding the only
    /// reference may write in place.
    pub(crate) fn take_flex(&mut self) -> FlexTensor {
        let slot = match self {
            Host::Plain(t) => t,
            Host::Tracked(t) => &mut t.primitive,
        };
        std::mem::replace(slot, FlexTensor::empty(vec![0].into(), DType::F32))
    }

    /// Whether backward will need this tensor's gradient.
    pub(crate) fn requires_grad(&self) -> bool {
        matches!(self, Host::Tracked(t) if t.is_tracked())
    }
}

/// Unwraps a tensor whose backend [`supported`] accepted.
pub(crate) fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Host {
    let boxed: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    match boxed.downcast::<FlexTensor>() {
        Ok(f) => Host::Plain(*f),
        Err(other) => Host::Tracked(*other.downcast::<AdTensor>().expect("checked by `supported`")),
    }
}

/// Wraps a kernel's result back into the caller's backend type.
pub(crate) fn from_host<B: Backend, const D: usize>(out: Host) -> Tensor<B, D> {
    CALLS.fetch_add(1, Ordering::Relaxed);
    give_back(out)
}

/// Wraps a tensor back into the caller's backend type without counting a kernel call (an
/// input handed back to a caller's composed path).
pub(crate) fn give_back<B: Backend, const D: usize>(out: Host) -> Tensor<B, D> {
    let boxed: Box<dyn Any> = match out {
        Host::Plain(t) => Box::new(t),
        Host::Tracked(t) => Box::new(t),
    };
    let prim = *boxed.downcast::<burn::tensor::ops::FloatTensor<B>>().expect("the backend was Flex or Autodiff<Flex>");
    Tensor::from_primitive(TensorPrimitive::Float(prim))
}

/// `out` as the result of `op` on `parents`: a tracked node when any parent needs a gradient
/// (then `state()` builds what backward keeps), an untracked one otherwise.
pub(crate) fn track<BO, S, const N: usize>(op: BO, parents: [&AdTensor; N], out: FlexTensor, state: impl FnOnce() -> S) -> AdTensor
where
    BO: Backward<Flex, N, State = S>,
    S: Clone + Send + std::fmt::Debug + 'static,
{
    match op.prepare::<NoCheckpointing>(parents.map(|t| t.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// A contiguous f32 view (copying only when the tensor is a strided view).
pub(crate) fn contiguous(t: &FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

pub(crate) fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

pub(crate) fn flex_from_vec(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// A tensor's values (tests).
#[cfg(test)]
pub(crate) fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().into_vec().unwrap()
}
