// gemm_tiles.cuh -- the tiled matrix product that the weight gradients of conv3x3.cu, conv1x1.cu
// and conv_transpose2x2.cu share (issue 16), in FP32 (register tiles) and TF32 (tensor cores),
// and the TF32 tensor-core step that conv_transpose2x2.cu's forward and input-gradient GEMMs use
// too. Included by those three files (#include "gemm_tiles.cuh"; minunet inlines it into the
// file's text before NVRTC or the emulator compile it, so one text is compiled on every path).
//
// What it computes. Each weight gradient of U-Net is a matrix product over the pixels,
//
//     gw[row, col] = sum_p A[row, p] * B[p, col]          p = (n, i, j), the pixels of a slice
//
//   conv3x3            A = gy (Co x P)   B = X (P x Ci*9), X[p, ci*9 + ky*3 + kx] = x[n, ci, i+ky, j+kx]
//   conv1x1            A = gy (Co x P)   B = x^T (P x Ci)
//   conv_transpose2x2  A = x  (Ci x P)   B = G (P x Co*4), G[p, co*4 + a*2 + b] = gy[n, co, 2i+a, 2j+b]
//
// and the bias gradient gb[co] = sum_p gy[co, p] is added up from the gy values the kernel loads
// for the product anyway (fused: no second pass over gy). The three differ only in where an
// element of A and of B lies in memory. Each .cu file writes that down as an "operands" struct;
// this file holds the rest: the block tiles, the loop over pixel stages, the product, the stores
// and the bias sums. An operands struct Op (e.g. Conv3x3WgradOperands in conv3x3.cu) has:
//
//   int rows, cols, pixels, channels   gw is rows x cols, summed over `pixels`; gb has `channels`
//   GY_ON_ROWS                         true: gy is A and its rows are the bias channels; false:
//   COLUMNS_PER_CHANNEL                gy is B, COLUMNS_PER_CHANNEL consecutive columns a channel
//   seek(p)                            this lane's pixel of the stage: its offsets (one division)
//   load_fp32(s_a, s_b, lane, lrow, row0, col0, live, bias)   a stage, v3's layout (below)
//   load_tf32(s_a, s_b, lane, warp, row0, col0, live, bias)   a stage, v4's layout (below)
//   a4(row, live), b4(col, live)       gemm_large: A's rows row .. row + 3 (B's columns) of the
//   GROUPS_AT_ONCE                     lane's pixel as a float4; groups of 4 of the operand that
//                                      is not gy loaded at once (wl_load_groups)
//
// A loader puts its lane's pixel of each of its rows of A and columns of B into the shared tiles
// (0 for rows and columns past the matrix and for lanes past the slice, so the product needs no
// bounds checks) and adds the gy values it loads to its bias sums, bias[r] for the r-th channel
// it loads.
//
// Grid (ceil(cols / 64), ceil(rows / 64), slices): a block computes one 64 x 64 tile of gw over
// one slice of at most WG_MAX_SLICE pixels (blockIdx.z). The launcher (KernelBackend.grad_weight)
// splits the pixels into slices of at least WG_MIN_SLICE when the tiles alone would leave a GPU's
// SMs idle, and reduce.cu's sum_partials adds the slices' partial gw and gb in a fixed order:
// deterministic, no atomics. Float32 accuracy: one accumulator adds at most 2048 products (the
// classic error bound 2048 * 2^-24 ~ 1.2e-4 of the sum of |products|, typically sqrt(2048) *
// 2^-24 ~ 3e-6), then the slices are added (a second short sum).
//
// v3 FP32, wgrad_gemm_fp32: 256 threads. Loads: warp w (= t / 32) and lane l (= t % 32) load
// pixel p0 + l of the stage for the rows w, w + 8, ..., w + 56 of A and the columns w, w + 8, ...
// of B: a warp's 32 lanes read 32 consecutive pixels of one channel (coalesced). The shared tiles
// are [pixel][row] with one float of padding (65 floats a pixel), so the 32 lanes' stores s[l][m]
// fall in 32 different banks. Compute: thread (ty, tx) = (t / 16, t % 16) keeps the 4 x 4
// register tile of rows ty + 16r and columns tx + 16c; per pixel k it reads 4 A values (2
// distinct addresses a warp: broadcasts) and 4 B values (16 consecutive floats a warp: no bank
// conflict) for 16 FMAs. The stores to gw are coalesced (consecutive tx, consecutive columns).
//
// gemm_large (reduction "gemm_large", at the end of this file): the same product in larger tiles,
// FP32 128 x 128 (64 x 128 for a gw of at most 64 rows) with an 8 x 8 register tile a thread and
// float4 shared-memory reads, and TF32 64 x 128 with 2 x 4 fragments a warp, rounded to TF32 once
// when staged; the launcher (KernelBackend.grad_weight, gemm_tile) runs v3 / v4 for a gw of fewer
// than 128 columns, where a 128-column tile would be at least half padding.
//
// v4 TF32, wgrad_gemm_tf32: 128 threads = 4 warps; warp w computes the 32 x 32 quarter
// (w / 2, w % 2) of the tile as 2 x 2 nvcuda::wmma accumulator fragments of 16 x 16 (m16n16k8,
// TF32 inputs, float32 sums; sm_80 or later). A stage of 32 pixels: A staged [row][pixel]
// (row_major), B staged [column][pixel] and read as a col_major matrix_b; 4 k-steps of 8
// pixels, each 2 A and 2 B fragment loads for 4 mma_sync (tf32_mma_2x2). Rows are WT_LD = 36
// floats (32 + 4 of padding: a multiple of 4 as wmma wants; fragment pointers stay 32-byte
// aligned). Loads: warp w, lane l loads pixel l of the rows w, w + 4, ..., w + 60 and of the
// columns w, w + 4, ... (the lanes' stores s[m][l] are consecutive: no bank conflict). The inputs
// are rounded to TF32 in the fragments (wmma::__float_to_tf32: 10 mantissa bits, a relative
// error of at most 2^-11 an input); the bias adds the unrounded float32 gy values, as in v3. The
// accumulators go through shared memory (the stage buffer, after the last stage) to gw, because
// gw's rows need not be 32-byte aligned as store_matrix_sync wants.
//
// Napkin math, per 64 x 64 tile and stage of 32 pixels: 64 * 64 * 32 FMAs for (64 + 64) * 32
// floats loaded from global memory, 32 FMAs a load (16 FLOP per byte before caches), against 0.5
// for one thread per weight (the _serial kernels): ~64x fewer loads. v3 reads 4 + 4 floats from
// shared memory for 16 FMAs, so shared-memory bandwidth, not the FMA units, bounds it at about
// half of the FP32 peak; v4 reads a quarter of that per FMA (a fragment feeds 2 mma_sync), and
// H100/H200 TF32 tensor cores have ~7x the FP32 FMA peak, so v4 is bound by its loads and the
// operands' address arithmetic, not by the multiplications. FLOPs and bytes of each op: its file.
#ifndef MINUNET_GEMM_TILES_CUH
#define MINUNET_GEMM_TILES_CUH

