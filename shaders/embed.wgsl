// embed: token embedding lookup, f32 out.
//
// embed_forward: out[t, :] = table[ids[t] − first, :] for the ids in [first, last); rows of
// other ids are left alone. A table larger than one storage binding is stored as parts of
// consecutive rows, one dispatch per part, and every id falls in exactly one part.
// One invocation per output element. Ids are checked against the vocabulary on the host.
//
// Template (src/ops/embed.rs): PACKED reads a table stored as f16 or GGUF blocks (see
// src/ops/quant.rs): one invocation per four output elements, dequantized by QLOAD.

struct Params {
    tokens: u32,
    dim: u32,
    gx: u32,
    first: u32,
    last: u32,
    qoff: u32,  // PACKED: the word where the table's scales begin
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;         // (tokens,)
// #if PACKED
@group(0) @binding(2) var<storage, read> table: array<u32>;       // (vocab, dim) or a part's (last − first, dim), packed
// #else
@group(0) @binding(2) var<storage, read> table: array<f32>;       // (vocab, dim) or a part's (last − first, dim)
// #endif
@group(0) @binding(3) var<storage, read_write> out: array<f32>;   // (tokens, dim)

// #if PACKED
{{QLOAD}}

@compute @workgroup_size(256, 1, 1)
fn embed_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = ((wg.y * p.gx + wg.x) * 256u + li) * 4u;
    if (i >= p.tokens * p.dim) { return; }
    let t = i / p.dim;
    let c = i % p.dim;
    let id = ids[t];
    if (id >= p.first && id < p.last) {
        let v = qload4((id - p.first) * p.dim + c);
        out[i] = v.x;
        out[i + 1u] = v.y;
        out[i + 2u] = v.z;
        out[i + 3u] = v.w;
    }
}
// #else
@compute @workgroup_size(256, 1, 1)
fn embed_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = (wg.y * p.gx + wg.x) * 256u + li;
    if (i >= p.tokens * p.dim) { return; }
    let t = i / p.dim;
    let c = i % p.dim;
    let id = ids[t];
    if (id >= p.first && id < p.last) {
        out[i] = table[(id - p.first) * p.dim + c];
    }
}
// #endif
