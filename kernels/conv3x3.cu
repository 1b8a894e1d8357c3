// conv3x3.cu -- the valid (unpadded) 3x3 convolution of U-Net (paper Section 2: "repeated
// application of two 3x3 convolutions (unpadded convolutions), each followed by a ReLU"),
// forward and backward.
//
// Shapes (PyTorch layout, float32, C-contiguous):
//   x  (N, Ci, H, W)      input
//   w  (Co, Ci, 3, 3)     weights
//   b  (Co,)              bias (the launcher passes zeros when the layer has none)
//   y  (N, Co, Ho, Wo)    output, Ho = H - 2, Wo = W - 2
//
//   forward       y[n,co,i,j]   = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] * x[n,ci,i+ky,j+kx]
//   grad input    gx[n,ci,i,j]  = sum_{co,ky,kx} gy[n,co,i-ky,j-kx] * w[co,ci,ky,kx]
//                               (terms whose gy index falls outside the output are 0)
//   grad weight   gw[co,ci,ky,kx] = sum_{n,i,j} gy[n,co,i,j] * x[n,ci,i+ky,j+kx]
//   grad bias     gb[co] = sum_{n,i,j} gy[n,co,i,j]   (fused into the weight-gradient kernels)
//
// Kernels in this file
//   conv3x3_forward_naive      v1: one thread per output element, everything read from global
//                              memory. The definition, written as a kernel.
//   conv3x3_forward_tiled      v2: a block computes a 16x32 output tile for 8 output channels;
//                              the input tile (with its 2-pixel halo) and the weights are staged
//                              in shared memory 8 input channels at a time, and each thread keeps
//                              2 rows x 8 channels = 16 outputs in registers (register blocking).
//   conv3x3_grad_input_naive   v1: one thread per input pixel, a gather over (co, ky, kx).
//   conv3x3_grad_input_tiled   v2: the same tiled code as the forward pass. The input gradient
//                              IS a 3x3 convolution: of gy padded by 2 pixels on every side
//                              ("full" correlation), with the weights' channel axes swapped
//                              (Co <-> Ci) and both spatial axes flipped (ky -> 2-ky). Each thread
//                              gathers its own sums, so no two threads write the same element and
//                              no atomics are needed.
//   conv3x3_igemm_wide,        v3 "igemm": the convolution as an implicit GEMM (M = output channels,
//   conv3x3_igemm_narrow,      N = pixels, K = 9 x input channels), register-blocked: each thread
//   conv3x3_igemm_deep         keeps 8 (4) channels x 4 pixels = 32 (16) sums, weights pre-transposed to
//                              [tap][ci][co] for float4 loads, load offsets computed once per
//                              block, double-buffered shared tiles (one barrier per chunk); a
//                              wide (32 ch x 8x32 px), narrow (16 ch x 8x32) or deep (64 ch x 8x8)
//                              tile picked per layer, and a deterministic split over input channels
//                              (conv3x3_sum_splits adds the parts) when the grid is too small.
//                              One code for the forward pass and the input gradient (pad 0 / 2).
//   conv3x3_wmma,              v4 "wmma": the same implicit GEMM on TF32 tensor cores (m16n16k8,
//   conv3x3_wmma_narrow        FP32 sums; sm_80+, an FP32 fallback elsewhere); 32 or 16 channels.
//   conv3x3_wmma_big           v5 "wmma_big": v4 with a 64-channel block and a 64-channel warp
//                              tile (4 x 2 fragments: 8 mma_sync per 6 fragment loads, v4: 4 per
//                              4), operands rounded to TF32 once, as they are stored to shared
//                              memory; one copy of the tiles (48 KB of static shared memory do not
//                              hold two), refilled from registers between two barriers.
//   Fused epilogues (v3 to v5): bias and ReLU in the store (y = max(conv + b, 0)); in the backward
//   of conv + ReLU, the mask gy * (y > 0) applied as gy is loaded, and that masked gy written
//   once for the weight gradient. conv3x3_gemm_weights lays out the weights for them.
//   conv3x3_grad_weight        one block per (co, group of 4 input channels) and slice of the
//                              pixels; each thread accumulates 4*9 partial sums (and the bias's)
//                              over a strided subset of pixels, then the block adds them up with a tree
//                              reduction in shared memory. Slices (blockIdx.y) write separate
//                              partial results that reduce.cu's sum_partials adds in a fixed
//                              order, so the result does not depend on the thread schedule.
//   conv3x3_grad_weight_serial one thread per weight (and per bias), adding its products over
//                              all pixels in a loop: no shared memory, no barriers. For the deep,
//                              small layers, where weights outnumber pixels ("auto" picks it on
//                              emu only: on an H200 it was the slowest kernel of the step).
//   conv3x3_grad_weight_gemm   wgrad v3: the weight gradient as a matrix product (Co x P) @ (P x Ci*9)
//                              over the pixels, x's side an implicit im2col: 64 x 64 tiles of gw
//                              per block, 32-pixel stages of gy and x in shared memory, a 4 x 4
//                              register tile per thread; pixel slices added by sum_partials.
//   conv3x3_grad_weight_gemm_tf32  wgrad v4: the same GEMM on TF32 tensor cores (nvcuda::wmma
//                              m16n16k8, float32 accumulation), for precision "tf32", sm_80+;
//                              conv3x3_grad_weight_has_tf32 tells the launcher it was compiled.
//                              (v3 and v4: the tiles, stage loop and product are
//                              gemm_tiles.cuh's, shared with conv1x1 and conv_transpose2x2;
//                              this file gives them its operands, Conv3x3WgradOperands.)
//   conv3x3_grad_weight_gemm_128x128, _gemm_64x128, _gemm_64x128_tf32   reduction "gemm_large":
//                              the same GEMM in larger tiles (FP32 8 x 8 a thread, TF32 2 x 4
//                              fragments a warp; gemm_tiles.cuh), for Ci*9 >= 128.
//   Every weight-gradient kernel also computes the bias gradient (fused: the same pass over gy).
//
// Index arithmetic is 32-bit: the Python launcher refuses arrays of 2^31 or more elements.

// ---------------------------------------------------------------------------------------------
// v1: naive forward. Thread t computes output element t (flat C-order index into y). Neighbouring
// threads have neighbouring j, so their loads of x (x[..., i+ky, j+kx]) hit neighbouring addresses
// (coalesced); all threads of a warp mostly read the same w element (a broadcast).
// Cost: 2 global loads (x and w) per multiply-add; caches absorb most of them, but not all.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void conv3x3_forward_naive(const float* __restrict__ x, const float* __restrict__ w,
                                                 const float* __restrict__ b, float* __restrict__ y,
                                                 int N, int Ci, int H, int W, int Co) {
    const int Ho = H - 2, Wo = W - 2;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Co * Ho * Wo) return;
    const int j = t % Wo;                 // decompose the flat index, innermost axis first
    const int i = (t / Wo) % Ho;
    const int co = (t / (Wo * Ho)) % Co;
    const int n = t / (Wo * Ho * Co);
    // One running sum per row of the window: three independent chains of multiply-adds instead
    // of one, so a multiply-add need not wait for the previous one to finish (instruction-level
    // parallelism; on a GPU and on a CPU alike), and each sum has a third as many terms (less
    // float32 rounding). They are added at the end.
    float acc[3] = {0.0f, 0.0f, 0.0f};
    for (int ci = 0; ci < Ci; ++ci) {
        const float* xp = x + ((n * Ci + ci) * H + i) * W + j;  // top-left of the 3x3 window
        const float* wp = w + (co * Ci + ci) * 9;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky)
#pragma unroll
            for (int kx = 0; kx < 3; ++kx)
                acc[ky] += wp[ky * 3 + kx] * xp[ky * W + kx];
    }
    y[t] = b[co] + (acc[0] + acc[1] + acc[2]);
}

// ---------------------------------------------------------------------------------------------
// v1: naive input gradient (gather). Thread t owns gx element t = (n, ci, i, j) and sums every
// output pixel whose 3x3 window covered (i, j): output (i-ky, j-kx) for the 9 taps, if in range.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void conv3x3_grad_input_naive(const float* __restrict__ gy, const float* __restrict__ w,
                                                    float* __restrict__ gx,
                                                    int N, int Ci, int H, int W, int Co) {
    const int Ho = H - 2, Wo = W - 2;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Ci * H * W) return;
    const int j = t % W;
    const int i = (t / W) % H;
    const int ci = (t / (W * H)) % Ci;
    const int n = t / (W * H * Ci);
    float acc[3] = {0.0f, 0.0f, 0.0f};   // one running sum per ky, as in the forward kernel
    for (int co = 0; co < Co; ++co) {
        const float* gp = gy + (n * Co + co) * Ho * Wo;
        const float* wp = w + (co * Ci + ci) * 9;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
            const int oi = i - ky;
            if (oi < 0 || oi >= Ho) continue;
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) {
                const int oj = j - kx;
                if (oj < 0 || oj >= Wo) continue;
                acc[ky] += gp[oi * Wo + oj] * wp[ky * 3 + kx];
            }
        }
    }
    gx[t] = acc[0] + acc[1] + acc[2];
}