#define WG_BM 64                                          // gw rows per block (v3)
#define WG_BN 64                                          // gw columns per block
#define WG_BK 32                                          // pixels per stage: one warp's width
#define WG_TM 4                                           // register tile: rows per thread
#define WG_TN 4                                           // register tile: columns per thread
#define WG_THREADS ((WG_BM / WG_TM) * (WG_BN / WG_TN))    // 16 x 16 = 256 threads
#define WG_LOAD_ROWS (WG_THREADS / WG_BK)                 // 8 warps: the loads step 8 rows at a time
#define WG_MAX_SLICE 2048                                 // most pixels one block sums (accuracy)
#define WG_MIN_SLICE 256                                  // fewest pixels a block is split down to

#define WT_BM 64                                          // gw rows per block (v4)
#define WT_BN 64                                          // gw columns per block
#define WT_BK 32                                          // pixels per stage
#define WT_THREADS 128                                    // 4 warps, each 32 x 32 of the tile
#define WT_LD (WT_BK + 4)                                 // row length of the staged tiles
#define WT_LDC (WT_BN + 4)                                // row length of the staged result
#define WT_SMEM (2 * WT_BM * WT_LD)                       // floats: A and B tiles (>= WT_BM * WT_LDC)

#define WL_BK 32                                          // pixels per stage (the large tiles)
#define WL_BN 128                                         // gw columns per block (FP32 and TF32)
#define WL_BM 128                                         // gw rows per block, FP32 ...
#define WL_BM_SHORT 64                                    // ... or this many for a gw of at most 64 rows
#define WL_TM 8                                           // register tile: rows per thread
#define WL_TN 8                                           // register tile: columns per thread
#define WL_THREADS ((WL_BM / WL_TM) * (WL_BN / WL_TN))    // 16 x 16 = 256 threads (128 x 128)
#define WL_THREADS_SHORT ((WL_BM_SHORT / WL_TM) * (WL_BN / WL_TN))   // 8 x 16 = 128 threads (64 x 128)
#define WL_MIN_BLOCKS 2                                   // launch bounds: 2 blocks of 256 an SM (<= 128 registers)
#define WL_MIN_BLOCKS_SHORT 3                             // 3 of 128 (<= 168): the 64-row and the TF32 tiles
#define WLT_BM 64                                         // gw rows per block, TF32
#define WLT_THREADS 128                                   // 4 warps, each 32 x 64 of the tile
#define WLT_LD (WL_BK + 4)                                // row length of the staged tiles
#define WLT_LDC (WL_BN + 4)                               // row length of the staged result
#define WLT_SMEM (WLT_BM * WLT_LDC)                       // floats: the result (> the stage's (64 + 128) * 36)

// TF32 wmma needs <mma.h> (the CUDA toolkit's; NVRTC alone does not ship it) and sm_80 or later.
#if defined(__has_include)
#if __has_include(<mma.h>)
#include <mma.h>
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define WG_WMMA_TF32 1                                   // this compilation has TF32 wmma
#endif
#endif
#endif

// 1 where this compilation has the TF32 kernels, 0 where they are a __trap() (the launchers ask
// each file's <op>_grad_weight_has_tf32 kernel, which returns this, before they choose TF32).
__device__ __forceinline__ int wg_has_tf32() {
#ifdef WG_WMMA_TF32
    return 1;
#else
    return 0;
#endif
}

