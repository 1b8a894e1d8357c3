// vector_add.cu -- the first kernel anyone writes, in the grid-stride form: any grid size covers
// any n, and the loop condition is also the bounds guard (n need not be a multiple of the block).
extern "C" __global__ void vector_add(const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ c, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        c[i] = a[i] + b[i];
    }
}

// y = alpha * x, written for an in-place call (x and y the same array).
extern "C" __global__ void scale(const float* x, float* y, float alpha, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = alpha * x[i];
}
