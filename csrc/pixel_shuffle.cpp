// The fastdrn_ext library: the pixel shuffle op schemas, their input checks and output
// allocation (shared with the CUDA kernels), and the CPU kernels. The CUDA kernels register
// themselves in pixel_shuffle_cuda.cu; autograd and the fake (shape-only) implementations are
// registered from Python, in fastdrn/extension.py.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include "pixel_shuffle.h"

// `import fastdrn._C` (the module setup.py builds) loads this library and so runs the
// registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fastdrn {

ShuffleCall prepare_shuffle(const at::Tensor& x, int64_t factor, bool to_shuffled, const char* op) {
  if (op == nullptr) op = to_shuffled ? "pixel_shuffle" : "pixel_unshuffle";
  const char* factor_name = to_shuffled ? "upscale_factor" : "downscale_factor";
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be a 4-D tensor (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(factor >= 1, op, ": ", factor_name, " must be >= 1, got ", factor);
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   op, ": x has dtype ", dtype, "; supported: float16, bfloat16, float32, float64");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), s = factor;

  ShuffleShape<int64_t> shape{};
  std::vector<int64_t> out_sizes;
  if (to_shuffled) {
    // Two divisions rather than c % (s * s): s * s may overflow for an absurd factor.
    TORCH_CHECK_VALUE(c % s == 0 && (c / s) % s == 0, op, ": x has ", c, " channels, which is not divisible by ",
                      factor_name, "**2 = ", s, "**2");
    int64_t out_h = 0, out_w = 0;
    TORCH_CHECK_VALUE(!c10::mul_overflows(h, s, &out_h) && !c10::mul_overflows(w, s, &out_w), op,
                      ": the output size overflows int64 (", factor_name, " ", s, ")");
    shape = {n, c / s / s, h, w, s};
    out_sizes = {n, c / s / s, out_h, out_w};
  } else {
    TORCH_CHECK_VALUE(h % s == 0 && w % s == 0, op, ": x has height ", h, " and width ", w,
                      ", which must both be divisible by ", factor_name, " = ", s);
    int64_t s2 = 0, out_c = 0;
    TORCH_CHECK_VALUE(!c10::mul_overflows(s, s, &s2) && !c10::mul_overflows(c, s2, &out_c), op,
                      ": the output size overflows int64 (", factor_name, " ", s, ")");
    shape = {n, c, h / s, w / s, s};
    out_sizes = {n, out_c, h / s, w / s};
  }
  // The output takes the input's memory format, chosen exactly as torch's pixel_shuffle does.
  const auto memory_format = x.suggest_memory_format();
  return {x.contiguous(memory_format), at::empty(out_sizes, x.options().memory_format(memory_format)), shape,
          to_shuffled, memory_format == at::MemoryFormat::ChannelsLast};
}

at::Tensor prepare_shuffle_bias(const at::Tensor& x, const at::Tensor& bias) {
  constexpr const char* op = "pixel_shuffle_bias";
  TORCH_CHECK_VALUE(bias.device() == x.device(), op, ": bias is on ", bias.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(bias.scalar_type() == x.scalar_type(), op, ": bias has dtype ", bias.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(bias.dim() == 1, op, ": bias must be a 1-D tensor (C*s*s,), got shape ", bias.sizes());
  // x's own checks (prepare_shuffle) name a tensor that is not 4-D.
  TORCH_CHECK_VALUE(x.dim() != 4 || bias.size(0) == x.size(1), op, ": bias has ", bias.size(0),
                    " elements, expected one per channel of x (C*s*s = ", x.dim() == 4 ? x.size(1) : 0, ")");
  return bias.contiguous();
}

namespace {

constexpr int64_t kGrainSize = 32768;  // elements per parallel chunk: ATen's choice for its copy kernels

// kAddBias: dst = src + bias[unshuffled channel], computed in the op-math type (float for 16-bit
// types) and rounded once, as torch's add does; `bias` is unused otherwise.
template <typename scalar_t, bool kAddBias>
void gather_cpu(const ShuffleCall& call, const scalar_t* bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  // 64-bit indices only: the CPU walks each chunk with the cursor, so it never pays for the
  // divisions that make 32-bit indexing worth having on the GPU.
  const GatherPlan<int64_t> plan = plan_for<int64_t>(call);
  const ChannelWeights<int64_t> weights = channel_weights_for<int64_t>(call);
  const scalar_t* src = call.src.const_data_ptr<scalar_t>();
  scalar_t* dst = call.dst.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, call.dst.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    SourceCursor<int64_t> cursor(plan, begin);
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (kAddBias) {
        dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(src[cursor.offset]) +
                                       static_cast<opmath_t>(bias[cursor.channel(weights)]));
      } else {
        dst[i] = src[cursor.offset];
      }
      cursor.advance(plan);
    }
  });
}

at::Tensor shuffle_cpu(const at::Tensor& x, int64_t factor, bool to_shuffled) {
  ShuffleCall call = prepare_shuffle(x, factor, to_shuffled);
  if (call.dst.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.src.scalar_type(), "fastdrn_pixel_shuffle_cpu",
                                    [&] { gather_cpu<scalar_t, false>(call, nullptr); });
  }
  return call.dst;
}

at::Tensor pixel_shuffle_bias_cpu(const at::Tensor& x, const at::Tensor& bias, int64_t upscale_factor) {
  const at::Tensor dense_bias = prepare_shuffle_bias(x, bias);
  ShuffleCall call = prepare_shuffle(x, upscale_factor, /*to_shuffled=*/true, "pixel_shuffle_bias");
  if (call.dst.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.src.scalar_type(), "fastdrn_pixel_shuffle_bias_cpu",
                                    [&] { gather_cpu<scalar_t, true>(call, dense_bias.const_data_ptr<scalar_t>()); });
  }
  return call.dst;
}

at::Tensor pixel_shuffle_cpu(const at::Tensor& x, int64_t upscale_factor) {
  return shuffle_cpu(x, upscale_factor, /*to_shuffled=*/true);
}

at::Tensor pixel_unshuffle_cpu(const at::Tensor& x, int64_t downscale_factor) {
  return shuffle_cpu(x, downscale_factor, /*to_shuffled=*/false);
}

}  // namespace
}  // namespace fastdrn

// Its own namespace: Python registers fastdrn::* ops (torch.library.triton_op), and a second
// TORCH_LIBRARY(fastdrn) would clash with them.
TORCH_LIBRARY(fastdrn_ext, m) {
  m.set_python_module("fastdrn.extension");
  m.def("pixel_shuffle(Tensor x, int upscale_factor) -> Tensor");
  m.def("pixel_unshuffle(Tensor x, int downscale_factor) -> Tensor");
  // pixel_shuffle(x + bias.view(1, -1, 1, 1)) in one pass: the bias of the conv before the shuffle.
  m.def("pixel_shuffle_bias(Tensor x, Tensor bias, int upscale_factor) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdrn_ext, CPU, m) {
  m.impl("pixel_shuffle", &fastdrn::pixel_shuffle_cpu);
  m.impl("pixel_unshuffle", &fastdrn::pixel_unshuffle_cpu);
  m.impl("pixel_shuffle_bias", &fastdrn::pixel_shuffle_bias_cpu);
}
