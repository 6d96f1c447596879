//! Adapters: the trainable branches added to a frozen model's linear projections
//! (`docs/METHODS.md` defines each method exactly).
//!
//! One small trait, [`Adapter`], and one file per method: [`lora`] (also what LoRA+ trains),
//! [`lora_fa`] (frozen A; keeps only `z = x·Aᵀ` for backward), [`vera`] (shared frozen pair,
//! trained scale vectors), [`delta_lora`] (LoRA plus an after-step update of the frozen weight),
//! [`dora`] (LoRA plus a trained magnitude per output row) and [`lora_plus`] (an optimizer
//! setting: parameter groups). [`peft`] reads and writes PEFT's
//! files.
//!
//! Conventions, for every method:
//! - An adapted projection is a [`Site`]: a layer, a projection, its input width and its output
//!   parts. Output parts exist because GPT-2's fused `c_attn` (q, k and v, 3·C outputs) is split
//!   into three projections on the GPU; an adapter keeps its B (or λ_b) as one tensor per part and
//!   joins them back into PEFT's single tensor when saving.
//! - Adapter matrices keep `nn.Linear`'s orientation whatever the base layout: A `(r, in)`,
//!   B `(out, r)`.
//! - Forward adds the branch into the projection's output (`y += …`); backward writes (`=`) the
//!   adapter's parameter gradients and adds (`+=`) its input gradient into the projection's `dx`.
//! - Activations are `(N, ·)` rows with N = batch · seq tokens, as in the model.

pub mod delta_lora;
pub mod dora;
pub mod lora;
pub mod lora_fa;
pub mod lora_plus;
pub mod peft;
mod peft_gguf;
mod sites;
pub mod vera;

pub use sites::{all_targets, check_rank, sites, valid_targets, Input, Proj, Site};

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::gpu::{Context, DType, GpuError, Step, Tensor};
use crate::model::config::Arch;
use crate::model::weights::HostTensor;
use crate::ops::matmul::{matmul, Matmul};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("unknown target module {name:?} for a {arch:?} model; valid targets: {valid}")]
    UnknownTarget { name: String, arch: Arch, valid: String },
    #[error("no target modules given; valid targets for a {arch:?} model: {valid}")]
    NoTargets { arch: Arch, valid: String },
    #[error("rank {rank} does not fit {module} ({in_features} → {out_features}); use 1 ≤ r ≤ {max}")]
    Rank { rank: usize, module: String, in_features: usize, out_features: usize, max: usize },
    #[error("{0}")]
    Option(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("the adapter in {adapter} does not fit the base model {model} (made for another model?)")]
    Mismatch {
        adapter: String,
        model: String,
        #[source]
        source: Box<AdapterError>,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// Writing JSON out.
    #[error(transparent)]
    Serialize(#[from] serde_json::Error),
    #[error(transparent)]
    Gguf(#[from] crate::io::gguf::GgufError),
    #[error(transparent)]
    Model(#[from] crate::model::weights::ModelError),
    /// A GGUF LoRA file that is not one portalora reads.
    #[error("{0}")]
    GgufLora(#[source] Box<crate::model::gguf_export::ExportError>),
    /// Writing safetensors bytes (`what`: the tensor or the file).
    #[error("{what}: {source}")]
    Safetensors {
        what: String,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{option} {pattern:?} is not a regular expression: {source}")]
    Regex {
        option: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    /// A merged folder's `config.json` written for a base that has none (a GGUF file).
    #[error("cannot write {dir}/config.json for the base {base}: {source}")]
    HfConfig {
        dir: std::path::PathBuf,
        base: std::path::PathBuf,
        #[source]
        source: Box<crate::model::weights::ModelError>,
    },
}

pub type Result<T> = std::result::Result<T, AdapterError>;

/// The six methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Lora,
    LoraFa,
    Vera,
    DeltaLora,
    LoraPlus,
    Dora,
}

impl Method {
    pub const ALL: [Method; 6] =
        [Method::Lora, Method::LoraFa, Method::Vera, Method::DeltaLora, Method::LoraPlus, Method::Dora];
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::LoraFa => "lora-fa",
            Method::Vera => "vera",
            Method::DeltaLora => "delta-lora",
            Method::LoraPlus => "lora-plus",
            Method::Dora => "dora",
        }
    }
    /// Whether the method trains an A/B pair (everything but VeRA).
    pub fn is_lora(self) -> bool {
        self != Method::Vera
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = AdapterError;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL.into_iter().find(|m| m.name() == s.to_ascii_lowercase().replace('_', "-")).ok_or_else(|| {
            AdapterError::Option(format!(
                "unknown method {s:?}; use one of {}",
                Method::ALL.map(|m| m.name()).join(", ")
            ))
        })
    }
}

/// How A (LoRA) starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// PEFT's default: kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(in)).
    Kaiming,
    /// PEFT's `init_lora_weights="gaussian"`: N(0, 1/r).
    Gaussian,
}

impl FromStr for Init {
    type Err = AdapterError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kaiming" | "kaiming-uniform" | "default" => Ok(Init::Kaiming),
            "gaussian" => Ok(Init::Gaussian),
            _ => Err(AdapterError::Option(format!("unknown init {s:?}; use kaiming or gaussian"))),
        }
    }
}

