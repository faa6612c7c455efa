// GroupNorm + SiLU with the time-embedding add and the scale-shift in CUDA C++: forward and backward, NCHW and
// NHWC, fp32/bf16/fp16 with fp32 math (genfast/reference/group_norm.py is the specification; the same formulas as
// csrc/cpu/group_norm_silu.cpp). The implementation of the internal op genfast::cpp_group_norm_silu{,_backward}
// for CUDA tensors (the schema is defined in the CPU file).
//
// Both directions use one reduction kernel, `channel_sums`, that writes per-(b, c) partial sums of NSUMS values
// per element over a split of the spatial extent (grid (B·C channel tiles, splits): the split reduction keeps
// every SM busy when groups are large and B·C is small). Within a block the sums are reduced in fp32 by warp
// shuffles (NCHW: threads along space) or a fixed-order pass over shared memory (NHWC: threads along channels);
// a per-group `finalize` kernel then adds the partials in double, in a fixed order. No atomics: deterministic.
//
// Forward: sums (d, d²) of d = h − K (K = h at the group's first element, the pivot), then per group
// μ = Σd/N, var = Σd²/N − μ², rstd; per (b, c) the coefficients (t = K − add, μ, A = rstd·α, β) of
// y = silu(((x − t) − μ)·A + β), applied by an elementwise kernel.
// Backward: sums (dm, dm·x̂, x̂) = (P, Q, R) per (b, c); per group m1 = Σ_c α·P / N, m2 = Σ_c α·Q / N; the
// per-(b, c) gradients and dx = k1·dm − k2·((x − t) − μ) − k3 with k1 = rstd·α, k2 = rstd²·m2, k3 = rstd·m1.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../cpu/group_norm_silu.h"