// A loader's most common load: COUNT channels of one pixel, the channel base + first + r * STEP
// at src[at + channel * stride] (r < COUNT; 0 past `limit` channels or for a lane past the slice),
// stored to dst[(first + r * STEP) * dst_stride] (the FP32 tiles: dst = s[lane], dst_stride 1;
// the TF32 tiles: dst = s + lane, dst_stride WT_LD) and, with BIAS, added to bias[r]. A warp's
// lanes are consecutive pixels, so each channel's load is coalesced. Fully unrolled.
template <int COUNT, int STEP, bool BIAS, class Dst>
__device__ __forceinline__ void wg_load_channels(Dst dst, int dst_stride, const float* __restrict__ src, int at,
                                                 int stride, int first, int base, int limit, bool live,
                                                 float* bias) {
#pragma unroll
    for (int r = 0; r < COUNT; ++r) {
        const int m = first + r * STEP, channel = base + m;
        const float v = live && channel < limit ? src[at + channel * stride] : 0.0f;
        dst[m * dst_stride] = v;
        if (BIAS) bias[r] += v;
    }
}

// The large tiles' load: 4 consecutive channels c .. c + 3 of the lane's pixel,
// src[at + (c + e) * stride] (0 past `limit` channels or for a lane past the slice), as one float4
// (4 loads: each one coalesced over the warp's consecutive pixels).
__device__ __forceinline__ float4 wg_channels4(const float* __restrict__ src, int at, int stride, int c, int limit,
                                               bool live) {
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = live && c + e < limit ? src[at + (c + e) * stride] : 0.0f;
    return make_float4(v[0], v[1], v[2], v[3]);
}

// The lanes of a warp hold bias sums of the same channels over different pixels: add the 32 with
// shuffles (a fixed tree: the result does not depend on timing); lane 0 writes bias[r]'s channel
// of the slice's out_bias: first + r * STEP (v3, v4), or with RUN > 1 runs of RUN consecutive
// channels, first + (r / RUN) * STEP + r % RUN (the large tiles' groups of 4 rows).
template <int COUNT, int STEP, int RUN = 1>
__device__ __forceinline__ void wg_store_bias(const float* bias, int first, int channels, float* __restrict__ out_bias) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < COUNT; ++r) {
        float v = bias[r];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
        const int channel = first + (r / RUN) * STEP + r % RUN;
        if (lane == 0 && channel < channels) out_bias[channel] = v;
    }
}

// The bias channels of one block tile of gw, and the first of them: gy's rows of the tile, or
// its columns in groups of COLUMNS_PER_CHANNEL. Every tile along the other axis sums the same gy
// values, so only the first one (blockIdx 0 along it) writes the bias.
template <class Op, int BM, int BN>
struct WgBias {
    static constexpr int TILE = Op::GY_ON_ROWS ? BM : BN / Op::COLUMNS_PER_CHANNEL;
    static __device__ __forceinline__ int first(int row0, int col0) {
        return Op::GY_ON_ROWS ? row0 : col0 / Op::COLUMNS_PER_CHANNEL;
    }
    static __device__ __forceinline__ bool writes() { return (Op::GY_ON_ROWS ? blockIdx.x : blockIdx.y) == 0; }
};

// ---- v3 FP32: register tiles ------------------------------------------------------------------
template <class Op>
__device__ __forceinline__ void wgrad_gemm_fp32(Op op, float* __restrict__ out, float* __restrict__ out_bias,
                                                int pixels_per_slice) {
    static_assert(WG_BK == 32, "a stage's pixels are the 32 lanes of a warp (the bias shuffles rely on it)");
    typedef WgBias<Op, WG_BM, WG_BN> Bias;
    __shared__ float s_a[WG_BK][WG_BM + 1];   // [pixel][row]     32 * 65 * 4 = 8,320 bytes
    __shared__ float s_b[WG_BK][WG_BN + 1];   // [pixel][column]
    const int t = threadIdx.x;
    const int tx = t % (WG_BN / WG_TN), ty = t / (WG_BN / WG_TN);
    const int lane = t % WG_BK, lrow = t / WG_BK;
    const int col0 = blockIdx.x * WG_BN, row0 = blockIdx.y * WG_BM;
    const int start = blockIdx.z * pixels_per_slice;
    const int stop = min(op.pixels, start + pixels_per_slice);

    float acc[WG_TM][WG_TN];
#pragma unroll
    for (int r = 0; r < WG_TM; ++r)
#pragma unroll
        for (int c = 0; c < WG_TN; ++c) acc[r][c] = 0.0f;
    float bias[Bias::TILE / WG_LOAD_ROWS];   // the sums of the bias channels this lane loads
#pragma unroll
    for (int r = 0; r < Bias::TILE / WG_LOAD_ROWS; ++r) bias[r] = 0.0f;

    for (int p0 = start; p0 < stop; p0 += WG_BK) {
        const int p = p0 + lane;
        const bool live = p < stop;
        op.seek(live ? p : start);   // a lane past the end computes in-range (unused) indices
        op.load_fp32(s_a, s_b, lane, lrow, row0, col0, live, bias);
        __syncthreads();   // the stage is in shared memory
#pragma unroll 8
        for (int k = 0; k < WG_BK; ++k) {
            float a[WG_TM], b[WG_TN];
#pragma unroll
            for (int r = 0; r < WG_TM; ++r) a[r] = s_a[k][ty + r * (WG_BM / WG_TM)];
#pragma unroll
            for (int c = 0; c < WG_TN; ++c) b[c] = s_b[k][tx + c * (WG_BN / WG_TN)];
#pragma unroll
            for (int r = 0; r < WG_TM; ++r)
#pragma unroll
                for (int c = 0; c < WG_TN; ++c) acc[r][c] += a[r] * b[c];
        }
        __syncthreads();   // everyone is done with the stage before the next one overwrites it
    }

#pragma unroll
    for (int r = 0; r < WG_TM; ++r) {
        const int row = row0 + ty + r * (WG_BM / WG_TM);
#pragma unroll
        for (int c = 0; c < WG_TN; ++c) {
            const int col = col0 + tx + c * (WG_BN / WG_TN);
            if (row < op.rows && col < op.cols) out[(blockIdx.z * op.rows + row) * op.cols + col] = acc[r][c];
        }
    }
    if (Bias::writes())
        wg_store_bias<Bias::TILE / WG_LOAD_ROWS, WG_LOAD_ROWS>(bias, Bias::first(row0, col0) + lrow, op.channels,
                                                              out_bias + blockIdx.z * op.channels);
}

