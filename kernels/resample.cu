// resample.cu -- the augmentation's resampling (paper Section 3.1): a training tile is read from its
// slice through one map of source coordinates (flip + rotation + shift + elastic deformation,
// composed on the host from host random numbers), and the image, its label and its weight map are
// sampled at the same points, so they stay aligned:
//
//   image  (C, H, W)  cubic B-spline   out = sum_{4x4} w_y[i] w_x[j] coef[c, y0+i, x0+j], clipped to [lo, hi]
//   label  (H, W)     nearest          out = label[round(y), round(x)]  (class ids must not be blended)
//   weight (H, W)     linear           out = max(bilinear(weight), 0)   (no overshoot: weights stay >= 0)
//
// It is a GATHER: each output pixel reads from wherever its coordinate points, so reads are
// scattered while writes are coalesced. The oracle is scipy.ndimage.map_coordinates with mode
// "mirror" (minunet/ops/resample.py), and this file follows it step by step:
//   1. the source coordinate C = origin + coords[p] is folded into [0, n-1] by mirroring, in double
//      precision (scipy's map_coordinate): d c b | a b c d | c b a, the edge pixel not repeated,
//      repeated without end (period 2n - 2), so a tile may reach past a small slice on any side;
//   2. the support of the interpolation (4 pixels per axis for cubic, 2 for linear, 1 for
//      nearest: start = floor(C) - 1, floor(C), floor(C + 0.5)) is mirrored index by index;
//   3. cubic: scipy's order-3 interpolation is NOT a cubic through the pixels but a cubic
//      B-spline through spline COEFFICIENTS, which scipy computes first with a recursive
//      prefilter (spline_filter). The host computes those coefficients once per slice
//      (resample.spline_coefficients); this kernel evaluates the spline: weights
//      (1-t)^3/6, (3t^3 - 6t^2 + 4)/6, (-3t^3 + 3t^2 + 3t + 1)/6, t^3/6 for t = C - floor(C).
// Folding and rounding run in double so that the nearest-neighbour label is exactly scipy's
// (a float32 origin + coordinate would round, and move a label pixel that sits on a tie);
// the 16-term sums run in float32 (error ~1e-6 of the coefficients' size, see the tests).
//
// Thread mapping: one thread per output pixel p = y * w + x (flat, blockDim.x threads per block),
// so a warp reads 32 consecutive coordinates and writes 32 consecutive outputs per array
// (coalesced); the gathers read 4 rows of 4 neighbouring floats per channel, which neighbouring
// threads mostly share (a smooth map sends neighbours to neighbours): they come from L1/L2.
//
// Napkin math per output pixel, C channels: 16C multiply-adds (cubic) + 4 (linear) + ~60 for the
// weights and folding (some in FP64): ~40C + 70 FLOPs. DRAM bytes: 8 (coordinates) + 4C + 8
// (outputs) + the gathered inputs, ~4C + 8 when neighbours share cache lines: ~28 bytes for C = 1.
// Intensity ~4 FLOP/byte, memory-bound: a 348 x 348 tile moves ~3.4 MB, a few microseconds at a
// GPU's bandwidth; launch overhead dominates (one launch per tile).

// scipy's map_coordinate for mode "mirror": fold a coordinate into [0, n - 1].
__device__ __forceinline__ double mirror_coordinate(double c, int n) {
    if (n <= 1) return 0.0;
    const long long period = 2LL * n - 2;
    if (c < 0.0) {
        c = (double)(period * (long long)(-c / (double)period)) + c;
        c = c <= (double)(1 - n) ? c + (double)period : -c;
    } else if (c > (double)(n - 1)) {
        c -= (double)(period * (long long)(c / (double)period));
        if (c >= (double)n) c = (double)period - c;
    }
    return c;
}

__device__ __forceinline__ int mirror_index(long long i, int n) {
    return (int)mirror_coordinate((double)i, n);
}

