// elementwise.cu -- the ops that treat every element on its own: ReLU, dropout and the SGD update.
// One thread per element, flat C-order index t = blockIdx.x * blockDim.x + threadIdx.x, so the
// threads of a warp touch 32 consecutive floats (one or two 128-byte transactions: coalesced).
// These kernels do one or two arithmetic operations per element: their speed is the memory
// bandwidth, nothing else.
//
//   relu_forward      y = max(x, 0), NaN stays NaN                x, y (n,)
//   relu_backward     gx = gy where y > 0, else 0                 (uses the OUTPUT y: y > 0 iff x > 0)
//   dropout_forward   keep = u(t, seed) >= p;  y = keep ? x * scale : 0;  mask = keep (uint8)
//   dropout_backward  gx = mask ? gy * scale : 0                  scale = 1 / (1 - p)  (inverted dropout)
//   dropout_forward_seed_buffer   the same, with the seed read from device memory: seeds[index]
//   sgd_momentum      v = momentum * v + g;  param -= lr * v      (PyTorch's formulation, in place)
//                     minunet.optim.SGD keeps every parameter of the network in one flat buffer (the
//                     parameters are views of it), so ONE launch updates all of them, as PyTorch's
//                     fused optimizers do: 46 update launches of a few microseconds each became
//                     one (plus one gather of the gradients, minunet/optim.py).
//   sgd_momentum_if_finite   the same update, skipped (param and v untouched) unless loss[0] is finite
//   grad_add          c = a + b        autograd's sum of the gradients of a tensor used twice
//   grad_scale        c = a * s[0]     the loss gradient times the incoming (device) scalar
//
// The last four, and the seed in device memory, exist for minunet.step_graph: a CUDA graph replays
// the launches it captured with the very same arguments, so whatever changes from step to step
// (the dropout seed, whether the loss is finite) must be READ FROM DEVICE MEMORY by a kernel, and
// every array operation of a step must be a kernel of ours (an a + b done by the array library
// would not be part of the emulator's replay). Each does one pass over memory, like the rest.
//
// Dropout (paper Section 3.1: "Drop-out layers at the end of the contracting path") needs random
// numbers. Instead of a random-number generator with state per thread, u is a hash of the
// element's flat index t and the seed (a "counter-based" generator): any thread can compute its
// own u independently, and the CPU reference computes the very same bits, so masks are identical
// on every device. The hash is lowbias32 (C. Wellons), see docs/backends.md. All arithmetic is on
// unsigned 32-bit ints, which wrap modulo 2^32 in C, exactly as the reference's uint32 NumPy math.

extern "C" __global__ void relu_forward(const float* __restrict__ x, float* __restrict__ y, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    // Not fmaxf(x, 0): fmaxf returns the non-NaN argument, so a NaN would become 0 and a diverging
    // run would look healthy. Written this way a NaN fails `v < 0` and passes through, as in NumPy
    // and PyTorch.
    if (t < n) {
        const float v = x[t];
        y[t] = v < 0.0f ? 0.0f : v;
    }
}

extern "C" __global__ void relu_backward(const float* __restrict__ y, const float* __restrict__ gy,
                                         float* __restrict__ gx, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) gx[t] = y[t] > 0.0f ? gy[t] : 0.0f;
}

__device__ __forceinline__ float dropout_uniform(unsigned int index, unsigned int seed) {
    unsigned int h = index + seed * 0x9E3779B9u;  // 0x9E3779B9 = 2^32 / golden ratio: spreads seeds apart
    h ^= h >> 16;  h *= 0x7FEB352Du;
    h ^= h >> 15;  h *= 0x846CA68Bu;
    h ^= h >> 16;
    // the top 24 bits as a float in [0, 1): exact, since float32 has a 24-bit significand
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ void dropout_element(const float* __restrict__ x, float* __restrict__ y,
                                                unsigned char* __restrict__ mask, int t, float p,
                                                float scale, unsigned int seed) {
    const bool keep = dropout_uniform((unsigned int)t, seed) >= p;
    mask[t] = keep ? 1 : 0;
    // multiply by 0 rather than write 0: a NaN input stays NaN (NaN * 0 = NaN), as in the reference
    // and PyTorch, so a broken activation is never hidden by the mask
    y[t] = x[t] * (keep ? scale : 0.0f);
}

extern "C" __global__ void dropout_forward(const float* __restrict__ x, float* __restrict__ y,
                                           unsigned char* __restrict__ mask, int n, float p, float scale,
                                           unsigned int seed) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) dropout_element(x, y, mask, t, p, scale, seed);
}

// The seed from device memory (seeds[index], written by the host before each replay of a captured
// step): the same mask as dropout_forward with seed = seeds[index]. Every thread reads the same
// word (one broadcast load per warp, served from cache).
extern "C" __global__ void dropout_forward_seed_buffer(const float* __restrict__ x, float* __restrict__ y,
                                                       unsigned char* __restrict__ mask, int n, float p,
                                                       float scale, const unsigned int* __restrict__ seeds,
                                                       int index) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) dropout_element(x, y, mask, t, p, scale, seeds[index]);
}

extern "C" __global__ void dropout_backward(const float* __restrict__ gy, const unsigned char* __restrict__ mask,
                                            float* __restrict__ gx, int n, float scale) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) gx[t] = gy[t] * (mask[t] ? scale : 0.0f);  // a NaN gradient stays NaN, as above
}

__device__ __forceinline__ void sgd_element(float* __restrict__ param, const float* __restrict__ grad,
                                            float* __restrict__ velocity, int t, float lr, float momentum) {
    const float v = momentum * velocity[t] + grad[t];
    velocity[t] = v;
    param[t] -= lr * v;
}

extern "C" __global__ void sgd_momentum(float* __restrict__ param, const float* __restrict__ grad,
                                        float* __restrict__ velocity, int n, float lr, float momentum) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) sgd_element(param, grad, velocity, t, lr, momentum);
}

// A replayed step cannot stop between its loss and its update to ask the host whether the loss is
// finite, so the update asks the loss itself: a NaN or infinite loss leaves param and v untouched,
// as the eager loop does by never calling the update (train.py). isfinite is false for NaN and +-inf.
extern "C" __global__ void sgd_momentum_if_finite(float* __restrict__ param, const float* __restrict__ grad,
                                                  float* __restrict__ velocity, int n, float lr,
                                                  float momentum, const float* __restrict__ loss) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n && isfinite(loss[0])) sgd_element(param, grad, velocity, t, lr, momentum);
}

extern "C" __global__ void grad_add(const float* __restrict__ a, const float* __restrict__ b,
                                    float* __restrict__ c, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) c[t] = a[t] + b[t];
}

extern "C" __global__ void grad_scale(const float* __restrict__ a, const float* __restrict__ s,
                                      float* __restrict__ c, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) c[t] = a[t] * s[0];
}