// ---- v4 TF32: tensor cores (nvcuda::wmma m16n16k8) ----------------------------------------------
#ifdef WG_WMMA_TF32
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float> Tf32Accumulator;

// A warp's tile of FM x FN accumulator fragments of 16 x 16 (v4: 2 x 2, a 32 x 32 quarter of the
// 64 x 64 block tile; the large tile: 2 x 4, 32 x 64).
template <int FM, int FN>
__device__ __forceinline__ void tf32_zero(Tf32Accumulator (&acc)[FM][FN]) {
#pragma unroll
    for (int fi = 0; fi < FM; ++fi)
#pragma unroll
        for (int fj = 0; fj < FN; ++fj) nvcuda::wmma::fill_fragment(acc[fi][fj], 0.0f);
}

// Round every element of a loaded fragment to TF32 (10 mantissa bits, to nearest), as the
// tensor cores' TF32 inputs must be.
template <class Fragment>
__device__ __forceinline__ void tf32_round(Fragment& f) {
#pragma unroll
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
}

// One k-step of 8 of a warp's FM x FN fragments: load its FM 16 x 8 A fragments (the first at
// `a`, each next a_next floats further; row stride lda) and its FN 8 x 16 B fragments (likewise),
// with ROUND round them to TF32 (without: the staged values are TF32 already), and do the FM x FN
// mma_sync: FM + FN fragment loads for FM * FN products.
template <class LayoutA, class LayoutB, bool ROUND, int FM, int FN>
__device__ __forceinline__ void tf32_mma(Tf32Accumulator (&acc)[FM][FN], const float* a, int a_next, int lda,
                                         const float* b, int b_next, int ldb) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LayoutA> fa[FM];
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LayoutB> fb[FN];
#pragma unroll
    for (int f = 0; f < (FM > FN ? FM : FN); ++f) {   // A's and B's loads interleaved (v4's order)
        if (f < FM) wmma::load_matrix_sync(fa[f], a + f * a_next, lda);
        if (f < FN) wmma::load_matrix_sync(fb[f], b + f * b_next, ldb);
        if (ROUND && f < FM) tf32_round(fa[f]);
        if (ROUND && f < FN) tf32_round(fb[f]);
    }
#pragma unroll
    for (int fi = 0; fi < FM; ++fi)
#pragma unroll
        for (int fj = 0; fj < FN; ++fj) wmma::mma_sync(acc[fi][fj], fa[fi], fb[fj], acc[fi][fj]);
}

// The warp's fragments to shared memory at c (row stride ldc), row major.
template <int FM, int FN>
__device__ __forceinline__ void tf32_store(float* c, int ldc, const Tf32Accumulator (&acc)[FM][FN]) {
#pragma unroll
    for (int fi = 0; fi < FM; ++fi)
#pragma unroll
        for (int fj = 0; fj < FN; ++fj)
            nvcuda::wmma::store_matrix_sync(c + 16 * fi * ldc + 16 * fj, acc[fi][fj], ldc, nvcuda::wmma::mem_row_major);
}

// v4's 2 x 2 warp tile (also conv_transpose2x2.cu's forward and input-gradient GEMMs): rounded
// to TF32 per fragment element after each load.
__device__ __forceinline__ void tf32_zero_2x2(Tf32Accumulator (&acc)[2][2]) { tf32_zero(acc); }
template <class LayoutA, class LayoutB>
__device__ __forceinline__ void tf32_mma_2x2(Tf32Accumulator (&acc)[2][2], const float* a, int a_next, int lda,
                                             const float* b, int b_next, int ldb) {
    tf32_mma<LayoutA, LayoutB, true>(acc, a, a_next, lda, b, b_next, ldb);
}
__device__ __forceinline__ void tf32_store_2x2(float* c, int ldc, const Tf32Accumulator (&acc)[2][2]) {
    tf32_store(c, ldc, acc);
}
#endif

