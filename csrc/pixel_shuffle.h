// Host-side pieces shared by the CPU (pixel_shuffle.cpp) and CUDA (pixel_shuffle_cuda.cu)
// implementations of the fastdrn_ext::pixel_shuffle, pixel_unshuffle and pixel_shuffle_bias ops.
#pragma once

#include <ATen/core/Tensor.h>

#include "pixel_shuffle_index.h"

namespace fastdrn {

// One checked pixel (un)shuffle: copy `src` into the freshly allocated `dst` along `shape`'s
// mapping. Both are dense in the input's suggested memory format (NCHW or channels_last).
struct ShuffleCall {
  at::Tensor src;
  at::Tensor dst;
  ShuffleShape<int64_t> shape;
  bool to_shuffled;
  bool channels_last;
};

// Checks x and the factor (ValueError/TypeError in Python on bad input), makes x dense and
// allocates the output. `op` names the op in errors (by default pixel_shuffle or pixel_unshuffle).
// Defined in pixel_shuffle.cpp.
ShuffleCall prepare_shuffle(const at::Tensor& x, int64_t factor, bool to_shuffled, const char* op = nullptr);

// pixel_shuffle_bias's checks of bias against x (ValueError/TypeError in Python), run before
// anything touches a device; returns bias made dense. Defined in pixel_shuffle.cpp.
at::Tensor prepare_shuffle_bias(const at::Tensor& x, const at::Tensor& bias);

template <typename index_t>
GatherPlan<index_t> plan_for(const ShuffleCall& call) {
  const ShuffleShape<int64_t>& g = call.shape;
  const ShuffleShape<index_t> narrowed{static_cast<index_t>(g.n), static_cast<index_t>(g.c),
                                       static_cast<index_t>(g.h), static_cast<index_t>(g.w),
                                       static_cast<index_t>(g.s)};
  return make_plan(narrowed, call.to_shuffled, call.channels_last);
}

template <typename index_t>
ChannelWeights<index_t> channel_weights_for(const ShuffleCall& call) {
  const ShuffleShape<int64_t>& g = call.shape;
  return make_channel_weights(ShuffleShape<index_t>{static_cast<index_t>(g.n), static_cast<index_t>(g.c),
                                                    static_cast<index_t>(g.h), static_cast<index_t>(g.w),
                                                    static_cast<index_t>(g.s)},
                              call.channels_last);
}

}  // namespace fastdrn