/// Everything that defines an adapter (the optimizer's settings live in `train`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterConfig {
    pub method: Method,
    pub rank: usize,
    /// LoRA's alpha; the branch is scaled by alpha / r (alpha / sqrt(r) with rsLoRA). VeRA has no scale.
    pub alpha: f64,
    pub rslora: bool,
    /// Dropout on the adapter branch's input (Delta-LoRA removes it).
    pub dropout: f32,
    /// Module-name suffixes, as PEFT's `target_modules`.
    pub targets: Vec<String>,
    pub init: Init,
    /// Seed of the random init and of the dropout masks.
    pub seed: u64,
    /// VeRA: λ_d's initial value.
    pub vera_d_initial: f64,
    /// VeRA: the shared pair's seed (PEFT's projection_prng_key; recorded in the config).
    pub vera_seed: u64,
    /// Delta-LoRA: λ, the scale of W0's update.
    pub delta_lambda: f64,
    /// Delta-LoRA: the warm-up steps K (W0 is updated after steps t > K).
    pub delta_warmup: u64,
    /// LoRA-FA: PEFT's projected optimizer (`create_lorafa_optimizer`).
    pub lorafa_projected: bool,
    /// PEFT's `rank_pattern`: (pattern, rank) in the file's order; the first pattern that matches
    /// a module's name as PEFT matches it (`(.*\.)?(pattern)$`, a regular expression) sets that
    /// module's rank. LoRA family only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_pattern: Vec<(String, usize)>,
    /// PEFT's `alpha_pattern`, matched the same way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpha_pattern: Vec<(String, f64)>,
    /// PEFT's `layers_to_transform`: only these decoder layers are adapted (None: every layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
    /// PEFT's `target_modules` written as one regular expression (a string rather than a list):
    /// a module is adapted when its whole name matches. Used instead of `targets` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_regex: Option<String>,
}

impl AdapterConfig {
    /// PEFT's defaults for `method` (VeRA: r = 256).
    pub fn new(method: Method) -> Self {
        AdapterConfig {
            method,
            rank: crate::run::DEFAULTS.rank_of(method),
            alpha: crate::run::DEFAULTS.alpha,
            rslora: false,
            dropout: crate::run::DEFAULTS.dropout,
            targets: Vec::new(),
            init: Init::Kaiming,
            seed: crate::run::DEFAULTS.seed,
            vera_d_initial: 0.1,
            vera_seed: 0,
            delta_lambda: crate::run::DEFAULTS.delta_lambda,
            delta_warmup: crate::run::DEFAULTS.delta_warmup,
            lorafa_projected: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            layers: None,
            target_regex: None,
        }
    }

    /// The branch's scale s: alpha / r, or alpha / sqrt(r) with rsLoRA (1 for VeRA).
    pub fn scale(&self) -> f64 {
        match (self.method, self.rslora) {
            (Method::Vera, _) => 1.0,
            (_, true) => self.alpha / (self.rank as f64).sqrt(),
            (_, false) => self.alpha / self.rank as f64,
        }
    }

