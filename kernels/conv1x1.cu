// conv1x1.cu -- U-Net's final layer (paper Section 2: "At the final layer a 1x1 convolution is
// used to map each 64-component feature vector to the desired number of classes"), forward and
// backward. A 1x1 convolution is a matrix product applied at every pixel independently.
//
// Shapes (float32): x (N, Ci, H, W), w (Co, Ci, 1, 1), b (Co,) -> y (N, Co, H, W); P = H * W.
//
//   forward      y[n,co,p]  = b[co] + sum_ci w[co,ci] * x[n,ci,p]
//   grad input   gx[n,ci,p] = sum_co w[co,ci] * gy[n,co,p]
//   grad weight  gw[co,ci]  = sum_{n,p} gy[n,co,p] * x[n,ci,p]
//   grad bias    gb[co]     = sum_{n,p} gy[n,co,p]         (fused into the weight-gradient kernels)
//
// Kernels
//   conv1x1_forward / conv1x1_grad_input: one thread per output element (n, channel, p). The
//     threads of a warp share n and the channel and have consecutive p, so their loads of
//     x[n,ci,p] are consecutive (coalesced) and they all read the same weight (a broadcast).
//   conv1x1_grad_weight: one block per (co, group of C1_CI = 8 input channels, slice of the
//     pixels); per pixel a thread loads gy once and uses it for 8 input channels and the bias sum
//     (the bias gradient, fused), then the block sums its threads' 9 partial sums with a
//     shared-memory tree (as conv3x3_grad_weight).
//   conv1x1_grad_weight_serial: one thread per weight (co, ci), a loop over the N*P pixels; the
//     launcher uses it when weights outnumber pixels (see conv3x3_grad_weight_serial).
//   conv1x1_grad_weight_gemm (v3, FP32) / conv1x1_grad_weight_gemm_tf32 (v4, TF32 tensor cores):
//     gw = gy @ x^T as a tiled GEMM over the pixels, the bias fused; see the section at the end.

extern "C" __global__ void conv1x1_forward(const float* __restrict__ x, const float* __restrict__ w,
                                           const float* __restrict__ b, float* __restrict__ y,
                                           int N, int Ci, int P, int Co) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Co * P) return;
    const int p = t % P;
    const int co = (t / P) % Co;
    const int n = t / (P * Co);
    float acc = b[co];
    for (int ci = 0; ci < Ci; ++ci) acc += w[co * Ci + ci] * x[(n * Ci + ci) * P + p];
    y[t] = acc;
}

extern "C" __global__ void conv1x1_grad_input(const float* __restrict__ gy, const float* __restrict__ w,
                                              float* __restrict__ gx, int N, int Ci, int P, int Co) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Ci * P) return;
    const int p = t % P;
    const int ci = (t / P) % Ci;
    const int n = t / (P * Ci);
    float acc = 0.0f;
    for (int co = 0; co < Co; ++co) acc += w[co * Ci + ci] * gy[(n * Co + co) * P + p];
    gx[t] = acc;
}

#define C1_THREADS 128
#define C1_CI 8

extern "C" __global__ void __launch_bounds__(C1_THREADS)
conv1x1_grad_weight(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                    float* __restrict__ out_bias, int N, int Ci, int P, int Co, int pixels_per_slice) {
    __shared__ float s_sum[C1_CI + 1][C1_THREADS];   // 8 weights, then the bias
    const int groups = (Ci + C1_CI - 1) / C1_CI;
    const int co = blockIdx.x / groups;
    const int ci0 = (blockIdx.x % groups) * C1_CI;
    const int t = threadIdx.x;
    const int total = N * P;
    const int start = blockIdx.y * pixels_per_slice;
    const int stop = min(total, start + pixels_per_slice);

    float acc[C1_CI];
#pragma unroll
    for (int c = 0; c < C1_CI; ++c) acc[c] = 0.0f;
    float bias = 0.0f;   // the bias gradient, fused: the sum of the same g values
    int p = (start + t) % P, n = (start + t) / P;   // e = (n, p), then stepped by additions
    for (int e = start + t; e < stop; e += C1_THREADS) {
        const float g = gy[(n * Co + co) * P + p];
        bias += g;
#pragma unroll
        for (int c = 0; c < C1_CI; ++c) {
            if (ci0 + c >= Ci) break;
            acc[c] += g * x[(n * Ci + ci0 + c) * P + p];
        }
        p += C1_THREADS;
        if (p >= P) { n += p / P; p %= P; }
    }
#pragma unroll
    for (int c = 0; c < C1_CI; ++c) s_sum[c][t] = acc[c];
    s_sum[C1_CI][t] = bias;
    __syncthreads();
    for (int stride = C1_THREADS / 2; stride > 0; stride /= 2) {
        if (t < stride)
            for (int c = 0; c <= C1_CI; ++c) s_sum[c][t] += s_sum[c][t + stride];
        __syncthreads();
    }
    if (t < C1_CI && ci0 + t < Ci) out[(blockIdx.y * Co + co) * Ci + ci0 + t] = s_sum[t][0];
    if (t == C1_CI && ci0 == 0) out_bias[blockIdx.y * Co + co] = s_sum[C1_CI][0];   // first group's block
}