// ---------------------------------------------------------------------------------------------
// v2: the tiled 3x3 convolution, shared by the forward pass and the input gradient.
//
// Block = 32 x 8 threads; it computes an output tile of TILE_H x TILE_W = 16 x 32 pixels for
// CO_PER_BLOCK = 8 output channels of one image. Thread (tx, ty) owns the 2 output rows
// 2*ty and 2*ty+1 of column tx, for all 8 channels: 16 accumulators in registers.
// Grid = (tiles per image, ceil(C_dst / 8), N).
//
// The input channels are visited CI_CHUNK = 8 at a time. For each chunk the block
//   1. loads the input tile, 8 channels x 18 x 34 pixels (the output tile plus the 2-pixel halo
//      the 3x3 window needs), and the 8 x 8 x 9 matching weights into shared memory;
//      consecutive threads load consecutive pixels of a row, so the global reads are coalesced;
//   2. waits (__syncthreads) until the whole tile is there;
//   3. computes: per input channel, each thread copies the 4 x 3 input values its two output rows
//      need into registers and does 2 rows x 8 channels x 9 taps = 144 multiply-adds with them;
//   4. waits again before the next chunk overwrites the tile.
//
// Data reuse (the point of tiling): per chunk the block reads 8*18*34 + 8*8*9 = 5472 floats from
// global memory and performs 16*32*8*8*9 = 294,912 multiply-adds: 0.019 global loads per
// multiply-add, against 2 for the naive kernel (~100x fewer). Inside the block, a thread reads
// 12 input + 72 weight values from shared memory for 144 multiply-adds; the weight reads are the
// same address for every thread of a warp (a broadcast: one transaction), and the input reads of
// a warp are 32 consecutive floats (no bank conflicts).
//
// Out-of-range pixels are loaded as 0, and so are the weights of channels past C_src or C_dst, so
// the inner loops need no bounds checks; the input channels past C_src in the last chunk are
// neither loaded nor used (the compute loop stops at the chunk's real channels). Only the final
// store checks that the output pixel and channel exist.
//
// GRAD_INPUT = false:  src = x, dst = y; dst[n,d,i,j] = bias[d] + sum src[n,s,i+ky,j+kx] * w[d,s,ky,kx]
// GRAD_INPUT = true:   src = gy, dst = gx; the source window starts 2 pixels up/left (PAD = 2,
//                      reads outside gy give 0) and the weight is w[s,d,2-ky,2-kx] (see the header).
// ---------------------------------------------------------------------------------------------
#define TILE_W 32                                // output columns per block = blockDim.x
#define BLOCK_ROWS 8                             // blockDim.y
#define ROWS_PER_THREAD 2                        // output rows per thread (register blocking)
#define TILE_H (BLOCK_ROWS * ROWS_PER_THREAD)    // 16 output rows per block
#define CO_PER_BLOCK 8                           // output channels per block (register blocking)
#define CI_CHUNK 8                               // input channels staged in shared memory at a time
#define IN_TILE_H (TILE_H + 2)                   // + the 2-pixel halo of a 3x3 window
#define IN_TILE_W (TILE_W + 2)
#define TILED_THREADS (TILE_W * BLOCK_ROWS)      // 256

template <bool GRAD_INPUT>
__device__ __forceinline__ void conv3x3_tiled(const float* __restrict__ src, const float* __restrict__ w,
                                              const float* __restrict__ bias, float* __restrict__ dst,
                                              int C_src, int H_src, int W_src, int C_dst, int H_dst, int W_dst) {
    __shared__ float s_in[CI_CHUNK][IN_TILE_H][IN_TILE_W];   // 8*18*34*4 = 19,584 bytes
    __shared__ float s_w[CO_PER_BLOCK][CI_CHUNK][9];         // 8*8*9*4   =  2,304 bytes
    const int PAD = GRAD_INPUT ? 2 : 0;

    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * TILE_W + tx;
    const int tiles_x = (W_dst + TILE_W - 1) / TILE_W;
    const int tile_i0 = (blockIdx.x / tiles_x) * TILE_H;     // the tile's top-left output pixel
    const int tile_j0 = (blockIdx.x % tiles_x) * TILE_W;
    const int d0 = blockIdx.y * CO_PER_BLOCK;                // first output channel of the block
    const int n = blockIdx.z;

    float acc[CO_PER_BLOCK][ROWS_PER_THREAD];
#pragma unroll
    for (int d = 0; d < CO_PER_BLOCK; ++d)
#pragma unroll
        for (int r = 0; r < ROWS_PER_THREAD; ++r) acc[d][r] = 0.0f;

    for (int s0 = 0; s0 < C_src; s0 += CI_CHUNK) {
        const int chunk = min(CI_CHUNK, C_src - s0);  // channels in this chunk: U-Net's first layer has 1, not 8
        // 1a. the input tile, chunk x 18 x 34 floats, as rows: tile row `row` = (channel c, row r)
        //     goes to the warp with ty = row % 8, whose 32 lanes load columns q = tx and, for
        //     the two halo columns past 32, lanes 0 and 1 load q = 32 + tx as well. Neighbouring
        //     lanes read neighbouring pixels (coalesced), and no thread divides per element.
        for (int row = ty; row < chunk * IN_TILE_H; row += BLOCK_ROWS) {
            const int c = row / IN_TILE_H, r = row % IN_TILE_H;
            const int si = tile_i0 + r - PAD, sj = tile_j0 + tx - PAD;
            const bool row_in = si >= 0 && si < H_src;
            const float* src_row = src + ((n * C_src + s0 + c) * H_src + (row_in ? si : 0)) * W_src;
            s_in[c][r][tx] = row_in && sj >= 0 && sj < W_src ? src_row[sj] : 0.0f;
            if (tx < IN_TILE_W - TILE_W)   // (sj + TILE_W >= 30: only the right edge can be outside)
                s_in[c][r][TILE_W + tx] = row_in && sj + TILE_W < W_src ? src_row[sj + TILE_W] : 0.0f;
        }
        // 1b. the weights of this chunk, as a [dst channel][src channel][tap] block.
        for (int e = tid; e < CO_PER_BLOCK * CI_CHUNK * 9; e += TILED_THREADS) {
            const int k = e % 9;
            const int c = (e / 9) % CI_CHUNK;
            const int d = e / (9 * CI_CHUNK);
            const int s = s0 + c, dd = d0 + d;
            float v = 0.0f;
            if (s < C_src && dd < C_dst)
                v = GRAD_INPUT ? w[(s * C_dst + dd) * 9 + (8 - k)]   // w[co=s, ci=dd, 2-ky, 2-kx]
                               : w[(dd * C_src + s) * 9 + k];        // w[co=dd, ci=s, ky, kx]
            s_w[d][c][k] = v;
        }
        __syncthreads();  // 2. every thread's loads are visible to every other thread

        // 3. compute. The 4 x 3 window of inputs is read from shared memory once per channel and
        //    reused for 8 output channels and 2 output rows (row r + ky serves output row r).
        //    Only the chunk's real channels (the rows of s_in past them were not loaded).
        for (int c = 0; c < chunk; ++c) {
            float in[ROWS_PER_THREAD + 2][3];
#pragma unroll
            for (int r = 0; r < ROWS_PER_THREAD + 2; ++r)
#pragma unroll
                for (int kx = 0; kx < 3; ++kx) in[r][kx] = s_in[c][ty * ROWS_PER_THREAD + r][tx + kx];
#pragma unroll
            for (int d = 0; d < CO_PER_BLOCK; ++d)
#pragma unroll
                for (int ky = 0; ky < 3; ++ky)
#pragma unroll
                    for (int kx = 0; kx < 3; ++kx) {
                        const float wv = s_w[d][c][ky * 3 + kx];
#pragma unroll
                        for (int r = 0; r < ROWS_PER_THREAD; ++r) acc[d][r] += wv * in[r + ky][kx];
                    }
        }
        __syncthreads();  // 4. nobody may overwrite the tile while others still read it
    }

    // Store: consecutive tx -> consecutive output columns (coalesced writes).
    const int j = tile_j0 + tx;
#pragma unroll
    for (int d = 0; d < CO_PER_BLOCK; ++d) {
        const int dd = d0 + d;
#pragma unroll
        for (int r = 0; r < ROWS_PER_THREAD; ++r) {
            const int i = tile_i0 + ty * ROWS_PER_THREAD + r;
            if (dd < C_dst && i < H_dst && j < W_dst)
                dst[((n * C_dst + dd) * H_dst + i) * W_dst + j] = acc[d][r] + (bias ? bias[dd] : 0.0f);
        }
    }
}

extern "C" __global__ void __launch_bounds__(TILED_THREADS)
conv3x3_forward_tiled(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                      float* __restrict__ y, int N, int Ci, int H, int W, int Co) {
    conv3x3_tiled<false>(x, w, b, y, Ci, H, W, Co, H - 2, W - 2);
}

extern "C" __global__ void __launch_bounds__(TILED_THREADS)
conv3x3_grad_input_tiled(const float* __restrict__ gy, const float* __restrict__ w, float* __restrict__ gx,
                         int N, int Ci, int H, int W, int Co) {
    conv3x3_tiled<true>(gy, w, nullptr, gx, Co, H - 2, W - 2, Ci, H, W);
}

// =============================================================================================
// v3 igemm and v4 wmma: the convolution as an implicit GEMM.
//
// Both passes are one matrix product. With k = (tap t = 3*ky + kx, source channel s) and
// p = an output pixel (i, j):
//     dst[d, p] = sum_k A[d, k] * B[k, p],   A[d, (t, s)] = weight,  B[(t, s), p] = src[s, p + off(t)]
// M = C_dst output channels, N = the pixels, K = 9 * C_src. "Implicit": B (im2col) is never
// written to memory; each block builds the part it needs in shared memory from the input tile.
// The same code runs the forward pass (src = x, pad = 0) and the input gradient (src = gy,
// pad = 2, A = the flipped, channel-swapped weights: see the header).
//
// Weight layout. conv3x3_gemm_weights writes A once per launch as wt[t][s][d] (9 x S_pad x D_pad,
// zeros past the real channels; S_pad a multiple of 8, D_pad of 64): the output channels d are
// contiguous, so a thread reads its 8 channels' weights of one (t, s) as two float4 loads (one
// 16-byte shared-memory access each), and no weight load needs a bounds check.
// =============================================================================================
#if defined(__has_include)
#if __has_include(<mma.h>)
#include <mma.h>
#define CONV3X3_HAVE_MMA_H 1
#endif
#endif
// Tensor cores for v4: on sm_80 and later (TF32 wmma needs them) when <mma.h> was found; the
// emulator (no __CUDA_ARCH__) has its own <mma.h>. Elsewhere (sm_75, or NVRTC without the CUDA
// include folder) conv3x3_wmma still compiles and computes the same tiles with FP32 FMAs.
#if defined(CONV3X3_HAVE_MMA_H) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800) && !defined(CONV3X3_NO_WMMA)
#define CONV3X3_WMMA 1
#else
#define CONV3X3_WMMA 0
#endif

#define GEMM_S_ALIGN 8    // S_pad is a multiple of this (the largest channel chunk, WM_CI)
#define GEMM_D_ALIGN 64   // D_pad is a multiple of this (the largest channel tile, IGD_BM)

