"""fastdrn's public functional ops (docs/numerics.md), with input checks and the backend switch.

Every op checks its inputs here, whatever the backend, so bad input gets the same clear error on
every path; then `fastdrn.backend.use_triton` picks the fused kernels or the plain PyTorch math of
`fastdrn.reference` (the oracle the tests compare against).
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings

import torch

from . import backend, reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_MAX = torch.finfo(torch.float32).max
# shuffle_tail's kernel: output channels (n_colors) padded to one 16-wide tl.dot (its NP), and s*s
# sub-positions of a low-resolution pixel that fit in every config's BLOCK_M (64 at s = 8).
SHUFFLE_TAIL_MAX_COLORS = 16
SHUFFLE_TAIL_MAX_SCALE = 8

# Argument signatures that passed a check. The checks read nothing but each argument's type, shape,
# dtype and device, so arguments with the signature of ones that passed pass too: the full checks
# (about 8 us a block on the host, for 54 blocks and more a training step) run for a new signature,
# and for every failing call, which therefore gets its clear error every time.
_PASSED: set = set()
_PASSED_LIMIT = 4096  # signatures hold no tensors; cleared when full
# Group signatures (plans.checked_signature) whose tensors were all as the kernels read them (1x1
# weights and biases contiguous). Contiguity follows from shapes and strides, so tensors of such a
# signature are too, and making them dense (45 tensors a group) is skipped for them.
_DENSE: set = set()


def _checked(check, *args, signature=None) -> None:
    """check(*args), unless arguments of the same signature passed it before (eager only: traced
    once, the checks cost nothing at run time, and a set mutated while tracing breaks its guards).
    The signature holds each tensor's layout: a sparse tensor has the shape, dtype and device of a
    dense one that passed.
    signature: one the caller computed that holds at least each tensor's shape, dtype and device,
    or a number standing for one (fastdrn.kernels.plans.checked_signature)."""
    if torch.compiler.is_compiling():
        check(*args)
        return
    if signature is None:
        try:
            signature = tuple(None if t is None else (type(t), t.shape, t.dtype, t.device, t.layout) for t in args)
        except (AttributeError, RuntimeError):  # not tensor-like: the full check names the problem
            check(*args)
            return
    signature = (check, signature)
    if signature in _PASSED:
        return
    check(*args)
    if len(_PASSED) >= _PASSED_LIMIT:
        _PASSED.clear()
    _PASSED.add(signature)


def _check_tensor(op: str, name: str, t, shape_hint: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        layout = "nested" if t.is_nested else str(t.layout).replace("torch.", "").lstrip("_")
        raise TypeError(f"{op}: {name} is a {layout} tensor; the fused ops read dense (strided) tensors, "
                        "so convert it first (.to_dense())")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be a {ndim}-D tensor {shape_hint}, got shape {tuple(t.shape)}")


def _check_activation(op: str, name: str, t) -> None:
    _check_tensor(op, name, t, "(N, C, H, W)", 4)
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)}); N, C, H and W must all be >= 1")


def _check_alike(op: str, named: dict) -> None:
    """Every tensor on one device and of one supported floating dtype."""
    (first_name, first), *rest = [(k, v) for k, v in named.items() if v is not None]
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {first_name} has dtype {first.dtype}; supported: float16, bfloat16, float32, float64")
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "cast them to one dtype (under autocast, fastdrn.DRN does this for you)")


def _check_shape(op: str, name: str, t, expected: tuple, why: str) -> None:
    if t is not None and tuple(t.shape) != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {expected} ({why})")


def _check_conv_weight(op: str, name: str, w, kernel: int) -> None:
    _check_tensor(op, name, w, f"(C_out, C_in, {kernel}, {kernel})", 4)
    if tuple(w.shape[2:]) != (kernel, kernel):
        raise ValueError(f"{op}: {name} must be a {kernel}x{kernel} conv weight (C_out, C_in, {kernel}, {kernel}), "
                         f"got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(w.shape)}); every channel count must be >= 1")


def check_alpha(op: str, alpha) -> float:
    """ELU's alpha as a float: a real number (not a string, a bool or a tensor), finite, > 0 and in
    float32's range (the kernels take it in float32).

    alpha > 0 is also what the fused backward relies on: it reads ELU' off the sign of ELU's output,
    which is negative exactly where the input is when alpha > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{op}: alpha must be a real number, got {type(alpha).__name__} {alpha!r}")
    value = float(alpha)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: alpha must be finite and > 0, got {value}")
    if value > FLOAT32_MAX:  # the kernels take alpha in float32 (float64 as two halves): inf, then NaN
        raise ValueError(f"{op}: alpha must be at most float32's largest value ({FLOAT32_MAX:.4g}), got {value}")
    return value


