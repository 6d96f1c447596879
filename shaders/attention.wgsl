// attention: causal softmax attention with grouped-query heads, f32.
//
// attention_forward: for each (batch b, head h, query row t at absolute position q_offset + t):
//   out[b, t, h, :] = sum_{s ≤ q_offset + t} softmax_s(q[b, t, h, :] · k[b, s, g, :] · scale) · v[b, s, g, :]
// where g = h / (heads / kv_heads) is the shared key/value head. The softmax is computed online
// (running max and sum), which is numerically stable and needs one pass over s; the log-sum-exp
// of each row is stored for the backward pass. One invocation per (b, h, t).
// Layouts: q, out (batch, seq, heads, head_dim); k, v (batch, kv_seq, kv_heads, head_dim);
// lse (batch, heads, seq). Training has kv_seq = seq and q_offset = 0; generation appends
// queries after a KV cache (q_offset = cached positions, kv_seq = q_offset + seq).

struct Params {
    batch: u32,
    seq: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    gx: u32,
    scale: f32,
    kv_seq: u32,
    q_offset: u32,
}

const MAX_HEAD_DIM: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let gid = (wg.y * p.gx + wg.x) * 64u + li;
    if (gid >= p.batch * p.heads * p.seq) { return; }
    // gid = (b * heads + h) * seq + t
    let t = gid % p.seq;
    let bh = gid / p.seq;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let g = h / (p.heads / p.kv_heads);
    let d = p.head_dim;
    let q_base = ((b * p.seq + t) * p.heads + h) * d;
    var acc: array<f32, MAX_HEAD_DIM>;
    for (var i = 0u; i < d; i++) { acc[i] = 0.0; }
    var m = -3.0e38;
    var l = 0.0;
    for (var s = 0u; s <= p.q_offset + t; s++) {
        let kv_base = ((b * p.kv_seq + s) * p.kv_heads + g) * d;
        var dot = 0.0;
        for (var i = 0u; i < d; i++) { dot += q[q_base + i] * k[kv_base + i]; }
        let score = dot * p.scale;
        let m_new = max(m, score);
        let correction = exp(m - m_new);
        let e = exp(score - m_new);
        l = l * correction + e;
        for (var i = 0u; i < d; i++) { acc[i] = acc[i] * correction + e * v[kv_base + i]; }
        m = m_new;
    }
    let inv = 1.0 / l;
    for (var i = 0u; i < d; i++) { out[q_base + i] = acc[i] * inv; }
    lse[gid] = m + log(l);
}
