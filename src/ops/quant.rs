//! A frozen base kept quantized on the GPU (QLoRA-style): f16 and GGUF's blocks (Q8_0, Q4_0 and
//! Q4_1 repacked below; Q5_0, Q5_1 and the K-quants as the file has them), dequantized inside the kernels that read the weights (the matmul's B operand and the
//! embedding lookup). Nothing here runs on the GPU; this file holds the host side:
//! ggml's reference quantizers (f32 → blocks), the repacking of GGUF blocks into the GPU layout,
//! and the WGSL of the load that the kernels splice in.
//!
//! GPU layout of a `(rows, cols)` matrix, `cols` a multiple of 32, blocks of 32 consecutive
//! elements of a row as in GGUF, stored in two parts so that every load is an aligned u32:
//! - quants, block after block: Q8_0 eight words (four int8 each, element 4i in the low byte);
//!   Q4_0 / Q4_1 four words holding GGUF's 16 bytes as they are (byte j: element j in the low
//!   nibble, element 16 + j in the high one);
//! - then the scales: Q8_0 / Q4_0 one f16 `d` per block, two blocks per word (even block in the
//!   low half); Q4_1 one word per block, `d` low and `m` high.
//!
//! Values: Q8_0 `d·q` (q signed); Q4_0 `d·(q − 8)`; Q4_1 `d·q + m`; the same bytes GGUF has,
//! so a model loaded from a Q4_1 GGUF keeps its exact weights in 20 bytes per 32.
//!
//! Q5_0, Q5_1 and the K-quants (Q2_K … Q6_K, super-blocks of 256) keep GGUF's bytes exactly as
//! the file has them, blocks back to back; the load reads them byte-wise (a block of 210 bytes
//! does not start on a word), computing each element as ggml's `dequantize_row_*` does
//! (`io::quants` is the CPU's reading of the same formulas, written block by block).
//! f16 is two halves per word, element 2i low. Scales are read with `unpack2x16float`, which
//! every WebGPU implementation has (no `shader-f16` needed).

use crate::gpu::DType;
use crate::io::gguf::GgmlType;
use crate::io::half::f32_to_f16;
use crate::io::quants as q;

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// The GPU dtype of a GGUF tensor type, where the kernels read it directly.
pub fn dtype_of(ty: GgmlType) -> Option<DType> {
    Some(match ty {
        GgmlType::F16 => DType::F16,
        GgmlType::Q8_0 => DType::Q8_0,
        GgmlType::Q4_0 => DType::Q4_0,
        GgmlType::Q4_1 => DType::Q4_1,
        GgmlType::Q5_0 => DType::Q5_0,
        GgmlType::Q5_1 => DType::Q5_1,
        GgmlType::Q2_K => DType::Q2_K,
        GgmlType::Q3_K => DType::Q3_K,
        GgmlType::Q4_K => DType::Q4_K,
        GgmlType::Q5_K => DType::Q5_K,
        GgmlType::Q6_K => DType::Q6_K,
        GgmlType::F32 | GgmlType::BF16 => return None,
    })
}

/// Whether a `(rows, cols)` weight can be stored as `dtype`: blocks never straddle rows, and
/// kernels load four consecutive elements at a time.
pub fn fits(dtype: DType, shape: &[usize]) -> bool {
    match (dtype, shape) {
        (DType::F16, &[_, c]) => c % 4 == 0,
        (d, &[_, c]) if d.is_block_quantized() => c % d.block() == 0,
        _ => false,
    }
}