def _check_bias(op: str, name: str, b) -> None:
    if b is not None:
        _check_tensor(op, name, b, "(C_out,)", 1)


def check_residual_distill(z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand) -> None:
    _check_activation("residual_distill", "z", z)
    _check_block_weights("residual_distill", z, z.shape[1], w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand)


def _check_block_weights(op, like, d_in, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand) -> None:
    """One block's weights against an input of d_in channels shaped, placed and typed like `like`."""
    _check_conv_weight(op, "w_squeeze", w_squeeze, 1)
    _check_conv_weight(op, "w_conv", w_conv, 3)
    _check_conv_weight(op, "w_expand", w_expand, 1)
    for name, b in (("b_squeeze", b_squeeze), ("b_conv", b_conv), ("b_expand", b_expand)):
        _check_bias(op, name, b)
    _check_alike(op, dict(z=like, w_squeeze=w_squeeze, b_squeeze=b_squeeze, w_conv=w_conv, b_conv=b_conv,
                          w_expand=w_expand, b_expand=b_expand))
    inner = w_squeeze.shape[0]
    if w_squeeze.shape[1] != d_in:
        raise ValueError(f"{op}: w_squeeze expects {w_squeeze.shape[1]} input channels but z has {d_in}")
    _check_shape(op, "b_squeeze", b_squeeze, (inner,), "one bias per squeeze filter")
    _check_shape(op, "w_conv", w_conv, (inner, inner, 3, 3), f"the 3x3 conv maps the squeeze's {inner} channels to {inner}")
    _check_shape(op, "b_conv", b_conv, (inner,), "one bias per 3x3 filter")
    if w_expand.shape[1] != inner:
        raise ValueError(f"{op}: w_expand expects {w_expand.shape[1]} input channels but the block is {inner} wide")
    if w_expand.shape[0] <= d_in:
        raise ValueError(f"{op}: w_expand has {w_expand.shape[0]} output channels; it needs more than z's {d_in} "
                         "(D residual channels plus d >= 1 distilled ones)")
    _check_shape(op, "b_expand", b_expand, (w_expand.shape[0],), "one bias per expand filter")


def check_compress_skip(z, w, b, skip) -> None:
    _check_activation("compress_skip", "z", z)
    _check_compression("compress_skip", ("z", z), "z", z.shape[1], w, b, skip)


def _check_compression(op, named_like, source, width, w, b, skip) -> None:
    """A compression's weights against an input (`source`) of `width` channels, shaped, placed and
    typed like the tensor of named_like = (its name, it), and its skip."""
    like_name, like = named_like
    _check_activation(op, "skip", skip)
    _check_conv_weight(op, "w", w, 1)
    _check_bias(op, "b", b)
    _check_alike(op, {like_name: like, "w": w, "b": b, "skip": skip})
    if w.shape[1] != width:
        raise ValueError(f"{op}: w expects {w.shape[1]} input channels but {source} has {width}")
    _check_shape(op, "b", b, (w.shape[0],), "one bias per output channel")
    n, _, h, width = like.shape
    _check_shape(op, "skip", skip, (n, w.shape[0], h, width), "the skip is added to the conv's output")


def _dense(t):
    """t itself when contiguous (no copy, no autograd node), else a contiguous copy that autograd
    differentiates back to t: the kernels read 1x1 weights and biases as dense arrays."""
    return None if t is None else t.contiguous()


_kernels = None


def _fused():
    """The module of the fused ops (fastdrn.kernels.residual_distill, which also holds compress_skip,
    pack_groups, checked_signature and eager_fast_path), imported at the first call that runs them
    (importing fastdrn imports no kernel); afterwards a global lookup, not an import statement, per
    call. A module, not an object built here: torch.compile traces the first call too."""
    global _kernels
    if _kernels is None:
        from .kernels import residual_distill

        _kernels = residual_distill
    return _kernels


