// Exercise 02.2: write a tiled 1x1 convolution. SOLUTION.
//
// U-Net's last layer is a 1x1 convolution: every pixel's feature vector times a matrix,
//     y[n, co, p] = b[co] + sum_ci w[co, ci] * x[n, ci, p]
// with x (N, Ci, P), w (Co, Ci), b (Co,), y (N, Co, P), P = H * W pixels, float32.
// The launch (in check("tiled_conv1x1")): grid (ceil(P / 256), ceil(Co / CO_PER_BLOCK), N),
// blocks of 256 threads; thread t of block (bx, by, n) owns pixel p = bx * 256 + t and the
// output channels by * CO_PER_BLOCK ... by * CO_PER_BLOCK + CO_PER_BLOCK - 1.
//
// Each x value loaded now serves CO_PER_BLOCK = 8 multiply-adds (8 sums in registers), and the
// weights come from shared memory: per chunk of 32 input channels the block loads 8 x 32 = 256
// weights, one per thread, instead of every thread loading all of them. Global load requests per
// warp of outputs (a block computes 8 channels x 256 pixels = 64 warps of outputs): Ci / 8 for x,
// (8 warps x Ci / 32 chunks) / 64 = Ci / 256 for w, and 1 for the bias; the naive kernel needs
// 2 * Ci + 1.
#define THREADS 256
#define CO_PER_BLOCK 8
#define CI_CHUNK 32

extern "C" __global__ void conv1x1(const float* __restrict__ x, const float* __restrict__ w,
                                   const float* __restrict__ b, float* __restrict__ y,
                                   int Ci, int Co, int P) {
    __shared__ float s_w[CO_PER_BLOCK][CI_CHUNK];
    const int t = threadIdx.x;
    const int p = blockIdx.x * THREADS + t;
    const int co0 = blockIdx.y * CO_PER_BLOCK;
    const int n = blockIdx.z;
    const bool live = p < P;                       // no early return: every thread reaches the barriers
    float acc[CO_PER_BLOCK];
#pragma unroll
    for (int d = 0; d < CO_PER_BLOCK; ++d) acc[d] = 0.0f;
    for (int c0 = 0; c0 < Ci; c0 += CI_CHUNK) {
        // stage w[co0 .. co0+7][c0 .. c0+31]: thread t loads element (t / 32, t % 32), 0 past the edges
        const int d = t / CI_CHUNK, c = t % CI_CHUNK;
        s_w[d][c] = (co0 + d < Co && c0 + c < Ci) ? w[(co0 + d) * Ci + c0 + c] : 0.0f;
        __syncthreads();                           // the chunk's weights are there for everyone
        const int chunk = min(CI_CHUNK, Ci - c0);
        if (live)
            for (int cc = 0; cc < chunk; ++cc) {
                const float xv = x[(n * Ci + c0 + cc) * P + p];   // one load, 8 multiply-adds
#pragma unroll
                for (int dd = 0; dd < CO_PER_BLOCK; ++dd) acc[dd] += s_w[dd][cc] * xv;
            }
        __syncthreads();                           // nobody overwrites s_w while others read it
    }
    if (!live) return;
#pragma unroll
    for (int dd = 0; dd < CO_PER_BLOCK; ++dd)
        if (co0 + dd < Co) y[(n * Co + co0 + dd) * P + p] = acc[dd] + b[co0 + dd];
}
