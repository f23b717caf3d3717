"""Launch plans: a region of launcher code recorded once per input signature, then replayed.

A region is a function of some tensors (a group's blocks forward or backward, a compression) whose
launchers allocate tensors and launch kernels, and whose every decision depends only on the inputs'
shapes, strides, dtypes, storage offsets and 16-byte alignment, the device, and constants the caller
passes. `planned(fn, static, inputs)` runs fn(static, inputs) the first time it sees a signature,
recording each allocation (kernels/_common.py `track`) and each launch (`launch`), and builds from
them one Python function that does the same work: every launch a direct call of the kept compiled
kernel's launcher with its grid and arguments written in, the tensors it returns allocated, and
every tensor that lives only inside the region carved out of one workspace whose pieces are reused
once their last kernel is queued (same stream, so in order). Later calls with that signature run
that function: no argument binding, specialization keys, configs or Python per launcher.

A caller may key fewer inputs than it passes (packed weights, activations a planned forward saved:
tensors that follow from the keyed ones); a replay checks those others' shapes, strides, dtypes,
alignment and None-ness, and on any difference returns MISMATCH and fn runs instead. A launch may
also read a view the region made of an input or of one of its allocations (a stack of packed
weights unbound, a group's saved activations carved out of one tensor): its address is that
tensor's plus a fixed offset.

Anything the recording cannot account for makes the signature unplannable, and it keeps running
fn: a launch argument that is neither an input, a tracked allocation nor a view of one, a returned
tensor that is neither an input nor a tracked allocation (an untracked copy, say), a launch that
did not end in a kept kernel, an allocation on another device, one tensor passed at two input
positions. One thread records at a time: a region another thread reaches meanwhile runs fn. Under
TRITON_INTERPRET=1 the same plans replay the interpreted kernels with views of the workspace, so
the CPU tests check replays against the launchers bit for bit (tests/test_plans.py).
docs/launch-path.md has the measurements.
"""
from __future__ import annotations

from functools import reduce
from itertools import count
from operator import attrgetter, or_
from threading import Lock, get_ident

import torch
from triton.runtime.driver import driver as triton_driver

from . import _common
from .settings import plans_enabled, reread_plans_setting, set_launch_plans  # noqa: F401 - set_launch_plans: named here too

WORKSPACE_ALIGN = 256  # bytes: every piece of the workspace starts at a multiple (Triton asks 16)
PLANS_LIMIT = 512       # signatures kept; all forgotten when full

failures: dict = {}  # region function -> why its last unplannable signature was refused (for tests)
MISMATCH = object()  # what a replay returns when an input it does not key differs from the recording
# Taken to claim _common.recorder (recordings only, not replays): two threads past planned()'s check
# would otherwise both set it, and the one overwritten would record none of its later launches.
_claim = Lock()


def reset() -> None:
    """Forget every plan and failure, and read FASTDRN_LAUNCH_PLANS again at the next region (tests)."""
    reread_plans_setting()
    _common.launch_plans.clear()
    failures.clear()


_shape, _dtype, _device = attrgetter("shape"), attrgetter("dtype"), attrgetter("device")
_Tensor = torch.Tensor


def tensor_signature(tensors: list) -> tuple:
    """(key, pointers): the key is what launchers read of these tensors besides their contents
    (shapes, strides, dtypes, storage offsets and 16-byte alignment, where None sits); pointers, the
    present tensors' addresses, read once here for the alignment and handed to a replay, which then
    reads none of them again."""
    present = [t for t in tensors if t is not None]
    pointers = tuple(map(_Tensor.data_ptr, present))
    return _layout_key(tensors, present, pointers), pointers


def _layout_key(tensors: list, present: list, pointers: tuple) -> tuple:
    """Attribute by attribute over the list: a tuple per tensor cost a third more (55 tensors a
    group). The alignment is one 0 where every address is a multiple of 16 (fresh tensors and
    parameters), else each one's remainder."""
    return (tuple(t is None for t in tensors) if len(present) < len(tensors) else None,
            tuple(map(_shape, present)), tuple(map(_Tensor.stride, present)), tuple(map(_dtype, present)),
            tuple(map(_Tensor.storage_offset, present)),
            0 if not reduce(or_, pointers, 0) & 15 else tuple(p & 15 for p in pointers))


