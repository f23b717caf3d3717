"""Whole-step CUDA graphs: a training step and an upscaler that replay one captured graph per input shape.

A DRN step launches hundreds of small kernels; on a GPU their host-side launch cost, not the
arithmetic, sets the step time. ``make_train_step`` and ``make_upscaler`` capture the whole step
(forward, loss, backward and optimizer step; or the forward) once per input shape and replay it, so
the host issues one graph launch and two input copies per call. On the CPU, or with
``cuda_graph=False``, the same step runs eagerly with the same results, so code written against
these functions runs anywhere.

How a shape becomes a graph: its first ``WARMUP_CALLS`` calls run eagerly on a side stream (each
is a real step: Triton compiles and autotunes there, cuDNN picks its algorithms, the optimizer and
the GradScaler create their state). The next call captures: a training step then replays the graph
(so every call is exactly one optimizer step), an upscaler computes that call's result eagerly from
the graph's own input buffer; later calls replay. Graphs are kept per (shape, dtype, memory format,
model.training, the caller's own autocast around the call, FASTDRN_BACKEND and the launch settings of
fastdrn.kernels.set_launch_options) in a least-recently-used cache of
``max_graphs`` entries; a shape seen only once (an evaluation set of differently sized images)
never pays for a capture. All graphs of one step
or upscaler share one memory pool.

What the graph bakes in, and so what a caller must not change after a shape was captured:

- the model's parameters and buffers: their storage, not their values. ``load_state_dict`` and
  in-place updates are fine; new storage for the parameters (``model.half()``, ``p.data = ...``) is
  detected and the shapes are captured again, and so are parameters frozen or unfrozen
  (``requires_grad``); a move to another device raises, and a replaced module, parameter or buffer
  is not detected (make a new step);
- the optimizer's float hyperparameters: a float ``lr`` is a constant of the graph, so a
  learning-rate scheduler needs the lr as a tensor on the device, ``torch.optim.Adam(params,
  lr=torch.tensor(1e-4, device="cuda"), capturable=True)``: the scheduler then updates that tensor
  in place and the graph reads it. A float hyperparameter that changes after capture raises;
  ``step.reset()`` drops the graphs on purpose. ``optimizer.load_state_dict`` is detected and the
  shapes are captured again.

Gradients: every call computes fresh gradients (``.grad`` is set to None before each step for the
model's parameters and any others the optimizer steps, so calls never accumulate); after a call
``.grad`` holds that step's gradients until the next call.
Not thread-safe; a DistributedDataParallel model is not captured (it runs eagerly; ``cuda_graph=True``
raises).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Callable

import torch

from . import backend
from .kernels.settings import launch_options

__all__ = ["make_train_step", "make_upscaler", "TrainStep", "Upscaler", "WARMUP_CALLS", "capture_unavailable"]

# Eager calls of a shape before it is captured (torch's CUDA-graph notes warm up three iterations).
WARMUP_CALLS = 3

AMP_DTYPES = (torch.bfloat16, torch.float16)


def _first_parameter(model: torch.nn.Module) -> torch.Tensor:
    for t in model.parameters():
        return t
    raise ValueError(f"{type(model).__name__} has no parameters: cannot tell which device it runs on")


def _check_device(now: torch.device, made: torch.device, maker: str) -> None:
    if now != made:
        raise RuntimeError(f"the model moved from {made} to {now} after its CUDA graphs were set up: "
                           f"make a new one with {maker}")


def capture_unavailable(device: torch.device | str) -> str | None:
    """Why a model on `device` cannot be captured in a CUDA graph, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the model is on {device}, and CUDA graphs need a CUDA device"
    if backend.interpreting():
        return "TRITON_INTERPRET=1 runs the Triton kernels through the host, which cannot be captured"
    return None


