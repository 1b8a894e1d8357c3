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

// The lanes of a warp hold bias sums of the same channels over different pixels: add the 32 with
// shuffles (a fixed tree: the result does not depend on timing); lane 0 writes channel
// first + r * STEP of the slice's out_bias.
template <int COUNT, int STEP>
__device__ __forceinline__ void wg_store_bias(const float* bias, int first, int channels, float* __restrict__ out_bias) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < COUNT; ++r) {
        float v = bias[r];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
        const int channel = first + r * STEP;
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

// A warp's 32 x 32 quarter of a 64 x 64 tile: 2 x 2 accumulator fragments of 16 x 16.
__device__ __forceinline__ void tf32_zero_2x2(Tf32Accumulator (&acc)[2][2]) {
#pragma unroll
    for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) nvcuda::wmma::fill_fragment(acc[fi][fj], 0.0f);
}

// Round every element of a loaded fragment to TF32 (10 mantissa bits, to nearest), as the
// tensor cores' TF32 inputs must be.
template <class Fragment>
__device__ __forceinline__ void tf32_round(Fragment& f) {
#pragma unroll
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
}

// One k-step of 8 of a warp's quarter: load its two 16 x 8 A fragments (the first at `a`, the
// second a_next floats further; row stride lda) and its two 8 x 16 B fragments (likewise),
// round them to TF32, and do the 2 x 2 mma_sync: each fragment load feeds 2 products.
template <class LayoutA, class LayoutB>
__device__ __forceinline__ void tf32_mma_2x2(Tf32Accumulator (&acc)[2][2], const float* a, int a_next, int lda,
                                             const float* b, int b_next, int ldb) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LayoutA> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LayoutB> fb[2];
#pragma unroll
    for (int f = 0; f < 2; ++f) {
        wmma::load_matrix_sync(fa[f], a + f * a_next, lda);
        wmma::load_matrix_sync(fb[f], b + f * b_next, ldb);
        tf32_round(fa[f]);
        tf32_round(fb[f]);
    }
#pragma unroll
    for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) wmma::mma_sync(acc[fi][fj], fa[fi], fb[fj], acc[fi][fj]);
}

// The warp's quarter to shared memory at c (row stride ldc), row major.
__device__ __forceinline__ void tf32_store_2x2(float* c, int ldc, const Tf32Accumulator (&acc)[2][2]) {
#pragma unroll
    for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj)
            nvcuda::wmma::store_matrix_sync(c + 16 * fi * ldc + 16 * fj, acc[fi][fj], ldc, nvcuda::wmma::mem_row_major);
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

#endif  // MINUNET_GEMM_TILES_CUH
