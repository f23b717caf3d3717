"""fastdrn.DRN: the reference DRN's constructor and state_dict, run through the fused ops.

It subclasses fastdrn.reference.DRN, so the modules, parameter names and shapes are the
reference's own (checkpoints move both ways with strict=True); only forward differs: features stay
channels_last, every block and compression runs through fastdrn.ops (fused Triton kernels on a
GPU), pixel shuffle through the extension, and the head, upsample and tail 3x3 convolutions through
cuDNN.
"""
from __future__ import annotations

from operator import attrgetter

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import backend, ops, reference

_dtype = attrgetter("dtype")


def _memory_order(t: torch.Tensor) -> list[int] | None:
    """t's dimensions from the outermost in memory to the innermost (a permutation that makes a
    dense tensor contiguous), or None when t is contiguous already (no permute, no extra view)."""
    if t.is_contiguous():
        return None
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d) if t.shape[d] > 1 else 0, d))


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


def _cast_all(dtype: torch.dtype, tensors: list) -> tuple:
    """`tensors` cast to `dtype` with one cat and one cast: each tensor flattened in its
    own memory order (a view, also for a channels_last weight) and its cast piece given the same
    strides, so neither direction copies per tensor and a weight's layout is kept."""
    orders = [None if t.is_contiguous() else _memory_order(t) for t in tensors]
    flat = _flatten_dense_tensors([t if order is None else t.permute(order) for t, order in zip(tensors, orders)])
    pieces = _unflatten_dense_tensors(flat.to(dtype), [t if order is None else t.permute(order)
                                                     for t, order in zip(tensors, orders)])
    return tuple(piece if order is None else piece.permute(_inverse(order)) for piece, order in zip(pieces, orders))


class _CastWeights(torch.autograd.Function):
    """The fused ops' weights cast to the autocast dtype, with autograd: forward one cat and one cast
    for all of them; backward the same for their gradients, each back in its parameter's dtype and
    layout. One autograd node, where casting through views would record two per tensor."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.source_dtype = tensors[0].dtype  # all of one dtype (DRN._fused_weights casts mixed ones one by one)
        return _cast_all(dtype, list(tensors))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_cast_all(ctx.source_dtype, list(grads)))


# The tail conv the fused output stage computes (kernels/shuffle_tail.py): stride, padding, dilation,
# groups and padding mode.
_FUSED_TAIL_CONV = ((1, 1), (1, 1), (1, 1), 1, "zeros")


def _global_module_hooks() -> bool:
    """Whether a hook for every module is registered (torch.nn.modules.module's
    register_module_forward_hook and the like, as profilers and model summaries install)."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def _called(module, kind: type) -> bool:
    """Whether calling this module (a group, a block, the upsampler or the tail) could do more than
    `kind`'s forward, which the fused ops compute from its weights alone: it is of another class (a
    subclass, a replacement), has a forward set on the instance, or a hook."""
    # Read from the instance dict: about 0.7 us a block against 1 us by attribute access (2-core CPU
    # machine; 54 blocks a forward).
    attributes = module.__dict__
    return type(module) is not kind or "forward" in attributes or bool(
        attributes["_forward_hooks"] or attributes["_forward_pre_hooks"] or attributes["_backward_hooks"]
        or attributes["_backward_pre_hooks"])


