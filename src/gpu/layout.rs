//! Structs the host fills for the shaders (uniforms, the optimizer's per-step values), declared
//! with [`wgsl_struct!`] so that each names the WGSL struct(s) it fills and can describe its own
//! layout: a test (below) parses every shader with naga and holds the two to the same member
//! names, order and byte offsets, since WGSL and Rust each write the struct once.

/// A host struct's layout and the WGSL structs it fills.
#[derive(Clone, Debug, PartialEq)]
pub struct StructLayout {
    /// The Rust type (module path and name), for messages.
    pub rust: &'static str,
    /// (file under `shaders/`, struct name there) of every WGSL struct it fills.
    pub wgsl: &'static [(&'static str, &'static str)],
    /// Member names in order, with their byte offsets (encase's layout, which is WGSL's).
    pub members: Vec<(&'static str, u64)>,
    /// Bytes the host writes.
    pub size: u64,
}

/// A struct declared with [`wgsl_struct!`].
pub trait WgslStruct {
    fn layout() -> StructLayout;
}

/// Declares a struct the host lays out for WGSL (`#[derive(encase::ShaderType)]`) together with
/// the WGSL struct(s) it fills, `struct Name for [("file.wgsl", "WgslName"), ...] { fields }`,
/// and implements [`WgslStruct`] from the field names and encase's offsets.
macro_rules! wgsl_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident for [$(($file:literal, $wgsl:literal)),+ $(,)?] {
            $($(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(encase::ShaderType)]
        $vis struct $name {
            $($(#[$fmeta])* $fvis $field: $ty),*
        }

        impl $crate::gpu::layout::WgslStruct for $name {
            fn layout() -> $crate::gpu::layout::StructLayout {
                let offsets = <$name as encase::ShaderType>::METADATA.extra.offsets;
                let names = [$(stringify!($field)),*];
                $crate::gpu::layout::StructLayout {
                    rust: concat!(module_path!(), "::", stringify!($name)),
                    wgsl: &[$(($file, $wgsl)),+],
                    members: names.iter().copied().zip(offsets.iter().copied()).collect(),
                    size: <$name as encase::ShaderSize>::SHADER_SIZE.get(),
                }
            }
        }
    };
}
pub(crate) use wgsl_struct;

/// Every struct the host fills for a shader.
pub fn host_structs() -> Vec<StructLayout> {
    use crate::ops;
    vec![
        ops::act::Params::layout(),
        ops::adapter::Params::layout(),
        ops::attention::Params::layout(),
        ops::dora::Params::layout(),
        ops::elementwise::Params::layout(),
        ops::embed::Params::layout(),
        ops::half::Params::layout(),
        ops::heads::Params::layout(),
        ops::matmul::Params::layout(),
        ops::norm::Params::layout(),
        ops::optim::Params::layout(),
        ops::optim::Multi::layout(),
        ops::optim::TensorRow::layout(),
        ops::optim::Hyper::layout(),
        ops::reduce::Params::layout(),
        ops::rope::Params::layout(),
        ops::softmax::Params::layout(),
        ops::xent::Params::layout(),
    ]
}
