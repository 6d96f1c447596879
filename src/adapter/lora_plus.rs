//! LoRA+ (Hayou et al. 2024): LoRA with two learning rates, an optimizer setting rather than a
//! layer. As PEFT's `create_loraplus_optimizer`: lora_B and every 1-D parameter train at
//! `lr · ratio`, A (and everything else) at `lr`, all with the same weight decay.

use super::ParamKind;

/// The paper's recommended ratio lr_B / lr_A (2^4).
pub const DEFAULT_RATIO: f64 = crate::run::DEFAULTS.lr_ratio;

/// The learning-rate multiplier of a parameter kind under LoRA+ with `ratio`.
pub fn lr_multiplier(kind: ParamKind, ratio: f64) -> f64 {
    match kind {
        ParamKind::A => 1.0,
        ParamKind::B | ParamKind::Vector => ratio,
    }
}