namespace genfast {
namespace {

constexpr int kThreads = 256;       // threads of every block
constexpr int kTileC = 32;          // NHWC reduction: channels per block (threadIdx.x) ...
constexpr int kLanesS = kThreads / kTileC;  // ... and position lanes (threadIdx.y)
constexpr int kMinPerSplit = 1024;  // the least positions a split of the reduction covers
constexpr int kTargetBlocks = 1024; // the reduction splits space until the grid has about this many blocks

// Pointers and sizes every kernel reads. The per-(b, c) tables are fp32: add, scale, shift (B, C), w, bias (C,).
struct Params {
  int64_t B, C, G, CPG, S;
  const float *w, *bias, *add, *scale, *shift;
};

__device__ __forceinline__ int64_t channel_of(int64_t i, const Params& p, bool nhwc) {
  return nhwc ? i % p.C : (i / p.S) % p.C;
}

// Offset of (b, c, s) in x.
__device__ __forceinline__ int64_t offset(int64_t b, int64_t c, int64_t s, const Params& p, bool nhwc) {
  return nhwc ? (b * p.S + s) * p.C + c : (b * p.C + c) * p.S + s;
}

// h = x + add at the group's first element: the pivot K of the statistics.
template <typename T>
__device__ __forceinline__ float pivot(const T* x, int64_t b, int64_t g, const Params& p, bool nhwc) {
  if (p.S == 0) return 0.f;
  const int64_t c0 = g * p.CPG;
  return static_cast<float>(x[offset(b, c0, 0, p, nhwc)]) + p.add[b * p.C + c0];
}

__device__ __forceinline__ float sigmoid(float m) { return 1.f / (1.f + __expf(-m)); }

// The NSUMS values one element contributes to the reduction.
template <typename T>
struct StatsTerms {  // forward: (d, d²), d = x − t
  static constexpr int NSUMS = 2;
  const T* x;
  __device__ void operator()(int64_t off, float t, float, float, float, float, float* out) const {
    const float d = static_cast<float>(x[off]) - t;
    out[0] = d;
    out[1] = d * d;
  }
};

template <typename T>
struct GradTerms {  // backward: (dm, dm·x̂, x̂)
  static constexpr int NSUMS = 3;
  const T *x, *dy;
  bool silu;
  __device__ void operator()(int64_t off, float t, float mu, float rstd, float alpha, float beta,
                             float* out) const {
    const float xhat = ((static_cast<float>(x[off]) - t) - mu) * rstd;
    float dm = static_cast<float>(dy[off]);
    if (silu) {
      const float m = xhat * alpha + beta, s = sigmoid(m);
      dm *= s * (1.f + m * (1.f - s));
    }
    out[0] = dm;
    out[1] = dm * xhat;
    out[2] = xhat;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// partial[((b·C + c)·splits + split)·NSUMS + k] = Σ over the split's positions of term k, for one channel (NCHW,
// blockIdx.x = b·C + c) or kTileC channels (NHWC, blockIdx.x = b·ceil(C/kTileC) + tile).
template <typename Terms, bool NHWC>
__global__ void channel_sums(Terms terms, Params p, const float* mean, const float* rstd, int splits,
                             int64_t per_split, float* partial) {
  constexpr int NS = Terms::NSUMS;
  __shared__ float shared[NS][kThreads];
  const int split = blockIdx.y;
  const int64_t s0 = split * per_split, s1 = std::min<int64_t>(p.S, s0 + per_split);
  int64_t b, c;
  int lane_s, lanes;
  if (NHWC) {
    const int64_t tiles = (p.C + kTileC - 1) / kTileC;
    b = blockIdx.x / tiles;
    c = (blockIdx.x % tiles) * kTileC + threadIdx.x % kTileC;
    lane_s = threadIdx.x / kTileC;
    lanes = kLanesS;
  } else {
    b = blockIdx.x / p.C;
    c = blockIdx.x % p.C;
    lane_s = threadIdx.x;
    lanes = kThreads;
  }
  float acc[NS] = {};
  if (c < p.C) {
    const int64_t g = c / p.CPG, bc = b * p.C + c, bg = b * p.G + g;
    const float K = pivot(terms.x, b, g, p, NHWC);
    const float t = K - p.add[bc];
    const float mu = mean != nullptr ? mean[bg] - K : 0.f, r = rstd != nullptr ? rstd[bg] : 0.f;
    const float gain = 1.f + p.scale[bc];
    const float alpha = p.w[c] * gain, beta = p.bias[c] * gain + p.shift[bc];
    for (int64_t s = s0 + lane_s; s < s1; s += lanes) {
      float v[NS];
      terms(offset(b, c, s, p, NHWC), t, mu, r, alpha, beta, v);
      for (int k = 0; k < NS; ++k) acc[k] += v[k];
    }
  }
  if (NHWC) {
    // Lanes of one channel are threadIdx.x % kTileC + kTileC·y: add them in the order y = 0, 1, ...
    for (int k = 0; k < NS; ++k) shared[k][threadIdx.x] = acc[k];
    __syncthreads();
    if (lane_s == 0 && c < p.C) {
      for (int k = 0; k < NS; ++k) {
        float total = 0.f;
        for (int y = 0; y < kLanesS; ++y) total += shared[k][threadIdx.x + y * kTileC];
        partial[((b * p.C + c) * splits + split) * NS + k] = total;
      }
    }
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int k = 0; k < NS; ++k) {
      const float v = warp_sum(acc[k]);
      if (lane == 0) shared[k][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 0; k < NS; ++k) {
        float total = 0.f;
        for (int w = 0; w < kThreads / 32; ++w) total += shared[k][w];
        partial[((b * p.C + c) * splits + split) * NS + k] = total;
      }
    }
  }
}

// Σ over splits of partial sum k of channel bc, in double, in split order.
__device__ __forceinline__ double channel_total(const float* partial, int64_t bc, int splits, int ns, int k) {
  double total = 0.0;
  for (int sp = 0; sp < splits; ++sp) total += partial[(bc * splits + sp) * ns + k];
  return total;
}

// Forward, one thread per (b, g): mean, rstd and the per-(b, c) coefficients (t, μ, A, β) of the apply kernel.
template <typename T>
__global__ void finalize_forward(const T* x, Params p, const float* partial, int splits, double eps, bool nhwc,
                                 float* mean, float* rstd, float4* coef) {
  const int64_t bg = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (bg >= p.B * p.G) return;
  const int64_t b = bg / p.G, g = bg % p.G, N = p.CPG * p.S;
  double sum = 0.0, sumsq = 0.0;
  for (int64_t c = g * p.CPG; c < (g + 1) * p.CPG; ++c) {
    sum += channel_total(partial, b * p.C + c, splits, 2, 0);
    sumsq += channel_total(partial, b * p.C + c, splits, 2, 1);
  }
  const double m = N > 0 ? sum / N : 0.0, var = N > 0 ? fmax(sumsq / N - m * m, 0.0) : 0.0;
  const float mu = static_cast<float>(m), r = static_cast<float>(1.0 / sqrt(var + eps));
  const float K = pivot(x, b, g, p, nhwc);
  mean[bg] = K + mu;
  rstd[bg] = r;
  for (int64_t c = g * p.CPG; c < (g + 1) * p.CPG; ++c) {
    const int64_t bc = b * p.C + c;
    const float gain = 1.f + p.scale[bc];
    coef[bc] = make_float4(K - p.add[bc], mu, r * p.w[c] * gain, p.bias[c] * gain + p.shift[bc]);
  }
}

template <typename T>
__global__ void apply_forward(const T* x, T* y, Params p, const float4* coef, bool nhwc, bool silu, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bc = (i / (p.C * p.S)) * p.C + channel_of(i, p, nhwc);
    const float4 k = coef[bc];
    const float m = ((static_cast<float>(x[i]) - k.x) - k.y) * k.z + k.w;
    y[i] = static_cast<T>(silu ? m * sigmoid(m) : m);
  }
}

// Backward, one thread per (b, g): the per-(b, c) gradients (gain·Q, gain·P, dscale, dshift, dadd) and the dx
// coefficients (t, μ, k1, k2, k3) per (b, c).
template <typename T>
__global__ void finalize_backward(const T* x, Params p, const float* partial, int splits, const float* mean,
                                  const float* rstd, bool nhwc, float* grads, float* coef) {
  const int64_t bg = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (bg >= p.B * p.G) return;
  const int64_t b = bg / p.G, g = bg % p.G, N = p.CPG * p.S, BC = p.B * p.C;
  double m1 = 0.0, m2 = 0.0;
  for (int64_t c = g * p.CPG; c < (g + 1) * p.CPG; ++c) {
    const int64_t bc = b * p.C + c;
    const double alpha = double(p.w[c]) * (1.0 + p.scale[bc]);
    m1 += alpha * channel_total(partial, bc, splits, 3, 0);
    m2 += alpha * channel_total(partial, bc, splits, 3, 1);
  }
  m1 = N > 0 ? m1 / N : 0.0;
  m2 = N > 0 ? m2 / N : 0.0;
  const double r = rstd[bg];
  const float K = pivot(x, b, g, p, nhwc);
  for (int64_t c = g * p.CPG; c < (g + 1) * p.CPG; ++c) {
    const int64_t bc = b * p.C + c;
    const double P = channel_total(partial, bc, splits, 3, 0), Q = channel_total(partial, bc, splits, 3, 1),
                 R = channel_total(partial, bc, splits, 3, 2);
    const double gain = 1.0 + p.scale[bc], alpha = double(p.w[c]) * gain;
    grads[bc] = static_cast<float>(gain * Q);
    grads[BC + bc] = static_cast<float>(gain * P);
    grads[2 * BC + bc] = static_cast<float>(p.w[c] * Q + p.bias[c] * P);
    grads[3 * BC + bc] = static_cast<float>(P);
    grads[4 * BC + bc] = static_cast<float>(r * (alpha * P - p.S * m1 - R * m2));
    float* k = coef + bc * 5;
    k[0] = K - p.add[bc];
    k[1] = mean[bg] - K;
    k[2] = static_cast<float>(r * alpha);
    k[3] = static_cast<float>(r * r * m2);
    k[4] = static_cast<float>(r * m1);
  }
}

template <typename T>
__global__ void apply_backward(const T* x, const T* dy, T* dx, Params p, const float* rstd, const float* coef,
                               bool nhwc, bool silu, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / (p.C * p.S), c = channel_of(i, p, nhwc), bc = b * p.C + c;
    const float* k = coef + bc * 5;
    const float d = (static_cast<float>(x[i]) - k[0]) - k[1];
    float dm = static_cast<float>(dy[i]);
    if (silu) {
      const float r = rstd[b * p.G + c / p.CPG], gain = 1.f + p.scale[bc];
      const float m = d * r * (p.w[c] * gain) + (p.bias[c] * gain + p.shift[bc]), s = sigmoid(m);
      dm *= s * (1.f + m * (1.f - s));
    }
    dx[i] = static_cast<T>(k[2] * dm - k[3] * d - k[4]);
  }
}

// Σ_b of the (B, C) table rows in a fixed order (dweight, dbias), one thread per channel.
__global__ void sum_over_batch(const float* table, int64_t B, int64_t C, float* out) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) total += table[b * C + c];
  out[c] = static_cast<float>(total);
}

