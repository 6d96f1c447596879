//! An architecture as data: the description of one decoder block that the layer recorder
//! (`model::gpu::block`) follows. Families differ from LLaMA in small, composable ways (a
//! LayerNorm with biases, biases on projections, an activation), so each family is a value of
//! [`Block`], not a code path.

/// How a block normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm: `x / rms(x) · w` (LLaMA).
    Rms,
    /// LayerNorm with a bias: `(x − mean) / std · w + b` (GPT-2).
    Layer,
}

/// The MLP's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `down(silu(gate(x)) · up(x))` (LLaMA).
    SwiGlu,
    /// `down(gelu_tanh(up(x)))`: no gate (GPT-2's c_fc → GELU → c_proj).
    GeluTanh,
}

impl Act {
    /// Whether the MLP has a gate projection beside its up projection.
    pub fn gated(self) -> bool {
        self == Act::SwiGlu
    }
}

/// One decoder block, as the recorder builds it: `x + attn(norm1(x))`, then `+ mlp(norm2(·))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block {
    pub norm: NormKind,
    /// Biases on q, k and v (GPT-2).
    pub qkv_bias: bool,
    /// A bias on the attention output projection (GPT-2).
    pub o_bias: bool,
    /// Biases on the MLP's projections (GPT-2).
    pub mlp_bias: bool,
    pub act: Act,
    /// Rotary position embeddings on q and k; otherwise learned positions are added to the
    /// token embeddings (GPT-2).
    pub rope: bool,
    /// Weights in GPT-2's `Conv1D` layout `(in, out)`, so `y = x·W` ([`crate::ops::matmul::Matmul::nn`]);
    /// otherwise `nn.Linear`'s `(out, in)` and `y = x·Wᵀ`.
    pub conv1d: bool,
}

impl Block {
    /// LLaMA and SmolLM2: RMSNorm, no biases, SwiGLU, rotary positions.
    pub const LLAMA: Block = Block {
        norm: NormKind::Rms,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        act: Act::SwiGlu,
        rope: true,
        conv1d: false,
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
    };
}
