// attention_vec4: attention.wgsl's kernels (same math, same bindings and layouts; read its
// header) specialised for head_dim = 4·D4, expanded from Rust with {{D4}}.
//
// Work layout: one workgroup per 64 consecutive query rows (dkv: key rows) of one (batch, head)
// (dkv: (batch, kv head)), so at each step of the inner loop every invocation reads the same key
// and value row (dkv: query row): those loads are uniform across the workgroup, which GPUs serve
// as broadcasts and CPU drivers such as lavapipe as scalar loads, instead of a gather per lane.
// Each invocation keeps its own row (and its accumulators) in vec4 registers: the loops over the
// head dimension are written out by Rust (ops::attention::vec4_kernel), one line per vec4, as
// FWD_DOT and the like (template variables). Causal masking is a per-invocation condition inside a loop whose
// bounds are the workgroup's.

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
    window: u32,  // sliding window (0: none); see attention.wgsl
    docs: u32,    // 1: packed documents see only themselves; see attention.wgsl
}

// Where a token's document start is kept after lse's values (see attention.wgsl).
fn start_slot(b: u32, t: u32) -> u32 {
    return p.batch * p.heads * p.seq + b * p.seq + t;
}

// Whether the query at absolute position `pos` sees key `s` (causal, within the window).
fn sees(pos: u32, s: u32) -> bool {
    return s <= pos && (p.window == 0u || s + p.window > pos);
}

// The first key the query at absolute position `pos` sees.
fn first_key(pos: u32) -> u32 {
    if (p.window == 0u || pos < p.window) { return 0u; }
    return pos + 1u - p.window;
}

const D4: u32 = {{D4}}u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;         // (B, T, H, d)
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;         // (B, kv_seq, KV, d)
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;         // (B, kv_seq, KV, d)
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>; // (B, T, H, d)
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;       // (B, H, T) (+ (B, T) starts)
@group(0) @binding(6) var<storage, read> fpos: array<u32>;            // (B, T) positions (docs = 1)

fn hsum(x: vec4<f32>) -> f32 {
    return (x.x + x.y) + (x.z + x.w);
}

// Grid: x = blocks of 64 query rows, y = batch · heads.
@compute @workgroup_size(64, 1, 1)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.y % p.heads;
    let b = wg.y / p.heads;
    let g = h / (p.heads / p.kv_heads);
    let t = wg.x * 64u + li;
    let tt = min(t, p.seq - 1u);
    let qb = ((b * p.seq + tt) * p.heads + h) * D4;
{{FWD_DECL}}
    var m = -3.0e38;
    var l = 0.0;
    let mine = p.q_offset + tt;
    var start = 0u;
    if (p.docs == 1u) { start = tt - fpos[b * p.seq + tt]; }
    let last = p.q_offset + min(wg.x * 64u + 63u, p.seq - 1u);
    for (var s = first_key(p.q_offset + wg.x * 64u); s <= last; s++) {
        let kb = ((b * p.kv_seq + s) * p.kv_heads + g) * D4;
        var dot = vec4<f32>(0.0);
{{FWD_DOT}}
        if (sees(mine, s) && s >= start) {
            let score = hsum(dot);
            let m_new = max(m, score);
            let c = exp(m - m_new);
            let e = exp(score - m_new);
            l = l * c + e;
{{FWD_ACC}}
            m = m_new;
        }
    }
    if (t < p.seq) {
        let inv = 1.0 / l;
{{FWD_STORE}}
        lse[(b * p.heads + h) * p.seq + t] = m + log(l);
        if (p.docs == 1u && h == 0u) { lse[start_slot(b, t)] = f32(start); }
    }
}

