//! An architecture as data: the description of one decoder block that the layer recorder
//! (`model::gpu::block`) follows, and of each layer's attention (window, rotary frequencies).
//! Families differ from LLaMA in small, composable ways (biases, per-head q/k norms, extra norms,
//! an activation, a window, rope scaling), so each family is a value of [`Block`] and
//! [`LayerSpec`]s, not a code path.

/// The families portalora loads (for messages and `inspect`; the computation follows [`Block`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
    Gpt2,
}

/// How a block normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm: `x / rms(x) · w` (LLaMA; Gemma's `· (1 + w)` is this with the weight plus one).
    Rms,
    /// LayerNorm with a bias: `(x − mean) / std · w + b` (GPT-2).
    Layer,
}

/// The MLP's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `down(silu(gate(x)) · up(x))` (LLaMA, Qwen, Mistral).
    SwiGlu,
    /// `down(gelu_tanh(gate(x)) · up(x))` (Gemma).
    GeGluTanh,
    /// `down(gelu_tanh(up(x)))`: no gate (GPT-2's c_fc → GELU → c_proj).
    GeluTanh,
}

impl Act {
    /// Whether the MLP has a gate projection beside its up projection.
    pub fn gated(self) -> bool {
        self != Act::GeluTanh
    }
}

/// One decoder block, as the recorder builds it:
/// `x + post1(attn(norm1(x)))`, then `+ post2(mlp(norm2(·)))` (the post-norms only where the
/// block has them, as Gemma does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block {
    pub norm: NormKind,
    /// Gemma's RMSNorms multiply by `1 + w`: the checkpoint holds `w`, the GPU `1 + w`.
    pub norm_plus_one: bool,
    /// Biases on q, k and v (GPT-2, Qwen2, LLaMA's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the attention output projection (GPT-2, LLaMA's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP's projections (GPT-2, LLaMA's `mlp_bias`).
    pub mlp_bias: bool,
    /// An RMSNorm over each head of q and of k before rotary (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norms after attention and after the MLP, before the residual adds (Gemma 3).
    pub post_norms: bool,
    pub act: Act,
    /// Rotary position embeddings on q and k; otherwise learned positions are added to the
    /// token embeddings (GPT-2).
    pub rope: bool,
    /// Weights in GPT-2's `Conv1D` layout `(in, out)`, so `y = x·W`; otherwise `nn.Linear`'s
    /// `(out, in)` and `y = x·Wᵀ`.
    pub conv1d: bool,
    /// The token embeddings are multiplied by √hidden (Gemma).
    pub embed_scale: bool,
    /// Attention scores are scaled by this instead of 1/√head_dim (Gemma 3's
    /// `query_pre_attn_scalar`^−½).
    pub attn_scale: Option<f64>,
    /// `logits = cap · tanh(logits / cap)` before the loss and sampling.
    pub final_softcap: Option<f64>,
}

impl Block {
    /// LLaMA and SmolLM2: RMSNorm, no biases, SwiGLU, rotary positions.
    pub const LLAMA: Block = Block {
        norm: NormKind::Rms,
        norm_plus_one: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        post_norms: false,
        act: Act::SwiGlu,
        rope: true,
        conv1d: false,
        embed_scale: false,
        attn_scale: None,
        final_softcap: None,
    };
    /// GPT-2: LayerNorm, biases everywhere, GELU (tanh), learned positions, `Conv1D` weights.
    pub const GPT2: Block = Block {
        norm: NormKind::Layer,
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        act: Act::GeluTanh,
        rope: false,
        conv1d: true,
        ..Block::LLAMA
    };
    /// Qwen2: LLaMA with biases on q, k and v.
    pub const QWEN2: Block = Block { qkv_bias: true, ..Block::LLAMA };
    /// Qwen3: LLaMA with per-head q/k RMSNorms.
    pub const QWEN3: Block = Block { qk_norm: true, ..Block::LLAMA };
    /// Gemma 3: `1 + w` RMSNorms, q/k norms, post-attention and post-MLP norms, GeGLU (tanh),
    /// embeddings scaled by √hidden.
    pub const GEMMA3: Block = Block {
        norm_plus_one: true,
        qk_norm: true,
        post_norms: true,
        act: Act::GeGluTanh,
        embed_scale: true,
        ..Block::LLAMA
    };
}

