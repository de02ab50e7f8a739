//! Element-wise math that the compiler can vectorise, and a way to run a loop with the
//! CPU's AVX2 and FMA units enabled.
//!
//! libm's `expf`, `tanhf` and `powf` are scalar calls, so a loop over them runs one
//! element at a time (they were ~15 % of a training step). `exp` below is branch-free
//! arithmetic (range reduction to [−ln2/2, ln2/2], a degree-6 polynomial, the exponent
//! written into the float's bits), relative error ≤ 2e-7, so a loop of it becomes
//! SIMD code. No crate offers this on stable Rust for f32 slices with a backward-
//! friendly API, hence written here.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude < 2²² to the nearest
/// integer with plain arithmetic (no libm `floorf` call, which blocks vectorisation).
const ROUND: f32 = 12_582_912.0;

/// e^x for f32, vectorisable. Finite inputs saturate: to e^−87.3 below −87.3 and to
/// e^88.3 above 88.3. Non-finite inputs give the exact answer: e^+∞ = +∞, e^−∞ = 0,
/// NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // The clamp written as two selects: a NaN fails both comparisons and becomes
    // −87.3, so `c` is always finite and in range (f32::clamp would keep the NaN, and
    // converting a NaN with `to_int_unchecked` is undefined behaviour). Both selects
    // compile to vmaxps / vminps.
    let c = if x > -87.3 { x } else { -87.3 };
    let c = if c < 88.3 { c } else { 88.3 };
    let n = (c * LOG2E + ROUND) - ROUND; // nearest integer, in −126 ..= 127
    let r = c - n * LN2_HI - n * LN2_LO; // |r| ≤ ln2/2
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // SAFETY: c is finite and in [−87.3, 88.3], so n is an integer in −126 ..= 127,
    // which fits an i32.
    let e = unsafe { n.to_int_unchecked::<i32>() } + 127;
    let y = p * f32::from_bits((e as u32) << 23);
    // Non-finite inputs, restored with selects (no branch, the loop stays vectorised):
    // −∞ → 0, +∞ → +∞, NaN → NaN (a NaN fails `x < 0`).
    let special = if x < 0.0 { 0.0 } else { x };
    if x.is_finite() {
        y
    } else {
        special
    }
}

/// tanh x = 1 − 2 / (e^{2x} + 1), vectorisable; absolute error ≤ 3e-7.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// The logistic function σ(x) = 1 / (1 + e^{−x}), vectorisable.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Σ f(x_j) with eight independent accumulators, so that the loop vectorises.
#[inline(always)]
pub(crate) fn sum8(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += f(c[k]);
        }
    }
    let tail: f32 = rest.iter().map(|&v| f(v)).sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The largest element (−∞ for an empty slice), eight lanes at a time.
#[inline(always)]
pub(crate) fn max8(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    rest.iter().fold(
        acc.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        |m, &v| m.max(v),
    )
}

