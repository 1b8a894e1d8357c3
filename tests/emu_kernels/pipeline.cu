// pipeline.cu -- asynchronous copies from global to shared memory (cp.async, sm_80 and later)
// through the pipeline primitives. Written for a real GPU: the tests compile this file unchanged
// with NVRTC for sm_80 and sm_90 and run it on the emulator.
#include <cuda_pipeline.h>

#define TILE 128

// Each thread copies one float of its block's tile asynchronously, waits (or, with wait = 0,
// forgets to), and after the barrier reads its right neighbour's float.
extern "C" __global__ void neighbour_through_async_copy(const float* __restrict__ x, float* __restrict__ y, int wait) {
    __shared__ float tile[TILE];
    const int t = threadIdx.x, i = blockIdx.x * TILE + t;
    __pipeline_memcpy_async(&tile[t], &x[i], sizeof(float));
    __pipeline_commit();
    if (wait) __pipeline_wait_prior(0);
    __syncthreads();
    y[i] = tile[(t + 1) % TILE];
}

// Double buffering: two batches in flight; __pipeline_wait_prior(1) completes only the first, so
// the second stage is still NaN when read here (it must be waited for with wait_prior(0)).
extern "C" __global__ void two_stages(const float4* __restrict__ x, float4* __restrict__ first, float4* __restrict__ second,
                                      int wait_all) {
    __shared__ float4 stage[2][32];
    const int t = threadIdx.x;  // blockDim.x == 32
    __pipeline_memcpy_async(&stage[0][t], &x[t], sizeof(float4));
    __pipeline_commit();
    __pipeline_memcpy_async(&stage[1][t], &x[32 + t], sizeof(float4), 4);  // the last float zero-filled
    __pipeline_commit();
    __pipeline_wait_prior(wait_all ? 0 : 1);
    first[t] = stage[0][t];
    second[t] = stage[1][t];
}

// A 16-byte copy from an address that is only 4-byte aligned.
extern "C" __global__ void misaligned_async_copy(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float4 buffer[32];
    __pipeline_memcpy_async(&buffer[threadIdx.x], x + 1 + 4 * threadIdx.x, 16);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    y[threadIdx.x] = buffer[threadIdx.x].x;
}