// Serial weight gradient: thread m = co * Ci + ci adds gy[n,co,p] * x[n,ci,p] over (n, p) in order;
// threads m = Co*Ci + co add up gy[n,co,p] for the bias gradient.
#define SERIAL_CHUNK 32
extern "C" __global__ void conv1x1_grad_weight_serial(const float* __restrict__ x, const float* __restrict__ gy,
                                                      float* __restrict__ gw, float* __restrict__ gb,
                                                      int N, int Ci, int P, int Co) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    const int weights = Co * Ci;
    if (m >= weights + Co) return;
    float acc = 0.0f;
    if (m >= weights) {   // a bias thread: gb[co] = the sum of gy[., co, .], in chunks
        const int co = m - weights;
        for (int n = 0; n < N; ++n)
            for (int p0 = 0; p0 < P; p0 += SERIAL_CHUNK) {
                float part = 0.0f;
                for (int p = p0; p < min(P, p0 + SERIAL_CHUNK); ++p) part += gy[(n * Co + co) * P + p];
                acc += part;
            }
        gb[co] = acc;
        return;
    }
    const int ci = m % Ci, co = m / Ci;
    for (int n = 0; n < N; ++n)
        for (int p0 = 0; p0 < P; p0 += SERIAL_CHUNK) {   // chunks of 32 pixels, for accuracy (reduce.cu)
            float part = 0.0f;
            for (int p = p0; p < min(P, p0 + SERIAL_CHUNK); ++p) part += gy[(n * Co + co) * P + p] * x[(n * Ci + ci) * P + p];
            acc += part;
        }
    gw[m] = acc;
}

// ---------------------------------------------------------------------------------------------
// Weight gradient as a GEMM (issue 16): gw (Co x Ci) = gy (Co x N*P) @ x^T (N*P x Ci), and the
// bias gradient gb[co] = sum_p gy[co, p] from the same loaded gy values (fused). The structure
// is conv3x3.cu's conv3x3_grad_weight_gemm (read its header for the details) with X[p, ci] =
// x[n, ci, p]: no im2col, every x value is used once per column tile.
//
// v3 FP32 conv1x1_grad_weight_gemm: grid (ceil(Ci / 64), ceil(Co / 64), slices), 256 threads.
// A stage = 32 pixels; warp w, lane l loads pixel l of rows w, w+8, ... of gy and columns w,
// w+8, ... of x (32 consecutive floats: coalesced) into [pixel][row] tiles padded to 65 floats
// (conflict-free stores); thread (ty, tx) = (t / 16, t % 16) keeps the 4 x 4 register tile of
// rows ty + 16r, columns tx + 16c. Per stage 64 * 64 * 32 FMAs for (64 + 64) * 32 global loads
// (32 FMAs per load, against 0.5 for conv1x1_grad_weight_serial); in shared memory 8 loads per
// 16 FMAs. Float32 accuracy: an accumulator sums at most WG_MAX_SLICE = 2048 products, the
// launcher splits longer pixel ranges into slices added by reduce.cu's sum_partials (fixed
// order, no atomics). The bias: each lane adds its gy values, the warp's lanes are added with
// shuffles at the end (a fixed tree), blockIdx.x == 0 writes it.
//
// U-Net's classifier has Co = 2 (classes) and Ci = 64: one 64 x 64 tile, 62 of whose rows are
// zeros; the pixel slices (N*P = 388*388 at the paper's tile: 74 slices of 2048) fill the GPU.
// FLOPs 2 * Co * Ci * N*P; bytes 4 * (Co + Ci) * N*P: intensity 2*Co*Ci / (4*(Co + Ci)) ~ 0.5
// FLOP/byte for the classifier, so it is bound by reading x, as it should be.
//
// v4 TF32 conv1x1_grad_weight_gemm_tf32: conv3x3_grad_weight_gemm_tf32's tensor-core version
// with the same X: 4 warps, each 2 x 2 wmma m16n16k8 TF32 fragments of the 64 x 64 tile,
// inputs rounded with wmma::__float_to_tf32, float32 accumulation; sm_80+ (a __trap() elsewhere:
// the launcher asks conv1x1_grad_weight_has_tf32 first and falls back to fp32 with a warning).
// ---------------------------------------------------------------------------------------------
#define WG_BM 64
#define WG_BN 64
#define WG_BK 32
#define WG_TM 4
#define WG_TN 4
#define WG_THREADS ((WG_BM / WG_TM) * (WG_BN / WG_TN))    // 256
#define WG_LOAD_ROWS (WG_THREADS / WG_BK)                 // 8
#define WG_MAX_SLICE 2048
#define WG_MIN_SLICE 256                                  // fewest pixels a block is split down to

