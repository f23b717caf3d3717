"""Launch plans (kernels/plans.py): a region of launcher code recorded once per input signature and
replayed. A replay must do exactly what the launchers do: the same kernels, grids and arguments,
so the same numbers bit for bit, with its region-only tensors in a reused workspace.

Under the interpreter (here, without a GPU) replays run the interpreted kernels on views of the
workspace, so a wrong offset, an overlap of two live tensors or a missed launch changes the
results; the fake-GPU subprocess checks the compiled form, which calls the kept kernels'
launchers with addresses.
"""
import contextlib

import pytest
import torch

from fastdrn import ops
from fastdrn.kernels import _common, plans
from helpers import launch_settings, randn
from test_launch_path import run_script
from test_residual_distill import _eager_group_or_skip, _group_blocks


@contextlib.contextmanager
def plans_off():
    """The launchers themselves, for the results a replay must equal; plans back on afterwards."""
    plans.set_launch_plans(False)
    try:
        yield
    finally:
        plans.set_launch_plans(True)


@pytest.fixture
def launch_count(monkeypatch):
    """How many launches went through kernels/_common.py `launch` (a replay goes around it)."""
    calls = []
    launch = _common.launch

    def counted(*args, **kwargs):
        calls.append(args[0])
        return launch(*args, **kwargs)

    from fastdrn.kernels import gemm, residual_distill
    for module in (gemm, residual_distill):  # every launcher's module (compress_skip's are gemm's)
        monkeypatch.setattr(module, "launch", counted)
    return calls


def _train(y, blocks, w_c, b_c, recompute):
    """A group and its compression, forward and backward, as fastdrn.DRN runs them (one autograd
    node, one forward and one backward region): every gradient, in leaf order."""
    leaves = [t for t in (y, *(t for block in blocks for t in block), w_c, b_c) if t is not None and t.requires_grad]
    out = ops.distill_and_compress(y, blocks, w_c, b_c, recompute=recompute)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape).to(out.device)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


