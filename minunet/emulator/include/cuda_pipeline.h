// cuda_pipeline.h -- the emulator's pipeline primitives; see cuda_pipeline_primitives.h.
// (CUDA's header also offers the nvcuda::experimental::pipeline class; kernels here use the
// primitives.)
#pragma once
#include <cuda_pipeline_primitives.h>
