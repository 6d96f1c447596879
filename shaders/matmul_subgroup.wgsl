// #if F16
enable f16;
// #endif
// matmul (subgroup path): C = alpha * op(A) · op(B) (+ C), f32.
//
// Same conventions and Params as shaders/matmul.wgsl (read its header). This file is a template
// expanded by src/ops/matmul.rs (double-brace values and #if blocks), plus the unrolled
// inner loop (BODY) that Rust generates for the chosen subgroup size and tile.
//
// Why this shape: on CPU drivers such as lavapipe, each invocation is one SIMD lane and every
// load whose address differs between lanes is a gather, so the cost is loads per FMA. A
// workgroup here is exactly one subgroup of S lanes. Each lane loads a vec4 of A for a
// few rows; `subgroupBroadcast(value, lane)` then hands each row to every lane through registers
// (no shared memory, no barriers). Each lane owns TNV vec4 column(s) of C for TM rows.
// The broadcast lane index must be a constant expression in WGSL, hence the generated body.
//
// Correct for any subgroup size from 4 to 128: S is the adapter's *minimum* subgroup size, so
// the S invocations of a workgroup always sit in one subgroup, and lanes are identified by
// subgroup_invocation_id.
//
// Variants: VEC (all of K, N — and M when A is transposed — plus the row and batch strides are
// multiples of 4) binds the buffers as vec4 arrays; otherwise every element is loaded with a
// bounds check. TRANS_A / TRANS_B choose how op(A) and op(B) are read (template flags here).
// SIDE (with VEC, A not transposed, one batch): also C2 = op(A)·A2ᵀ for up to S columns (see
// the bindings). QB (with VEC only): B is a frozen 2-D weight stored packed, f16 or GGUF's Q8_0 / Q4_0 / Q4_1
// blocks, dequantized as it is loaded. B's loads are 1/TM of the FMAs, so the unpacking is
// cheap, and the weight needs no f32 copy in memory. F16 (with QB, B f16, on adapters with
// shader-f16): B is read as native f16 instead of unpacked from u32 words; same values.

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
    qoff: u32,  // packed B: the word where its scales begin (see src/ops/quant.rs)
    side_n: u32,  // SIDE: columns of the side product (a LoRA rank)
    side_ld: u32, // SIDE: row stride of A2
}

@group(0) @binding(0) var<uniform> p: Params;
// #if VEC
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;        // (batch?, M, K) or (batch?, K, M)
// #if QB
// B is a frozen weight stored packed (f16 or GGUF blocks, 2-D): QLOAD dequantizes four
// consecutive elements of one of its rows.
// #if F16
// f16 with shader-f16: four halves are one native load (element offsets are multiples of 4 on
// this path), widened to f32 exactly; the products still accumulate in f32.
@group(0) @binding(2) var<storage, read> b: array<vec4<f16>>;        // (K, N) or (N, K), f16
fn qload4(e: u32) -> vec4<f32> {
    return vec4<f32>(b[e / 4u]);
}
// #else
@group(0) @binding(2) var<storage, read> b: array<u32>;              // (K, N) or (N, K), packed
{{QLOAD}}
// #endif
fn b_row4(base: u32, k: u32, n: u32) -> vec4<f32> {
    return qload4(k * p.ldb + min(n, p.n - 4u));
}
fn b_col4(base: u32, n: u32, k: u32) -> vec4<f32> {
    return qload4(min(n, p.n - 1u) * p.ldb + k);
}
// #else
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;        // (batch?, K, N) or (batch?, N, K)
// #endif
@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;  // (batch, M, N)
// #if SIDE
// The side product C2 = op(A)·A2ᵀ (a LoRA branch's z = x·Aᵀ), computed by the workgroups of the
// first column tile while they hold op(A)'s rows anyway: x is read once for both products.
@group(0) @binding(4) var<storage, read> a2: array<vec4<f32>>;       // (side_n, K)
@group(0) @binding(5) var<storage, read_write> c2: array<f32>;       // (M, side_n)
fn a2_row4(col: u32, k: u32) -> vec4<f32> {
    return a2[(min(col, p.side_n - 1u) * p.side_ld + k) / 4u];
}
fn store_c2(row: u32, col: u32, v: f32) {
    if (row >= p.m || col >= p.side_n) { return; }
    c2[row * p.side_n + col] = v;
}
// #endif

