// RoIAlign forward and backward as CUDA kernels (Mask R-CNN §3 "RoIAlign", Figure 3).
//
//   "We use bilinear interpolation to compute the exact values of the input features at four
//    regularly sampled locations in each RoI bin, and aggregate the result (using max or
//    average)."  -- §3
//
// Compiled at run time by cupy.RawModule (see roi_align_cupy.py), once per dtype, with
//   -DSCALAR_T=<storage type>  float | double | __half | __nv_bfloat16
//   -DACC_T=<accumulation type> float (double for double inputs)
// so every product and sum below happens in ACC_T, whatever the storage type.
//
// Layout. One thread computes one output element and consecutive threads (a warp's 32) take
// consecutive elements, so the order of the output decides which memory a warp touches:
//   * channels-last features (a torch.channels_last input, as a channels-last network makes):
//     output (R, oh, ow, C), channel fastest. The 32 threads read 32 neighbouring channels of
//     the same feature-map position: each tap is one contiguous, coalesced load, and in the
//     backward pass the warp's 32 atomicAdds land on one contiguous cache line.
//   * standard (N, C, H, W) features: output (R, C, oh, ow), pw fastest (torchvision's order).
//     Neighbouring threads sample neighbouring bins of one plane, which share cache lines. No
//     copy of the feature map into the other layout is ever made: that copy alone costs as much
//     memory traffic as the whole forward pass for large maps.
// The features (and grad_input) are addressed through their four strides, so one kernel
// serves both layouts; `channels_fastest` picks the output order.
//
// Index arithmetic. Turning a thread's flat index into (r, c, ph, pw) takes three divisions
// and three remainders, and a GPU has no 64-bit integer divider: each 64-bit one is a software
// routine of dozens of instructions, run by every thread. So the source is compiled twice,
// -DINDEX_T=int and -DINDEX_T="long long", and the wrapper picks 32 bits whenever every index
// fits: under 2^30 outputs (the grid-stride loop's i + stride must not overflow either) and
// 2^31 feature elements. On an H200 the forward for 512 RoIs -> 14x14 went from 1.54 to 1.04 ms
// with it (docs/gpu.md; one run each).

// Semantics are exactly those of ops/roi_align.py (and of torchvision's kernels):
//   * RoI start/size in the "sampling frame" where the value of cell j sits at j: multiply
//     by spatial_scale and subtract 0.5 when aligned (the half-pixel shift);
//   * a point outside [-1, H] x [-1, W] contributes 0; inside it is clamped to the map;
//   * avg divides by max(gh * gw, 1); max keeps the best point (first one on ties; the first
//     NaN if there is one) and stores its index in `argmax`, so that the backward pass need
//     not search again.

#if defined(ROI_USE_FP16)
#include <cuda_fp16.h>
#endif
#if defined(ROI_USE_BF16)
#include <cuda_bf16.h>
#endif

typedef SCALAR_T scalar_t;
typedef ACC_T acc_t;
#ifndef INDEX_T
#define INDEX_T long long
#endif
typedef INDEX_T index_t;  // flat indices, strides and offsets

// ---- storage <-> accumulation conversions -------------------------------------------------
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
#if defined(ROI_USE_FP16)
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
#endif
#if defined(ROI_USE_BF16)
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
#endif

// ---- one RoI: where its bins are and how many points each bin samples ----------------------
struct RoiGeometry {
    int batch;          // image index in the batch
    acc_t y0, x0;       // top-left corner in the sampling frame
    acc_t bin_h, bin_w; // bin size in feature cells (no rounding anywhere)
    int grid_h, grid_w; // sampling points per bin along y and x
};

__device__ __forceinline__ RoiGeometry roi_geometry(const acc_t* roi, acc_t spatial_scale,
                                                    int pooled_h, int pooled_w,
                                                    int sampling_ratio, int aligned) {
    RoiGeometry g;
    g.batch = (int)roi[0];  // validated on the host: an integer in [0, N)
    const acc_t offset = aligned ? (acc_t)0.5 : (acc_t)0.0;
    g.x0 = roi[1] * spatial_scale - offset;
    g.y0 = roi[2] * spatial_scale - offset;
    acc_t roi_w = (roi[3] * spatial_scale - offset) - g.x0;
    acc_t roi_h = (roi[4] * spatial_scale - offset) - g.y0;
    if (!aligned) {  // legacy behaviour: every RoI at least one cell wide and tall
        roi_w = roi_w > (acc_t)1 ? roi_w : (acc_t)1;
        roi_h = roi_h > (acc_t)1 ? roi_h : (acc_t)1;
    }
    g.bin_h = roi_h / pooled_h;
    g.bin_w = roi_w / pooled_w;
    if (sampling_ratio > 0) {
        g.grid_h = sampling_ratio;
        g.grid_w = sampling_ratio;
    } else {  // adaptive: about one point per feature cell; none for an empty aligned RoI
        const int gh = (int)ceil(roi_h / pooled_h);
        const int gw = (int)ceil(roi_w / pooled_w);
        g.grid_h = gh > 0 ? gh : 0;
        g.grid_w = gw > 0 ? gw : 0;
    }
    return g;
}