@backend.on_first_tensors_device
def residual_distill(z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha=0.2, recompute=False):
    """One residual distilling block: (N, D, H, W) -> (N, D + d, H, W), d = w_expand.shape[0] - D."""
    _checked(check_residual_distill, z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand)
    alpha = check_alpha("residual_distill", alpha)
    if backend.use_triton("residual_distill", z.device, z.dtype):
        fused = _fused()
        block = fused.dense_as_read([w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand])
        return fused.residual_distill(z, *block, alpha, recompute)
    return reference.residual_distill(z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha)


@backend.on_first_tensors_device
def compress_skip(z, w, b, skip, alpha=0.2):
    """ELU(conv1x1(z, w, b)) + skip: a group's compression and its long skip connection."""
    _checked(check_compress_skip, z, w, b, skip)
    alpha = check_alpha("compress_skip", alpha)
    if backend.use_triton("compress_skip", z.device, z.dtype):
        return _fused().compress_skip(z, _dense(w), _dense(b), skip, alpha)
    return reference.compress_skip(z, w, b, skip, alpha)


def distill_group(y, blocks, alpha=0.2, recompute=False):
    """A group's chain of residual distilling blocks: (N, C, H, W) -> (N, C + K*d, H, W).

    blocks: one (w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand) tuple per block. When
    no gradient is needed and the fused kernels run, the blocks write in place into one
    channels_last buffer of the final width (no concat copies); otherwise block by block.
    """
    return _group(y, blocks, alpha, recompute, None)


def distill_and_compress(y, blocks, w, b, alpha=0.2, recompute=False):
    """compress_skip(distill_group(y, blocks, alpha, recompute), w, b, y, alpha): a whole residual
    distilling group with its compression and long skip, as fastdrn.DRN runs each group. On the fused
    kernels the compression runs with the blocks: without gradients as one launch plan (one host
    round of checks and one replay a group); with them, in eager mode, in the group's one autograd
    node (one replay forward and one backward). Otherwise, and under torch.compile, as the two ops."""
    return _group(y, blocks, alpha, recompute, (w, b))


def distill_groups(y, groups, alpha=0.2, recompute=False):
    """fastdrn.DRN's body: y = distill_and_compress(y, blocks, w, b, alpha, recompute) for each
    (blocks, (w, b)) of `groups` in turn. On the fused kernels in eager mode the 3x3 weights of every
    group are packed for the kernels in one launch, not one a group (a stack of the weights and a
    transposing copy cost about 25 us a group on the host)."""
    read = []  # groups and their blocks in lists: iterators would be spent by the checks or the packing
    for k, group in enumerate(groups):
        group = tuple(group)
        if len(group) != 2:
            raise ValueError(f"distill_groups: each group is (blocks, (w, b)); group {k} has {len(group)} items")
        if len(group[1]) != 2:
            raise ValueError(f"distill_groups: group {k}'s compression is {len(group[1])} tensors, not (w, b)")
        read.append((_flat_blocks(group[0]), group[1]))
    return _distill_groups(y, read, alpha, recompute)


