// Exercise 03.2: max-pooling's backward pass as a gather.
//
// pool_backward computes gx (NC, H, W) from gy (NC, H/2, W/2) and argmax (NC, H/2, W/2), one byte
// per window (0..3 = dy * 2 + dx of the window's maximum, as minunet's forward pass stores it):
// each window passes its gradient to its maximum pixel, every other pixel gets 0 (also the pixels
// of an odd last row or column, which no window contains).
//
// This version SCATTERS: one thread per output window writes gx at its argmax. It only writes a
// quarter of gx, so the other pixels keep whatever the memory held (the check fills gx with NaN
// first, as the emulator fills fresh shared memory: on a GPU it would be stale numbers).
// Rewrite it as a GATHER, as minunet's kernel does (notebook 03): one thread per INPUT pixel,
// which finds its window, compares the window's argmax with its own position, and writes gy or 0.
// Every element of gx is then written exactly once, by one thread, zeros included. Set
// ONE_THREAD_PER_INPUT to 1 so that check("scatter_gather") launches one thread per gx element.
#define ONE_THREAD_PER_INPUT 0

extern "C" __global__ void pool_backward(const float* __restrict__ gy, const unsigned char* __restrict__ argmax,
                                         float* __restrict__ gx, int NC, int H, int W) {
    const int Ho = H / 2, Wo = W / 2;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= NC * Ho * Wo) return;
    const int j = t % Wo, i = (t / Wo) % Ho, nc = t / (Wo * Ho);
    const int a = argmax[t];
    gx[(nc * H + 2 * i + a / 2) * W + 2 * j + a % 2] = gy[t];
}