def _graphs_on(cuda_graph: bool | None, device: torch.device, why_not_here: str | None = None) -> bool:
    """Whether to capture: None means on where possible; True where it cannot run raises.
    `why_not_here`: a reason of the caller's own that rules capture out."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):  # "False" is truthy: it would capture
        raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
    why_not = capture_unavailable(device) or why_not_here
    if cuda_graph is None:
        return why_not is None
    if cuda_graph and why_not is not None:
        raise ValueError(f"cuda_graph=True, but {why_not}; pass cuda_graph=None (capture where possible) or False")
    return bool(cuda_graph)


def _check_batch(name: str, t) -> None:
    """A float tensor, or a TypeError naming the argument (not an AttributeError, or a failure deep
    inside the model: an integer image would even have its mean subtracted in its own dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor image batch, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (values in [0, rgb_range]), got {t.dtype}: "
                        f"convert an 8-bit image with {name}.float() / 255")


def _check_output(sr) -> None:
    if not isinstance(sr, torch.Tensor):
        raise TypeError(f"the model's forward must return the SR batch as one tensor, got a "
                        f"{type(sr).__name__}: wrap the model so that its forward returns that tensor")


def _check_input_dtype(lr: torch.Tensor, model_dtype: torch.dtype, autocast_on: bool) -> None:
    """lr in the dtype of the model's parameters, unless autocast (amp_dtype or the caller's own)
    casts the convolutions' inputs, which it does for every float dtype but float64; else the first
    convolution fails deep inside with "Input type (double) and bias type (float)". Not converted:
    float64 into a float32 model, or float16 without amp_dtype, is more likely a mistake than a wish."""
    if lr.dtype == model_dtype:
        return
    if not autocast_on:
        raise TypeError(f"lr is {lr.dtype}, but the model's parameters are {model_dtype}: pass lr.to({model_dtype}), "
                        f"or run the forward under autocast (amp_dtype=torch.bfloat16 or torch.float16)")
    if torch.float64 in (lr.dtype, model_dtype):
        raise TypeError(f"lr is {lr.dtype}, but the model's parameters are {model_dtype}, and autocast does not "
                        f"cast float64: pass lr.to({model_dtype})")


def _check_amp_dtype(amp_dtype) -> None:
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}")


def _autocast(device: torch.device, amp_dtype):
    """The forward's autocast, amp_dtype's or the caller's own around the call, with autocast's
    weight-cast cache off. Capture needs it off (torch's CUDA-graph notes): a caller's autocast around a
    whole loop keeps its cache across calls, so the capture would read the weight casts an earlier,
    eager call cached instead of casting in the graph, and every replay would compute with those stale
    copies. Casting each weight at its use gives the same values, so the eager path runs it the same way."""
    if amp_dtype is not None:
        return torch.autocast(device.type, dtype=amp_dtype, cache_enabled=False)
    if torch.is_autocast_enabled(device.type) and torch.is_autocast_cache_enabled():
        return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)
    return contextlib.nullcontext()


def _outer_autocast(device_type: str) -> tuple:
    """The caller's own autocast for `device_type` around a call: a graph captured under it has its casts
    (the forward's, and the loss's, which runs outside `amp_dtype`'s autocast) baked in, so it is part
    of the key. Two cheap queries a call; the dtype only counts when autocast is on."""
    if torch.is_autocast_enabled(device_type):
        return True, torch.get_autocast_dtype(device_type)
    return False, None


def _settings() -> tuple:
    """What a graph holds besides its inputs: the kernels of the backend asked for (FASTDRN_BACKEND,
    read at every call as the ops read it) and of the launch settings in force (set_launch_options:
    a fused tail, the backward's fold and schedule, configs), so both are part of the key."""
    return backend.requested(), launch_options().key


