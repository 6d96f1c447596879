//! The WGSL load of the GGUF types kept as the file's bytes (Q5_0, Q5_1 and the K-quants Q2_K …
//! Q6_K; see `ops::quant`): `fn {name}(e: u32) -> vec4<f32>` gives elements `e .. e + 4` (e a
//! multiple of 4, inside one row, so inside one sub-block) of a matrix bound as `array<u32>`.
//! Each element is computed as ggml's `dequantize_row_*` computes it, in the same order of
//! operations (scale times quant, minus the min); `io::quants` reads the same blocks on the CPU
//! the way ggml's loops walk them, and the tests hold the two against each other.

use crate::gpu::DType;

/// Helpers over the byte stream: a byte, four bytes from any offset (little-endian), an f16 at an
/// even offset, and a word's four bytes as a vector.
fn helpers(name: &str, buf: &str) -> String {
    format!(
        "fn {name}_b(i: u32) -> u32 {{ return ({buf}[i / 4u] >> ((i % 4u) * 8u)) & 0xFFu; }}\n\
         fn {name}_w(i: u32) -> u32 {{\n\
         \x20   let s = (i % 4u) * 8u;\n\
         \x20   let lo = {buf}[i / 4u];\n\
         \x20   if (s == 0u) {{ return lo; }}\n\
         \x20   return (lo >> s) | ({buf}[i / 4u + 1u] << (32u - s));\n\
         }}\n\
         fn {name}_h(i: u32) -> f32 {{\n\
         \x20   let w = {buf}[i / 4u];\n\
         \x20   return unpack2x16float(select(w, w >> 16u, (i & 2u) != 0u)).x;\n\
         }}\n\
         fn {name}_v(v: u32) -> vec4<f32> {{\n\
         \x20   return vec4<f32>(vec4<u32>(v & 0xFFu, (v >> 8u) & 0xFFu, (v >> 16u) & 0xFFu, v >> 24u));\n\
         }}\n"
    )
}

/// The body of the load for `dtype` (`n` prefixes the helpers).
fn body(dtype: DType, n: &str) -> String {
    let bytes = dtype.block_bytes();
    match dtype {
        DType::Q5_0 | DType::Q5_1 => q5_body(dtype, n, bytes),
        DType::Q4_K | DType::Q5_K => q4_q5_k_body(dtype, n, bytes),
        DType::Q6_K => format!(
            "    let i = e % 256u;\n\
             \x20   let base = (e / 256u) * {bytes}u;\n\
             \x20   let half = i / 128u;\n\
             \x20   let qt = (i % 128u) / 32u;\n\
             \x20   let l = i % 32u;\n\
             \x20   let nib = ({n}_w(base + 64u * half + l + 32u * (qt & 1u)) >> select(0u, 4u, qt >= 2u)) & 0x0F0F0F0Fu;\n\
             \x20   let hi = ({n}_w(base + 128u + 32u * half + l) >> (2u * qt)) & 0x03030303u;\n\
             \x20   let q = {n}_v(nib | (hi << 4u)) - 32.0;\n\
             \x20   let sc = f32(extractBits(i32({n}_b(base + 192u + 8u * half + l / 16u + 2u * qt)), 0u, 8u));\n\
             \x20   return ({n}_h(base + 208u) * sc) * q;\n"
        ),
        DType::Q2_K => format!(
            "    let i = e % 256u;\n\
             \x20   let base = (e / 256u) * {bytes}u;\n\
             \x20   let half = i / 128u;\n\
             \x20   let j = (i % 128u) / 32u;\n\
             \x20   let w = i % 32u;\n\
             \x20   let sc = {n}_b(base + 8u * half + 2u * j + w / 16u);\n\
             \x20   let q = {n}_v(({n}_w(base + 16u + 32u * half + w) >> (2u * j)) & 0x03030303u);\n\
             \x20   return ({n}_h(base + 80u) * f32(sc & 15u)) * q - {n}_h(base + 82u) * f32(sc >> 4u);\n"
        ),
        DType::Q3_K => format!(
            "    let i = e % 256u;\n\
             \x20   let base = (e / 256u) * {bytes}u;\n\
             \x20   let half = i / 128u;\n\
             \x20   let j = (i % 128u) / 32u;\n\
             \x20   let w = i % 32u;\n\
             \x20   let k = 8u * half + 2u * j + w / 16u;\n\
             \x20   let lb = {n}_b(base + 96u + k % 8u);\n\
             \x20   let lo = select(lb >> 4u, lb & 15u, k < 8u);\n\
             \x20   let hi = ({n}_b(base + 104u + k % 4u) >> (2u * (k / 4u))) & 3u;\n\
             \x20   let sc = f32(i32(lo | (hi << 4u)) - 32);\n\
             \x20   let q = {n}_v(({n}_w(base + 32u + 32u * half + w) >> (2u * j)) & 0x03030303u);\n\
             \x20   let hm = {n}_v(({n}_w(base + w) >> (4u * half + j)) & 0x01010101u);\n\
             \x20   return ({n}_h(base + 108u) * sc) * (q - 4.0 * (vec4<f32>(1.0) - hm));\n"
        ),
        other => unreachable!("{other:?} is not read byte-wise"),
    }
}

