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
// Layout. Both kernels read features channels-last, (N, H, W, C), and write the output as
// (R, oh, ow, C). One thread computes one output element (r, ph, pw, c) and the channel index
// varies fastest between threads, so the 32 threads of a warp read 32 neighbouring channels of
// the same feature-map position: each load is one contiguous, coalesced transaction. (With the
// usual (N, C, H, W) layout the 32 threads would read 32 different planes.) In the backward
// pass the same argument makes the warp's 32 atomicAdds land on one contiguous cache line.
//
// Semantics are exactly those of ops/roi_align.py (and of torchvision's kernels):
//   * RoI start/size in the "sampling frame" where the value of cell j sits at j: multiply
//     by spatial_scale and subtract 0.5 when aligned (the half-pixel shift);
//   * a point outside [-1, H] x [-1, W] contributes 0; inside it is clamped to the map;
//   * avg divides by max(gh * gw, 1); max keeps the best point (first one on ties) and stores
//     its index in `argmax`, so that the backward pass need not search again.

#if defined(ROI_USE_FP16)
#include <cuda_fp16.h>
#endif
#if defined(ROI_USE_BF16)
#include <cuda_bf16.h>
#endif

typedef SCALAR_T scalar_t;
typedef ACC_T acc_t;

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
    t.inside = !(coord < (acc_t)-1 || coord > (acc_t)size);
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

// Output element i = ((r * pooled_h + ph) * pooled_w + pw) * channels + c.
__device__ __forceinline__ void unravel(long long i, int channels, int pooled_h, int pooled_w,
                                        long long& r, int& ph, int& pw, int& c) {
    c = (int)(i % channels);
    long long t = i / channels;
    pw = (int)(t % pooled_w);
    t /= pooled_w;
    ph = (int)(t % pooled_h);
    r = t / pooled_h;
}

// ---- forward -------------------------------------------------------------------------------
extern "C" __global__ void roi_align_forward(
    const scalar_t* __restrict__ input,  // (N, H, W, C) channels-last
    const acc_t* __restrict__ rois,      // (R, 5) [batch_index, x1, y1, x2, y2]
    scalar_t* __restrict__ output,       // (R, oh, ow, C)
    int* __restrict__ argmax,            // (R, oh, ow, C); written only when use_max
    const long long total,               // R * oh * ow * C
    const int height, const int width, const int channels,
    const int pooled_h, const int pooled_w, const acc_t spatial_scale,
    const int sampling_ratio, const int aligned, const int use_max) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r;
        int ph, pw, c;
        unravel(i, channels, pooled_h, pooled_w, r, ph, pw, c);
        const RoiGeometry g = roi_geometry(rois + r * 5, spatial_scale, pooled_h, pooled_w,
                                           sampling_ratio, aligned);
        // this thread's channel of this RoI's image; position (y, x) is at (y * W + x) * C
        const scalar_t* image = input + (long long)g.batch * height * width * channels + c;

        acc_t sum = 0, best = 0;
        int best_index = -1;
        for (int iy = 0; iy < g.grid_h; ++iy) {
            const Taps ty = bilinear_taps(sample_coord(g.y0, g.bin_h, ph, iy, g.grid_h), height);
            const scalar_t* row_lo = image + (long long)ty.lo * width * channels;
            const scalar_t* row_hi = image + (long long)ty.hi * width * channels;
            for (int ix = 0; ix < g.grid_w; ++ix) {
                const Taps tx = bilinear_taps(sample_coord(g.x0, g.bin_w, pw, ix, g.grid_w), width);
                acc_t value = 0;  // a point outside the map counts, with value 0
                if (ty.inside && tx.inside) {
                    const long long col_lo = (long long)tx.lo * channels;
                    const long long col_hi = (long long)tx.hi * channels;
                    value = (ty.w_lo * tx.w_lo) * to_acc(row_lo[col_lo])
                          + (ty.w_lo * tx.w_hi) * to_acc(row_lo[col_hi])
                          + (ty.w_hi * tx.w_lo) * to_acc(row_hi[col_lo])
                          + (ty.w_hi * tx.w_hi) * to_acc(row_hi[col_hi]);
                }
                sum += value;
                if (best_index < 0 || value > best) {
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
__device__ __forceinline__ void scatter_point(acc_t* image, const Taps& ty, const Taps& tx,
                                              int width, int channels, acc_t grad) {
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
            if (weight != (acc_t)0) {  // integer coordinates and borders: skip the no-op atomics
                atomicAdd(image + ((long long)rows[a] * width + cols[b]) * channels,
                          grad * weight);
            }
        }
    }
}

extern "C" __global__ void roi_align_backward(
    const scalar_t* __restrict__ grad_output,  // (R, oh, ow, C)
    const acc_t* __restrict__ rois,            // (R, 5)
    const int* __restrict__ argmax,            // (R, oh, ow, C); read only when use_max
    acc_t* __restrict__ grad_input,            // (N, H, W, C), zero-initialised
    const long long total,
    const int height, const int width, const int channels,
    const int pooled_h, const int pooled_w, const acc_t spatial_scale,
    const int sampling_ratio, const int aligned, const int use_max) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r;
        int ph, pw, c;
        unravel(i, channels, pooled_h, pooled_w, r, ph, pw, c);
        const RoiGeometry g = roi_geometry(rois + r * 5, spatial_scale, pooled_h, pooled_w,
                                           sampling_ratio, aligned);
        acc_t* image = grad_input + (long long)g.batch * height * width * channels + c;
        const acc_t grad = to_acc(grad_output[i]);

        if (use_max) {
            const int k = argmax[i];
            if (k < 0) continue;  // the bin had no sampling point: no gradient
            const int iy = k / g.grid_w, ix = k % g.grid_w;
            const Taps ty = bilinear_taps(sample_coord(g.y0, g.bin_h, ph, iy, g.grid_h), height);
            const Taps tx = bilinear_taps(sample_coord(g.x0, g.bin_w, pw, ix, g.grid_w), width);
            scatter_point(image, ty, tx, width, channels, grad);
        } else {
            const int count = g.grid_h * g.grid_w > 1 ? g.grid_h * g.grid_w : 1;
            const acc_t grad_per_point = grad / (acc_t)count;
            for (int iy = 0; iy < g.grid_h; ++iy) {
                const Taps ty = bilinear_taps(sample_coord(g.y0, g.bin_h, ph, iy, g.grid_h), height);
                for (int ix = 0; ix < g.grid_w; ++ix) {
                    const Taps tx = bilinear_taps(sample_coord(g.x0, g.bin_w, pw, ix, g.grid_w), width);
                    scatter_point(image, ty, tx, width, channels, grad_per_point);
                }
            }
        }
    }
}
