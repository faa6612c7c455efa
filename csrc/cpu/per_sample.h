// What the per-sample CPU ops (VAE, diffusion, gradient penalty) share: argument checks, layouts, the block
// loop and fp32 block loads/stores of fp32/bf16/fp16 tensors.
//
// Tensors have shape (B, ...) with D = numel / B elements per sample and the batch outermost in memory
// (contiguous or channels_last): they are indexed by memory position, sample b owning [b·D, (b + 1)·D). The work
// is split in blocks of at most kBlock elements of one sample, run in parallel with at::parallel_for; a block
// loads its operands as fp32 (bf16/fp16 converted with at::vec), computes in at::vec::Vectorized<float> and
// stores in the output dtype. Per-sample sums are reduced per block into partials (B, blocks), summed in a fixed
// order: results do not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "philox.h"

namespace genfast::cpu {

// Elements of one sample a block covers: a multiple of 64 (so a block's noise starts on a Philox counter).
constexpr int64_t kBlock = 2048;
// Elements below which a parallel_for chunk is not split further.
constexpr int64_t kGrainElements = 32768;

// (B, D) of a (B, ...) tensor.
struct Dims {
  int64_t batch, sample_numel;
  int64_t blocks() const { return (sample_numel + kBlock - 1) / kBlock; }
};

inline Dims dims(const at::Tensor& x) {
  const int64_t batch = x.size(0);
  return {batch, batch ? x.numel() / batch : 0};
}

// Checks that ``x`` is a CPU fp32/bf16/fp16 tensor with at least one dimension.
inline void check_samples(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16 (the cpp backend; use backend 'reference' for other dtypes), "
              "got ", dtype);
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-dim tensor");
}

// ``x`` itself when dense with the batch outermost in memory (contiguous or channels_last), else a contiguous
// copy (genfast._validation.batch_major).
inline at::Tensor batch_major(const at::Tensor& x) {
  if (x.is_contiguous()) return x;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return x;
  return x.contiguous();
}

// ``x`` (checked like ``check_samples`` and of ``ref``'s shape) in the memory layout of ``ref``, its dtype kept.
inline at::Tensor in_layout_of(const at::Tensor& x, const char* name, const at::Tensor& ref, const char* ref_name,
                               const char* op) {
  check_samples(x, name, op);
  TORCH_CHECK(x.sizes() == ref.sizes(), op, ": ", name, " must have shape ", ref.sizes(), " (from ", ref_name,
              "), got ", x.sizes());
  if (x.strides() == ref.strides()) return x;
  return at::empty_like(ref, x.options()).copy_(x);
}

// A per-sample vector (B,) (α, norms, ∂kl, …) as contiguous fp32 values.
inline std::vector<float> per_sample_values(const at::Tensor& v, int64_t batch, const char* name, const char* op) {
  TORCH_CHECK(v.device().is_cpu() && v.is_floating_point() && v.numel() == batch, op, ": ", name,
              " must be a floating CPU tensor of ", batch, " elements (one per sample), got ", v.scalar_type(),
              " of shape ", v.sizes(), " on ", v.device());
  const at::Tensor values = v.to(at::kFloat).contiguous();
  const float* data = values.data_ptr<float>();
  return std::vector<float>(data, data + batch);
}

// An input read as fp32 blocks.
class Input {
 public:
  explicit Input(const at::Tensor& t) : data_(static_cast<const char*>(t.data_ptr())), dtype_(t.scalar_type()) {}

  // fp32 values of elements [offset, offset + n): the tensor's own memory for fp32, else converted into ``buf``.
  const float* block(int64_t offset, int64_t n, float* buf) const {
    switch (dtype_) {
      case at::kFloat: return reinterpret_cast<const float*>(data_) + offset;
      case at::kBFloat16: return to_float(reinterpret_cast<const at::BFloat16*>(data_) + offset, n, buf);
      default: return to_float(reinterpret_cast<const at::Half*>(data_) + offset, n, buf);
    }
  }