// wt[(t * S_pad + s) * D_pad + d]: forward A[d=co, (t, s=ci)] = w[co, ci, t]; input gradient
// A[d=ci, (t, s=co)] = w[co, ci, 8 - t]. One thread per element of wt.
extern "C" __global__ void conv3x3_gemm_weights(const float* __restrict__ w, float* __restrict__ wt,
                                                int Co, int Ci, int S_pad, int D_pad, int grad_input) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= 9 * S_pad * D_pad) return;
    const int d = e % D_pad, s = (e / D_pad) % S_pad, t = e / (D_pad * S_pad);
    float v = 0.0f;
    if (grad_input) {
        if (s < Co && d < Ci) v = w[(s * Ci + d) * 9 + (8 - t)];
    } else if (s < Ci && d < Co) {
        v = w[(d * Ci + s) * 9 + t];
    }
    wt[e] = v;
}

// The input tile of one channel chunk: CI channels x IH x IW source pixels (the output tile and
// its 2-pixel halo), staged global -> registers -> shared memory. Each thread owns LOADS fixed
// elements e = tid, tid + THREADS, ...; their offsets in the source (c * plane + si * W + sj, or
// -1 outside the plane: a zero) and their slots in shared memory depend on the tile, not on the
// chunk, so they are computed once (init) and each chunk only adds its base: no division in
// the loop (the INTERLEAVED slot is e itself: computed, not held in a register). load() issues
// the global reads into registers; store() writes them to shared memory later, so the reads of
// chunk k+1 are in flight while the block computes chunk k (double buffering; v5: one copy).
// Shared layouts:
//  - v3: [c][r][q] with rows padded to IWS = IW rounded up to 1 mod 4 floats (34 -> 37,
//    10 -> 13). A warp's compute loads are 8 pixel groups 4 columns apart in each of 4 rows (wide
//    tile) or 2 groups in 8 rows (deep): with a row stride of 1 mod 4 the rows fall on different
//    banks mod 4, so the 32 lanes hit 32 different banks; with 34 rows 0 and 2 collided (2-way
//    bank conflicts on half the loads of the inner loop). Elements e run (c, r, q), q fastest:
//    neighbouring lanes read neighbouring pixels (coalesced).
//  - v4, INTERLEAVED: [r][q][c], the CI = 8 channels of a pixel in 32 contiguous bytes, the
//    layout wmma's B fragments load (see conv3x3_wmma). Elements e run (r, q, c), c fastest, so
//    lanes store to consecutive shared addresses (q fastest would put 32 lanes 8 floats apart:
//    8-way bank conflicts); a warp's global reads are then 4 pixels x 8 planes, 8 sectors of 32
//    bytes per request instead of 4, the other halves of which the next requests read from L1.
// With a ReLU mask (backward of conv + ReLU), the value is gy * (y > 0), and the block that owns
// the element (the first channel block; rows and columns past the 2-pixel pad: each gy pixel is
// owned once) also writes it to masked_out, the masked gradient the weight gradient needs.
template <int CI, int IH, int IW, int THREADS, bool INTERLEAVED>
struct Conv3x3TileLoader {
    static constexpr int ELEMS = CI * IH * IW;
    static constexpr int LOADS = (ELEMS + THREADS - 1) / THREADS;
    static constexpr int IWS = INTERLEAVED ? IW : IW + (5 - IW % 4) % 4;   // shared row stride
    static constexpr int FLOATS = INTERLEAVED ? ELEMS : CI * IH * IWS;     // shared floats per copy
    int offset[LOADS];
    int slot[LOADS];     // shared index of element l (its place in the padded layout; v3 only)
    int first;           // INTERLEAVED: element l's slot is its index e = first + l * THREADS
    unsigned owner;      // bit l: element l is this block's to write to masked_out
    float value[LOADS];

    // element e as (channel, tile row, tile column)
    static __device__ __forceinline__ void coords(int e, int& c, int& r, int& q) {
        if (INTERLEAVED) { c = e % CI; r = e / (CI * IW); q = (e / CI) % IW; }
        else             { c = e / (IH * IW); r = (e / IW) % IH; q = e % IW; }   // constant divisors
    }
    __device__ void init(int tid, int i0, int j0, int pad, int H, int W) {
        owner = 0;
        first = tid;
#pragma unroll
        for (int l = 0; l < LOADS; ++l) {
            const int e = tid + l * THREADS;
            int c, r, q;
            coords(e, c, r, q);
            const int si = i0 + r - pad, sj = j0 + q - pad;
            const bool inside = e < ELEMS && si >= 0 && si < H && sj >= 0 && sj < W;
            offset[l] = inside ? (c * H + si) * W + sj : -1;
            if (!INTERLEAVED) slot[l] = e < ELEMS ? (c * IH + r) * IWS + q : -1;
            if (inside && r >= pad && q >= pad) owner |= 1u << l;
        }
    }
    // src, mask, masked_out point at the chunk's first channel; limit = its real channels * plane
    __device__ void load(const float* __restrict__ src, const float* __restrict__ mask,
                         float* __restrict__ masked_out, int limit) {
#pragma unroll
        for (int l = 0; l < LOADS; ++l) {
            const int o = offset[l];
            float v = 0.0f;
            if (o >= 0 && o < limit) {
                v = src[o];
                if (mask) {
                    v = mask[o] > 0.0f ? v : 0.0f;
                    if (masked_out && (owner >> l & 1u)) masked_out[o] = v;
                }
            }
            value[l] = v;
        }
    }
    __device__ void store(float* s) const {
#pragma unroll
        for (int l = 0; l < LOADS; ++l) {
            const int at = INTERLEAVED ? (first + l * THREADS < ELEMS ? first + l * THREADS : -1) : slot[l];
            if (ELEMS % THREADS == 0 || at >= 0) s[at] = value[l];
        }
    }
    // v5: the loaded values rounded to TF32 before store() (masked_out got them unrounded)
    __device__ void to_tf32() {
#if CONV3X3_WMMA
#pragma unroll
        for (int l = 0; l < LOADS; ++l) value[l] = nvcuda::wmma::__float_to_tf32(value[l]);
#endif
    }
};

// The weights of one chunk, wt[t][s0 .. s0+CI)[d0 .. d0+BM) -> shared [t][c][BMS], as float4;
// BMS >= BM is the shared row stride (v4 pads it, see conv3x3_wmma). Vector e = tid + l * THREADS
// is (tap t, channel c, 4 channels dq) of the chunk; as THREADS is a multiple of the CI * BM / 4
// vectors of a tap, its (c, dq) depend on tid alone and its tap grows by THREADS / (CI * BM / 4)
// a step: one offset (l = 0) and a stride, not LOADS offsets held in registers.
template <int CI, int BM, int THREADS, int BMS = BM>
struct Conv3x3WeightLoader {
    static constexpr int VECS = 9 * CI * BM / 4;
    static constexpr int LOADS = (VECS + THREADS - 1) / THREADS;
    static_assert(THREADS % (CI * BM / 4) == 0, "a step of THREADS vectors moves by whole taps");
    static constexpr int TAPS_PER_STEP = THREADS / (CI * BM / 4);
    int offset;          // float index into wt of vector tid for s0 = 0
    int tap_stride;      // floats between two taps of wt: S_pad * D_pad
    int tid;
    float4 value[LOADS];

    __device__ void init(int tid_, int d0, int S_pad, int D_pad) {
        tid = tid_;
        const int t = tid / (CI * BM / 4), c = (tid / (BM / 4)) % CI, dq = tid % (BM / 4);
        offset = (t * S_pad + c) * D_pad + d0 + 4 * dq;
        tap_stride = S_pad * D_pad;
    }
    __device__ void load(const float* __restrict__ wt, int s0, int D_pad) {
        const float* from = wt + offset + s0 * D_pad;
#pragma unroll
        for (int l = 0; l < LOADS; ++l)
            if (VECS % THREADS == 0 || tid + l * THREADS < VECS)   // past the last tap: not stored
                value[l] = *reinterpret_cast<const float4*>(from + l * TAPS_PER_STEP * tap_stride);
    }
    __device__ void store(float* s) const {
#pragma unroll
        for (int l = 0; l < LOADS; ++l) {
            const int e = tid + l * THREADS;
            if (VECS % THREADS == 0 || e < VECS)
                reinterpret_cast<float4*>(s)[(e / (BM / 4)) * (BMS / 4) + e % (BM / 4)] = value[l];
        }
    }
    __device__ void to_tf32() {   // v5, as the tile loader's
#if CONV3X3_WMMA
#pragma unroll
        for (int l = 0; l < LOADS; ++l) {
            float4& v = value[l];
            v.x = nvcuda::wmma::__float_to_tf32(v.x);
            v.y = nvcuda::wmma::__float_to_tf32(v.y);
            v.z = nvcuda::wmma::__float_to_tf32(v.z);
            v.w = nvcuda::wmma::__float_to_tf32(v.w);
        }
#endif
    }
};

// The work split shared by v3, v4 and v5. Grid = (output tiles, channel blocks, splits * N):
// blockIdx.z = split * N + n. With one split the block finishes its outputs (bias, ReLU);
// with several (deep layers: few pixels, long K), split `split` sums the source channels
// [split * per_split, ...) and writes raw sums to dst = partial[split][n][d][i][j], which
// conv3x3_sum_splits adds in split order (deterministic; no atomics).
struct Conv3x3Block {
    int n, s_begin, s_end, i0, j0, d0;
    bool final_pass;
    __device__ Conv3x3Block(int N, int C_src, int W_dst, int per_split, int TH, int TW, int BM) {
        const int split = blockIdx.z / N;
        n = blockIdx.z % N;
        s_begin = split * per_split;
        s_end = min(C_src, s_begin + per_split);
        const int tiles_x = (W_dst + TW - 1) / TW;
        i0 = (blockIdx.x / tiles_x) * TH;
        j0 = (blockIdx.x % tiles_x) * TW;
        d0 = blockIdx.y * BM;
        final_pass = gridDim.z == (unsigned)N;
    }
};

__device__ __forceinline__ float conv3x3_epilogue(float acc, const float* __restrict__ bias, int d, bool final_pass,
                                                  int relu) {
    if (!final_pass) return acc;                 // a partial sum: bias and ReLU come after the sum
    const float v = acc + bias[d];
    return relu ? fmaxf(v, 0.0f) : v;
}

