//! CPU twins of the GPU ops in f64, named like them. Only tests and benchmarks use these: they
//! are the independent reference every kernel is checked against.

pub mod model;

/// `op(A)·op(B)` for one (M, K) × (K, N) product; layouts as in `ops::matmul`.
pub fn matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
) -> Vec<f64> {
    assert_eq!(a.len(), m * k, "A must hold M*K values");
    assert_eq!(b.len(), k * n, "B must hold K*N values");
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        for kk in 0..k {
            let av = if trans_a {
                a[kk * m + i]
            } else {
                a[i * k + kk]
            } as f64;
            for j in 0..n {
                let bv = if trans_b {
                    b[j * k + kk]
                } else {
                    b[kk * n + j]
                } as f64;
                c[i * n + j] += av * bv;
            }
        }
    }
    c
}

/// Sum (or mean) over the middle dimension of `x` viewed as (outer, d, inner).
pub fn reduce(x: &[f32], outer: usize, d: usize, inner: usize, mean: bool) -> Vec<f64> {
    assert_eq!(x.len(), outer * d * inner);
    let mut out = vec![0.0f64; outer * inner];
    for o in 0..outer {
        for dd in 0..d {
            for i in 0..inner {
                out[o * inner + i] += x[(o * d + dd) * inner + i] as f64;
            }
        }
    }
    if mean {
        out.iter_mut().for_each(|v| *v /= d as f64);
    }
    out
}

pub fn add(x: &[f32], y: &[f32]) -> Vec<f64> {
    x.iter()
        .zip(y)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect()
}

pub fn scale(x: &[f32], alpha: f32) -> Vec<f64> {
    x.iter().map(|&a| alpha as f64 * a as f64).collect()
}

pub fn axpy(alpha: f32, x: &[f32], out: &[f32]) -> Vec<f64> {
    x.iter()
        .zip(out)
        .map(|(&a, &o)| o as f64 + alpha as f64 * a as f64)
        .collect()
}

/// The largest error relative to the reference's scale: `max|got − want| / max(max|want|, tiny)`.
/// A per-element relative error is meaningless where `want` is near zero (sums of random signs);
/// scaling by the largest magnitude is the usual norm-wise criterion for matrix products.
pub fn max_rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        let e = (g as f64 - w).abs();
        if e.is_nan() || !(g as f64).is_finite() {
            f64::INFINITY
        } else {
            m.max(e / scale)
        }
    })
}

/// A small deterministic generator (SplitMix64) so tests need no extra crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}
