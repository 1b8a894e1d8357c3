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
//   conv3x3_grad_weight        one block per (co, group of 4 input channels) and slice of the
//                              pixels; each thread accumulates 4*9 partial sums (and the bias's)
//                              over a strided subset of pixels, then the block adds them up with a tree
//                              reduction in shared memory. Slices (blockIdx.y) write separate
//                              partial results that reduce.cu's sum_partials adds in a fixed
//                              order, so the result does not depend on the thread schedule.
//   conv3x3_grad_weight_serial one thread per weight (and per bias), adding its products over
//                              all pixels in a loop: no shared memory, no barriers. For the deep,
//                              small layers, where weights outnumber pixels (the launcher picks it).
//   Both weight-gradient kernels also compute the bias gradient (fused: the same pass over gy).
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