@backend.on_first_tensors_device
def _distill_groups(y, groups, alpha, recompute):
    """distill_groups over groups given as (the blocks' tensors in one flat list, 6 a block, (w, b)):
    what fastdrn.DRN calls, its groups being of that form by construction. In training on the fused
    kernels in eager mode, where y needs a gradient, every group runs in one autograd node
    (_body_in_one_node)."""
    alpha = check_alpha("distill_group", alpha)
    _check_activation("distill_groups", "y", y)  # before its device is read
    packs = packs_t = None
    # Decided once for every group: each keeps y's device and dtype.
    triton = bool(groups) and backend.use_triton("residual_distill", y.device, y.dtype)
    if triton and groups[0][0]:
        fused = _fused()
        if fused.eager_fast_path():
            w_convs = [w_conv for weights, _ in groups for w_conv in weights[2::6]]
            # Training: the backward's transposed packs too, in the same launch (where only
            # some other weight needs a gradient, each group's backward transposes its own).
            backward = torch.is_grad_enabled() and (y.requires_grad or any(_requires_grad(w) for w in w_convs))
            try:
                packs, packs_t = fused.pack_groups(w_convs, [len(weights) // 6 for weights, _ in groups], backward)
            except (AttributeError, TypeError, RuntimeError, IndexError):
                packs = packs_t = None  # a weight that is not as it should be: the group's checks name it
            if packs_t is not None and torch.is_grad_enabled() and y.requires_grad:
                out = _body_in_one_node(fused, y, groups, alpha, recompute, packs, packs_t)
                if out is not None:
                    return out
    for k, (weights, (w, b)) in enumerate(groups):
        y = _group_weights(y, weights, alpha, recompute, (w, b), None if packs is None else packs[k],
                           None if packs_t is None else packs_t[k], triton)
    return y


def _body_in_one_node(fused, y, groups, alpha, recompute, packs, packs_t):
    """_distill_groups' training in eager mode as one autograd node for all the groups
    (residual_distill_groups), where it applies: y needs a gradient (so every block does), every bias
    is present, and every 1x1 weight and bias is dense as the kernels read it. None elsewhere: the
    groups then run one by one, and their checks name any problem. Each group's checks run as its
    input is made, keyed by the whole body's signature, the group's place and its input's layout."""
    tensors, bounds = [], []
    for weights, compression in groups:
        start = len(tensors)
        tensors += weights
        tensors += compression
        bounds.append((start, len(tensors)))
    whole = fused.checked_signature(tensors)
    if whole is None or len(whole[1]) != len(tensors):  # not all tensors, or a bias absent
        return None
    number = whole[0]
    if number not in _DENSE:
        for start, end in bounds:
            blocks = tensors[start:end - 2]
            if not (all(map(operator.is_, blocks, fused.dense_as_read(blocks)))
                    and all(t.is_contiguous() for t in tensors[end - 2:end])):
                return None  # a dense copy is needed: the groups one by one make it
        if len(_DENSE) >= _PASSED_LIMIT:
            _DENSE.clear()
        _DENSE.add(number)

    def check(k, y_k, y_key):
        start, end = bounds[k]
        _checked(_check_group_and_compression, y_k, *tensors[start:end], signature=(number, k, y_key, y_k.device))

    return fused.residual_distill_groups(y, tensors, [len(weights) // 6 for weights, _ in groups], alpha, recompute,
                                         whole, check, packs, packs_t)


def _flat_blocks(blocks) -> list:
    """The blocks' tensors in one list, 6 a block, each block checked to be 6 tensors."""
    weights = []
    for block in blocks:
        block = tuple(block)
        if len(block) != 6:
            raise ValueError("distill_group: each block is 6 tensors (w_squeeze, b_squeeze, w_conv, b_conv, w_expand, "
                             f"b_expand), got {len(block)}")
        weights += block
    return weights


@backend.on_first_tensors_device
def _group(y, blocks, alpha, recompute, compression):
    """distill_group, then, with compression = (w, b), compress_skip of its output with y as the skip."""
    alpha = check_alpha("distill_group", alpha)
    _check_activation("distill_group", "y", y)  # before its device is read, and with no blocks too
    return _group_weights(y, _flat_blocks(blocks), alpha, recompute, compression)


def _group_weights(y, weights, alpha, recompute, compression, packs=None, packs_t=None, triton=None):
    """_group with the blocks' tensors in one flat list, 6 a block. On the fused kernels the
    compression joins the group's own work: the in-place inference path's launch plan where nothing
    needs a gradient, the group's autograd node where something does (unless only the compression
    needs one: then it runs as its own op after the in-place group). packs, packs_t: the blocks'
    3x3 weights packed by pack_groups (distill_groups), or None. triton: backend.use_triton for y's
    device and dtype, where the caller has asked it (distill_groups)."""
    tensors = [y, *weights]
    needs_grad = torch.is_grad_enabled() and any(map(_requires_grad, tensors))
    if triton is None:
        triton = backend.use_triton("residual_distill", y.device, y.dtype)
    if not weights or not triton:
        z = y
        for i in range(0, len(weights), 6):
            z = residual_distill(z, *weights[i:i + 6], alpha=alpha, recompute=recompute)
    else:
        fused = _fused()
        given = tensors + list(compression or ())
        # Eager: one signature, (key, pointers), keys the checks and the group's launch plan (traced,
        # the checks run in full, once).
        signature = fused.checked_signature(given) if fused.eager_fast_path() else None
        _checked(_check_group if compression is None else _check_group_and_compression, *given,
                 signature=None if signature is None else signature[0])
        # The compression joins the group's own work (its autograd node in training, its launch plan
        # in inference), unless only it needs a gradient: then it runs after. (compress_skip runs its
        # Triton kernel wherever residual_distill does: the backend is chosen per device and dtype.)
        compress = ()
        if compression is not None and (
                needs_grad or not (torch.is_grad_enabled() and any(map(_requires_grad, compression)))):
            compress = tuple(compression)
        if signature is None or signature[0] not in _DENSE:
            weights = fused.dense_as_read(weights)
            compress = tuple(map(_dense, compress))
            keyed = (y, *weights, *compress)
            if signature is not None and len(keyed) == len(given) and all(map(operator.is_, given, keyed)):
                if len(_DENSE) >= _PASSED_LIMIT:
                    _DENSE.clear()
                _DENSE.add(signature[0])
            else:
                signature = None  # a dense copy was made: the group's launch plan keys the copies
        if signature is not None and len(given) != 1 + len(weights) + len(compress):
            signature = None  # it also holds the compression, which runs after
        if needs_grad:  # each 3x3 kernel also computing the next block's squeeze; eager: one autograd node
            z = fused.residual_distill_chain(y, weights, alpha, recompute, compress, signature, packs, packs_t)
            if compress:  # eager: in the same node
                return z
        else:
            n, c, h, width = y.shape
            buffer = torch.empty((n, weights[-2].shape[0], h, width), device=y.device, dtype=y.dtype,
                                 memory_format=torch.channels_last)
            buffer[:, :c].copy_(y)
            if compress:
                return fused.residual_distill_group_(buffer, weights, alpha, compress=(*compress, y), packs=packs,
                                                     signature=signature)
            z = fused.residual_distill_group_(buffer, weights, alpha, packs=packs, signature=signature)
    return z if compression is None else compress_skip(z, *compression, y, alpha)


def _requires_grad(t) -> bool:
    """t.requires_grad, False for None and for what is not a tensor (which the checks then name)."""
    return getattr(t, "requires_grad", False)


def _check_group(y, *weights) -> int:
    """distill_group's input and its blocks' weights (6 tensors a block, in order); returns the
    group's output width."""
    _check_activation("distill_group", "y", y)
    width = y.shape[1]
    for i in range(0, len(weights), 6):
        _check_block_weights("distill_group", y, width, *weights[i:i + 6])
        width = weights[i + 4].shape[0]
    return width


def _check_group_and_compression(y, *tensors) -> None:
    """distill_and_compress's input, its blocks' weights, then the compression's w and b, whose skip
    is y: one check (and one signature for _checked) for the whole group."""
    *weights, w, b = tensors
    width = _check_group(y, *weights)
    _check_compression("distill_and_compress", ("y", y), "the group's output", width, w, b, y)


def check_pixel_shuffle(x, upscale_factor):
    """Checks pixel_shuffle's inputs; returns the factor as an int (anything torch takes as an int,
    such as a numpy integer, but not a bool or a float)."""
    op = "pixel_shuffle"
    _check_tensor(op, "x", x, "(N, C*s*s, H, W)", 4)
    _check_alike(op, dict(x=x))
    if isinstance(upscale_factor, torch.SymInt):  # a traced factor (torch.compile with dynamic shapes)
        factor = upscale_factor
    elif isinstance(upscale_factor, bool) or not hasattr(type(upscale_factor), "__index__"):
        raise TypeError(f"{op}: upscale_factor must be an int, got {type(upscale_factor).__name__}")
    else:
        factor = operator.index(upscale_factor)
    if factor < 1:
        raise ValueError(f"{op}: upscale_factor must be >= 1, got {factor}")
    if x.shape[1] % (factor * factor) != 0:
        raise ValueError(f"{op}: x has {x.shape[1]} channels, which is not divisible by upscale_factor**2 = "
                         f"{factor * factor}")
    return factor


def pixel_shuffle(x, upscale_factor):
    """(N, C*s*s, H, W) -> (N, C, H*s, W*s) with s = upscale_factor, in x's memory format: the result
    of torch.nn.functional.pixel_shuffle. CUDA tensors (and every tensor under FASTDRN_BACKEND=triton)
    go through the C++/CUDA extension (fastdrn.extension), which is built on first use if needed."""
    factor = check_pixel_shuffle(x, upscale_factor)
    if _use_extension("pixel_shuffle", x):
        return torch.ops.fastdrn_ext.pixel_shuffle(x, factor)
    return _torch_pixel_shuffle(x, factor)


def _torch_pixel_shuffle(x, factor):
    """torch.nn.functional.pixel_shuffle(x, factor), an empty x as a view: torch's CPU pixel_unshuffle
    (its backward) hands an empty input back in the input's shape (pytorch/pytorch PR 192816), and
    autograd refused that gradient."""
    if x.numel() == 0:
        n, c, h, w = x.shape
        c //= factor * factor
        return x.reshape(n, c, factor, factor, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, h * factor, w * factor)
    return torch.nn.functional.pixel_shuffle(x, factor)


_extension_fallback_said = False  # whether auto's fallback from the extension was said (once a process)


def _use_extension(op, x) -> bool:
    """Whether `op` runs the C++/CUDA extension on x: CUDA tensors under FASTDRN_BACKEND=auto, every
    tensor under triton (which raises, naming why, where the extension cannot run). Where auto falls
    back on a CUDA tensor, a warning says why, once."""
    global _extension_fallback_said
    from . import extension

    choice = backend.requested()
    if choice == "triton" or (choice == "auto" and x.device.type == "cuda"):
        reason = extension.unavailable_reason(x.device)
        if reason is None:
            return True
        if choice == "triton":
            raise RuntimeError(f"FASTDRN_BACKEND=triton but {op} cannot run fastdrn's kernel: {reason}; "
                               "FASTDRN_BACKEND=auto runs PyTorch's pixel shuffle where it cannot")
        if not _extension_fallback_said and not torch.compiler.is_compiling():  # traced: no graph break
            _extension_fallback_said = True
            warnings.warn(f"fastdrn: pixel shuffles of CUDA tensors run PyTorch's, not fastdrn's kernel: {reason} "
                          "(FASTDRN_BACKEND=triton makes this an error)", RuntimeWarning, stacklevel=3)
    return False


def _check_pixel_shuffle_bias(x, bias, upscale_factor):
    """_pixel_shuffle_bias's checks: pixel_shuffle's, then bias, one per channel of x; returns the factor."""
    factor = check_pixel_shuffle(x, upscale_factor)
    op = "pixel_shuffle_bias"
    _check_tensor(op, "bias", bias, "(C*s*s,)", 1)
    _check_alike(op, dict(x=x, bias=bias))
    if bias.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: bias has {bias.shape[0]} elements, expected one per channel of x "
                         f"(C*s*s = {x.shape[1]})")
    return factor


def _pixel_shuffle_bias(x, bias, upscale_factor):
    """pixel_shuffle(x + bias.view(1, -1, 1, 1), upscale_factor), the bias of the conv before the
    shuffle added as the shuffle gathers (one pass over x instead of two). Internal: not used by
    fastdrn.DRN yet (bench/profile_kernels.py times it). Routed as pixel_shuffle is."""
    factor = _check_pixel_shuffle_bias(x, bias, upscale_factor)
    if _use_extension("pixel_shuffle_bias", x):
        return torch.ops.fastdrn_ext.pixel_shuffle_bias(x, bias, factor)
    return _torch_pixel_shuffle(x + bias.view(1, -1, 1, 1), factor)  # reference.pixel_shuffle_bias's math


def check_shuffle_tail(u, b_up, w_tail, b_tail, mean, scale, out_dtype) -> None:
    """Every input of _shuffle_tail, each problem named (shape, dtype, device, channel count).
    Parameters may be u's dtype or float32 (as autocast leaves them), so not _check_alike."""
    op = "shuffle_tail"
    _check_tensor(op, "u", u, "(N, C*s*s, H, W)", 4)
    if u.numel() == 0:
        raise ValueError(f"{op}: u is empty (shape {tuple(u.shape)}); N, C*s*s, H and W must all be >= 1")
    if u.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: u has dtype {u.dtype}; supported: float16, bfloat16, float32, float64")
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise TypeError(f"{op}: scale must be an int, got {type(scale).__name__}")
    if not 1 <= scale <= SHUFFLE_TAIL_MAX_SCALE:
        raise ValueError(f"{op}: scale must be from 1 to {SHUFFLE_TAIL_MAX_SCALE}, got {scale}")
    if u.shape[1] % (scale * scale):
        raise ValueError(f"{op}: u has {u.shape[1]} channels, which is not divisible by scale**2 = {scale * scale}")
    channels = u.shape[1] // (scale * scale)
    _check_tensor(op, "w_tail", w_tail, "(n_colors, C, 3, 3)", 4)
    if tuple(w_tail.shape[1:]) != (channels, 3, 3):
        raise ValueError(f"{op}: w_tail has shape {tuple(w_tail.shape)}, expected (n_colors, {channels}, 3, 3): "
                         f"a 3x3 conv over the {channels} channels u's {u.shape[1]} shuffle to at scale {scale}")
    colors = w_tail.shape[0]
    if not 1 <= colors <= SHUFFLE_TAIL_MAX_COLORS:
        raise ValueError(f"{op}: w_tail has {colors} output channels; the kernel computes 1 to "
                         f"{SHUFFLE_TAIL_MAX_COLORS}")
    _check_tensor(op, "b_up", b_up, "(C*s*s,)", 1)
    if b_up.shape[0] != u.shape[1]:
        raise ValueError(f"{op}: b_up has {b_up.shape[0]} elements, expected one per channel of u ({u.shape[1]})")
    _check_tensor(op, "b_tail", b_tail, "(n_colors,)", 1)
    if b_tail.shape[0] != colors:
        raise ValueError(f"{op}: b_tail has {b_tail.shape[0]} elements, expected one per output channel ({colors})")
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"{op}: mean must be a torch.Tensor, got {type(mean).__name__}")
    if tuple(mean.shape) not in ((colors,), (1, colors, 1, 1)):
        raise ValueError(f"{op}: mean has shape {tuple(mean.shape)}, expected ({colors},) or (1, {colors}, 1, 1): "
                         "one value per output channel")
    for name, t in (("b_up", b_up), ("w_tail", w_tail), ("b_tail", b_tail), ("mean", mean)):
        if t.device != u.device:
            raise ValueError(f"{op}: {name} is on {t.device} but u is on {u.device}")
        if name == "mean":  # added to the accumulator, whatever its dtype
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{op}: mean has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
        elif t.dtype not in (u.dtype, torch.float32):
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but u has {u.dtype}; parameters are u's dtype "
                            "or float32 (as autocast leaves them: the kernel casts them)")
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: out_dtype {out_dtype} is not one of float16, bfloat16, float32, float64")


