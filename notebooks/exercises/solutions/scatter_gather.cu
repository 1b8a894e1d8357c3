// Exercise 03.2: max-pooling's backward pass as a gather. SOLUTION.
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
#define ONE_THREAD_PER_INPUT 1

extern "C" __global__ void pool_backward(const float* __restrict__ gy, const unsigned char* __restrict__ argmax,
                                         float* __restrict__ gx, int NC, int H, int W) {
    const int Ho = H / 2, Wo = W / 2;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= NC * H * W) return;
    const int xx = t % W, yy = (t / W) % H, nc = t / (W * H);
    const int i = yy / 2, j = xx / 2;
    float g = 0.0f;
    if (i < Ho && j < Wo) {                          // else: a row or column the floor dropped
        const int o = (nc * Ho + i) * Wo + j;        // my window
        if (argmax[o] == (yy % 2) * 2 + xx % 2) g = gy[o];
    }
    gx[t] = g;                                       // every element written once, zeros included
}
