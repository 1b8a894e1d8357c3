// reduce.cu -- the two sums the backward passes of the convolutions share.
//
//   channel_sum    out[c] = sum_{n,p} g[n,c,p] for g (N, C, P): the bias gradient of every conv
//                  layer (gb[co] = sum over images and pixels of gy[n,co,:,:]).
//                  One block per channel c, REDUCE_THREADS = 256 threads. Thread t adds up the
//                  elements t, t+256, t+512, ... of the N*P values of channel c (consecutive
//                  threads read consecutive addresses of one image's plane: coalesced), then the
//                  block combines its 256 partial sums with a tree reduction in shared memory:
//                  at step s = 128, 64, ..., 1 thread t < s adds the partial of thread t+s, and a
//                  barrier separates the steps. log2(256) = 8 steps instead of 255 serial adds.
//
//   sum_partials   out[m] = sum_{s<S} partial[s*M + m] for partial (S, M): combines the per-slice
//                  results of the weight-gradient kernels (conv3x3_grad_weight and friends split a
//                  long pixel reduction over S blocks). One thread per output m; the S values are
//                  added in slice order, so the result is deterministic (unlike atomicAdd, whose
//                  order, and so the rounding, changes from run to run). Consecutive threads read
//                  consecutive m: coalesced.

#define REDUCE_THREADS 256

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
channel_sum(const float* __restrict__ g, float* __restrict__ out, int N, int C, int P) {
    __shared__ float s_sum[REDUCE_THREADS];
    const int c = blockIdx.x;
    const int t = threadIdx.x;
    float acc = 0.0f;
    for (int e = t; e < N * P; e += REDUCE_THREADS) {
        const int n = e / P, p = e % P;
        acc += g[(n * C + c) * P + p];
    }
    s_sum[t] = acc;
    __syncthreads();
    for (int stride = REDUCE_THREADS / 2; stride > 0; stride /= 2) {
        if (t < stride) s_sum[t] += s_sum[t + stride];
        __syncthreads();  // outside the `if`: every thread must reach every barrier
    }
    if (t == 0) out[c] = s_sum[0];
}

extern "C" __global__ void sum_partials(const float* __restrict__ partial, float* __restrict__ out, int S, int M) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    float acc = 0.0f;
    for (int s = 0; s < S; ++s) acc += partial[s * M + m];
    out[m] = acc;
}
