// CUDA kernels of fastdrn_ext::pixel_shuffle, fastdrn_ext::pixel_unshuffle (its backward) and
// fastdrn_ext::pixel_shuffle_bias (pixel_shuffle with a per-channel bias added as it gathers).
//
// Each thread writes one 16-byte vector of the output, in the output's memory order, and gathers
// its elements from the input through the shared index mapping (pixel_shuffle_index.h). The
// stores are the side that can be wide: consecutive output elements come from input elements
// s*s channels apart (channels_last shuffle), H*W apart (NCHW shuffle), s pixels apart (NCHW
// unshuffle) or C apart (channels_last unshuffle), so the loads are scalar; a warp's scalar loads
// still cover whole 32-byte sectors, which the L1 cache serves. Only headers from c10 are used
// for CUDA (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and cuSPARSE headers) so that
// csrc/nvcc_check.sh can compile this file against any torch wheel and a bare CUDA toolkit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>

#include "pixel_shuffle.h"

namespace fastdrn {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) AlignedVector {
  scalar_t val[kVec];
};

// The bias of pixel_shuffle_bias: bias[unshuffled channel] is added to each element.
template <typename scalar_t, typename index_t>
struct BiasArgs {
  const scalar_t* __restrict__ bias;
  ChannelWeights<index_t> weights;
};

// The element written to the destination: src's, plus its channel's bias when kAddBias, added in
// the op-math type (float for 16-bit types) and rounded once, as torch's add does. Without
// kAddBias the bias is never read: pixel_shuffle's code is the plain copy.
template <bool kAddBias, typename scalar_t, typename index_t>
__device__ __forceinline__ scalar_t gathered(const scalar_t* __restrict__ src, const SourceCursor<index_t>& cursor,
                                             const BiasArgs<scalar_t, index_t>& bias) {
  if constexpr (kAddBias) {
    using opmath_t = at::opmath_type<scalar_t>;
    return static_cast<scalar_t>(static_cast<opmath_t>(src[cursor.offset]) +
                                 static_cast<opmath_t>(bias.bias[cursor.channel(bias.weights)]));
  } else {
    return src[cursor.offset];
  }
}

// Threads [0, full) write one kVec-element vector each; the numel % kVec elements left over at the
// end are written one per thread by the threads after them (the scalar path).
template <typename scalar_t, typename index_t, bool kAddBias>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, const GatherPlan<index_t> plan,
                  const index_t numel, const BiasArgs<scalar_t, index_t> bias) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  // 64-bit: with 32-bit sizes, full + tail threads may still number more than 2^31 - 1.
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const index_t full = numel / kVec;
  if (thread < full) {
    const index_t first = static_cast<index_t>(thread) * kVec;
    SourceCursor<index_t> cursor(plan, first);
    AlignedVector<scalar_t, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out.val[k] = gathered<kAddBias>(src, cursor, bias);
      if (k + 1 < kVec) cursor.advance(plan);
    }
    *reinterpret_cast<AlignedVector<scalar_t, kVec>*>(dst + first) = out;
  } else if (thread < full + numel % kVec) {
    const index_t i = full * kVec + static_cast<index_t>(thread - full);
    dst[i] = gathered<kAddBias>(src, SourceCursor<index_t>(plan, i), bias);
  }
}