def pointers(tensors: list) -> tuple:
    """The addresses of the tensors that are not None, in order: the pointers of their tensor_signature."""
    return tuple(map(_Tensor.data_ptr, [t for t in tensors if t is not None]))


_numbers: dict = {}  # checked_signature's keys -> the number that stands for each
_next_number = count()  # never reused, so a number kept by a caller after a clear matches nothing new
NUMBERS_LIMIT = 4096    # keys numbered; all forgotten when full


def checked_signature(tensors: list) -> tuple | None:
    """(number, pointers): tensor_signature of these tensors (tensors or None) with each one's device
    added to its key, the key replaced by a number that stands for it; None where one is not a dense
    tensor (the full checks then name it). The key holds everything fastdrn.ops's input checks read,
    so ops keys the checks it has passed by the number, and hands the whole to `planned` for the same
    tensors: one pass over a group's 57 tensors instead of two (about 20 us a group on the host). A
    number, not the key: a tuple does not keep its hash, and hashing a group's key costs about 4 us
    each time a set or a plan looks it up (three or four times a group)."""
    try:
        present = [t for t in tensors if t is not None]
        pointers = tuple(map(_Tensor.data_ptr, present))
        key = _layout_key(tensors, present, pointers), tuple(map(_device, present))
    except (AttributeError, TypeError, RuntimeError):  # RuntimeError: a sparse or mkldnn tensor's data_ptr
        return None
    number = _numbers.get(key)
    if number is None:
        if len(_numbers) >= NUMBERS_LIMIT:
            _numbers.clear()
        number = _numbers[key] = next(_next_number)
    return number, pointers


def planned(fn, static: tuple, inputs: list, keyed: int | None = None, signature: tuple | None = None):
    """fn(static, inputs), replayed from its plan when this signature has one (module docstring).

    fn's result: tensors, None and constants in nested tuples and lists. static: hashable values fn
    depends on besides the inputs (alpha, flags). Inputs are tensors or None, all on one device; the
    signature reads the first `keyed` (default all): the caller vouches that the rest (tensors it
    derived from those, such as packed weights or activations saved by a planned region) follow
    from them and from static. signature: checked_signature of those keyed inputs, if the caller
    has it."""
    if (not plans_enabled() or _common.recorder is not None or torch.compiler.is_compiling()
            or _common.wrap_triton_enabled()):
        return fn(static, inputs)
    interpreted = _common.KERNELS_INTERPRETED
    if not interpreted and not _common.lean_launches_possible():
        return fn(static, inputs)
    first = next(t for t in inputs if t is not None)
    device = None if interpreted else triton_driver.active.get_current_device()
    if signature is None:
        signature = tensor_signature(inputs if keyed is None else inputs[:keyed])
    key = (fn, static, first.device, device, signature[0])
    plans = _common.launch_plans
    plan = plans.get(key, False)
    if plan:
        if plan.kernels_idle():
            result = plan.replay(inputs, None if interpreted else triton_driver.active.get_current_stream(device),
                                 signature[1])
            if result is not MISMATCH:
                return result
            failures[fn] = "an input the signature does not read differs from the recorded one"
        return fn(static, inputs)
    if plan is None:  # unplannable
        return fn(static, inputs)
    recorder = Recorder(inputs, first.device, interpreted, keyed)
    began = _common.generation
    with _claim:
        claimed = _common.recorder is None  # no other thread's recording began since the check above
        if claimed:
            _common.recorder = recorder
    if not claimed:
        return fn(static, inputs)
    try:
        result = fn(static, inputs)
    finally:
        _common.recorder = None
    if _common.generation != began:  # the settings changed while recording: its launches ran under the old ones
        return result
    plan = recorder.build(result)
    if plan is None:
        failures[fn] = recorder.failure
    if len(plans) >= PLANS_LIMIT:
        plans.clear()
    plans[key] = plan
    return result


def _extent_bytes(t) -> int:
    """The bytes from t's first element to its last, inclusive."""
    return _common.extent(t) * t.element_size()


