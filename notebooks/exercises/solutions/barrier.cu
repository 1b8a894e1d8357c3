// Exercise 02.1: restore the barriers. SOLUTION.
//
// channel_conv3x3 computes ONE output channel of a valid 3x3 convolution, summed over the input
// channels:   y[n, i, j] = sum_{c, ky, kx} w[c, ky, kx] * x[n, c, i + ky, j + kx]
// with x (N, C, H, W), w (C, 3, 3), y (N, H - 2, W - 2), float32.
//
// A block of 16 x 16 threads computes a 16 x 16 output tile of one image (grid: tiles along x,
// tiles along y, N). For each input channel the block first copies the 18 x 18 input tile (the
// output tile plus the 2-pixel halo) into shared memory, every thread loading some of it; then
// every thread computes its output pixel from shared memory.
//
// Solution: one barrier after the loads (nobody reads the tile before every thread has written
// its part) and one after the compute step (nobody overwrites the tile with the next channel
// while a slower thread still reads this one).
#define TILE 16
#define IN_TILE (TILE + 2)

extern "C" __global__ void channel_conv3x3(const float* __restrict__ x, const float* __restrict__ w,
                                           float* __restrict__ y, int C, int H, int W) {
    __shared__ float tile[IN_TILE][IN_TILE];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE, n = blockIdx.z;
    const int Ho = H - 2, Wo = W - 2;
    float acc = 0.0f;
    for (int c = 0; c < C; ++c) {
        const float* plane = x + (n * C + c) * H * W;
        // load the 18 x 18 input tile: thread (tx, ty) loads pixels ty*16+tx, +256 (324 in all)
        for (int e = ty * TILE + tx; e < IN_TILE * IN_TILE; e += TILE * TILE) {
            const int r = e / IN_TILE, q = e % IN_TILE;
            const int si = i0 + r, sj = j0 + q;
            tile[r][q] = (si < H && sj < W) ? plane[si * W + sj] : 0.0f;
        }
        __syncthreads();  // read-after-write: the whole tile is loaded before anyone reads it

        // compute: the 3x3 window of output pixel (i0 + ty, j0 + tx) in this channel
        for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx)
                acc += w[c * 9 + ky * 3 + kx] * tile[ty + ky][tx + kx];
        __syncthreads();  // write-after-read: everyone is done with this tile before the next load
    }
    const int i = i0 + ty, j = j0 + tx;
    if (i < Ho && j < Wo) y[(n * Ho + i) * Wo + j] = acc;
}
