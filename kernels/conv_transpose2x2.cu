// conv_transpose2x2.cu -- U-Net's "up-convolution" (paper Section 2: "an upsampling of the feature
// map followed by a 2x2 convolution ("up-convolution") that halves the number of feature
// channels"), implemented as PyTorch's ConvTranspose2d(kernel_size=2, stride=2).
//
// Shapes (PyTorch layout, float32): x (N, Ci, H, W), w (Ci, Co, 2, 2), b (Co,)
//                                   -> y (N, Co, 2H, 2W).
// With stride = kernel size, the output 2x2 blocks of neighbouring input pixels do not overlap:
// every input pixel (i, j) "paints" its own block y[:, :, 2i:2i+2, 2j:2j+2].
//
//   forward      y[n,co,2i+a,2j+c] = b[co] + sum_ci x[n,ci,i,j] * w[ci,co,a,c]     (a, c in {0, 1})
//   grad input   gx[n,ci,i,j]      = sum_{co,a,c} gy[n,co,2i+a,2j+c] * w[ci,co,a,c]
//   grad weight  gw[ci,co,a,c]     = sum_{n,i,j} x[n,ci,i,j] * gy[n,co,2i+a,2j+c]
//   grad bias    gb[co]            = sum_{n,i,j} gy[n,co,:,:]      (fused into the weight-gradient kernels)
//
// Kernels
//   conv_transpose2x2_forward      one thread per (n, co, i, j): it reads x[n,:,i,j] once per
//                                  input channel and uses it for the 4 outputs of its block
//                                  (4 multiply-adds per x load instead of 1).
//   conv_transpose2x2_grad_input   one thread per gx element, gathering the 4 gy values of its
//                                  block for every output channel: no atomics.
//   conv_transpose2x2_grad_weight  one block per (ci, group of CT_CO = 8 output channels, slice of
//                                  the pixels): per input pixel a thread loads x once and uses it
//                                  for 8 channels x 4 taps, and adds the 4 gy values of each channel
//                                  to that channel's bias sum (the bias gradient, fused: the same
//                                  loads); the block then sums its threads' 32 + 8 partial sums with
//                                  a shared-memory tree (as conv3x3_grad_weight).
//   conv_transpose2x2_grad_weight_serial  one thread per weight, a loop over the pixels: for the
//                                  small deep layers, where weights outnumber pixels (see
//                                  conv3x3_grad_weight_serial for when each one pays).
//   conv_transpose2x2_forward_gemm / conv_transpose2x2_grad_input_gemm (FP32) and their _tf32
//                                  twins (tensor cores): the per-pixel channel products as tiled
//                                  GEMMs over all pixels (section at the end of the file).
//   conv_transpose2x2_grad_weight_gemm (v3, FP32) / ..._gemm_tf32 (v4, TF32 tensor cores):
//                                  gw = x @ G as a tiled GEMM over the input pixels (G: each
//                                  pixel's 2x2 block of gy), the bias fused; see the section below.

extern "C" __global__ void conv_transpose2x2_forward(const float* __restrict__ x, const float* __restrict__ w,
                                                     const float* __restrict__ b, float* __restrict__ y,
                                                     int N, int Ci, int H, int W, int Co) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Co * H * W) return;
    const int j = t % W;
    const int i = (t / W) % H;
    const int co = (t / (W * H)) % Co;
    const int n = t / (W * H * Co);
    float acc[4];                                  // the 2x2 output block, a*2 + c
    for (int k = 0; k < 4; ++k) acc[k] = b[co];
    for (int ci = 0; ci < Ci; ++ci) {
        const float v = x[((n * Ci + ci) * H + i) * W + j];   // neighbouring threads: neighbouring j
        const float* wp = w + (ci * Co + co) * 4;              // w[ci, co, :, :]
        for (int k = 0; k < 4; ++k) acc[k] += v * wp[k];
    }
    float* yp = y + ((n * Co + co) * 2 * H + 2 * i) * 2 * W + 2 * j;  // top-left of the block
    yp[0] = acc[0];
    yp[1] = acc[1];
    yp[2 * W] = acc[2];                            // the next output row is 2W floats further
    yp[2 * W + 1] = acc[3];
}