class _Slot:
    """A tensor of the recorded region: an input (its position), an allocation (its layout), or a view
    of either made inside the region (view_of: that tensor's slot, at `delta` bytes from it)."""

    __slots__ = ("number", "input", "view_of", "delta", "shape", "stride", "dtype", "align", "nbytes", "output",
                 "used", "last", "offset")

    def __init__(self, number, t, input_index, view_of=None, delta=0):
        self.number, self.input, self.view_of, self.delta = number, input_index, view_of, delta
        self.shape, self.stride, self.dtype, self.align = tuple(t.shape), tuple(t.stride()), t.dtype, t.data_ptr() & 15
        self.nbytes = _extent_bytes(t)
        self.output = self.used = False
        self.last = -1      # the last launch that reads or writes it
        self.offset = None  # its place in the workspace (tensors that live only inside the region)


class Recorder:
    """What one run of a region allocated and launched, as _common.track and _common.launch report it."""

    def __init__(self, inputs, device, interpreted, keyed=None):
        self.device, self.interpreted = device, interpreted
        self.thread = get_ident()  # what other threads launch meanwhile is not part of the region
        self.inputs = len(inputs)
        self.keyed = len(inputs) if keyed is None else keyed
        # Keyed input position -> its place in the signature's pointers (the present ones, in order).
        present = [i for i in range(self.keyed) if inputs[i] is not None]
        self.pointer_index = {i: j for j, i in enumerate(present)}
        # Positions the signature does not read that held None: a replay checks they still do.
        self.unkeyed_none = [i for i in range(self.keyed, len(inputs)) if inputs[i] is None]
        self.slots: dict[int, _Slot] = {}
        self.kept = []   # every recorded tensor stays alive while recording, so ids stay unique
        self.steps = []  # ("alloc", slot) and ("launch", launch record) in program order
        self.failure = None
        for i, t in enumerate(inputs):
            if t is None:
                continue
            if id(t) in self.slots:
                # A launch argument names a tensor, not the position it came in: a later call with
                # distinct tensors there would get this call's choice of position.
                self.fail("one tensor came in at two input positions")
            else:
                self._slot(t, i)

    def _slot(self, t, input_index, view_of=None, delta=0):
        slot = self.slots[id(t)] = _Slot(len(self.slots), t, input_index, view_of, delta)
        self.kept.append(t)
        return slot

    def _view_of(self, t):
        """A slot for t where it is a view, with the same dtype, of an input or of a tracked allocation
        (the region sliced it, as unbind does a stack of packed weights, or carved it out of one
        allocation): its address is that tensor's plus a fixed offset."""
        storage, start = t.untyped_storage().data_ptr(), t.data_ptr()
        end = start + _extent_bytes(t)
        for kept in self.kept:
            slot = self.slots[id(kept)]
            # Within that tensor's own bytes, not merely its storage: inputs may share one (weights
            # cast together, _CastWeights), and another call's may not.
            if (slot.view_of is None and kept.dtype == t.dtype and kept.device == t.device
                    and kept.untyped_storage().data_ptr() == storage
                    and kept.data_ptr() <= start and end <= kept.data_ptr() + slot.nbytes):
                return self._slot(t, None, slot, start - kept.data_ptr())
        return None

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why

    def allocated(self, t) -> None:
        if t.device != self.device:
            self.fail(f"an allocation on {t.device}, inputs on {self.device}")
        self.steps.append(("alloc", self._slot(t, None)))

    def _value(self, value):
        if isinstance(value, torch.Tensor):
            slot = self.slots.get(id(value)) or self._view_of(value)
            if slot is None:
                self.fail("a launch argument that is neither an input, a tracked allocation nor a view of one")
            return slot
        return value

    def launched(self, kernel, tuned, grid, config, args: dict) -> None:
        step = len(self.steps)
        if self.interpreted:
            meta = config.kwargs
            record = (kernel, tuple(grid(meta)), [(name, self._value(v)) for name, v in args.items()], config)
        else:
            entry = _common.lean_entry(kernel, tuned, args)
            if entry is None:
                self.fail(f"{kernel.__name__} launched without a kept compiled kernel")
                return
            run, function, metadata, meta = entry
            configured = set(meta)
            values = [None if p.name in configured else self._value(args[p.name]) for p in kernel.params]
            record = (kernel, tuple(grid(meta)), (run, function, metadata), values)
        for value in (v for _name, v in record[2]) if self.interpreted else record[3]:
            if isinstance(value, _Slot):
                value.used, value.last = True, step
                if value.view_of is not None:  # the viewed tensor lives as long as its views
                    value.view_of.used, value.view_of.last = True, step
        self.steps.append(("launch", record))

    def _output(self, value):
        """The result's template: slots for tensors, the same containers, constants as they are."""
        if isinstance(value, torch.Tensor):
            slot = self.slots.get(id(value))
            if slot is None or slot.view_of is not None:
                self.fail("a returned tensor that is neither an input nor a tracked allocation")
                return None
            slot.output = True
            return slot
        if isinstance(value, (tuple, list)):
            return type(value)(self._output(v) for v in value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        self.fail(f"a returned {type(value).__name__}")
        return None

    def build(self, result):
        template = self._output(result)
        if self.failure is not None:
            return None
        size = _pack_workspace([slot for kind, slot in self.steps if kind == "alloc" and slot.used and not slot.output],
                               self.steps)
        plan = Plan(self, template, size)
        self.kept.clear()
        return plan


def _pack_workspace(slots: list, steps: list) -> int:
    """Offsets for the tensors that live only inside the region (first fit, in allocation order): one
    may take the place of another whose last launch came before its allocation. Returns the size."""
    placed, size = [], 0
    position = {id(slot): i for i, (kind, slot) in enumerate(steps) if kind == "alloc"}
    for slot in slots:
        born = position[id(slot)]
        live = sorted((other.offset, other.offset + _round_up(other.nbytes)) for other in placed if other.last > born)
        offset = 0
        for start, end in live:
            if offset + _round_up(slot.nbytes) <= start:
                break
            offset = max(offset, end)
        slot.offset = offset
        placed.append(slot)
        size = max(size, offset + _round_up(slot.nbytes))
    return size


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _round_up(nbytes: int) -> int:
    return max(WORKSPACE_ALIGN, -(-nbytes // WORKSPACE_ALIGN) * WORKSPACE_ALIGN)


class Plan:
    """A recorded region as generated straight-line code: replay(inputs, stream, pointers) -> the
    result, pointers being the keyed inputs' addresses from their signature."""

    def __init__(self, recorder: Recorder, template, workspace: int):
        names = {"empty_strided": torch.empty_strided, "empty_like": torch.empty_like, "device": recorder.device,
                 "uint8": torch.uint8}
        lines = ["def replay(inputs, stream, pointers):"]
        interpreted = recorder.interpreted
        slots = sorted(recorder.slots.values(), key=lambda slot: slot.number)

        def constant(value):
            if value is None or isinstance(value, (bool, int, str)):
                return repr(value)
            name = f"c{len(names)}"
            names[name] = value
            return name

        def tensor(slot):  # the tensor (interpreted) or address (compiled) a launch gets
            return f"t{slot.number}" if interpreted else f"p{slot.number}"

        # What the signature does not read is checked here, so that a caller's mistake about what
        # follows from the keyed inputs returns MISMATCH (the launchers then run), never a launch
        # with another tensor's layout in mind.
        names["MISMATCH"] = MISMATCH
        lines.append(f"    if len(inputs) != {recorder.inputs}: return MISMATCH")
        for i in recorder.unkeyed_none:
            lines.append(f"    if inputs[{i}] is not None: return MISMATCH")
        for slot in slots:
            if slot.input is None or not (slot.used or slot.output):
                continue
            keyed = slot.input < recorder.keyed
            if slot.output or interpreted or not keyed:  # the tensor itself is needed
                lines.append(f"    t{slot.number} = inputs[{slot.input}]")
            if not keyed:
                lines.append(f"    if t{slot.number} is None or t{slot.number}.shape != {slot.shape!r} or "
                             f"t{slot.number}.stride() != {slot.stride!r} or t{slot.number}.dtype != "
                             f"{constant(slot.dtype)} or t{slot.number}.data_ptr() & 15 != {slot.align}: "
                             "return MISMATCH")
            if slot.used and not interpreted:
                lines.append(f"    p{slot.number} = pointers[{recorder.pointer_index[slot.input]}]" if keyed
                             else f"    p{slot.number} = t{slot.number}.data_ptr()")
        views = {}  # slot number -> the views of it a launch reads

        def make_views(base):
            for slot in views.get(base.number, ()):
                if interpreted:
                    lines.append(f"    t{slot.number} = t{base.number}.as_strided({slot.shape!r}, {slot.stride!r}, "
                                 f"t{base.number}.storage_offset() + {slot.delta // slot.dtype.itemsize})")
                else:
                    lines.append(f"    p{slot.number} = p{base.number} + {slot.delta}")

        for slot in slots:
            if slot.view_of is not None and slot.used:
                views.setdefault(slot.view_of.number, []).append(slot)
        for slot in slots:  # views of inputs here; views of allocations after their allocation
            if slot.input is not None:
                make_views(slot)
        # A returned tensor laid out as a keyed input (a weight's gradient, most of them) is allocated
        # as empty_like(that input), which keeps a contiguous input's strides: about 0.4 us less a
        # tensor on the host than empty_strided's shape, strides, dtype and device (58 a group's backward).
        layouts = {}
        for slot in slots:
            if (slot.input is not None and slot.input < recorder.keyed and all(slot.shape)
                    and slot.stride == _contiguous_strides(slot.shape)):
                layouts.setdefault((slot.shape, slot.stride, slot.dtype), slot)
        loaded = {slot.number for slot in slots if slot.input is not None and (slot.used or slot.output)
                  and (slot.output or interpreted or slot.input >= recorder.keyed)}
        if workspace:
            lines.append(f"    workspace = empty_strided(({workspace},), (1,), dtype=uint8, device=device)")
            if not interpreted:
                lines.append("    base = workspace.data_ptr()")
        kernels = []
        for kind, item in recorder.steps:
            if kind == "alloc":
                slot = item
                dtype = constant(slot.dtype)
                like = layouts.get((slot.shape, slot.stride, slot.dtype)) if slot.output else None
                if like is not None:
                    if like.number not in loaded:
                        lines.append(f"    t{like.number} = inputs[{like.input}]")
                        loaded.add(like.number)
                    lines.append(f"    t{slot.number} = empty_like(t{like.number})")
                    if slot.used and not interpreted:
                        lines.append(f"    p{slot.number} = t{slot.number}.data_ptr()")
                elif slot.output:
                    lines.append(f"    t{slot.number} = empty_strided({slot.shape!r}, {slot.stride!r}, dtype={dtype}, "
                                 "device=device)")
                    if slot.used and not interpreted:
                        lines.append(f"    p{slot.number} = t{slot.number}.data_ptr()")
                elif slot.used and interpreted:
                    lines.append(f"    t{slot.number} = workspace[{slot.offset}:{slot.offset + slot.nbytes}]"
                                 f".view({dtype}).as_strided({slot.shape!r}, {slot.stride!r})")
                elif slot.used:
                    lines.append(f"    p{slot.number} = base + {slot.offset}")
                make_views(slot)
                continue
            kernel, grid = item[0], item[1]
            if kernel not in kernels:
                kernels.append(kernel)
            if interpreted:
                _kernel, _grid, named, config = item
                arguments = [f"{name}={tensor(v) if isinstance(v, _Slot) else constant(v)}" for name, v in named]
                arguments += [f"{name}={constant(v)}" for name, v in config.kwargs.items()]
                arguments += [f"num_warps={config.num_warps}", f"num_stages={config.num_stages}"]
                lines.append(f"    {constant(kernel)}[{grid!r}]({', '.join(arguments)})")
            else:
                _kernel, _grid, (run, function, metadata), values = item
                grid = tuple(grid) + (1,) * (3 - len(grid))
                arguments = [tensor(v) if isinstance(v, _Slot) else constant(v) for v in values]
                lines.append(f"    {constant(run)}({grid[0]}, {grid[1]}, {grid[2]}, stream, {constant(function)}, "
                             f"{constant(metadata)}, None, None, None, {', '.join(arguments)})")

        def result(value):
            if isinstance(value, _Slot):
                return f"t{value.number}"
            if isinstance(value, tuple):
                return f"({''.join(result(v) + ', ' for v in value)})"
            if isinstance(value, list):
                return f"[{', '.join(result(v) for v in value)}]"
            return constant(value)

        lines.append(f"    return {result(template)}")
        self.source = "\n".join(lines) + "\n"
        exec(self.source, names)  # noqa: S102 - generated from the recorded launches
        self.replay = names["replay"]
        self.kernels = tuple(kernels)

    def kernels_idle(self) -> bool:
        """Whether no launch hook would run (a profiler), so a replay launches what the launchers would."""
        return _common.KERNELS_INTERPRETED or (_common.hooks_idle() and not any(k.pre_run_hooks for k in self.kernels))
