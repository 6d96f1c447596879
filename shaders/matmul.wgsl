// matmul: C = alpha * op(A) · op(B) (+ C), f32, portable path (no subgroup operations).
//
// Conventions (shared with shaders/matmul_subgroup.wgsl and src/ops/matmul.rs):
// - Row-major storage. Logical shapes: op(A) is (M, K), op(B) is (K, N), C is (M, N).
// - TRANS_A = false: A is stored (M, K); true: A is stored (K, M) and read transposed.
// - TRANS_B = false: B is stored (K, N); true: B is stored (N, K) and read transposed.
//   A linear layer y = x Wᵀ is (TRANS_A, TRANS_B) = (false, true); its backward needs
//   dx = g W (false, false) and dW = gᵀ x (true, false).
// - Row strides (leading dimensions) lda, ldb, ldc: elements from one stored row to the next;
//   equal to the stored width for contiguous matrices, larger for column views (a block of
//   columns of a wider matrix, e.g. one vocabulary part of the logits).
// - Batched (strided) form: workgroup z indexes the batch; matrix `b` of A starts at
//   b * stride_a elements (stride 0 broadcasts one matrix to every batch), likewise B and C.
// - accumulate = 0 writes C = alpha·op(A)op(B) and never reads C (it may hold NaN);
//   accumulate = 1 writes C = C + alpha·op(A)op(B).
//
// Tiling: a workgroup of 16×16 invocations computes a 64×64 tile of C, each invocation a 4×4
// block held in registers. Both operands pass through workgroup (shared) memory in slices of
// 16 along K, so each element loaded from global memory is reused by 16 invocations.

override TRANS_A: bool = false;
override TRANS_B: bool = false;

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
@group(0) @binding(1) var<storage, read> a: array<f32>;        // (batch?, M, K) or (batch?, K, M)
@group(0) @binding(2) var<storage, read> b: array<f32>;        // (batch?, K, N) or (batch?, N, K)
@group(0) @binding(3) var<storage, read_write> c: array<f32>;  // (batch, M, N)

const TILE: u32 = 64u;  // rows and columns of C per workgroup
const KT: u32 = 16u;    // K slice staged in shared memory
const R: u32 = 4u;      // rows and columns per invocation

var<workgroup> a_tile: array<f32, 1024>;  // (KT, TILE): a_tile[kk * TILE + row]
var<workgroup> b_tile: array<f32, 1024>;  // (KT, TILE): b_tile[kk * TILE + col]

// Element (row, kk) of op(A) for the current batch; 0 outside the matrix.
fn load_a(base: u32, row: u32, kk: u32) -> f32 {
    if (row >= p.m || kk >= p.k) { return 0.0; }
    if (TRANS_A) { return a[base + kk * p.lda + row]; }
    return a[base + row * p.lda + kk];
}

// Element (kk, col) of op(B) for the current batch; 0 outside the matrix.
fn load_b(base: u32, kk: u32, col: u32) -> f32 {
    if (kk >= p.k || col >= p.n) { return 0.0; }
    if (TRANS_B) { return b[base + col * p.ldb + kk]; }
    return b[base + kk * p.ldb + col];
}

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let batch = wg.z;
    let base_a = batch * p.stride_a;
    let base_b = batch * p.stride_b;
    let base_c = batch * p.stride_c;
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    let tid = lid.y * 16u + lid.x;

    var acc: array<vec4<f32>, 4>;  // acc[i][j] = C[row0 + lid.y*4 + i][col0 + lid.x*4 + j]
    for (var i = 0u; i < R; i++) { acc[i] = vec4<f32>(0.0); }

    for (var k0 = 0u; k0 < p.k; k0 += KT) {
        // 256 invocations stage 1024 elements of each operand: 4 each.
        for (var s = 0u; s < 4u; s++) {
            let e = tid + s * 256u;
            // For A, consecutive invocations walk rows when A is transposed (contiguous in
            // memory there) and K otherwise; the same idea for B.
            var kk: u32; var rr: u32;
            if (TRANS_A) { kk = e / TILE; rr = e % TILE; } else { rr = e / KT; kk = e % KT; }
            a_tile[kk * TILE + rr] = load_a(base_a, row0 + rr, k0 + kk);
            var kb: u32; var cc: u32;
            if (TRANS_B) { cc = e / KT; kb = e % KT; } else { kb = e / TILE; cc = e % TILE; }
            b_tile[kb * TILE + cc] = load_b(base_b, k0 + kb, col0 + cc);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            let av = vec4<f32>(a_tile[kk * TILE + lid.y * 4u], a_tile[kk * TILE + lid.y * 4u + 1u],
                               a_tile[kk * TILE + lid.y * 4u + 2u], a_tile[kk * TILE + lid.y * 4u + 3u]);
            let bv = vec4<f32>(b_tile[kk * TILE + lid.x * 4u], b_tile[kk * TILE + lid.x * 4u + 1u],
                               b_tile[kk * TILE + lid.x * 4u + 2u], b_tile[kk * TILE + lid.x * 4u + 3u]);
            acc[0] += av.x * bv;
            acc[1] += av.y * bv;
            acc[2] += av.z * bv;
            acc[3] += av.w * bv;
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < R; i++) {
        let row = row0 + lid.y * 4u + i;
        if (row >= p.m) { continue; }
        for (var j = 0u; j < R; j++) {
            let col = col0 + lid.x * 4u + j;
            if (col >= p.n) { continue; }
            let idx = base_c + row * p.ldc + col;
            var v = p.alpha * acc[i][j];
            if (p.accumulate != 0u) { v += c[idx]; }
            c[idx] = v;
        }
    }
}