// ---------------------------------------------------------------------------------------------
// v3: igemm, register-blocked implicit GEMM on the FP32 units.
//
// Block tile: BM output channels x (TH x TW) output pixels; the source channels are visited CI at
// a time (a K step of 9 * CI). Thread `tid` owns TM consecutive channels (channel group
// cg = tid / PXG) x TN consecutive pixels of one row (pixel group px = tid % PXG, PXG = TH * TW / TN
// groups): TM * TN accumulators in registers. Per source channel it reads its 3 x (TN + 2)
// window of the input tile from shared memory into registers (18 loads for TN = 4), and for each
// of the 9 taps its TM weights (TM / 4 float4 loads, the same address for all threads of a
// channel group: a broadcast), then does TM * TN multiply-adds: 8 * 4 * 9 = 288 FMAs for
// 18 + 18 shared loads, 8 FMAs per load (narrow, TM = 4: 144 FMAs for 18 + 9 loads; v2: 144 FMAs
// for 12 + 72 loads, 1.7 per load). That is why register blocking helps: a value in a register is
// reused TM (input) or TN (weight) times. Per warp, an SM issues 4 FMA instructions per cycle (128
// lanes) but serves one shared-memory wavefront per cycle (32 words, or one broadcast): v2 needs
// 84 wavefronts (84 cycles) for 144 FMA instructions (36 cycles), so shared memory bounds it at
// ~43% of the FMA peak; v3 needs 36 wavefronts for 288 FMAs (72 cycles), narrow 27 for 144 (36):
// the FMA units become the limit - provided the loads are free of bank conflicts (see the
// loader's padded rows).
// Double buffering: two copies of each shared tile; the global loads of chunk k+1 go to registers
// before chunk k is computed and into the other copy after it: one barrier per chunk, and the
// global latency hides behind the FMAs.
// The last chunk may have fewer than CI real channels (U-Net's first layer has 1): the compute
// loop stops at the real ones, so a 1-channel layer costs 1/CI of a chunk's FMAs.
//
// Three shapes (the launcher picks one per layer, gemm_plan in ops/conv3x3.py):
//   wide   (IGW_*): 32 channels x 8 x 32 pixels, 256 threads, 8 x 4 outputs per thread: large
//                   planes with many channels (the paper's 64 and more);
//   narrow (IGN_*): 16 channels x 8 x 32 pixels, 256 threads, 4 x 4 outputs per thread: large
//                   planes with few channels (base 8 or 16 networks), where half of a wide
//                   tile's channels would be padding;
//   deep   (IGD_*): 64 channels x 8 x 8 pixels, 128 threads, 8 x 4 outputs per thread: small
//                   planes with many channels, whose wide tiles would mostly hang past the plane.
// Any of them is split over the source channels when its grid is too small to fill the GPU.
// Napkin math, per block and chunk (wide, CI = 4): FLOPs 2 * 32 * 256 * 36 = 590k; global
// (L2) reads 4 * 10 * 34 + 36 * 32 = 2512 floats = 10 KB: 59 FLOP per byte loaded (v2:
// 2 * 16 * 32 * 8 * 72 = 590k FLOPs for 5472 floats = 21.9 KB, 27 FLOP/B: the 2x comes from
// staging 32 output channels' weights per block instead of 8). A layer's minimum DRAM
// traffic is unchanged (x, w, y once each); e.g. 64 -> 64 channels on a 570 x 570 input:
// 2 * 64 * 64 * 9 * 568^2 = 23.8 GFLOP over 4 * (64 * 570^2 + 64 * 568^2) = 166 MB = 143 FLOP/B,
// compute bound on any GPU (an H200's FP32 ridge is about 67 TFLOP/s / 4.8 TB/s = 14 FLOP/B).
// ---------------------------------------------------------------------------------------------
#define IGW_BM 32
#define IGW_TM 8
#define IGW_TH 8
#define IGW_TW 32
#define IGW_TN 4
#define IGW_CI 4
#define IGW_THREADS ((IGW_BM / IGW_TM) * (IGW_TH * IGW_TW / IGW_TN))    // 4 x 64 = 256
#define IGN_BM 16
#define IGN_TM 4
#define IGN_TH 8
#define IGN_TW 32
#define IGN_TN 4
#define IGN_CI 4
#define IGN_THREADS ((IGN_BM / IGN_TM) * (IGN_TH * IGN_TW / IGN_TN))    // 4 x 64 = 256
#define IGD_BM 64
#define IGD_TM 8
#define IGD_TH 8
#define IGD_TW 8
#define IGD_TN 4
#define IGD_CI 4
#define IGD_THREADS ((IGD_BM / IGD_TM) * (IGD_TH * IGD_TW / IGD_TN))    // 8 x 16 = 128

template <int BM, int TM, int TH, int TW, int TN, int CI>
__device__ __forceinline__ void conv3x3_igemm(const float* __restrict__ src, const float* __restrict__ mask,
                                              const float* __restrict__ wt, const float* __restrict__ bias,
                                              float* __restrict__ dst, float* __restrict__ masked_out,
                                              int N, int C_src, int H_src, int W_src, int C_dst, int H_dst,
                                              int W_dst, int pad, int S_pad, int D_pad, int per_split, int relu,
                                              int use_mask) {
    constexpr int PXG = TH * TW / TN, THREADS = (BM / TM) * PXG;
    constexpr int IH = TH + 2, IW = TW + 2;
    using Tile = Conv3x3TileLoader<CI, IH, IW, THREADS, false>;
    constexpr int IWS = Tile::IWS;               // padded row stride (see the loader)
    __shared__ float s_in[2][Tile::FLOATS];
    __shared__ __align__(16) float s_w[2][9 * CI * BM];

    const int tid = threadIdx.x;
    const int px = tid % PXG, cg = tid / PXG;
    const int row = px / (TW / TN), q0 = (px % (TW / TN)) * TN;
    const Conv3x3Block blk(N, C_src, W_dst, per_split, TH, TW, BM);
    const int plane = H_src * W_src;
    if (!use_mask) mask = nullptr;
    if (!use_mask || blockIdx.y != 0) masked_out = nullptr;   // one channel block writes it

    Tile tile;
    Conv3x3WeightLoader<CI, BM, THREADS> wload;
    tile.init(tid, blk.i0, blk.j0, pad, H_src, W_src);
    wload.init(tid, blk.d0, S_pad, D_pad);

    float acc[TM][TN];
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int u = 0; u < TN; ++u) acc[m][u] = 0.0f;

    auto fetch = [&](int s0) {   // issue the global reads of the chunk starting at channel s0
        const int base = (blk.n * C_src + s0) * plane;
        tile.load(src + base, mask ? mask + base : nullptr, masked_out ? masked_out + base : nullptr,
                  (blk.s_end - s0) * plane);
        wload.load(wt, s0, D_pad);
    };
    if (blk.s_begin < blk.s_end) {
        fetch(blk.s_begin);
        tile.store(s_in[0]);
        wload.store(s_w[0]);
    }
    __syncthreads();
    int buf = 0;
    for (int s0 = blk.s_begin; s0 < blk.s_end; s0 += CI) {
        const bool more = s0 + CI < blk.s_end;
        if (more) fetch(s0 + CI);                   // in flight during the FMAs below
        const int chunk = min(CI, blk.s_end - s0);
        const float* sin = s_in[buf];
        const float* sw = s_w[buf];
#pragma unroll
        for (int c = 0; c < CI; ++c) {
            if (c >= chunk) break;                  // the first layer: 1 real channel of CI
            float in[3][TN + 2];
#pragma unroll
            for (int ky = 0; ky < 3; ++ky)
#pragma unroll
                for (int v = 0; v < TN + 2; ++v) in[ky][v] = sin[(c * IH + row + ky) * IWS + q0 + v];
#pragma unroll
            for (int t = 0; t < 9; ++t) {
                float wv[TM];
#pragma unroll
                for (int m4 = 0; m4 < TM / 4; ++m4) {
                    const float4 q = reinterpret_cast<const float4*>(sw + (t * CI + c) * BM + cg * TM)[m4];
                    wv[4 * m4] = q.x; wv[4 * m4 + 1] = q.y; wv[4 * m4 + 2] = q.z; wv[4 * m4 + 3] = q.w;
                }
#pragma unroll
                for (int m = 0; m < TM; ++m)
#pragma unroll
                    for (int u = 0; u < TN; ++u) acc[m][u] += wv[m] * in[t / 3][u + t % 3];
            }
        }
        if (more) {                                 // the other copy: nobody reads it now
            tile.store(s_in[buf ^ 1]);
            wload.store(s_w[buf ^ 1]);
        }
        __syncthreads();
        buf ^= 1;
    }

    const int i = blk.i0 + row;
#pragma unroll
    for (int m = 0; m < TM; ++m) {
        const int d = blk.d0 + cg * TM + m;
#pragma unroll
        for (int u = 0; u < TN; ++u) {
            const int j = blk.j0 + q0 + u;
            if (d < C_dst && i < H_dst && j < W_dst)
                dst[((blockIdx.z * C_dst + d) * H_dst + i) * W_dst + j] =
                    conv3x3_epilogue(acc[m][u], bias, d, blk.final_pass, relu);
        }
    }
}

// src (N, C_src, H_src, W_src); wt from conv3x3_gemm_weights; bias: C_dst values (zeros for the
// input gradient); dst (splits, N, C_dst, H_dst, W_dst); pad 0 (forward) or 2 (input gradient);
// relu: apply ReLU in the store; use_mask: src is masked by the ReLU output mask (y, the shape of
// src: src * (y > 0)) and that masked src is written to masked_out (else both are unused).
extern "C" __global__ void __launch_bounds__(IGW_THREADS)
conv3x3_igemm_wide(const float* __restrict__ src, const float* __restrict__ mask, const float* __restrict__ wt,
                   const float* __restrict__ bias, float* __restrict__ dst, float* __restrict__ masked_out,
                   int N, int C_src, int H_src, int W_src, int C_dst, int H_dst, int W_dst, int pad, int S_pad,
                   int D_pad, int per_split, int relu, int use_mask) {
    conv3x3_igemm<IGW_BM, IGW_TM, IGW_TH, IGW_TW, IGW_TN, IGW_CI>(
        src, mask, wt, bias, dst, masked_out, N, C_src, H_src, W_src, C_dst, H_dst, W_dst, pad, S_pad, D_pad,
        per_split, relu, use_mask);
}