extern "C" __global__ void conv_transpose2x2_grad_input(const float* __restrict__ gy, const float* __restrict__ w,
                                                        float* __restrict__ gx, int N, int Ci, int H, int W, int Co) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Ci * H * W) return;
    const int j = t % W;
    const int i = (t / W) % H;
    const int ci = (t / (W * H)) % Ci;
    const int n = t / (W * H * Ci);
    float acc = 0.0f;
    for (int co = 0; co < Co; ++co) {
        const float* gp = gy + ((n * Co + co) * 2 * H + 2 * i) * 2 * W + 2 * j;
        const float* wp = w + (ci * Co + co) * 4;
        acc += gp[0] * wp[0] + gp[1] * wp[1] + gp[2 * W] * wp[2] + gp[2 * W + 1] * wp[3];
    }
    gx[t] = acc;
}

#define CT_THREADS 128
#define CT_CO 8

extern "C" __global__ void __launch_bounds__(CT_THREADS)
conv_transpose2x2_grad_weight(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                              float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co,
                              int pixels_per_slice) {
    __shared__ float s_sum[CT_CO * 5][CT_THREADS];   // 32 weights + 8 biases, * 128 * 4 bytes = 20 KiB
    const int groups = (Co + CT_CO - 1) / CT_CO;
    const int ci = blockIdx.x / groups;
    const int co0 = (blockIdx.x % groups) * CT_CO;
    const int t = threadIdx.x;
    const int total = N * H * W;
    const int start = blockIdx.y * pixels_per_slice;
    const int stop = min(total, start + pixels_per_slice);

    float acc[CT_CO][4];
#pragma unroll
    for (int d = 0; d < CT_CO; ++d)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[d][k] = 0.0f;
    float bias[CT_CO];   // the bias sums of the block's 8 channels (every ci's blocks add them; ci 0's write)
#pragma unroll
    for (int d = 0; d < CT_CO; ++d) bias[d] = 0.0f;

    // p = (n, i, j) of an input pixel, stepped by additions as in conv3x3_grad_weight
    const int di = CT_THREADS / W, dj = CT_THREADS % W;
    int j = (start + t) % W, i = ((start + t) / W) % H, n = (start + t) / (W * H);
    for (int p = start + t; p < stop; p += CT_THREADS) {
        const float v = x[((n * Ci + ci) * H + i) * W + j];
#pragma unroll
        for (int d = 0; d < CT_CO; ++d) {
            if (co0 + d >= Co) break;  // the last group may have fewer channels (no barrier inside)
            const float* gp = gy + ((n * Co + co0 + d) * 2 * H + 2 * i) * 2 * W + 2 * j;
            acc[d][0] += v * gp[0];
            acc[d][1] += v * gp[1];
            acc[d][2] += v * gp[2 * W];
            acc[d][3] += v * gp[2 * W + 1];
            bias[d] += (gp[0] + gp[1]) + (gp[2 * W] + gp[2 * W + 1]);
        }
        j += dj;
        i += di;
        if (j >= W) { j -= W; ++i; }
        if (i >= H) { n += i / H; i %= H; }
    }

#pragma unroll
    for (int q = 0; q < CT_CO * 4; ++q) s_sum[q][t] = acc[q / 4][q % 4];
#pragma unroll
    for (int d = 0; d < CT_CO; ++d) s_sum[CT_CO * 4 + d][t] = bias[d];
    __syncthreads();
    for (int stride = CT_THREADS / 2; stride > 0; stride /= 2) {   // tree: 7 steps for 128 threads
        if (t < stride)
            for (int q = 0; q < CT_CO * 5; ++q) s_sum[q][t] += s_sum[q][t + stride];
        __syncthreads();
    }
    // threads 0..31 write one weight each: q = d*4 + k -> out[slice][ci][co0+d][k]; in the blocks
    // of ci = 0, threads 32..39 write the biases of channels co0 .. co0+7
    if (t < CT_CO * 4 && co0 + t / 4 < Co)
        out[((blockIdx.y * Ci + ci) * Co + co0 + t / 4) * 4 + t % 4] = s_sum[t][0];
    if (ci == 0 && t >= CT_CO * 4 && t < CT_CO * 5 && co0 + t - CT_CO * 4 < Co)
        out_bias[blockIdx.y * Co + co0 + t - CT_CO * 4] = s_sum[t][0];
}

