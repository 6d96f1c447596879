//! CPU twins of the GPU ops in f64, named like them. Only tests and benchmarks use these: they
//! are the independent reference every kernel is checked against.

pub mod model;

/// `op(A)·op(B)` for one (M, K) × (K, N) product; layouts as in `ops::matmul`.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, trans_a: bool, trans_b: bool) -> Vec<f64> {
    assert_eq!(a.len(), m * k, "A must hold M*K values");
    assert_eq!(b.len(), k * n, "B must hold K*N values");
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        for kk in 0..k {
            let av = if trans_a { a[kk * m + i] } else { a[i * k + kk] } as f64;
            for j in 0..n {
                let bv = if trans_b { b[j * k + kk] } else { b[kk * n + j] } as f64;
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
    x.iter().zip(y).map(|(&a, &b)| a as f64 + b as f64).collect()
}

pub fn scale(x: &[f32], alpha: f32) -> Vec<f64> {
    x.iter().map(|&a| alpha as f64 * a as f64).collect()
}

pub fn axpy(alpha: f32, x: &[f32], out: &[f32]) -> Vec<f64> {
    x.iter().zip(out).map(|(&a, &o)| o as f64 + alpha as f64 * a as f64).collect()
}

/// RMSNorm over rows of `x` `(rows, dim)`: (out, rstd).
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>) {
    let dim = w.len();
    let wt = crate::model::HostTensor { shape: vec![dim], data: w.to_vec() };
    let mut out = Vec::with_capacity(x.len());
    let mut rstd = Vec::new();
    for row in x.chunks(dim) {
        let r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        out.extend(model::rmsnorm(&r, &wt, eps));
        let ms = r.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        rstd.push(1.0 / (ms + eps).sqrt());
    }
    (out, rstd)
}

/// Rotary embedding of `x` `(rows, heads, head_dim)` with position `row % seq`, pair i rotated
/// by `position · inv_freq[i]`.
pub fn rope_forward(x: &[f32], seq: usize, heads: usize, head_dim: usize, inv_freq: &[f32]) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (row, chunk) in out.chunks_mut(heads * head_dim).enumerate() {
        for h in chunk.chunks_mut(head_dim) {
            model::rope(h, row % seq, inv_freq);
        }
    }
    out
}

/// LayerNorm over rows of `x` `(rows, dim)` (biased variance, as PyTorch).
pub fn layernorm_forward(x: &[f32], w: &[f32], b: &[f32], eps: f64) -> Vec<f64> {
    let dim = w.len();
    let wt = crate::model::HostTensor { shape: vec![dim], data: w.to_vec() };
    let bt = crate::model::HostTensor { shape: vec![dim], data: b.to_vec() };
    x.chunks(dim)
        .flat_map(|row| model::layernorm(&row.iter().map(|&v| v as f64).collect::<Vec<_>>(), &wt, &bt, eps))
        .collect()
}

/// GPT-2's GELU (tanh approximation).
pub fn gelu_forward(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| model::gelu_tanh(v as f64)).collect()
}

/// Causal GQA attention; q `(B, T, H, d)`, k/v `(B, T, KV, d)` → (out `(B, T, H, d)`, lse `(B, H, T)`).
/// With a `window`, query t sees keys t − window < s ≤ t; scores are scaled by `scale`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    window: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let rows = |x: &[f32], w: usize, b: usize| -> Vec<Vec<f64>> {
        (0..seq).map(|t| x[(b * seq + t) * w..(b * seq + t + 1) * w].iter().map(|&v| v as f64).collect()).collect()
    };
    let mut out = Vec::new();
    let mut lse = vec![0.0; batch * heads * seq];
    for b in 0..batch {
        let (qb, kb, vb) = (rows(q, heads * d, b), rows(k, kv_heads * d, b), rows(v, kv_heads * d, b));
        for o in model::attention(&qb, &kb, &vb, heads, kv_heads, d, window, scale) {
            out.extend(o);
        }
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            for t in 0..seq {
                let first = if window > 0 { (t + 1).saturating_sub(window) } else { 0 };
                let s: Vec<f64> = (first..=t)
                    .map(|s| (0..d).map(|i| qb[t][h * d + i] * kb[s][g * d + i]).sum::<f64>() * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lse[(b * heads + h) * seq + t] = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            }
        }
    }
    (out, lse)
}

/// `gelu_tanh(gate) · up` (Gemma's GeGLU).
pub fn geglu_forward(gate: &[f32], up: &[f32]) -> Vec<f64> {
    gate.iter().zip(up).map(|(&g, &u)| model::gelu_tanh(g as f64) * u as f64).collect()
}

/// `silu(gate) · up`.
pub fn swiglu_forward(gate: &[f32], up: &[f32]) -> Vec<f64> {
    gate.iter().zip(up).map(|(&g, &u)| model::silu(g as f64) * u as f64).collect()
}

/// Rows of `table` `(vocab, dim)` at `ids`.
pub fn embed_forward(ids: &[u32], table: &[f32], dim: usize) -> Vec<f64> {
    ids.iter().flat_map(|&i| table[i as usize * dim..(i as usize + 1) * dim].iter().map(|&v| v as f64)).collect()
}

/// Per-row cross-entropy of logits `(rows, vocab)`: (loss, lse); `u32::MAX` targets give 0.
pub fn xent_forward(logits: &[f32], targets: &[u32]) -> (Vec<f64>, Vec<f64>) {
    let vocab = logits.len() / targets.len();
    let mut loss = Vec::new();
    let mut lse = Vec::new();
    for (row, &t) in logits.chunks(vocab).zip(targets) {
        let z: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        lse.push(l);
        loss.push(if t == u32::MAX { 0.0 } else { l - z[t as usize] });
    }
    (loss, lse)
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

/// shaders/adapter.wgsl's integer hash (lowbias32).
fn hash32(v: u32) -> u32 {
    let mut h = v;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846ca68b);
    h ^= h >> 16;
    h
}

/// The multiplier dropout applies to element `i` (0 or `1 / (1 − p)`), exactly as
/// `dropout_forward` computes it on the GPU for the same seed and salt.
pub fn dropout_keep(seed: u32, salt: u32, i: u32, p: f32) -> f64 {
    let (threshold, keep_scale) = crate::ops::adapter::dropout_params(p);
    let h = hash32(i.wrapping_add(hash32(seed ^ hash32(salt))));
    if (h >> 8) < threshold {
        0.0
    } else {
        keep_scale as f64
    }
}
