//! ggml's Q5_0, Q5_1 and K-quant blocks (Q2_K … Q6_K) dequantized to f32, each written as ggml's
//! `dequantize_row_*` walks its block, so that the per-element formulas of the GPU's load
//! (`ops/quant.rs`) are checked against an independent reading. K-quants come in super-blocks of
//! 256 elements split into sub-blocks of 16 or 32 with their own scales (and mins).

use super::half::f16_to_f32;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

fn f16(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Q5_0 (22 bytes per 32): f16 d, 32 high bits, 16 bytes of low nibbles; x = d·(q − 16).
/// Q5_1 (24 bytes): f16 d, f16 m, the same; x = d·q + m.
pub fn q5(b: &[u8], with_min: bool, out: &mut Vec<f32>) {
    let d = f16(b, 0);
    let (m, at) = if with_min { (f16(b, 2), 4) } else { (0.0, 2) };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    let mut y = [0f32; 32];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        let (x0, x1) = ((qs[j] as u32 & 0x0f) | h0, (qs[j] as u32 >> 4) | h1);
        (y[j], y[j + 16]) = match with_min {
            true => (d * x0 as f32 + m, d * x1 as f32 + m),
            false => (d * (x0 as i32 - 16) as f32, d * (x1 as i32 - 16) as f32),
        };
    }
    out.extend(y);
}

/// The j-th six-bit scale and min of a Q4_K / Q5_K block's 12 scale bytes (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    };
    (sc as f32, m as f32)
}

/// Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.
/// Q5_K (176 bytes): the same with 32 bytes of high bits before the nibbles.
pub fn q4k_q5k(b: &[u8], five: bool, out: &mut Vec<f32>) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let scales = &b[4..16];
    let (qh, ql) = if five { (&b[16..48], &b[48..176]) } else { (&b[16..16], &b[16..144]) };
    let (mut u1, mut u2) = (1u8, 2u8);
    for c in 0..QK_K / 64 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let q = &ql[32 * c..32 * c + 32];
        let high = |l: usize, u: u8| if five && qh[l] & u != 0 { 16.0 } else { 0.0 };
        out.extend((0..32).map(|l| d1 * ((q[l] & 0x0f) as f32 + high(l, u1)) - m1));
        out.extend((0..32).map(|l| d2 * ((q[l] >> 4) as f32 + high(l, u2)) - m2));
        (u1, u2) = (u1 << 2, u2 << 2);
    }
}

/// Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, f16 d;
/// x = d·scale·(q − 32).
pub fn q6k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16(b, 208);
    let mut y = [0f32; QK_K];
    for half in 0..2 {
        let (ql, qh, sc) = (&b[64 * half..], &b[128 + 32 * half..], &b[192 + 8 * half..]);
        let y = &mut y[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
    out.extend(y);
}

/// Q2_K (84 bytes): 16 bytes of 4-bit scale | 4-bit min, 64 bytes of 2-bit quants, f16 d, f16
/// dmin; x = d·scale·q − dmin·min, per sub-block of 16.
pub fn q2k(b: &[u8], out: &mut Vec<f32>) {
    let (scales, qs, d, dmin) = (&b[0..16], &b[16..80], f16(b, 80), f16(b, 82));
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[32 * half..];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0x0f) as f32, dmin * (sc >> 4) as f32);
                out.extend((0..16).map(|l| dl * ((q[l + 16 * part] >> shift) & 3) as f32 - ml));
            }
        }
    }
}

/// The 16 signed six-bit scales of a Q3_K block's 12 scale bytes (ggml's kmask shuffle).
fn q3k_scales(s: &[u8]) -> [i32; 16] {
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let (a0, a1, tmp) = (word(0), word(4), word(8));
    let aux = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    let mut out = [0i32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = ((aux[i / 4] >> (8 * (i % 4))) & 0xff) as i8 as i32 - 32;
    }
    out
}