// Serial weight gradient: thread m = ((ci * Co + co) * 4 + a * 2 + c) adds x[n,ci,i,j] *
// gy[n,co,2i+a,2j+c] over every input pixel (n, i, j) in a loop, and threads m = Ci*Co*4 + co
// add up gy[n,co,:,:] for the bias gradient. No shared memory, no barriers.
// Napkin math: 2 loads per multiply-add; a warp's threads share ci and read the same x value
// (a broadcast) and gy values of 8 channels.
extern "C" __global__ void conv_transpose2x2_grad_weight_serial(const float* __restrict__ x, const float* __restrict__ gy,
                                                                float* __restrict__ gw, float* __restrict__ gb,
                                                                int N, int Ci, int H, int W, int Co) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    const int weights = Ci * Co * 4;
    if (m >= weights + Co) return;
    if (m >= weights) {   // a bias thread: every output row of gy[., co], a row at a time
        const int co = m - weights;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {
            const float* gp = gy + (n * Co + co) * 4 * H * W;
            for (int r = 0; r < 2 * H; ++r) {
                float row = 0.0f;
                for (int q = 0; q < 2 * W; ++q) row += gp[r * 2 * W + q];
                acc += row;
            }
        }
        gb[co] = acc;
        return;
    }
    const int a = (m / 2) % 2, c = m % 2, co = (m / 4) % Co, ci = m / (4 * Co);
    float acc = 0.0f;
    for (int n = 0; n < N; ++n) {
        const float* xp = x + (n * Ci + ci) * H * W;
        const float* gp = gy + ((n * Co + co) * 2 * H + a) * 2 * W + c;   // gy[n, co, a, c]
        for (int i = 0; i < H; ++i) {   // a row at a time, for accuracy (see conv3x3_grad_weight_serial)
            float row = 0.0f;
            for (int j = 0; j < W; ++j) row += xp[i * W + j] * gp[2 * i * 2 * W + 2 * j];
            acc += row;
        }
    }
    gw[m] = acc;
}

// ---------------------------------------------------------------------------------------------
// Weight gradient as a GEMM (issue 16):
//
//     gw[ci, c] = sum_p x[ci, p] * G[p, c]      c = co*4 + a*2 + b,  p = (n, i, j) input pixels
//     G[p, c]   = gy[n, co, 2i+a, 2j+b]          (each input pixel's 2x2 output block)
//
// gw (Ci x Co*4) = x (Ci x N*H*W) @ G (N*H*W x Co*4); the bias gradient gb[co] is the sum of
// G's four columns co*4 .. co*4+3 over the pixels, added up from the same loaded gy values
// (fused). The structure is conv3x3.cu's conv3x3_grad_weight_gemm (read its header): a 64 x 64
// tile of gw per block, stages of 32 pixels in shared memory, pixel slices for long reductions
// (at most WG_MAX_SLICE = 2048 pixels per float32 accumulator, the slices added in a fixed order
// by reduce.cu's sum_partials: no atomics).
//
// v3 FP32 conv_transpose2x2_grad_weight_gemm: grid (ceil(Co*4 / 64), ceil(Ci / 64), slices), 256
// threads. Warp w, lane l load pixel l of the stage: x rows w, w+8, ... (32 consecutive floats:
// coalesced) and, for the output channels w and w+8 of the tile's 16, the 2x2 block of gy
// (rows 2i and 2i+1, columns 2j and 2j+1: a warp's loads of one row cover 256 consecutive
// bytes, each sector used by two of its four loads). The lane adds the 4 values to its channel's
// bias sum. Thread (ty, tx) = (t / 16, t % 16) keeps the 4 x 4 register tile of rows ty + 16r,
// columns tx + 16c: 8 shared loads per 16 FMAs, conflict-free as in conv3x3's v3.
// FLOPs 2 * Ci * Co*4 * N*H*W; global loads per stage (64 + 64) * 32 floats for 64*64*32 FMAs:
// 32 FMAs per load, against 0.5 for conv_transpose2x2_grad_weight_serial.
//
// v4 TF32 conv_transpose2x2_grad_weight_gemm_tf32: the same tiles on the tensor cores (wmma
// m16n16k8 TF32, 4 warps of 2 x 2 fragments, inputs rounded with wmma::__float_to_tf32, float32
// accumulation), as conv3x3_grad_weight_gemm_tf32; sm_80+ (a __trap() elsewhere: the launcher asks
// conv_transpose2x2_grad_weight_has_tf32 first and falls back to fp32 with a warning).
// ---------------------------------------------------------------------------------------------
#define WG_BM 64                                          // gw rows (input channels) per block
#define WG_BN 64                                          // gw columns (co*4 + tap) per block: 16 channels
#define WG_BK 32
#define WG_TM 4
#define WG_TN 4
#define WG_THREADS ((WG_BM / WG_TM) * (WG_BN / WG_TN))    // 256
#define WG_LOAD_ROWS (WG_THREADS / WG_BK)                 // 8
#define WG_MAX_SLICE 2048
#define WG_MIN_SLICE 256                                  // fewest pixels a block is split down to