// The fp32 tables of Params (materialised: zeros or ones when absent), kept alive by the returned tensors.
struct Tables {
  at::Tensor w, bias, add, scale, shift;
};

at::Tensor fp32_or(const c10::optional<at::Tensor>& t, at::IntArrayRef shape, float fill, const at::Tensor& x) {
  if (t.has_value()) return t->to(at::kFloat).contiguous();
  const auto options = x.options().dtype(at::kFloat);
  return fill == 0.f ? at::zeros(shape, options) : at::ones(shape, options);
}

Params make_params(const GroupNormGeometry& geo, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                   const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                   const at::Tensor& x, Tables& keep) {
  keep = {fp32_or(weight, {geo.C}, 1.f, x), fp32_or(bias, {geo.C}, 0.f, x), fp32_or(add, {geo.B, geo.C}, 0.f, x),
          fp32_or(scale, {geo.B, geo.C}, 0.f, x), fp32_or(shift, {geo.B, geo.C}, 0.f, x)};
  return {geo.B, geo.C, geo.G, geo.CPG, geo.S, keep.w.const_data_ptr<float>(), keep.bias.const_data_ptr<float>(),
          keep.add.const_data_ptr<float>(), keep.scale.const_data_ptr<float>(), keep.shift.const_data_ptr<float>()};
}


