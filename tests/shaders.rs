//! Every WGSL file parses and validates with naga. Needs no GPU.

use portalora::gpu::{KernelSource, ALL_SOURCES};
use portalora::ops::matmul::subgroup_kernel;

fn validate(name: &str, wgsl: &str) {
    let module = naga::front::wgsl::parse_str(wgsl).unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(wgsl)));
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(wgsl)));
    // And through naga's SPIR-V writer, as wgpu's Vulkan backend compiles it: the writer can fail
    // (or panic) on a module the validator accepts (naga 30 did on cooperative stores).
    // Pipeline constants (overrides) set to 1, as a pipeline would set them.
    let mut constants = naga::back::PipelineConstants::default();
    for (_, o) in module.overrides.iter() {
        constants.insert(o.name.clone().unwrap_or_default(), 1.0);
    }
    let (module, info) = naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
        .unwrap_or_else(|e| panic!("{name}: overrides: {e}"));
    let opts = naga::back::spv::Options { lang_version: (1, 6), ..Default::default() };
    naga::back::spv::write_vec(&module, &info, &opts, None).unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
}

fn uses_subgroups_without_flag(src: &KernelSource) -> bool {
    !src.needs_subgroups
        && ["subgroupBroadcast", "subgroupShuffle", "subgroupAdd", "subgroup_invocation_id", "subgroup_size"]
            .iter()
            .any(|w| src.wgsl.contains(w))
}

#[test]
fn every_wgsl_file_validates() {
    let mut checked = 0;
    for src in ALL_SOURCES {
        assert!(!uses_subgroups_without_flag(src), "{} uses subgroups but is not marked so", src.file);
        if src.template {
            continue; // expanded below
        }
        validate(src.file, src.wgsl);
        checked += 1;
    }
    assert!(checked >= 3);
}

#[test]
fn matmul_subgroup_template_validates_for_every_size() {
    for s in [4u32, 8, 16, 32, 64, 128] {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for vec in [false, true] {
                for (tm, tnv) in [(32, 1), (32, 2), (4, 1), (8, 1)] {
                    let spec = subgroup_kernel(s, tm, tnv, trans_a, trans_b, vec);
                    let wgsl = spec.wgsl().expect("template expands");
                    let what = format!("{} s={s} ta={trans_a} tb={trans_b} vec={vec} tm={tm} tnv={tnv}", spec.label());
                    validate(&what, &wgsl);
                }
            }
        }
    }
}

#[test]
fn packed_weight_kernels_validate_for_every_type() {
    use portalora::gpu::DType;
    use portalora::ops::matmul::subgroup_kernel_full;
    for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        let spec = portalora::ops::embed::embed_kernel(dtype);
        validate(&format!("embed {dtype:?}"), &spec.wgsl().expect("template expands"));
        for s in [4u32, 8, 32] {
            for (trans_a, trans_b) in [(false, false), (false, true), (true, true)] {
                let spec = subgroup_kernel_full(s, 32, 2, trans_a, trans_b, true, dtype, false);
                let wgsl = spec.wgsl().expect("template expands");
                validate(&format!("matmul {dtype:?} s={s} ta={trans_a} tb={trans_b}"), &wgsl);
                if dtype == DType::F16 {
                    // Native f16 loads (shader-f16).
                    let spec = subgroup_kernel_full(s, 32, 2, trans_a, trans_b, true, dtype, !trans_a);
                    let wgsl = spec.flag("F16", true).wgsl().expect("template expands");
                    assert!(wgsl.starts_with("enable f16;") && wgsl.contains("array<vec4<f16>>"));
                    validate(&format!("matmul native f16 s={s} ta={trans_a} tb={trans_b}"), &wgsl);
                }
                if !trans_a {
                    let spec = subgroup_kernel_full(s, 32, 2, trans_a, trans_b, true, dtype, true);
                    let wgsl = spec.wgsl().expect("template expands");
                    validate(&format!("matmul + side {dtype:?} s={s} tb={trans_b}"), &wgsl);
                }
            }
        }
    }
}

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".wgsl") {
            assert!(ALL_SOURCES.iter().any(|s| s.file == name), "shaders/{name} is not in ALL_SOURCES");
        }
    }
}

#[test]
fn template_errors_are_reported() {
    let e = portalora::gpu::preprocess("t.wgsl", "// #if NOPE\nx\n// #endif\n", &[], &[]).unwrap_err();
    assert!(e.to_string().contains("NOPE"), "{e}");
    let e = portalora::gpu::preprocess("t.wgsl", "a {{MISSING}} b\n", &[], &[]).unwrap_err();
    assert!(e.to_string().contains("MISSING"), "{e}");
    let e = portalora::gpu::preprocess("t.wgsl", "// #if A\nx\n", &[("A", true)], &[]).unwrap_err();
    assert!(e.to_string().contains("unterminated"), "{e}");
    let ok = portalora::gpu::preprocess(
        "t.wgsl",
        "// #if A\nx\n// #else\ny\n// #endif\n{{V}}\n",
        &[("A", false)],
        &[("V", "7".into())],
    )
    .unwrap();
    assert_eq!(ok, "y\n7\n");
}

