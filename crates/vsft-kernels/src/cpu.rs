//! Scalar building blocks the kernels share: a vectorisable `exp`, a strided GEMM call, and a
//! pointer that parallel tasks writing disjoint rows may share.

/// `exp(x)` for f32 without a libm call, so loops over it vectorise: Cody–Waite range
/// reduction to `r ∈ [−ln2/2, ln2/2]`, a degree-6 polynomial, and the exponent set by bits.
/// Relative error below 3e-7 over the range softmax uses; `x < −87` gives 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5·2^23 trick (branch-free, vectorises).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// `1 / (1 + exp(−x))`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Defines `fn $name` twice: as written, and compiled for AVX2+FMA behind a run-time check,
/// so the row loops below vectorise 8-wide without building the whole binary for one CPU.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[inline]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: this CPU has the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;

/// Lanes of the partial sums in the reductions below (in-order f32 sums do not vectorise).
const LANES: usize = 16;

multiversion! {
    /// The largest element (−∞ for an empty slice).
    pub(crate) fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a = a.max(x);
            }
        }
        acc.iter().fold(tail, |m, &x| m.max(x))
    }
}

multiversion! {
    /// `Σ x`.
    pub(crate) fn sum(xs: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// `Σ a·b`.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for ((acc, &x), &y) in acc.iter_mut().zip(x).zip(y) {
                *acc += x * y;
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// `x ← exp(x − m)`.
    pub(crate) fn exp_shifted(xs: &mut [f32], m: f32) {
        for x in xs.iter_mut() {
            *x = exp(*x - m);
        }
    }
}

multiversion! {
    /// `x ← exp(x − m)`, returning `Σ x` (one pass).
    pub(crate) fn exp_shifted_sum(xs: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                *x = exp(*x - m);
                *a += *x;
            }
        }
        let mut tail = 0f32;
        for x in chunks.into_remainder() {
            *x = exp(*x - m);
            tail += *x;
        }
        acc.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// `Σ exp(x − m)`, leaving `xs` as it is.
    pub(crate) fn sum_exp_shifted(xs: &[f32], m: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - m)).sum();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += exp(x - m);
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// `x ← x · s`.
    pub(crate) fn scale(xs: &mut [f32], s: f32) {
        for x in xs.iter_mut() {
            *x *= s;
        }
    }
}

/// A matrix view: base pointer, row stride, column stride (elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    pub fn rows(ptr: *const f32, rs: usize) -> Self {
        Self { ptr, rs: rs as isize, cs: 1 }
    }
    /// The transpose of a row-major view with row stride `rs`.
    pub fn t(ptr: *const f32, rs: usize) -> Self {
        Self { ptr, rs: 1, cs: rs as isize }
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + scale · lhs[m×k] · rhs[k×n]`, single-threaded (the
/// attention kernel parallelises over heads). `dst` is row-major with row stride `dst_rs`.
///
/// # Safety
/// Every view must be valid for the given sizes and `dst` must not alias `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, accumulate: bool, lhs: Mat, rhs: Mat, scale: f32) {
    gemm_with(m, n, k, dst, dst_rs, accumulate, lhs, rhs, scale, gemm::Parallelism::None)
}

/// [`gemm`] on every core (for the big projections), or on one below ~1 MFLOP.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_parallel(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, accumulate: bool, lhs: Mat, rhs: Mat, scale: f32) {
    let par = if m * n * k >= 1 << 20 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    gemm_with(m, n, k, dst, dst_rs, accumulate, lhs, rhs, scale, par)
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_with(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

/// `n` floats left uninitialised, for outputs a kernel writes in full: zero-filling 34 MB of
/// attention probabilities took longer than computing them.
pub(crate) fn alloc_uninit(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// The buffer from [`alloc_uninit`] as floats.
///
/// # Safety
/// Every element must have been written.
pub(crate) unsafe fn assume_init(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, layout, length and capacity; the caller initialised every element.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Read-only counterpart of [`SharedMut`].
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub *const f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }
}

#[cfg(test)]
mod gemm_speed {
    /// GEMM throughput on the benchmark's shapes (compare with torch's `a @ b.T` on the same
    /// machine): `cargo test --release -p vsft-kernels gemm_gflops -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn gemm_gflops() {
        for (m, n, k) in [(2048, 1408, 512), (2048, 512, 1408), (2048, 32064, 512), (2048, 512, 32064), (1024, 1024, 1024)] {
            let a = vec![1.0f32; m * k];
            let b = vec![1.0f32; k * n];
            let mut c = vec![0.0f32; m * n];
            // SAFETY: the views cover exactly the buffers.
            let run = |c: &mut Vec<f32>| unsafe {
                super::gemm_parallel(m, n, k, c.as_mut_ptr(), n, false, super::Mat::rows(a.as_ptr(), k), super::Mat::t(b.as_ptr(), k), 1.0)
            };
            run(&mut c);
            let t = std::time::Instant::now();
            let reps = 5;
            for _ in 0..reps {
                run(&mut c);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!("{m}x{n}x{k}: {:.1} GFLOP/s", 2.0 * (m * n * k) as f64 / s / 1e9);
        }
    }
}