/// How rotary frequencies are rescaled for longer contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency divided by it).
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_positions: f64 },
    /// Per-frequency divisors as a GGUF's `rope_freqs.weight` stores them.
    Factors(Vec<f32>),
}

/// A layer's rotary embedding: the base and how it is scaled.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    pub fn plain(theta: f64) -> Rope {
        Rope { theta, scaling: None }
    }

    /// Llama 3's scaling parameters that reproduce per-frequency divisors (a GGUF's
    /// `rope_freqs.weight`), so that a config.json can describe them: `low_freq_factor` 1, as in
    /// every Llama 3 release, and the rest solved from the blended frequencies. `None` when no
    /// parameters reproduce the divisors.
    pub fn as_llama3(&self, head_dim: usize) -> Option<RopeScaling> {
        let Some(RopeScaling::Factors(div)) = &self.scaling else { return None };
        let wavelens: Vec<f64> =
            Rope::plain(self.theta).inv_freq(head_dim).iter().map(|f| std::f64::consts::TAU / *f as f64).collect();
        let factor = div.iter().fold(1.0f32, |a, b| a.max(*b)) as f64;
        let near = |d: f32, x: f64| (d as f64 - x).abs() <= 1e-4 * x;
        let of = |keep: &dyn Fn(f32) -> bool| -> Vec<(f64, f32)> {
            wavelens.iter().zip(div).filter(|(_, d)| keep(**d)).map(|(w, d)| (*w, *d)).collect()
        };
        let ones = of(&|d| near(d, 1.0));
        let full = of(&|d| near(d, factor));
        // Between the two bands 1/div = (1 − s)/factor + s, with s = (old/wavelen − low)/(high − low).
        let s = |d: f32| (1.0 / d as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
        let medium: Vec<(f64, f64)> =
            of(&|d| !near(d, 1.0) && !near(d, factor)).iter().map(|(w, d)| (1.0 / w, s(*d))).collect();
        let (high, old) = match medium.as_slice() {
            [(x0, s0), .., (x1, s1)] => {
                let a = (s1 - s0) / (x1 - x0);
                let high = 1.0 - 1.0 / (s0 - a * x0);
                (high, a * (high - 1.0))
            }
            [(x, s)] => (4.0, (1.0 + 3.0 * s) / x),
            [] => {
                // Any context between the bands: above 4× the longest kept wavelength, below the
                // shortest divided one.
                let lo = ones.iter().map(|(w, _)| 4.0 * w).fold(0.0, f64::max);
                let hi = full.iter().map(|(w, _)| *w).fold(f64::INFINITY, f64::min);
                (4.0, if hi.is_finite() { (lo.max(hi / 8.0) * hi).sqrt() } else { 2.0 * lo })
            }
        };
        let fit = RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: (high * 1e4).round() / 1e4,
            original_max_positions: old.round(),
        };
        let got = Rope { theta: self.theta, scaling: Some(fit.clone()) }.inv_freq(head_dim);
        let close = got.iter().zip(self.inv_freq(head_dim)).all(|(p, q)| (p - q).abs() <= 1e-5 * q.abs());
        (factor > 1.0 && close).then_some(fit)
    }

    /// The inverse frequencies of the `head_dim / 2` rotated pairs, in f32 steps as transformers
    /// computes them (`1 / theta^(2i/d)`, then the scaling).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let d = head_dim as f32;
        let base = self.theta as f32;
        let plain = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d));
        match &self.scaling {
            None => plain.collect(),
            Some(RopeScaling::Linear { factor }) => plain.map(|f| f / *factor as f32).collect(),
            Some(RopeScaling::Factors(div)) => plain.zip(div).map(|(f, d)| f / d).collect(),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions }) => {
                let (factor, low, high, old) =
                    (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original_max_positions as f32);
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                plain
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// What differs between a model's layers: the attention window and the rotary embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSpec {
    /// A sliding attention window (0: the whole causal prefix).
    pub window: usize,
    pub rope: Rope,
}