template <class Op>
__device__ __forceinline__ void wgrad_gemm_tf32(Op op, float* __restrict__ out, float* __restrict__ out_bias,
                                                int pixels_per_slice) {
#ifdef WG_WMMA_TF32
    using namespace nvcuda;
    static_assert(WT_BK == 32 && WT_THREADS == 128, "lane = pixel of the stage; 4 warps of 32 x 32");
    static_assert(WT_BM * WT_LDC <= WT_SMEM, "the staged result fits the stage buffer");
    typedef WgBias<Op, WT_BM, WT_BN> Bias;
    __shared__ __align__(32) float smem[WT_SMEM];   // 18,432 bytes
    float* s_a = smem;                   // [row][pixel]
    float* s_b = smem + WT_BM * WT_LD;   // [column][pixel]
    float* s_c = smem;                   // after the last stage: [row][column], WT_LDC floats a row
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int wrow = (warp / 2) * 32, wcol = (warp % 2) * 32;   // the warp's quarter of the tile
    const int col0 = blockIdx.x * WT_BN, row0 = blockIdx.y * WT_BM;
    const int start = blockIdx.z * pixels_per_slice;
    const int stop = min(op.pixels, start + pixels_per_slice);

    Tf32Accumulator acc[2][2];
    tf32_zero_2x2(acc);
    float bias[Bias::TILE / 4];   // the sums of the bias channels this lane loads (4 warps)
#pragma unroll
    for (int r = 0; r < Bias::TILE / 4; ++r) bias[r] = 0.0f;

    for (int p0 = start; p0 < stop; p0 += WT_BK) {
        const int p = p0 + lane;
        const bool live = p < stop;
        op.seek(live ? p : start);   // a lane past the end computes in-range (unused) indices
        op.load_tf32(s_a, s_b, lane, warp, row0, col0, live, bias);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < WT_BK; kk += 8)
            tf32_mma_2x2<wmma::row_major, wmma::col_major>(acc, s_a + wrow * WT_LD + kk, 16 * WT_LD, WT_LD,
                                                           s_b + wcol * WT_LD + kk, 16 * WT_LD, WT_LD);
        __syncthreads();
    }

    tf32_store_2x2(s_c + wrow * WT_LDC + wcol, WT_LDC, acc);
    __syncthreads();
    for (int e = t; e < WT_BM * WT_BN; e += WT_THREADS) {   // consecutive threads, consecutive columns
        const int m = e / WT_BN, c = e % WT_BN, row = row0 + m, col = col0 + c;
        if (row < op.rows && col < op.cols) out[(blockIdx.z * op.rows + row) * op.cols + col] = s_c[m * WT_LDC + c];
    }
    if (Bias::writes())
        wg_store_bias<Bias::TILE / 4, 4>(bias, Bias::first(row0, col0) + warp, op.channels,
                                         out_bias + blockIdx.z * op.channels);
#else
    __trap();   // no TF32 tensor cores in this compilation (before sm_80, or no <mma.h>)
#endif
}

// ---- gemm_large: the larger tiles (reduction "gemm_large") ---------------------------------------
// The bias sums of a large tile's loads: with GY_ON_ROWS a lane loads BM / WARPS rows of gy, in
// groups of 4 consecutive channels (first + 4 * warp + (r / 4) * 4 * WARPS + r % 4 for bias[r]);
// else (gy on the columns, 4 columns a channel) one channel per group of 4 columns.
template <class Op, int BM, int BN, int WARPS>
struct WlBias {
    static_assert(Op::GY_ON_ROWS || Op::COLUMNS_PER_CHANNEL == 4, "a group of 4 columns is one bias channel");
    static constexpr int COUNT = Op::GY_ON_ROWS ? BM / WARPS : BN / 4 / WARPS;
    static constexpr int RUN = Op::GY_ON_ROWS ? 4 : 1;      // consecutive channels a group
    static constexpr int STEP = RUN * WARPS;                  // from one group of the lane to its next
    static __device__ __forceinline__ int first(int row0, int col0, int warp) {
        return WgBias<Op, BM, BN>::first(row0, col0) + RUN * warp;
    }
};

// One operand's share of a stage for warp `warp`: GROUPS groups of 4 rows (or columns) a lane,
// first row 4 * (warp + r * WARPS) of group r, each a float4 from get(m) (4 loads, each coalesced
// over the warp's 32 consecutive pixels) handed to put(m, v). With BIAS (the operand is gy) the
// values are added to the bias sums: per channel (RUN 4: gy's rows) or per group (RUN 1: a group
// of 4 columns is one channel). The loads go in rounds of U groups: for the operand that is not gy
// ptxas would otherwise hoist all of them, with their 64-bit addresses, past 128 registers
// (conv3x3's X, conv_transpose2x2's x); gy's own rounds stay whole, as its bias index must be a
// constant (a register, not local memory).
template <int GROUPS, int WARPS, int U, bool BIAS, int RUN, class Get, class Put>
__device__ __forceinline__ void wl_load_groups(int warp, float* bias, Get get, Put put) {
    static_assert(GROUPS % U == 0 && (!BIAS || U == GROUPS), "whole rounds; gy's bias index stays constant");
#pragma unroll 1
    for (int r0 = 0; r0 < GROUPS; r0 += U) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int r = r0 + u, m = 4 * (warp + r * WARPS);
            const float4 v = get(m);
            if (BIAS && RUN == 4) {
                bias[4 * r + 0] += v.x;
                bias[4 * r + 1] += v.y;
                bias[4 * r + 2] += v.z;
                bias[4 * r + 3] += v.w;
            } else if (BIAS) {
                bias[r] += (v.x + v.y) + (v.z + v.w);
            }
            put(m, v);
        }
    }
}