 private:
  template <typename T>
  static const float* to_float(const T* src, int64_t n, float* dst) {
    using VecT = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + VecT::size() <= n; i += VecT::size()) {
      const auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + Vec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    return dst;
  }

  const char* data_;
  at::ScalarType dtype_;
};

// An output written from fp32 blocks: compute into ``buffer``, then ``commit``.
class Output {
 public:
  explicit Output(at::Tensor& t) : data_(static_cast<char*>(t.data_ptr())), dtype_(t.scalar_type()) {}

  // Where to compute elements [offset, offset + n): the tensor's own memory for fp32, else ``buf``.
  float* buffer(int64_t offset, float* buf) const {
    return dtype_ == at::kFloat ? reinterpret_cast<float*>(data_) + offset : buf;
  }

  // Writes the computed values ``values`` (from ``buffer``) of elements [offset, offset + n).
  void commit(int64_t offset, int64_t n, const float* values) const {
    switch (dtype_) {
      case at::kFloat: return;
      case at::kBFloat16: return from_float(values, n, reinterpret_cast<at::BFloat16*>(data_) + offset);
      default: return from_float(values, n, reinterpret_cast<at::Half*>(data_) + offset);
    }
  }

 private:
  template <typename T>
  static void from_float(const float* src, int64_t n, T* dst) {
    using VecT = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + VecT::size() <= n; i += VecT::size()) {
      at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size())).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }

  char* data_;
  at::ScalarType dtype_;
};

// A block: elements [col, col + n) of sample ``sample``, at memory offset ``offset``; ``index`` of the sample's
// ``Dims::blocks()`` blocks.
struct Block {
  int64_t sample, index, col, n, offset;
};

// Runs fn(Block) over every block of every sample, in parallel.
template <typename F>
void for_each_block(const Dims& d, F&& fn) {
  if (d.batch == 0 || d.sample_numel == 0) return;
  const int64_t blocks = d.blocks();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(d.sample_numel, kBlock));
  at::parallel_for(0, d.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / blocks, index = task % blocks, col = index * kBlock;
      fn(Block{sample, index, col, std::min(kBlock, d.sample_numel - col), sample * d.sample_numel + col});
    }
  });
}

// Runs fn(i, count) over [0, n) in steps of Vec::size(), the last step with the remaining count.
template <typename F>
inline void for_each_vec(int64_t n, F&& fn) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) fn(i, Vec::size());
  if (i < n) fn(i, n - i);
}

// A stack buffer for one block of fp32 values (room for the noise of a whole block of Philox counters).
struct alignas(64) BlockBuffer {
  float data[kBlock];
};
static_assert(kBlock % 64 == 0, "a block must hold whole chunks of Philox noise (philox_normal)");

// The fp32 ε of a block: ``noise`` when given, else the Philox stream of ``key`` (into ``buf``).
inline const float* block_noise(const Input* noise, const PhiloxKey& key, const Block& blk, float* buf) {
  if (noise != nullptr) return noise->block(blk.offset, blk.n, buf);
  philox_normal(key, blk.sample, blk.col, blk.n, buf);
  return buf;
}

// Checks the per-sample size allowed by the noise stream.
inline void check_noise_numel(const Dims& d, const char* op) {
  TORCH_CHECK(d.sample_numel <= kMaxNoiseSampleNumel, op, ": in-kernel noise takes at most ", kMaxNoiseSampleNumel,
              " elements per sample, got ", d.sample_numel);
}

// Σ of the per-block partials (B, blocks) of each sample, in block order.
inline std::vector<float> sum_blocks(const std::vector<float>& partials, const Dims& d) {
  std::vector<float> sums(d.batch, 0.0f);
  const int64_t blocks = d.blocks();
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t k = 0; k < blocks; ++k) sums[b] += partials[b * blocks + k];
  }
  return sums;
}

// Horizontal sum of a vector of fp32 partial sums.
inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

}  // namespace genfast::cpu
