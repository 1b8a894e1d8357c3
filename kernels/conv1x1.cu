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
//     gw = gy @ x^T as a tiled GEMM over the pixels, the bias fused; see the section at the end
//     (the tiles and the product: gemm_tiles.cuh, shared with conv3x3 and conv_transpose2x2).
//   conv1x1_grad_weight_gemm_128x128 / _64x128 / _64x128_tf32: the same in larger tiles
//     (reduction "gemm_large"), for Ci >= 128; the classifier (Ci = 64) runs v3 / v4.

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
// bias gradient gb[co] = sum_p gy[co, p] from the same loaded gy values (fused). The tiles, the
// stage loop, the product and the bias sums are gemm_tiles.cuh's (shared with conv3x3.cu and
// conv_transpose2x2.cu; its header says how threads map to the tiles); here X[p, ci] =
// x[n, ci, p] (Conv1x1WgradOperands): no im2col, every x value is used once per column tile.
//
// v3 FP32 conv1x1_grad_weight_gemm: grid (ceil(Ci / 64), ceil(Co / 64), slices), 256 threads;
// a 4 x 4 register tile a thread. v4 TF32 conv1x1_grad_weight_gemm_tf32: the same grid, 128
// threads = 4 warps of 2 x 2 wmma m16n16k8 TF32 fragments, float32 accumulation; sm_80+ (a
// __trap() elsewhere: the launcher asks conv1x1_grad_weight_has_tf32 first and falls back to
// fp32 with a warning). A warp's lanes load 32 consecutive pixels of one gy or x row (coalesced).
// Per stage of 32 pixels 64 * 64 * 32 FMAs for (64 + 64) * 32 global loads (32 FMAs per load,
// against 0.5 for conv1x1_grad_weight_serial). Float32 accuracy: an accumulator sums at most
// WG_MAX_SLICE = 2048 products; the launcher splits longer pixel ranges into slices added by
// reduce.cu's sum_partials (fixed order, no atomics).
//
// U-Net's classifier has Co = 2 (classes) and Ci = 64: one 64 x 64 tile, 62 of whose rows are
// zeros; the pixel slices (N*P = 388*388 at the paper's tile: 74 slices of 2048) fill the GPU.
// FLOPs 2 * Co * Ci * N*P; bytes 4 * (Co + Ci) * N*P: intensity 2*Co*Ci / (4*(Co + Ci)) ~ 0.5
// FLOP/byte for the classifier, so it is bound by reading x, as it should be.
// ---------------------------------------------------------------------------------------------
#include "gemm_tiles.cuh"

// gw (Co x Ci) = gy (Co x N*P) @ x^T (N*P x Ci) for gemm_tiles.cuh: both operands are channel
// rows of P pixels, so a lane's pixel (n, p) finds them at a stride of P floats a channel.
struct Conv1x1WgradOperands {
    static constexpr bool GY_ON_ROWS = true;          // A = gy: its rows are the bias channels
    static constexpr int COLUMNS_PER_CHANNEL = 1;     // (used only where gy is B)
    static constexpr int GROUPS_AT_ONCE = 32;                    // the large tiles' loads of x: gemm_tiles.cuh
    const float* x;
    const float* gy;
    int Ci, P, Co;
    int rows, cols, pixels, channels;
    int gy_at, x_at;                                  // the lane's pixel: gy[n, 0, q], x[n, 0, q]

    __device__ __forceinline__ Conv1x1WgradOperands(const float* x_, const float* gy_, int N, int Ci_, int P_, int Co_)
        : x(x_), gy(gy_), Ci(Ci_), P(P_), Co(Co_), rows(Co_), cols(Ci_), pixels(N * P_), channels(Co_),
          gy_at(0), x_at(0) {}