extern "C" __global__ void __launch_bounds__(WG_THREADS)
conv1x1_grad_weight_gemm(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                         float* __restrict__ out_bias, int N, int Ci, int P, int Co, int pixels_per_slice) {
    static_assert(WG_BK == 32, "a stage's pixels are the 32 lanes of a warp (the bias shuffles rely on it)");
    __shared__ float s_gy[WG_BK][WG_BM + 1];   // [pixel][row]
    __shared__ float s_x[WG_BK][WG_BN + 1];    // [pixel][column]
    const int t = threadIdx.x;
    const int tx = t % (WG_BN / WG_TN), ty = t / (WG_BN / WG_TN);
    const int lane = t % WG_BK, lrow = t / WG_BK;
    const int col0 = blockIdx.x * WG_BN, row0 = blockIdx.y * WG_BM;
    const int start = blockIdx.z * pixels_per_slice;
    const int stop = min(N * P, start + pixels_per_slice);

    float acc[WG_TM][WG_TN];
#pragma unroll
    for (int r = 0; r < WG_TM; ++r)
#pragma unroll
        for (int c = 0; c < WG_TN; ++c) acc[r][c] = 0.0f;
    float bias[WG_BM / WG_LOAD_ROWS];
#pragma unroll
    for (int r = 0; r < WG_BM / WG_LOAD_ROWS; ++r) bias[r] = 0.0f;

    for (int p0 = start; p0 < stop; p0 += WG_BK) {
        const int p = p0 + lane;
        const bool live = p < stop;
        const int pl = live ? p : start;   // a lane past the end computes in-range (unused) indices
        const int n = pl / P, q = pl - n * P;
        const int gy_at = n * Co * P + q, x_at = n * Ci * P + q;   // gy[n, 0, q], x[n, 0, q]
#pragma unroll
        for (int r = 0; r < WG_BM / WG_LOAD_ROWS; ++r) {
            const int m = lrow + r * WG_LOAD_ROWS, co = row0 + m;
            const float g = live && co < Co ? gy[gy_at + co * P] : 0.0f;
            s_gy[lane][m] = g;
            bias[r] += g;
        }
#pragma unroll
        for (int r = 0; r < WG_BN / WG_LOAD_ROWS; ++r) {
            const int c = lrow + r * WG_LOAD_ROWS, ci = col0 + c;
            s_x[lane][c] = live && ci < Ci ? x[x_at + ci * P] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < WG_BK; ++k) {
            float a[WG_TM], b[WG_TN];
#pragma unroll
            for (int r = 0; r < WG_TM; ++r) a[r] = s_gy[k][ty + r * (WG_BM / WG_TM)];
#pragma unroll
            for (int c = 0; c < WG_TN; ++c) b[c] = s_x[k][tx + c * (WG_BN / WG_TN)];
#pragma unroll
            for (int r = 0; r < WG_TM; ++r)
#pragma unroll
                for (int c = 0; c < WG_TN; ++c) acc[r][c] += a[r] * b[c];
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < WG_TM; ++r) {
        const int co = row0 + ty + r * (WG_BM / WG_TM);
#pragma unroll
        for (int c = 0; c < WG_TN; ++c) {
            const int ci = col0 + tx + c * (WG_BN / WG_TN);
            if (co < Co && ci < Ci) out[(blockIdx.z * Co + co) * Ci + ci] = acc[r][c];
        }
    }
    if (blockIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < WG_BM / WG_LOAD_ROWS; ++r) {
            float v = bias[r];
#pragma unroll
            for (int offset = WG_BK / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
            const int co = row0 + lrow + r * WG_LOAD_ROWS;
            if (lane == 0 && co < Co) out_bias[blockIdx.z * Co + co] = v;
        }
    }
}

#if defined(__has_include)
#if __has_include(<mma.h>)
#include <mma.h>
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define WG_WMMA_TF32 1                                   // this compilation has TF32 wmma
#endif
#endif
#endif

#define WT_BM 64
#define WT_BN 64
#define WT_BK 32
#define WT_THREADS 128
#define WT_LD (WT_BK + 4)
#define WT_LDC (WT_BN + 4)
#define WT_SMEM (2 * WT_BM * WT_LD)

extern "C" __global__ void conv1x1_grad_weight_has_tf32(int* flag) {
#ifdef WG_WMMA_TF32
    flag[0] = 1;
#else
    flag[0] = 0;
#endif
}

extern "C" __global__ void __launch_bounds__(WT_THREADS)
conv1x1_grad_weight_gemm_tf32(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                              float* __restrict__ out_bias, int N, int Ci, int P, int Co, int pixels_per_slice) {
#ifdef WG_WMMA_TF32
    using namespace nvcuda;
    static_assert(WT_BK == 32 && WT_THREADS == 128, "lane = pixel of the stage; 4 warps of 32 x 32");
    static_assert(WT_BM * WT_LDC <= WT_SMEM, "the staged result fits the stage buffer");
    __shared__ __align__(32) float smem[WT_SMEM];
    float* s_a = smem;                   // [row][pixel]: gy
    float* s_b = smem + WT_BM * WT_LD;   // [column][pixel]: x
    float* s_c = smem;                   // after the last stage: [row][column]
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int wrow = (warp / 2) * 32, wcol = (warp % 2) * 32;
    const int col0 = blockIdx.x * WT_BN, row0 = blockIdx.y * WT_BM;
    const int start = blockIdx.z * pixels_per_slice;
    const int stop = min(N * P, start + pixels_per_slice);

    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
#pragma unroll
    for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) wmma::fill_fragment(acc[fi][fj], 0.0f);
    float bias[WT_BM / 4];
#pragma unroll
    for (int r = 0; r < WT_BM / 4; ++r) bias[r] = 0.0f;

    for (int p0 = start; p0 < stop; p0 += WT_BK) {
        const int p = p0 + lane;
        const bool live = p < stop;
        const int pl = live ? p : start;   // a lane past the end computes in-range (unused) indices
        const int n = pl / P, q = pl - n * P;
        const int gy_at = n * Co * P + q, x_at = n * Ci * P + q;
#pragma unroll
        for (int r = 0; r < WT_BM / 4; ++r) {
            const int m = warp + 4 * r, co = row0 + m;
            const float g = live && co < Co ? gy[gy_at + co * P] : 0.0f;
            s_a[m * WT_LD + lane] = g;
            bias[r] += g;
        }
#pragma unroll 4   // not 16: fully unrolled, ptxas hoists all 16 loads (254 registers a thread for sm_90)
        for (int r = 0; r < WT_BN / 4; ++r) {
            const int c = warp + 4 * r, ci = col0 + c;
            s_b[c * WT_LD + lane] = live && ci < Ci ? x[x_at + ci * P] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < WT_BK; kk += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b[2];
#pragma unroll
            for (int f = 0; f < 2; ++f) {
                wmma::load_matrix_sync(a[f], s_a + (wrow + 16 * f) * WT_LD + kk, WT_LD);
                wmma::load_matrix_sync(b[f], s_b + (wcol + 16 * f) * WT_LD + kk, WT_LD);
#pragma unroll
                for (int e = 0; e < a[f].num_elements; ++e) a[f].x[e] = wmma::__float_to_tf32(a[f].x[e]);
#pragma unroll
                for (int e = 0; e < b[f].num_elements; ++e) b[f].x[e] = wmma::__float_to_tf32(b[f].x[e]);
            }
#pragma unroll
            for (int fi = 0; fi < 2; ++fi)
#pragma unroll
                for (int fj = 0; fj < 2; ++fj) wmma::mma_sync(acc[fi][fj], a[fi], b[fj], acc[fi][fj]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj)
            wmma::store_matrix_sync(s_c + (wrow + 16 * fi) * WT_LDC + wcol + 16 * fj, acc[fi][fj], WT_LDC,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int e = t; e < WT_BM * WT_BN; e += WT_THREADS) {
        const int m = e / WT_BN, c = e % WT_BN, co = row0 + m, ci = col0 + c;
        if (co < Co && ci < Ci) out[(blockIdx.z * Co + co) * Ci + ci] = s_c[m * WT_LDC + c];
    }
    if (blockIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < WT_BM / 4; ++r) {
            float v = bias[r];
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
            const int co = row0 + warp + 4 * r;
            if (lane == 0 && co < Co) out_bias[blockIdx.z * Co + co] = v;
        }
    }
#else
    __trap();   // no TF32 tensor cores in this compilation (before sm_80, or no <mma.h>)
#endif
}