/// Q5_0's and Q5_1's body: 32 elements a block, low nibbles and a word of fifth bits.
fn q5_body(dtype: DType, n: &str, bytes: usize) -> String {
    let (qh, qs, value) = match dtype {
        DType::Q5_0 => (2, 6, "d * (q - 16.0)".to_string()),
        _ => (4, 8, format!("d * q + {n}_h(base + 2u)")),
    };
    format!(
        "    let i = e % 32u;\n\
         \x20   let base = (e / 32u) * {bytes}u;\n\
         \x20   let d = {n}_h(base);\n\
         \x20   let nib = ({n}_w(base + {qs}u + (i % 16u)) >> select(0u, 4u, i >= 16u)) & 0x0F0F0F0Fu;\n\
         \x20   let hb = ({n}_w(base + {qh}u) >> i) & 0xFu;\n\
         \x20   let hi = ((hb & 1u) | ((hb & 2u) << 7u) | ((hb & 4u) << 14u) | ((hb & 8u) << 21u)) << 4u;\n\
         \x20   let q = {n}_v(nib | hi);\n\
         \x20   return {value};\n"
    )
}

/// Q4_K's and Q5_K's body: 256 elements a block, 6-bit scales and mins packed in 12 bytes.
fn q4_q5_k_body(dtype: DType, n: &str, bytes: usize) -> String {
    let qs = if dtype == DType::Q4_K { 16 } else { 48 };
    let high = match dtype {
        DType::Q5_K => format!("    q = q + 16.0 * {n}_v(({n}_w(base + 16u + l) >> j) & 0x01010101u);\n"),
        _ => String::new(),
    };
    format!(
        "    let i = e % 256u;\n\
         \x20   let base = (e / 256u) * {bytes}u;\n\
         \x20   let c = i / 64u;\n\
         \x20   let upper = (i % 64u) >= 32u;\n\
         \x20   let l = i % 32u;\n\
         \x20   let j = 2u * c + select(0u, 1u, upper);\n\
         \x20   var sc = {n}_b(base + 4u + j) & 63u;\n\
         \x20   var mn = {n}_b(base + 8u + j) & 63u;\n\
         \x20   if (j >= 4u) {{\n\
         \x20       sc = ({n}_b(base + 8u + j) & 15u) | (({n}_b(base + j) >> 6u) << 4u);\n\
         \x20       mn = ({n}_b(base + 8u + j) >> 4u) | (({n}_b(base + 4u + j) >> 6u) << 4u);\n\
         \x20   }}\n\
         \x20   var q = {n}_v(({n}_w(base + {qs}u + 32u * c + l) >> select(0u, 4u, upper)) & 0x0F0F0F0Fu);\n\
         {high}\
         \x20   return ({n}_h(base) * f32(sc)) * q - {n}_h(base + 2u) * f32(mn);\n"
    )
}

/// WGSL of `fn {name}(e: u32) -> vec4<f32>` and its helpers for a byte-wise `dtype`.
pub fn load4_wgsl(dtype: DType, name: &str, buf: &str) -> String {
    format!("{}fn {name}(e: u32) -> vec4<f32> {{\n{}}}\n", helpers(name, buf), body(dtype, name))
}
