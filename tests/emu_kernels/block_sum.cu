// block_sum.cu -- a tree reduction in shared memory: each block sums BLOCK inputs and adds its
// partial sum to *out with one atomicAdd. Every level of the tree reads what other threads wrote
// on the level before, which is why each level ends with __syncthreads().
#ifndef BLOCK
#define BLOCK 256
#endif

extern "C" __global__ void __launch_bounds__(BLOCK) block_sum(const float* x, float* out, int n) {
    __shared__ float partial[BLOCK];
    const int t = threadIdx.x;
    const int i = blockIdx.x * BLOCK + t;
    partial[t] = i < n ? x[i] : 0.0f;  // out-of-range threads contribute 0 but stay for the barriers
    __syncthreads();
    for (int stride = BLOCK / 2; stride > 0; stride /= 2) {
        if (t < stride) partial[t] += partial[t + stride];
        __syncthreads();
    }
    if (t == 0) atomicAdd(out, partial[0]);
}

// The same with the scratch space in dynamic shared memory (sized by shared_mem= at launch) and
// the block size taken from blockDim, so any power-of-two block works.
extern "C" __global__ void block_sum_dynamic(const float* x, float* out, int n) {
    extern __shared__ float scratch[];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    scratch[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) scratch[t] += scratch[t + stride];
        __syncthreads();
    }
    if (t == 0) atomicAdd(out, scratch[0]);
}