def _group_inputs(dtype, device):
    """A group's input (1, 24, 3, 5), three blocks of F = 16 and its compression (w, b), all requiring
    grad: (y, blocks, w_c, b_c)."""
    y = randn(1, 24, 3, 5, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    blocks = _group_blocks(dtype, device, inners=(16, 16, 16))
    w_c = randn(24, 36, 1, 1, dtype=dtype, device=device, requires_grad=True)
    b_c = randn(24, dtype=dtype, device=device, requires_grad=True)
    return y, blocks, w_c, b_c


# (N, C, H, W, inner widths): each there for a reason
TRAIN_CASES = [
    (2, 24, 5, 3, (16, 16, 12)),  # odd H, W; the last block narrower, so it does not fold
    (1, 24, 1, 13, (16, 16, 16)),  # H = 1: every block folds the next squeeze
    (3, 24, 4, 1, (16, 16, 16)),  # W = 1, N = 3
]


# recompute, fold_backward: the unfolded schedule, b rebuilt, and the default: a saved with each g_b
# folded (the arena holds a too, and the forward's kernels write into it)
SCHEDULES = [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize("recompute, fold", SCHEDULES)
@pytest.mark.parametrize("case", TRAIN_CASES)
def test_replay_equals_the_launchers(case, recompute, fold, launch_count, device):
    """Training (a group's blocks forward and backward, the compression forward and backward):
    recorded, then replayed twice, each bit for bit what the launchers give with plans off; the
    replays launch nothing through `launch` (they call the kept kernels themselves)."""
    with launch_settings(fold_backward=fold):
        _replay_equals_the_launchers(case, recompute, launch_count, device)


def _replay_equals_the_launchers(case, recompute, launch_count, device):
    for dtype in (torch.float64, torch.float32) if device.type == "cpu" else (torch.bfloat16, torch.float32):
        _eager_group_or_skip(device, dtype)
        n, c, h, w, inners = case
        y = randn(n, c, h, w, dtype=dtype, device=device, channels_last=True, requires_grad=True)
        blocks = _group_blocks(dtype, device, inners=inners)
        width = c + 4 * len(blocks)
        w_c = randn(c, width, 1, 1, dtype=dtype, device=device, requires_grad=True)
        b_c = randn(c, dtype=dtype, device=device, requires_grad=True)
        with plans_off():
            expected = _train(y, blocks, w_c, b_c, recompute)
        for run in ("record", "replay", "replay again"):
            launch_count.clear()
            got = _train(y, blocks, w_c, b_c, recompute)
            for i, (g, e) in enumerate(zip(got, expected)):
                assert torch.equal(g, e), f"{dtype} {run}: output {i} differs from the launchers'"
            if run == "record":
                assert launch_count, "nothing launched while recording"
            else:
                assert not launch_count, f"{run}: {len(launch_count)} launches went through the launchers"
        assert not plans.failures, plans.failures


@pytest.mark.parametrize("recompute", [False, True])
def test_single_block_replays(recompute, launch_count, device):
    """ops.residual_distill on its own (one Function a block): forward and backward replayed, bit
    for bit the launchers' results; D = 20, F = 12, d = 3, odd H and W."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    from test_residual_distill import make_block

    z = randn(2, 20, 3, 5, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    weights = make_block(20, 12, 3, dtype, device)

    def run():
        out = ops.residual_distill(z, *weights, recompute=recompute)
        return [out, *torch.autograd.grad(out, [z, *weights], torch.cos(out.detach()))]

    with plans_off():
        expected = run()
    for attempt in ("record", "replay"):
        launch_count.clear()
        for i, (g, e) in enumerate(zip(run(), expected)):
            assert torch.equal(g, e), f"{attempt}: output {i}"
    assert not launch_count and not plans.failures, (len(launch_count), plans.failures)


def test_changing_a_launch_setting_forgets_the_plans():
    """A plan holds the kernels and configs its recording launched: other launch options must not
    replay it."""
    _common.launch_plans["a plan"] = None
    _common.set_launch_options()
    assert not _common.launch_plans


def test_what_the_signature_leaves_out_is_in_the_key(launch_count, device):
    """The saved b and the packed weights are not read for a backward's signature: whether b was
    saved (recompute) must still pick another plan. The same shapes with recompute off, then on,
    then off again in one process, each equal to the launchers' results."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    _eager_group_or_skip(device, dtype)
    y, blocks, w_c, b_c = _group_inputs(dtype, device)
    with plans_off():
        expected = {recompute: _train(y, blocks, w_c, b_c, recompute) for recompute in (False, True)}
    for recompute in (False, True, False, True):
        for i, (g, e) in enumerate(zip(_train(y, blocks, w_c, b_c, recompute), expected[recompute])):
            assert torch.equal(g, e), f"recompute={recompute}: output {i}"


def test_inference_group_replays_in_place(launch_count, device):
    """The in-place inference group: replays write the same buffer contents as the launchers."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    blocks = _group_blocks(dtype, device, inners=(16, 16, 16))
    y = randn(2, 24, 5, 7, dtype=dtype, device=device, channels_last=True)
    with torch.no_grad():
        with plans_off():
            expected = ops.distill_group(y, blocks)
        for run in ("record", "replay"):
            launch_count.clear()
            assert torch.equal(ops.distill_group(y, blocks), expected), run
        assert not launch_count, "the replay went through the launchers"


def test_group_with_its_compression_is_one_plan(launch_count, device):
    """fastdrn.DRN's inference runs each group and its compression as one region: the same numbers
    as the two ops one after the other, bit for bit, and a replay through no launcher."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    blocks = _group_blocks(dtype, device, inners=(16, 16, 12))
    y = randn(2, 24, 5, 3, dtype=dtype, device=device, channels_last=True)
    w, b = randn(24, 36, 1, 1, dtype=dtype, device=device), randn(24, dtype=dtype, device=device)
    with torch.no_grad():
        expected = ops.compress_skip(ops.distill_group(y, blocks), w, b, y)
        for run in ("record", "replay"):
            launch_count.clear()
            assert torch.equal(ops.distill_and_compress(y, blocks, w, b), expected), run
        assert not launch_count and not plans.failures, (len(launch_count), plans.failures)
    # With gradients it is one autograd node (test_residual_distill checks its gradients).
    y.requires_grad_()
    out = ops.distill_and_compress(y, blocks, w, b)
    assert torch.equal(out, expected) and type(out.grad_fn).__name__ == "_EagerDistillGroupBackward"


def test_a_new_signature_records_a_new_plan(device):
    """Shape, dtype and alignment are part of the signature: each new one is recorded, and a replay
    never serves an input it was not recorded for."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    blocks = _group_blocks(dtype, device, inners=(16, 16, 16))
    plans.set_launch_plans(True)
    with torch.no_grad():
        first = randn(1, 24, 3, 5, dtype=dtype, device=device, channels_last=True)
        ops.distill_group(first, blocks)
        count = sum(plan is not None for plan in _common.launch_plans.values())
        taller = randn(1, 24, 4, 5, dtype=dtype, device=device, channels_last=True)
        got = ops.distill_group(taller, blocks)
        assert sum(plan is not None for plan in _common.launch_plans.values()) == count + 1
        with plans_off():
            assert torch.equal(got, ops.distill_group(taller, blocks))


def test_an_untracked_tensor_leaves_the_region_unplanned(monkeypatch, device):
    """A launch argument the recording cannot account for (here: an untracked copy) makes the
    signature unplannable, with the reason kept, and the region keeps running its launchers."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    from fastdrn.kernels import compress_skip as module

    forward = module._forward
    monkeypatch.setattr(module, "_forward", lambda z, w, b, skip, alpha: forward(z.clone(), w, b, skip, alpha))
    plans.set_launch_plans(True)
    plans.failures.clear()
    z = randn(1, 40, 3, 3, dtype=dtype, device=device, channels_last=True)
    skip = randn(1, 24, 3, 3, dtype=dtype, device=device, channels_last=True)
    w, b = randn(24, 40, 1, 1, dtype=dtype, device=device), randn(24, dtype=dtype, device=device)
    with torch.no_grad():
        outs = [ops.compress_skip(z, w, b, skip) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert "neither an input, a tracked allocation nor a view of one" in plans.failures[module._forward_region]
    plans.failures.clear()


def test_inputs_outside_the_signature_are_checked_at_replay(device):
    """A region keyed on fewer inputs than it reads (the caller vouches that the rest follow): where
    one of the rest differs from the recording after all, the replay refuses and the launchers run."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    from fastdrn.kernels import compress_skip as module
    from fastdrn.kernels._common import direct_launches

    z = randn(1, 40, 3, 3, dtype=dtype, device=device, channels_last=True)
    results = {}
    with torch.no_grad(), direct_launches():
        for c_out in (24, 16):
            w, b = randn(c_out, 40, 1, 1, dtype=dtype, device=device), randn(c_out, dtype=dtype, device=device)
            skip = randn(1, c_out, 3, 3, dtype=dtype, device=device, channels_last=True)
            got = plans.planned(module._forward_region, (0.2,), [z, w, b, skip], keyed=1)  # only z keyed
            results[c_out] = (got, module._forward(z, w, b, skip, 0.2))
    for c_out, (got, expected) in results.items():
        assert torch.equal(got, expected), c_out
    assert "does not read differs" in plans.failures[module._forward_region]


def test_a_tensor_at_two_positions_is_not_planned(device):
    """Launch arguments name tensors, not positions: a recording where one tensor came in twice
    (here z as its own skip) would later give distinct tensors the same address; it is refused."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    from fastdrn.kernels import compress_skip as module

    z = randn(1, 24, 3, 3, dtype=dtype, device=device, channels_last=True)
    w, b = randn(24, 24, 1, 1, dtype=dtype, device=device), randn(24, dtype=dtype, device=device)
    skip = randn(1, 24, 3, 3, dtype=dtype, device=device, channels_last=True)
    with torch.no_grad():
        aliased = ops.compress_skip(z, w, b, z)
        distinct = ops.compress_skip(z, w, b, skip)  # the same signature
        assert "two input positions" in plans.failures[module._forward_region]
        with plans_off():
            assert torch.equal(distinct, ops.compress_skip(z, w, b, skip))
            assert torch.equal(aliased, ops.compress_skip(z, w, b, z))


def test_workspace_reuses_the_place_of_dead_tensors():
    """First fit over lifetimes: a tensor takes the place of one whose last launch came before its
    allocation, and never overlaps one still live."""
    slots = []
    steps = []

    def alloc(nbytes):
        slot = plans._Slot(len(slots), torch.empty(nbytes, dtype=torch.uint8), None)
        slot.used = True
        slots.append(slot)
        steps.append(("alloc", slot))
        return slot

    def launch(*used):
        for slot in used:
            slot.last = len(steps)
        steps.append(("launch", None))

    a, b = alloc(1000), alloc(300)   # a: [0, 1024), b: [1024, 1280)
    launch(a, b)
    c = alloc(200)                    # a and b are dead: c takes offset 0
    launch(c)
    d = alloc(2000)                   # c is dead too
    e = alloc(100)                    # d is live: e goes after it
    launch(d, e)
    size = plans._pack_workspace(slots, steps)
    assert (a.offset, b.offset, c.offset, d.offset, e.offset) == (0, 1024, 0, 0, 2048)
    assert size == 2304


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fake-GPU subprocess is for machines without CUDA")
def test_compiled_replay_launches_what_the_launchers_launch():
    """With Triton's launch path over a stand-in driver (test_launch_path.py): a group's training
    forward and backward with its compression (one node, the forward keyed by the checks' signature
    and reading the inputs' addresses from it), in bf16 and float32. The replay calls the same
    compiled kernels, with the same grids and non-pointer arguments, the inputs' addresses where the
    launchers passed the inputs, and 16-byte aligned addresses for its own tensors."""
    stdout = run_script("""
        from fastdrn import ops
        from fastdrn.kernels import plans
        sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
        from test_residual_distill import _eager_group_or_skip, _group_blocks
        _common.set_launch_options(autotune=False)

        def step(y, blocks, w_c, b_c):
            out = ops.distill_and_compress(y, blocks, w_c, b_c)
            out.backward(torch.ones_like(out))

        def pointer(value, inputs):
            if isinstance(value, torch.Tensor):
                value = value.data_ptr()
            return ("input", inputs[value]) if value in inputs else ("own", value % 16)

        for dtype in (torch.bfloat16, torch.float32):
            y = torch.randn(2, 24, 5, 3, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            blocks = _group_blocks(dtype, "cpu", inners=(16, 16, 16))
            w_c = torch.randn(24, 36, 1, 1, dtype=dtype, requires_grad=True)
            b_c = torch.randn(24, dtype=dtype, requires_grad=True)
            inputs = {t.data_ptr(): i for i, t in enumerate([y, *(t for blk in blocks for t in blk), w_c, b_c])}
            def launched():
                log.clear()
                step(y, blocks, w_c, b_c)
                return [(stub, args[:3], [pointer(a, inputs) if kind.startswith("*") else a
                                          for (name, kind), a in zip(stub.signature.items(), args[9:])
                                          if kind != "constexpr"])
                        for stub, args in log]

            plans.set_launch_plans(False)
            off = launched()
            plans.set_launch_plans(True)
            launched()  # recorded
            on = launched()
            assert len(off) == len(on) > 0, (len(off), len(on))
            for i, ((s0, g0, a0), (s1, g1, a1)) in enumerate(zip(off, on)):
                assert s0 is s1 and g0 == g1, (dtype, i)
                assert a0 == a1, (dtype, i, a0, a1)
            assert not plans.failures, plans.failures
            print(dtype, "launches", len(on))
    """)
    assert "torch.float32 launches" in stdout



@pytest.mark.skipif(torch.cuda.is_available(), reason="the fake-GPU subprocess is for machines without CUDA")
def test_an_input_at_another_alignment_or_offset_records_its_own_plan():
    """Memory from outside PyTorch's allocator (numpy here, DLPack) need not start 16-byte aligned,
    so an input's address alignment and its storage offset each pick kernels the other does not:
    Triton compiles a kernel per pointer alignment, and a block's 3x3 kernel takes its row alignment
    from the storage offsets. With Triton's launch path over a stand-in driver, the replay launches
    the kernels the launchers launch for an input 4 bytes off 16-byte alignment at offset 0 (the
    compression) and for one at offset 1 at an aligned address (a block), after a recording at
    offset 0 and an aligned address."""
    stdout = run_script("""
        import numpy as np
        from fastdrn.kernels import plans
        from fastdrn.kernels import compress_skip as module
        _common.set_launch_options(autotune=False)

        def unaligned_copy(t):  # t's values 4 bytes past a 16-byte boundary, at storage offset 0
            raw = torch.empty(t.numel() * 4 + 32, dtype=torch.uint8)
            start = (-raw.data_ptr()) % 16 + 4
            u = torch.from_numpy(raw.numpy()[start:start + t.numel() * 4].view(np.float32))
            u = u.as_strided(t.shape, t.stride())
            u.copy_(t)
            assert u.storage_offset() == 0 and u.data_ptr() % 16 == 4 and u.stride() == t.stride()
            return u, raw

        z = torch.randn(1, 40, 3, 5).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(24, 40, 1, 1), torch.randn(24)
        skip = torch.randn(1, 24, 3, 5).contiguous(memory_format=torch.channels_last)
        z_off, keep = unaligned_copy(z)

        def launched(z):
            log.clear()
            with torch.no_grad(), _common.direct_launches():
                plans.planned(module._forward_region, (0.2,), [z, w, b, skip])
            return [(stub, args[:3]) for stub, args in log]

        def assert_each_replays_its_own(launches, inputs):
            # With plans on, recorded with the first of `inputs` (name -> tensor), each input in turn
            # replays the kernels, grids and arguments the launchers pick for it with plans off.
            plans.set_launch_plans(False)
            expected = {name: launches(tensor) for name, tensor in inputs.items()}
            plans.set_launch_plans(True)
            launches(next(iter(inputs.values())))
            for name, tensor in [*inputs.items()] * 2:
                got = launches(tensor)
                assert len(got) == len(expected[name]) > 0, (name, len(got))
                for i, ((s0, g0), (s1, g1)) in enumerate(zip(expected[name], got)):
                    assert s0 is s1 and g0 == g1, (name, i)
            assert not plans.failures, plans.failures
            return expected

        expected = assert_each_replays_its_own(launched, {"aligned": z, "off": z_off})
        assert expected["aligned"][0][0] is not expected["off"][0][0], "one kernel for both alignments"
        print("both alignments replay their own kernels")

        from fastdrn import ops
        sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
        from test_residual_distill import make_block

        def offset_copy(t):  # t's values at storage offset 1, at a 16-byte aligned address
            raw = torch.empty(t.numel() * 4 + 36, dtype=torch.uint8)
            start = (-raw.data_ptr()) % 16 + 12
            u = torch.from_numpy(raw.numpy()[start:start + (t.numel() + 1) * 4].view(np.float32))
            u = u.as_strided(t.shape, t.stride(), 1)
            u.copy_(t)
            assert u.storage_offset() == 1 and u.data_ptr() % 16 == 0 and u.stride() == t.stride()
            return u, raw

        y = torch.randn(2, 40, 3, 5).contiguous(memory_format=torch.channels_last)
        block = [t.detach() for t in make_block(40, 16, 8, torch.float32, "cpu")]  # 48 channels out
        y_off, keep_y = offset_copy(y)

        def block_launches(y):
            log.clear()
            with torch.no_grad():
                ops.residual_distill(y, *block)
            return [(stub, args[:3]) for stub, args in log]

        expected = assert_each_replays_its_own(block_launches, {"offset 0": y, "offset 1": y_off})
        assert [s for s, _ in expected["offset 0"]] != [s for s, _ in expected["offset 1"]], "the same kernels"
        print("both offsets replay their own kernels")
    """)
    assert "both alignments replay their own kernels" in stdout
    assert "both offsets replay their own kernels" in stdout


def test_training_checks_and_plan_share_one_signature(device):
    """Training keys its input checks and the group's launch plan by one signature
    (plans.checked_signature). After a good call has recorded, a call that differs only in one
    weight's device or dtype still gets the checks' clear error; a 1x1 weight that is not
    contiguous (a dense copy is made for the kernels) gives the contiguous one's results, bit for bit."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    y, blocks, w_c, b_c = _group_inputs(dtype, device)
    expected = _train(y, blocks, w_c, b_c, False)
    for i, (g, e) in enumerate(zip(_train(y, blocks, w_c, b_c, False), expected)):  # replayed
        assert torch.equal(g, e), f"replay: output {i}"
    on_meta = [list(block) for block in blocks]
    on_meta[1][2] = on_meta[1][2].detach().to("meta")
    with pytest.raises(ValueError, match="w_conv is on meta"):
        ops.distill_and_compress(y, [tuple(block) for block in on_meta], w_c, b_c)
    other_dtype = torch.float32 if dtype != torch.float32 else torch.float64
    with pytest.raises(TypeError, match="w_expand has dtype"):
        ops.distill_and_compress(y, [blocks[0], (*blocks[1][:4], blocks[1][4].to(other_dtype), blocks[1][5]),
                                     blocks[2]], w_c, b_c)
    # w_squeeze of block 1 as a transposed view with the same values: not contiguous
    strided = [list(block) for block in blocks]
    w = blocks[1][0].detach()
    strided[1][0] = w.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not strided[1][0].is_contiguous() and torch.equal(strided[1][0], w)
    got = _train(y, [tuple(block) for block in strided], w_c, b_c, False)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"non-contiguous w_squeeze: output {i}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fake-GPU subprocess is for machines without CUDA")
def test_a_weight_moved_before_backward_is_read_where_it_is_then():
    """A group's backward keys its launch plan by its forward's signature only where the saved tensors
    are still at the forward's addresses. A weight given a new storage (``.data =``) between forward
    and backward has moved: with Triton's launch path over a stand-in driver (compiled replays pass
    addresses; interpreted ones pass the tensors themselves, so only this harness sees an address),
    the replayed backward passes the moved weight's new address wherever the launchers do, never
    its old one (whose storage the test keeps alive)."""
    stdout = run_script("""
        from fastdrn import ops
        from fastdrn.kernels import plans
        sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
        from test_residual_distill import _group_blocks
        _common.set_launch_options(autotune=False)
        dtype = torch.float32
        y = torch.randn(2, 24, 5, 3, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        blocks = _group_blocks(dtype, "cpu", inners=(16, 16, 16))
        w_c = torch.randn(24, 36, 1, 1, dtype=dtype, requires_grad=True)
        b_c = torch.randn(24, dtype=dtype, requires_grad=True)
        leaves = [y, *(t for blk in blocks for t in blk), w_c, b_c]
        inputs = {t.data_ptr(): i for i, t in enumerate(leaves)}

        def backward_launches(weight):
            out = ops.distill_and_compress(y, blocks, w_c, b_c)
            old = weight.data
            weight.data = old * 2  # a new storage, the same layout
            moved = weight.data_ptr()

            def pointer(value):  # read while the weight is moved: the launchers pass it as a tensor
                value = value.data_ptr() if isinstance(value, torch.Tensor) else value
                return "moved" if value == moved else ("input", inputs[value]) if value in inputs else "own"
            log.clear()
            try:
                out.backward(torch.ones_like(out))
                return [[pointer(a) for (name, kind), a in zip(stub.signature.items(), args[9:])
                         if kind.startswith("*")] for stub, args in log]
            finally:
                weight.data = old

        for name, weight in (("w_squeeze", blocks[1][0]), ("w_expand", blocks[2][4]), ("w_c", w_c)):
            plans.set_launch_plans(False)
            off = backward_launches(weight)
            plans.set_launch_plans(True)
            backward_launches(weight)  # recorded
            on = backward_launches(weight)
            assert len(off) == len(on) > 0, (name, len(off), len(on))
            assert any("moved" in args for args in off), (name, "the launchers read the moved weight")
            for i, (a0, a1) in enumerate(zip(off, on)):
                assert a0 == a1, (name, i, a0, a1)
            print(name, "backward launches", len(on))
    """)
    assert "w_c backward launches" in stdout


def test_a_recording_keeps_only_its_own_threads_launches(monkeypatch, device):
    """A region recorded in one thread while another thread launches kernels (nn.DataParallel's
    replicas, a threaded server): the recording keeps only its own thread's launches and
    allocations, so it is planned and replays its own results; the other thread runs its launchers."""
    import threading

    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    from fastdrn.kernels import compress_skip as module
    from test_residual_distill import make_block

    started, resume = threading.Event(), threading.Event()
    forward = module._forward

    def forward_after_the_other_thread(*args):  # the recording pauses before its launch
        started.set()
        assert resume.wait(60)
        return forward(*args)

    monkeypatch.setattr(module, "_forward", forward_after_the_other_thread)
    plans.set_launch_plans(True)
    z = randn(1, 40, 3, 3, dtype=dtype, device=device, channels_last=True)
    skip = randn(1, 24, 3, 3, dtype=dtype, device=device, channels_last=True)
    w, b = randn(24, 40, 1, 1, dtype=dtype, device=device), randn(24, dtype=dtype, device=device)
    results = {}

    def record():
        with torch.no_grad():
            results["recorded"] = ops.compress_skip(z, w, b, skip)

    recording = threading.Thread(target=record)
    recording.start()
    assert started.wait(60)
    block_z = randn(2, 20, 3, 5, dtype=dtype, device=device, channels_last=True)
    block = make_block(20, 12, 3, dtype, device)
    with torch.no_grad():  # launches while the other thread records
        other = ops.residual_distill(block_z, *block)
    resume.set()
    recording.join()
    assert module._forward_region not in plans.failures, plans.failures
    assert any(key[0] is module._forward_region and plan is not None for key, plan in _common.launch_plans.items())
    with torch.no_grad():
        replayed = ops.compress_skip(z, w, b, skip)  # now from the plan
        with plans_off():
            assert torch.equal(replayed, ops.compress_skip(z, w, b, skip))
            assert torch.equal(other, ops.residual_distill(block_z, *block))
    assert torch.equal(results["recorded"], replayed)


def test_two_threads_recording_at_once_keep_every_launch(monkeypatch, device):
    """Two threads reach new regions together (nn.DataParallel's first step, a threaded server's first
    requests): thread A passes planned()'s check that nothing is being recorded, is switched out
    before it starts its recording, and thread B starts one. A's recording must not take B's place:
    B's later launches would be recorded nowhere, and B's region (the in-place inference group,
    which returns nothing) planned without them, its replays leaving the buffer unwritten (1.6 off
    in float64 before the fix). Forced here by pausing A in that window and B inside its region."""
    import threading

    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    from fastdrn.kernels import residual_distill

    in_window, resume_a = threading.Event(), threading.Event()
    recording, resume_b = threading.Event(), threading.Event()
    signature, region = plans.tensor_signature, residual_distill._group_forward_region

    def signature_after_a_pause(tensors):  # A: read between planned()'s check and its recording
        if threading.current_thread().name == "A":
            in_window.set()
            assert resume_a.wait(60)
        return signature(tensors)

    def region_after_a_pause(static, inputs):  # B: recording (the plan's key holds this function)
        if threading.current_thread().name == "B":
            recording.set()
            assert resume_b.wait(60)
        return region(static, inputs)

    monkeypatch.setattr(plans, "tensor_signature", signature_after_a_pause)
    monkeypatch.setattr(residual_distill, "_group_forward_region", region_after_a_pause)
    plans.set_launch_plans(True)
    blocks = [tuple(t.detach() for t in block) for block in _group_blocks(dtype, device, inners=(16, 16, 16))]
    y = randn(1, 24, 3, 5, dtype=dtype, device=device, channels_last=True)
    z = randn(1, 40, 3, 3, dtype=dtype, device=device, channels_last=True)
    skip = randn(1, 24, 3, 3, dtype=dtype, device=device, channels_last=True)
    w, b = randn(24, 40, 1, 1, dtype=dtype, device=device), randn(24, dtype=dtype, device=device)

    def run(name, call):
        def body():
            with torch.no_grad():
                call()
        thread = threading.Thread(target=body, name=name)
        thread.start()
        return thread

    thread_a = run("A", lambda: ops.compress_skip(z, w, b, skip))
    assert in_window.wait(60)
    thread_b = run("B", lambda: ops.distill_group(y, blocks))
    assert recording.wait(60)
    resume_a.set()
    thread_a.join()  # A ran its region while B was recording
    resume_b.set()
    thread_b.join()
    with torch.no_grad():
        replayed = ops.distill_group(y, blocks)  # from B's plan
        with plans_off():
            assert torch.equal(replayed, ops.distill_group(y, blocks))


def test_settings_changed_while_another_thread_records_keep_no_plan(monkeypatch, device):
    """set_launch_options forgets every plan, as its launches ran under the old settings; a recording
    in flight in another thread then stored its plan after the forgetting, and the new settings never
    reached that signature. Forced by pausing the recording thread inside its region."""
    import threading

    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    from fastdrn.kernels import residual_distill

    recording, resume = threading.Event(), threading.Event()
    region = residual_distill._group_forward_region

    def region_after_a_pause(static, inputs):
        if threading.current_thread().name == "recording":
            recording.set()
            assert resume.wait(60)
        return region(static, inputs)

    monkeypatch.setattr(residual_distill, "_group_forward_region", region_after_a_pause)
    plans.set_launch_plans(True)
    blocks = [tuple(t.detach() for t in block) for block in _group_blocks(dtype, device, inners=(16, 16))]
    y = randn(1, 24, 3, 5, dtype=dtype, device=device, channels_last=True)

    def group():
        with torch.no_grad():
            return ops.distill_group(y, blocks)

    thread = threading.Thread(target=group, name="recording")
    thread.start()
    assert recording.wait(60)
    before = _common.launch_options()
    try:
        _common.set_launch_options(weight_grad_blocks=1 if before.weight_grad_blocks != 1 else 2)
        resume.set()
        thread.join()
        assert not any(key[0] is region_after_a_pause for key in _common.launch_plans), "kept under the old settings"
        out = group()  # recorded now, under the new settings
        assert any(key[0] is region_after_a_pause for key in _common.launch_plans)
        with plans_off():
            assert torch.equal(out, group())
    finally:
        _common.set_launch_options(**before.as_dict())


@pytest.mark.parametrize("blocks_a_launch, fold, backward_limit", [
    (1, False, 4.0),  # each block's weight gradients and their sum in launches of their own
    (3, False, 3.0),  # three blocks a weight-gradient launch, 24 launches a group of 9
    (3, True, 2.0),   # the default, fold_backward as well: no pair kernel, 16 launches a group of 9
])
def test_triton_launches_per_block_over_a_model(blocks_a_launch, fold, backward_limit, launch_count, monkeypatch,
                                                device):
    """Launches through the launchers (plans off, so each is counted) over DRN's 6 groups of 9 blocks,
    narrow: a forward with autograd and one without at most 1.5 a block, a backward at most
    backward_limit a block, the compressions' own backward launches not counted."""
    import fastdrn
    from fastdrn.kernels import residual_distill
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    compression_launches = []
    compress_backward = residual_distill._compress_backward

    def counted_compress_backward(*args):
        before = len(launch_count)
        result = compress_backward(*args)
        compression_launches.append(len(launch_count) - before)
        return result

    monkeypatch.setattr(residual_distill, "_compress_backward", counted_compress_backward)
    torch.manual_seed(0)
    model = fastdrn.DRN(scale=2, n_feats=8, inner=16, distill=4).to(device, dtype)
    blocks = sum(len(group.blocks) for group in model.groups)
    assert blocks == 54
    x = torch.rand(1, 3, 3, 5, dtype=dtype, device=device)
    with plans_off(), launch_settings(weight_grad_blocks=blocks_a_launch, fold_backward=fold):
        with torch.no_grad():
            launch_count.clear()
            model(x)
            no_grad = len(launch_count)
        launch_count.clear()
        out = model(x)
        forward = len(launch_count)
        launch_count.clear()
        out.square().sum().backward()
        backward = len(launch_count) - sum(compression_launches)
    print(f"per block: forward {forward / blocks:.2f}, without grad {no_grad / blocks:.2f}, "
          f"backward {backward / blocks:.2f} (compressions: {compression_launches})")
    assert len(compression_launches) == len(model.groups)
    assert forward / blocks <= 1.5 and no_grad / blocks <= 1.5, (forward, no_grad)
    assert backward / blocks <= backward_limit, backward
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _in_storages(tensors, shared: bool) -> list:
    """Copies of `tensors` as views at the offsets they would have packed one after another in one
    storage: all in that one storage (as _CastWeights casts a model's weights), or each in a storage
    of its own at the same offset."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += t.numel()
    first = tensors[0]
    whole = torch.empty(total, dtype=first.dtype, device=first.device)
    views = []
    for t, offset in zip(tensors, offsets):
        storage = whole if shared else torch.full((offset + t.numel(),), float("nan"), dtype=t.dtype, device=t.device)
        views.append(storage[offset:offset + t.numel()].view(t.shape).copy_(t))
    return views


def test_a_view_made_in_a_region_is_replayed_from_its_own_input(device):
    """A region's view of an input (the block's 3x3 weight as a stack of one, to pack it) is replayed
    from that input, also where the recording's inputs shared one storage (a model's weights cast
    together) and the replay's, at the same offsets, do not: taken from another input of that
    storage, the replay would read its neighbour's bytes (NaN here) as the 3x3 weight."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    _eager_group_or_skip(device, dtype)
    from test_residual_distill import make_block

    plans.set_launch_plans(True)
    z = randn(1, 20, 3, 5, dtype=dtype, device=device, channels_last=True)
    block = [t.detach() for t in make_block(20, 12, 3, dtype, device)]
    with torch.no_grad():
        ops.residual_distill(z, *_in_storages(block, shared=True))  # recorded
        apart = _in_storages(block, shared=False)
        replayed = ops.residual_distill(z, *apart)
        with plans_off():
            expected = ops.residual_distill(z, *apart)
    assert torch.equal(replayed, expected)