// gy's 2x2 block of input pixel (i, j) for one output channel (`at` = its top-left element):
// the gemm's columns co*4 + (0, 1, 2, 3). Neighbouring lanes (neighbouring j) read neighbouring
// pairs of floats, so the two loads of a row hit the same 32-byte sectors (the second from L1).
__device__ __forceinline__ float4 ct_block(const float* __restrict__ gy, int at, int W) {
    const float* g = gy + at;
    return make_float4(g[0], g[1], g[2 * W], g[2 * W + 1]);
}

extern "C" __global__ void __launch_bounds__(WG_THREADS)
conv_transpose2x2_grad_weight_gemm(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                                   float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co,
                                   int pixels_per_slice) {
    static_assert(WG_BK == 32, "a stage's pixels are the 32 lanes of a warp (the bias shuffles rely on it)");
    __shared__ float s_x[WG_BK][WG_BM + 1];   // [pixel][row]
    __shared__ float s_g[WG_BK][WG_BN + 1];   // [pixel][column]
    const int plane = H * W, C4 = Co * 4;
    const int t = threadIdx.x;
    const int tx = t % (WG_BN / WG_TN), ty = t / (WG_BN / WG_TN);
    const int lane = t % WG_BK, lrow = t / WG_BK;
    const int col0 = blockIdx.x * WG_BN, row0 = blockIdx.y * WG_BM, co0 = col0 / 4;
    const int start = blockIdx.z * pixels_per_slice;
    const int stop = min(N * plane, start + pixels_per_slice);

    float acc[WG_TM][WG_TN];
#pragma unroll
    for (int r = 0; r < WG_TM; ++r)
#pragma unroll
        for (int c = 0; c < WG_TN; ++c) acc[r][c] = 0.0f;
    float bias[WG_BN / 4 / WG_LOAD_ROWS];   // the lane's 2 output channels
#pragma unroll
    for (int r = 0; r < WG_BN / 4 / WG_LOAD_ROWS; ++r) bias[r] = 0.0f;

    for (int p0 = start; p0 < stop; p0 += WG_BK) {
        const int p = p0 + lane;
        const bool live = p < stop;
        const int pl = live ? p : start;   // a lane past the end computes in-range (unused) indices
        const int n = pl / plane, q = pl - n * plane, i = q / W, j = q - i * W;
        const int x_at = n * Ci * plane + q;                        // x[n, 0, i, j]
        const int gy_at = n * Co * 4 * plane + 2 * i * 2 * W + 2 * j;   // gy[n, 0, 2i, 2j]
#pragma unroll
        for (int r = 0; r < WG_BM / WG_LOAD_ROWS; ++r) {
            const int m = lrow + r * WG_LOAD_ROWS, ci = row0 + m;
            s_x[lane][m] = live && ci < Ci ? x[x_at + ci * plane] : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < WG_BN / 4 / WG_LOAD_ROWS; ++r) {
            const int cc = lrow + r * WG_LOAD_ROWS, co = co0 + cc;
            float4 g = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (live && co < Co) g = ct_block(gy, gy_at + co * 4 * plane, W);
            s_g[lane][4 * cc + 0] = g.x;
            s_g[lane][4 * cc + 1] = g.y;
            s_g[lane][4 * cc + 2] = g.z;
            s_g[lane][4 * cc + 3] = g.w;
            bias[r] += (g.x + g.y) + (g.z + g.w);
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < WG_BK; ++k) {
            float a[WG_TM], b[WG_TN];
#pragma unroll
            for (int r = 0; r < WG_TM; ++r) a[r] = s_x[k][ty + r * (WG_BM / WG_TM)];
#pragma unroll
            for (int c = 0; c < WG_TN; ++c) b[c] = s_g[k][tx + c * (WG_BN / WG_TN)];
#pragma unroll
            for (int r = 0; r < WG_TM; ++r)
#pragma unroll
                for (int c = 0; c < WG_TN; ++c) acc[r][c] += a[r] * b[c];
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < WG_TM; ++r) {
        const int ci = row0 + ty + r * (WG_BM / WG_TM);
#pragma unroll
        for (int c = 0; c < WG_TN; ++c) {
            const int col = col0 + tx + c * (WG_BN / WG_TN);
            if (ci < Ci && col < C4) out[(blockIdx.z * Ci + ci) * C4 + col] = acc[r][c];
        }
    }
    if (blockIdx.y == 0) {   // the bias, once per column tile (every row tile summed the same gy)
#pragma unroll
        for (int r = 0; r < WG_BN / 4 / WG_LOAD_ROWS; ++r) {
            float v = bias[r];
#pragma unroll
            for (int offset = WG_BK / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
            const int co = co0 + lrow + r * WG_LOAD_ROWS;
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

extern "C" __global__ void conv_transpose2x2_grad_weight_has_tf32(int* flag) {
#ifdef WG_WMMA_TF32
    flag[0] = 1;
#else
    flag[0] = 0;
#endif
}

extern "C" __global__ void __launch_bounds__(WT_THREADS)
conv_transpose2x2_grad_weight_gemm_tf32(const float* __restrict__ x, const float* __restrict__ gy,
                                        float* __restrict__ out, float* __restrict__ out_bias,
                                        int N, int Ci, int H, int W, int Co, int pixels_per_slice) {
#ifdef WG_WMMA_TF32
    using namespace nvcuda;
    static_assert(WT_BK == 32 && WT_THREADS == 128, "lane = pixel of the stage; 4 warps of 32 x 32");
    static_assert(WT_BM * WT_LDC <= WT_SMEM, "the staged result fits the stage buffer");
    __shared__ __align__(32) float smem[WT_SMEM];
    float* s_a = smem;                   // [row][pixel]: x
    float* s_b = smem + WT_BM * WT_LD;   // [column][pixel]: gy's 2x2 blocks
    float* s_c = smem;                   // after the last stage: [row][column]
    const int plane = H * W, C4 = Co * 4;
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int wrow = (warp / 2) * 32, wcol = (warp % 2) * 32;
    const int col0 = blockIdx.x * WT_BN, row0 = blockIdx.y * WT_BM, co0 = col0 / 4;
    const int start = blockIdx.z * pixels_per_slice;
    const int stop = min(N * plane, start + pixels_per_slice);

    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
#pragma unroll
    for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) wmma::fill_fragment(acc[fi][fj], 0.0f);
    float bias[WT_BN / 4 / 4];   // the lane's 4 output channels
#pragma unroll
    for (int r = 0; r < WT_BN / 4 / 4; ++r) bias[r] = 0.0f;

    for (int p0 = start; p0 < stop; p0 += WT_BK) {
        const int p = p0 + lane;
        const bool live = p < stop;
        const int pl = live ? p : start;   // a lane past the end computes in-range (unused) indices
        const int n = pl / plane, q = pl - n * plane, i = q / W, j = q - i * W;
        const int x_at = n * Ci * plane + q;
        const int gy_at = n * Co * 4 * plane + 2 * i * 2 * W + 2 * j;
#pragma unroll
        for (int r = 0; r < WT_BM / 4; ++r) {
            const int m = warp + 4 * r, ci = row0 + m;
            s_a[m * WT_LD + lane] = live && ci < Ci ? x[x_at + ci * plane] : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < WT_BN / 4 / 4; ++r) {
            const int cc = warp + 4 * r, co = co0 + cc;
            float4 g = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (live && co < Co) g = ct_block(gy, gy_at + co * 4 * plane, W);
            s_b[(4 * cc + 0) * WT_LD + lane] = g.x;
            s_b[(4 * cc + 1) * WT_LD + lane] = g.y;
            s_b[(4 * cc + 2) * WT_LD + lane] = g.z;
            s_b[(4 * cc + 3) * WT_LD + lane] = g.w;
            bias[r] += (g.x + g.y) + (g.z + g.w);
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
        const int m = e / WT_BN, c = e % WT_BN, ci = row0 + m, col = col0 + c;
        if (ci < Ci && col < C4) out[(blockIdx.z * Ci + ci) * C4 + col] = s_c[m * WT_LDC + c];
    }
    if (blockIdx.y == 0) {
#pragma unroll
        for (int r = 0; r < WT_BN / 4 / 4; ++r) {
            float v = bias[r];
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
            const int co = co0 + warp + 4 * r;
            if (lane == 0 && co < Co) out_bias[blockIdx.z * Co + co] = v;
        }
    }
#else
    __trap();   // no TF32 tensor cores in this compilation (before sm_80, or no <mma.h>)
#endif
}

// =============================================================================================
// Forward and input gradient as GEMMs (issue 16, item 4). Both are matrix products over the
// channels, independently at every input pixel p = (n, i, j):
//
//   forward      Y[c, p]  = sum_ci A[c, ci] * x[n, ci, i, j]     A[c, ci] = w[ci, c], c = co*4 + a*2 + b
//                y[n, co, 2i+a, 2j+b] = Y[c, p] + bias[co]                 (M = Co*4 rows, K = Ci)
//   grad input   gx[n, ci, i, j] = sum_c A[ci, c] * G[c, p]      A[ci, c] = w[ci, c],
//                G[c, p] = gy[n, co, 2i+a, 2j+b]                           (M = Ci rows, K = Co*4)
//
// (w (Ci, Co, 2, 2) is a row-major (Ci x Co*4) matrix.) The naive kernels above give each thread
// one (n, co, i, j) and loop over ci, reading every x value Co times (from L1/L2) and every weight
// once per thread. Here a block computes a 64-row x 64-pixel tile of the product: per stage it
// stages CG_BK channels of A (64 x CG_BK) and of the pixels' inputs (CG_BK x 64) in shared
// memory, and each of the 256 threads keeps a 4 x 4 register tile (rows ty + 16r, pixels
// tx + 16c): 8 shared loads per 16 FMAs, and 64 x 64 x CG_BK FMAs per (64 + 64) x CG_BK global
// loads (32 FMAs a load, against ~1 for the naive kernels).
// FLOPs 2 * N*H*W * Ci * Co*4 each; bytes at best x + y (or gy + gx) + w: the up-convolutions of
// U-Net have Ci = 2 Co, so the intensity is 2*Ci*Co*4 / (4 * (Ci + 4 Co)) = 4 Co / 3 FLOP per
// byte (85 for Co = 64): compute-bound on an H100/H200 (FP32 ~67 TFLOP/s, 3.35-4.8 TB/s
// memory) from Co ~ 16 up, so the tile's reuse is what pays.
//
// Mapping: grid (ceil(N*H*W / 64), ceil(M / 64)); the pixel axis runs over all images at once, so
// a thread's loaded pixel (t % 64 of the block's 64) and its (n, i, j) are fixed: one division at
// the start, none in the loop. Loads along the pixels are coalesced (x rows, gx rows; gy's 2x2
// blocks read two floats of every 8-byte pair, the sibling column the other: each sector used
// twice, the second time from L1). The forward stores scatter each pixel's 4 values to its 2x2
// output block (stride-2 stores, half a sector each).
//
// v2 FP32: conv_transpose2x2_forward_gemm / conv_transpose2x2_grad_input_gemm (256 threads).
// v3 TF32: ..._gemm_tf32 (128 threads = 4 warps of 2 x 2 wmma m16n16k8 fragments, CGT_BK = 32
// channels a stage, inputs rounded with wmma::__float_to_tf32, float32 accumulation, results
// through shared memory; sm_80+, a __trap() elsewhere: the launcher checks
// conv_transpose2x2_grad_weight_has_tf32, which covers the whole file).
// =============================================================================================
#define CG_BM 64                 // rows (forward: co*4 + tap; grad input: ci) per block
#define CG_BP 64                 // pixels per block
#define CG_BK 16                 // channels of the reduction per stage
#define CG_THREADS 256           // 16 x 16 threads, 4 x 4 outputs each

// The pixel p of the whole batch as (n, i, j): the one division of a thread.
struct CtPixel {
    int n, i, j, q;   // q = i * W + j
};
__device__ __forceinline__ CtPixel ct_pixel(int p, int H, int W) {
    CtPixel px;
    px.n = p / (H * W);
    px.q = p - px.n * H * W;
    px.i = px.q / W;
    px.j = px.q - px.i * W;
    return px;
}

template <bool GRAD_INPUT>
__device__ __forceinline__ void ct_gemm(const float* __restrict__ src, const float* __restrict__ w,
                                        const float* __restrict__ bias, float* __restrict__ dst,
                                        int N, int Ci, int H, int W, int Co) {
    __shared__ float s_a[CG_BK][CG_BM + 1];   // [channel][row]
    __shared__ float s_b[CG_BK][CG_BP];       // [channel][pixel]
    const int plane = H * W, C4 = Co * 4, pixels = N * plane;
    const int M = GRAD_INPUT ? Ci : C4, K = GRAD_INPUT ? C4 : Ci;
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;
    const int pix0 = blockIdx.x * CG_BP, row0 = blockIdx.y * CG_BM;

    // this thread loads pixel lp of the tile, channels lk, lk + 4, lk + 8, lk + 12 of each stage
    const int lp = t % CG_BP, lk = t / CG_BP;
    const bool live = pix0 + lp < pixels;
    const CtPixel px = ct_pixel(live ? pix0 + lp : 0, H, W);
    const int b_at = GRAD_INPUT ? px.n * C4 * plane + 2 * px.i * 2 * W + 2 * px.j   // gy[n, 0, 2i, 2j]
                                : px.n * Ci * plane + px.q;                        // x[n, 0, i, j]

    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += CG_BK) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            // A: forward A[c, ci] = w[ci * C4 + c], lanes along c; grad input A[ci, c] = w[ci * C4 + c],
            // lanes along c (the reduction axis). Either way consecutive lanes, consecutive addresses.
            const int e = t + r * CG_THREADS;
            const int ak = GRAD_INPUT ? e % CG_BK : e / CG_BM, am = GRAD_INPUT ? e / CG_BK : e % CG_BM;
            const int k = k0 + ak, m = row0 + am;
            s_a[ak][am] = k < K && m < M ? w[GRAD_INPUT ? m * C4 + k : k * C4 + m] : 0.0f;
            // B: channel k of the thread's pixel
            const int bk = lk + 4 * r, kb = k0 + bk;
            float v = 0.0f;
            if (live && kb < K)
                v = GRAD_INPUT ? src[b_at + (kb / 4) * 4 * plane + ((kb / 2) % 2) * 2 * W + kb % 2]
                               : src[b_at + kb * plane];
            s_b[bk][lp] = v;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < CG_BK; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = s_a[k][ty + 16 * r];
#pragma unroll
            for (int c = 0; c < 4; ++c) b[c] = s_b[k][tx + 16 * c];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * b[c];
        }
        __syncthreads();
    }

#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int p = pix0 + tx + 16 * c;
        if (p >= pixels) continue;
        const CtPixel o = ct_pixel(p, H, W);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int m = row0 + ty + 16 * r;
            if (m >= M) continue;
            if (GRAD_INPUT) {
                dst[(o.n * Ci + m) * plane + o.q] = acc[r][c];
            } else {
                const int co = m / 4, a = (m / 2) % 2, b = m % 2;
                dst[((o.n * Co + co) * 2 * H + 2 * o.i + a) * 2 * W + 2 * o.j + b] = acc[r][c] + bias[co];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(CG_THREADS)
conv_transpose2x2_forward_gemm(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                               float* __restrict__ y, int N, int Ci, int H, int W, int Co) {
    ct_gemm<false>(x, w, b, y, N, Ci, H, W, Co);
}

extern "C" __global__ void __launch_bounds__(CG_THREADS)
conv_transpose2x2_grad_input_gemm(const float* __restrict__ gy, const float* __restrict__ w, float* __restrict__ gx,
                                  int N, int Ci, int H, int W, int Co) {
    ct_gemm<true>(gy, w, nullptr, gx, N, Ci, H, W, Co);
}

#define CGT_BM 64                // rows per block
#define CGT_BP 64                // pixels per block
#define CGT_BK 32                // channels per stage: 4 wmma k-steps of 8
#define CGT_THREADS 128          // 4 warps, each a 32 x 32 quarter of the tile
#define CGT_LDA (CGT_BK + 4)     // A staged [row][channel] (grad input) ...
#define CGT_LDAT (CGT_BM + 4)    // ... or [channel][row] (forward: read as a col_major matrix_a)
#define CGT_LDB (CGT_BP + 4)     // B staged [channel][pixel]
#define CGT_LDC (CGT_BP + 4)     // the result staged [row][pixel]
#define CGT_SMEM (CGT_BM * CGT_LDA + CGT_BK * CGT_LDB)   // floats: A + B (the larger layout), and the result

#ifdef WG_WMMA_TF32
// The forward's A[c, ci] = w[ci * C4 + c] is read along c (coalesced) and staged [ci][c]: a
// col_major matrix_a. The input gradient's A[ci, c] = w[ci * C4 + c] is staged [ci][c]: row_major.
template <bool GRAD_INPUT> struct CtLayoutA { typedef nvcuda::wmma::col_major type; };
template <> struct CtLayoutA<true> { typedef nvcuda::wmma::row_major type; };
#endif

template <bool GRAD_INPUT>
__device__ __forceinline__ void ct_gemm_tf32(const float* __restrict__ src, const float* __restrict__ w,
                                             const float* __restrict__ bias, float* __restrict__ dst,
                                             int N, int Ci, int H, int W, int Co) {
#ifdef WG_WMMA_TF32
    using namespace nvcuda;
    static_assert(CGT_BK * CGT_LDAT + CGT_BK * CGT_LDB <= CGT_SMEM && CGT_BM * CGT_LDC <= CGT_SMEM,
                  "the forward's stage and the staged result fit the buffer");
    __shared__ __align__(32) float smem[CGT_SMEM];
    float* s_a = smem;
    float* s_b = smem + (GRAD_INPUT ? CGT_BM * CGT_LDA : CGT_BK * CGT_LDAT);   // 32-byte aligned: 2304 or 2176 floats
    float* s_c = smem;
    const int lda = GRAD_INPUT ? CGT_LDA : CGT_LDAT;
    const int plane = H * W, C4 = Co * 4, pixels = N * plane;
    const int M = GRAD_INPUT ? Ci : C4, K = GRAD_INPUT ? C4 : Ci;
    const int t = threadIdx.x, warp = t / 32;
    const int wrow = (warp / 2) * 32, wcol = (warp % 2) * 32;
    const int pix0 = blockIdx.x * CGT_BP, row0 = blockIdx.y * CGT_BM;

    const int lp = t % CGT_BP, lk = t / CGT_BP;   // the thread's pixel; channels lk, lk + 2, ...
    const bool live = pix0 + lp < pixels;
    const CtPixel px = ct_pixel(live ? pix0 + lp : 0, H, W);
    const int b_at = GRAD_INPUT ? px.n * C4 * plane + 2 * px.i * 2 * W + 2 * px.j : px.n * Ci * plane + px.q;

    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
#pragma unroll
    for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) wmma::fill_fragment(acc[fi][fj], 0.0f);

    for (int k0 = 0; k0 < K; k0 += CGT_BK) {
#pragma unroll 4
        for (int r = 0; r < CGT_BM * CGT_BK / CGT_THREADS; ++r) {   // 16 elements of A and of B a thread
            const int e = t + r * CGT_THREADS;
            const int ak = GRAD_INPUT ? e % CGT_BK : e / CGT_BM, am = GRAD_INPUT ? e / CGT_BK : e % CGT_BM;
            const int k = k0 + ak, m = row0 + am;
            const float a = k < K && m < M ? w[GRAD_INPUT ? m * C4 + k : k * C4 + m] : 0.0f;
            s_a[GRAD_INPUT ? am * CGT_LDA + ak : ak * CGT_LDAT + am] = a;
            const int bk = lk + 2 * r, kb = k0 + bk;
            float v = 0.0f;
            if (live && kb < K)
                v = GRAD_INPUT ? src[b_at + (kb / 4) * 4 * plane + ((kb / 2) % 2) * 2 * W + kb % 2]
                               : src[b_at + kb * plane];
            s_b[bk * CGT_LDB + lp] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < CGT_BK; kk += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, typename CtLayoutA<GRAD_INPUT>::type> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b[2];
#pragma unroll
            for (int f = 0; f < 2; ++f) {
                const int m = wrow + 16 * f;
                wmma::load_matrix_sync(a[f], s_a + (GRAD_INPUT ? m * CGT_LDA + kk : kk * CGT_LDAT + m), lda);
                wmma::load_matrix_sync(b[f], s_b + kk * CGT_LDB + wcol + 16 * f, CGT_LDB);
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
            wmma::store_matrix_sync(s_c + (wrow + 16 * fi) * CGT_LDC + wcol + 16 * fj, acc[fi][fj], CGT_LDC,
                                    wmma::mem_row_major);
    __syncthreads();
    if (live) {   // the thread's pixel lp, rows lk, lk + 2, ...: consecutive threads, consecutive pixels
        for (int am = lk; am < CGT_BM; am += CGT_THREADS / CGT_BP) {
            const int m = row0 + am;
            if (m >= M) break;
            const float v = s_c[am * CGT_LDC + lp];
            if (GRAD_INPUT) {
                dst[(px.n * Ci + m) * plane + px.q] = v;
            } else {
                const int co = m / 4, a = (m / 2) % 2, b = m % 2;
                dst[((px.n * Co + co) * 2 * H + 2 * px.i + a) * 2 * W + 2 * px.j + b] = v + bias[co];
            }
        }
    }
#else
    __trap();   // no TF32 tensor cores in this compilation (before sm_80, or no <mma.h>)
#endif
}

extern "C" __global__ void __launch_bounds__(CGT_THREADS)
conv_transpose2x2_forward_gemm_tf32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                                    float* __restrict__ y, int N, int Ci, int H, int W, int Co) {
    ct_gemm_tf32<false>(x, w, b, y, N, Ci, H, W, Co);
}

extern "C" __global__ void __launch_bounds__(CGT_THREADS)
conv_transpose2x2_grad_input_gemm_tf32(const float* __restrict__ gy, const float* __restrict__ w,
                                       float* __restrict__ gx, int N, int Ci, int H, int W, int Co) {
    ct_gemm_tf32<true>(gy, w, nullptr, gx, N, Ci, H, W, Co);
}
