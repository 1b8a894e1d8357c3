// reduce.cu -- the sums several ops share: one block-level tree reduction, and the sum of the
// partial results of split reductions. (The bias gradients, sums over each channel of the output
// gradient, are computed by the weight-gradient kernels of the convolutions: the same pass over
// gy.)
//
//   block_sum      (a __device__ helper) the sum of one float per thread of a block, with a tree
//                  reduction in shared memory: at step s = 128, 64, ..., 1 thread t < s adds the
//                  partial of thread t+s, and a barrier separates the steps. log2(256) = 8 steps
//                  instead of 255 serial adds. sum_scaled ends with it. It works for any
//                  power-of-two block size up to REDUCE_THREADS.
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

// The sum of `value` over the threads of the block (a power of two, at most REDUCE_THREADS),
// returned to every thread (the last barrier makes s_sum[0] complete for all). Every thread of
// the block must call it, since it has barriers, and a kernel calls it once (a second call would
// overwrite s_sum while slower threads may still be reading s_sum[0]).
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