def _warm_up(stream: torch.cuda.Stream, fn, *args) -> torch.Tensor:
    """fn(*args) eagerly on the side stream `stream`, ordered after and before the current stream's
    work (torch's CUDA-graph recipe); its result is handed to the current stream."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream), warnings.catch_warnings():
            # A capturable optimizer warns when it steps uncaptured; warm-up steps are uncaptured on purpose.
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            out = fn(*args)
    finally:
        current.wait_stream(stream)
    out.record_stream(current)  # the caller uses and frees it on the current stream
    return out


def _as_baked(value):
    """A hyperparameter as a graph holds it: a tensor by identity (the graph reads its memory), the
    rest by value (the graph holds a copy); tuples (betas) item by item."""
    if isinstance(value, torch.Tensor):
        return "tensor", id(value)
    if isinstance(value, (tuple, list)):
        return tuple(_as_baked(v) for v in value)
    return value


def _is_tensor(baked) -> bool:
    return isinstance(baked, tuple) and len(baked) == 2 and baked[0] == "tensor"


def _layout(t: torch.Tensor) -> tuple:
    """What a static input buffer must match: shape, dtype and memory format (not the strides of a
    view, so that the tiles of different images share a graph)."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return tuple(t.shape), t.dtype, channels_last


def _static_buffer(layout: tuple, device: torch.device) -> torch.Tensor:
    shape, dtype, channels_last = layout
    return torch.empty(shape, dtype=dtype, device=device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class _GraphCache:
    """Captured graphs by key, least recently used first out, and the eager calls of keys not yet captured."""

    def __init__(self, max_graphs: int):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:  # True is 1
            raise ValueError(f"max_graphs must be a positive integer, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.warm: OrderedDict = OrderedDict()  # key -> eager calls so far (bounded: shapes seen once add up)

    def get(self, key):
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
        return entry

    def due(self, key) -> bool:
        """Count one call of an uncaptured key; True when it has had its warm-up calls."""
        calls = self.warm.pop(key, 0)
        if calls >= WARMUP_CALLS:
            return True
        self.warm[key] = calls + 1
        while len(self.warm) > 8 * self.max_graphs:
            self.warm.popitem(last=False)
        return False

    def add(self, key, entry) -> None:
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def clear(self) -> None:
        self.graphs.clear()
        self.warm.clear()


class _Captured:
    """The device side of one capture: the graph, its static inputs and outputs, and what it baked in."""

    def __init__(self, graph, inputs, output, grads=()):
        self.graph = graph
        self.inputs = inputs
        self.output = output
        self.grads = grads
        # One gradient to tell whether .grad still holds this graph's tensors (None: no gradients at all).
        self.sentinel = next((i for i, g in enumerate(grads) if g is not None), None)


def _capture(fn, static_inputs, pool):
    """fn(*static_inputs) recorded in a new CUDA graph drawing on `pool` (None: a new pool)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: a DataLoader's pin-memory thread allocating host memory must not abort the capture.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn(*static_inputs)
    return graph, out


class TrainStep:
    """``step(lr, hr) -> loss``: one optimizer step on the batch; see :func:`make_train_step`."""

    def __init__(self, model, optimizer, loss_fn, *, amp_dtype=None, grad_scaler=None, cuda_graph=None,
                 max_graphs=8):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (e.g. torch.nn.functional.l1_loss), got {type(loss_fn).__name__}")
        if isinstance(loss_fn, type) and issubclass(loss_fn, torch.nn.Module):  # callable, but makes a module
            raise TypeError(f"loss_fn is the class {loss_fn.__name__}: pass an instance, {loss_fn.__name__}()")
        _check_amp_dtype(amp_dtype)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")
        scaling = grad_scaler is not None and grad_scaler.is_enabled()
        if amp_dtype == torch.float16 and not scaling:
            raise ValueError("amp_dtype=torch.float16 needs an enabled grad_scaler (torch.amp.GradScaler): "
                             "float16 gradients underflow without loss scaling; or use amp_dtype=torch.bfloat16")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler if scaling else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in stepped for p in trainable):  # each call would train nothing
            raise ValueError(f"the optimizer steps none of the {type(model).__name__}'s trainable parameters: "
                             f"build it over this model's parameters (after any copy of the model)")
        self._params = self._parameters()
        # DDP is not captured (as documented): torch's recipe for capturing it (NCCL async error handling
        # off, DDP built on a side stream, 11 eager iterations first) is not what this step does.
        ddp = isinstance(getattr(model, "_orig_mod", model), torch.nn.parallel.DistributedDataParallel)
        why_not = "the model is wrapped in DistributedDataParallel, which is not captured" if ddp else None
        self.cuda_graph = _graphs_on(cuda_graph, self.device, why_not)
        self._graph_device = self.device
        self._cache = _GraphCache(max_graphs)
        self._pool = None
        self._stream = None
        self._baked = None  # what every graph of this step assumes (see _check_unchanged)
        if self.cuda_graph:
            self._check_capturable()

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are now (the eager path follows them; graphs stay where made)."""
        return self._params[0].device

    # --------------------------------------------------------------------------------- eager
    def _compute(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Forward (under autocast), loss (outside it, on the output cast to the target's dtype),
        backward and the optimizer step; gradients must be None on entry."""
        with _autocast(self.device, self.amp_dtype):
            sr = self.model(lr)
        _check_output(sr)  # else an AttributeError on sr.shape below
        if sr.shape != hr.shape:  # else the loss broadcasts a batch of one or an image without N, or fails
            raise ValueError(f"hr has shape {tuple(hr.shape)}, but the model's output for lr {tuple(lr.shape)} "
                             f"has shape {tuple(sr.shape)}: the target must have the output's shape")
        loss = self.loss_fn(sr if sr.dtype == hr.dtype else sr.to(hr.dtype), hr)
        # Checked before backward and the optimizer step, so a refused loss changes nothing.
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return the loss as a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return one value, got a tensor of shape {tuple(loss.shape)}: "
                             f"reduce it (e.g. reduction='mean')")
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a loss without autograd history (detached, or not computed from "
                             "sr): there is nothing to differentiate")
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach().reshape(())

    def _parameters(self) -> list:
        """Whose .grad each call sets to None: the model's parameters, frozen ones too (they may be
        unfrozen later), then those the optimizer steps that the model does not hold (a learnable loss
        weight), as the eager loop's optimizer.zero_grad() reaches them."""
        params = list(self.model.parameters())
        held = {id(p) for p in params}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in held:
                    held.add(id(p))
                    params.append(p)
        self._groups = len(self.optimizer.param_groups)
        return params

    def _clear_grads(self) -> None:
        if len(self.optimizer.param_groups) != self._groups:  # optimizer.add_param_group
            self._params = self._parameters()
        for p in self._params:
            p.grad = None

    def _eager(self, lr, hr) -> torch.Tensor:
        self._clear_grads()
        device = self.device
        return self._compute(lr.to(device, non_blocking=True), hr.to(device, non_blocking=True))

    # ------------------------------------------------------------------------------- graphed
    def _check_capturable(self) -> None:
        opt = self.optimizer
        name = type(opt).__name__
        groups = opt.param_groups
        if any("capturable" in g for g in groups) and not all(g.get("capturable") for g in groups):
            raise ValueError(
                f"{name} was built with capturable=False, so its step cannot be captured in a CUDA graph: "
                f"build it with capturable=True (and a tensor lr if a scheduler changes it), e.g. "
                f"torch.optim.{name}(params, lr=torch.tensor(1e-4, device='cuda'), capturable=True, fused=True); "
                f"or pass cuda_graph=False")
        if self.grad_scaler is not None and not getattr(opt, "_step_supports_amp_scaling", False):
            raise ValueError(
                f"a GradScaler can be captured only with an optimizer that applies the loss scale on the "
                f"device (GradScaler.step otherwise reads the inf check on the host): build "
                f"torch.optim.{name if name in ('Adam', 'AdamW') else 'Adam'}(..., fused=True, capturable=True); "
                f"or pass cuda_graph=False")

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _hyperparameters(self) -> list:
        """Every param group's settings as the graph sees them: tensors by identity, the rest by value."""
        return [tuple((k, _as_baked(v)) for k, v in g.items() if k != "params") for g in self.optimizer.param_groups]

    def _bake(self) -> dict:
        first = self.optimizer.param_groups[0]["params"][0]
        # optimizer.state itself: load_state_dict replaces it, which its first parameter's state (None
        # while that parameter is frozen) cannot show
        return dict(param_ptr=self._params[0].data_ptr(), states=self.optimizer.state,
                    state=self.optimizer.state.get(first),
                    groups=len(self.optimizer.param_groups), hyper=self._hyperparameters(),
                    trainable=[p.requires_grad for p in self._params])

    def _check_unchanged(self) -> None:
        """Cheap checks of what the graphs baked in; drops them where re-capturing is right, raises where not."""
        baked = self._baked
        p0 = self._params[0]
        first = self.optimizer.param_groups[0]["params"][0]
        if (p0.data_ptr() != baked["param_ptr"] or self.optimizer.state is not baked["states"]
                or self.optimizer.state.get(first) is not baked["state"]
                or len(self.optimizer.param_groups) != baked["groups"]
                or [p.requires_grad for p in self._params] != baked["trainable"]):
            # new parameter storage or optimizer state (model.to, optimizer.load_state_dict), or parameters
            # frozen or unfrozen: the graphs' backward computes the gradients of those trainable at capture
            self.reset()
            return
        now = self._hyperparameters()
        if now != baked["hyper"]:
            for i, (was, is_) in enumerate(zip(baked["hyper"], now)):
                for (k, v0), (_, v1) in zip(was, is_):
                    if v0 != v1:
                        change = (f"changed ({v0!r} -> {v1!r})" if not (_is_tensor(v0) or _is_tensor(v1)) else
                                  "was replaced by another object (the graph reads the old tensor: update it in place)")
                        # Only an optimizer with a capturable option (Adam, AdamW) can take the tensor
                        # advice; SGD has none and its capture holds the float as it was.
                        tensor = ("Give the optimizer that hyperparameter as a tensor on the device (e.g. "
                                  "lr=torch.tensor(1e-4, device='cuda') with capturable=True: a scheduler then "
                                  "updates it in place), or call" if "capturable" in self.optimizer.param_groups[i]
                                  else f"{type(self.optimizer).__name__} has no capturable option to read it from "
                                  f"a tensor: call")
                        raise RuntimeError(
                            f"optimizer param_groups[{i}][{k!r}] {change} after the training step was captured in "
                            f"a CUDA graph, which replays the old value. {tensor} step.reset() after changing it "
                            f"(each shape is then captured again), or pass cuda_graph=False")
            raise RuntimeError("the optimizer's param groups changed after the training step was captured; "
                               "call step.reset()")

    def _capture_step(self, key) -> _Captured:
        static = (_static_buffer(key[0], self.device), _static_buffer(key[1], self.device))
        # Gradients None at capture: backward allocates them in the graph's pool and every replay
        # writes them afresh, instead of accumulating into a tensor from before.
        self._clear_grads()
        try:
            with torch.cuda.device(self.device):
                graph, loss = _capture(self._compute, static, self._pool)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            raise RuntimeError(f"capturing the training step in a CUDA graph failed ({type(exc).__name__}: "
                               f"{exc}); a step that synchronizes with the host (.item(), printing a tensor, "
                               f"data-dependent control flow) cannot be captured: pass cuda_graph=False") from exc
        if self._pool is None:
            self._pool = graph.pool()
        # The graph's outputs stay referenced here for its lifetime: graphs sharing the pool then never
        # hand each other's outputs out as scratch, so they may replay in any order.
        grads = [p.grad for p in self._params]
        return _Captured(graph, static, loss, grads)

    def _restore_grads(self, entry: _Captured) -> None:
        for p, g in zip(self._params, entry.grads):
            p.grad = g

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        _check_batch("lr", lr)
        _check_batch("hr", hr)
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise RuntimeError("the training step needs autograd, but it was called under torch.no_grad() or "
                               "torch.inference_mode(): call it outside them")
        if lr.numel() == 0 or hr.numel() == 0:
            raise ValueError(f"lr {tuple(lr.shape)} and hr {tuple(hr.shape)}: an empty batch has no loss to "
                             f"take a training step on")
        p0 = self._params[0]
        outer = _outer_autocast(p0.device.type)
        _check_input_dtype(lr, p0.dtype, self.amp_dtype is not None or outer[0])
        if not self.cuda_graph:
            return self._eager(lr, hr)
        _check_device(p0.device, self._graph_device, "fastdrn.make_train_step")
        if self._baked is not None:
            self._check_unchanged()
        key = (_layout(lr), _layout(hr), self.model.training, outer, _settings())
        entry = self._cache.get(key)
        if entry is None:
            if not self._cache.due(key):
                with torch.cuda.device(self.device):
                    return _warm_up(self._side_stream(), self._eager, lr, hr)
            entry = self._capture_step(key)
            self._cache.add(key, entry)
            if self._baked is None:
                self._baked = self._bake()
        static_lr, static_hr = entry.inputs
        static_lr.copy_(lr, non_blocking=True)
        static_hr.copy_(hr, non_blocking=True)
        entry.graph.replay()
        s = entry.sentinel
        if s is not None and self._params[s].grad is not entry.grads[s]:
            self._restore_grads(entry)
        return entry.output.clone()

    @property
    def num_graphs(self) -> int:
        """How many shapes are captured now."""
        return len(self._cache.graphs)

    def reset(self) -> None:
        """Forget every captured graph (and its memory pool): each shape warms up and is captured again."""
        self._cache.clear()
        self._pool = None
        self._baked = None


class Upscaler:
    """``up(lr) -> sr``: inference on one batch; see :func:`make_upscaler`."""

    def __init__(self, model, *, amp_dtype=None, cuda_graph=None, max_graphs=8):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_amp_dtype(amp_dtype)
        self.model = model
        self.amp_dtype = amp_dtype
        self._first_param = _first_parameter(model)
        self.cuda_graph = _graphs_on(cuda_graph, self.device)
        self._graph_device = self.device
        self._cache = _GraphCache(max_graphs)
        self._pool = None
        self._stream = None
        self._param_ptr = None

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are now (the eager path follows them; graphs stay where made)."""
        return self._first_param.device

    def _forward(self, lr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _autocast(self.device, self.amp_dtype):
            sr = self.model(lr)
        _check_output(sr)  # else handed back as is eagerly, and an AttributeError on a replay's clone
        return sr

    def _eager(self, lr):
        return self._forward(lr.to(self.device, non_blocking=True))

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        _check_batch("lr", lr)
        p0 = self._first_param
        outer = _outer_autocast(p0.device.type)
        _check_input_dtype(lr, p0.dtype, self.amp_dtype is not None or outer[0])
        if not self.cuda_graph:
            return self._eager(lr)
        _check_device(p0.device, self._graph_device, "fastdrn.make_upscaler")
        if self._param_ptr is not None and p0.data_ptr() != self._param_ptr:
            self.reset()  # parameters moved (model.to, model.half): the graphs read the old storage
        key = (_layout(lr), self.model.training, outer, _settings())
        entry = self._cache.get(key)
        if entry is not None:
            entry.inputs[0].copy_(lr, non_blocking=True)
            entry.graph.replay()
            return entry.output.clone()  # the caller's own tensor: the next replay rewrites the static one
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device):
            if not self._cache.due(key):
                return _warm_up(self._stream, self._eager, lr)
            # The call that captures computes its result eagerly from the static input: the last
            # warm-up then sees exactly the buffer the graph will read.
            static = _static_buffer(key[0], self.device)
            static.copy_(lr, non_blocking=True)
            out = _warm_up(self._stream, self._forward, static)
            try:
                graph, static_out = _capture(self._forward, (static,), self._pool)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:
                raise RuntimeError(f"capturing the model's forward in a CUDA graph failed ({type(exc).__name__}: "
                                   f"{exc}); pass cuda_graph=False") from exc
        if self._pool is None:
            self._pool = graph.pool()
        self._param_ptr = p0.data_ptr()
        self._cache.add(key, _Captured(graph, (static,), static_out))
        return out

    @property
    def num_graphs(self) -> int:
        return len(self._cache.graphs)

    def reset(self) -> None:
        """Forget every captured graph (and its memory pool)."""
        self._cache.clear()
        self._pool = None
        self._param_ptr = None


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, amp_dtype=None,
                    grad_scaler=None, cuda_graph: bool | None = None, max_graphs: int = 8) -> TrainStep:
    """``step(lr, hr) -> loss``: one training step per call, from a CUDA graph on a GPU.

    Each call sets the trainable parameters' ``.grad`` to None, runs ``sr = model(lr)`` (under
    ``torch.autocast`` when ``amp_dtype`` is torch.bfloat16 or torch.float16), ``loss = loss_fn(sr,
    hr)`` outside autocast with ``sr`` cast to ``hr``'s dtype, backward (through ``grad_scaler`` when
    one is given and enabled) and ``optimizer.step()`` (``grad_scaler.step`` and ``update``), and
    returns the loss as a 0-d tensor on the model's device: nothing waits for the GPU unless the
    caller reads it. ``lr`` and ``hr`` are float tensors on any device (copied to the model's), ``hr``
    of ``sr``'s shape; ``lr`` in the dtype of the model's parameters unless autocast (``amp_dtype``,
    or the caller's own) casts it, which it does for all but float64 (a TypeError names both dtypes), ``hr`` of any float dtype.

    ``cuda_graph``: None (default) captures where it can (a CUDA model, Triton not interpreted),
    True captures or raises, False runs eagerly. Capturing needs an optimizer that has a
    ``capturable`` option built with ``capturable=True`` (``torch.optim.Adam``/``AdamW``; with a
    GradScaler also ``fused=True``), checked here (one without the option, SGD, is captured as it is), and a tensor ``lr`` for a scheduler to reach the graph (see this module's notes).
    float16 needs an enabled GradScaler, on every path. ``max_graphs``: shapes kept captured.
    """
    return TrainStep(model, optimizer, loss_fn, amp_dtype=amp_dtype, grad_scaler=grad_scaler,
                     cuda_graph=cuda_graph, max_graphs=max_graphs)


def make_upscaler(model: torch.nn.Module, *, amp_dtype=None, cuda_graph: bool | None = None,
                  max_graphs: int = 8) -> Upscaler:
    """``up(lr) -> sr``: the model's forward without autograd, from a CUDA graph per input shape on a GPU.

    ``lr`` is a float tensor on any device (copied to the model's); ``sr`` is a new tensor on the
    model's device that the caller owns. ``amp_dtype``: run under ``torch.autocast`` in
    torch.bfloat16 or torch.float16 (for a model stored in float32); a model
    already cast to a 16-bit dtype takes inputs of that dtype and needs none. Without autocast
    (``amp_dtype`` or the caller's own), and for float64 with it, ``lr`` must have the parameters'
    dtype (a TypeError names both). The model's mode is
    the caller's (``model.eval()`` for inference). ``cuda_graph`` as in :func:`make_train_step`;
    ``max_graphs`` shapes stay captured (least recently used out).
    """
    return Upscaler(model, amp_dtype=amp_dtype, cuda_graph=cuda_graph, max_graphs=max_graphs)