extern "C" __global__ void resample(const float* __restrict__ coef, const int* __restrict__ label,
                                    const float* __restrict__ weight, const float* __restrict__ coords,
                                    float* __restrict__ out_image, int* __restrict__ out_label,
                                    float* __restrict__ out_weight, int channels, int H, int W,
                                    int h, int w, int origin_y, int origin_x, float lo, float hi) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= h * w) return;
    const double cy = mirror_coordinate((double)coords[p] + origin_y, H);
    const double cx = mirror_coordinate((double)coords[h * w + p] + origin_x, W);

    // nearest: start = floor(c + 0.5), as scipy rounds for even orders
    const int ny = mirror_index((long long)floor(cy + 0.5), H);
    const int nx = mirror_index((long long)floor(cx + 0.5), W);
    out_label[p] = label[ny * W + nx];

    // linear: 2 x 2 pixels from floor(c)
    const double fy = floor(cy), fx = floor(cx);
    const float ty = (float)(cy - fy), tx = (float)(cx - fx);
    const int y0 = mirror_index((long long)fy, H), y1 = mirror_index((long long)fy + 1, H);
    const int x0 = mirror_index((long long)fx, W), x1 = mirror_index((long long)fx + 1, W);
    const float top = (1.0f - tx) * weight[y0 * W + x0] + tx * weight[y0 * W + x1];
    const float bottom = (1.0f - tx) * weight[y1 * W + x0] + tx * weight[y1 * W + x1];
    const float wv = (1.0f - ty) * top + ty * bottom;
    out_weight[p] = wv > 0.0f ? wv : 0.0f;

    // cubic B-spline: 4 x 4 coefficients from floor(c) - 1
    float wy[4], wx[4];
    int rows[4], cols[4];
    {
        const float sy = 1.0f - ty, sx = 1.0f - tx;
        wy[0] = sy * sy * sy / 6.0f;
        wy[1] = (3.0f * ty * ty * ty - 6.0f * ty * ty + 4.0f) / 6.0f;
        wy[2] = (-3.0f * ty * ty * ty + 3.0f * ty * ty + 3.0f * ty + 1.0f) / 6.0f;
        wy[3] = ty * ty * ty / 6.0f;
        wx[0] = sx * sx * sx / 6.0f;
        wx[1] = (3.0f * tx * tx * tx - 6.0f * tx * tx + 4.0f) / 6.0f;
        wx[2] = (-3.0f * tx * tx * tx + 3.0f * tx * tx + 3.0f * tx + 1.0f) / 6.0f;
        wx[3] = tx * tx * tx / 6.0f;
    }
    for (int k = 0; k < 4; ++k) {
        rows[k] = mirror_index((long long)fy - 1 + k, H) * W;
        cols[k] = mirror_index((long long)fx - 1 + k, W);
    }
    for (int c = 0; c < channels; ++c) {
        const float* plane = coef + (long long)c * H * W;
        float sum = 0.0f;
        for (int i = 0; i < 4; ++i) {
            float row = 0.0f;
            for (int j = 0; j < 4; ++j) row += wx[j] * plane[rows[i] + cols[j]];
            sum += wy[i] * row;
        }
        out_image[(long long)c * h * w + p] = sum < lo ? lo : (sum > hi ? hi : sum);
    }
}

// ---- compose_coordinates: the coordinate map itself, built on the device ------------------------
// The host draws the random numbers (flips, angle, shift, the elastic grid's nodes: ~20 numbers,
// minunet.data.elastic.random_transform) and this kernel composes them into the (2, h, w) map that
// `resample` reads, so a training tile needs no host work per pixel and no 1 MB upload of
// coordinates (348 x 348 x 2 floats). It repeats the host's oracle, elastic.transform_coordinates,
// operation by operation, in double precision:
//   v      = (y - (h-1)/2, x - (w-1)/2), each axis negated when flipped
//   src_y  =  cos a * v_y + sin a * v_x + (H-1)/2 + shift_y
//   src_x  = -sin a * v_y + cos a * v_x + (W-1)/2 + shift_x
//   D[c]   = rows @ nodes[c] @ cols^T   (the bicubic spline through the grid's nodes, Section 3.1;
//            rows (h, grid) and cols (w, grid) hold each pixel's spline weights, computed once
//            per tile size on the host by scipy, elastic._spline_matrix)
//   coords = float32(src + float64(float32(D)))
// Every product is __dmul_rn: the GPU compiler contracts a * b + c into one fused multiply-add
// by default, which rounds once instead of twice and would give coordinates a bit away from
// the host's - enough to flip a nearest-neighbour label that sits on a tie. With the same
// roundings the map equals the host's (up to the last bit of the host's BLAS product D, which
// may sum in another order; tests/test_resample.py).
//
// Thread mapping: one thread per output pixel, flat p = y * w + x; writes coalesced.
// Napkin math per pixel: ~2 * 2 * grid^2 + 10 FP64 operations (46 for grid 3), 8 bytes written,
// the small matrices read from cache: a 348 x 348 map is 1 MB written, ~1 us of DRAM time on a
// GPU (predicted, from bandwidth); one launch replaces the host's NumPy map and its upload
// (measured times: bench/results/training_iteration.md).
extern "C" __global__ void compose_coordinates(const double* __restrict__ nodes,
                                               const double* __restrict__ rows,
                                               const double* __restrict__ cols,
                                               float* __restrict__ coords, int h, int w, int grid,
                                               int elastic, double cos_a, double sin_a, int flip_y,
                                               int flip_x, double centre_y, double centre_x,
                                               double shift_y, double shift_x) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= h * w) return;
    const int y = p / w, x = p - (p / w) * w;
    double vy = (double)y - (double)(h - 1) / 2.0;
    double vx = (double)x - (double)(w - 1) / 2.0;
    if (flip_y) vy = -vy;
    if (flip_x) vx = -vx;
    double sy = __dmul_rn(cos_a, vy) + __dmul_rn(sin_a, vx);
    double sx = __dmul_rn(-sin_a, vy) + __dmul_rn(cos_a, vx);
    sy = sy + centre_y;
    sx = sx + centre_x;
    sy = sy + shift_y;
    sx = sx + shift_x;
    if (elastic) {
        for (int c = 0; c < 2; ++c) {
            const double* n = nodes + c * grid * grid;
            double d = 0.0;
            for (int j = 0; j < grid; ++j) {
                double a = 0.0;   // (rows @ nodes[c])[y, j]
                for (int i = 0; i < grid; ++i) a = a + __dmul_rn(rows[y * grid + i], n[i * grid + j]);
                d = d + __dmul_rn(a, cols[x * grid + j]);
            }
            const double rounded = (double)(float)d;   // the host's field is float32
            if (c == 0) sy = sy + rounded; else sx = sx + rounded;
        }
    }
    coords[p] = (float)sy;
    coords[h * w + p] = (float)sx;
}

