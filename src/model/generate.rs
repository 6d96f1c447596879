//! Text generation on the GPU with a KV cache (LLaMA family and GPT-2): the prompt is run once (prefill), then each new
//! token runs one position through the layers, attending to the cached keys and values.
//! Sampling (greedy, temperature, top-k, top-p) happens on the CPU over one row of logits.

use super::config::ModelConfig;
use super::gpu::{GpuModelError, LayerParams, ParameterTensors};
use crate::gpu::{Context, DType, Readback, Step, Tensor};
use crate::ops::act::{gelu_forward, swiglu_forward};
use crate::ops::attention::attention_forward;
use crate::ops::elementwise::{add_forward, bias_forward, copy_forward};
use crate::ops::embed::embed_forward;
use crate::ops::matmul::{matmul, Matmul};
use crate::ops::norm::{layernorm_forward, rmsnorm_forward};
use crate::ops::rope::rope_forward;
use crate::reference::Rng;

type Result<T> = std::result::Result<T, GpuModelError>;

/// How the next token is chosen. `temperature == 0` is greedy (the most likely token).
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Scratch activations for up to `rows` new tokens at a time (shared by every layer: generation
/// keeps nothing for a backward pass) and the KV cache.
struct Scratch {
    ids: Tensor,          // (rows,) u32
    x: [Tensor; 2],       // (rows, C) residual stream, ping-pong between layers
    h: Tensor,            // (rows, C)
    rstd: Tensor,         // (rows,)
    mean: Tensor,         // (rows,)  LayerNorm mean (GPT-2)
    pos_ids: Tensor,      // (rows,) u32 absolute positions (GPT-2)
    emb: Tensor,          // (rows, C) token embeddings before positions (GPT-2)
    pos_emb: Tensor,      // (rows, C) position embeddings (GPT-2)
    q: Tensor,            // (rows, H·hd)
    k: Tensor,            // (rows, KV·hd)
    v: Tensor,            // (rows, KV·hd)
    q_rot: Tensor,        // (rows, H·hd)
    k_rot: Tensor,        // (rows, KV·hd)
    att: Tensor,          // (rows, H·hd)
    lse: Tensor,          // (H · rows,) used as (H, n) for n new rows
    o: Tensor,            // (rows, C)
    x_mid: Tensor,        // (rows, C)
    gate: Tensor,         // (rows, F)
    up: Tensor,           // (rows, F)
    act: Tensor,          // (rows, F)
    down: Tensor,         // (rows, C)
    logits: Tensor,       // (rows, V)
    k_cache: Vec<Tensor>, // L × (max_len, KV·hd)
    v_cache: Vec<Tensor>, // L × (max_len, KV·hd)
}

/// Generates from a model whose weights are on the GPU.
pub struct Generator<'p> {
    config: ModelConfig,
    params: &'p ParameterTensors,
    max_len: usize,
    rows: usize,
    s: Scratch,
    /// Positions already in the cache.
    pos: usize,
}

impl<'p> Generator<'p> {
    /// A generator for sequences of up to `max_len` tokens (prompt included).
    pub fn new(ctx: &Context, config: &ModelConfig, params: &'p ParameterTensors, max_len: usize) -> Result<Self> {
        if max_len > config.max_positions {
            return Err(GpuModelError::TooLong { seq: max_len, max: config.max_positions });
        }
        config.check_seq(max_len).map_err(GpuModelError::Unsupported)?; // a sliding window

        let c = config;
        let (h, q, kv, f, v) =
            (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, c.vocab_size);
        // The prompt goes through in chunks small enough for one logits binding.
        let fit = (ctx.limits().max_storage_binding / (v as u64 * 4)).max(1) as usize;
        let rows = max_len.min(fit).min(512);
        let t = |label: &str, shape: &[usize]| ctx.tensor(label, shape, DType::F32);
        let s = Scratch {
            ids: ctx.tensor("ids", &[rows], DType::U32)?,
            x: [t("x0", &[rows, h])?, t("x1", &[rows, h])?],
            h: t("h", &[rows, h])?,
            rstd: t("rstd", &[rows])?,
            mean: t("mean", &[rows])?,
            pos_ids: ctx.tensor("pos_ids", &[rows], DType::U32)?,
            emb: t("emb", &[rows, h])?,
            pos_emb: t("pos_emb", &[rows, h])?,
            q: t("q", &[rows, q])?,
            k: t("k", &[rows, kv])?,
            v: t("v", &[rows, kv])?,
            q_rot: t("q_rot", &[rows, q])?,
            k_rot: t("k_rot", &[rows, kv])?,
            att: t("att", &[rows, q])?,
            lse: t("lse", &[c.num_heads * rows])?,
            o: t("o", &[rows, h])?,
            x_mid: t("x_mid", &[rows, h])?,
            gate: t("gate", &[rows, f])?,
            up: t("up", &[rows, f])?,
            act: t("act", &[rows, f])?,
            down: t("down", &[rows, h])?,
            logits: t("logits", &[rows, v])?,
            k_cache: (0..c.num_layers).map(|_| t("k_cache", &[max_len, kv])).collect::<std::result::Result<_, _>>()?,
            v_cache: (0..c.num_layers).map(|_| t("v_cache", &[max_len, kv])).collect::<std::result::Result<_, _>>()?,
        };
        Ok(Generator { config: config.clone(), params, max_len, rows, s, pos: 0 })
    }

