//! Text generation on the GPU with a KV cache, for every block the layer recorder knows: the
//! prompt is run once (prefill), then each new token runs one position through the layers,
//! attending to the cached keys and values. Sampling (greedy, temperature, top-k, top-p) happens
//! on the CPU over one row of logits.

use super::block::{Hooks, Keys, Recorder};
use super::head::Positions;
use super::{GpuModelError, LayerActivations, ParameterTensors};
use crate::adapter::Adapter;
use crate::gpu::{Context, DType, Readback, Step, Tensor};
use crate::model::arch::NormKind;
use crate::model::config::ModelConfig;
use crate::ops::elementwise::softcap_forward;
use crate::rng::Rng;

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

/// Scratch for up to `rows` new tokens at a time: one layer's activations shared by every layer
/// (generation keeps nothing for a backward pass), the residual stream, and the KV cache.
struct Scratch {
    ids: Tensor,             // (rows,) u32
    x: [Tensor; 2],          // (rows, C) residual stream, ping-pong between layers
    layer: LayerActivations, // rows of new tokens
    pos_ids: Tensor,         // (rows,) u32 absolute positions (learned positions)
    emb: Tensor,             // (rows, C) token embeddings before positions
    pos_emb: Tensor,         // (rows, C) position embeddings
    hf: Tensor,              // (rows, C) final norm
    meanf: Tensor,           // (rows,)
    rstdf: Tensor,           // (rows,)
    logits: Tensor,          // (rows, V)
    k_cache: Vec<Tensor>,    // L × (max_len, KV·hd)
    v_cache: Vec<Tensor>,    // L × (max_len, KV·hd)
}

/// Generates from a model whose weights are on the GPU, with an adapter's branch (unmerged)
/// when one is given.
pub struct Generator<'p> {
    config: ModelConfig,
    params: &'p ParameterTensors,
    adapter: Option<&'p dyn Adapter>,
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
        let (h, kv, v) = (c.hidden_size, c.num_kv_heads * c.head_dim, c.vocab_size);
        // The prompt goes through in chunks small enough for one logits binding.
        let fit = (ctx.limits().max_storage_binding / (v as u64 * 4)).max(1) as usize;
        let rows = max_len.min(fit).min(512);
        let t = |label: &str, shape: &[usize]| ctx.tensor(label, shape, DType::F32);
        let s = Scratch {
            ids: ctx.tensor("ids", &[rows], DType::U32)?,
            x: [t("x0", &[rows, h])?, t("x1", &[rows, h])?],
            layer: LayerActivations::scratch(ctx, c, rows)?,
            pos_ids: ctx.tensor("pos_ids", &[rows], DType::U32)?,
            emb: t("emb", &[rows, h])?,
            pos_emb: t("pos_emb", &[rows, h])?,
            hf: t("hf", &[rows, h])?,
            meanf: t("meanf", &[rows])?,
            rstdf: t("rstdf", &[rows])?,
            logits: t("logits", &[rows, v])?,
            k_cache: (0..c.num_layers).map(|_| t("k_cache", &[max_len, kv])).collect::<std::result::Result<_, _>>()?,
            v_cache: (0..c.num_layers).map(|_| t("v_cache", &[max_len, kv])).collect::<std::result::Result<_, _>>()?,
        };
        Ok(Generator { config: config.clone(), params, adapter: None, max_len, rows, s, pos: 0 })
    }

    /// Runs an adapter's branch beside the frozen weights (unmerged, as PEFT's unmerged
    /// inference), so that a base stored quantized generates with its adapter without an f32
    /// copy. Prompts then go through in chunks of at most the adapter's planned rows.
    pub fn with_adapter(mut self, adapter: &'p dyn Adapter) -> Result<Self> {
        if let Some(site) = adapter.sites().iter().find(|s| s.layer >= self.config.num_layers) {
            return Err(GpuModelError::Unsupported(format!("{} is not a layer of this model", site.module)));
        }
        self.rows = self.rows.min(adapter.rows());
        self.adapter = Some(adapter);
        Ok(self)
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
        // Views of the first n rows start at offset 0, so they need no alignment care.
        let r = |t: &Tensor| t.rows(0, n, 4);
        ctx.write_u32(&r(&s.ids)?, tokens)?;
        let rec =
            Recorder { ctx, config: c, hooks: Hooks { adapter: self.adapter, train: false }, attn: None, docs: None };
        let mut st = Step::new();
        let (pos_ids, emb, pos_emb) = (r(&s.pos_ids)?, r(&s.emb)?, r(&s.pos_emb)?);
        let learned = (!c.block.rope).then_some(Positions { ids: &pos_ids, pos: &pos_emb });
        if learned.is_some() {
            let positions: Vec<u32> = (pos..pos + n).map(|i| i as u32).collect();
            ctx.write_u32(&pos_ids, &positions)?;
        }
        rec.embed_forward(&mut st, p, &r(&s.ids)?, &r(&s.x[0])?, Some(&emb), learned)?;
        let la = s.layer.first_rows(n, c.num_heads)?;
        for (l, lp) in p.layers.iter().enumerate() {
            let (x_in, x_out) = (r(&s.x[l % 2])?, r(&s.x[(l + 1) % 2])?);
            let keys = Keys::Cache { k: &s.k_cache[l], v: &s.v_cache[l], pos };
            rec.layer_forward(&mut st, l, lp, &x_in, &la, keys, &x_out)?;
        }
        let (hf, meanf) = (r(&s.hf)?, r(&s.meanf)?);
        let mean = (c.block.norm == NormKind::Layer).then_some(&meanf);
        rec.norm_forward(&mut st, &r(&s.x[c.num_layers % 2])?, &p.norm, &hf, mean, &r(&s.rstdf)?)?;
        let head = p.lm_head.as_ref().unwrap_or(&p.embed);
        head.project(ctx, &mut st, &hf, &r(&s.logits)?)?;
        if let Some(cap) = c.block.final_softcap {
            softcap_forward(ctx, &mut st, cap as f32, &r(&s.logits)?)?;
        }
        ctx.run(&st)?;
        self.pos += n;
        Ok(())
    }

    /// Feeds the prompt, then samples up to `max_new` tokens (stopping after any token of `stop`), calling
    /// `on_token` with each new token as it is chosen. Returns the new tokens.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate(
        &mut self,
        ctx: &Context,
        prompt: &[u32],
        max_new: usize,
        sampling: Sampling,
        stop: &[u32],
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
        stop: &[u32],
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
            if stop.contains(&next) || i + 1 == max_new || self.pos >= self.max_len {
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