// ---- bilinear interpolation, one axis at a time --------------------------------------------
// The four weights of a bilinear sample are products of two 1-D "taps": rows (lo, hi) with
// weights (1 - ly, ly) and columns likewise. An outside point has `inside == false`.
struct Taps {
    int lo, hi;
    acc_t w_lo, w_hi;
    bool inside;
};

__device__ __forceinline__ Taps bilinear_taps(acc_t coord, int size) {
    Taps t;
    t.inside = coord >= (acc_t)-1 && coord <= (acc_t)size;  // a NaN is outside
    acc_t c = coord > (acc_t)0 ? coord : (acc_t)0;              // clamp to [0, size - 1]
    c = c < (acc_t)(size - 1) ? c : (acc_t)(size - 1);
    t.lo = (int)c;                                              // floor, since c >= 0
    t.hi = t.lo + 1 < size ? t.lo + 1 : size - 1;
    const acc_t frac = c - (acc_t)t.lo;
    t.w_lo = (acc_t)1 - frac;
    t.w_hi = frac;
    return t;
}

// Sampling coordinate of point i of bin p (same expression and order as the PyTorch path).
__device__ __forceinline__ acc_t sample_coord(acc_t start, acc_t bin, int p, int i, int grid) {
    return start + (acc_t)p * bin + ((acc_t)i + (acc_t)0.5) * bin / (acc_t)grid;
}

// Output element i -> (r, c, ph, pw): i = ((r * oh + ph) * ow + pw) * C + c when channels are
// fastest, i = ((r * C + c) * oh + ph) * ow + pw otherwise.
__device__ __forceinline__ void unravel(index_t i, int channels, int pooled_h, int pooled_w,
                                        int channels_fastest,
                                        index_t& r, int& c, int& ph, int& pw) {
    if (channels_fastest) {
        c = (int)(i % channels);
        index_t t = i / channels;
        pw = (int)(t % pooled_w);
        t /= pooled_w;
        ph = (int)(t % pooled_h);
        r = t / pooled_h;
    } else {
        pw = (int)(i % pooled_w);
        index_t t = i / pooled_w;
        ph = (int)(t % pooled_h);
        t /= pooled_h;
        c = (int)(t % channels);
        r = t / channels;
    }
}

// The features of one layout: position (y, x) of one (image, channel) plane is at
// plane[y * stride_h + x * stride_w].
struct Strides {
    index_t n, c, h, w;
};

// ---- forward -------------------------------------------------------------------------------
extern "C" __global__ void roi_align_forward(
    const scalar_t* __restrict__ input,  // (N, C, H, W) features, strides below
    const acc_t* __restrict__ rois,      // (R, 5) [batch_index, x1, y1, x2, y2]
    scalar_t* __restrict__ output,       // (R, oh, ow, C) or (R, C, oh, ow), see unravel
    int* __restrict__ argmax,            // same order as output; written only when use_max
    const index_t total,                 // R * C * oh * ow
    const int height, const int width, const int channels,
    const index_t stride_n, const index_t stride_c, const index_t stride_h,
    const index_t stride_w, const int channels_fastest,
    const int pooled_h, const int pooled_w, const acc_t spatial_scale,
    const int sampling_ratio, const int aligned, const int use_max) {
    const Strides s = {stride_n, stride_c, stride_h, stride_w};
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (index_t)blockDim.x * gridDim.x) {
        index_t r;
        int c, ph, pw;
        unravel(i, channels, pooled_h, pooled_w, channels_fastest, r, c, ph, pw);
        const RoiGeometry g = roi_geometry(rois + r * 5, spatial_scale, pooled_h, pooled_w,
                                           sampling_ratio, aligned);
        // this thread's (image, channel) plane
        const scalar_t* plane = input + g.batch * s.n + c * s.c;

        acc_t sum = 0, best = 0;
        int best_index = -1;
        for (int iy = 0; iy < g.grid_h; ++iy) {
            const Taps ty = bilinear_taps(sample_coord(g.y0, g.bin_h, ph, iy, g.grid_h), height);
            const scalar_t* row_lo = plane + ty.lo * s.h;
            const scalar_t* row_hi = plane + ty.hi * s.h;
            for (int ix = 0; ix < g.grid_w; ++ix) {
                const Taps tx = bilinear_taps(sample_coord(g.x0, g.bin_w, pw, ix, g.grid_w), width);
                acc_t value = 0;  // a point outside the map counts, with value 0
                if (ty.inside && tx.inside) {
                    const index_t col_lo = tx.lo * s.w;
                    const index_t col_hi = tx.hi * s.w;
                    value = (ty.w_lo * tx.w_lo) * to_acc(row_lo[col_lo])
                          + (ty.w_lo * tx.w_hi) * to_acc(row_lo[col_hi])
                          + (ty.w_hi * tx.w_lo) * to_acc(row_hi[col_lo])
                          + (ty.w_hi * tx.w_hi) * to_acc(row_hi[col_hi]);
                }
                sum += value;
                // the first NaN wins and stays (value != value: NaN), as torch's max and amax
                // propagate NaN; `value > best` alone is false for NaN and would hide it
                if (best_index < 0 || value > best || (value != value && best == best)) {
                    best = value;
                    best_index = iy * g.grid_w + ix;
                }
            }
        }
        if (use_max) {
            store(output + i, best_index >= 0 ? best : (acc_t)0);  // no point at all -> 0
            argmax[i] = best_index;
        } else {
            const int count = g.grid_h * g.grid_w > 1 ? g.grid_h * g.grid_w : 1;
            store(output + i, sum / (acc_t)count);
        }
    }
}

