// maxpool2x2.cu -- U-Net's downsampling step (paper Section 2: "a 2x2 max pooling operation with
// stride 2"), forward and backward.
//
// Shapes: x (N, C, H, W) float32 -> y (N, C, Ho, Wo) float32 and argmax (N, C, Ho, Wo) uint8,
// with Ho = H / 2, Wo = W / 2 rounded down (like PyTorch: an odd last row/column is dropped).
//
//   forward   y[n,c,i,j] = max of the window x[n,c,2i:2i+2,2j:2j+2];
//             argmax[n,c,i,j] = dy*2 + dx of that maximum (0..3). The four candidates are
//             scanned in row-major order (0,0), (0,1), (1,0), (1,1) with a strict `>`, so on ties
//             the first one wins -- the convention of docs/backends.md, shared with the NumPy
//             reference, so both pick the same pixel and route the gradient identically.
//             A NaN beats every number (as in PyTorch): `v > best` is false whenever v or best
//             is NaN, so NaN needs its own test, or a NaN anywhere but the first corner would
//             silently disappear from the output. Among NaNs the first one wins.
//   backward  gx[n,c,yy,xx] = gy[n,c,yy/2,xx/2] if (yy%2)*2 + xx%2 is that window's argmax, else 0;
//             pixels in a dropped last row/column (yy >= 2*Ho or xx >= 2*Wo) get 0.
//
// Thread mapping: forward, one thread per OUTPUT element (4 loads, 2 stores); backward, one thread
// per INPUT element, a gather: each gx element is written exactly once (also the zeros, so gx
// needs no separate zero-fill and no two threads write the same address). Flat indices are in C
// order, so neighbouring threads touch neighbouring addresses (coalesced).
//
// Why store argmax at all, instead of comparing x with y again in the backward pass? One byte per
// output is 1/16 of what re-reading x costs, and it makes the tie rule explicit.

extern "C" __global__ void maxpool2x2_forward(const float* __restrict__ x, float* __restrict__ y,
                                              unsigned char* __restrict__ argmax,
                                              int N, int C, int H, int W) {
    const int Ho = H / 2, Wo = W / 2;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * C * Ho * Wo) return;
    const int j = t % Wo;
    const int i = (t / Wo) % Ho;
    const int nc = t / (Wo * Ho);              // n * C + c: planes are consecutive in memory
    const float* win = x + (nc * H + 2 * i) * W + 2 * j;   // top-left of the 2x2 window
    float best = win[0];
    unsigned char arg = 0;
    const float candidates[3] = {win[1], win[W], win[W + 1]};  // (0,1), (1,0), (1,1)
    for (int k = 0; k < 3; ++k) {
        const float v = candidates[k];
        if (v > best || (isnan(v) && !isnan(best))) {   // strict: on ties the earlier corner stays
            best = v;
            arg = (unsigned char)(k + 1);
        }
    }
    y[t] = best;
    argmax[t] = arg;
}

extern "C" __global__ void maxpool2x2_backward(const float* __restrict__ gy, const unsigned char* __restrict__ argmax,
                                               float* __restrict__ gx, int N, int C, int H, int W) {
    const int Ho = H / 2, Wo = W / 2;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * C * H * W) return;
    const int xx = t % W;
    const int yy = (t / W) % H;
    const int nc = t / (W * H);
    float g = 0.0f;
    const int i = yy / 2, j = xx / 2;
    if (i < Ho && j < Wo) {                    // outside: a row/column the floor dropped
        const int o = (nc * Ho + i) * Wo + j;
        if (argmax[o] == (yy % 2) * 2 + xx % 2) g = gy[o];
    }
    gx[t] = g;
}