// One stage's pixel (the lane's) of the tile's BM rows of A and BN columns of B (wl_load_groups;
// the operand that is not gy in rounds of Op::GROUPS_AT_ONCE groups), handed to put_a(m, v) /
// put_b(c, v), m and c the group's first row and column in the tile (the FP32 and the TF32 kernel
// stage them differently). B first: in the other order ptxas spilled conv_transpose2x2's TF32
// kernel (whose B is gy: 32 loads a lane in one round) at its 168 registers.
template <class Op, int BM, int BN, int WARPS, class PutA, class PutB>
__device__ __forceinline__ void wl_load_stage(const Op& op, int warp, int row0, int col0, bool live, float* bias,
                                              PutA put_a, PutB put_b) {
    constexpr int GA = BM / 4 / WARPS, GB = BN / 4 / WARPS;
    static_assert(GA * 4 * WARPS == BM && GB * 4 * WARPS == BN, "whole groups of 4 for every warp");
    constexpr int UA = Op::GY_ON_ROWS || Op::GROUPS_AT_ONCE > GA ? GA : Op::GROUPS_AT_ONCE;
    constexpr int UB = !Op::GY_ON_ROWS || Op::GROUPS_AT_ONCE > GB ? GB : Op::GROUPS_AT_ONCE;
    wl_load_groups<GB, WARPS, UB, !Op::GY_ON_ROWS, 1>(
        warp, bias, [&](int c) { return op.b4(col0 + c, live); }, put_b);
    wl_load_groups<GA, WARPS, UA, Op::GY_ON_ROWS, 4>(
        warp, bias, [&](int m) { return op.a4(row0 + m, live); }, put_a);
}

// The loop of both large kernels over the stages of 32 pixels of the block's slice [start, stop):
// lane l loads pixel p0 + l of the stage (a lane past the end loads zeros: its indices stay in
// range), then, after a barrier, compute() works on the staged tiles, and a second barrier keeps
// the next stage from overwriting them while others still read.
template <class Op, int BM, int BN, int WARPS, class PutA, class PutB, class Compute>
__device__ __forceinline__ void wl_stages(Op& op, int start, int stop, int lane, int warp, int row0, int col0,
                                          float* bias, PutA put_a, PutB put_b, Compute compute) {
    for (int p0 = start; p0 < stop; p0 += WL_BK) {
        const int p = p0 + lane;
        const bool live = p < stop;
        op.seek(live ? p : start);
        wl_load_stage<Op, BM, BN, WARPS>(op, warp, row0, col0, live, bias, put_a, put_b);
        __syncthreads();   // the stage is in shared memory
        compute();
        __syncthreads();   // everyone is done with the stage before the next one overwrites it
    }
}

