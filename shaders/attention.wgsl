// attention: causal softmax attention with grouped-query heads, f32, optionally within a sliding
// window (a query at position i attends to keys i − window < s ≤ i).
//
// attention_forward: for each (batch b, head h, query row t at absolute position q_offset + t):
//   out[b, t, h, :] = sum_{s ≤ q_offset + t} softmax_s(q[b, t, h, :] · k[b, s, g, :] · scale) · v[b, s, g, :]
// where g = h / (heads / kv_heads) is the shared key/value head. The softmax is computed online
// (running max and sum), which is numerically stable and needs one pass over s; the log-sum-exp
// of each row is stored for the backward pass. One invocation per (b, h, t).
// Backward (training: q_offset = 0, kv_seq = seq), recomputing the probabilities from the saved
// lse instead of storing the (T × T) attention matrix, as FlashAttention does. With
// P[t, s] = exp(q_t · k_s · scale − lse_t) and D_t = dout_t · out_t:
//   attention_backward_dq:  dq_t = scale · sum_{s ≤ t} P[t, s] (dout_t · v_s − D_t) k_s; also writes D.
//   attention_backward_dkv: dk_s = scale · sum_{h in group} sum_{t ≥ s} P[t, s] (dout_t · v_s − D_t) q_t,
//                           dv_s = sum_{h in group} sum_{t ≥ s} P[t, s] dout_t.
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
    window: u32,  // sliding window: query at position i sees keys i − window < s ≤ i (0: all)
    docs: u32,    // 1: documents packed in a row see only themselves (see below)
}

// Packed documents (docs = 1; training and evaluation, q_offset = 0): query t sees no key before
// its document's first token, start(t) = t − positions[b, t]. The forward reads the positions
// and writes each token's start after lse's (B, H, T) values (lse is then (B·H·T + B·T,)), where
// the backward kernels, already at WebGPU's guaranteed 8 storage buffers, read it. It is stored
// as an f32 value (exact below 2^24), not as the u32's bits: those would be a subnormal float,
// which a driver may flush to 0.
fn start_slot(b: u32, t: u32) -> u32 {
    return p.batch * p.heads * p.seq + b * p.seq + t;
}

// The first key a query at absolute position `pos` sees.
fn first_key(pos: u32) -> u32 {
    if (p.window == 0u || pos < p.window) { return 0u; }
    return pos + 1u - p.window;
}

// The last query (exclusive bound) that sees key `s`, among `seq` queries at positions 0..seq.
fn end_query(s: u32, seq: u32) -> u32 {
    if (p.window == 0u) { return seq; }
    return min(seq, s + p.window);
}

