//! How a [`Context`](super::Context) is opened and tuned, and the environment variables that say
//! so. Every variable is read here, once, and a value the crate does not know is an error
//! naming it, never a silent default.

use super::{GpuError, Result};

/// How to pick the adapter and tune the kernels. [`ContextOptions::from_env`] reads the usual
/// wgpu variables and portalora's own.
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Comma-separated backend names (`vulkan`, `metal`, `dx12`, `gl`, `webgpu`), as in
    /// `WGPU_BACKEND`. `None` lets wgpu try every backend compiled in.
    pub backends: Option<String>,
    /// A case-insensitive substring of the adapter name, as in `WGPU_ADAPTER_NAME`.
    pub adapter_name: Option<String>,
    /// Pretend the adapter has no subgroup operations (selects the portable kernels).
    /// Also set by `PORTALORA_NO_SUBGROUPS=1`.
    pub disable_subgroups: bool,
    /// Whether products may run on cooperative matrices (tensor cores, simdgroup matrices) where
    /// the adapter offers them through wgpu's experimental feature: `PORTALORA_COOP`.
    pub coop: CoopMode,
    /// The subgroup matmul's tile instead of the autotune's, as (rows per workgroup, vec4 columns
    /// per lane): `PORTALORA_MATMUL_TILE=TMxTNV`, TM a multiple of 4, TNV 1 to 4.
    pub matmul_tile: Option<(u32, u32)>,
    /// Time nothing: the default tile, and the subgroup kernel where `coop` is `Auto`
    /// (`PORTALORA_AUTOTUNE=0`).
    pub no_autotune: bool,
    /// Always the fused attention kernels, never the matmul path (`PORTALORA_ATTENTION=fused`;
    /// `auto`, the default, picks by size).
    pub fused_attention: bool,
}

/// The cooperative-matrix matmul path's switch (`PORTALORA_COOP=auto|on|off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CoopMode {
    /// Open the device with cooperative matrices where offered; products take them where the
    /// autotune found them correct and faster than the subgroup kernel on this adapter.
    #[default]
    Auto,
    /// Where offered, every product that fits takes them (tests, benchmarks).
    On,
    /// Never: the device is opened without wgpu's experimental features.
    Off,
}

impl CoopMode {
    /// Parses `auto`, `on` or `off` (also `1` / `0`).
    pub fn parse(v: &str) -> Option<CoopMode> {
        match v.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(CoopMode::Auto),
            "on" | "1" => Some(CoopMode::On),
            "off" | "0" => Some(CoopMode::Off),
            _ => None,
        }
    }
}

/// Parses a forced matmul tile `TMxTNV` (e.g. `64x1`).
fn parse_matmul_tile(v: &str) -> Option<(u32, u32)> {
    let (tm, tnv) = v.trim().split_once(['x', 'X'])?;
    let (tm, tnv) = (tm.trim().parse::<u32>().ok()?, tnv.trim().parse::<u32>().ok()?);
    (tm > 0 && tm.is_multiple_of(4) && (1..=4).contains(&tnv)).then_some((tm, tnv))
}

/// An environment variable, unset or empty as `None`; in a browser there are none.
fn var(name: &str) -> Option<String> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = name;
        None
    }
}

/// `name`'s value through `parse`, its default when unset, an error naming it when `parse`
/// does not know it.
fn parsed<T>(name: &'static str, expected: &'static str, default: T, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
    match var(name) {
        None => Ok(default),
        Some(value) => parse(&value).ok_or(GpuError::BadEnv { name, value, expected }),
    }
}

/// `0` or `1`.
fn flag(v: &str) -> Option<bool> {
    match v.trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

impl ContextOptions {
    /// The options from `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `PORTALORA_NO_SUBGROUPS`,
    /// `PORTALORA_COOP`, `PORTALORA_MATMUL_TILE`, `PORTALORA_AUTOTUNE` and
    /// `PORTALORA_ATTENTION` (none in a browser). A value outside what each takes is an error
    /// ([`GpuError::BadEnv`]) rather than read as a default.
    pub fn from_env() -> Result<Self> {
        let attention = |v: &str| match v.trim() {
            "fused" => Some(true),
            "auto" => Some(false),
            _ => None,
        };
        Ok(ContextOptions {
            backends: var("WGPU_BACKEND"),
            adapter_name: var("WGPU_ADAPTER_NAME"),
            disable_subgroups: parsed("PORTALORA_NO_SUBGROUPS", "0 or 1", false, flag)?,
            coop: parsed("PORTALORA_COOP", "auto, on or off", CoopMode::Auto, CoopMode::parse)?,
            matmul_tile: parsed(
                "PORTALORA_MATMUL_TILE",
                "TMxTNV such as 64x1 (TM a multiple of 4, TNV 1 to 4)",
                None,
                |v| parse_matmul_tile(v).map(Some),
            )?,
            no_autotune: !parsed("PORTALORA_AUTOTUNE", "0 or 1", true, flag)?,
            fused_attention: parsed("PORTALORA_ATTENTION", "fused or auto", false, attention)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_or_are_refused() {
        assert_eq!(parse_matmul_tile(" 64x1 "), Some((64, 1)));
        assert_eq!(parse_matmul_tile("8X4"), Some((8, 4)));
        for bad in ["30x1", "0x1", "64x0", "64x5", "64", "x1", "64x1x1", "-4x1"] {
            assert_eq!(parse_matmul_tile(bad), None, "{bad}");
        }
        assert_eq!((flag("0"), flag("1"), flag("yes")), (Some(false), Some(true), None));
        assert_eq!(CoopMode::parse("OFF"), Some(CoopMode::Off));
        assert_eq!(CoopMode::parse("maybe"), None);
    }
}