#[test]
fn attention_vec4_template_validates_for_every_head_size() {
    use portalora::ops::attention::vec4_kernel;
    for d4 in [1usize, 2, 3, 16, 32, 64] {
        for entry in ["attention_forward", "attention_backward_dq", "attention_backward_dkv"] {
            let spec = vec4_kernel(entry, d4);
            validate(&format!("attention_vec4 d4={d4} {entry}"), &spec.wgsl().unwrap());
        }
    }
}

#[test]
fn optimizer_template_validates_for_every_tensor_count() {
    for k in [1, 2, 7, 16] {
        for entry in ["adamw_step", "sgd_step", "sumsq_partial", "clip_scale"] {
            let spec = portalora::ops::optim::multi_spec(entry, k);
            validate(&format!("optim {entry} k={k}"), &spec.wgsl().expect("template expands"));
        }
    }
}

#[test]
fn matmul_coop_template_validates_for_every_size_and_weight_type() {
    use portalora::gpu::DType;
    use portalora::ops::matmul::coop::coop_kernel;
    for t in [8u32, 16] {
        for s in [8u32, 32, 64] {
            for trans_b in [false, true] {
                for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_1] {
                    let spec = coop_kernel(t, s, trans_b, dtype);
                    let wgsl = spec.wgsl().expect("template expands");
                    validate(&format!("matmul_coop t={t} s={s} tb={trans_b} {dtype:?}"), &wgsl);
                }
            }
        }
    }
}

/// Each shader file's text as a pipeline compiles it (templates expanded once; every expansion
/// declares the same structs).
fn expanded(src: &KernelSource) -> String {
    use portalora::gpu::DType;
    if !src.template {
        return src.wgsl.to_string();
    }
    let spec = match src.file {
        "matmul_subgroup.wgsl" => subgroup_kernel(8, 32, 2, false, true, true),
        "matmul_coop.wgsl" => portalora::ops::matmul::coop::coop_kernel(8, 8, true, DType::F32),
        "attention_vec4.wgsl" => portalora::ops::attention::vec4_kernel("attention_forward", 16),
        "embed.wgsl" => portalora::ops::embed::embed_kernel(DType::F32),
        "optim.wgsl" => portalora::ops::optim::multi_spec("adamw_step", 3),
        other => panic!("{other}: a template this test does not know how to expand: add it here"),
    };
    spec.wgsl().unwrap_or_else(|e| panic!("{}: {e}", src.file))
}

/// A WGSL struct's members in order with their byte offsets, and its size (naga's layout).
fn wgsl_struct(module: &naga::Module, name: &str) -> Option<(Vec<(String, u64)>, u64)> {
    module.types.iter().find_map(|(_, ty)| match &ty.inner {
        naga::TypeInner::Struct { members, span } if ty.name.as_deref() == Some(name) => Some((
            members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset as u64)).collect(),
            *span as u64,
        )),
        _ => None,
    })
}

/// The layouts WGSL and Rust each write once agree: every struct the host fills has, in each
/// shader it names, a struct of the same member names, order and offsets (naga's reflection
/// against encase's), and no larger than what the host writes; and every uniform, and every
/// storage binding of a struct type, in every shader is filled by such a host struct.
#[test]
fn host_structs_match_their_wgsl_structs() {
    let modules: Vec<(&str, naga::Module)> = ALL_SOURCES
        .iter()
        .map(|src| {
            let wgsl = expanded(src);
            let module = naga::front::wgsl::parse_str(&wgsl).unwrap_or_else(|e| panic!("{}: {e}", src.file));
            (src.file, module)
        })
        .collect();
    let module_of =
        |file: &str| &modules.iter().find(|(f, _)| *f == file).unwrap_or_else(|| panic!("no shader {file}")).1;
    let hosts = portalora::gpu::layout::host_structs();
    let mut covered = std::collections::BTreeSet::new();
    for h in &hosts {
        for &(file, name) in h.wgsl {
            let (members, span) =
                wgsl_struct(module_of(file), name).unwrap_or_else(|| panic!("{}: no struct {name} in {file}", h.rust));
            let host: Vec<(String, u64)> = h.members.iter().map(|&(n, o)| (n.to_string(), o)).collect();
            assert_eq!(host, members, "{} against {file}'s {name}: (member, byte offset) in order", h.rust);
            assert!(span <= h.size, "{}: {file}'s {name} is {span} bytes, the host writes {}", h.rust, h.size);
            covered.insert((file, name.to_string()));
        }
    }
    for (file, module) in &modules {
        for (_, var) in module.global_variables.iter() {
            let host_filled = matches!(var.space, naga::AddressSpace::Uniform)
                || matches!(module.types[var.ty].inner, naga::TypeInner::Struct { .. });
            if !host_filled {
                continue;
            }
            let name = module.types[var.ty].name.clone().unwrap_or_default();
            assert!(
                covered.contains(&(*file, name.clone())),
                "{file}: binding {:?} of struct {name} is filled by no host struct: declare it with wgsl_struct! and list it in gpu::layout::host_structs",
                var.name
            );
        }
    }
}
