// What the CPU GroupNorm + SiLU forward (group_norm_silu.cpp) and backward (group_norm_silu_backward.cpp) share:
// fp32 views of spans of x, y, dy, dx, vector helpers, the per-channel tables of a problem and the NHWC
// per-channel running sums. Math in fp32 with at::vec::Vectorized; bf16/fp16 spans are converted to fp32 in a
// scratch buffer.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "group_norm_silu.h"

namespace genfast::group_norm_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t BLOCK = 1024;           // elements summed in fp32 before the partial sum is added in double
constexpr int64_t NHWC_BLOCK = 64;        // positions summed in fp32 per channel before adding in double
constexpr int64_t TASK_ELEMENTS = 32768;  // about the least work per parallel task

// ---- fp32 views of spans of x, y, dy, dx ---------------------------------------------------------------------
template <typename T>
const float* read_span(const T* src, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    at::vec::convert(src, scratch, n);
    return scratch;
  }
}

template <typename T>
float* write_span(T* dst, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return scratch;
  }
}

template <typename T>
void commit_span(T* dst, const float* scratch, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    at::vec::convert(scratch, dst, n);
  }
}

inline double hsum(const Vec& v) {
  float lanes[kVec];
  v.store(lanes);
  double total = 0.0;
  for (int64_t i = 0; i < kVec; ++i) total += lanes[i];
  return total;
}

// Per-channel constants of a span: one value for a whole span (NCHW: a span is one channel) or one per element
// (NHWC: a span is one position, its elements are the channels).
struct Uniform {
  Vec v;
  explicit Uniform(float value) : v(value) {}
  Vec at(int64_t) const { return v; }
  Vec at(int64_t, int64_t) const { return v; }
};

struct PerElement {
  const float* p;
  Vec at(int64_t i) const { return Vec::loadu(p + i); }
  Vec at(int64_t i, int64_t count) const { return Vec::loadu(p + i, count); }
};

inline Vec sigmoid(const Vec& m) {
  const Vec one(1.f);
  return one / (one + m.neg().exp_u20());
}

// Everything the kernels read, as fp32 (B, C) tables (weight/bias as (C,)), plus the geometry.
struct Problem : GroupNormGeometry {
  std::vector<float> w, bias, add, gain, shift;  // gain = 1 + scale
};

inline std::vector<float> table(const c10::optional<at::Tensor>& t, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (t.has_value()) {
    at::Tensor f = t->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + n, out.begin());
  }
  return out;
}

inline Problem make_problem(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                            const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                            int64_t num_groups, const char* op) {
  Problem p{group_norm_geometry(x, weight, bias, add, scale, shift, num_groups, op)};
  const int64_t B = p.B, C = p.C;
  p.w = table(weight, C, 1.f);
  p.bias = table(bias, C, 0.f);
  p.add = table(add, B * C, 0.f);
  p.gain = table(scale, B * C, 0.f);
  for (float& g : p.gain) g += 1.f;
  p.shift = table(shift, B * C, 0.f);
  return p;
}

// Per-channel running sums over positions: fp32 for NHWC_BLOCK positions, then added into double.
struct ChannelSums {
  int64_t C;
  std::vector<float> part;
  std::vector<double> total;
  int64_t count = 0;
  ChannelSums(int64_t channels, int64_t sums) : C(channels), part(channels * sums, 0.f), total(channels * sums, 0.0) {}
  float* sums(int64_t k) { return part.data() + k * C; }
  void step() {
    if (++count % NHWC_BLOCK == 0) flush();
  }
  void flush() {
    for (size_t i = 0; i < part.size(); ++i) total[i] += part[i];
    std::fill(part.begin(), part.end(), 0.f);
  }
};

// acc[c] += v[c] over a span of channels (vectorised; v already masked).
inline void accumulate(float* acc, int64_t i, const Vec& v, int64_t count) {
  if (count == kVec) {
    (Vec::loadu(acc + i) + v).store(acc + i);
  } else {
    (Vec::loadu(acc + i, count) + v).store(acc + i, count);
  }
}

// The statistics pivot of each group of one NHWC sample: h = x + add at position 0 in the group's first channel
// (0 when there are no positions).
template <typename T>
std::vector<float> nhwc_pivots(const T* xb, const float* add, int64_t C, int64_t G, int64_t CPG, int64_t S,
                               float* scratch) {
  std::vector<float> K(G, 0.f);
  if (S > 0) {
    const float* x0 = read_span(xb, C, scratch);
    for (int64_t g = 0; g < G; ++g) K[g] = x0[g * CPG] + add[g * CPG];
  }
  return K;
}

}  // namespace genfast::group_norm_cpu