// The reduction grid: (channel blocks, splits) and the positions per split.
struct ReduceGrid {
  int64_t blocks;
  int splits;
  int64_t per_split;
};

ReduceGrid reduce_grid(const GroupNormGeometry& geo) {
  const int64_t blocks = geo.nhwc ? geo.B * ((geo.C + kTileC - 1) / kTileC) : geo.B * geo.C;
  const int64_t max_splits = std::max<int64_t>(1, (geo.S + kMinPerSplit - 1) / kMinPerSplit);
  const int64_t wanted = std::max<int64_t>(1, (kTargetBlocks + blocks - 1) / std::max<int64_t>(blocks, 1));
  const int64_t splits = std::min(max_splits, wanted);
  const int64_t per_split = std::max<int64_t>(1, (geo.S + splits - 1) / splits);
  const int64_t used = geo.S > 0 ? (geo.S + per_split - 1) / per_split : 1;  // splits that cover some positions
  return {blocks, static_cast<int>(used), per_split};
}

template <typename Terms>
void launch_sums(const Terms& terms, const Params& p, const GroupNormGeometry& geo, const ReduceGrid& grid,
                 const float* mean, const float* rstd, float* partial, cudaStream_t stream) {
  if (grid.blocks == 0) return;
  const dim3 blocks(grid.blocks, grid.splits);
  if (geo.nhwc) {
    channel_sums<Terms, true><<<blocks, kThreads, 0, stream>>>(terms, p, mean, rstd, grid.splits, grid.per_split,
                                                               partial);
  } else {
    channel_sums<Terms, false><<<blocks, kThreads, 0, stream>>>(terms, p, mean, rstd, grid.splits, grid.per_split,
                                                                partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t elementwise_blocks(int64_t n) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(sms) * 32));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& add, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu) {
  const GroupNormGeometry geo = group_norm_geometry(x_in, weight, bias, add, scale, shift, num_groups,
                                                    "cpp_group_norm_silu");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_layout(x_in);
  Tables keep;
  const Params p = make_params(geo, weight, bias, add, scale, shift, x, keep);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x), mean = at::empty({geo.B, geo.G}, f32), rstd = at::empty({geo.B, geo.G}, f32);
  const ReduceGrid grid = reduce_grid(geo);
  at::Tensor partial = at::empty({geo.B * geo.C * grid.splits * 2}, f32);
  at::Tensor coef = at::empty({geo.B * geo.C * 4}, f32);
  const int64_t n = x.numel(), rows = geo.B * geo.G;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    launch_sums(StatsTerms<T>{xp}, p, geo, grid, nullptr, nullptr, partial.data_ptr<float>(), stream);
    if (rows > 0) {
      finalize_forward<T><<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          xp, p, partial.const_data_ptr<float>(), grid.splits, eps, geo.nhwc, mean.data_ptr<float>(),
          rstd.data_ptr<float>(), reinterpret_cast<float4*>(coef.data_ptr<float>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (n > 0) {
      apply_forward<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          xp, y.data_ptr<T>(), p, reinterpret_cast<const float4*>(coef.const_data_ptr<float>()), geo.nhwc, silu, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (!x.is_same(x_in)) y = at::empty_like(x_in).copy_(y);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, int64_t num_groups, bool silu) {
  const char* op = "cpp_group_norm_silu_backward";
  const GroupNormGeometry geo = group_norm_geometry(x_in, weight, bias, add, scale, shift, num_groups, op);
  check_backward_inputs(grad_y, x_in, mean_in, rstd_in, geo, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_layout(x_in);
  at::Tensor dy = grad_y;
  if (dy.strides() != x.strides() || dy.scalar_type() != x.scalar_type()) dy = at::empty_like(x).copy_(grad_y);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  Tables keep;
  const Params p = make_params(geo, weight, bias, add, scale, shift, x, keep);
  const auto f32 = x.options().dtype(at::kFloat);
  const ReduceGrid grid = reduce_grid(geo);
  const int64_t BC = geo.B * geo.C, n = x.numel(), rows = geo.B * geo.G;
  at::Tensor partial = at::empty({BC * grid.splits * 3}, f32);
  at::Tensor grads = at::empty({5, geo.B, geo.C}, f32);  // gain·Q, gain·P, dscale, dshift, dadd
  at::Tensor coef = at::empty({BC * 5}, f32);
  at::Tensor dx = at::empty_like(x), dw = at::empty({geo.C}, f32), db = at::empty({geo.C}, f32);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.const_data_ptr<T>(), *dyp = dy.const_data_ptr<T>();
    launch_sums(GradTerms<T>{xp, dyp, silu}, p, geo, grid, mean.const_data_ptr<float>(),
                rstd.const_data_ptr<float>(), partial.data_ptr<float>(), stream);
    if (rows > 0) {
      finalize_backward<T><<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          xp, p, partial.const_data_ptr<float>(), grid.splits, mean.const_data_ptr<float>(),
          rstd.const_data_ptr<float>(), geo.nhwc, grads.data_ptr<float>(), coef.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (n > 0) {
      apply_backward<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          xp, dyp, dx.data_ptr<T>(), p, rstd.const_data_ptr<float>(), coef.const_data_ptr<float>(), geo.nhwc, silu,
          n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (geo.C > 0) {
    const int64_t blocks = (geo.C + kThreads - 1) / kThreads;
    sum_over_batch<<<blocks, kThreads, 0, stream>>>(grads[0].const_data_ptr<float>(), geo.B, geo.C,
                                                    dw.data_ptr<float>());
    sum_over_batch<<<blocks, kThreads, 0, stream>>>(grads[1].const_data_ptr<float>(), geo.B, geo.C,
                                                    db.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!x.is_same(x_in)) dx = at::empty_like(x_in).copy_(dx);
  // Clones: the returned gradients must not share storage (views of `grads` would).
  return {dx, input_grad(dw, weight, x), input_grad(db, bias, x), input_grad(grads[4].clone(), add, x),
          input_grad(grads[2].clone(), scale, x), input_grad(grads[3].clone(), shift, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("cpp_group_norm_silu", &group_norm_silu_cuda);
  m.impl("cpp_group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

}  // namespace genfast
