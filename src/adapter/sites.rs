//! Where adapters attach: the projections of each architecture ([`Proj`]), the sites a target
//! list selects (PEFT's `target_modules` semantics, `all-linear`, full module names, a regular
//! expression, `layers_to_transform`), and each site's rank and alpha (`rank_pattern`,
//! `alpha_pattern`).

use super::{peft, AdapterConfig, AdapterError, Method, Result};
use crate::model::config::{Arch, ModelConfig};

impl AdapterConfig {
    /// The rank of the module named `module` (`rank_pattern`, else `rank`).
    pub fn rank_for(&self, module: &str) -> Result<usize> {
        Ok(pattern_value(&self.rank_pattern, module)?.unwrap_or(self.rank))
    }

    /// The branch's scale s for `module`: its alpha (`alpha_pattern`, else `alpha`) over its rank
    /// (or its square root with rsLoRA); 1 for VeRA.
    pub fn scale_for(&self, module: &str) -> Result<f64> {
        let r = self.rank_for(module)? as f64;
        let alpha = pattern_value(&self.alpha_pattern, module)?.unwrap_or(self.alpha);
        Ok(match (self.method, self.rslora) {
            (Method::Vera, _) => 1.0,
            (_, true) => alpha / r.sqrt(),
            (_, false) => alpha / r,
        })
    }

    /// The projections of `model` this adapter attaches to: `targets` (or `target_regex`),
    /// limited to `layers` when set. Errors name what selects nothing.
    pub fn sites(&self, model: &ModelConfig) -> Result<Vec<Site>> {
        let mut all = match &self.target_regex {
            Some(re) => {
                let r = regex(&format!("^(?:{re})$"), "target_modules")?;
                let every = all_sites(model);
                let picked: Vec<Site> = every.into_iter().filter(|s| r.is_match(&s.module)).collect();
                if picked.is_empty() {
                    return Err(AdapterError::Option(format!(
                        "target_modules {re:?} matches no module of this {:?} model (e.g. {})",
                        model.arch,
                        all_sites(model).first().map(|s| s.module.as_str()).unwrap_or("?")
                    )));
                }
                picked
            }
            None => sites(model, &self.targets)?,
        };
        if let Some(layers) = &self.layers {
            if let Some(&l) = layers.iter().find(|&&l| l >= model.num_layers) {
                return Err(AdapterError::Option(format!(
                    "layers_to_transform names layer {l}, but the model has {} layers (0..{})",
                    model.num_layers,
                    model.num_layers - 1
                )));
            }
            all.retain(|s| layers.contains(&s.layer));
        }
        Ok(all)
    }
}

/// A linear projection an adapter can attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// GPT-2's fused q, k, v projection.
    CAttn,
    /// GPT-2's `attn.c_proj`.
    AttnProj,
    Fc,
    /// GPT-2's `mlp.c_proj`.
    MlpProj,
}

impl Proj {
    /// The projections of an architecture, in forward order.
    pub fn all(arch: Arch) -> &'static [Proj] {
        match arch {
            Arch::Llama => &[Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down],
            Arch::Gpt2 => &[Proj::CAttn, Proj::AttnProj, Proj::Fc, Proj::MlpProj],
        }
    }
    /// The module's path inside a decoder layer (transformers' names).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
            Proj::CAttn => "attn.c_attn",
            Proj::AttnProj => "attn.c_proj",
            Proj::Fc => "mlp.c_fc",
            Proj::MlpProj => "mlp.c_proj",
        }
    }
    /// The activation this projection reads.
    pub fn input(self) -> Input {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::CAttn => Input::H1,
            Proj::O | Proj::AttnProj => Input::Att,
            Proj::Gate | Proj::Up | Proj::Fc => Input::H2,
            Proj::Down | Proj::MlpProj => Input::Act,
        }
    }
}

/// The activations that feed projections; the memory plan keeps one per layer only when an
/// adapter's backward pass reads it (the frozen base never does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// The first norm's output (q, k, v).
    H1,
    /// The attention output (o_proj; attention's own backward needs it anyway).
    Att,
    /// The second norm's output (gate, up, c_fc).
    H2,
    /// The MLP activation (down_proj, mlp.c_proj).
    Act,
}

/// One adapted projection.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    pub layer: usize,
    pub proj: Proj,
    /// Module path as transformers names it (`model.layers.3.self_attn.q_proj`).
    pub module: String,
    pub in_features: usize,
    /// Output widths of the GPU projections this module is split into (one, or q/k/v for c_attn).
    pub outs: Vec<usize>,
    /// The base weight is GPT-2's `Conv1D` `(in, out)` rather than `nn.Linear`'s `(out, in)`.
    pub conv1d: bool,
}

impl Site {
    pub fn out_features(&self) -> usize {
        self.outs.iter().sum()
    }
}

/// Every projection of an architecture by its short name (LLaMA: q_proj … down_proj; GPT-2:
/// c_attn, c_proj, c_fc).
pub fn all_targets(arch: Arch) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in Proj::all(arch) {
        let m = p.module();
        let short = m.rsplit('.').next().unwrap_or(m).to_string();
        if !names.contains(&short) {
            names.push(short);
        }
    }
    names
}

