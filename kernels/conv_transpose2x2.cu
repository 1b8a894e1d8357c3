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
//                                  pixel's 2x2 block of gy), the bias fused; see the section below
//                                  (the tiles and the product: gemm_tiles.cuh, shared with conv3x3
//                                  and conv1x1, as is the TF32 fragment step of the _tf32 GEMMs).
//   conv_transpose2x2_grad_weight_gemm_128x128, _64x128, _64x128_tf32: the same in larger tiles
//                                  (reduction "gemm_large"), for Co*4 >= 128.

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
// (fused). The tiles, the stage loop, the product and the bias sums are gemm_tiles.cuh's (shared
// with conv3x3.cu and conv1x1.cu; its header says how threads map to the tiles): a 64 x 64 tile
// of gw per block, stages of 32 pixels in shared memory, pixel slices for long reductions (at
// most WG_MAX_SLICE = 2048 pixels per float32 accumulator, the slices added in a fixed order by
// reduce.cu's sum_partials: no atomics). Here the rows are x's channels and the columns come in
// groups of 4, one output channel's 2x2 block (ConvTranspose2x2WgradOperands).
//
// v3 FP32 conv_transpose2x2_grad_weight_gemm: grid (ceil(Co*4 / 64), ceil(Ci / 64), slices), 256
// threads. Warp w, lane l load pixel l of the stage: x rows w, w+8, ... (32 consecutive floats:
// coalesced) and, for the output channels w and w+8 of the tile's 16, the 2x2 block of gy
// (rows 2i and 2i+1, columns 2j and 2j+1: a warp's loads of one row cover 256 consecutive
// bytes, each sector used by two of its four loads). The lane adds the 4 values to its channel's
// bias sum. A 4 x 4 register tile a thread.
// FLOPs 2 * Ci * Co*4 * N*H*W; global loads per stage (64 + 64) * 32 floats for 64*64*32 FMAs:
// 32 FMAs per load, against 0.5 for conv_transpose2x2_grad_weight_serial.
//
// v4 TF32 conv_transpose2x2_grad_weight_gemm_tf32: the same tiles on the tensor cores (wmma
// m16n16k8 TF32, 4 warps of 2 x 2 fragments, inputs rounded with wmma::__float_to_tf32, float32
// accumulation); warp w loads x rows w, w+4, ... and the blocks of channels w, w+4, w+8, w+12;
// sm_80+ (a __trap() elsewhere: the launcher asks conv_transpose2x2_grad_weight_has_tf32 first
// and falls back to fp32 with a warning).
// ---------------------------------------------------------------------------------------------
#include "gemm_tiles.cuh"

// gy's 2x2 block of input pixel (i, j) for one output channel (`at` = its top-left element):
// the gemm's columns co*4 + (0, 1, 2, 3). Neighbouring lanes (neighbouring j) read neighbouring
// pairs of floats, so the two loads of a row hit the same 32-byte sectors (the second from L1).
__device__ __forceinline__ float4 ct_block(const float* __restrict__ gy, int at, int W) {
    const float* g = gy + at;
    return make_float4(g[0], g[1], g[2 * W], g[2 * W + 1]);
}

// gw (Ci x Co*4) = x (Ci x N*H*W) @ G (N*H*W x Co*4) for gemm_tiles.cuh: x's rows are channel
// planes (a stride of H*W floats); G's columns come 4 at a time, gy's 2x2 block of the lane's
// pixel for one output channel.
struct ConvTranspose2x2WgradOperands {
    static constexpr bool GY_ON_ROWS = false;         // B = G: gy is on the columns ...
    static constexpr int COLUMNS_PER_CHANNEL = 4;     // ... 4 taps (a*2 + b) per bias channel
    static constexpr int GROUPS_AT_ONCE = 2;                     // the large tiles' loads of x: gemm_tiles.cuh
    const float* x;
    const float* gy;
    int Ci, W, Co, plane;
    int rows, cols, pixels, channels;
    int x_at, gy_at;                                  // the lane's pixel: x[n, 0, i, j], gy[n, 0, 2i, 2j]