// bias: pixel_shuffle_bias's dense bias, or nullptr for the plain (un)shuffle.
template <typename scalar_t, typename index_t>
void launch_gather(const ShuffleCall& call, const scalar_t* bias) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  scalar_t* dst = call.dst.mutable_data_ptr<scalar_t>();
  // at::empty's CUDA allocations are at least 16-byte aligned; the vector stores rely on it.
  TORCH_INTERNAL_ASSERT(reinterpret_cast<std::uintptr_t>(dst) % kVectorBytes == 0);
  const int64_t numel = call.dst.numel();
  const int64_t threads = numel / kVec + numel % kVec;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "pixel_shuffle: tensor too large (", numel,
              " elements) for one launch");
  const scalar_t* src = call.src.const_data_ptr<scalar_t>();
  const GatherPlan<index_t> plan = plan_for<index_t>(call);
  const BiasArgs<scalar_t, index_t> bias_args{bias, bias ? channel_weights_for<index_t>(call) : ChannelWeights<index_t>{}};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (bias != nullptr) {
    gather_kernel<scalar_t, index_t, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        src, dst, plan, static_cast<index_t>(numel), bias_args);
  } else {
    gather_kernel<scalar_t, index_t, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        src, dst, plan, static_cast<index_t>(numel), bias_args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs the gather for a prepared call; bias as for launch_gather (then of x's dtype).
void gather_cuda(const ShuffleCall& call, const at::Tensor* bias) {
  const int64_t numel = call.dst.numel();
  if (numel == 0) return;
  // Offsets stay below numel (SourceCursor), so 32-bit indexing holds up to INT32_MAX elements;
  // it saves the 64-bit divisions of unravelling each vector's index. Channels stay below it too.
  const bool use_int32 = numel <= std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.src.scalar_type(), "fastdrn_pixel_shuffle_cuda", [&] {
    const scalar_t* bias_data = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    if (use_int32) {
      launch_gather<scalar_t, int32_t>(call, bias_data);
    } else {
      launch_gather<scalar_t, int64_t>(call, bias_data);
    }
  });
}

at::Tensor shuffle_cuda(const at::Tensor& x, int64_t factor, bool to_shuffled) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  ShuffleCall call = prepare_shuffle(x, factor, to_shuffled);
  gather_cuda(call, nullptr);
  return call.dst;
}

at::Tensor pixel_shuffle_cuda(const at::Tensor& x, int64_t upscale_factor) {
  return shuffle_cuda(x, upscale_factor, /*to_shuffled=*/true);
}

at::Tensor pixel_unshuffle_cuda(const at::Tensor& x, int64_t downscale_factor) {
  return shuffle_cuda(x, downscale_factor, /*to_shuffled=*/false);
}

at::Tensor pixel_shuffle_bias_cuda(const at::Tensor& x, const at::Tensor& bias, int64_t upscale_factor) {
  // Before the guard: a CPU tensor among the arguments also dispatches here, and is named.
  const at::Tensor dense_bias = prepare_shuffle_bias(x, bias);
  const c10::cuda::CUDAGuard device_guard(x.device());
  ShuffleCall call = prepare_shuffle(x, upscale_factor, /*to_shuffled=*/true, "pixel_shuffle_bias");
  gather_cuda(call, &dense_bias);
  return call.dst;
}

// "" when this build holds a kernel image that CUDA device `device` can run (machine code for its
// architecture, or PTX its driver can compile), else CUDA's reason. fastdrn/extension.py asks once a
// device, so that a GPU the extension was not compiled for is named before a launch, not by a
// "no kernel image" error from inside one. Every kernel here is compiled with the same flags, so
// one answers for all.
std::string cuda_kernel_image_error(int64_t device) {
  const c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, gather_kernel<float, int32_t, false>);
  if (status == cudaSuccess) return "";
  (void)cudaGetLastError();  // clears it, so the next launch check does not report it as its own
  return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
}

}  // namespace
}  // namespace fastdrn

// Defined only where the CUDA kernels are compiled: a build without them has no such question.
TORCH_LIBRARY_FRAGMENT(fastdrn_ext, m) {
  m.def("cuda_kernel_image_error(int device) -> str", &fastdrn::cuda_kernel_image_error);
}

TORCH_LIBRARY_IMPL(fastdrn_ext, CUDA, m) {
  m.impl("pixel_shuffle", &fastdrn::pixel_shuffle_cuda);
  m.impl("pixel_unshuffle", &fastdrn::pixel_unshuffle_cuda);
  m.impl("pixel_shuffle_bias", &fastdrn::pixel_shuffle_bias_cuda);
}