@backend.on_first_tensors_device
def _shuffle_tail(u, b_up, w_tail, b_tail, mean, scale, out_dtype=None, channels_last=False):
    """conv3x3(pixel_shuffle(u + b_up, scale), w_tail, b_tail, padding=1) + mean: DRN's output stage
    after the upsampler conv, in one Triton kernel (fastdrn.kernels.shuffle_tail) that never writes
    the shuffled image. Internal: fastdrn.DRN runs it under the launch option fuse_tail. Inference
    only (RuntimeError where a gradient would be needed). out_dtype: the output's dtype (default the
    promotion of u's and mean's, as `tail(v) + mean` gives); channels_last: the output's format.
    Where the Triton kernels do not run, the reference's ops give the same result."""
    if out_dtype is None and isinstance(u, torch.Tensor) and isinstance(mean, torch.Tensor):
        out_dtype = torch.promote_types(u.dtype, mean.dtype)
    tensors = (u, b_up, w_tail, b_tail, mean)
    signature = None  # _checked's own (tensors only) cannot hold scale and out_dtype
    if isinstance(scale, int) and all(isinstance(t, torch.Tensor) for t in tensors):
        signature = (*((t.shape, t.dtype, t.device) for t in tensors), type(scale), scale, out_dtype)
    _checked(check_shuffle_tail, *tensors, scale, out_dtype, signature=signature)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, b_up, w_tail, b_tail, mean)):
        raise RuntimeError("shuffle_tail is inference-only (it has no backward): call it under torch.no_grad() "
                           "or with inputs that do not require grad")
    if backend.use_triton("shuffle_tail", u.device, u.dtype):
        from .kernels.shuffle_tail import shuffle_tail

        return shuffle_tail(u, b_up, w_tail, b_tail, mean, scale, out_dtype, channels_last)
    # mean as (1, n_colors, 1, 1): a (n_colors,) one would be added along the output's width.
    out = reference.shuffle_tail(u, b_up.to(u.dtype), w_tail.to(u.dtype), b_tail.to(u.dtype),
                                 mean.reshape(1, -1, 1, 1), scale)
    return out.to(out_dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