// FP32, wgrad_gemm_large_fp32<Op, BM>: a BM x 128 tile of gw per block (BM = 128, or 64 for a gw
// of at most 64 rows), an 8 x 8 register tile per thread: (BM / 8) x 16 threads (256 or 128).
// Threads: warp w, lane l is thread (ty, tx) = ((w / 2) * 4 + l / 8, (w % 2) * 8 + l % 8) of the
// block's (BM / 8) x 16 grid: a warp is 4 x 8 threads. Thread (ty, tx) owns the rows 4 ty .. 4 ty
// + 3 and BM / 2 + 4 ty .. + 3 and the columns 4 tx .. 4 tx + 3 and 64 + 4 tx .. + 3: two float4
// of A and two of B a pixel. Shared tiles [pixel][row] and [pixel][column] with 4 floats of
// padding (BM + 4 and 132 floats a pixel: a multiple of 4, so every float4 is 16-byte aligned).
// Per pixel k a warp reads s_a[k][4 ty ..] for its 4 ty (16 consecutive floats, each float4
// shared by 8 lanes) and s_b[k][4 tx ..] for its 8 tx (32 consecutive floats, each shared by 4
// lanes), twice each: no bank conflict. Loads: lane l loads pixel l of 4 consecutive channels
// (wl_load_stage) and stores them as one float4 at s[l][m]; a row of 132 (or 68) floats is 33 (17)
// float4s, an odd number, so 8 consecutive lanes' float4s fall in 8 different 16-byte bank groups:
// the minimum of 4 wavefronts a warp's 512 bytes. The stores to gw: scalar, bounds-checked
// (gw's rows need not be 16-byte aligned), once per tile and slice.
//
// Napkin math (predicted, not measured). A thread: 64 FMAs per 4 LDS.128 = 32 bytes of shared
// memory a pixel (v3: 16 FMAs per 8 LDS.32, the same 32 bytes): 4x the FMAs per byte. A warp's
// LDS.128 takes at most 4 wavefronts (one per quarter warp; 1 when the hardware merges the
// repeated addresses), so at worst 16 wavefronts for 64 FFMA instructions a pixel: shared memory
// (one wavefront a cycle) feeds 64 x 32 / 16 = 128 FMAs a cycle, the FP32 peak of an SM's 128
// lanes; v3's 8 wavefronts for 16 FFMA feed 64, half of it. Issue slots: 64 FFMA of 68
// instructions a pixel (94%; v3 16 of 24, 67%). Registers: 64 accumulators + 16 operands + up to
// 16 bias sums + the stage's loads in flight and their addresses; the launch bounds hold BM 128 to
// 128 a thread (WL_MIN_BLOCKS: two 256-thread blocks, 16 warps an SM) and BM 64 to 168 (three
// 128-thread blocks, 12 warps). Shared memory: one stage, 2 x 32 x 132 x 4 = 33,792 bytes (BM
// 128) or 32 x (68 + 132) x 4 = 25,600 (BM 64); two stages for double buffering (67,584 or
// 51,200 bytes) would pass the 48 KB of static shared memory a block may have, so the other
// resident blocks' FMAs overlap this block's stage loads instead. Global loads: (BM + 128) x 32
// floats a stage for BM x 128 x 32 FMAs: 64 FMAs a load with BM 128 (half v3's L1/L2 traffic per
// FMA), 43 with BM 64 (v3: 32). Predicted: up to twice v3's FP32 throughput on the large layers
// (such as the 256 -> 256 channel 3x3 weight gradient), less the stage loads that the other
// blocks do not hide.
template <class Op, int BM>
__device__ __forceinline__ void wgrad_gemm_large_fp32(Op op, float* __restrict__ out, float* __restrict__ out_bias,
                                                      int pixels_per_slice) {
    constexpr int BN = WL_BN, BK = WL_BK, LDA = BM + 4, LDB = BN + 4;
    constexpr int THREADS = (BM / WL_TM) * (BN / WL_TN), WARPS = THREADS / 32, WX = BN / WL_TN / 8;
    static_assert(BK == 32 && WL_TM == 8 && WL_TN == 8 && BN == 128, "lane = pixel; 8 x 8 a thread; 2 warps a row");
    static_assert(BM == WL_BM || BM == WL_BM_SHORT, "the two FP32 large tiles");
    typedef WlBias<Op, BM, BN, WARPS> Bias;
    __shared__ __align__(16) float s_a[BK * LDA];   // [pixel][row]
    __shared__ __align__(16) float s_b[BK * LDB];   // [pixel][column]
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int ty = (warp / WX) * 4 + lane / 8, tx = (warp % WX) * 8 + lane % 8;
    const int col0 = blockIdx.x * BN, row0 = blockIdx.y * BM;
    const int start = blockIdx.z * pixels_per_slice;
    const int stop = min(op.pixels, start + pixels_per_slice);

    float acc[8][8] = {};
    float bias[Bias::COUNT] = {};   // the sums of the bias channels this lane loads
    wl_stages<Op, BM, BN, WARPS>(
        op, start, stop, lane, warp, row0, col0, bias,
        [&](int m, float4 v) { *reinterpret_cast<float4*>(&s_a[lane * LDA + m]) = v; },
        [&](int c, float4 v) { *reinterpret_cast<float4*>(&s_b[lane * LDB + c]) = v; },
        [&]() {
#pragma unroll 4
            for (int k = 0; k < BK; ++k) {
                const float4 a0 = *reinterpret_cast<const float4*>(&s_a[k * LDA + 4 * ty]);
                const float4 a1 = *reinterpret_cast<const float4*>(&s_a[k * LDA + BM / 2 + 4 * ty]);
                const float4 b0 = *reinterpret_cast<const float4*>(&s_b[k * LDB + 4 * tx]);
                const float4 b1 = *reinterpret_cast<const float4*>(&s_b[k * LDB + BN / 2 + 4 * tx]);
                const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
            }
        });

#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = row0 + (i / 4) * (BM / 2) + 4 * ty + i % 4;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = col0 + (j / 4) * (BN / 2) + 4 * tx + j % 4;
            if (row < op.rows && col < op.cols) out[(blockIdx.z * op.rows + row) * op.cols + col] = acc[i][j];
        }
    }
    if (WgBias<Op, BM, BN>::writes())
        wg_store_bias<Bias::COUNT, Bias::STEP, Bias::RUN>(bias, Bias::first(row0, col0, warp), op.channels,
                                                          out_bias + blockIdx.z * op.channels);
}