extern "C" __global__ void __launch_bounds__(IGN_THREADS)
conv3x3_igemm_narrow(const float* __restrict__ src, const float* __restrict__ mask, const float* __restrict__ wt,
                     const float* __restrict__ bias, float* __restrict__ dst, float* __restrict__ masked_out,
                     int N, int C_src, int H_src, int W_src, int C_dst, int H_dst, int W_dst, int pad, int S_pad,
                     int D_pad, int per_split, int relu, int use_mask) {
    conv3x3_igemm<IGN_BM, IGN_TM, IGN_TH, IGN_TW, IGN_TN, IGN_CI>(
        src, mask, wt, bias, dst, masked_out, N, C_src, H_src, W_src, C_dst, H_dst, W_dst, pad, S_pad, D_pad,
        per_split, relu, use_mask);
}

// No __launch_bounds__ here: given __launch_bounds__(128), ptxas (CUDA 13, sm_90) held this kernel
// to 96 registers and spilled to local memory; without it, it takes the 128 it needs.
extern "C" __global__ void
conv3x3_igemm_deep(const float* __restrict__ src, const float* __restrict__ mask, const float* __restrict__ wt,
                   const float* __restrict__ bias, float* __restrict__ dst, float* __restrict__ masked_out,
                   int N, int C_src, int H_src, int W_src, int C_dst, int H_dst, int W_dst, int pad, int S_pad,
                   int D_pad, int per_split, int relu, int use_mask) {
    conv3x3_igemm<IGD_BM, IGD_TM, IGD_TH, IGD_TW, IGD_TN, IGD_CI>(
        src, mask, wt, bias, dst, masked_out, N, C_src, H_src, W_src, C_dst, H_dst, W_dst, pad, S_pad, D_pad,
        per_split, relu, use_mask);
}

// dst[e] = epilogue(sum over the splits of partial[split][e]), in split order. One thread per
// output element; plane = H_dst * W_dst, C = C_dst, total = N * C * plane.
extern "C" __global__ void conv3x3_sum_splits(const float* __restrict__ partial, const float* __restrict__ bias,
                                              float* __restrict__ dst, int splits, int total, int C, int plane,
                                              int relu) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    float acc = 0.0f;
    for (int k = 0; k < splits; ++k) acc += partial[k * total + e];
    dst[e] = conv3x3_epilogue(acc, bias, (e / plane) % C, true, relu);
}

// ---------------------------------------------------------------------------------------------
// v4: wmma, the same implicit GEMM on tensor cores (TF32 inputs, FP32 sums; sm_80+).
//
// Block: 4 warps (128 threads), tile WM_BM = 32 output channels x (8 rows x 16 columns) pixels.
// Warp w owns output rows 2w and 2w + 1 for all 32 channels: 2 x 2 accumulator fragments of
// 16 channels x 16 pixels (one row). conv3x3_wmma_narrow: 16 channels, 1 x 2 fragments per warp,
// for layers with at most 16 output channels (half of a 32-channel tile would be padding). K is walked per chunk of WM_CI = 8 source channels and per
// tap t: the k-step of m16n16k8 is "8 source channels at tap t", so
//   A fragment (16 channels x 8 k) = s_w[t][c][d0 .. d0+16), col_major with ldm = 40: rows
//     padded from 32 to 40 floats (16 to 24 in conv3x3_wmma_narrow). In the TF32 fragment layout PTX documents for mma.sync
//     (lane = 4 g + t holds rows g, g + 8 and k-columns t, t + 4), lane 4 g + t reads address
//     t * ldm + g: with ldm = 32 the four lanes t = 0..3 of a g hit one bank (4-way conflicts; v5's
//     64 channels: ldm = 72, banks 8 t + g as with 40),
//     with ldm = 40 the 32 lanes hit banks 8 t + g (24: 24 t + g mod 32), all different. (The emulator does not count
//     wmma's shared accesses; not yet measured.)
//   B fragment (8 k x 16 pixels)   = the tile's row (r + ky), columns kx .. kx + 15, channels c:
//     with the tile stored INTERLEAVED ([row][col][c], 8 channels = 32 bytes per pixel), that is
//     col_major with ldm = 8 starting at pixel (r + ky, kx): every start is 32-byte aligned, as
//     load_matrix_sync requires, for any tap shift - the reason for the interleaved layout.
// Per chunk a warp does 9 x (2 A + 2 B loads, 4 mma_sync) = 36 tensor-core products of
// 16 x 16 x 8 (2 * 16 * 16 * 8 * 36 = 147,456 FLOPs) for 36 fragment loads. Both operands are
// rounded to TF32 (__float_to_tf32: 10 mantissa bits, relative error <= 2^-11 each); products and
// sums are FP32.
// The accumulators go through shared memory (store_matrix_sync) so that bias, ReLU and the
// bounds checks of the edge tiles are applied per element. Double-buffered like v3.
// Napkin math: an H200's TF32 tensor cores peak near 495 TFLOP/s dense, FP32 FMAs at 67: the
// layers above (143 FLOP/B) stay compute bound only in a kernel that keeps operands in shared
// memory and registers, as this one does (per block and chunk 1440 + 2304 floats = 15 KB read
// for 2 * 32 * 128 * 72 = 590k FLOPs, 39 FLOP/B).
// Without tensor cores (sm_75, or no <mma.h>) each lane computes 32 of its warp's outputs with FP32
// FMAs from the same shared tiles (CONV3X3_WMMA = 0): correct everywhere, fast only on sm_80+.
// ---------------------------------------------------------------------------------------------
#define WM_BM 32                                 // conv3x3_wmma: 32 channels per block
#define WM_BM_NARROW 16                          // conv3x3_wmma_narrow: 16 (few-channel layers)
#define WM_TH 8
#define WM_TW 16
#define WM_CI 8
#define WM_THREADS 128
#define WM_IH (WM_TH + 2)
#define WM_IW (WM_TW + 2)
#define WM_IN_FLOATS (WM_IH * WM_IW * WM_CI)   // 1440

#if CONV3X3_WMMA
using namespace nvcuda;
#endif

// MF = BM / 16 channel fragments per warp (2: conv3x3_wmma, 1: conv3x3_wmma_narrow, 4:
// conv3x3_wmma_big). STAGES copies of the shared tiles: 2 (v4: double buffering, one barrier per
// chunk) or 1 (v5: the next chunk waits in registers until everyone is done with this one, then
// is stored between two barriers). ROUND_ON_STORE (v5): operands are rounded to TF32 as they are
// stored to shared memory, so the fragments are loaded ready; else (v4) after each fragment load.
template <int BM, int STAGES = 2, bool ROUND_ON_STORE = false>
__device__ __forceinline__ void conv3x3_wmma_tile(
        const float* __restrict__ src, const float* __restrict__ mask, const float* __restrict__ wt,
        const float* __restrict__ bias, float* __restrict__ dst, float* __restrict__ masked_out,
        int N, int C_src, int H_src, int W_src, int C_dst, int H_dst, int W_dst, int pad, int S_pad,
        int D_pad, int per_split, int relu, int use_mask) {
    static_assert(STAGES == 1 || STAGES == 2, "one or two copies of the shared tiles");
    constexpr int MF = BM / 16;
    constexpr int BMS = BM + 8;                  // padded weight rows: 72, 40 or 24 floats (see above)
    constexpr int W_FLOATS = 9 * WM_CI * BMS;
    constexpr int TILE_FLOATS = STAGES * (WM_IN_FLOATS + W_FLOATS);
    constexpr int ACC_FLOATS = (WM_THREADS / 32) * 2 * MF * 256;   // the warps' staged accumulators
    // STAGES input tiles and weight tiles; after the last chunk the first floats hold the warps'
    // accumulators (4 warps x 2 MF fragments x 256)
    constexpr int SMEM_FLOATS = TILE_FLOATS > ACC_FLOATS ? TILE_FLOATS : ACC_FLOATS;
    __shared__ __align__(32) float smem[SMEM_FLOATS];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const Conv3x3Block blk(N, C_src, W_dst, per_split, WM_TH, WM_TW, BM);
    const int plane = H_src * W_src;
    if (!use_mask) mask = nullptr;
    if (!use_mask || blockIdx.y != 0) masked_out = nullptr;

    Conv3x3TileLoader<WM_CI, WM_IH, WM_IW, WM_THREADS, true> tile;
    Conv3x3WeightLoader<WM_CI, BM, WM_THREADS, BMS> wload;
    tile.init(tid, blk.i0, blk.j0, pad, H_src, W_src);
    wload.init(tid, blk.d0, S_pad, D_pad);
    float* const s_in = smem;                           // copy b at s_in + b * WM_IN_FLOATS
    float* const s_w = smem + STAGES * WM_IN_FLOATS;    // copy b at s_w + b * W_FLOATS

#if CONV3X3_WMMA
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[MF][2];   // [channel fragment][row]
#pragma unroll
    for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int r = 0; r < 2; ++r) wmma::fill_fragment(acc[f][r], 0.0f);
#else
    float acc[16 * MF];   // lane's outputs e = lane + 32 k of the warp's 2 MF x 256 (staging order below)
#pragma unroll
    for (int k = 0; k < 16 * MF; ++k) acc[k] = 0.0f;