class DRN(reference.DRN):
    """DRN super-resolution, run through fastdrn's fused kernels: (N, n_colors, h, w) -> (N, n_colors, h*scale, w*scale).

    The constructor and state_dict are those of the plain PyTorch model ``fastdrn.reference.DRN``
    (docs/architecture.md): a checkpoint saved from either loads into the other with strict=True.

    Args:
        scale: upscaling factor, an integer >= 2.
        n_colors: image channels (3: RGB).
        n_feats: width C of the features between blocks.
        n_groups: residual distilling groups G.
        n_blocks: residual distilling blocks K per group.
        inner: width F inside each block (64 for DRN, 256 for DRN+).
        distill: channels d each block distills.
        alpha: the ELU parameter.
        rgb_mean: per-channel mean subtracted at the input and added back at the output, in units
            of ``rgb_range`` (default: the DIV2K mean).
        rgb_range: the value of white: inputs are floats in [0, rgb_range] and so is the output
            (not clamped; clamping belongs to image writing and the metrics).
        recompute: keyword-only; save less for backward and recompute inside each block there
            (the same results, less memory, more arithmetic).

    Which backend runs is chosen per call by ``FASTDRN_BACKEND`` (docs/numerics.md); the
    ``backend`` property says which, for this model's device and dtype. Each group's ELUs use its
    own alpha, as the reference's do. A group that has a hook, or one of whose blocks has, or a
    forward of its own (set on the instance, or a subclass), or another alpha than its group, is
    called as a module as the reference calls it, in plain PyTorch; so are all groups while a global
    module hook is registered. Under FASTDRN_BACKEND=triton such a group raises instead (a forced
    backend runs what it names).
    """

    def __init__(self, scale: int = 4, n_colors: int = 3, n_feats: int = 64, n_groups: int = 6,
                 n_blocks: int = 9, inner: int = 64, distill: int = 8, alpha: float = 0.2,
                 rgb_mean=reference.DIV2K_RGB_MEAN, rgb_range: float = 1.0, *, recompute: bool = False):
        super().__init__(scale=scale, n_colors=n_colors, n_feats=n_feats, n_groups=n_groups,
                         n_blocks=n_blocks, inner=inner, distill=distill, alpha=alpha,
                         rgb_mean=rgb_mean, rgb_range=rgb_range)
        ops.check_alpha("DRN", alpha)  # the fused ops' limits beyond the reference's (float32's range)
        self.recompute = recompute

    @property
    def backend(self) -> str:
        """The backend the fused ops use for this model's device and dtype, in words: the parameters'
        dtype, or autocast's where it is on for their device (the dtype a forward then runs in)."""
        weight = self.head.weight
        return backend.describe(weight.device, self._compute_dtype(weight))

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Our ops are not autocast-aware: under autocast they run in its dtype (weights cast per
        # call, as autocast casts them for nn.Conv2d), with fp32 accumulation inside the kernels.
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _called_groups(self) -> list:
        """Per group, whether it is called as a module (its forward then calling its blocks), as the
        reference calls it, instead of running through the fused ops: where it or one of its blocks
        is _called, a block's alpha is not the group's (the fused ops take one a group), or a global
        module hook is registered. Hooks and forwards of groups and blocks take part in the
        reference's result, and the fused ops would skip them."""
        groups = self.groups._modules.values()
        if _global_module_hooks():
            return [True] * len(groups)
        block_kind, called = reference.ResidualDistillBlock, []
        for group in groups:
            call, alpha = _called(group, reference.ResidualDistillGroup), group.alpha
            # _called written out for the blocks, in a plain loop: about 31 against 50 us a forward for
            # DRN x4's 54 blocks (2-core CPU machine).
            for block in group._modules["blocks"]._modules.values():
                if call:
                    break
                attributes = block.__dict__
                call = (type(block) is not block_kind or block.alpha != alpha or "forward" in attributes
                        or bool(attributes["_forward_hooks"] or attributes["_forward_pre_hooks"]
                                or attributes["_backward_hooks"] or attributes["_backward_pre_hooks"]))
            called.append(call)
        return called

    def _weights(self, groups) -> list:
        """Every fused op's weight and bias in model order (per group of `groups`: each block's
        squeeze, conv and expand, then the compression). Read from the convs' parameter dicts:
        attribute access through nn.Module costs about 0.4 us a tensor on the host, and DRN x4 has
        336. A parametrized conv (torch.nn.utils.parametrize) computes its weight on access, so it
        is asked for it."""
        tensors = []
        for group in groups:
            convs = [conv for block in group._modules["blocks"]._modules.values()
                     for conv in (block._modules["squeeze"], block._modules["conv"], block._modules["expand"])]
            convs.append(group._modules["compress"])
            for conv in convs:
                params = conv._parameters
                tensors.append(params["weight"] if "weight" in params else conv.weight)
                tensors.append(params["bias"] if "bias" in params else conv.bias)
        return tensors

    def _fused_weights(self, dtype: torch.dtype, groups) -> list:
        """Per group of `groups`: ([its blocks' (w_squeeze, b_squeeze, w_conv, b_conv, w_expand,
        b_expand) in one flat list], (w_compress, b_compress)), all in `dtype`: what
        ops._distill_groups takes.

        Under autocast the weights are cast by _CastWeights: one cat and one cast for the whole model,
        forward and backward, instead of a cast per tensor each way (DRN x4 has 336 such tensors). They
        are cast again at every call: a weight changed in place through .data keeps its version and
        storage, so no cheap test could tell a kept cast from a stale one.
        """
        tensors = self._weights(groups)
        present = [t for t in tensors if t is not None]
        # Traced, a comprehension (torch.compile cannot trace attrgetter); eager, the C loop of map,
        # about 20 us less a forward over DRN x4's 342 tensors.
        dtypes = {t.dtype for t in present} if torch.compiler.is_compiling() else set(map(_dtype, present))
        if dtypes != {dtype}:
            if not torch.is_grad_enabled():
                cast = iter(_cast_all(dtype, present))
            elif len(dtypes) > 1:  # mixed: autograd casts each back
                cast = iter([t.to(dtype) for t in present])
            else:
                cast = iter(_CastWeights.apply(dtype, *present))
            tensors = [None if t is None else next(cast) for t in tensors]
        fused, start = [], 0
        for group in groups:
            end = start + 6 * len(group._modules["blocks"]._modules)
            fused.append((tensors[start:end], (tensors[end], tensors[end + 1])))
            start = end + 2
        return fused

    def _fuses_tail(self, features: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the pixel shuffle and the tail run as one Triton kernel (kernels/shuffle_tail.py):
        on the fused backend, with the launch option fuse_tail (FASTDRN_FUSE_TAIL=1) on, where the
        upsampler and the tail are convs as DRN builds them, without hooks, within the kernel's scale
        and colour limits, and where none of the kernel's inputs needs a gradient (it has no
        backward). The features carry the input's and every earlier parameter's need, so four
        tensors answer it, not a walk over all the model's parameters."""
        if not backend.use_triton("shuffle_tail", features.device, dtype):
            return False
        from .kernels.settings import launch_options

        if not launch_options().fuse_tail:
            return False
        upsample, tail = self.upsample, self.tail
        # The kernel adds the upsampler's bias and computes the tail from its weight and bias alone;
        # the reference calls both as modules.
        if _called(upsample, torch.nn.Conv2d) or _called(tail, torch.nn.Conv2d) or _global_module_hooks():
            return False
        if upsample.bias is None or tail.bias is None or (
                tail.stride, tail.padding, tail.dilation, tail.groups, tail.padding_mode) != _FUSED_TAIL_CONV:
            return False
        # Past the kernel's limits the option leaves the output stage as it was (it raised there).
        if self.scale > ops.SHUFFLE_TAIL_MAX_SCALE or tail.out_channels > ops.SHUFFLE_TAIL_MAX_COLORS:
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in (
            features, upsample.weight, upsample.bias, tail.weight, tail.bias)))

    def _shuffle_tail(self, features: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype,
                      channels_last: bool) -> torch.Tensor:
        """tail(pixel_shuffle(upsample(features))) + mean with the shuffle, both biases, the tail and
        the mean in one kernel; the upsampler conv alone through cuDNN (autocast casts for it). The
        output's dtype is what `tail(v) + mean` gives; float32 parameters stay float32 (the kernel
        casts them as autocast would), others are cast to the compute dtype."""
        u = self.upsample._conv_forward(features, self.upsample.weight, None)
        params = [t if t.dtype in (dtype, torch.float32) else t.to(dtype)
                  for t in (self.upsample.bias, self.tail.weight, self.tail.bias)]
        return ops._shuffle_tail(u, params[0], params[1], params[2], mean, self.scale,
                            out_dtype=torch.promote_types(dtype, mean.dtype), channels_last=channels_last)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.n_colors:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DRN expects an (N, {self.n_colors}, H, W) image batch, got {shape}")
        if not x.is_floating_point():
            # The reference subtracts its mean cast to x's dtype: for integers that is 0, and the
            # result is no DRN's; images are floats in [0, rgb_range].
            raise TypeError(f"DRN takes floating-point images with values in [0, rgb_range] = [0, {self.rgb_range:g}], "
                            f"got dtype {x.dtype}: convert them first (8-bit images: x.float() / 255 * rgb_range)")
        if x.numel() == 0 or x.device.type == "meta":
            # Nothing to compute: an empty batch (N = 0) or shapes only (meta tensors, as deferred
            # initialization and model summaries use). The reference's own forward gives what
            # nn.Conv2d gives, the empty output or its shape, or the same error for H or W of 0.
            return super().forward(x)
        if backend.transform_reason() is not None:
            # Under torch.func transforms and forward-mode AD, PyTorch's math (and FASTDRN_BACKEND=triton
            # raises, naming why).
            backend.use_triton("residual_distill", x.device, x.dtype)
            return super().forward(x)
        channels_last_in = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        dtype = self._compute_dtype(x)
        mean = self.rgb_mean.to(x.dtype) * self.rgb_range
        x = x.contiguous(memory_format=torch.channels_last)
        y0 = self.head(x - mean).to(dtype).contiguous(memory_format=torch.channels_last)
        # Each group's ELUs at its own alpha, as the reference's groups and blocks apply theirs (set
        # after construction, they may differ from self.alpha, which its forward never reads).
        groups, called = self.groups._modules.values(), self._called_groups()
        alphas = {group.alpha for group, call in zip(groups, called) if not call}
        if not any(called) and len(alphas) == 1:
            y = ops._distill_groups(y0, self._fused_weights(dtype, groups), alphas.pop(), self.recompute)
        else:
            if any(called) and backend.requested() == "triton":
                k = called.index(True)
                why = ("a global module hook is registered" if _global_module_hooks() else
                       "it or one of its blocks has a hook, a forward of its own or another alpha than the group's")
                raise RuntimeError(f"FASTDRN_BACKEND=triton but group {k} of fastdrn.DRN is called as a module, "
                                   f"which runs PyTorch's math as the reference does: {why}; remove that, or use "
                                   "FASTDRN_BACKEND=auto")
            y = y0
            for group, call in zip(groups, called):
                y = group(y) if call else ops._distill_groups(y, self._fused_weights(dtype, [group]), group.alpha,
                                                              self.recompute)
        features = y + y0
        if self._fuses_tail(features, dtype):
            return self._shuffle_tail(features, mean, dtype, channels_last_in)
        y = self.upsample(features)
        y = ops.pixel_shuffle(y, self.scale)
        out = self.tail(y) + mean
        return out if channels_last_in else out.contiguous()
