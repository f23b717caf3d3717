// The index mapping of pixel shuffle, shared by the CPU kernel (pixel_shuffle.cpp) and the CUDA
// kernel (pixel_shuffle_cuda.cu) so that both move every element to the same place. Plain C++ for
// the host compiler: the plan is built on the host, and the cursor that walks it is compiled as
// __host__ __device__ by nvcc and as plain inline code otherwise.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTDRN_HOST_DEVICE __host__ __device__ __forceinline__
#define FASTDRN_UNROLL _Pragma("unroll")
#else
#define FASTDRN_HOST_DEVICE inline
#define FASTDRN_UNROLL
#endif

namespace fastdrn {

// Pixel shuffle with factor s relates two tensors indexed by one 6-D space (n, c, i, j, h, w):
//   shuffled   (N, C,     H*s, W*s)  element [n][c][h*s + i][w*s + j]
//   unshuffled (N, C*s*s, H,   W  )  element [n][c*s*s + i*s + j][h][w]
// are the same element. pixel_shuffle copies unshuffled -> shuffled; pixel_unshuffle, its
// backward, copies shuffled -> unshuffled. Both tensors are dense, NCHW or NHWC (channels_last).
enum Axis : int { kAxisN, kAxisC, kAxisI, kAxisJ, kAxisH, kAxisW, kAxes };

template <typename index_t>
struct ShuffleShape {
  index_t n, c, h, w, s;  // c: channels of the shuffled tensor; h, w: spatial size of the unshuffled one
};

// Element strides of each axis of the 6-D space in one of the two tensors, for its memory format.
template <typename index_t>
inline void axis_strides(const ShuffleShape<index_t>& g, bool shuffled, bool channels_last,
                         index_t (&stride)[kAxes]) {
  const index_t s = g.s;
  if (shuffled) {
    // (N, C, H*s, W*s): row (h*s + i) and column (w*s + j).
    const index_t col = channels_last ? g.c : 1;
    const index_t row = col * g.w * s;
    stride[kAxisJ] = col;
    stride[kAxisW] = col * s;
    stride[kAxisI] = row;
    stride[kAxisH] = row * s;
    stride[kAxisC] = channels_last ? 1 : row * g.h * s;
  } else {
    // (N, C*s*s, H, W): channel (c*s*s + i*s + j).
    const index_t channel = channels_last ? 1 : g.h * g.w;
    stride[kAxisJ] = channel;
    stride[kAxisI] = channel * s;
    stride[kAxisC] = channel * s * s;
    stride[kAxisW] = channels_last ? g.c * s * s : 1;
    stride[kAxisH] = stride[kAxisW] * g.w;
  }
  stride[kAxisN] = g.c * g.h * g.w * s * s;
}

// The axes in the order a tensor's memory runs through them, outermost first.
inline void memory_order(bool shuffled, bool channels_last, int (&order)[kAxes]) {
  static constexpr int kShuffledNCHW[kAxes] = {kAxisN, kAxisC, kAxisH, kAxisI, kAxisW, kAxisJ};
  static constexpr int kShuffledNHWC[kAxes] = {kAxisN, kAxisH, kAxisI, kAxisW, kAxisJ, kAxisC};
  static constexpr int kUnshuffledNCHW[kAxes] = {kAxisN, kAxisC, kAxisI, kAxisJ, kAxisH, kAxisW};
  static constexpr int kUnshuffledNHWC[kAxes] = {kAxisN, kAxisH, kAxisW, kAxisC, kAxisI, kAxisJ};
  const int* chosen = shuffled ? (channels_last ? kShuffledNHWC : kShuffledNCHW)
                               : (channels_last ? kUnshuffledNHWC : kUnshuffledNCHW);
  for (int k = 0; k < kAxes; ++k) order[k] = chosen[k];
}

// How to fill the destination in memory order: its linear index, written in the mixed radix
// `size` (outermost digit first), is a 6-D index whose source offset is sum(digit * src_stride).
template <typename index_t>
struct GatherPlan {
  index_t size[kAxes];
  index_t src_stride[kAxes];
};

template <typename index_t>
inline GatherPlan<index_t> make_plan(const ShuffleShape<index_t>& g, bool to_shuffled, bool channels_last) {
  const index_t sizes[kAxes] = {g.n, g.c, g.s, g.s, g.h, g.w};  // indexed by Axis
  index_t src_stride[kAxes];
  axis_strides(g, /*shuffled=*/!to_shuffled, channels_last, src_stride);
  int order[kAxes];
  memory_order(/*shuffled=*/to_shuffled, channels_last, order);
  GatherPlan<index_t> plan;
  for (int k = 0; k < kAxes; ++k) {
    plan.size[k] = sizes[order[k]];
    plan.src_stride[k] = src_stride[order[k]];
  }
  return plan;
}

// The unshuffled channel c*s*s + i*s + j of a pixel shuffle's destination element, as a weight per
// digit of the plan's radix (the C, I and J digits weigh s*s, s and 1; the others 0), so that a
// kernel reads it off the cursor's digits instead of dividing the source offset.
template <typename index_t>
struct ChannelWeights {
  index_t weight[kAxes];
};

template <typename index_t>
inline ChannelWeights<index_t> make_channel_weights(const ShuffleShape<index_t>& g, bool channels_last) {
  const index_t axis_weight[kAxes] = {0, g.s * g.s, g.s, 1, 0, 0};  // indexed by Axis
  int order[kAxes];
  memory_order(/*shuffled=*/true, channels_last, order);
  ChannelWeights<index_t> weights;
  for (int k = 0; k < kAxes; ++k) weights.weight[k] = axis_weight[order[k]];
  return weights;
}

// Walks the destination in memory order and keeps the matching source offset. Unravelling costs
// five divisions, so a kernel does it once per run of elements and then steps with advance().
template <typename index_t>
struct SourceCursor {
  index_t digit[kAxes];
  index_t offset;

  FASTDRN_HOST_DEVICE SourceCursor(const GatherPlan<index_t>& plan, index_t linear) : offset(0) {
    FASTDRN_UNROLL
    for (int k = kAxes - 1; k > 0; --k) {
      digit[k] = linear % plan.size[k];
      linear /= plan.size[k];
      offset += digit[k] * plan.src_stride[k];
    }
    digit[0] = linear;
    offset += linear * plan.src_stride[0];
  }

  // The unshuffled channel of the current destination element (pixel shuffle only). The loop
  // indexes the digits with constants once unrolled, so they stay in registers.
  FASTDRN_HOST_DEVICE index_t channel(const ChannelWeights<index_t>& weights) const {
    index_t channel = 0;
    FASTDRN_UNROLL
    for (int k = 0; k < kAxes; ++k) channel += digit[k] * weights.weight[k];
    return channel;
  }

  // Moves to the next destination element. The offset never leaves [0, numel), even past the
  // last element, so 32-bit indexing cannot overflow.
  FASTDRN_HOST_DEVICE void advance(const GatherPlan<index_t>& plan) {
    bool carry = true;
    FASTDRN_UNROLL
    for (int k = kAxes - 1; k >= 0; --k) {
      if (!carry) continue;
      if (digit[k] + 1 < plan.size[k]) {
        ++digit[k];
        offset += plan.src_stride[k];
        carry = false;
      } else {
        offset -= digit[k] * plan.src_stride[k];
        digit[k] = 0;
      }
    }
  }
};

}  // namespace fastdrn