    /// Forgets the cached positions (a new sequence starts).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Runs `tokens` at the next positions and returns the logits after the last one.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn feed(&mut self, ctx: &Context, tokens: &[u32]) -> Result<Vec<f32>> {
        Ok(self.submit(ctx, tokens)?.wait()?)
    }

    /// [`Generator::feed`] for callers that cannot block (browsers).
    pub async fn feed_async(&mut self, ctx: &Context, tokens: &[u32]) -> Result<Vec<f32>> {
        Ok(self.submit(ctx, tokens)?.await?)
    }

    /// Submits `tokens` at the next positions; the readback yields the logits after the last one.
    fn submit(&mut self, ctx: &Context, tokens: &[u32]) -> Result<Readback> {
        if tokens.is_empty() {
            return Err(GpuModelError::Unsupported("feed needs at least one token".into()));
        }
        if self.pos + tokens.len() > self.max_len {
            return Err(GpuModelError::TooLong { seq: self.pos + tokens.len(), max: self.max_len });
        }
        if let Some((pos, &id)) = tokens.iter().enumerate().find(|&(_, &id)| id as usize >= self.config.vocab_size) {
            return Err(GpuModelError::BadId { id, row: 0, pos: self.pos + pos, vocab: self.config.vocab_size });
        }
        for chunk in tokens.chunks(self.rows) {
            self.run_chunk(ctx, chunk)?;
        }
        // Only the last row is read back (a copy needs 4-byte alignment, not 256).
        let n = tokens.len() - (tokens.len() - 1) / self.rows * self.rows;
        Ok(ctx.read(&self.s.logits.rows(n - 1, 1, 4)?)?)
    }

    fn run_chunk(&mut self, ctx: &Context, tokens: &[u32]) -> Result<()> {
        let c = &self.config;
        let (n, pos) = (tokens.len(), self.pos);
        let (p, s) = (self.params, &self.s);
        let (kvw, eps) = (c.num_kv_heads * c.head_dim, c.norm_eps as f32);
        // Views of the first n rows start at offset 0, so they need no alignment care.
        let r = |t: &Tensor| t.rows(0, n, 4);
        ctx.write_u32(&r(&s.ids)?, tokens)?;
        let mut st = Step::new();
        match &p.pos_embed {
            None => p.embed.embed(ctx, &mut st, &r(&s.ids)?, &r(&s.x[0])?)?,
            Some(wpe) => {
                let positions: Vec<u32> = (pos..pos + n).map(|i| i as u32).collect();
                ctx.write_u32(&r(&s.pos_ids)?, &positions)?;
                p.embed.embed(ctx, &mut st, &r(&s.ids)?, &r(&s.emb)?)?;
                embed_forward(ctx, &mut st, &r(&s.pos_ids)?, wpe, &r(&s.pos_emb)?)?;
                add_forward(ctx, &mut st, &r(&s.emb)?, &r(&s.pos_emb)?, &r(&s.x[0])?)?;
            }
        }
        let (rope_q, rope_k) = c.rope_shapes(n, pos);
        let shape = c.attention_shape(1, n, pos);
        let lse = s.lse.rows(0, c.num_heads * n, 4)?;
        let (h, rstd, mean) = (r(&s.h)?, r(&s.rstd)?, r(&s.mean)?);
        for (l, lp) in p.layers.iter().enumerate() {
            let (x_in, x_out) = (r(&s.x[l % 2])?, r(&s.x[(l + 1) % 2])?);
            let (q, k, v, att, o, x_mid) = (r(&s.q)?, r(&s.k)?, r(&s.v)?, r(&s.att)?, r(&s.o)?, r(&s.x_mid)?);
            let (gate, act, down) = (r(&s.gate)?, r(&s.act)?, r(&s.down)?);
            let kc = s.k_cache[l].rows(0, pos + n, 4)?;
            let vc = s.v_cache[l].rows(0, pos + n, 4)?;
            match lp {
                LayerParams::Llama(lp) => {
                    let (q_rot, k_rot) = (r(&s.q_rot)?, r(&s.k_rot)?);
                    rmsnorm_forward(ctx, &mut st, &x_in, &lp.ln1, eps, &h, &rstd)?;
                    matmul(ctx, &mut st, &h, &lp.wq, &q, Matmul::nt())?;
                    matmul(ctx, &mut st, &h, &lp.wk, &k, Matmul::nt())?;
                    matmul(ctx, &mut st, &h, &lp.wv, &v, Matmul::nt())?;
                    rope_forward(ctx, &mut st, rope_q, &q, &q_rot)?;
                    rope_forward(ctx, &mut st, rope_k, &k, &k_rot)?;
                    copy_forward(ctx, &mut st, &k_rot, &s.k_cache[l], pos * kvw)?;
                    copy_forward(ctx, &mut st, &v, &s.v_cache[l], pos * kvw)?;
                    attention_forward(ctx, &mut st, shape, &q_rot, &kc, &vc, &att, &lse)?;
                    matmul(ctx, &mut st, &att, &lp.wo, &o, Matmul::nt())?;
                    add_forward(ctx, &mut st, &x_in, &o, &x_mid)?;
                    rmsnorm_forward(ctx, &mut st, &x_mid, &lp.ln2, eps, &h, &rstd)?;
                    let up = r(&s.up)?;
                    matmul(ctx, &mut st, &h, &lp.w_gate, &gate, Matmul::nt())?;
                    matmul(ctx, &mut st, &h, &lp.w_up, &up, Matmul::nt())?;
                    swiglu_forward(ctx, &mut st, &gate, &up, &act)?;
                    matmul(ctx, &mut st, &act, &lp.w_down, &down, Matmul::nt())?;
                }
                LayerParams::Gpt2(lp) => {
                    layernorm_forward(ctx, &mut st, &x_in, &lp.ln1_w, &lp.ln1_b, eps, &h, &mean, &rstd)?;
                    for (w, b, out) in [(&lp.wq, &lp.bq, &q), (&lp.wk, &lp.bk, &k), (&lp.wv, &lp.bv, &v)] {
                        matmul(ctx, &mut st, &h, w, out, Matmul::nn())?;
                        bias_forward(ctx, &mut st, b, out)?;
                    }
                    copy_forward(ctx, &mut st, &k, &s.k_cache[l], pos * kvw)?;
                    copy_forward(ctx, &mut st, &v, &s.v_cache[l], pos * kvw)?;
                    attention_forward(ctx, &mut st, shape, &q, &kc, &vc, &att, &lse)?;
                    matmul(ctx, &mut st, &att, &lp.wo, &o, Matmul::nn())?;
                    bias_forward(ctx, &mut st, &lp.bo, &o)?;
                    add_forward(ctx, &mut st, &x_in, &o, &x_mid)?;
                    layernorm_forward(ctx, &mut st, &x_mid, &lp.ln2_w, &lp.ln2_b, eps, &h, &mean, &rstd)?;
                    matmul(ctx, &mut st, &h, &lp.w_fc, &gate, Matmul::nn())?;
                    bias_forward(ctx, &mut st, &lp.b_fc, &gate)?;
                    gelu_forward(ctx, &mut st, &gate, &act)?;
                    matmul(ctx, &mut st, &act, &lp.w_proj, &down, Matmul::nn())?;
                    bias_forward(ctx, &mut st, &lp.b_proj, &down)?;
                }
            }
            add_forward(ctx, &mut st, &x_mid, &down, &x_out)?;
        }
        let x_last = r(&s.x[c.num_layers % 2])?;
        match &p.norm_bias {
            None => rmsnorm_forward(ctx, &mut st, &x_last, &p.norm, eps, &h, &rstd)?,
            Some(b) => layernorm_forward(ctx, &mut st, &x_last, &p.norm, b, eps, &h, &mean, &rstd)?,
        }
        let head = p.lm_head.as_ref().unwrap_or(&p.embed);
        head.project(ctx, &mut st, &r(&s.h)?, &r(&s.logits)?)?;
        ctx.run(&st)?;
        self.pos += n;
        Ok(())
    }

    /// Feeds the prompt, then samples up to `max_new` tokens (stopping after `stop`), calling
    /// `on_token` with each new token as it is chosen. Returns the new tokens.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate(
        &mut self,
        ctx: &Context,
        prompt: &[u32],
        max_new: usize,
        sampling: Sampling,
        stop: Option<u32>,
        on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        crate::gpu::block_on(self.generate_async(ctx, prompt, max_new, sampling, stop, on_token))
    }

    /// [`Generator::generate`] for callers that cannot block (browsers).
    pub async fn generate_async(
        &mut self,
        ctx: &Context,
        prompt: &[u32],
        max_new: usize,
        sampling: Sampling,
        stop: Option<u32>,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        self.reset();
        let mut rng = Rng::new(sampling.seed);
        let mut logits = self.submit(ctx, prompt)?.await?;
        let mut out = Vec::with_capacity(max_new);
        for i in 0..max_new {
            let next = sample(&logits, sampling, &mut rng);
            out.push(next);
            on_token(next);
            if Some(next) == stop || i + 1 == max_new || self.pos >= self.max_len {
                break;
            }
            logits = self.submit(ctx, &[next])?.await?;
        }
        Ok(out)
    }
}

/// Picks a token from one row of logits.
pub fn sample(logits: &[f32], s: Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let m = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - m) / s.temperature as f64).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= s.top_p as f64
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(&idx) {
        acc += p;
        if u < acc {
            return i as u32;
        }
    }
    *idx.last().expect("at least one token") as u32
}
