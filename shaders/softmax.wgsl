// softmax: the causal softmax of attention scores, in place (ops::attention's matmul path).
//
// Scores are stored transposed, key-major: st (B·H, T, T) with st[z, s, t] the (scaled) score
// of query t against key s. One invocation per query column then walks down its column, and at
// every step the lanes of a subgroup read consecutive addresses (a vector load, not a gather;
// no barriers either: each invocation owns its column). Query t may look at keys 0..=t, or only
// the last `window` of them; with documents packed into rows (docs = 1), none before its own
// document's first token (t − its position in the document).
//
// softmax_forward: lse[z, t] = log(sum_{s<=t} exp(st[z, s, t])); st[z, s, t] <- exp(st − lse)
//   for s <= t and 0 below the diagonal (so that the products with P need no mask).
// softmax_backward: from the scores (recomputed by the backward pass), lse and dpt = dL/dPᵀ:
//   P = exp(st − lse) masked as above, D_t = sum_s P·dP, st <- P (for dV = Pᵀ·dO) and
//   dpt <- P · (dP − D_t) (dL/dscores, for dQ and dK).

struct Params {
    seq: u32,     // T (the grid's y is B·H)
    window: u32,  // sliding window: query t sees keys t − window < s ≤ t (0: all keys up to t)
    heads: u32,   // H: row z = b · H + h
    docs: u32,    // 1: documents packed in a row see only themselves (positions, below)
}

// The first key query t of grid row z sees: within the window, and with packed documents not
// before its document's start (t − its position in the document).
fn first_key(t: u32, pos: u32) -> u32 {
    var lo = 0u;
    if (p.window != 0u && t >= p.window) { lo = t + 1u - p.window; }
    if (p.docs == 1u) { lo = max(lo, t - pos); }
    return lo;
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> st: array<f32>;   // (B·H, T, T) key-major
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;  // (B·H, T)
@group(0) @binding(3) var<storage, read> fpos: array<u32>;       // (B, T) positions in documents

// Grid: x = blocks of 64 query columns, y = B·H.
@compute @workgroup_size(64, 1, 1)
fn softmax_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.x * 64u + li;
    if (t >= p.seq) { return; }
    let base = wg.y * p.seq * p.seq + t;
    var pos = 0u;
    if (p.docs == 1u) { pos = fpos[(wg.y / p.heads) * p.seq + t]; }
    let lo = first_key(t, pos);
    var m = -3.0e38;
    for (var s = lo; s <= t; s++) { m = max(m, st[base + s * p.seq]); }
    var sum = 0.0;
    for (var s = lo; s <= t; s++) { sum += exp(st[base + s * p.seq] - m); }
    let l = m + log(sum);
    for (var s = 0u; s < p.seq; s++) {
        let i = base + s * p.seq;
        st[i] = select(0.0, exp(st[i] - l), s <= t && s >= lo);
    }
    lse[wg.y * p.seq + t] = l;
}

@group(0) @binding(1) var<storage, read_write> bst: array<f32>;  // (B·H, T, T): scores in, P out
@group(0) @binding(2) var<storage, read> blse: array<f32>;       // (B·H, T)
@group(0) @binding(3) var<storage, read_write> dpt: array<f32>;  // (B·H, T, T): dL/dP in, dL/dscores out
@group(0) @binding(4) var<storage, read> bpos: array<u32>;       // (B, T) positions in documents

@compute @workgroup_size(64, 1, 1)
fn softmax_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.x * 64u + li;
    if (t >= p.seq) { return; }
    let base = wg.y * p.seq * p.seq + t;
    let l = blse[wg.y * p.seq + t];
    var pos = 0u;
    if (p.docs == 1u) { pos = bpos[(wg.y / p.heads) * p.seq + t]; }
    let lo = first_key(t, pos);
    var d = 0.0;
    for (var s = lo; s <= t; s++) {
        let i = base + s * p.seq;
        d += exp(bst[i] - l) * dpt[i];
    }
    for (var s = 0u; s < p.seq; s++) {
        let i = base + s * p.seq;
        let pr = select(0.0, exp(bst[i] - l), s <= t && s >= lo);
        bst[i] = pr;
        dpt[i] = pr * (dpt[i] - d);
    }
}