// ---- gray_values: the gray-value variation and the standardisation, one block per plane -------
// Section 3.1's gray-value variation of an augmented tile (elastic.gray_value_variation):
//   p = clip(x, 0, 1)^gamma;  x' = (p - mean p) * contrast + mean p + brightness
// and the standardisation every training image gets after it (minunet.data.io.standardize):
//   x'' = (x' - mean x') / (std x' + 1e-6)
// Both need a mean over the whole plane before any pixel can be written, so one BLOCK handles one
// plane (blockIdx.x = plane) in passes over it: each thread sums its pixels (p = t, t + blockDim,
// ...) in double, the block adds the threads' sums with a shared-memory tree (a fixed order:
// deterministic), and every thread reads the total back. The gray pass recomputes p from x in the
// second pass instead of storing it, so nothing is rounded to float32 before the end, as on the
// host (float64 arithmetic).
//
// Napkin math, a 348 x 348 plane: gray 2 passes + standardise 3 passes = 5 reads of 0.48 MB, ~40
// FLOPs (pow) per pixel. One block sits on one SM: ~10-20 GB/s of that SM's share of bandwidth
// for a few tens of microseconds (predicted) - cheaper than the ~10 CuPy launches (mean, std,
// subtract, divide, ...) it replaces, each costing host time, which the training step needs.
#define GRAY_THREADS 256

__device__ double block_total(double value, double* s_sum) {
    const int t = threadIdx.x;
    __syncthreads();   // the previous total has been read by every thread before s_sum is reused
    s_sum[t] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) s_sum[t] += s_sum[t + stride];
        __syncthreads();   // outside the `if`: every thread must reach every barrier
    }
    return s_sum[0];
}

__device__ __forceinline__ double gamma_of(float v, double gamma) {
    const double clipped = v < 0.0f ? 0.0 : (v > 1.0f ? 1.0 : (double)v);
    return pow(clipped, gamma);
}

extern "C" __global__ void __launch_bounds__(GRAY_THREADS)
gray_values(float* __restrict__ x, int n, int gray, double gamma, double contrast,
            double brightness, int standardize) {
    __shared__ double s_sum[GRAY_THREADS];
    float* plane = x + (long long)blockIdx.x * n;
    const int t = threadIdx.x;
    if (gray) {
        double acc = 0.0;
        for (int i = t; i < n; i += blockDim.x) acc += gamma_of(plane[i], gamma);
        const double mean = block_total(acc, s_sum) / (double)n;
        for (int i = t; i < n; i += blockDim.x)
            plane[i] = (float)(__dmul_rn(gamma_of(plane[i], gamma) - mean, contrast) + mean + brightness);
    }
    if (standardize) {
        double acc = 0.0;
        for (int i = t; i < n; i += blockDim.x) acc += (double)plane[i];
        const double mean = block_total(acc, s_sum) / (double)n;
        double squares = 0.0;
        for (int i = t; i < n; i += blockDim.x) {
            const double d = (double)plane[i] - mean;
            squares = squares + __dmul_rn(d, d);
        }
        const double spread = sqrt(block_total(squares, s_sum) / (double)n) + 1e-6;
        for (int i = t; i < n; i += blockDim.x) plane[i] = (float)(((double)plane[i] - mean) / spread);
    }
}