/// Q3_K (110 bytes): 32 bytes of high-bit masks, 64 bytes of 2-bit quants, 12 bytes of
/// scales, f16 d; x = d·scale·(q − 4 unless the high bit is set), per sub-block of 16.
pub fn q3k(b: &[u8], out: &mut Vec<f32>) {
    let (hm, qs, d) = (&b[0..32], &b[32..96], f16(b, 108));
    let scales = q3k_scales(&b[96..108]);
    let (mut is, mut m) = (0, 1u8);
    for half in 0..2 {
        let q = &qs[32 * half..];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                out.extend((0..16).map(|l| {
                    let l = l + 16 * part;
                    let low = ((q[l] >> shift) & 3) as i32;
                    dl * (low - if hm[l] & m != 0 { 0 } else { 4 }) as f32
                }));
            }
            m <<= 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ggml's reference quantizers (`quantize_row_*_ref`, no importance matrix), f32 → GGUF blocks:
// what `--base-dtype q4_k` (say) stores. Written from ggml-quants.c, step for step, so that the
// blocks are the ones llama.cpp's own quantizer makes from the same values.

use super::half::f32_to_f16;

/// ggml's `nearest_int`: round half to even through the float's mantissa.
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no weights: a symmetric scale searched around
/// `−nmax / max`; `l` gets `q + nmax` in `0..2·nmax`.
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    if amax < 1e-30 {
        l.iter_mut().for_each(|q| *q = 0);
        return 0.0;
    }
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        x.iter().fold((0f32, 0f32), |(lx, l2), &v| {
            let (q, w) = (quant(iscale, v) as f32, v * v);
            (lx + w * v * q, l2 + w * q * q)
        })
    };
    let iscale = -(nmax as f32) / max;
    let (sumlx, suml2) = sums(iscale);
    for (q, &v) in l.iter_mut().zip(x) {
        *q = (quant(iscale, v) + nmax) as i8;
    }
    let mut scale = sumlx / suml2;
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&i| i != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l.iter_mut().zip(x) {
                *q = (quant(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants` with `do_rmse`: `l` gets `q + nmax`.
fn make_q3_quants(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    if amax == 0.0 {
        l.iter_mut().for_each(|q| *q = 0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (q, &v) in l.iter_mut().zip(x) {
        let li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *q = li as i8;
        let w = v * v;
        sumlx += w * v * li as f32;
        suml2 += w * li as f32 * li as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for (q, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let mut slx = sumlx - w * v * *q as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * *q as f32 * *q as f32;
                let new = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new != *q as i32 {
                    slx += w * v * new as f32;
                    sl2 += w * new as f32 * new as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        (*q, sumlx, suml2) = (new as i8, slx, sl2);
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for q in l.iter_mut() {
        *q += nmax as i8;
    }
    sumlx / suml2
}

/// ggml's `make_qkx2_quants`: an affine scale and min (returned as −min) searched over `nstep`
/// candidate ranges; `l` gets `0..=nmax`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (weights[0], weights[0] * x[0]);
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        min = min.min(v);
        max = max.max(v);
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|q| *q = 0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for ((q, &v), &w) in l.iter_mut().zip(x).zip(weights) {
        *q = nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
        best += w * err(scale * *q as f32 + min - v);
    }
    let mut aux = vec![0u8; x.len()];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((a, &v), &w) in aux.iter_mut().zip(x).zip(weights) {
            let li = nearest_int(iscale * (v - min)).clamp(0, nmax);
            *a = li as u8;
            sum_l += w * li as f32;
            sum_l2 += w * li as f32 * li as f32;
            sum_xl += w * li as f32 * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mad: f32 = aux
                .iter()
                .zip(x)
                .zip(weights)
                .map(|((&a, &v), &w)| w * err(this_scale * a as f32 + this_min - v))
                .sum();
            if mad < best {
                l.copy_from_slice(&aux);
                (best, scale, min) = (mad, this_scale, this_min);
            }
        }
    }
    (scale, -min)
}

/// Packs the 2-bit values of 256 quants as Q2_K and Q3_K lay them out: byte l of each half
/// holds elements l, l + 32, l + 64, l + 96 of that half.
fn pack_2bit(l: &[u8]) -> [u8; 64] {
    let mut qs = [0u8; 64];
    for half in 0..2 {
        let j = 128 * half;
        for i in 0..32 {
            qs[32 * half + i] = l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
    qs
}

/// ggml's `quantize_row_q2_K_ref` for one super-block.
pub fn quantize_q2k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
        (scales[j], mins[j]) = make_qkx2_quants(xs, &weights, 3, &mut l[16 * j..16 * j + 16], -0.5, 0.1, 15, true);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let mut sc = [0u8; 16];
    let d = if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        max_scale / 15.0
    } else {
        0.0
    };
    let dmin = if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        max_min / 15.0
    } else {
        0.0
    };
    let (d16, dmin16) = (f32_to_f16(d), f32_to_f16(dmin));
    for j in 0..16 {
        let d = f16_to_f32(d16) * (sc[j] & 0x0f) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = f16_to_f32(dmin16) * (sc[j] >> 4) as f32;
        for i in 0..16 {
            l[16 * j + i] = nearest_int((x[16 * j + i] + dm) / d).clamp(0, 3) as u8;
        }
    }
    out.extend(sc);
    out.extend(pack_2bit(&l));
    out.extend(d16.to_le_bytes());
    out.extend(dmin16.to_le_bytes());
}

/// ggml's `quantize_row_q3_K_ref` for one super-block.
pub fn quantize_q3k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut amax) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(&x[16 * j..16 * j + 16], 4, &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            (amax, max_scale) = (scales[j].abs(), scales[j]);
        }
    }
    let mut sb = [0u8; 12];
    let d16 = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            let q = (nearest_int(iscale * s) as i8).clamp(-32, 31) as i32 + 32;
            if j < 8 {
                sb[j] = (q & 0x0f) as u8;
            } else {
                sb[j - 8] |= ((q & 0x0f) << 4) as u8;
            }
            sb[j % 4 + 8] |= ((q >> 4) << (2 * (j / 4))) as u8;
        }
        f32_to_f16(1.0 / iscale)
    } else {
        f32_to_f16(0.0)
    };
    for j in 0..16 {
        let lo = if j < 8 { sb[j] & 0x0f } else { sb[j - 8] >> 4 } as i32;
        let sc = (lo | (((sb[8 + j % 4] >> (2 * (j / 4))) & 3) as i32) << 4) - 32;
        let d = f16_to_f32(d16) * sc as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / d).clamp(-4, 3) + 4) as i8;
        }
    }
    // The high bit of element j goes to bit j / 32 of byte j % 32.
    let mut hmask = [0u8; 32];
    for (j, q) in l.iter_mut().enumerate() {
        if *q > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            *q -= 4;
        }
    }
    let low: Vec<u8> = l.iter().map(|&q| q as u8).collect();
    out.extend(hmask);
    out.extend(pack_2bit(&low));
    out.extend(sb);
    out.extend(d16.to_le_bytes());
}

/// ggml's `quantize_row_q4_K_ref` (`five`: `quantize_row_q5_K_ref`) for one super-block.
pub fn quantize_q4k_q5k(x: &[f32], five: bool, out: &mut Vec<u8>) {
    let (nmax, rmin, nstep) = if five { (31, -0.5, 15) } else { (15, -1.0, 20) };
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
        (scales[j], mins[j]) =
            make_qkx2_quants(xs, &weights, nmax, &mut l[32 * j..32 * j + 32], rmin, 0.1, nstep, false);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sb = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            (sb[j], sb[j + 4]) = (ls, lm);
        } else {
            sb[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sb[j - 4] |= (ls >> 4) << 6;
            sb[j] |= (lm >> 4) << 6;
        }
    }
    let (d16, dmin16) = (f32_to_f16(max_scale / 63.0), f32_to_f16(max_min / 63.0));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &sb);
        let d = f16_to_f32(d16) * sc;
        if d == 0.0 {
            continue;
        }
        let dm = f16_to_f32(dmin16) * m;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    out.extend(d16.to_le_bytes());
    out.extend(dmin16.to_le_bytes());
    out.extend(sb);
    let (mut qh, mut ql) = ([0u8; 32], [0u8; 128]);
    for c in 0..4 {
        for i in 0..32 {
            let (mut l1, mut l2) = (l[64 * c + i], l[64 * c + i + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[i] |= 1 << (2 * c);
            }
            if l2 > 15 {
                l2 -= 16;
                qh[i] |= 2 << (2 * c);
            }
            ql[32 * c + i] = l1 | (l2 << 4);
        }
    }
    if five {
        out.extend(qh);
    }
    out.extend(ql);
}

/// ggml's `quantize_row_q6_K_ref` for one super-block.
pub fn quantize_q6k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for ib in 0..16 {
        scales[ib] = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..16 * ib + 16]);
        if scales[ib].abs() > max_abs {
            (max_abs, max_scale) = (scales[ib].abs(), scales[ib]);
        }
    }
    if max_abs == 0.0 {
        out.extend([0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d16 = f32_to_f16(1.0 / iscale);
    let sc: Vec<i8> = scales.iter().map(|&s| nearest_int(iscale * s).min(127) as i8).collect();
    for j in 0..16 {
        let d = f16_to_f32(d16) * sc[j] as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    let l: Vec<u8> = l.iter().map(|&q| q as u8).collect();
    for half in 0..2 {
        let j = 128 * half;
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k];
            ql[64 * half + i] = (q(0) & 0x0f) | ((q(2) & 0x0f) << 4);
            ql[64 * half + i + 32] = (q(1) & 0x0f) | ((q(3) & 0x0f) << 4);
            qh[32 * half + i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend(d16.to_le_bytes());
}

/// ggml's `quantize_row_q5_0_ref` (`with_min`: `quantize_row_q5_1_ref`) for one block of 32.
pub fn quantize_q5(x: &[f32], with_min: bool, out: &mut Vec<u8>) {
    let mut q = [0u8; 32];
    if with_min {
        let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (o, &v) in q.iter_mut().zip(x) {
            *o = ((v - min) * id + 0.5) as u8;
        }
        out.extend(f32_to_f16(d).to_le_bytes());
        out.extend(f32_to_f16(min).to_le_bytes());
    } else {
        // The value of largest magnitude, with its sign, maps to −16.
        let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (o, &v) in q.iter_mut().zip(x) {
            *o = ((v * id + 16.5) as i8).min(31) as u8;
        }
        out.extend(f32_to_f16(d).to_le_bytes());
    }
    let mut qh = 0u32;
    for j in 0..16 {
        qh |= ((q[j] as u32 & 0x10) >> 4) << j;
        qh |= ((q[j + 16] as u32 & 0x10) >> 4) << (j + 16);
    }
    out.extend(qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}