@group(0) @binding(1) var<storage, read> bq: array<vec4<f32>>;        // (B, T, H, d)
@group(0) @binding(2) var<storage, read> bk: array<vec4<f32>>;        // (B, T, KV, d)
@group(0) @binding(3) var<storage, read> bv: array<vec4<f32>>;        // (B, T, KV, d)
@group(0) @binding(4) var<storage, read> bout: array<vec4<f32>>;      // (B, T, H, d)
@group(0) @binding(5) var<storage, read> blse: array<f32>;            // (B, H, T) (+ (B, T) starts with docs)
@group(0) @binding(6) var<storage, read> dout: array<vec4<f32>>;      // (B, T, H, d)
@group(0) @binding(7) var<storage, read_write> dq: array<vec4<f32>>;  // (B, T, H, d)
@group(0) @binding(8) var<storage, read_write> dsum: array<f32>;      // (B, H, T): D_t

@group(0) @binding(4) var<storage, read> klse: array<f32>;            // (B, H, T) (+ (B, T) starts with docs)
@group(0) @binding(5) var<storage, read> kdout: array<vec4<f32>>;     // (B, T, H, d)
@group(0) @binding(6) var<storage, read> bdsum: array<f32>;           // (B, H, T)
@group(0) @binding(7) var<storage, read_write> dk: array<vec4<f32>>;  // (B, T, KV, d)
@group(0) @binding(8) var<storage, read_write> dv: array<vec4<f32>>;  // (B, T, KV, d)

// Grid: x = blocks of 64 query rows, y = batch · heads.
@compute @workgroup_size(64, 1, 1)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.y % p.heads;
    let b = wg.y / p.heads;
    let g = h / (p.heads / p.kv_heads);
    let t = wg.x * 64u + li;
    let tt = min(t, p.seq - 1u);
    let qb = ((b * p.seq + tt) * p.heads + h) * D4;
    let row = (b * p.heads + h) * p.seq + tt;
    var dsum4 = vec4<f32>(0.0);
{{DQ_DECL}}
    let dsum_t = hsum(dsum4);
    let l = blse[row];
    var start = 0u;
    if (p.docs == 1u) { start = u32(blse[start_slot(b, tt)]); }
    let last = min(wg.x * 64u + 63u, p.seq - 1u);
    for (var s = first_key(wg.x * 64u); s <= last; s++) {
        let kb = ((b * p.seq + s) * p.kv_heads + g) * D4;
        var qk = vec4<f32>(0.0);
        var dvd = vec4<f32>(0.0);
{{DQ_DOT}}
        if (sees(tt, s) && s >= start) {
            let pr = exp(hsum(qk) * p.scale - l);
            let ds = pr * (hsum(dvd) - dsum_t) * p.scale;
{{DQ_ACC}}
        }
    }
    if (t < p.seq) {
{{DQ_STORE}}
        dsum[row] = dsum_t;
    }
}

// Grid: x = blocks of 64 key rows, y = batch · kv heads.
@compute @workgroup_size(64, 1, 1)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let g = wg.y % p.kv_heads;
    let b = wg.y / p.kv_heads;
    let group = p.heads / p.kv_heads;
    let s = wg.x * 64u + li;
    let ss = min(s, p.seq - 1u);
    let kb = ((b * p.seq + ss) * p.kv_heads + g) * D4;
{{DKV_DECL}}
    let first = wg.x * 64u;
    // Queries past the block's last key plus the window see none of its keys.
    var end = p.seq;
    if (p.window != 0u) { end = min(p.seq, min(wg.x * 64u + 63u, p.seq - 1u) + p.window); }
    for (var hh = 0u; hh < group; hh++) {
        let h = g * group + hh;
        for (var t = first; t < end; t++) {
            let qb = ((b * p.seq + t) * p.heads + h) * D4;
            let row = (b * p.heads + h) * p.seq + t;
            var qk = vec4<f32>(0.0);
            var dvd = vec4<f32>(0.0);
{{DKV_DOT}}
            var start = 0u;
            if (p.docs == 1u) { start = u32(klse[start_slot(b, t)]); }
            if (sees(t, ss) && ss >= start) {
                let pr = exp(hsum(qk) * p.scale - klse[row]);
                let ds = pr * (hsum(dvd) - bdsum[row]) * p.scale;
{{DKV_ACC}}
            }
        }
    }
    if (s < p.seq) {
{{DKV_STORE}}
    }
}