// TF32, wgrad_gemm_large_tf32<Op>: a 64 x 128 tile of gw per block, 128 threads = 4 warps; warp w
// computes the 32 x 64 part (w / 2, w % 2) as 2 x 4 accumulator fragments of 16 x 16 (m16n16k8).
// Stages of 32 pixels staged as v4's ([row][pixel] and [column][pixel], WLT_LD = 36 floats a
// row): warp w, lane l stores pixel l of the rows and columns of its groups of 4 (wl_load_stage:
// rows 4 w .. 4 w + 3, 4 w + 16 .., ...), each value at s[m][l] (consecutive lanes, consecutive
// floats: no bank conflict). Rounded to TF32 once, there (wmma::__float_to_tf32, to nearest: the
// same values v4 gives each fragment element after every load), so the fragments are loaded and
// used as they are: a staged value feeds the fragment loads of the 2 warps that share its rows
// (or columns), which v4 rounds each. The bias adds the unrounded float32 gy values, as v3, v4.
//
// Napkin math (predicted, not measured). A k-step of 8 pixels: 2 A + 4 B fragment loads for 8
// mma_sync a warp (v4: 2 + 2 for 4): 1.33 mma per fragment load against 1. Rounding: a lane
// rounds the 48 values it stages a stage, 1.5 cvt.rna per mma_sync, against v4's 4 elements of
// each of its 4 fragments a k-step, 4 per mma_sync. Global loads: (64 + 128) x 32 floats a stage
// for 64 x 128 x 32 FMAs: 43 FMAs a load (v4: 32). Shared memory: the stage (64 + 128) x 36 floats = 27,648 bytes;
// the 64 x 132-float result staged after the last stage, 33,792 bytes, sets the size. Double
// buffering (two stages, 55,296 bytes) would pass the 48 KB of static shared memory a block may
// have, so the other resident blocks overlap this one's stage loads instead. Registers: 8
// fragments x 8 accumulators + 6 x 4 operands + up to 16 bias sums + the loads in flight; the
// launch bounds hold them to 168 (WL_MIN_BLOCKS_SHORT: three 128-thread blocks, 12 warps an SM).
// Predicted: more mma_sync per fragment load and fewer conversions than v4, so a larger share of
// the time on the tensor cores; by how much only a GPU can tell (python -m minunet.bench --tune).
#ifdef WG_WMMA_TF32
// A group of 4 rows (columns) m .. m + 3 of the lane's pixel into a [row][pixel] tile of WLT_LD
// floats a row, rounded to TF32 (to nearest) once here.
__device__ __forceinline__ void wl_put_tf32(float* s, int m, int lane, float4 v) {
    s[(m + 0) * WLT_LD + lane] = nvcuda::wmma::__float_to_tf32(v.x);
    s[(m + 1) * WLT_LD + lane] = nvcuda::wmma::__float_to_tf32(v.y);
    s[(m + 2) * WLT_LD + lane] = nvcuda::wmma::__float_to_tf32(v.z);
    s[(m + 3) * WLT_LD + lane] = nvcuda::wmma::__float_to_tf32(v.w);
}
#endif

template <class Op>
__device__ __forceinline__ void wgrad_gemm_large_tf32(Op op, float* __restrict__ out, float* __restrict__ out_bias,
                                                      int pixels_per_slice) {
#ifdef WG_WMMA_TF32
    using namespace nvcuda;
    constexpr int BM = WLT_BM, BN = WL_BN, BK = WL_BK, LD = WLT_LD, LDC = WLT_LDC, WARPS = WLT_THREADS / 32;
    static_assert(BK == 32 && WARPS == 4 && BM == 64 && BN == 128, "lane = pixel; 4 warps of 32 x 64");
    static_assert((BM + BN) * LD <= WLT_SMEM && BM * LDC <= WLT_SMEM, "the stage and the result fit");
    typedef WlBias<Op, BM, BN, WARPS> Bias;
    __shared__ __align__(32) float smem[WLT_SMEM];   // 33,792 bytes
    float* s_a = smem;             // [row][pixel]
    float* s_b = smem + BM * LD;   // [column][pixel] (2,304 floats in: 32-byte aligned)
    float* s_c = smem;             // after the last stage: [row][column], LDC floats a row
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int wrow = (warp / 2) * 32, wcol = (warp % 2) * 64;   // the warp's 32 x 64 of the tile
    const int col0 = blockIdx.x * BN, row0 = blockIdx.y * BM;
    const int start = blockIdx.z * pixels_per_slice;
    const int stop = min(op.pixels, start + pixels_per_slice);

    Tf32Accumulator acc[2][4];
    tf32_zero(acc);
    float bias[Bias::COUNT] = {};   // the sums of the bias channels this lane loads
    wl_stages<Op, BM, BN, WARPS>(
        op, start, stop, lane, warp, row0, col0, bias,
        [&](int m, float4 v) { wl_put_tf32(s_a, m, lane, v); },
        [&](int c, float4 v) { wl_put_tf32(s_b, c, lane, v); },
        [&]() {
#pragma unroll
            for (int kk = 0; kk < BK; kk += 8)
                tf32_mma<wmma::row_major, wmma::col_major, false>(acc, s_a + wrow * LD + kk, 16 * LD, LD,
                                                                  s_b + wcol * LD + kk, 16 * LD, LD);
        });

    tf32_store(s_c + wrow * LDC + wcol, LDC, acc);
    __syncthreads();
    for (int e = t; e < BM * BN; e += WLT_THREADS) {   // consecutive threads, consecutive columns
        const int m = e / BN, c = e % BN, row = row0 + m, col = col0 + c;
        if (row < op.rows && col < op.cols) out[(blockIdx.z * op.rows + row) * op.cols + col] = s_c[m * LDC + c];
    }
    if (WgBias<Op, BM, BN>::writes())
        wg_store_bias<Bias::COUNT, Bias::STEP, Bias::RUN>(bias, Bias::first(row0, col0, warp), op.channels,
                                                          out_bias + blockIdx.z * op.channels);
#else
    __trap();   // no TF32 tensor cores in this compilation (before sm_80, or no <mma.h>)
#endif
}

#endif  // MINUNET_GEMM_TILES_CUH