#endif

    auto fetch = [&](int s0) {
        const int base = (blk.n * C_src + s0) * plane;
        tile.load(src + base, mask ? mask + base : nullptr, masked_out ? masked_out + base : nullptr,
                  (blk.s_end - s0) * plane);
        wload.load(wt, s0, D_pad);
    };
    auto stage_in = [&](int b) {   // the fetched chunk into copy b (rounded first in v5)
        if (ROUND_ON_STORE) {
            tile.to_tf32();
            wload.to_tf32();
        }
        tile.store(s_in + b * WM_IN_FLOATS);
        wload.store(s_w + b * W_FLOATS);
    };
    if (blk.s_begin < blk.s_end) {
        fetch(blk.s_begin);
        stage_in(0);
    }
    __syncthreads();
    int buf = 0;
    for (int s0 = blk.s_begin; s0 < blk.s_end; s0 += WM_CI) {
        const bool more = s0 + WM_CI < blk.s_end;   // the same for every thread of the block
        if (more) fetch(s0 + WM_CI);
        const float* sin = s_in + buf * WM_IN_FLOATS;
        const float* sw = s_w + buf * W_FLOATS;
#if CONV3X3_WMMA
        // One tap's products: 8 source channels at tap t for the warp's fragments.
        auto tap = [&](int t) {
            const int ky = t / 3, kx = t % 3;
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> a[MF];
#pragma unroll
            for (int f = 0; f < MF; ++f) {
                wmma::load_matrix_sync(a[f], sw + t * WM_CI * BMS + 16 * f, BMS);
                if (!ROUND_ON_STORE)
#pragma unroll
                    for (int x = 0; x < a[f].num_elements; ++x) a[f].x[x] = wmma::__float_to_tf32(a[f].x[x]);
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
                wmma::load_matrix_sync(b, sin + ((2 * warp + r + ky) * WM_IW + kx) * WM_CI, WM_CI);
                if (!ROUND_ON_STORE)
#pragma unroll
                    for (int x = 0; x < b.num_elements; ++x) b.x[x] = wmma::__float_to_tf32(b.x[x]);
#pragma unroll
                for (int f = 0; f < MF; ++f) wmma::mma_sync(acc[f][r], a[f], b, acc[f][r]);
            }
        };
        // v4 unrolls its loop over the 9 taps; with 4 channel fragments (v5) it stays rolled:
        // unrolled, ptxas needs more than 255 registers and spills (see v5's header). Two loop
        // headers rather than `#pragma unroll (MF == 4 ? 1 : 9)`: GCC (the emulator's fast mode
        // turns the pragma into `#pragma GCC unroll`) rejects a count that depends on a template
        // parameter.
        if constexpr (MF == 4) {
#pragma unroll 1
            for (int t = 0; t < 9; ++t) tap(t);
        } else {
#pragma unroll
            for (int t = 0; t < 9; ++t) tap(t);
        }
#else
        // lane's output k: fragment k / 8 (channel fragment k / 16, row k / 8 % 2), channel
        // m = 2 * (k % 8) + lane / 16, column lane % 16 (the order store_matrix_sync uses below)
        const int col = lane % 16, half = lane / 16;
        for (int t = 0; t < 9; ++t)
            for (int c = 0; c < WM_CI; ++c) {
                const float in0 = sin[((2 * warp + t / 3) * WM_IW + col + t % 3) * WM_CI + c];
                const float in1 = sin[((2 * warp + 1 + t / 3) * WM_IW + col + t % 3) * WM_CI + c];
                const float* wrow = sw + (t * WM_CI + c) * BMS + half;
#pragma unroll
                for (int k = 0; k < 16 * MF; ++k)
                    acc[k] += wrow[16 * (k / 16) + 2 * (k % 8)] * ((k / 8) % 2 ? in1 : in0);
            }
#endif
        if (STAGES == 2) {
            if (more) stage_in(buf ^ 1);   // the other copy: nobody reads it now
            __syncthreads();
            buf ^= 1;
        } else {
            __syncthreads();               // everyone is done with the one copy ...
            if (more) {
                stage_in(0);               // ... so it takes the next chunk
                __syncthreads();
            }
        }
    }

    // Stage the warp's 2 MF fragments: stage[frag][m][col], frag = 2 * channel fragment + row.
    float* stage = smem + warp * 2 * MF * 256;
#if CONV3X3_WMMA
#pragma unroll
    for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            wmma::store_matrix_sync(stage + (2 * f + r) * 256, acc[f][r], 16, wmma::mem_row_major);
    __syncwarp();
#else
#pragma unroll
    for (int k = 0; k < 16 * MF; ++k) stage[lane + 32 * k] = acc[k];
    __syncwarp();
#endif
    for (int e = lane; e < 2 * MF * 256; e += 32) {   // lanes 0-15 and 16-31: 16 columns of two channels
        const int frag = e / 256, m = (e / 16) % 16, col = e % 16;
        const int d = blk.d0 + (frag / 2) * 16 + m, i = blk.i0 + 2 * warp + frag % 2, j = blk.j0 + col;
        if (d < C_dst && i < H_dst && j < W_dst)
            dst[((blockIdx.z * C_dst + d) * H_dst + i) * W_dst + j] =
                conv3x3_epilogue(stage[e], bias, d, blk.final_pass, relu);
    }
}

extern "C" __global__ void __launch_bounds__(WM_THREADS)
conv3x3_wmma(const float* __restrict__ src, const float* __restrict__ mask, const float* __restrict__ wt,
             const float* __restrict__ bias, float* __restrict__ dst, float* __restrict__ masked_out,
             int N, int C_src, int H_src, int W_src, int C_dst, int H_dst, int W_dst, int pad, int S_pad,
             int D_pad, int per_split, int relu, int use_mask) {
    conv3x3_wmma_tile<WM_BM>(src, mask, wt, bias, dst, masked_out, N, C_src, H_src, W_src, C_dst, H_dst, W_dst,
                             pad, S_pad, D_pad, per_split, relu, use_mask);
}

// No __launch_bounds__ (as conv3x3_igemm_deep): under it ptxas (CUDA 13, sm_90) spilled this one.
extern "C" __global__ void
conv3x3_wmma_narrow(const float* __restrict__ src, const float* __restrict__ mask, const float* __restrict__ wt,
                    const float* __restrict__ bias, float* __restrict__ dst, float* __restrict__ masked_out,
                    int N, int C_src, int H_src, int W_src, int C_dst, int H_dst, int W_dst, int pad, int S_pad,
                    int D_pad, int per_split, int relu, int use_mask) {
    conv3x3_wmma_tile<WM_BM_NARROW>(src, mask, wt, bias, dst, masked_out, N, C_src, H_src, W_src, C_dst, H_dst,
                                    W_dst, pad, S_pad, D_pad, per_split, relu, use_mask);
}

// 1 when this build of conv3x3_wmma (and conv3x3_wmma_big) uses tensor cores, 0 when it falls back to FP32 FMAs.
extern "C" __global__ void conv3x3_wmma_enabled(int* __restrict__ out) { out[0] = CONV3X3_WMMA; }

// ---------------------------------------------------------------------------------------------
// v5: wmma_big, v4 with a larger warp tile and operands rounded to TF32 once (issue 16).
//
// What it computes: the same implicit GEMM as v4 (dst = A @ B over K = 9 taps x source channels,
// forward pad 0 / input gradient pad 2, channel split, fused bias + ReLU and ReLU mask), with the
// same chunks, the same order of the sums and the same TF32 operands, on a bigger block.
//
// Block: 4 warps (128 threads), tile WB_BM = 64 output channels x (8 rows x 16 columns) pixels.
// Thread -> data:
//   loads (per chunk of 8 source channels): thread tid loads input elements e = tid + 128 l
//     (l < 12) of the 8 x 10 x 18 tile in (row, column, channel) order, channel fastest, and the
//     float4 of weights (tap l, channel tid / 16, output channels d0 + 4 (tid % 16) .. + 3) for
//     the 9 taps l: 12 floats and 9 float4 in registers, rounded, then stored.
//   compute: warp w owns output rows 2w and 2w + 1 (as in v4) for all 64 channels: accumulator
//     fragment (f, r) = channels d0 + 16 f .. + 15 x columns 0 .. 15 of row 2w + r (f < 4, r < 2).
//     Per tap it loads 4 A fragments (s_w[t][c][16 f ..], col_major, ldm = WB_BM + 8 = 72) and 2 B
//     fragments (the interleaved input tile at row 2w + r + ky, column kx, ldm = 8) and does
//     4 x 2 mma_sync: each A fragment feeds 2 products, each B fragment 4.
//   epilogue: the warp stages its 8 fragments in shared memory; lanes 0-15 and 16-31 then store
//     16 consecutive columns of two channels per step (64-byte runs), bias and ReLU applied.
//
// Why 64 channels x 32 pixels a warp and not 32 x 64 (2 A x 4 B, also 8 mma per 6 loads): the
// B fragments cost twice the A fragments in shared memory. A fragment is 128 floats, 4 wavefronts
// (of 32 banks) at best. A, col_major with ldm = 72: lane 4g + t reads 72 t + g, banks 8 t + g, all
// 32 different: 4 wavefronts. B, from the [row][column][8 channels] tile with ldm = 8: lane
// 4g + t reads 8 g + t, and g, g + 4 fall on the same bank: 2-way, 8 wavefronts. Any ldm that
// keeps every tap's start 32-byte aligned (as load_matrix_sync wants) is a multiple of 8 and has
// the same conflict. So per tap: 4 x 4 + 2 x 8 = 32 wavefronts for 8 mma (2 A x 4 B: 40; v4's
// 2 x 2: 24 for 4 mma).
//
// Rounding once. v4 rounds every element of every fragment after loading it (__float_to_tf32):
// the same shared value is rounded by 9 taps x several warps. v5 rounds each value once, in
// registers, before storing it to shared memory (the loaders' to_tf32), and loads the fragments
// ready to use. Rounding is elementwise, so the fragments hold exactly the values v4's hold after
// its rounding, and the products and their order are v4's: v5's output is bit-identical to
// conv3x3_wmma's wherever both split the channels alike (tests/test_kernels_conv3x3.py checks
// it). masked_out (the masked gy for the weight gradient) is written unrounded, before.
//
// One copy of the shared tiles. Per chunk: input 8 x 10 x 18 = 1,440 floats, weights 9 x 8 x 72 =
// 5,184 floats: 26,496 bytes; two copies (v4's double buffering) would need 52,992, over the 48 KB
// of static shared memory a kernel may declare without the dynamic opt-in the launcher does not
// use. So the next chunk's global loads go to registers before this chunk's products (their
// latency still hides behind them, as in v4), and are stored after a barrier (everyone is done
// with the copy), followed by a second barrier (the copy is complete): 2 barriers per chunk of
// 72 mma a warp, where v4 has 1 per 36. The epilogue stages 4 warps x 8 fragments x 256 floats =
// 32 KB through the same array, so the block declares 32,768 bytes.
//
// Napkin math (predicted, H100/H200 class: ~2,048 TF32 FLOP per SM cycle (495 TFLOP/s / 132 SMs /
// 1.83 GHz), one shared-memory wavefront per SM cycle):
//   per block and chunk: 2 * 64 * 128 * 72 = 1,179,648 FLOPs for 1,440 + 4,608 floats from L2 =
//     24 KB: 49 FLOP/B (v4: 590k FLOPs for 15 KB, 39 FLOP/B).
//   per warp and chunk: 72 mma_sync (4,096 FLOPs each: ~2 SM cycles at the tensor cores' peak) for
//     54 fragment loads = 288 wavefronts, 4 per mma (v4: 6). Shared memory bounds the loop at
//     ~2/4 = 50% of the tensor peak (v4: ~33%): the predicted gain of the loop is ~1.5x.
//   conversions: 12 + 4 x 9 = 48 cvt a thread per chunk (its share of the tiles) for 72 mma a warp,
//     0.7 per mma; rounding at the fragments it would be 9 x 6 x 4 = 216 (v4: 144 for 36, 4 per mma).
//   registers: accumulators 8 fragments x 8 = 64, A 4 x 4 = 16, B 4, the next chunk in flight
//     12 + 9 x 4 = 48, plus addresses: ~140. ptxas (CUDA 13) gives it 168 for sm_80 and sm_90,
//     no spills: 3 blocks of 128 threads an SM (65,536 registers), 12 warps. The loop over the 9
//     taps is therefore not unrolled (`#pragma unroll 1`): unrolled, ptxas hoists the fragment loads of
//     several taps, goes past 255 registers and spills (so does __launch_bounds__(128, 3) over an
//     unrolled loop); rolled, the other 11 warps of the SM hide a tap's load latency.
//   blocks: half of v4's channel blocks (64 channels a block), e.g. 64 -> 64 channels on a
//     568 x 568 output: 71 x 36 = 2,556 blocks (v4 5,112), several waves on 132 SMs; deep layers
//     are split over their source channels by the launcher (gemm_plan) as v4's.
// It pays where C_dst is a multiple of 64 (every 3x3 layer of the paper's network); with 32 or
// fewer output channels half of the block or more is padding (v4's tiles fit those). "auto" does
// not pick it by rule: on cuda the tuner's table (minunet/backends/cuda_choices.json) does, once
// `python -m minunet.bench --device cuda --tune` has measured it.
// Without tensor cores it is v4's FP32 fallback with 64 channels (CONV3X3_WMMA = 0, no rounding).
// ---------------------------------------------------------------------------------------------
#define WB_BM 64                                 // conv3x3_wmma_big: 64 channels per block
static_assert(GEMM_D_ALIGN % WB_BM == 0, "the weight loader reads whole 64-channel rows of wt");

