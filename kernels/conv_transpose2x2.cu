// conv_transpose2x2.cu -- U-Net's "up-convolution" (paper Section 2: "an upsampling of the feature
// map followed by a 2x2 convolution ("up-convolution") that halves the number of feature
// channels"), implemented as PyTorch's ConvTranspose2d(kernel_size=2, stride=2).
//
// Shapes (PyTorch layout, float32): x (N, Ci, H, W), w (Ci, Co, 2, 2), b (Co,)
//                                   -> y (N, Co, 2H, 2W).
// With stride = kernel size, the output 2x2 blocks of neighbouring input pixels do not overlap:
// every input pixel (i, j) "paints" its own block y[:, :, 2i:2i+2, 2j:2j+2].
//
//   forward      y[n,co,2i+a,2j+c] = b[co] + sum_ci x[n,ci,i,j] * w[ci,co,a,c]     (a, c in {0, 1})
//   grad input   gx[n,ci,i,j]      = sum_{co,a,c} gy[n,co,2i+a,2j+c] * w[ci,co,a,c]
//   grad weight  gw[ci,co,a,c]     = sum_{n,i,j} x[n,ci,i,j] * gy[n,co,2i+a,2j+c]
//   grad bias    gb[co]            = sum_{n,i,j} gy[n,co,:,:]      (fused into the weight-gradient kernels)
//
// Kernels
//   conv_transpose2x2_forward      one thread per (n, co, i, j): it reads x[n,:,i,j] once per
//                                  input channel and uses it for the 4 outputs of its block
//                                  (4 multiply-adds per x load instead of 1).
//   conv_transpose2x2_grad_input   one thread per gx element, gathering the 4 gy values of its
//                                  block for every output channel: no atomics.
//   conv_transpose2x2_grad_weight  one block per (ci, group of CT_CO = 8 output channels, slice of
//                                  the pixels): per input pixel a thread loads x once and uses it
//                                  for 8 channels x 4 taps, and adds the 4 gy values of each channel
//                                  to that channel's bias sum (the bias gradient, fused: the same
//                                  loads); the block then sums its threads' 32 + 8 partial sums with
//                                  a shared-memory tree (as conv3x3_grad_weight).
//   conv_transpose2x2_grad_weight_serial  one thread per weight, a loop over the pixels: for the
//                                  small deep layers, where weights outnumber pixels (see
//                                  conv3x3_grad_weight_serial for when each one pays).

extern "C" __global__ void conv_transpose2x2_forward(const float* __restrict__ x, const float* __restrict__ w,
                                                     const float* __restrict__ b, float* __restrict__ y,
                                                     int N, int Ci, int H, int W, int Co) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Co * H * W) return;
    const int j = t % W;
    const int i = (t / W) % H;
    const int co = (t / (W * H)) % Co;
    const int n = t / (W * H * Co);
    float acc[4];                                  // the 2x2 output block, a*2 + c
    for (int k = 0; k < 4; ++k) acc[k] = b[co];
    for (int ci = 0; ci < Ci; ++ci) {
        const float v = x[((n * Ci + ci) * H + i) * W + j];   // neighbouring threads: neighbouring j
        const float* wp = w + (ci * Co + co) * 4;              // w[ci, co, :, :]
        for (int k = 0; k < 4; ++k) acc[k] += v * wp[k];
    }
    float* yp = y + ((n * Co + co) * 2 * H + 2 * i) * 2 * W + 2 * j;  // top-left of the block
    yp[0] = acc[0];
    yp[1] = acc[1];
    yp[2 * W] = acc[2];                            // the next output row is 2W floats further
    yp[2 * W + 1] = acc[3];
}

extern "C" __global__ void conv_transpose2x2_grad_input(const float* __restrict__ gy, const float* __restrict__ w,
                                                        float* __restrict__ gx, int N, int Ci, int H, int W, int Co) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Ci * H * W) return;
    const int j = t % W;
    const int i = (t / W) % H;
    const int ci = (t / (W * H)) % Ci;
    const int n = t / (W * H * Ci);
    float acc = 0.0f;
    for (int co = 0; co < Co; ++co) {
        const float* gp = gy + ((n * Co + co) * 2 * H + 2 * i) * 2 * W + 2 * j;
        const float* wp = w + (ci * Co + co) * 4;
        acc += gp[0] * wp[0] + gp[1] * wp[1] + gp[2 * W] * wp[2] + gp[2 * W + 1] * wp[3];
    }
    gx[t] = acc;
}

#define CT_THREADS 128
#define CT_CO 8