/// Quantizes row-major f32 values (whole blocks of them: 32, or 256 for the K-quants) into GGUF
/// blocks of `ty`, as ggml's reference quantizers do.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F16 => {
            for v in x {
                out.extend(f32_to_f16(*v).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            for b in x.chunks(BLOCK) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f32_to_f16(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in x.chunks(BLOCK) {
                // The value of largest magnitude, with its sign, maps to −8.
                let max = b.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f32_to_f16(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for b in x.chunks(BLOCK) {
                let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f32_to_f16(d).to_le_bytes());
                out.extend(f32_to_f16(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        GgmlType::F32 => {
            for v in x {
                out.extend(v.to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for v in x {
                // Round to nearest even on the dropped half.
                let b = v.to_bits();
                out.extend((((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16).to_le_bytes());
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => x.chunks(32).for_each(|b| q::quantize_q5(b, ty == GgmlType::Q5_1, &mut out)),
        GgmlType::Q2_K => x.chunks(q::QK_K).for_each(|b| q::quantize_q2k(b, &mut out)),
        GgmlType::Q3_K => x.chunks(q::QK_K).for_each(|b| q::quantize_q3k(b, &mut out)),
        GgmlType::Q4_K | GgmlType::Q5_K => {
            x.chunks(q::QK_K).for_each(|b| q::quantize_q4k_q5k(b, ty == GgmlType::Q5_K, &mut out))
        }
        GgmlType::Q6_K => x.chunks(q::QK_K).for_each(|b| q::quantize_q6k(b, &mut out)),
    }
    out
}

/// Repacks GGUF blocks of `ty` (row-major, whole blocks) into the GPU layout of this file's
/// header: the 32-bit words to upload.
pub fn pack(ty: GgmlType, raw: &[u8]) -> Vec<u32> {
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let half = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as u32;
    let pairs =
        |d: Vec<u32>| -> Vec<u32> { d.chunks(2).map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 16)).collect() };
    match ty {
        GgmlType::F16 => {
            let mut v: Vec<u32> = raw.chunks(4).map(|c| if c.len() == 4 { word(c) } else { half(c, 0) }).collect();
            v.shrink_to_fit();
            v
        }
        GgmlType::Q8_0 => {
            let blocks: Vec<&[u8]> = raw.chunks_exact(34).collect();
            let mut v: Vec<u32> = blocks.iter().flat_map(|b| b[2..].chunks_exact(4).map(word)).collect();
            v.extend(pairs(blocks.iter().map(|b| half(b, 0)).collect()));
            v
        }
        GgmlType::Q4_0 => {
            let blocks: Vec<&[u8]> = raw.chunks_exact(18).collect();
            let mut v: Vec<u32> = blocks.iter().flat_map(|b| b[2..].chunks_exact(4).map(word)).collect();
            v.extend(pairs(blocks.iter().map(|b| half(b, 0)).collect()));
            v
        }
        GgmlType::Q4_1 => {
            let blocks: Vec<&[u8]> = raw.chunks_exact(20).collect();
            let mut v: Vec<u32> = blocks.iter().flat_map(|b| b[4..].chunks_exact(4).map(word)).collect();
            v.extend(blocks.iter().map(|b| half(b, 0) | (half(b, 2) << 16)));
            v
        }
        GgmlType::F32 | GgmlType::BF16 => raw.chunks_exact(4).map(word).collect(),
        // GGUF's bytes as they are, zero-padded to a whole word.
        _ => raw.chunks(4).map(|c| c.iter().rev().fold(0u32, |w, &b| (w << 8) | b as u32)).collect(),
    }
}

/// The GGUF type stored as `dtype` (None for unquantized dtypes other than f16).
pub fn ggml_of(dtype: DType) -> Option<GgmlType> {
    Some(match dtype {
        DType::F16 => GgmlType::F16,
        DType::Q8_0 => GgmlType::Q8_0,
        DType::Q4_0 => GgmlType::Q4_0,
        DType::Q4_1 => GgmlType::Q4_1,
        DType::Q5_0 => GgmlType::Q5_0,
        DType::Q5_1 => GgmlType::Q5_1,
        DType::Q2_K => GgmlType::Q2_K,
        DType::Q3_K => GgmlType::Q3_K,
        DType::Q4_K => GgmlType::Q4_K,
        DType::Q5_K => GgmlType::Q5_K,
        DType::Q6_K => GgmlType::Q6_K,
        DType::F32 | DType::U32 => return None,
    })
}

/// WGSL of `fn {name}(e: u32) -> vec4<f32>`: elements `e .. e + 4` (e a multiple of 4, inside
/// one row) of a matrix of `dtype` bound as `array<u32>` named `buf`, whose scales start at word
/// `scale_off` (a WGSL expression). Kernels splice it in through a template variable.
pub fn load4_wgsl(dtype: DType, name: &str, buf: &str, scale_off: &str) -> String {
    let body = match dtype {
        DType::F16 => format!(
            "    let w = e / 2u;\n    return vec4<f32>(unpack2x16float({buf}[w]), unpack2x16float({buf}[w + 1u]));\n"
        ),
        DType::Q8_0 => format!(
            "    let blk = e / 32u;\n\
             \x20   let s = bitcast<i32>({buf}[blk * 8u + (e % 32u) / 4u]);\n\
             \x20   let q = vec4<f32>(vec4<i32>(extractBits(s, 0u, 8u), extractBits(s, 8u, 8u), extractBits(s, 16u, 8u), extractBits(s, 24u, 8u)));\n\
             \x20   let d = unpack2x16float({buf}[{scale_off} + blk / 2u]);\n\
             \x20   return q * select(d.x, d.y, (blk & 1u) == 1u);\n"
        ),
        DType::Q4_0 | DType::Q4_1 => {
            let tail = if dtype == DType::Q4_0 {
                format!(
                    "    let d = unpack2x16float({buf}[{scale_off} + blk / 2u]);\n\
                     \x20   return (q - 8.0) * select(d.x, d.y, (blk & 1u) == 1u);\n"
                )
            } else {
                format!("    let dm = unpack2x16float({buf}[{scale_off} + blk]);\n    return q * dm.x + dm.y;\n")
            };
            format!(
                "    let blk = e / 32u;\n\
                 \x20   let i = e % 32u;\n\
                 \x20   let nib = ({buf}[blk * 4u + (i % 16u) / 4u] >> select(0u, 4u, i >= 16u)) & 0x0F0F0F0Fu;\n\
                 \x20   let q = vec4<f32>(vec4<u32>(nib & 0xFFu, (nib >> 8u) & 0xFFu, (nib >> 16u) & 0xFFu, nib >> 24u));\n\
                 {tail}"
            )
        }
        DType::F32 | DType::U32 => format!("    return vec4<f32>(bitcast<f32>({buf}[e]), bitcast<f32>({buf}[e + 1u]), bitcast<f32>({buf}[e + 2u]), bitcast<f32>({buf}[e + 3u]));\n"),
        _ => return super::quant_bytes::load4_wgsl(dtype, name, buf),
    };
    format!("fn {name}(e: u32) -> vec4<f32> {{\n{body}}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::dequantize;
    use crate::io::half::f16_to_f32;

    /// The f32 values of packed GPU words, computed independently of the WGSL and of
    /// `dequantize`: the inverse of [`pack`] followed by dequantizing.
    fn unpack(dtype: DType, words: &[u32], numel: usize) -> Vec<f32> {
        if dtype.is_block_quantized() && !matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) {
            // GGUF's bytes as they are.
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let ty = ggml_of(dtype).expect("packed");
            return dequantize(ty, &bytes[..numel / dtype.block() * dtype.block_bytes()]);
        }
        let q = dtype.quant_words(numel);
        let h = |w: u32, hi: bool| f16_to_f32(if hi { (w >> 16) as u16 } else { w as u16 });
        (0..numel)
            .map(|e| {
                let (blk, i) = (e / BLOCK, e % BLOCK);
                match dtype {
                    DType::F16 => h(words[e / 2], e % 2 == 1),
                    DType::Q8_0 => {
                        let byte = (words[blk * 8 + i / 4] >> (8 * (i % 4))) as u8 as i8;
                        h(words[q + blk / 2], blk % 2 == 1) * byte as f32
                    }
                    DType::Q4_0 | DType::Q4_1 => {
                        let byte = (words[blk * 4 + (i % 16) / 4] >> (8 * (i % 4))) as u8;
                        let nib = if i < 16 { byte & 15 } else { byte >> 4 } as f32;
                        if dtype == DType::Q4_0 {
                            h(words[q + blk / 2], blk % 2 == 1) * (nib - 8.0)
                        } else {
                            let w = words[q + blk];
                            h(w, false) * nib + h(w, true)
                        }
                    }
                    _ => f32::from_bits(words[e]),
                }
            })
            .collect()
    }

    #[test]
    fn pack_then_unpack_equals_ggufs_dequantize() {
        let mut rng = crate::rng::Rng::new(3);
        let x: Vec<f32> = (0..256 * 3).map(|_| rng.uniform()).collect();
        for ty in GgmlType::ALL.into_iter().filter(|t| !matches!(t, GgmlType::F32 | GgmlType::BF16)) {
            let raw = quantize(ty, &x);
            let want = dequantize(ty, &raw);
            let dtype = dtype_of(ty).expect("kernel type");
            assert_eq!(raw.len().next_multiple_of(4), dtype.bytes(x.len()), "{ty:?} bytes");
            let got = unpack(dtype, &pack(ty, &raw), x.len());
            assert_eq!(got, want, "{ty:?}");
            // The quantization error is bounded by half a step of the block's scale.
            let tol = match ty {
                GgmlType::F16 => 1e-3,
                GgmlType::Q8_0 => 1.0 / 127.0,
                GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 2.0 / 31.0,
                GgmlType::Q3_K => 2.0 / 7.0,
                GgmlType::Q2_K => 2.0 / 3.0,
                _ => 2.0 / 15.0,
            };
            for (a, b) in x.iter().zip(&want) {
                assert!((a - b).abs() <= tol, "{ty:?}: {a} vs {b}");
            }
        }
    }
}