    /// Checks the values, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(AdapterError::Option(m));
        if self.rank == 0 {
            return bad("rank 0: use --rank 1 or more".into());
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad(format!("alpha {} must be a positive number", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if !self.vera_d_initial.is_finite() {
            return bad(format!("VeRA d_initial {} is not a number", self.vera_d_initial));
        }
        if !self.delta_lambda.is_finite() {
            return bad(format!("Delta-LoRA lambda {} is not a number", self.delta_lambda));
        }
        if self.method == Method::DeltaLora && self.dropout > 0.0 {
            return bad(format!(
                "dropout {}: Delta-LoRA has no dropout on its branch (its update of W0 assumes none); use 0",
                self.dropout
            ));
        }
        if self.method == Method::Vera && !(self.rank_pattern.is_empty() && self.alpha_pattern.is_empty()) {
            return bad("rank_pattern / alpha_pattern are LoRA options; VeRA has one shared rank".into());
        }
        for (p, r) in &self.rank_pattern {
            sites::regex(p, "rank_pattern")?;
            if *r == 0 {
                return bad(format!("rank_pattern {p:?}: rank 0; use 1 or more"));
            }
        }
        for (p, a) in &self.alpha_pattern {
            sites::regex(p, "alpha_pattern")?;
            if !a.is_finite() || *a <= 0.0 {
                return bad(format!("alpha_pattern {p:?}: alpha {a} must be a positive number"));
            }
        }
        Ok(())
    }
}

/// A site's frozen base weights on the GPU, one per output part, in the base layout.
pub struct SiteWeights<'a> {
    pub parts: Vec<&'a Tensor>, // Linear: (out_j, in); Conv1D: (in, out_j)
    pub conv1d: bool,
}

/// A site's tensors in backward: its input `x` `(N, in)` and outputs `ys` (bias included) as in
/// forward (the model keeps `ys` for backward only where an adapter reads them: DoRA), its
/// outputs' gradients `dys`, and the input gradient `dx` `(N, in)` its term is added into.
pub struct SiteBackward<'a> {
    pub x: &'a Tensor,
    pub ys: &'a [&'a Tensor],
    pub dys: &'a [&'a Tensor],
    pub dx: &'a Tensor,
}

/// A site's frozen weight parts and biases (shared GPU tensors, not copies), for
/// [`Adapter::bind`].
pub struct SiteBase {
    pub parts: Vec<Tensor>, // Linear: (out_j, in); Conv1D: (in, out_j)
    pub biases: Vec<Option<Tensor>>,
    pub conv1d: bool,
}

/// Which optimizer group a trainable tensor belongs to (LoRA+ gives B and vectors their own rate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    A,
    B,
    /// 1-D parameters (VeRA's λ_b, λ_d).
    Vector,
}

/// One trainable tensor and its gradient (same shape).
pub struct Param<'a> {
    pub name: String,
    pub kind: ParamKind,
    pub value: &'a Tensor,
    pub grad: &'a Tensor,
}

/// One tensor of PEFT's file: its key, its full shape, and the GPU tensors holding its row parts
/// (several only for GPT-2's c_attn B / λ_b).
pub struct Slot<'a> {
    pub key: String,
    pub shape: Vec<usize>,
    pub parts: Vec<&'a Tensor>,
}

