// Just enough of CUDA to compile mrcnn_edu/ops/roi_align.cu as plain C++ on a CPU.
//
// Why: the CuPy kernel's arithmetic (RoI geometry, sampling points, bilinear taps, arg-max,
// the grid-stride loop, the channels-last indexing) can then be checked against the PyTorch
// path on any machine, not only on the rare one with a GPU. What it cannot check is left to
// tests/test_roi_align_cuda.py on a real GPU: NVRTC, half types, atomics racing, streams.
//
// Used as:  g++ -x c++ -include cuda_shim.h -DSCALAR_T=float -DACC_T=float roi_align.cu
#pragma once
#include <cmath>

using std::ceil;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct emulated_dim3 {
    unsigned int x, y, z;
};
// CUDA's built-in launch coordinates: globals that the host sets before each emulated thread.
static emulated_dim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};
static emulated_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};

// Threads run one after another here, so an atomic add is an ordinary add.
template <typename T>
inline T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}

extern "C" void emulated_launch_coordinates(unsigned int block, unsigned int thread,
                                            unsigned int block_dim, unsigned int grid_dim) {
    blockIdx.x = block;
    threadIdx.x = thread;
    blockDim.x = block_dim;
    gridDim.x = grid_dim;
}
