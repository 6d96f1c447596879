//! The whole model forward pass on the CPU in f64, written as plainly as possible: the
//! reference the GPU model is checked against, itself checked against transformers' outputs.

use crate::model::{Arch, HostTensor, ModelConfig, ModelError, Weights};

/// Logits `(B, T, V)` for token ids `(B, T)`.
pub fn forward(w: &Weights, ids: &[Vec<u32>]) -> Result<Vec<Vec<Vec<f64>>>, ModelError> {
    ids.iter().map(|row| forward_row(w, row)).collect()
}

/// Mean next-token cross-entropy over every predicted position (labels = ids shifted by one),
/// as transformers computes it, with the number of positions.
pub fn loss(w: &Weights, ids: &[Vec<u32>]) -> Result<(f64, usize), ModelError> {
    let logits = forward(w, ids)?;
    let (mut sum, mut n) = (0.0, 0usize);
    for (row, lg) in ids.iter().zip(&logits) {
        for t in 0..row.len().saturating_sub(1) {
            sum += cross_entropy(&lg[t], row[t + 1] as usize);
            n += 1;
        }
    }
    Ok((sum / n.max(1) as f64, n))
}

/// `logsumexp(z) − z[target]`, computed stably.
pub fn cross_entropy(z: &[f64], target: usize) -> f64 {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    lse - z[target]
}

struct M<'a> {
    t: &'a HostTensor,
}

impl M<'_> {
    /// `y = x · Wᵀ` for W `(out, in)` (nn.Linear).
    fn linear(&self, x: &[f64]) -> Vec<f64> {
        let (out, inp) = (self.t.shape[0], self.t.shape[1]);
        (0..out).map(|o| (0..inp).map(|i| self.t.data[o * inp + i] as f64 * x[i]).sum()).collect()
    }
    /// `y = x · W + b` for W `(in, out)` (GPT-2's Conv1D).
    fn conv1d(&self, x: &[f64], b: &HostTensor) -> Vec<f64> {
        let (inp, out) = (self.t.shape[0], self.t.shape[1]);
        let mut y: Vec<f64> = b.data.iter().map(|&v| v as f64).collect();
        for (xi, row) in x.iter().zip(self.t.data.chunks_exact(out)).take(inp) {
            for (yo, &wv) in y.iter_mut().zip(row) {
                *yo += xi * wv as f64;
            }
        }
        y
    }
}

pub(crate) fn rmsnorm(x: &[f64], w: &HostTensor, eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(&w.data).map(|(v, &g)| v * r * g as f64).collect()
}

pub(crate) fn layernorm(x: &[f64], w: &HostTensor, b: &HostTensor, eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let r = 1.0 / (var + eps).sqrt();
    x.iter().zip(w.data.iter().zip(&b.data)).map(|(v, (&g, &bb))| (v - mean) * r * g as f64 + bb as f64).collect()
}

pub(crate) fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

