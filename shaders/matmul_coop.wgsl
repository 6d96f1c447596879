enable f16;
enable wgpu_cooperative_matrix;
// matmul (cooperative-matrix path): C = alpha * A · op(B) (+ C) on the matrix units (NVIDIA
// tensor cores, Apple simdgroup matrices, VK_KHR_cooperative_matrix; Mesa's lavapipe >= 26.1
// offers them on the CPU) through wgpu's experimental `wgpu_cooperative_matrix`.
//
// Same Params as shaders/matmul.wgsl; A is f32 (M, K) with row stride lda (not transposed, no
// batch), B f32 or packed (QB: f16 / GGUF blocks, as the subgroup kernel reads them), stored
// (K, N) or, with TRANS_B, (N, K). Every value is rounded to f16 as it is staged into workgroup
// memory and the products accumulate in f32: callers send only products whose A fits f16's range
// (the forward pass's activations, not gradients: see src/ops/matmul_coop.rs).
//
// A workgroup is S lanes (one subgroup) computing a BM x BN tile of C as (BM/T) x (BN/T)
// cooperative T x T accumulators. Per step of BK along K, the lanes stage A's and B's tiles into
// workgroup memory (f32 -> f16, zeros past the matrix's edges, so any shape works), then the
// subgroup multiplies them tile by tile. The accumulators go through workgroup memory on the way
// out, where alpha, accumulation and the edges are applied element by element.
// Template: T (8 or 16, what the adapter offers), S, BM, BN, BK, the generated ACC / MMA / STORE
// bodies (src/ops/matmul_coop.rs), flags TRANS_B and QB (with QLOAD, B's dequantizing load).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    accumulate: u32,
    alpha: f32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    qoff: u32,
    side_n: u32,
    side_ld: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;        // (M, K)
@group(0) @binding(2) var<storage, read> b: array<u32>;        // (K, N) or TRANS_B (N, K): f32 bits or packed
@group(0) @binding(3) var<storage, read_write> c: array<f32>;  // (M, N)

const S = {{S}}u;
const BM = {{BM}}u;
const BN = {{BN}}u;
const BK = {{BK}}u;
// A's tile (BM, BK) row-major; B's (BK, BN) row-major, or with TRANS_B (BN, BK) row-major (which
// is op(B)'s tile column-major); C's (BM, BN) row-major.
var<workgroup> sa: array<f16, {{SA}}>;
var<workgroup> sb: array<f16, {{SB}}>;
var<workgroup> sc: array<f32, {{SC}}>;

// Out-of-range indices are memory-safe in WGSL (accesses are clamped); `select` then discards
// the value, so padding reads as exactly 0.
fn a_at(row: u32, col: u32) -> f32 {
    return select(0.0, a[row * p.lda + col], row < p.m && col < p.k);
}
fn a_load4(row: u32, col: u32) -> vec4<f32> {
    return vec4<f32>(a_at(row, col), a_at(row, col + 1u), a_at(row, col + 2u), a_at(row, col + 3u));
}
// #if QB
{{QLOAD}}
// Four consecutive elements of B's stored row `row` from column `col` (a multiple of 4, as are
// the row lengths on this path, so four are either all inside or all past the edge).
fn b_load4(row: u32, col: u32, rows: u32, cols: u32) -> vec4<f32> {
    if (row >= rows || col >= cols) { return vec4<f32>(0.0); }
    return qload4(row * p.ldb + col);
}
// #else
fn b_at(row: u32, col: u32, rows: u32, cols: u32) -> f32 {
    return select(0.0, bitcast<f32>(b[row * p.ldb + col]), row < rows && col < cols);
}
fn b_load4(row: u32, col: u32, rows: u32, cols: u32) -> vec4<f32> {
    return vec4<f32>(b_at(row, col, rows, cols), b_at(row, col + 1u, rows, cols),
                     b_at(row, col + 2u, rows, cols), b_at(row, col + 3u, rows, cols));
}
// #endif

fn put4(o: u32, v: vec4<f32>, to_b: bool) {
    let h = vec4<f16>(v);
    if (to_b) {
        sb[o] = h.x; sb[o + 1u] = h.y; sb[o + 2u] = h.z; sb[o + 3u] = h.w;
    } else {
        sa[o] = h.x; sa[o + 1u] = h.y; sa[o + 2u] = h.z; sa[o + 3u] = h.w;
    }
}

// Stages A's and B's tiles at (row0, col0) and K offset k0, four elements per lane and load.
fn stage(lane: u32, row0: u32, col0: u32, k0: u32) {
    for (var u = lane; u < BM * BK / 4u; u += S) {
        let r = u / (BK / 4u);
        let q = (u % (BK / 4u)) * 4u;
        put4(r * BK + q, a_load4(row0 + r, k0 + q), false);
    }
// #if TRANS_B
    for (var u = lane; u < BN * BK / 4u; u += S) {
        let n = u / (BK / 4u);
        let q = (u % (BK / 4u)) * 4u;
        put4(n * BK + q, b_load4(col0 + n, k0 + q, p.n, p.k), true);
    }
// #else
    for (var u = lane; u < BK * BN / 4u; u += S) {
        let kk = u / (BN / 4u);
        let q = (u % (BN / 4u)) * 4u;
        put4(kk * BN + q, b_load4(k0 + kk, col0 + q, p.k, p.n), true);
    }
// #endif
}

@compute @workgroup_size({{S}}, 1, 1)
fn matmul_coop_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
{{ACC}}
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        stage(lane, row0, col0, k0);
        workgroupBarrier();
{{MMA}}
        workgroupBarrier();
    }
{{STORE}}
    workgroupBarrier();
    for (var e = lane; e < BM * BN; e += S) {
        let row = row0 + e / BN;
        let col = col0 + e % BN;
        if (row < p.m && col < p.n) {
            let i = row * p.ldc + col;
            var out = p.alpha * sc[e];
            if (p.accumulate != 0u) { out += c[i]; }
            c[i] = out;
        }
    }
}