extern "C" __global__ void
conv3x3_wmma_big(const float* __restrict__ src, const float* __restrict__ mask, const float* __restrict__ wt,
                 const float* __restrict__ bias, float* __restrict__ dst, float* __restrict__ masked_out,
                 int N, int C_src, int H_src, int W_src, int C_dst, int H_dst, int W_dst, int pad, int S_pad,
                 int D_pad, int per_split, int relu, int use_mask) {
    conv3x3_wmma_tile<WB_BM, 1, true>(src, mask, wt, bias, dst, masked_out, N, C_src, H_src, W_src, C_dst, H_dst,
                                      W_dst, pad, S_pad, D_pad, per_split, relu, use_mask);
}

// ---------------------------------------------------------------------------------------------
// Weight gradient: a reduction over N*Ho*Wo pixels for each of Co*Ci*9 weights.
//
// Block (co, group of GW_CI = 4 input channels, slice blockIdx.y of the pixels), GW_THREADS = 128
// threads. Thread t visits pixels p = start + t, start + t + 128, ... of its slice (stepping the
// pixel's row and column by additions, without a division per pixel); per pixel it
// loads gy[n,co,i,j] once and reuses it for 4 channels x 9 taps = 36 multiply-adds (the 9 x loads
// of a channel overlap those of the neighbouring pixel and come from cache). Neighbouring threads
// take neighbouring pixels, so all loads are coalesced.
//
// The bias gradient rides along (a fused kernel): gb[co] is the sum of the same gy values, so
// each thread also adds up its g's, one add per pixel beside 36 multiply-adds, and the blocks of
// the first channel group write it. That saves a separate launch that would read all of gy again.
//
// Then the block sums its 128 partial results per weight (and the bias) with a tree: in step k,
// thread t < s adds the value of thread t + s (s = 64, 32, ..., 1), all 37 sums at once; a
// barrier after each step makes the additions of one step visible to the next. 37 * 128 floats
// = 18.5 KiB.
//
// out = partial[slice][co][ci][ky][kx], out_bias = partial[slice][co]; with one slice the
// launcher passes gw and gb themselves.
// ---------------------------------------------------------------------------------------------
#define GW_THREADS 128
#define GW_CI 4

extern "C" __global__ void __launch_bounds__(GW_THREADS)
conv3x3_grad_weight(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                    float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co, int pixels_per_slice) {
    __shared__ float s_sum[GW_CI * 9 + 1][GW_THREADS];   // 36 weights, then the bias
    const int Ho = H - 2, Wo = W - 2;
    const int groups = (Ci + GW_CI - 1) / GW_CI;
    const int co = blockIdx.x / groups;
    const int ci0 = (blockIdx.x % groups) * GW_CI;
    const int t = threadIdx.x;
    const int total = N * Ho * Wo;
    const int start = blockIdx.y * pixels_per_slice;
    const int stop = min(total, start + pixels_per_slice);

    float acc[GW_CI][9];
#pragma unroll
    for (int c = 0; c < GW_CI; ++c)
#pragma unroll
        for (int k = 0; k < 9; ++k) acc[c][k] = 0.0f;
    float bias = 0.0f;

    // Pixel p = start + t as (n, i, j), found by division once; each step of GW_THREADS pixels
    // then adds di rows and dj columns and carries, instead of dividing at every pixel (an
    // integer division by a run-time value costs tens of instructions, on a GPU as on a CPU).
    const int di = GW_THREADS / Wo, dj = GW_THREADS % Wo;
    int j = (start + t) % Wo, i = ((start + t) / Wo) % Ho, n = (start + t) / (Wo * Ho);
    for (int p = start + t; p < stop; p += GW_THREADS) {
        const float g = gy[((n * Co + co) * Ho + i) * Wo + j];
        bias += g;
#pragma unroll
        for (int c = 0; c < GW_CI; ++c) {
            if (ci0 + c >= Ci) break;  // the last group may have fewer channels (no barrier inside)
            const float* xp = x + ((n * Ci + ci0 + c) * H + i) * W + j;
#pragma unroll
            for (int ky = 0; ky < 3; ++ky)
#pragma unroll
                for (int kx = 0; kx < 3; ++kx) acc[c][ky * 3 + kx] += g * xp[ky * W + kx];
        }
        j += dj;
        i += di;
        if (j >= Wo) { j -= Wo; ++i; }
        if (i >= Ho) { n += i / Ho; i %= Ho; }   // into the next image: rare unless images are tiny
    }

#pragma unroll
    for (int v = 0; v < GW_CI * 9; ++v) s_sum[v][t] = acc[v / 9][v % 9];
    s_sum[GW_CI * 9][t] = bias;
    __syncthreads();
    for (int stride = GW_THREADS / 2; stride > 0; stride /= 2) {
        if (t < stride)
            for (int v = 0; v <= GW_CI * 9; ++v) s_sum[v][t] += s_sum[v][t + stride];
        __syncthreads();  // outside the `if`: every thread of the block reaches every barrier
    }
    // threads 0..35 write one weight each: v = c*9 + k -> out[slice][co][ci0+c][k]; thread 36 of
    // the first channel group's block writes the bias (every group summed it: one writes)
    if (t < GW_CI * 9 && ci0 + t / 9 < Ci)
        out[(blockIdx.y * Co + co) * Ci * 9 + (ci0 + t / 9) * 9 + t % 9] = s_sum[t][0];
    if (t == GW_CI * 9 && ci0 == 0)
        out_bias[blockIdx.y * Co + co] = s_sum[GW_CI * 9][0];
}

// ---------------------------------------------------------------------------------------------
// Serial weight gradient: one thread per weight m = ((co * Ci + ci) * 9 + ky * 3 + kx), adding
// gy[n,co,i,j] * x[n,ci,i+ky,j+kx] over every pixel in a loop (the order is fixed: n, i, j),
// and Co more threads, m = Co*Ci*9 + co, for the bias gradient gb[co] (the same loop over gy).
//
// When it pays: the two sides of the reduction are Co*Ci*9 weights and N*Ho*Wo pixels, and a
// kernel should spread its threads over the larger one. In U-Net's deepest layers (128 x 128
// channels at 6 x 6 -> 4 x 4 pixels) there are 147,456 weights and 16 pixels: the tree kernel
// above would start 4,096 blocks of 128 threads, 112 of which have no pixel but still take part
// in 8 barriers, while this kernel starts 147,456 threads that each do 16 multiply-adds. In the
// first layers (8 x 8 x 9 = 576 weights, 33,856 pixels) it would be the other way round: 576
// threads with 33,856 serial steps each, so there the tree kernel is used. The launcher
// (KernelBackend.grad_weight) compares the two counts.
//
// Napkin math: 2 loads per multiply-add, as the naive convolution. Neighbouring threads have
// neighbouring (ky, kx) of one (co, ci), so a warp reads the same gy value (a broadcast) and x
// values from 4 or 5 channels' 3x3 windows (32 weights / 9 taps), which overlap from one pixel
// to the next (cached).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void conv3x3_grad_weight_serial(const float* __restrict__ x, const float* __restrict__ gy,
                                                      float* __restrict__ gw, float* __restrict__ gb,
                                                      int N, int Ci, int H, int W, int Co) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    const int weights = Co * Ci * 9;
    const int Ho = H - 2, Wo = W - 2;
    if (m >= weights + Co) return;
    if (m >= weights) {   // a bias thread: the rows of gy[., co] without the x factor
        const int co = m - weights;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {
            const float* gp = gy + (n * Co + co) * Ho * Wo;
            for (int i = 0; i < Ho; ++i) {
                float row = 0.0f;
                for (int j = 0; j < Wo; ++j) row += gp[i * Wo + j];
                acc += row;
            }
        }
        gb[co] = acc;
        return;
    }
    const int k = m % 9, ci = (m / 9) % Ci, co = m / (9 * Ci);
    const int ky = k / 3, kx = k % 3;
    // Each output row is summed on its own and then added to the total: float32 rounding error
    // grows with the number of additions into one running sum, and this way no sum has more than
    // max(Wo, N*Ho) terms instead of N*Ho*Wo (the tree kernel gets the same effect from its tree).
    float acc = 0.0f;
    for (int n = 0; n < N; ++n) {
        const float* gp = gy + (n * Co + co) * Ho * Wo;
        const float* xp = x + ((n * Ci + ci) * H + ky) * W + kx;   // x[n, ci, ky, kx]: tap (ky, kx) of pixel (0, 0)
        for (int i = 0; i < Ho; ++i) {
            float row = 0.0f;
            for (int j = 0; j < Wo; ++j) row += gp[i * Wo + j] * xp[i * W + j];
            acc += row;
        }
    }
    gw[m] = acc;
}

