//! A minimal SIMD layer for the micro-kernels: one trait, one implementation per instruction set,
//! chosen at run time.
//!
//! Kernels are generic over a crate-private `Simd` trait and written with `#[inline(always)]` helpers; a thin
//! `#[target_feature]` entry point per instruction set instantiates them, so each instantiation is
//! compiled for its own ISA. [`Isa::detect`] picks the best one the CPU supports;
//! [`Isa::available`] lists all of them so that tests can run every path.

/// The instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable code on 4-lane arrays (vectorised by the compiler for the baseline target).
    Scalar,
    /// x86-64 AVX2 with FMA, 8 lanes.
    Avx2,
    /// x86-64 AVX-512F, 16 lanes.
    Avx512,
    /// AArch64 NEON, 4 lanes.
    Neon,
}

impl Isa {
    /// The best instruction set of this CPU. `COARSEN_ISA=scalar|avx2|avx512|neon` overrides it
    /// (an unavailable choice is ignored). Decided once per process: kernels ask per call and
    /// per row, where reading the environment each time cost more than the copies it chose.
    pub fn detect() -> Isa {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            if let Ok(v) = std::env::var("COARSEN_ISA") {
                if let Some(isa) = Isa::parse(&v).filter(|i| i.is_available()) {
                    return isa;
                }
            }
            *Isa::available().last().unwrap_or(&Isa::Scalar)
        })
    }

    /// Every instruction set this CPU supports, worst first.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }

    /// Whether this CPU supports it.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Parses `scalar`, `avx2`, `avx512` or `neon`.
    pub fn parse(s: &str) -> Option<Isa> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "neon" => Some(Isa::Neon),
            _ => None,
        }
    }

    /// The name `parse` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// f32 lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Scalar | Isa::Neon => 4,
            Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }
}

/// A vector instruction set as the kernels use it.
///
/// # Safety
/// Every method may only be called from code compiled for (and running on) that instruction set
/// (see [`run_task`]); loads and stores take raw pointers that must be valid for `LANES` floats.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// f32 lanes per vector.
    const LANES: usize;
    /// Rows of the register tile of the block micro-kernel.
    const MR: usize;
    /// Vectors per row of the register tile of the block micro-kernel.
    const NV: usize;
    /// A vector of f32.
    type V: Copy;

    /// All lanes zero.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Loads `LANES` floats from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// Stores `LANES` floats to `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a·b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a − b` (by default `(−1)·b + a` in one rounding: the same value).
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        Self::fma(Self::splat(-1.0), b, a)
    }
    /// Sum of the lanes.
    unsafe fn sum(v: Self::V) -> f32;
    /// All lanes `*p` (a broadcast load).
    #[inline(always)]
    unsafe fn bcast(p: *const f32) -> Self::V {
        Self::splat(*p)
    }
    /// Hints that the cache line holding `p` will be read soon (no effect where unsupported).
    #[inline(always)]
    unsafe fn prefetch(_p: *const f32) {}
}

/// Portable 4-lane arrays.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 4;
    const MR: usize = 4;
    const NV: usize = 2;
    type V = [f32; 4];

    #[inline(always)]
    unsafe fn zero() -> [f32; 4] {
        [0.0; 4]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; 4] {
        [x; 4]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 4] {
        std::ptr::read_unaligned(p as *const [f32; 4])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 4]) {
        std::ptr::write_unaligned(p as *mut [f32; 4], v)
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 4], b: [f32; 4], c: [f32; 4]) -> [f32; 4] {
        [
            a[0] * b[0] + c[0],
            a[1] * b[1] + c[1],
            a[2] * b[2] + c[2],
            a[3] * b[3] + c[3],
        ]
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]
    }
    #[inline(always)]
    unsafe fn sum(v: [f32; 4]) -> f32 {
        (v[0] + v[1]) + (v[2] + v[3])
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Simd;

    /// AVX2 + FMA, 8 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    impl Simd for Avx2 {
        const LANES: usize = 8;
        const MR: usize = 4;
        const NV: usize = 2;
        type V = __m256;

        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn bcast(p: *const f32) -> __m256 {
            _mm256_broadcast_ss(&*p)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }

    /// AVX-512F, 16 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512;

    impl Simd for Avx512 {
        const LANES: usize = 16;
        const MR: usize = 8;
        const NV: usize = 3;
        type V = __m512;

        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::Neon;

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::Simd;

    /// AArch64 NEON, 4 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Neon;

    impl Simd for Neon {
        const LANES: usize = 4;
        const MR: usize = 4;
        const NV: usize = 4;
        type V = float32x4_t;

        #[inline(always)]
        unsafe fn zero() -> float32x4_t {
            vdupq_n_f32(0.0)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> float32x4_t {
            vdupq_n_f32(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> float32x4_t {
            vld1q_f32(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: float32x4_t) {
            vst1q_f32(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
            vfmaq_f32(c, a, b)
        }
        #[inline(always)]
        unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            vaddq_f32(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: float32x4_t) -> f32 {
            vaddvq_f32(v)
        }
    }
}

/// Work generic over the instruction set. `run` must be `#[inline(always)]` (and so must
/// everything it calls), so that it is compiled inside the `#[target_feature]` entry point that
/// [`run_task`] picks.
pub(crate) trait SimdTask {
    /// The result.
    type Output;
    /// Runs the work with instruction set `S`.
    fn run<S: Simd>(self) -> Self::Output;
}

/// Runs `task` compiled for `isa`. `isa` must be available on this CPU (plans check this once).
#[inline]
pub(crate) fn run_task<T: SimdTask>(isa: Isa, task: T) -> T::Output {
    debug_assert!(isa.is_available(), "{isa:?} is not available");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: plans only hold instruction sets that `Isa::is_available` confirmed.
        Isa::Avx2 => unsafe { on_avx2(task) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { on_avx512(task) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { on_neon(task) },
        _ => task.run::<Scalar>(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2<T: SimdTask>(task: T) -> T::Output {
    task.run::<Avx2>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn on_avx512<T: SimdTask>(task: T) -> T::Output {
    task.run::<Avx512>()
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn on_neon<T: SimdTask>(task: T) -> T::Output {
    task.run::<Neon>()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Exercise;

    impl SimdTask for Exercise {
        type Output = (Vec<f32>, f32);
        #[inline(always)]
        fn run<S: Simd>(self) -> (Vec<f32>, f32) {
            exercise::<S>()
        }
    }

    #[inline(always)]
    fn exercise<S: Simd>() -> (Vec<f32>, f32) {
        let a: Vec<f32> = (0..S::LANES).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..S::LANES).map(|i| 2.0 + i as f32).collect();
        let mut out = vec![0.0; S::LANES];
        unsafe {
            let v = S::fma(S::load(a.as_ptr()), S::load(b.as_ptr()), S::splat(1.0));
            let v = S::add(v, S::bcast(&0.5));
            S::store(out.as_mut_ptr(), v);
            (out, S::sum(S::load(b.as_ptr())))
        }
    }

    #[test]
    fn every_available_isa_computes_the_same() {
        for isa in Isa::available() {
            let (v, s) = run_task(isa, Exercise);
            for (i, x) in v.iter().enumerate() {
                assert_eq!(*x, (i * (i + 2)) as f32 + 1.5, "{isa:?}");
            }
            let n = isa.lanes() as f32;
            assert_eq!(s, 2.0 * n + n * (n - 1.0) / 2.0, "{isa:?}");
        }
        assert!(Isa::available().contains(&Isa::detect()));
        assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
    }
}
