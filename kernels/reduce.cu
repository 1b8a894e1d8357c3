// reduce.cu -- the sums every op shares: one block-level tree reduction, used two ways, and
// two one-thread-per-output sums.
//
//   block_sum      (a __device__ helper) the sum of one float per thread of a block, with a tree
//                  reduction in shared memory: at step s = 128, 64, ..., 1 thread t < s adds the
//                  partial of thread t+s, and a barrier separates the steps. log2(256) = 8 steps
//                  instead of 255 serial adds. channel_sum and sum_scaled end with it. It works
//                  for any power-of-two block size up to REDUCE_THREADS.
//
//   channel_sum    out[c] = sum_{n,p} g[n,c,p] for g (N, C, P): the bias gradient of every conv
//                  layer (gb[co] = sum over images and pixels of gy[n,co,:,:]).
//                  One block per channel c, of B threads: B is a power of two from 32 to
//                  REDUCE_THREADS = 256, the smallest that leaves each thread at most
//                  REDUCE_VALUES_PER_THREAD = 8 of the channel's values (the launcher chooses it:
//                  one 16 x 16 plane, 256 values, gets 32 threads adding 8 each and 5 tree
//                  steps, not 256 threads adding one each and 8 tree steps, each with a barrier). Thread t adds up the values t, t+B, t+2B, ...
//                  of channel c's N*P (consecutive threads read consecutive addresses of one
//                  image's plane: coalesced), then block_sum combines the block's B partial sums.
//
//   channel_sum_serial  the same sum with one thread per channel, adding its N*P values in a
//                  loop. For the small deep layers (128 channels of 4 x 4 pixels), where each of
//                  channel_sum's blocks would have 32 threads for 16 values and 6 barriers; the
//                  launcher picks it when each thread's loop is short (KernelBackend.serial_reduction).
//
//   sum_scaled     out[b] = scale * (the sum of block b's share of x): each thread adds a
//                  grid-strided subset, then block_sum. The loss launcher runs it twice: many
//                  blocks -> one partial sum per block, then one block -> the mean with
//                  scale = 1 / (N*P). Two passes instead of an atomicAdd per block keep the
//                  summation order, and so the result, fixed from run to run.
//
//   sum_partials   out[m] = sum_{s<S} partial[s*M + m] for partial (S, M): combines the per-slice
//                  results of the weight-gradient kernels (conv3x3_grad_weight and friends split a
//                  long pixel reduction over S blocks). One thread per output m; the S values are
//                  added in slice order, so the result is deterministic (unlike atomicAdd, whose
//                  order, and so the rounding, changes from run to run). Consecutive threads read
//                  consecutive m: coalesced.

#define REDUCE_THREADS 256
#define REDUCE_VALUES_PER_THREAD 8

// The sum of `value` over the threads of the block (a power of two, at most REDUCE_THREADS),
// returned to every thread (the last barrier makes s_sum[0] complete for all). Every thread of the block must call it, since
// it has barriers, and a kernel calls it once (a second call would overwrite s_sum while slower
// threads may still be reading s_sum[0]).
__device__ float block_sum(float value) {
    __shared__ float s_sum[REDUCE_THREADS];
    const int t = threadIdx.x;
    s_sum[t] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) s_sum[t] += s_sum[t + stride];
        __syncthreads();  // outside the `if`: every thread must reach every barrier
    }
    return s_sum[0];
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
channel_sum(const float* __restrict__ g, float* __restrict__ out, int N, int C, int P) {
    const int c = blockIdx.x;
    const int t = threadIdx.x;
    // Thread t takes the values e = t, t + B, t + 2B, ... of the N*P, as (image n, pixel p): found
    // by division once, then stepped by additions (a division per value would cost more than the
    // add it feeds), so every thread gets its share of all N*P values, even when P < B.
    float acc = 0.0f;
    int n = t / P, p = t % P;
    const int dn = blockDim.x / P, dp = blockDim.x % P;
    for (int e = t; e < N * P; e += blockDim.x) {
        acc += g[(n * C + c) * P + p];
        n += dn;
        p += dp;
        if (p >= P) { p -= P; ++n; }
    }
    const float total = block_sum(acc);
    if (t == 0) out[c] = total;
}

// Thread c reads g[n, c, p] for p = 0, 1, ...: a warp's 32 threads read 32 addresses P floats
// apart (32 sectors per request: uncoalesced), which is why this version is kept for small P.
// float32 rounding error grows with the number of additions into one running sum, so the values
// are added in chunks of SERIAL_CHUNK, each chunk's sum then added to the total.
#define SERIAL_CHUNK 32
extern "C" __global__ void channel_sum_serial(const float* __restrict__ g, float* __restrict__ out, int N, int C, int P) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int n = 0; n < N; ++n)
        for (int p0 = 0; p0 < P; p0 += SERIAL_CHUNK) {
            float part = 0.0f;   // a chunk's own sum first: no running sum gets more than ~N*P/32 + 32 terms
            for (int p = p0; p < min(P, p0 + SERIAL_CHUNK); ++p) part += g[(n * C + c) * P + p];
            acc += part;
        }
    out[c] = acc;
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
sum_scaled(const float* __restrict__ x, float* __restrict__ out, int n, float scale) {
    const int t = threadIdx.x;
    float acc = 0.0f;
    for (int e = blockIdx.x * blockDim.x + t; e < n; e += gridDim.x * blockDim.x) acc += x[e];
    const float total = block_sum(acc);
    if (t == 0) out[blockIdx.x] = total * scale;
}

extern "C" __global__ void sum_partials(const float* __restrict__ partial, float* __restrict__ out, int S, int M) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    float acc = 0.0f;
    for (int s = 0; s < S; ++s) acc += partial[s * M + m];
    out[m] = acc;
}