/// An adapter attached to a model's projections.
pub trait Adapter {
    fn config(&self) -> &AdapterConfig;
    fn sites(&self) -> &[Site];
    /// Records `y_j += branch_j(x)` for site `i` (`ys` one tensor per output part, `(N, out_j)`).
    /// Dropout applies only when `train`.
    fn forward(&self, ctx: &Context, s: &mut Step, i: usize, x: &Tensor, ys: &[&Tensor], train: bool) -> Result<()>;
    /// The LoRA branch's first product for site `i`, `z = x·Aᵀ`, as (A `(r, in)`, z `(N, r)`),
    /// where it may be fused into the frozen projection's matmul (no dropout on x in this pass).
    /// The model then calls [`Adapter::forward_fused`] instead of [`Adapter::forward`].
    fn fusable_input_product(&self, _i: usize, _train: bool) -> Option<(&Tensor, &Tensor)> {
        None
    }
    /// [`Adapter::forward`] for a site whose `z` the frozen matmul already wrote.
    fn forward_fused(&self, _ctx: &Context, _s: &mut Step, i: usize, _ys: &[&Tensor]) -> Result<()> {
        Err(AdapterError::Option(format!("site {i}: this adapter has no fused forward")))
    }
    /// Records the parameter gradients of site `i` from `io.dys` (`=`) and adds its input
    /// gradient into `io.dx` (`+=`).
    fn backward(&self, ctx: &Context, s: &mut Step, i: usize, io: &SiteBackward) -> Result<()>;
    /// Records, before the frozen input-gradient product of site `i`, the output gradients that
    /// product should use instead of `dys` (DoRA without dropout: `g ⊙ dy`, its magnitude's
    /// gradient taken from `dy` and `ys` on the way); [`Adapter::backward`] then gets them as
    /// its `dys`. `None`: the product uses `dys` as they are.
    fn scaled_output_grads(
        &self,
        _ctx: &Context,
        _s: &mut Step,
        _i: usize,
        _ys: &[&Tensor],
        _dys: &[&Tensor],
    ) -> Result<Option<Vec<Tensor>>> {
        Ok(None)
    }
    /// Called when the adapter is attached to a model, with every site's frozen weight parts and
    /// biases as the GPU holds them (DoRA's norms and its scaled base product read them).
    fn bind(&mut self, _ctx: &Context, _bases: Vec<SiteBase>) -> Result<()> {
        Ok(())
    }
    /// Whether backward reads the site's input `x` (else the plan need not keep it).
    fn needs_input(&self) -> bool;
    /// The trainable tensors with their gradients.
    fn params(&self) -> Vec<Param<'_>>;
    /// The tensors saved in PEFT's file (trainable and frozen).
    fn slots(&self) -> Vec<Slot<'_>>;
    /// Bytes of adapter-owned activations kept from forward to backward (z per site).
    fn kept_bytes(&self) -> u64;
    /// The rows (tokens) its activations were planned for: [`Adapter::forward`] takes up to this
    /// many (generation runs fewer at a time than training).
    fn rows(&self) -> usize;
    /// The one-element u32 tensor of the dropout seed, rewritten before each step (None without dropout).
    fn dropout_seed(&self) -> Option<&Tensor> {
        None
    }
    /// Called after `tensors` (keyed as [`Adapter::slots`]) were written into the slots (file
    /// load): refresh derived state, in place (recorded steps hold the tensors).
    fn loaded(&mut self, _ctx: &Context, _tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
        Ok(())
    }
    /// Records work before the optimizer step (Delta-LoRA keeps the old A and B).
    fn before_update(&self, _ctx: &Context, _s: &mut Step) -> Result<()> {
        Ok(())
    }
    /// Records the after-step hook (Delta-LoRA's W0 update); `weights` has one entry per site.
    fn after_update(&self, _ctx: &Context, _s: &mut Step, _weights: &[SiteWeights]) -> Result<bool> {
        Ok(false)
    }
    /// Records `W0 += sign · ΔW` for every site (merge with +1, unmerge with −1).
    fn merge(&self, ctx: &Context, s: &mut Step, weights: &[SiteWeights], sign: f32) -> Result<()>;
}

/// Builds the adapter of `cfg.method` for `sites` of a model run on `n` tokens at a time, with a
/// seeded random init (PEFT's, in our own random stream).
pub fn build(ctx: &Context, cfg: &AdapterConfig, sites: Vec<Site>, n: usize) -> Result<Box<dyn Adapter>> {
    cfg.validate()?;
    let _kind = ctx.alloc_kind("adapters");
    if cfg.method.is_lora() {
        // VeRA's rank is the shared pair's and may exceed a layer's dimensions (PEFT: r = 256).
        check_rank(cfg, &sites)?;
    }
    Ok(match cfg.method {
        Method::Lora | Method::LoraPlus => Box::new(lora::Lora::new(ctx, cfg, sites, n, true)?),
        Method::LoraFa => Box::new(lora_fa::new(ctx, cfg, sites, n)?),
        Method::DeltaLora => Box::new(delta_lora::DeltaLora::new(ctx, cfg, sites, n)?),
        Method::Vera => Box::new(vera::Vera::new(ctx, cfg, sites, n)?),
        Method::Dora => Box::new(dora::Dora::new(ctx, cfg, sites, n)?),
    })
}

/// `W += alpha · B A` in the base layout (Linear `(out, in)`: `B·A`; Conv1D `(in, out)`: `Aᵀ·Bᵀ`).
pub(crate) fn add_product(
    ctx: &Context,
    s: &mut Step,
    b: &Tensor,
    a: &Tensor,
    w: &Tensor,
    conv1d: bool,
    alpha: f32,
) -> Result<()> {
    if conv1d {
        matmul(ctx, s, a, b, w, Matmul { trans_a: true, trans_b: true, ..Matmul::nn() }.alpha(alpha).accumulate(true))?;
    } else {
        matmul(ctx, s, b, a, w, Matmul::nn().alpha(alpha).accumulate(true))?;
    }
    Ok(())
}