// op(A)[row][k..k+4] for A stored (M, K). Rows past M are clamped: their results are never stored.
fn a_row4(base: u32, row: u32, k: u32) -> vec4<f32> {
    return a[(base + min(row, p.m - 1u) * p.lda + k) / 4u];
}
// A[k][m..m+4] for A stored (K, M), i.e. four rows of op(A) at one k.
fn a_col4(base: u32, k: u32, m: u32) -> vec4<f32> {
    return a[(base + k * p.lda + min(m, p.m - 4u)) / 4u];
}
// #if !QB
// op(B)[k][n..n+4] for B stored (K, N).
fn b_row4(base: u32, k: u32, n: u32) -> vec4<f32> {
    return b[(base + k * p.ldb + min(n, p.n - 4u)) / 4u];
}
// B[n][k..k+4] for B stored (N, K), i.e. column n of op(B) at k..k+4.
fn b_col4(base: u32, n: u32, k: u32) -> vec4<f32> {
    return b[(base + min(n, p.n - 1u) * p.ldb + k) / 4u];
}
// #endif
fn store_c(base: u32, row: u32, n: u32, v: vec4<f32>) {
    if (row >= p.m || n >= p.n) { return; }
    let i = (base + row * p.ldc + n) / 4u;
    var out = p.alpha * v;
    if (p.accumulate != 0u) { out += c[i]; }
    c[i] = out;
}
// #else
@group(0) @binding(1) var<storage, read> a: array<f32>;        // (batch?, M, K) or (batch?, K, M)
@group(0) @binding(2) var<storage, read> b: array<f32>;        // (batch?, K, N) or (batch?, N, K)
@group(0) @binding(3) var<storage, read_write> c: array<f32>;  // (batch, M, N)

// Out-of-range indices are still memory-safe in WGSL (accesses are clamped); `select` then
// discards the value, so padding reads as exactly 0.
fn ga(i: u32, ok: bool) -> f32 { return select(0.0, a[i], ok); }
fn gb(i: u32, ok: bool) -> f32 { return select(0.0, b[i], ok); }

fn a_row4(base: u32, row: u32, k: u32) -> vec4<f32> {
    let i = base + row * p.lda + k;
    let r = row < p.m;
    return vec4<f32>(ga(i, r && k < p.k), ga(i + 1u, r && k + 1u < p.k),
                     ga(i + 2u, r && k + 2u < p.k), ga(i + 3u, r && k + 3u < p.k));
}
fn a_col4(base: u32, k: u32, m: u32) -> vec4<f32> {
    let i = base + k * p.lda + m;
    let r = k < p.k;
    return vec4<f32>(ga(i, r && m < p.m), ga(i + 1u, r && m + 1u < p.m),
                     ga(i + 2u, r && m + 2u < p.m), ga(i + 3u, r && m + 3u < p.m));
}
fn b_row4(base: u32, k: u32, n: u32) -> vec4<f32> {
    let i = base + k * p.ldb + n;
    let r = k < p.k;
    return vec4<f32>(gb(i, r && n < p.n), gb(i + 1u, r && n + 1u < p.n),
                     gb(i + 2u, r && n + 2u < p.n), gb(i + 3u, r && n + 3u < p.n));
}
fn b_col4(base: u32, n: u32, k: u32) -> vec4<f32> {
    let i = base + n * p.ldb + k;
    let r = n < p.n;
    return vec4<f32>(gb(i, r && k < p.k), gb(i + 1u, r && k + 1u < p.k),
                     gb(i + 2u, r && k + 2u < p.k), gb(i + 3u, r && k + 3u < p.k));
}
fn store_c(base: u32, row: u32, n: u32, v: vec4<f32>) {
    if (row >= p.m) { return; }
    let i = base + row * p.ldc + n;
    for (var j = 0u; j < 4u; j++) {
        if (n + j < p.n) {
            var out = p.alpha * v[j];
            if (p.accumulate != 0u) { out += c[i + j]; }
            c[i + j] = out;
        }
    }
}
// #endif

@compute @workgroup_size({{S}}, 1, 1)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let base_a = wg.z * p.stride_a;
    let base_b = wg.z * p.stride_b;
    let base_c = wg.z * p.stride_c;
    let row0 = wg.y * {{TM}}u;
    let col0 = wg.x * {{TILE_N}}u;
{{BODY}}
}
