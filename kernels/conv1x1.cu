// conv1x1.cu -- U-Net's final layer (paper Section 2: "At the final layer a 1x1 convolution is
// used to map each 64-component feature vector to the desired number of classes"), forward and
// backward. A 1x1 convolution is a matrix product applied at every pixel independently.
//
// Shapes (float32): x (N, Ci, H, W), w (Co, Ci, 1, 1), b (Co,) -> y (N, Co, H, W); P = H * W.
//
//   forward      y[n,co,p]  = b[co] + sum_ci w[co,ci] * x[n,ci,p]
//   grad input   gx[n,ci,p] = sum_co w[co,ci] * gy[n,co,p]
//   grad weight  gw[co,ci]  = sum_{n,p} gy[n,co,p] * x[n,ci,p]
//   grad bias    gb[co]     = sum_{n,p} gy[n,co,p]         (fused into the weight-gradient kernels)
//
// Kernels
//   conv1x1_forward / conv1x1_grad_input: one thread per output element (n, channel, p). The
//     threads of a warp share n and the channel and have consecutive p, so their loads of
//     x[n,ci,p] are consecutive (coalesced) and they all read the same weight (a broadcast).
//   conv1x1_grad_weight: one block per (co, group of C1_CI = 8 input channels, slice of the
//     pixels); per pixel a thread loads gy once and uses it for 8 input channels and the bias sum
//     (the bias gradient, fused), then the block sums its threads' 9 partial sums with a
//     shared-memory tree (as conv3x3_grad_weight).
//   conv1x1_grad_weight_serial: one thread per weight (co, ci), a loop over the N*P pixels; the
//     launcher uses it when weights outnumber pixels (see conv3x3_grad_weight_serial).

extern "C" __global__ void conv1x1_forward(const float* __restrict__ x, const float* __restrict__ w,
                                           const float* __restrict__ b, float* __restrict__ y,
                                           int N, int Ci, int P, int Co) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Co * P) return;
    const int p = t % P;
    const int co = (t / P) % Co;
    const int n = t / (P * Co);
    float acc = b[co];
    for (int ci = 0; ci < Ci; ++ci) acc += w[co * Ci + ci] * x[(n * Ci + ci) * P + p];
    y[t] = acc;
}

extern "C" __global__ void conv1x1_grad_input(const float* __restrict__ gy, const float* __restrict__ w,
                                              float* __restrict__ gx, int N, int Ci, int P, int Co) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Ci * P) return;
    const int p = t % P;
    const int ci = (t / P) % Ci;
    const int n = t / (P * Ci);
    float acc = 0.0f;
    for (int co = 0; co < Co; ++co) acc += w[co * Ci + ci] * gy[(n * Co + co) * P + p];
    gx[t] = acc;
}

#define C1_THREADS 128
#define C1_CI 8

extern "C" __global__ void __launch_bounds__(C1_THREADS)
conv1x1_grad_weight(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                    float* __restrict__ out_bias, int N, int Ci, int P, int Co, int pixels_per_slice) {
    __shared__ float s_sum[C1_CI + 1][C1_THREADS];   // 8 weights, then the bias
    const int groups = (Ci + C1_CI - 1) / C1_CI;
    const int co = blockIdx.x / groups;
    const int ci0 = (blockIdx.x % groups) * C1_CI;
    const int t = threadIdx.x;
    const int total = N * P;
    const int start = blockIdx.y * pixels_per_slice;
    const int stop = min(total, start + pixels_per_slice);

    float acc[C1_CI];
#pragma unroll
    for (int c = 0; c < C1_CI; ++c) acc[c] = 0.0f;
    float bias = 0.0f;   // the bias gradient, fused: the sum of the same g values
    int p = (start + t) % P, n = (start + t) / P;   // e = (n, p), then stepped by additions
    for (int e = start + t; e < stop; e += C1_THREADS) {
        const float g = gy[(n * Co + co) * P + p];
        bias += g;
#pragma unroll
        for (int c = 0; c < C1_CI; ++c) {
            if (ci0 + c >= Ci) break;
            acc[c] += g * x[(n * Ci + ci0 + c) * P + p];
        }
        p += C1_THREADS;
        if (p >= P) { n += p / P; p %= P; }
    }
#pragma unroll
    for (int c = 0; c < C1_CI; ++c) s_sum[c][t] = acc[c];
    s_sum[C1_CI][t] = bias;
    __syncthreads();
    for (int stride = C1_THREADS / 2; stride > 0; stride /= 2) {
        if (t < stride)
            for (int c = 0; c <= C1_CI; ++c) s_sum[c][t] += s_sum[c][t + stride];
        __syncthreads();
    }
    if (t < C1_CI && ci0 + t < Ci) out[(blockIdx.y * Co + co) * Ci + ci0 + t] = s_sum[t][0];
    if (t == C1_CI && ci0 == 0) out_bias[blockIdx.y * Co + co] = s_sum[C1_CI][0];   // first group's block
}

// Serial weight gradient: thread m = co * Ci + ci adds gy[n,co,p] * x[n,ci,p] over (n, p) in order;
// threads m = Co*Ci + co add up gy[n,co,p] for the bias gradient.
#define SERIAL_CHUNK 32
extern "C" __global__ void conv1x1_grad_weight_serial(const float* __restrict__ x, const float* __restrict__ gy,
                                                      float* __restrict__ gw, float* __restrict__ gb,
                                                      int N, int Ci, int P, int Co) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    const int weights = Co * Ci;
    if (m >= weights + Co) return;
    float acc = 0.0f;
    if (m >= weights) {   // a bias thread: gb[co] = the sum of gy[., co, .], in chunks
        const int co = m - weights;
        for (int n = 0; n < N; ++n)
            for (int p0 = 0; p0 < P; p0 += SERIAL_CHUNK) {
                float part = 0.0f;
                for (int p = p0; p < min(P, p0 + SERIAL_CHUNK); ++p) part += gy[(n * Co + co) * P + p];
                acc += part;
            }
        gb[co] = acc;
        return;
    }
    const int ci = m % Ci, co = m / Ci;
    for (int n = 0; n < N; ++n)
        for (int p0 = 0; p0 < P; p0 += SERIAL_CHUNK) {   // chunks of 32 pixels, for accuracy (reduce.cu)
            float part = 0.0f;
            for (int p = p0; p < min(P, p0 + SERIAL_CHUNK); ++p) part += gy[(n * Co + co) * P + p] * x[(n * Ci + ci) * P + p];
            acc += part;
        }
    gw[m] = acc;
}
