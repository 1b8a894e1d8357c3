// Exercise 05.1: a tree reduction without bank conflicts. SOLUTION.
//
// block_sum adds up n floats: block b sums x[b*512 .. b*512 + 511] (zeros past n) and writes the
// result to partial[b]. Each of its 256 threads first adds two elements, then the block adds its
// 256 numbers in shared memory with a tree: in each step half of the remaining numbers are added
// to the other half, with a barrier after every step (notebook 05 explains the tree).
//
// This tree addresses the numbers as in many first attempts: in the step with stride s, thread t
// adds s_sum[2*s*t + s] into s_sum[2*s*t]. It is correct, but the threads of a warp hit shared
// memory 2*s words apart. Shared memory has 32 banks, one 4-byte word wide each (word k lives in
// bank k % 32); 32 lanes that ask one bank for different words are served one after another. With
// s = 1 every bank gets two of a warp's words (2 wavefronts per request), with s = 2 four, and so
// on: the profiler's "wavefronts per shared load" counts it.
//
// Change the indexing so that in every step the ACTIVE threads are the first ones (t < stride)
// and thread t adds s_sum[t + stride] into s_sum[t], with the stride halving from 128 to 1:
// consecutive lanes then read consecutive words, one bank each. check("bank_conflicts") runs it.
#define THREADS 256

extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ partial, int n) {
    __shared__ float s_sum[THREADS];
    const int t = threadIdx.x;
    const int k = blockIdx.x * 2 * THREADS + t;
    s_sum[t] = (k < n ? x[k] : 0.0f) + (k + THREADS < n ? x[k + THREADS] : 0.0f);
    __syncthreads();
    // sequential addressing: the active lanes are 0 .. stride-1 and read words t and t + stride,
    // 32 consecutive words per warp: one per bank, one wavefront per request
    for (int stride = THREADS / 2; stride > 0; stride /= 2) {
        if (t < stride) s_sum[t] += s_sum[t + stride];
        __syncthreads();   // outside the if: every thread of the block reaches every barrier
    }
    if (t == 0) partial[blockIdx.x] = s_sum[0];
}