const MAX_HEAD_DIM: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;  // (B, H, T) (+ (B, T) starts with docs)
@group(0) @binding(6) var<storage, read> fpos: array<u32>;  // (B, T) positions in documents (docs = 1)

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
    var lo = first_key(p.q_offset + t);
    if (p.docs == 1u) {
        let start = t - fpos[b * p.seq + t];
        lo = max(lo, start);
        if (h == 0u) { lse[start_slot(b, t)] = f32(start); }
    }
    for (var s = lo; s <= p.q_offset + t; s++) {
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

// Backward bindings (reusing binding numbers; see the forward's layout comment).
@group(0) @binding(1) var<storage, read> bq: array<f32>;            // (B, T, H, d)
@group(0) @binding(2) var<storage, read> bk: array<f32>;            // (B, T, KV, d)
@group(0) @binding(3) var<storage, read> bv: array<f32>;            // (B, T, KV, d)
@group(0) @binding(4) var<storage, read> bout: array<f32>;          // (B, T, H, d)
@group(0) @binding(5) var<storage, read> blse: array<f32>;          // (B, H, T) (+ (B, T) starts with docs)
@group(0) @binding(6) var<storage, read> dout: array<f32>;          // (B, T, H, d)
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;      // (B, T, H, d)
@group(0) @binding(8) var<storage, read_write> dsum: array<f32>;    // (B, H, T): D_t

// attention_backward_dkv's bindings 4..8 (1..3 are shared with the above): 8 storage buffers
// per entry point at most, WebGPU's guaranteed minimum.
@group(0) @binding(4) var<storage, read> klse: array<f32>;          // (B, H, T) (+ (B, T) starts with docs)
@group(0) @binding(5) var<storage, read> kdout: array<f32>;         // (B, T, H, d)
@group(0) @binding(6) var<storage, read> bdsum: array<f32>;         // (B, H, T)
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;      // (B, T, KV, d)
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;      // (B, T, KV, d)

@compute @workgroup_size(64, 1, 1)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let gid = (wg.y * p.gx + wg.x) * 64u + li;
    if (gid >= p.batch * p.heads * p.seq) { return; }
    let t = gid % p.seq;
    let bh = gid / p.seq;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let g = h / (p.heads / p.kv_heads);
    let d = p.head_dim;
    let q_base = ((b * p.seq + t) * p.heads + h) * d;
    var dsum_t = 0.0;
    for (var i = 0u; i < d; i++) { dsum_t += dout[q_base + i] * bout[q_base + i]; }
    var acc: array<f32, MAX_HEAD_DIM>;
    for (var i = 0u; i < d; i++) { acc[i] = 0.0; }
    let l = blse[gid];
    var lo = first_key(t);
    if (p.docs == 1u) { lo = max(lo, u32(blse[start_slot(b, t)])); }
    for (var s = lo; s <= t; s++) {
        let kv_base = ((b * p.seq + s) * p.kv_heads + g) * d;
        var qk = 0.0;
        var dv_dot = 0.0;
        for (var i = 0u; i < d; i++) {
            qk += bq[q_base + i] * bk[kv_base + i];
            dv_dot += dout[q_base + i] * bv[kv_base + i];
        }
        let pr = exp(qk * p.scale - l);
        let ds = pr * (dv_dot - dsum_t) * p.scale;
        for (var i = 0u; i < d; i++) { acc[i] += ds * bk[kv_base + i]; }
    }
    for (var i = 0u; i < d; i++) { dq[q_base + i] = acc[i]; }
    dsum[gid] = dsum_t;
}

@compute @workgroup_size(64, 1, 1)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let gid = (wg.y * p.gx + wg.x) * 64u + li;
    if (gid >= p.batch * p.kv_heads * p.seq) { return; }
    // gid = (b * kv_heads + g) * seq + s
    let s = gid % p.seq;
    let bg = gid / p.seq;
    let g = bg % p.kv_heads;
    let b = bg / p.kv_heads;
    let group = p.heads / p.kv_heads;
    let d = p.head_dim;
    let kv_base = ((b * p.seq + s) * p.kv_heads + g) * d;
    var acc_k: array<f32, MAX_HEAD_DIM>;
    var acc_v: array<f32, MAX_HEAD_DIM>;
    for (var i = 0u; i < d; i++) { acc_k[i] = 0.0; acc_v[i] = 0.0; }
    for (var hh = 0u; hh < group; hh++) {
        let h = g * group + hh;
        for (var t = s; t < end_query(s, p.seq); t++) {
            // Starts never decrease along a row: past the first query of a later document, none
            // sees key s.
            if (p.docs == 1u && u32(klse[start_slot(b, t)]) > s) { break; }
            let q_base = ((b * p.seq + t) * p.heads + h) * d;
            let row = (b * p.heads + h) * p.seq + t;
            var qk = 0.0;
            var dv_dot = 0.0;
            for (var i = 0u; i < d; i++) {
                qk += bq[q_base + i] * bk[kv_base + i];
                dv_dot += kdout[q_base + i] * bv[kv_base + i];
            }
            let pr = exp(qk * p.scale - klse[row]);
            let ds = pr * (dv_dot - bdsum[row]) * p.scale;
            for (var i = 0u; i < d; i++) {
                acc_k[i] += ds * bq[q_base + i];
                acc_v[i] += pr * kdout[q_base + i];
            }
        }
    }
    for (var i = 0u; i < d; i++) {
        dk[kv_base + i] = acc_k[i];
        dv[kv_base + i] = acc_v[i];
    }
}
