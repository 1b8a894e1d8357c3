// crop_concat.cu -- U-Net's skip connections (paper Fig. 1, grey arrows; Section 2: "a
// concatenation with the correspondingly cropped feature map from the contracting path. The
// cropping is necessary due to the loss of border pixels in every convolution.")
//
// Shapes: skip (N, Cs, Hs, Ws), up (N, Cu, Hu, Wu) with Hs >= Hu, Ws >= Wu
//         -> y (N, Cs + Cu, Hu, Wu).
// The crop is centred: offset (oy, ox) = ((Hs - Hu) / 2, (Ws - Wu) / 2), computed by the launcher.
//
//   forward             y[n, c, i, j] = skip[n, c, oy + i, ox + j]   for c <  Cs
//                                     = up[n, c - Cs, i, j]          for c >= Cs
//   backward (skip)     gskip[n, c, a, b] = gy[n, c, a - oy, b - ox] inside the crop window, else 0
//   backward (up)       gup[n, c, i, j]   = gy[n, Cs + c, i, j]
//
// Thread mapping: one thread per element of the array being WRITTEN (y, gskip, gup), each a pure
// gather: no thread writes another's element, so no atomics and no separate zero-fill. Consecutive
// threads write consecutive addresses; the reads are consecutive too, within each row.

extern "C" __global__ void crop_concat_forward(const float* __restrict__ skip, const float* __restrict__ up,
                                               float* __restrict__ y, int N, int Cs, int Hs, int Ws,
                                               int Cu, int Hu, int Wu, int oy, int ox) {
    const int C = Cs + Cu;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * C * Hu * Wu) return;
    const int j = t % Wu;
    const int i = (t / Wu) % Hu;
    const int c = (t / (Wu * Hu)) % C;
    const int n = t / (Wu * Hu * C);
    y[t] = c < Cs ? skip[((n * Cs + c) * Hs + oy + i) * Ws + ox + j]
                  : up[((n * Cu + (c - Cs)) * Hu + i) * Wu + j];
}

extern "C" __global__ void crop_concat_backward_skip(const float* __restrict__ gy, float* __restrict__ gskip,
                                                     int N, int Cs, int Hs, int Ws, int Cu, int Hu, int Wu,
                                                     int oy, int ox) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Cs * Hs * Ws) return;
    const int b = t % Ws;
    const int a = (t / Ws) % Hs;
    const int c = (t / (Ws * Hs)) % Cs;
    const int n = t / (Ws * Hs * Cs);
    const int i = a - oy, j = b - ox;          // position inside the crop window, if it is inside
    float g = 0.0f;                            // pixels the crop cut away had no effect on y
    if (i >= 0 && i < Hu && j >= 0 && j < Wu) g = gy[((n * (Cs + Cu) + c) * Hu + i) * Wu + j];
    gskip[t] = g;
}

extern "C" __global__ void crop_concat_backward_up(const float* __restrict__ gy, float* __restrict__ gup,
                                                   int N, int Cs, int Cu, int Hu, int Wu) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * Cu * Hu * Wu) return;
    const int p = t % (Cu * Hu * Wu);          // offset inside one image's Cu channels
    const int n = t / (Cu * Hu * Wu);
    gup[t] = gy[(n * (Cs + Cu) + Cs) * Hu * Wu + p];  // image n's block of gy starts at channel Cs
}