    __device__ __forceinline__ void seek(int p) {
        const int n = p / P, q = p - n * P;
        gy_at = n * Co * P + q;
        x_at = n * Ci * P + q;
    }
    template <class TileA, class TileB>
    __device__ __forceinline__ void load_fp32(TileA s_a, TileB s_b, int lane, int lrow, int row0, int col0, bool live,
                                              float* bias) const {
        wg_load_channels<WG_BM / WG_LOAD_ROWS, WG_LOAD_ROWS, true>(s_a[lane], 1, gy, gy_at, P, lrow, row0, Co, live, bias);
        wg_load_channels<WG_BN / WG_LOAD_ROWS, WG_LOAD_ROWS, false>(s_b[lane], 1, x, x_at, P, lrow, col0, Ci, live, bias);
    }
    // the large tiles' groups: gy rows (channels) row .. row + 3, x rows col .. col + 3
    __device__ __forceinline__ float4 a4(int row, bool live) const { return wg_channels4(gy, gy_at, P, row, Co, live); }
    __device__ __forceinline__ float4 b4(int col, bool live) const { return wg_channels4(x, x_at, P, col, Ci, live); }
    __device__ __forceinline__ void load_tf32(float* s_a, float* s_b, int lane, int warp, int row0, int col0, bool live,
                                              float* bias) const {
        wg_load_channels<WT_BM / 4, 4, true>(s_a + lane, WT_LD, gy, gy_at, P, warp, row0, Co, live, bias);
#pragma unroll 4   // not 16: fully unrolled, ptxas hoists all 16 loads (254 registers a thread for sm_90)
        for (int r = 0; r < WT_BN / 4; ++r) {
            const int c = warp + 4 * r, ci = col0 + c;
            s_b[c * WT_LD + lane] = live && ci < Ci ? x[x_at + ci * P] : 0.0f;
        }
    }
};

extern "C" __global__ void __launch_bounds__(WG_THREADS)
conv1x1_grad_weight_gemm(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                         float* __restrict__ out_bias, int N, int Ci, int P, int Co, int pixels_per_slice) {
    wgrad_gemm_fp32(Conv1x1WgradOperands(x, gy, N, Ci, P, Co), out, out_bias, pixels_per_slice);
}

extern "C" __global__ void conv1x1_grad_weight_has_tf32(int* flag) { flag[0] = wg_has_tf32(); }

extern "C" __global__ void __launch_bounds__(WT_THREADS)
conv1x1_grad_weight_gemm_tf32(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                              float* __restrict__ out_bias, int N, int Ci, int P, int Co, int pixels_per_slice) {
    wgrad_gemm_tf32(Conv1x1WgradOperands(x, gy, N, Ci, P, Co), out, out_bias, pixels_per_slice);
}

// gemm_large (gemm_tiles.cuh): FP32 128 x 128 tiles (256 threads) or, for a gw of at most 64 rows,
// 64 x 128 (128 threads), 8 x 8 a thread; TF32 64 x 128 tiles (128 threads, 2 x 4 fragments a
// warp; sm_80+, after conv1x1_grad_weight_has_tf32). Grid (ceil(Ci / 128), ceil(Co / BM), slices).
// The launcher runs v3 / v4 instead where Ci < 128 (U-Net's classifier: Co = 2, Ci = 64), whose
// 128-column tile would be at least half padding.
extern "C" __global__ void __launch_bounds__(WL_THREADS, WL_MIN_BLOCKS)
conv1x1_grad_weight_gemm_128x128(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                                 float* __restrict__ out_bias, int N, int Ci, int P, int Co, int pixels_per_slice) {
    wgrad_gemm_large_fp32<Conv1x1WgradOperands, WL_BM>(Conv1x1WgradOperands(x, gy, N, Ci, P, Co), out, out_bias,
                                                       pixels_per_slice);
}

extern "C" __global__ void __launch_bounds__(WL_THREADS_SHORT, WL_MIN_BLOCKS_SHORT)
conv1x1_grad_weight_gemm_64x128(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                                float* __restrict__ out_bias, int N, int Ci, int P, int Co, int pixels_per_slice) {
    wgrad_gemm_large_fp32<Conv1x1WgradOperands, WL_BM_SHORT>(Conv1x1WgradOperands(x, gy, N, Ci, P, Co), out,
                                                             out_bias, pixels_per_slice);
}

extern "C" __global__ void __launch_bounds__(WLT_THREADS, WL_MIN_BLOCKS_SHORT)
conv1x1_grad_weight_gemm_64x128_tf32(const float* __restrict__ x, const float* __restrict__ gy,
                                     float* __restrict__ out, float* __restrict__ out_bias, int N, int Ci, int P,
                                     int Co, int pixels_per_slice) {
    wgrad_gemm_large_tf32(Conv1x1WgradOperands(x, gy, N, Ci, P, Co), out, out_bias, pixels_per_slice);
}