extern "C" __global__ void __launch_bounds__(CT_THREADS)
conv_transpose2x2_grad_weight(const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ out,
                              float* __restrict__ out_bias, int N, int Ci, int H, int W, int Co,
                              int pixels_per_slice) {
    __shared__ float s_sum[CT_CO * 5][CT_THREADS];   // 32 weights + 8 biases, * 128 * 4 bytes = 20 KiB
    const int groups = (Co + CT_CO - 1) / CT_CO;
    const int ci = blockIdx.x / groups;
    const int co0 = (blockIdx.x % groups) * CT_CO;
    const int t = threadIdx.x;
    const int total = N * H * W;
    const int start = blockIdx.y * pixels_per_slice;
    const int stop = min(total, start + pixels_per_slice);

    float acc[CT_CO][4];
#pragma unroll
    for (int d = 0; d < CT_CO; ++d)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[d][k] = 0.0f;
    float bias[CT_CO];   // the bias sums of the block's 8 channels (every ci's blocks add them; ci 0's write)
#pragma unroll
    for (int d = 0; d < CT_CO; ++d) bias[d] = 0.0f;

    // p = (n, i, j) of an input pixel, stepped by additions as in conv3x3_grad_weight
    const int di = CT_THREADS / W, dj = CT_THREADS % W;
    int j = (start + t) % W, i = ((start + t) / W) % H, n = (start + t) / (W * H);
    for (int p = start + t; p < stop; p += CT_THREADS) {
        const float v = x[((n * Ci + ci) * H + i) * W + j];
#pragma unroll
        for (int d = 0; d < CT_CO; ++d) {
            if (co0 + d >= Co) break;  // the last group may have fewer channels (no barrier inside)
            const float* gp = gy + ((n * Co + co0 + d) * 2 * H + 2 * i) * 2 * W + 2 * j;
            acc[d][0] += v * gp[0];
            acc[d][1] += v * gp[1];
            acc[d][2] += v * gp[2 * W];
            acc[d][3] += v * gp[2 * W + 1];
            bias[d] += (gp[0] + gp[1]) + (gp[2 * W] + gp[2 * W + 1]);
        }
        j += dj;
        i += di;
        if (j >= W) { j -= W; ++i; }
        if (i >= H) { n += i / H; i %= H; }
    }

#pragma unroll
    for (int q = 0; q < CT_CO * 4; ++q) s_sum[q][t] = acc[q / 4][q % 4];
#pragma unroll
    for (int d = 0; d < CT_CO; ++d) s_sum[CT_CO * 4 + d][t] = bias[d];
    __syncthreads();
    for (int stride = CT_THREADS / 2; stride > 0; stride /= 2) {   // tree: 7 steps for 128 threads
        if (t < stride)
            for (int q = 0; q < CT_CO * 5; ++q) s_sum[q][t] += s_sum[q][t + stride];
        __syncthreads();
    }
    // threads 0..31 write one weight each: q = d*4 + k -> out[slice][ci][co0+d][k]; in the blocks
    // of ci = 0, threads 32..39 write the biases of channels co0 .. co0+7
    if (t < CT_CO * 4 && co0 + t / 4 < Co)
        out[((blockIdx.y * Ci + ci) * Co + co0 + t / 4) * 4 + t % 4] = s_sum[t][0];
    if (ci == 0 && t >= CT_CO * 4 && t < CT_CO * 5 && co0 + t - CT_CO * 4 < Co)
        out_bias[blockIdx.y * Co + co0 + t - CT_CO * 4] = s_sum[t][0];
}

// Serial weight gradient: thread m = ((ci * Co + co) * 4 + a * 2 + c) adds x[n,ci,i,j] *
// gy[n,co,2i+a,2j+c] over every input pixel (n, i, j) in a loop, and threads m = Ci*Co*4 + co
// add up gy[n,co,:,:] for the bias gradient. No shared memory, no barriers.
// Napkin math: 2 loads per multiply-add; a warp's threads share ci and read the same x value
// (a broadcast) and gy values of 8 channels.
extern "C" __global__ void conv_transpose2x2_grad_weight_serial(const float* __restrict__ x, const float* __restrict__ gy,
                                                                float* __restrict__ gw, float* __restrict__ gb,
                                                                int N, int Ci, int H, int W, int Co) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    const int weights = Ci * Co * 4;
    if (m >= weights + Co) return;
    if (m >= weights) {   // a bias thread: every output row of gy[., co], a row at a time
        const int co = m - weights;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {
            const float* gp = gy + (n * Co + co) * 4 * H * W;
            for (int r = 0; r < 2 * H; ++r) {
                float row = 0.0f;
                for (int q = 0; q < 2 * W; ++q) row += gp[r * 2 * W + q];
                acc += row;
            }
        }
        gb[co] = acc;
        return;
    }
    const int a = (m / 2) % 2, c = m % 2, co = (m / 4) % Co, ci = m / (4 * Co);
    float acc = 0.0f;
    for (int n = 0; n < N; ++n) {
        const float* xp = x + (n * Ci + ci) * H * W;
        const float* gp = gy + ((n * Co + co) * 2 * H + a) * 2 * W + c;   // gy[n, co, a, c]
        for (int i = 0; i < H; ++i) {   // a row at a time, for accuracy (see conv3x3_grad_weight_serial)
            float row = 0.0f;
            for (int j = 0; j < W; ++j) row += xp[i * W + j] * gp[2 * i * 2 * W + 2 * j];
            acc += row;
        }
    }
    gw[m] = acc;
}