/// Whether this CPU runs the AVX2 + FMA builds of the kernels (checked once; cached by
/// std's feature detection).
#[inline(always)]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a kernel function twice, once compiled for AVX2 + FMA (its loops vectorise
/// 8 floats wide) and once for the baseline, and picks one at run time. The body is an
/// `#[inline(always)]` function, so everything it calls from this module is compiled
/// into the AVX2 copy as well.
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::ops::simd::has_avx2() {
                // SAFETY: the CPU has the features `avx2` was compiled for.
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_tanh_sigmoid_match_libm() {
        let mut worst = (0f64, 0f64, 0f64);
        for i in -20000..=20000 {
            let x = i as f32 * 0.004; // −80 … 80
            let e = exp(x) as f64;
            let r = (x as f64).exp();
            worst.0 = worst.0.max(((e - r) / r).abs());
            let t = x / 8.0;
            worst.1 = worst.1.max((tanh(t) as f64 - (t as f64).tanh()).abs());
            let s = 1.0 / (1.0 + (-(t as f64)).exp());
            worst.2 = worst.2.max((sigmoid(t) as f64 - s).abs());
        }
        assert!(worst.0 < 3e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 5e-7, "tanh absolute error {}", worst.1);
        assert!(worst.2 < 3e-7, "sigmoid absolute error {}", worst.2);
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(exp(200.0).is_finite());
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
    }

    /// exp, tanh and sigmoid of every input, in one pass each.
    fn all_three(xs: &[f32]) -> [Vec<f32>; 3] {
        [
            xs.iter().map(|&x| exp(x)).collect(),
            xs.iter().map(|&x| tanh(x)).collect(),
            xs.iter().map(|&x| sigmoid(x)).collect(),
        ]
    }

    simd_kernel! {
        fn tanh_all(xs: &[f32]) -> Vec<f32> {
            xs.iter().map(|&x| tanh(x)).collect()
        }
    }

    simd_kernel! {
        /// The same loops through the run-time dispatch (the AVX2 copy on a CPU that
        /// has it).
        fn all_three_dispatched(xs: &[f32]) -> [Vec<f32>; 3] {
            all_three(xs)
        }
    }

    #[test]
    fn the_avx2_copy_gives_the_same_bits_as_scalar() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let plain: Vec<f32> = xs.iter().map(|&x| tanh(x)).collect();
        // Rust never contracts a·b + c into an FMA, so the vector code rounds alike.
        assert_eq!(plain, tanh_all(&xs));
    }

    /// The reference in f64: libm on the saturated input for finite x, the exact
    /// limits for ±∞, NaN for NaN.
    fn expected(x: f32) -> [f64; 3] {
        let x = x as f64;
        let e = if x.is_finite() {
            x.clamp(-87.3f32 as f64, 88.3f32 as f64).exp()
        } else {
            x.exp()
        };
        [e, x.tanh(), 1.0 / (1.0 + (-x).exp())]
    }

    #[test]
    fn non_finite_and_huge_inputs_are_well_defined_on_every_path() {
        let edge = |x: f32, ulps: i32| f32::from_bits((x.to_bits() as i32 + ulps) as u32);
        let mut special = vec![
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            88.7,
            -88.7,
            f32::MAX,
            f32::MIN,
            0.0,
            -0.0,
            1e-40, // subnormal
        ];
        // Either side of the clamp's edges, and 2x at them (tanh calls exp(2x)).
        for x in [88.3f32, -87.3, 44.15, -43.65] {
            special.extend((-2..=2).map(|u| edge(x, u)));
        }
        assert!(special.len() % 8 != 0);
        // Repeated so that each value lands in every lane of the vector loops, and
        // in their scalar remainder.
        let xs: Vec<f32> = special
            .iter()
            .copied()
            .cycle()
            .take(8 * special.len() + 3)
            .collect();
        let scalar: [Vec<f32>; 3] = {
            let mut out: [Vec<f32>; 3] = Default::default();
            for &x in &xs {
                // One element at a time, not through a loop the compiler vectorises.
                let x = std::hint::black_box(x);
                out[0].push(exp(x));
                out[1].push(tanh(x));
                out[2].push(sigmoid(x));
            }
            out
        };
        let paths = [
            ("scalar", scalar),
            ("baseline loop", all_three(&xs)),
            ("dispatched kernel", all_three_dispatched(&xs)),
        ];
        let names = ["exp", "tanh", "sigmoid"];
        for (path, got) in &paths {
            for (f, name) in names.iter().enumerate() {
                assert_eq!(got[f].len(), xs.len(), "{path} {name}");
                for (&x, &y) in xs.iter().zip(&got[f]) {
                    let want = expected(x)[f];
                    if want.is_nan() {
                        assert!(y.is_nan(), "{path}: {name}({x}) = {y}, want NaN");
                        continue;
                    }
                    let y = y as f64;
                    let ok = if want.is_infinite() || (f == 0 && want == 0.0) {
                        y == want
                    } else if f == 0 {
                        ((y - want) / want).abs() < 3e-7
                    } else {
                        (y - want).abs() < 5e-7
                    };
                    assert!(ok, "{path}: {name}({x:e}) = {y:e}, want {want:e}");
                }
            }
        }
        // Every path gives the same bits (NaN payloads aside).
        let bits = |v: &Vec<f32>| -> Vec<u32> {
            v.iter()
                .map(|y| if y.is_nan() { u32::MAX } else { y.to_bits() })
                .collect()
        };
        for (path, got) in &paths[1..] {
            for f in 0..3 {
                assert_eq!(bits(&got[f]), bits(&paths[0].1[f]), "{path} {}", names[f]);
            }
        }
    }
}