/// The target names valid for an architecture, for messages.
pub fn valid_targets(arch: Arch) -> String {
    let mut names: Vec<String> = Vec::new();
    for p in Proj::all(arch) {
        let m = p.module();
        names.push(m.rsplit('.').next().unwrap_or(m).to_string());
        names.push(m.to_string());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names.push(peft::ALL_LINEAR.into());
    names.join(", ")
}

/// The projections `targets` select, matched as PEFT matches `target_modules`: a module is
/// adapted when its full path equals a target or ends with `.` + target (so GPT-2's `c_proj`
/// selects both `attn.c_proj` and `mlp.c_proj`); `all-linear` selects every projection. A target
/// that selects nothing is an error.
pub fn sites(config: &ModelConfig, targets: &[String]) -> Result<Vec<Site>> {
    let arch = config.arch;
    if targets.is_empty() {
        return Err(AdapterError::NoTargets { arch, valid: valid_targets(arch) });
    }
    let matches = |module: &str, t: &str| t == peft::ALL_LINEAR || module == t || module.ends_with(&format!(".{t}"));
    let every = all_sites(config);
    // A target may be a full module name (PEFT writes those for "all-linear"), so it is valid when
    // it selects a module of any layer.
    for t in targets {
        let t = t.trim();
        if !every.iter().any(|s| matches(&s.module, t)) {
            return Err(AdapterError::UnknownTarget { name: t.to_string(), arch, valid: valid_targets(arch) });
        }
    }
    Ok(every.into_iter().filter(|s| targets.iter().any(|t| matches(&s.module, t.trim()))).collect())
}

/// Every projection of every layer of `config`, in forward order.
fn all_sites(config: &ModelConfig) -> Vec<Site> {
    let arch = config.arch;
    let prefix = match arch {
        Arch::Llama => "model.layers",
        Arch::Gpt2 => "transformer.h",
    };
    let (c, f) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim);
    let mut out = Vec::new();
    for layer in 0..config.num_layers {
        for &proj in Proj::all(arch) {
            let module = format!("{prefix}.{layer}.{}", proj.module());
            let (in_features, outs) = match proj {
                Proj::Q => (c, vec![q]),
                Proj::K | Proj::V => (c, vec![kv]),
                Proj::O => (q, vec![c]),
                Proj::Gate | Proj::Up => (c, vec![f]),
                Proj::Down => (f, vec![c]),
                Proj::CAttn => (c, vec![c, c, c]),
                Proj::AttnProj => (c, vec![c]),
                Proj::Fc => (c, vec![f]),
                Proj::MlpProj => (f, vec![c]),
            };
            out.push(Site { layer, proj, module, in_features, outs, conv1d: arch == Arch::Gpt2 });
        }
    }
    out
}

/// A compiled regular expression from an adapter option, its errors naming the option.
pub(super) fn regex(pattern: &str, option: &str) -> Result<regex::Regex> {
    regex::Regex::new(pattern).map_err(|source| AdapterError::Regex {
        option: option.to_string(),
        pattern: pattern.to_string(),
        source,
    })
}

/// The value of the first pattern matching `module` as PEFT's `get_pattern_key` matches it.
fn pattern_value<T: Copy>(patterns: &[(String, T)], module: &str) -> Result<Option<T>> {
    for (p, v) in patterns {
        if regex(&format!("^(?:.*\\.)?(?:{p})$"), "pattern")?.is_match(module) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

/// Checks that each site's rank fits its projection (r ≤ min(in, out), as a low-rank update must).
pub fn check_rank(cfg: &AdapterConfig, sites: &[Site]) -> Result<()> {
    for s in sites {
        let rank = cfg.rank_for(&s.module)?;
        let max = s.in_features.min(s.out_features());
        if rank == 0 || rank > max {
            return Err(AdapterError::Rank {
                rank,
                module: s.module.clone(),
                in_features: s.in_features,
                out_features: s.out_features(),
                max,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdapterConfig {
        AdapterConfig {
            rank: 4,
            alpha: 8.0,
            rank_pattern: vec![("q_proj".into(), 2), ("layers.1.mlp.down_proj".into(), 6), ("down_proj".into(), 3)],
            alpha_pattern: vec![("v_proj".into(), 3.0), ("self_attn.(o|k)_proj".into(), 20.0)],
            ..AdapterConfig::new(Method::Lora)
        }
    }

    #[test]
    fn patterns_match_as_peft_matches_them() {
        let c = cfg();
        // A pattern matches whole trailing name parts, as PEFT's `(.*\.)?(pattern)$`.
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj").unwrap(), 2);
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj").unwrap(), 4, "not a whole part");
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj_b").unwrap(), 4, "anchored at the end");
        // The first pattern that matches wins, in the file's order.
        assert_eq!(c.rank_for("model.layers.1.mlp.down_proj").unwrap(), 6);
        assert_eq!(c.rank_for("model.layers.0.mlp.down_proj").unwrap(), 3);
        assert_eq!(c.rank_for("model.layers.11.mlp.down_proj").unwrap(), 3, "layers.1 is not layers.11");
        // Scales from each module's own alpha and rank; patterns are regular expressions.
        assert_eq!(c.scale_for("model.layers.0.self_attn.v_proj").unwrap(), 3.0 / 4.0);
        assert_eq!(c.scale_for("model.layers.0.self_attn.k_proj").unwrap(), 20.0 / 4.0);
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj").unwrap(), 8.0 / 2.0);
        let rs = AdapterConfig { rslora: true, ..c };
        assert_eq!(rs.scale_for("model.layers.0.self_attn.q_proj").unwrap(), 8.0 / 2f64.sqrt());
    }

    #[test]
    fn bad_patterns_are_named() {
        let c = AdapterConfig { rank_pattern: vec![("q_proj(".into(), 2)], ..cfg() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("rank_pattern") && e.contains("q_proj("), "{e}");
        let vera = AdapterConfig { method: Method::Vera, ..cfg() };
        assert!(vera.validate().unwrap_err().to_string().contains("VeRA"));
    }
}
