// Exercise 03.1: make max-pooling's loads coalesced. SOLUTION.
//
// pool_max computes y[nc, i, j] = max of the 2x2 window x[nc, 2i:2i+2, 2j:2j+2] for x (NC, H, W)
// and y (NC, H/2, W/2), float32 (an odd last row or column is dropped, as in minunet's kernel).
//
// This version gives one thread to each OUTPUT pixel. Thread j of a row reads x[.., 2j] and
// x[.., 2j+1]: the 32 lanes of a warp read every other float of 64, so each load instruction of
// the warp touches 8 sectors of 32 bytes and uses only half of every sector. The emulator's
// profiler counts this: 8 sectors per request (4 is ideal for 32 floats).
//
// Rewrite it so that consecutive lanes read consecutive floats: give one thread to each INPUT
// column of a row pair (2 * (W/2) threads per output row), let each thread take the max of its
// two rows, and combine neighbouring lanes with a warp shuffle,
//     float other = __shfl_xor_sync(0xffffffff, m, 1);   // the value of the lane next door
// so that the even lane of each pair can store the output. Careful: every lane of the warp must
// reach the shuffle, so a thread past the end may not `return` before it. The launcher in
// check("coalesced_pool") starts ceil(threads / 256) blocks of 256 threads, where
// threads = NC * (H/2) * 2 * (W/2) for your version (pass the mapping you chose below):
#define THREADS_PER_OUTPUT 2   // one thread per input column of a row pair

extern "C" __global__ void pool_max(const float* __restrict__ x, float* __restrict__ y, int NC, int H, int W) {
    const int Ho = H / 2, Wo = W / 2, cols = 2 * Wo;      // input columns that take part
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = t < NC * Ho * cols;                 // threads past the end still shuffle
    const int q = t % cols, i = (t / cols) % Ho, nc = t / (cols * Ho);
    float m = -INFINITY;
    if (live) {
        const float* top = x + (nc * H + 2 * i) * W + q;  // lane k reads column q = ... + k:
        m = fmaxf(top[0], top[W]);                        // consecutive lanes, consecutive floats
    }
    // cols is even, so the two columns of a window sit in lanes 2k and 2k+1 of the same warp
    const float other = __shfl_xor_sync(0xffffffffu, m, 1);
    if (live && q % 2 == 0) y[(nc * Ho + i) * Wo + q / 2] = fmaxf(m, other);
}
