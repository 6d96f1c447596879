// half: f32 activations stored as IEEE half floats between a layer's forward pass and its
// backward pass (`--activations f16`), two per 32-bit word, element 2i in the low half.
//
// half_pack:   out[i] = f16(x[2i]) | f16(x[2i + 1]) << 16   (one invocation per word)
// half_unpack: out[j] = f32(x[j / 2]'s half j % 2)          (one invocation per element)
//
// These are conversions, not differentiated ops, hence no _forward / _backward pair. Both work
// on the bits alone (every binding is array<u32>): rounding is to nearest even, a value beyond
// f16's range becomes ±Inf and a NaN stays NaN, exactly as the CPU twin (io::half) does, on every
// device. pack2x16float would need no code, but WGSL leaves its result indeterminate out of
// range, and a run must see an overflowed activation (the gradient check then stops it) instead
// of some arbitrary finite value. Grids may be 2-D: workgroup (x, y) covers items from
// (y * gx + x) * 256.

struct Params {
    n: u32,  // elements (f32 values) of the tensor
    gx: u32, // workgroups along x in this dispatch
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

fn index(wg: vec3<u32>, t: u32) -> u32 {
    return (wg.y * p.gx + wg.x) * 256u + t;
}

// The binary16 bits of the f32 with bits `b`, rounded to nearest even.
fn to_half(b: u32) -> u32 {
    let sign = (b >> 16u) & 0x8000u;
    let exp = i32((b >> 23u) & 0xffu);
    let man = b & 0x7fffffu;
    if (exp == 0xff) {
        return sign | 0x7c00u | select(0u, 0x200u, man != 0u);
    }
    let e = exp - 127 + 15;
    if (e >= 0x1f) {
        return sign | 0x7c00u;
    }
    if (e <= 0) {
        if (e < -10) {
            return sign;
        }
        // Subnormal: the mantissa with its implicit 1, shifted into place.
        let m = man | 0x800000u;
        let shift = u32(14 - e);
        let half = 1u << (shift - 1u);
        let rest = m & ((1u << shift) - 1u);
        var h = m >> shift;
        if (rest > half || (rest == half && (h & 1u) == 1u)) {
            h = h + 1u;
        }
        return sign | h;
    }
    var h = (u32(e) << 10u) | (man >> 13u);
    let rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u) == 1u)) {
        h = h + 1u; // a carry into the exponent is the correct rounding
    }
    return sign | h;
}

// The f32 bits of the binary16 `h` (exact for every input).
fn to_single(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let exp = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if (exp == 0u) {
        if (man == 0u) {
            return sign;
        }
        // Subnormal: normalise for f32.
        let shift = countLeadingZeros(man) - 21u;
        return sign | ((127u - 15u + 1u - shift) << 23u) | (((man << shift) & 0x3ffu) << 13u);
    }
    if (exp == 0x1fu) {
        return sign | 0x7f800000u | (man << 13u);
    }
    return sign | ((exp + 127u - 15u) << 23u) | (man << 13u);
}

@compute @workgroup_size(256, 1, 1)
fn half_pack(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let w = index(wg, t);
    let i = 2u * w;
    if (i >= p.n) { return; }
    var hi = 0u;
    if (i + 1u < p.n) { hi = to_half(x[i + 1u]); }
    out[w] = to_half(x[i]) | (hi << 16u);
}

@compute @workgroup_size(256, 1, 1)
fn half_unpack(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j = index(wg, t);
    if (j >= p.n) { return; }
    out[j] = to_single((x[j / 2u] >> (16u * (j % 2u))) & 0xffffu);
}
