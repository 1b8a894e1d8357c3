// Exercise 05.2: a barrier every thread reaches.
//
// block_sum adds up n floats, as in exercise 05.1: block b sums x[b*512 .. b*512 + 511] (zeros past n)
// into partial[b], with a tree in shared memory whose active threads are the first `stride` ones.
//
// Someone "optimised" it: only the threads that add need to wait, they thought, so the barrier
// moved inside the `if`. But __syncthreads() waits until EVERY thread of the block has arrived
// at it; a thread that skips it never arrives. On a GPU that is undefined behaviour: a hang, or
// a wrong sum that shows up once in a while. The emulator refuses it (a "divergent barrier").
// Put the barrier where every thread of the block reaches it, then run check("divergent_barrier").
#define THREADS 256

extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ partial, int n) {
    __shared__ float s_sum[THREADS];
    const int t = threadIdx.x;
    const int k = blockIdx.x * 2 * THREADS + t;
    s_sum[t] = (k < n ? x[k] : 0.0f) + (k + THREADS < n ? x[k + THREADS] : 0.0f);
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride /= 2) {
        if (t < stride) {
            s_sum[t] += s_sum[t + stride];
            __syncthreads();
        }
    }
    if (t == 0) partial[blockIdx.x] = s_sum[0];
}
