// histogram.cu -- atomics: many threads add to the same bins, so the updates must be atomic.
extern "C" __global__ void histogram(const int* values, int* bins, int n, int nbins) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const int v = min(max(values[i], 0), nbins - 1);  // clamp into the first/last bin
        atomicAdd(&bins[v], 1);
    }
}

// Float atomics and atomicMax: the sum and the largest of all values.
extern "C" __global__ void sum_and_max(const float* x, float* sum, int* max_bits, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(sum, x[i]);
    atomicMax(max_bits, __float_as_int(fmaxf(x[i], 0.0f)));  // non-negative floats order as ints
}

// The CUDA math functions against libm (the test compares with NumPy).
extern "C" __global__ void math_functions(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = x[i];  // v in (0.5, 2)
    float* r = y + 10 * i;
    r[0] = __expf(v) + expf(-v);
    r[1] = __logf(v) + logf(2.0f * v);
    r[2] = rsqrtf(v) * sqrtf(v);
    r[3] = fmaxf(v, 1.0f) - fminf(v, 1.0f) + fabsf(-v);
    r[4] = floorf(3.0f * v) + ceilf(3.0f * v) + powf(v, 1.5f);
    r[5] = __fdividef(1.0f, v);
    r[6] = (float)(__float2int_rn(2.5f * v) + __float2int_rz(-2.5f * v));
    r[7] = (float)(max(3, (int)(4.0f * v)) - min(2u, (unsigned int)(4.0f * v)));
    r[8] = v > 1.0f ? INFINITY : -FLT_MAX;
    r[9] = __ldg(&x[i]) * 2.0f;
}
