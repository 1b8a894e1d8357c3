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