// =============================================================================================
// Weight gradient as a GEMM (issue 16). The weight-gradient road of this file: v1 serial (one
// thread per weight), v2 tree (a block per weight group, a shared-memory tree), v3 gemm (FP32
// register tiles), v4 gemm_tf32 (TF32 tensor cores). Written out as a matrix product over pixels,
//
//     gw[co, c] = sum_p gy[co, p] * X[p, c]      c = ci*9 + ky*3 + kx,  p = (n, i, j)
//     X[p, c]   = x[n, ci, i+ky, j+kx]            (an "implicit im2col": never stored)
//
// gw is (Co x Ci*9) = (Co x P) @ (P x Ci*9), P = N*Ho*Wo. The bias gradient is the same product
// with a column of ones, gb[co] = sum_p gy[co, p]: the kernels add it up from the gy values they
// load anyway (fused; no second pass over gy). The tiles, the loop over pixel stages, the
// product, the stores and the bias sums are the same for conv1x1.cu and conv_transpose2x2.cu, so
// they live in gemm_tiles.cuh (read its header: how threads map to the tiles, and the napkin
// math of a tile); this file says where gy and X lie (Conv3x3WgradOperands).
//
// Why this beats one thread per weight (conv3x3_grad_weight_serial): there, every multiply-add
// loads its gy and its x value from global memory (2 loads per FMA; a 3x3 layer of 64 -> 64
// channels at 568 x 568 pixels does 1.2e10 FMAs, so 2.4e10 loads through the caches), and a
// deep layer with few pixels has only Co*Ci*9 threads, each a long dependent chain. Here a block
// stages a tile of 32 pixels x 64 rows of gy and the matching 64 columns of X in shared memory,
// and each thread keeps a tile of gw in registers (v3) or tensor-core fragments (v4): 32 FMAs
// per global load, ~64x fewer loads than the serial kernel.
//
// FLOPs: 2 * Co * Ci*9 * P (the same as the forward pass). Bytes from DRAM at best: gy and x once
// (4 * (Co + Ci) * P) and gw once per slice; x's 9 taps overlap and come from L1/L2.
//
// Pixel slices: when the tiles alone would leave the GPU's SMs idle (a shallow layer: Co*Ci*9
// small, P huge) the launcher splits P into slices (blockIdx.z) of at least WG_MIN_SLICE = 256
// pixels, until there are about 2048 blocks: the first layer of the paper's network, 64 x 9
// weights in one tile and 570 x 570 pixels, gets 1,270 slices, added by reduce.cu's sum_partials
// in a fixed order.
//
// Loads: a lane's pixel (n, i, j) is found by two divisions once per stage (seek), a column's
// (ci, ky, kx) by divisions by the constants 9 and 3 (multiplications). A warp's lanes read 32
// consecutive pixels of one gy row or one x row (128 bytes: coalesced; x's rows are shifted by
// the tap). v4 loads only 4 of X's 16 columns at a time (#pragma unroll 4): fully unrolled,
// ptxas hoists all 16 loads (254 registers a thread for sm_90).
// =============================================================================================
#include "gemm_tiles.cuh"

// gw (Co x Ci*9) = gy (Co x P) @ X (P x Ci*9) for gemm_tiles.cuh: where the lane's pixel of a
// stage finds its gy rows and X columns.
struct Conv3x3WgradOperands {
    static constexpr bool GY_ON_ROWS = true;          // A = gy: its rows are the bias channels
    static constexpr int COLUMNS_PER_CHANNEL = 1;     // (used only where gy is B)
    static constexpr int GROUPS_AT_ONCE = 2;                     // the large tiles' loads of X: gemm_tiles.cuh
    const float* x;
    const float* gy;
    int Ci, W, Co, Wo, plane_out, plane_in;
    int rows, cols, pixels, channels;
    int gy_at, x_at;                                  // the lane's pixel: gy[n, 0, i, j], x[n, 0, i, j]

    __device__ __forceinline__ Conv3x3WgradOperands(const float* x_, const float* gy_, int N, int Ci_, int H, int W_,
                                                    int Co_)
        : x(x_), gy(gy_), Ci(Ci_), W(W_), Co(Co_), Wo(W_ - 2), plane_out((H - 2) * (W_ - 2)), plane_in(H * W_),
          rows(Co_), cols(Ci_ * 9), pixels(N * (H - 2) * (W_ - 2)), channels(Co_), gy_at(0), x_at(0) {}

    __device__ __forceinline__ void seek(int p) {
        const int n = p / plane_out, q = p - n * plane_out, i = q / Wo, j = q - i * Wo;
        gy_at = n * Co * plane_out + i * Wo + j;
        x_at = n * Ci * plane_in + i * W + j;
    }
    // X[p, col] = x[n, ci, i + ky, j + kx] of the lane's pixel (0 past the Ci*9 columns)
    __device__ __forceinline__ float column(int col, bool live) const {
        float v = 0.0f;
        if (live && col < cols) {
            const int ci = col / 9, tap = col - ci * 9;
            v = x[x_at + ci * plane_in + (tap / 3) * W + tap % 3];
        }
        return v;
    }
    template <class TileA, class TileB>
    __device__ __forceinline__ void load_fp32(TileA s_a, TileB s_b, int lane, int lrow, int row0, int col0, bool live,
                                              float* bias) const {
        wg_load_channels<WG_BM / WG_LOAD_ROWS, WG_LOAD_ROWS, true>(s_a[lane], 1, gy, gy_at, plane_out, lrow, row0, Co,
                                                                   live, bias);
#pragma unroll
        for (int r = 0; r < WG_BN / WG_LOAD_ROWS; ++r) {
            const int c = lrow + r * WG_LOAD_ROWS;
            s_b[lane][c] = column(col0 + c, live);
        }
    }
    // the large tiles' groups: gy rows (channels) row .. row + 3, X columns col .. col + 3
    __device__ __forceinline__ float4 a4(int row, bool live) const {
        return wg_channels4(gy, gy_at, plane_out, row, Co, live);
    }
    __device__ __forceinline__ float4 b4(int col, bool live) const {
        return make_float4(column(col, live), column(col + 1, live), column(col + 2, live), column(col + 3, live));
    }
    __device__ __forceinline__ void load_tf32(float* s_a, float* s_b, int lane, int warp, int row0, int col0, bool live,
                                              float* bias) const {
        wg_load_channels<WT_BM / 4, 4, true>(s_a + lane, WT_LD, gy, gy_at, plane_out, warp, row0, Co, live, bias);
#pragma unroll 4   // not 16: see the section's header
        for (int r = 0; r < WT_BN / 4; ++r) {
            const int c = warp + 4 * r;
            s_b[c * WT_LD + lane] = column(col0 + c, live);
        }
    }
};

// v3 FP32: grid (ceil(Ci*9 / 64), ceil(Co / 64), slices), WG_THREADS = 256 threads.
extern "C" __global__ void __launch_bounds__(WG_THREADS)
conv3x3_grad_weight_gemm(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                         float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co, int pixels_per_slice) {
    wgrad_gemm_fp32(Conv3x3WgradOperands(x, gy, N, Ci, H, W, Co), out, out_bias, pixels_per_slice);
}

// v4 TF32 (precision "tf32", sm_80+; a __trap() elsewhere, and the launcher asks
// conv3x3_grad_weight_has_tf32 first): grid as v3, WT_THREADS = 128 threads.
extern "C" __global__ void conv3x3_grad_weight_has_tf32(int* flag) { flag[0] = wg_has_tf32(); }

extern "C" __global__ void __launch_bounds__(WT_THREADS)
conv3x3_grad_weight_gemm_tf32(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                              float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co, int pixels_per_slice) {
    wgrad_gemm_tf32(Conv3x3WgradOperands(x, gy, N, Ci, H, W, Co), out, out_bias, pixels_per_slice);
}

// gemm_large (gemm_tiles.cuh): FP32 128 x 128 tiles (256 threads) or, for Co <= 64, 64 x 128 (128
// threads), 8 x 8 a thread; TF32 64 x 128 tiles (128 threads, 2 x 4 fragments a warp; sm_80+,
// after conv3x3_grad_weight_has_tf32). Grid (ceil(Ci*9 / 128), ceil(Co / BM), slices). The
// launcher runs v3 / v4 instead where Ci*9 < 128 (the first layer: 9 columns).
extern "C" __global__ void __launch_bounds__(WL_THREADS, WL_MIN_BLOCKS)
conv3x3_grad_weight_gemm_128x128(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                                 float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co,
                                 int pixels_per_slice) {
    wgrad_gemm_large_fp32<Conv3x3WgradOperands, WL_BM>(Conv3x3WgradOperands(x, gy, N, Ci, H, W, Co), out, out_bias,
                                                       pixels_per_slice);
}

extern "C" __global__ void __launch_bounds__(WL_THREADS_SHORT, WL_MIN_BLOCKS_SHORT)
conv3x3_grad_weight_gemm_64x128(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                                float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co,
                                int pixels_per_slice) {
    wgrad_gemm_large_fp32<Conv3x3WgradOperands, WL_BM_SHORT>(Conv3x3WgradOperands(x, gy, N, Ci, H, W, Co), out,
                                                             out_bias, pixels_per_slice);
}

extern "C" __global__ void __launch_bounds__(WLT_THREADS, WL_MIN_BLOCKS_SHORT)
conv3x3_grad_weight_gemm_64x128_tf32(const float* __restrict__ x, const float* __restrict__ gy,
                                     float* __restrict__ out, float* __restrict__ out_bias, int N, int Ci, int H,
                                     int W, int Co, int pixels_per_slice) {
    wgrad_gemm_large_tf32(Conv3x3WgradOperands(x, gy, N, Ci, H, W, Co), out, out_bias, pixels_per_slice);
}