    __device__ __forceinline__ ConvTranspose2x2WgradOperands(const float* x_, const float* gy_, int N, int Ci_, int H,
                                                             int W_, int Co_)
        : x(x_), gy(gy_), Ci(Ci_), W(W_), Co(Co_), plane(H * W_), rows(Ci_), cols(Co_ * 4), pixels(N * H * W_),
          channels(Co_), x_at(0), gy_at(0) {}

    __device__ __forceinline__ void seek(int p) {
        const int n = p / plane, q = p - n * plane, i = q / W, j = q - i * W;
        x_at = n * Ci * plane + q;
        gy_at = n * Co * 4 * plane + 2 * i * 2 * W + 2 * j;
    }
    // G's columns 4*co .. 4*co + 3: output channel co's 2x2 block (0 past Co or the slice)
    __device__ __forceinline__ float4 block(int co, bool live) const {
        return live && co < Co ? ct_block(gy, gy_at + co * 4 * plane, W) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    // Columns 4*cc .. 4*cc + 3 of the tile (output channel co0 + cc; 0 past Co or the slice) to
    // dst[(4*cc + k) * dst_stride], and their sum to the channel's bias sum.
    template <class Dst>
    __device__ __forceinline__ void load_block(Dst dst, int dst_stride, int cc, int co0, bool live, float& bias) const {
        const float4 g = block(co0 + cc, live);
        dst[(4 * cc + 0) * dst_stride] = g.x;
        dst[(4 * cc + 1) * dst_stride] = g.y;
        dst[(4 * cc + 2) * dst_stride] = g.z;
        dst[(4 * cc + 3) * dst_stride] = g.w;
        bias += (g.x + g.y) + (g.z + g.w);
    }
    template <class TileA, class TileB>
    __device__ __forceinline__ void load_fp32(TileA s_a, TileB s_b, int lane, int lrow, int row0, int col0, bool live,
                                              float* bias) const {
        wg_load_channels<WG_BM / WG_LOAD_ROWS, WG_LOAD_ROWS, false>(s_a[lane], 1, x, x_at, plane, lrow, row0, Ci, live,
                                                                    bias);
#pragma unroll
        for (int r = 0; r < WG_BN / 4 / WG_LOAD_ROWS; ++r) load_block(s_b[lane], 1, lrow + r * WG_LOAD_ROWS, col0 / 4, live, bias[r]);
    }
    // the large tiles' groups: x rows (channels) row .. row + 3; G columns col .. col + 3 (col a
    // multiple of 4: one output channel's block)
    __device__ __forceinline__ float4 a4(int row, bool live) const { return wg_channels4(x, x_at, plane, row, Ci, live); }
    __device__ __forceinline__ float4 b4(int col, bool live) const { return block(col / 4, live); }
    __device__ __forceinline__ void load_tf32(float* s_a, float* s_b, int lane, int warp, int row0, int col0, bool live,
                                              float* bias) const {
        wg_load_channels<WT_BM / 4, 4, false>(s_a + lane, WT_LD, x, x_at, plane, warp, row0, Ci, live, bias);
#pragma unroll
        for (int r = 0; r < WT_BN / 4 / 4; ++r) load_block(s_b + lane, WT_LD, warp + 4 * r, col0 / 4, live, bias[r]);
    }
};

extern "C" __global__ void __launch_bounds__(WG_THREADS)
conv_transpose2x2_grad_weight_gemm(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                                   float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co,
                                   int pixels_per_slice) {
    wgrad_gemm_fp32(ConvTranspose2x2WgradOperands(x, gy, N, Ci, H, W, Co), out, out_bias, pixels_per_slice);
}

extern "C" __global__ void conv_transpose2x2_grad_weight_has_tf32(int* flag) { flag[0] = wg_has_tf32(); }

extern "C" __global__ void __launch_bounds__(WT_THREADS)
conv_transpose2x2_grad_weight_gemm_tf32(const float* __restrict__ x, const float* __restrict__ gy,
                                        float* __restrict__ out, float* __restrict__ out_bias,
                                        int N, int Ci, int H, int W, int Co, int pixels_per_slice) {
    wgrad_gemm_tf32(ConvTranspose2x2WgradOperands(x, gy, N, Ci, H, W, Co), out, out_bias, pixels_per_slice);
}

// gemm_large (gemm_tiles.cuh): FP32 128 x 128 tiles (256 threads) or, for Ci <= 64, 64 x 128 (128
// threads), 8 x 8 a thread; TF32 64 x 128 tiles (128 threads, 2 x 4 fragments a warp; sm_80+,
// after conv_transpose2x2_grad_weight_has_tf32). Grid (ceil(Co*4 / 128), ceil(Ci / BM), slices);
// a group of 4 columns is one output channel's 2x2 block (b4), and its bias sum. The launcher
// runs v3 / v4 instead where Co*4 < 128.
extern "C" __global__ void __launch_bounds__(WL_THREADS, WL_MIN_BLOCKS)
conv_transpose2x2_grad_weight_gemm_128x128(const float* __restrict__ x, const float* __restrict__ gy,
                                           float* __restrict__ out, float* __restrict__ out_bias,
                                           int N, int Ci, int H, int W, int Co, int pixels_per_slice) {
    wgrad_gemm_large_fp32<ConvTranspose2x2WgradOperands, WL_BM>(ConvTranspose2x2WgradOperands(x, gy, N, Ci, H, W, Co),
                                                                out, out_bias, pixels_per_slice);
}

extern "C" __global__ void __launch_bounds__(WL_THREADS_SHORT, WL_MIN_BLOCKS_SHORT)
conv_transpose2x2_grad_weight_gemm_64x128(const float* __restrict__ x, const float* __restrict__ gy,
                                          float* __restrict__ out, float* __restrict__ out_bias,
                                          int N, int Ci, int H, int W, int Co, int pixels_per_slice) {
    wgrad_gemm_large_fp32<ConvTranspose2x2WgradOperands, WL_BM_SHORT>(
        ConvTranspose2x2WgradOperands(x, gy, N, Ci, H, W, Co), out, out_bias, pixels_per_slice);
}

extern "C" __global__ void __launch_bounds__(WLT_THREADS, WL_MIN_BLOCKS_SHORT)
conv_transpose2x2_grad_weight_gemm_64x128_tf32(const float* __restrict__ x, const float* __restrict__ gy,
                                               float* __restrict__ out, float* __restrict__ out_bias,
                                               int N, int Ci, int H, int W, int Co, int pixels_per_slice) {
    wgrad_gemm_large_tf32(ConvTranspose2x2WgradOperands(x, gy, N, Ci, H, W, Co), out, out_bias, pixels_per_slice);
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

    Tf32Accumulator acc[2][2];   // the warp's 32 x 32 quarter of the tile (gemm_tiles.cuh)
    tf32_zero_2x2(acc);

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
        // A's two fragments: 16 rows apart, i.e. 16 staged rows (grad input, [row][channel]) or
        // 16 floats along a staged row (forward, [channel][row]); B's: 16 pixels apart
#pragma unroll
        for (int kk = 0; kk < CGT_BK; kk += 8)
            tf32_mma_2x2<typename CtLayoutA<GRAD_INPUT>::type, wmma::row_major>(
                acc, s_a + (GRAD_INPUT ? wrow * CGT_LDA + kk : kk * CGT_LDAT + wrow), GRAD_INPUT ? 16 * CGT_LDA : 16, lda,
                s_b + kk * CGT_LDB + wcol, 16, CGT_LDB);
        __syncthreads();
    }

    tf32_store_2x2(s_c + wrow * CGT_LDC + wcol, CGT_LDC, acc);
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