pub(crate) fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Rotary embedding as transformers applies it: dimension i pairs with i + head_dim/2, rotated by
/// `pos · inv_freq[i]`.
pub(crate) fn rope(v: &mut [f64], pos: usize, inv_freq: &[f32]) {
    let hd = v.len();
    let half = hd / 2;
    for i in 0..half {
        let (s, c) = (pos as f64 * inv_freq[i] as f64).sin_cos();
        let (a, b) = (v[i], v[i + half]);
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

/// Causal softmax attention for one sequence. q: (T, H, hd), k/v: (T, KV, hd) as flat rows;
/// with a `window`, query t sees keys t − window < s ≤ t. Scores are scaled by `scale`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: usize,
    scale: f64,
) -> Vec<Vec<f64>> {
    let t_len = q.len();
    let group = heads / kv_heads;
    let mut out = vec![vec![0.0; heads * hd]; t_len];
    for (t, out_t) in out.iter_mut().enumerate() {
        for h in 0..heads {
            let kh = h / group;
            let qh = &q[t][h * hd..(h + 1) * hd];
            let first = if window > 0 { (t + 1).saturating_sub(window) } else { 0 };
            let scores: Vec<f64> = (first..=t)
                .map(|s| qh.iter().zip(&k[s][kh * hd..(kh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() * scale)
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (s, p) in (first..).zip(&e) {
                for d in 0..hd {
                    out_t[h * hd + d] += p / z * v[s][kh * hd + d];
                }
            }
        }
    }
    out
}

fn forward_row(w: &Weights, ids: &[u32]) -> Result<Vec<Vec<f64>>, ModelError> {
    let c = &w.config;
    let (emb_name, head_name) = embedding_names(c);
    let mut x = embed(w, emb_name, ids)?;
    for l in 0..c.num_layers {
        match c.arch {
            Arch::Llama => llama_layer(w, l, &mut x)?,
            Arch::Gpt2 => gpt2_layer(w, l, &mut x)?,
        }
    }
    let head = M { t: w.get(head_name)? };
    x.iter()
        .map(|xt| {
            let h = match c.arch {
                Arch::Llama => rmsnorm(xt, w.get("model.norm.weight")?, c.norm_eps),
                Arch::Gpt2 => {
                    layernorm(xt, w.get("transformer.ln_f.weight")?, w.get("transformer.ln_f.bias")?, c.norm_eps)
                }
            };
            Ok(head.linear(&h))
        })
        .collect()
}

/// The token-embedding and LM-head tensor names for the architecture (the same when tied).
fn embedding_names(c: &ModelConfig) -> (&'static str, &'static str) {
    match c.arch {
        Arch::Llama => {
            ("model.embed_tokens.weight", if c.tie_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" })
        }
        Arch::Gpt2 => {
            ("transformer.wte.weight", if c.tie_embeddings { "transformer.wte.weight" } else { "lm_head.weight" })
        }
    }
}

/// Each position's input row: its token's embedding, plus (GPT-2) its position's.
fn embed(w: &Weights, emb_name: &str, ids: &[u32]) -> Result<Vec<Vec<f64>>, ModelError> {
    let c = &w.config;
    let emb = w.get(emb_name)?;
    let width = c.hidden_size;
    Ok(ids
        .iter()
        .enumerate()
        .map(|(pos, &id)| {
            let id = id as usize;
            let mut row: Vec<f64> = emb.data[id * width..(id + 1) * width].iter().map(|&v| v as f64).collect();
            if c.arch == Arch::Gpt2 {
                let wpe = &w.tensors["transformer.wpe.weight"];
                for (r, &p) in row.iter_mut().zip(&wpe.data[pos * width..(pos + 1) * width]) {
                    *r += p as f64;
                }
            }
            row
        })
        .collect())
}

/// Llama decoder layer `l` applied to every position's row of `x` in place.
fn llama_layer(w: &Weights, l: usize, x: &mut [Vec<f64>]) -> Result<(), ModelError> {
    let c = &w.config;
    let g = |n: &str| w.get(n);
    let (hd, heads, kvh) = (c.head_dim, c.num_heads, c.num_kv_heads);
    let p = format!("model.layers.{l}");
    let inv_freq = c.layers[l].rope.inv_freq(hd);
    let ln1 = g(&format!("{p}.input_layernorm.weight"))?;
    let (wq, wk, wv, wo) = (
        M { t: g(&format!("{p}.self_attn.q_proj.weight"))? },
        M { t: g(&format!("{p}.self_attn.k_proj.weight"))? },
        M { t: g(&format!("{p}.self_attn.v_proj.weight"))? },
        M { t: g(&format!("{p}.self_attn.o_proj.weight"))? },
    );
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for (pos, xt) in x.iter().enumerate() {
        let h = rmsnorm(xt, ln1, c.norm_eps);
        let mut qt = wq.linear(&h);
        let mut kt = wk.linear(&h);
        for hh in 0..heads {
            rope(&mut qt[hh * hd..(hh + 1) * hd], pos, &inv_freq);
        }
        for hh in 0..kvh {
            rope(&mut kt[hh * hd..(hh + 1) * hd], pos, &inv_freq);
        }
        q.push(qt);
        k.push(kt);
        v.push(wv.linear(&h));
    }
    let att = attention(&q, &k, &v, heads, kvh, hd, c.layers[l].window, 1.0 / (hd as f64).sqrt());
    let ln2 = g(&format!("{p}.post_attention_layernorm.weight"))?;
    let (wg, wu, wd) = (
        M { t: g(&format!("{p}.mlp.gate_proj.weight"))? },
        M { t: g(&format!("{p}.mlp.up_proj.weight"))? },
        M { t: g(&format!("{p}.mlp.down_proj.weight"))? },
    );
    for (xt, at) in x.iter_mut().zip(&att) {
        for (a, b) in xt.iter_mut().zip(wo.linear(at)) {
            *a += b;
        }
        let h = rmsnorm(xt, ln2, c.norm_eps);
        let act: Vec<f64> = wg.linear(&h).into_iter().zip(wu.linear(&h)).map(|(a, b)| silu(a) * b).collect();
        for (a, b) in xt.iter_mut().zip(wd.linear(&act)) {
            *a += b;
        }
    }
    Ok(())
}

/// GPT-2 block `l` applied to every position's row of `x` in place.
fn gpt2_layer(w: &Weights, l: usize, x: &mut [Vec<f64>]) -> Result<(), ModelError> {
    let c = &w.config;
    let (hd, heads, width) = (c.head_dim, c.num_heads, c.hidden_size);
    let p = format!("transformer.h.{l}");
    let t = |n: &str| w.get(&format!("{p}.{n}"));
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for xt in x.iter() {
        let h = layernorm(xt, t("ln_1.weight")?, t("ln_1.bias")?, c.norm_eps);
        let qkv = M { t: t("attn.c_attn.weight")? }.conv1d(&h, t("attn.c_attn.bias")?);
        q.push(qkv[..width].to_vec());
        k.push(qkv[width..2 * width].to_vec());
        v.push(qkv[2 * width..].to_vec());
    }
    let att = attention(&q, &k, &v, heads, heads, hd, 0, 1.0 / (hd as f64).sqrt());
    for (xt, at) in x.iter_mut().zip(&att) {
        for (a, b) in xt.iter_mut().zip(M { t: t("attn.c_proj.weight")? }.conv1d(at, t("attn.c_proj.bias")?)) {
            *a += b;
        }
        let h = layernorm(xt, t("ln_2.weight")?, t("ln_2.bias")?, c.norm_eps);
        let f: Vec<f64> =
            M { t: t("mlp.c_fc.weight")? }.conv1d(&h, t("mlp.c_fc.bias")?).into_iter().map(gelu_tanh).collect();
        for (a, b) in xt.iter_mut().zip(M { t: t("mlp.c_proj.weight")? }.conv1d(&f, t("mlp.c_proj.bias")?)) {
            *a += b;
        }
    }
    Ok(())
}