// ---- backward ------------------------------------------------------------------------------
// d output / d input is the bilinear weight of each tap: scatter grad * weight to the four
// taps of every sampling point (avg) or of the arg-max point only (max). Different output
// elements share taps, hence atomicAdd; grad_input is ACC_T (fp32 for half types) so that the
// sums are exact enough and fp32 atomics can be used.
__device__ __forceinline__ void scatter_point(acc_t* plane, const Taps& ty, const Taps& tx,
                                              const Strides& s, acc_t grad) {
    if (!(ty.inside && tx.inside)) return;
    const int rows[2] = {ty.lo, ty.hi};
    const int cols[2] = {tx.lo, tx.hi};
    const acc_t wy[2] = {ty.w_lo, ty.w_hi};
    const acc_t wx[2] = {tx.w_lo, tx.w_hi};
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            const acc_t weight = wy[a] * wx[b];
            // integer coordinates and borders: skip the no-op atomics. Unlike the PyTorch path and
            // torchvision, an inf / nan incoming gradient then leaves these taps 0, not nan
            if (weight != (acc_t)0) {
                atomicAdd(plane + rows[a] * s.h + cols[b] * s.w, grad * weight);
            }
        }
    }
}

extern "C" __global__ void roi_align_backward(
    const scalar_t* __restrict__ grad_output,  // same order as the forward's output
    const acc_t* __restrict__ rois,            // (R, 5)
    const int* __restrict__ argmax,            // read only when use_max
    acc_t* __restrict__ grad_input,            // (N, C, H, W), strides below, zero-initialised
    const index_t total,
    const int height, const int width, const int channels,
    const index_t stride_n, const index_t stride_c, const index_t stride_h,
    const index_t stride_w, const int channels_fastest,
    const int pooled_h, const int pooled_w, const acc_t spatial_scale,
    const int sampling_ratio, const int aligned, const int use_max) {
    const Strides s = {stride_n, stride_c, stride_h, stride_w};
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (index_t)blockDim.x * gridDim.x) {
        index_t r;
        int c, ph, pw;
        unravel(i, channels, pooled_h, pooled_w, channels_fastest, r, c, ph, pw);
        const RoiGeometry g = roi_geometry(rois + r * 5, spatial_scale, pooled_h, pooled_w,
                                           sampling_ratio, aligned);
        acc_t* plane = grad_input + g.batch * s.n + c * s.c;
        const acc_t grad = to_acc(grad_output[i]);

        if (use_max) {
            const int k = argmax[i];
            if (k < 0) continue;  // the bin had no sampling point: no gradient
            const int iy = k / g.grid_w, ix = k % g.grid_w;
            const Taps ty = bilinear_taps(sample_coord(g.y0, g.bin_h, ph, iy, g.grid_h), height);
            const Taps tx = bilinear_taps(sample_coord(g.x0, g.bin_w, pw, ix, g.grid_w), width);
            scatter_point(plane, ty, tx, s, grad);
        } else {
            const int count = g.grid_h * g.grid_w > 1 ? g.grid_h * g.grid_w : 1;
            const acc_t grad_per_point = grad / (acc_t)count;
            for (int iy = 0; iy < g.grid_h; ++iy) {
                const Taps ty = bilinear_taps(sample_coord(g.y0, g.bin_h, ph, iy, g.grid_h), height);
                for (int ix = 0; ix < g.grid_w; ++ix) {
                    const Taps tx = bilinear_taps(sample_coord(g.x0, g.bin_w, pw, ix, g.grid_w), width);
                    scatter_point(plane, ty, tx, s, grad_per_point);
                }
            }
        }
    }
}