/// The first `n` rows of an activation planned for more (a view; the whole tensor when `n` is its
/// row count), for a forward pass over fewer tokens than the plan's (generation).
pub(crate) fn first_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    Ok(if t.shape()[0] == n { t.clone() } else { t.rows(0, n, 4)? })
}

/// A scratch tensor of `len` elements viewed as `(rows, cols)` (rows · cols ≤ len): one buffer
/// serves every site's transient of that role.
pub(crate) fn scratch_view(t: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    let flat = t.reshape(&[t.numel(), 1])?;
    Ok(flat.rows(0, rows * cols, 1)?.reshape(&[rows, cols])?)
}

/// An activation of the adapter's branch (z = x·Aᵀ, its gradient, scratch): counted as
/// activations, not adapter parameters, in the memory report.
pub(crate) fn activation(ctx: &Context, label: &str, shape: &[usize]) -> Result<Tensor> {
    let _kind = ctx.alloc_kind("activations");
    Ok(ctx.tensor(label, shape, DType::F32)?)
}

/// A zero-filled f32 tensor.
pub(crate) fn zeros(ctx: &Context, label: &str, shape: &[usize]) -> Result<Tensor> {
    let t = ctx.tensor(label, shape, DType::F32)?;
    ctx.fill_f32(&t, 0.0)?;
    Ok(t)
}

/// The dropout pieces shared by the methods that have it.
pub(crate) struct Dropout {
    pub p: f32,
    pub seed: Tensor, // (1,) u32, rewritten each step
    pub xd: Tensor,   // (N · max_in,) dropout(x) of the site being processed
    pub dxs: Tensor,  // (N · max_in,) the branch's input gradient before the mask
}

impl Dropout {
    pub fn new(ctx: &Context, p: f32, n: usize, sites: &[Site]) -> Result<Option<Dropout>> {
        if p <= 0.0 {
            return Ok(None);
        }
        let max_in = sites.iter().map(|s| s.in_features).max().unwrap_or(1);
        Ok(Some(Dropout {
            p,
            seed: ctx.upload_u32("dropout_seed", &[1], &[0])?,
            xd: activation(ctx, "dropout_x", &[n * max_in])?,
            dxs: activation(ctx, "dropout_dx", &[n * max_in])?,
        }))
    }

    /// The branch input of site `i`: `dropout(x)` (recorded into scratch) when training with
    /// dropout, else `x` itself.
    pub fn input(
        d: &Option<Dropout>,
        ctx: &Context,
        s: &mut Step,
        i: usize,
        x: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        match (d, train) {
            (Some(d), true) => d.apply(ctx, s, i, x),
            _ => Ok(x.clone()),
        }
    }

    /// Records `dx += mask ⊙ (dz · A)` for site `i` (`dz` `(N, r)`, `A` `(r, in)`, `dx` `(N, in)`):
    /// the branch's input gradient, through the same mask as forward.
    pub fn add_input_grad(
        d: &Option<Dropout>,
        ctx: &Context,
        s: &mut Step,
        i: usize,
        dz: &Tensor,
        a: &Tensor,
        dx: &Tensor,
    ) -> Result<()> {
        match d {
            None => {
                matmul(ctx, s, dz, a, dx, Matmul::nn().accumulate(true))?;
            }
            Some(d) => {
                let tmp = scratch_view(&d.dxs, dx.shape()[0], dx.shape()[1])?;
                matmul(ctx, s, dz, a, &tmp, Matmul::nn())?;
                crate::ops::adapter::dropout_backward(ctx, s, &tmp, &d.seed, i as u32, d.p, dx)?;
            }
        }
        Ok(())
    }

    /// Records `dropout(x)` of site `i` into scratch and returns the view.
    pub fn apply(&self, ctx: &Context, s: &mut Step, i: usize, x: &Tensor) -> Result<Tensor> {
        let [n, d] = x.shape()[..] else {
            return Err(AdapterError::Option(format!("adapter input {:?} is not 2-D", x.label())));
        };
        let xd = scratch_view(&self.xd, n, d)?;
        crate::ops::adapter::dropout_forward(ctx, s, x, &self.seed, i as u32, self.p, &xd)?;
        Ok(xd)
    }
}

/// Uniform samples in [-bound, bound) from the crate's seeded generator.
pub(crate) fn uniform_init(rng: &mut crate::rng::Rng, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.uniform() as f64 * bound) as f32).collect()
}

/// Normal samples N(0, std²) (Box–Muller on the seeded generator).
pub(crate) fn normal_init(rng: &mut crate::rng::Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}
