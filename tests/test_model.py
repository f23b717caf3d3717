"""fastdrn.DRN against fastdrn.reference.DRN: outputs, every gradient, training steps, checkpoints,
memory formats, autocast, torch.compile and DDP."""
import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F

import fastdrn
from fastdrn import backend, reference
from helpers import assert_close, assert_model_grads_close, dtypes_for, pytorch_fp32_convs, rel_err, tolerance, where

SMALL = dict(n_feats=16, n_groups=2, n_blocks=3, inner=16, distill=4)


def pair(cfg, device, dtype=torch.float32):
    """A reference model and a fastdrn model with the same weights (biases made non-trivial)."""
    ref = reference.DRN(**cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    fast = fastdrn.DRN(**cfg)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device, dtype), fast.to(device, dtype)


def image(n, h, w, device, dtype=torch.float32, channels_last=False):
    x = torch.rand(n, 3, h, w, dtype=torch.float64).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("cfg,size", [
    (dict(scale=2, **SMALL), (2, 5, 7)),     # the small configuration at x2, odd image
    (dict(scale=3, **SMALL), (1, 4, 1)),     # x3 with W = 1
    (dict(scale=4), (1, 3, 2)),              # the full DRN at a tiny image
])
def test_output_and_gradients_match_reference(cfg, size, device):
    with pytorch_fp32_convs():
        check_output_and_gradients(cfg, size, device)


def check_output_and_gradients(cfg, size, device):
    names = [name for name, _ in fastdrn.DRN(**cfg).named_parameters()]
    for dtype in dtypes_for(device):
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            ref, fast = pair(cfg, device, dtype)
            ref64 = reference.DRN(**cfg).to(device, torch.float64)
            ref64.load_state_dict(ref.state_dict())
            x = image(*size, device, dtype)
            out = fast(x)
            expected = ref64(x.double())
            assert_close(out, expected, fwd_tol, f"{dtype} output")
            grad = torch.randn_like(expected)
            grads = torch.autograd.grad(out, list(fast.parameters()), grad.to(dtype))
            eager_grads = torch.autograd.grad(ref(x), list(ref.parameters()), grad.to(dtype))
            ref_grads = torch.autograd.grad(expected, list(ref64.parameters()), grad)
            return grads, eager_grads, ref_grads

        assert_model_grads_close(dtype, grad_tol, draw, names, str(dtype))


def test_inference_path_matches_training_path(device):
    dtype = dtypes_for(device)[-1]
    _, fast = pair(dict(scale=2, **SMALL), device, dtype)
    x = image(2, 6, 5, device, dtype)
    with torch.no_grad():
        no_grad = fast(x)
    with torch.inference_mode():
        inference = fast(x)
    with_grad = fast(x)
    assert_close(no_grad, with_grad.detach(), tolerance(device, dtype)[0], "no_grad vs grad")
    assert torch.equal(no_grad, inference)


def test_adam_steps_follow_reference(device):
    # float32 parameters, as Adam needs: eps = 1e-8 underflows in float16 (NaN on an H100).
    dtype = torch.float32
    tol = tolerance(device, dtype)[1]
    ref, fast = pair(dict(scale=2, **SMALL), device, dtype)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    opt_fast = torch.optim.Adam(fast.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(3):
        lr_img, hr_img = image(2, 6, 6, device, dtype), image(2, 12, 12, device, dtype)
        for model, opt in ((ref, opt_ref), (fast, opt_fast)):
            opt.zero_grad()
            F.l1_loss(model(lr_img), hr_img).backward()
            opt.step()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert_close(p, q, tol, f"{name} after 3 Adam steps")


def test_checkpoints_move_both_ways(tmp_path, device):
    dtype = dtypes_for(device)[-1]
    cfg = dict(scale=3, **SMALL)
    ref = reference.DRN(**cfg).to(device, dtype)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    fast = fastdrn.DRN(**cfg).to(device, dtype)
    fast.load_state_dict(torch.load(tmp_path / "ref.pt", weights_only=True), strict=True)
    x = image(1, 5, 6, device, dtype)
    with torch.no_grad():
        assert_close(fast(x), ref(x).double(), tolerance(device, dtype)[0], "reference -> fastdrn")
        torch.save(fast.state_dict(), tmp_path / "fast.pt")
        back = reference.DRN(**cfg).to(device, dtype)
        back.load_state_dict(torch.load(tmp_path / "fast.pt", weights_only=True), strict=True)
        assert torch.equal(back(x), ref(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_keeps_the_input_memory_format(channels_last, device):
    _, fast = pair(dict(scale=2, **SMALL), device, dtypes_for(device)[-1])
    x = image(2, 4, 5, device, dtypes_for(device)[-1], channels_last=channels_last)
    with torch.no_grad():
        out = fast(x)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_bad_image_is_named():
    fast = fastdrn.DRN(scale=2, **SMALL)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        fast(torch.rand(1, 4, 5, 5))


# Integer and bool images: the reference subtracts its mean cast to the image's dtype (0 for an
# integer image, an error for bool), so neither gives a DRN's output; fastdrn names the dtype.
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_an_image_that_is_not_floating_point_is_named(dtype):
    fast = fastdrn.DRN(scale=2, **SMALL)
    with pytest.raises(TypeError, match=f"floating-point images .* got dtype {dtype}"):
        fast((torch.rand(1, 3, 5, 5) * 2).to(dtype))


def test_an_empty_batch_and_meta_tensors_give_the_references_output(device):
    """Nothing to compute: N = 0 gives the empty output the reference gives (as nn.Conv2d does), and
    a model and input on the meta device give the output's shape (deferred initialization, model
    summaries); neither reaches a kernel."""
    ref, fast = pair(dict(scale=2, **SMALL), device, dtypes_for(device)[-1])
    empty = image(0, 4, 5, device, dtypes_for(device)[-1])
    with torch.no_grad():
        out = fast(empty)
        assert out.shape == ref(empty).shape == (0, 3, 8, 10)
    meta = fastdrn.DRN(scale=2, **SMALL).to("meta")
    assert meta(torch.empty(2, 3, 4, 5, device="meta")).shape == (2, 3, 8, 10)


# Gradient checkpointing runs the forward again inside the backward: the fused nodes' saved tensors
# are then the second forward's, and with use_reentrant=True the backward runs in a nested graph.
@pytest.mark.parametrize("recompute", [False, True])  # b saved by the fused forward, or rebuilt
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_references_gradients(reentrant, recompute, device):
    from torch.utils.checkpoint import checkpoint

    dtype = dtypes_for(device)[0]
    cfg = dict(scale=2, **SMALL)
    ref, _ = pair(cfg, device, torch.float64)
    fast = fastdrn.DRN(recompute=recompute, **cfg).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    x = image(2, 5, 7, device, dtype).requires_grad_()
    out = checkpoint(fast, x, use_reentrant=reentrant)
    x_ref = x.detach().double().requires_grad_()
    expected = ref(x_ref)
    fwd_tol, grad_tol = tolerance(device, dtype)
    assert rel_err(out, expected) <= fwd_tol
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= grad_tol, name
    assert rel_err(x.grad, x_ref.grad) <= grad_tol


def test_recompute_option_gives_the_same_gradients(device):
    dtype = dtypes_for(device)[-1]
    ref, fast = pair(dict(scale=2, **SMALL), device, dtype)
    lean = fastdrn.DRN(scale=2, recompute=True, **SMALL).to(device, dtype)
    lean.load_state_dict(fast.state_dict())
    x = image(1, 5, 5, device, dtype)
    g1 = torch.autograd.grad(fast(x).sum(), list(fast.parameters()))
    g2 = torch.autograd.grad(lean(x).sum(), list(lean.parameters()))
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= tolerance(device, dtype)[1]


def _scale_block_output(model, calls):
    model.groups[0].blocks[1].register_forward_hook(lambda module, args, out: calls.append(1) or out * 0.5)


def _double_group_input(model, calls):
    model.groups[1].register_forward_pre_hook(lambda module, args: calls.append(1) or (args[0] * 2,))


def _record_block_gradient(model, calls):
    model.groups[0].blocks[0].register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(1))


def _forward_set_on_a_block(model, calls):
    block = model.groups[1].blocks[0]
    block.forward = lambda z, forward=block.forward: calls.append(1) or forward(z) * 0.9


def _subclass_of_a_block(model, calls):
    class Damped(reference.ResidualDistillBlock):
        def forward(self, z):
            calls.append(1)
            return super().forward(z) * 0.9

    block = model.groups[0].blocks[1]
    damped = Damped(block.squeeze.in_channels, block.squeeze.out_channels,
                    block.expand.out_channels - block.squeeze.in_channels, block.alpha)
    damped.load_state_dict(block.state_dict())
    model.groups[0].blocks[1] = damped.to(block.squeeze.weight)


@pytest.mark.parametrize("change", [
    _scale_block_output,      # a forward hook whose return value replaces a block's output
    _double_group_input,      # a forward pre-hook that replaces a group's input
    _record_block_gradient,   # a full backward hook, which only observes
    _forward_set_on_a_block,  # forward replaced on one block instance
    _subclass_of_a_block,     # a block replaced by a subclass with its own forward (an ablation)
])
def test_groups_and_blocks_with_hooks_or_their_own_forward_run_as_the_reference_calls_them(change, device,
                                                                                            monkeypatch):
    """The reference calls every group and block as a module, so their hooks and forwards take
    part; fastdrn.DRN must give the same output and gradients with them, and run each hook as
    often, not skip them for its fused ops. The other group still runs through them."""
    fused, distill_groups = [], fastdrn.ops._distill_groups
    monkeypatch.setattr(fastdrn.ops, "_distill_groups", lambda y, groups, *a: fused.extend(groups) or
                        distill_groups(y, groups, *a))
    dtype = dtypes_for(device)[0]
    cfg = dict(scale=2, n_feats=8, n_groups=2, n_blocks=2, inner=8, distill=4)
    ref, fast = pair(cfg, device, dtype)
    calls = {ref: [], fast: []}
    for model in (ref, fast):
        change(model, calls[model])
    x = image(1, 3, 4, device, dtype)
    with pytorch_fp32_convs():
        out, expected = fast(x), ref(x)
        grads, ref_grads = (torch.autograd.grad((o * o).sum(), list(m.parameters()))
                            for o, m in ((out, fast), (expected, ref)))
    assert len(calls[fast]) == len(calls[ref]) > 0
    assert len(fused) == 1  # the group with neither hooks nor forwards of its own
    fwd_tol, grad_tol = tolerance(device, dtype)
    assert_close(out, expected, fwd_tol, "output")
    for (name, _), g, rg in zip(fast.named_parameters(), grads, ref_grads):
        assert_close(g, rg, grad_tol, f"grad of {name}")


def _alpha_of_one_block(model):
    model.groups[1].blocks[0].alpha = 0.5


def _alpha_of_every_group_and_block(model):
    for module in model.modules():
        if isinstance(module, (reference.ResidualDistillGroup, reference.ResidualDistillBlock)):
            module.alpha = 0.5


def _alpha_of_the_model(model):
    model.alpha = 0.5


@pytest.mark.parametrize("change,fused_groups", [
    (_alpha_of_one_block, 1),              # that block's ELUs only: its group runs as a module
    (_alpha_of_every_group_and_block, 2),  # every ELU (as an alpha annealed over training)
    (_alpha_of_the_model, 2),              # DRN.alpha, which the reference's forward never reads
])
def test_the_elus_use_the_alpha_of_their_block_and_group_as_in_the_reference(change, fused_groups, device,
                                                                             monkeypatch):
    """Each reference block and group applies its own alpha (the compression's ELU the group's), so
    an alpha changed on them after construction takes effect there, and DRN.alpha not at all;
    fastdrn.DRN ran every ELU at DRN.alpha."""
    fused, distill_groups = [], fastdrn.ops._distill_groups
    monkeypatch.setattr(fastdrn.ops, "_distill_groups", lambda y, groups, *a: fused.extend(groups) or
                        distill_groups(y, groups, *a))
    dtype = dtypes_for(device)[0]
    ref, fast = pair(dict(scale=2, n_feats=8, n_groups=2, n_blocks=2, inner=8, distill=4), device, dtype)
    for model in (ref, fast):
        change(model)
    x = image(1, 3, 4, device, dtype)
    with pytorch_fp32_convs():
        out, expected = fast(x), ref(x)
        grads, ref_grads = (torch.autograd.grad((o * o).sum(), list(m.parameters()))
                            for o, m in ((out, fast), (expected, ref)))
    assert len(fused) == fused_groups
    fwd_tol, grad_tol = tolerance(device, dtype)
    assert_close(out, expected, fwd_tol, "output")
    for (name, _), g, rg in zip(fast.named_parameters(), grads, ref_grads):
        assert_close(g, rg, grad_tol, f"grad of {name}")


def test_an_alpha_that_is_a_parameter_gets_the_references_error(device):
    """An alpha made a Parameter (learnable, as one might try) is refused by F.elu in the reference;
    fastdrn.DRN gives the same error, not a KeyError of its own."""
    ref, fast = pair(dict(scale=2, n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=4), device)
    for model in (ref, fast):
        model.groups[0].blocks[0].alpha = torch.nn.Parameter(torch.tensor(0.3, device=device))
    x = image(1, 3, 4, device)
    with pytest.raises(TypeError) as expected:
        ref(x)
    with pytest.raises(TypeError, match=re.escape(str(expected.value))):
        fast(x)


def test_a_global_module_hook_sees_every_group_and_block(device):
    """torch.nn.modules.module.register_module_forward_hook (what profilers and summaries install)
    runs for every module the reference calls: its groups and blocks too."""
    dtype = dtypes_for(device)[0]
    ref, fast = pair(dict(scale=2, n_feats=8, n_groups=2, n_blocks=2, inner=8, distill=4), device, dtype)
    x = image(1, 3, 4, device, dtype)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(module))
    try:
        with torch.no_grad():
            out = fast(x)
            fast_seen, seen[:] = list(seen), []
            expected = ref(x)
    finally:
        handle.remove()
    assert [type(m).__name__ for m in fast_seen] == [type(m).__name__ for m in seen]
    assert_close(out, expected, tolerance(device, dtype)[0], "output")


def _other_alpha_on_a_block(model):
    model.groups[0].blocks[1].alpha = 0.3


def _global_hook(model):
    return torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None).remove


@pytest.mark.parametrize("change", [
    lambda model: _scale_block_output(model, []),  # a block's forward hook: its group called as a module
    _other_alpha_on_a_block,                        # a block's alpha not its group's
    _global_hook,                                   # a global module hook (FlopCounterMode, model summaries)
], ids=["block-hook", "block-alpha", "global-hook"])
def test_forced_triton_refuses_groups_called_as_modules(change, device, monkeypatch):
    """A group called as a module (README: Module semantics) runs the reference's PyTorch math: under
    FASTDRN_BACKEND=triton that was a silent fallback (a kernel benchmark under a model summary or a
    flop counter timed PyTorch). A forced backend runs what it names or raises; auto still runs it."""
    if not backend.use_triton("residual_distill", torch.device(device), dtypes_for(device)[0]):
        pytest.skip("the fused kernels do not run here")
    dtype = dtypes_for(device)[0]
    ref, fast = pair(dict(scale=2, n_feats=8, n_groups=2, n_blocks=2, inner=8, distill=4), device, dtype)
    x = image(1, 3, 4, device, dtype)
    undo = change(fast)
    try:
        monkeypatch.setenv("FASTDRN_BACKEND", "triton")
        with pytest.raises(RuntimeError, match=r"FASTDRN_BACKEND=triton but group 0 .*FASTDRN_BACKEND=auto"):
            fast(x)
        monkeypatch.setenv("FASTDRN_BACKEND", "auto")
        with torch.no_grad():
            fast(x)
    finally:
        if undo is not None:
            undo()


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp"])
def test_torch_func_transforms_run_the_reference_math_or_say_why_they_cannot(transform, device, monkeypatch):
    """fastdrn's fused ops run autograd Functions on real tensors, which torch.func transforms cannot
    see through: under one the model and the ops give the reference's results through PyTorch's
    math (FASTDRN_BACKEND=auto), and a forced FASTDRN_BACKEND=triton says why it cannot run, where
    both crashed inside fastdrn (a data pointer of a wrapped tensor, vmap's is_contiguous)."""
    dtype = dtypes_for(device)[0]
    ref, fast = pair(dict(scale=2, n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=4), device, dtype)
    x = image(2, 3, 4, device, dtype)
    params = {name: p.detach() for name, p in ref.named_parameters()}
    z = torch.randn(1, 8, 3, 5, device=device, dtype=dtype)
    first = fast.groups[0].blocks[0]
    block = [t.detach() for conv in (first.squeeze, first.conv, first.expand) for t in (conv.weight, conv.bias)]

    def under(f, t):
        if transform == "grad":
            return torch.func.grad(lambda u: (f(u) ** 2).sum())(t)
        if transform == "vmap":
            return torch.func.vmap(f)(t.unsqueeze(1))
        return torch.func.jvp(f, (t,), (torch.ones_like(t),))[1]

    def run_model(model):
        if transform == "grad":  # with respect to the parameters
            grads = under(lambda p: torch.func.functional_call(model, p, (x,)), params)
            return torch.cat([g.flatten() for g in grads.values()])
        return under(model, x)

    run_op = {op: lambda op=op: under(lambda t: op(t, *block), z)
              for op in (reference.residual_distill, fastdrn.ops.residual_distill)}
    with pytorch_fp32_convs():
        assert_close(run_model(fast), run_model(ref), tolerance(device, dtype)[1], f"model under {transform}")
        assert_close(run_op[fastdrn.ops.residual_distill](), run_op[reference.residual_distill](),
                     tolerance(device, dtype)[1], f"residual_distill under {transform}")
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    for forced in (lambda: run_model(fast), run_op[fastdrn.ops.residual_distill]):
        with pytest.raises(RuntimeError, match="FASTDRN_BACKEND=triton but .*torch.func"):
            forced()


def test_forward_mode_ad_runs_the_reference_math_or_says_why_it_cannot(device, monkeypatch):
    """Forward-mode AD (torch.autograd.forward_ad) needs a jvp, which the fused ops' autograd
    Functions do not have: inside a dual level the model gives the reference's tangent through
    PyTorch's math (FASTDRN_BACKEND=auto), where it failed with autograd.Function's 'You must
    implement the jvp function', and a forced FASTDRN_BACKEND=triton says why it cannot run."""
    import torch.autograd.forward_ad as fwad

    dtype = dtypes_for(device)[0]
    ref, fast = pair(dict(scale=2, n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=4), device, dtype)
    x = image(1, 3, 4, device, dtype)
    direction = torch.randn_like(x)

    def tangent(model):
        with fwad.dual_level():
            return fwad.unpack_dual(model(fwad.make_dual(x, direction))).tangent

    with pytorch_fp32_convs():
        assert_close(tangent(fast), tangent(ref), tolerance(device, dtype)[1], "tangent")
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FASTDRN_BACKEND=triton but .*forward-mode AD"):
        tangent(fast)


def test_batched_gradients_through_the_fused_backward_are_refused_by_name(device):
    """autograd.grad's is_grads_batched=True and jacobian(vectorize=True) run the backward under vmap,
    whose batched tensors have no storage for a kernel: the fused backward says so (they crashed
    inside fastdrn with vmap's 'NYI: querying is_contiguous'), while unbatched they give the
    reference's Jacobian."""
    dtype = dtypes_for(device)[0]
    if not fastdrn.backend.use_triton("residual_distill", device, dtype):
        pytest.skip("the fused kernels do not run here")
    ref, fast = pair(dict(scale=2, n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=4), device, dtype)
    x = image(1, 2, 3, device, dtype)
    with pytorch_fp32_convs():
        assert_close(torch.autograd.functional.jacobian(fast, x), torch.autograd.functional.jacobian(ref, x),
                     tolerance(device, dtype)[1], "Jacobian")
        with pytest.raises(RuntimeError, match="fastdrn residual_distill: batched gradients"):
            torch.autograd.functional.jacobian(fast, x, vectorize=True)
        x.requires_grad_()
        out = fast(x)
        with pytest.raises(RuntimeError, match="fastdrn residual_distill: batched gradients"):
            torch.autograd.grad(out, x, torch.randn(2, *out.shape, device=device, dtype=dtype), is_grads_batched=True)
    z = torch.randn(1, 16, 3, 5, device=device, dtype=dtype, requires_grad=True)
    w, b = fast.groups[0].compress.weight, fast.groups[0].compress.bias
    out = fastdrn.ops.compress_skip(z, w, b, z[:, :8].detach())
    with pytest.raises(RuntimeError, match="fastdrn compress_skip: batched gradients"):
        torch.autograd.grad(out, z, torch.randn(2, *out.shape, device=device, dtype=dtype), is_grads_batched=True)
    block = fast.groups[0].blocks[0]
    out = fastdrn.ops.residual_distill(z[:, :8], *(t for conv in (block.squeeze, block.conv, block.expand)
                                                   for t in (conv.weight, conv.bias)))
    with pytest.raises(RuntimeError, match="fastdrn residual_distill: batched gradients"):
        torch.autograd.grad(out, z, torch.randn(2, *out.shape, device=device, dtype=dtype), is_grads_batched=True)


def test_compile_fullgraph_torch_path(monkeypatch):
    """No graph break from fastdrn's dispatch (backend switch, checks) around the ops."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # auto on the CPU: the plain PyTorch math
    ref, fast = pair(dict(scale=2, n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=2), "cpu")
    torch._dynamo.reset()  # no cached graph or failed trace from another test: traced afresh
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = image(1, 4, 5, "cpu")
    out = compiled(x)
    out.sum().backward()
    assert_close(out, ref(x).double(), 1e-5, "compiled output")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune"])
@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_on_gpu(mode, training):
    """torch.compile(fastdrn.DRN, fullgraph=True) through the registered Triton ops, in each mode,
    training and inference, three calls each (reduce-overhead records its CUDA graph on one and
    replays it after), against the float64 reference. float64 because a float32 reference on CUDA
    would itself carry cuDNN's TF32 error (9.8e-3 on an H100); PyTorch's own convs in float32
    (helpers.pytorch_fp32_convs)."""
    ref, fast = pair(dict(scale=2, **SMALL), "cuda")
    ref64 = ref.to(torch.float64)
    compiled = torch.compile(fast, fullgraph=True, mode=mode)
    x, target = image(2, 16, 16, "cuda"), image(2, 32, 32, "cuda")
    fwd_tol, grad_tol = tolerance(torch.device("cuda"), torch.float32)
    expected = ref64(x.double())
    with pytorch_fp32_convs():
        for call in range(3):
            if training:
                fast.zero_grad(set_to_none=True)
                F.l1_loss(compiled(x), target).backward()
            else:
                with torch.no_grad():
                    out = compiled(x).clone()  # a CUDA-graph output is overwritten by the next replay
                assert_close(out, expected, fwd_tol, f"mode={mode} call {call}: output")
    if training:
        ref_grads = torch.autograd.grad(F.l1_loss(expected, target.double()), list(ref64.parameters()))
        for (name, p), rg in zip(fast.named_parameters(), ref_grads):
            assert_close(p.grad, rg, grad_tol, f"mode={mode}, third step: grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_reference(dtype, device):
    """Output at SPEC's 16-bit tolerance; parameter gradients as helpers.assert_model_grads_close
    says, against eager PyTorch under the same autocast."""
    if where(device) == "interpreter" and dtype == torch.bfloat16:
        pytest.skip("Triton 3.9's interpreter computes bf16 tl.dot wrongly; bf16 is checked on a GPU")
    def draw():
        ref, fast = pair(dict(scale=2, **SMALL), device)
        x = image(2, 12, 10, device)
        ref64 = reference.DRN(scale=2, **SMALL).to(device).double()
        ref64.load_state_dict(ref.state_dict())
        with torch.autocast(device.type, dtype=dtype):
            out = fast(x)
            eager_out = ref(x)
        expected = ref64(x.double())
        assert_close(out, expected, 2e-2, f"autocast {dtype} output")
        grad = torch.randn_like(expected)
        grads = torch.autograd.grad(out, list(fast.parameters()), grad.to(out.dtype))
        eager_grads = torch.autograd.grad(eager_out, list(ref.parameters()), grad.to(eager_out.dtype))
        ref_grads = torch.autograd.grad(expected, list(ref64.parameters()), grad)
        return grads, eager_grads, ref_grads

    names = [name for name, _ in fastdrn.DRN(scale=2, **SMALL).named_parameters()]
    assert_model_grads_close(dtype, 3e-2, draw, names, f"autocast {dtype}")


def test_autocast_casts_the_fused_weights_once(device):
    """Under autocast the fused ops' weights are cast by one cat and one cast for the whole model,
    not one cast per tensor (a launch each, forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.casts += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    _, fast = pair(dict(scale=2, **SMALL), device)
    x = image(1, 4, 3, device)
    counter = CountCasts()
    with torch.autocast(device.type, dtype=torch.float16), counter:
        out = fast(x)
    fused = 2 * sum(3 * len(group.blocks) + 1 for group in fast.groups)  # 44 weights and biases here
    # Autocast's own casts (head, upsample and tail: weights, biases, inputs) stay; ours are one.
    assert counter.casts <= 10 < fused, counter.casts
    with counter:
        before = counter.casts
        out.float().sum().backward()
    assert counter.casts - before <= 10, counter.casts - before


def test_a_parameter_of_another_dtype_is_cast_for_the_fused_ops(device):
    """One fused weight left in float64 in a float32 model (mixed dtypes): fastdrn.DRN casts each
    weight on its own for the fused ops, the output is the all-float32 model's, and the float64
    parameter gets a float64 gradient equal to the float32 model's."""
    _, fast = pair(dict(scale=2, **SMALL), device)
    x = image(1, 4, 3, device)
    mixed = copy.deepcopy(fast)
    conv = mixed.groups[1].blocks[2].conv
    conv.weight.data = conv.weight.data.double()
    out, expected = mixed(x), fast(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    grad = conv.weight.grad
    assert grad.dtype == torch.float64
    assert torch.equal(grad.float(), fast.groups[1].blocks[2].conv.weight.grad)


def test_inference_under_autocast_follows_weight_changes(device):
    """The fused weights are cast under autocast by one cat and cast: every way a weight changes
    between inference calls (in place through .data, a new .data, load_state_dict, a new Parameter)
    shows in the next output, as a model that never ran gives it."""
    dtype = torch.float16 if where(device) == "interpreter" else torch.bfloat16
    _, fast = pair(dict(scale=2, **SMALL), device)
    x = image(1, 5, 4, device)

    def infer(model):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            return model(x)

    def fresh_output():  # a model that has cast nothing yet, with fast's current weights
        _, other = pair(dict(scale=2, **SMALL), device)
        other.load_state_dict(fast.state_dict())
        return infer(other)

    first = infer(fast)
    assert torch.equal(infer(fast), first)
    block = fast.groups[0].blocks[1]
    changes = [
        lambda: block.conv.weight.data.mul_(0.5),
        lambda: setattr(block.squeeze.weight, "data", block.squeeze.weight.data * 2.0),
        lambda: fast.load_state_dict({**fast.state_dict(), "groups.1.compress.bias": torch.randn(16, device=device)}),
        lambda: setattr(block.expand, "weight", torch.nn.Parameter(block.expand.weight.detach() * 0.5)),
    ]
    before = first
    for change in changes:
        with torch.no_grad():
            change()
        out = infer(fast)
        assert not torch.equal(out, before)
        assert torch.equal(out, fresh_output())
        before = out


def test_channels_last_parameters_under_autocast(device):
    """model.to(memory_format=torch.channels_last), the usual advice for convolutions under AMP: the
    output is unchanged, and forward plus backward copy no tensor more than with contiguous
    parameters (the weight cast keeps each parameter's layout, gradients come back in it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        copies_of = (torch.ops.aten.clone.default, torch.ops.aten.new_empty_strided.default)

        def __init__(self):
            super().__init__()
            self.copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.copies += func in self.copies_of
            return func(*args, **(kwargs or {}))

    # The interpreter's bf16 dots are wrong; fp16 is what it can check.
    dtype = torch.float16 if where(device) == "interpreter" else torch.bfloat16
    _, fast = pair(dict(scale=2, **SMALL), device)
    x = image(1, 5, 4, device)
    copies, outs = [], []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = copy.deepcopy(fast).to(memory_format=memory_format)
        counter = CountCopies()
        with counter:
            with torch.autocast(device.type, dtype=dtype):
                out = model(x)
            out.float().sum().backward()
        copies.append(counter.copies)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert copies[1] <= copies[0], f"channels_last parameters: {copies[1]} copies, contiguous: {copies[0]}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_replays_from_a_cuda_graph():
    """A whole training step (forward, backward, Adam) captured once and replayed ends at the
    weights the same steps reach run one by one."""
    _, graphed = pair(dict(scale=2, **SMALL), "cuda")
    stepped = copy.deepcopy(graphed)
    x, target = image(2, 16, 16, "cuda"), image(2, 32, 32, "cuda")

    def trainer(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)

        def step():
            F.l1_loss(model(x), target).backward()
            opt.step()
        return opt, step

    opt, step = trainer(graphed)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # Triton compiles and tunes here: nothing may sync in capture
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)  # grads allocated inside the graph: each replay writes them
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    before_replays = [p.detach().clone() for p in graphed.parameters()]  # capture runs nothing
    for _ in range(3):
        graph.replay()

    ref_opt, ref_step = trainer(stepped)
    for _ in range(2 + 3):  # the warm-up steps, then one per replay
        ref_opt.zero_grad(set_to_none=True)
        ref_step()
    torch.cuda.synchronize()
    assert any(rel_err(p, q) > 1e-6 for p, q in zip(graphed.parameters(), before_replays)), "replays did nothing"
    apart = [rel_err(p, q) for p, q in zip(graphed.parameters(), stepped.parameters())]
    assert max(apart) <= 1e-5, apart


def _ddp_worker(rank, world, cfg, state, batch, target, store_path, result_path):
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # A file store needs no port (a probed free port can be taken before the store binds it), and
    # gloo on the loopback device does not depend on what the host name resolves to. The group's
    # timeout bounds every collective, so a lost peer is an error, never a wait.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    model = fastdrn.DRN(**cfg)
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model)
    share = batch.shape[0] // world
    sl = slice(rank * share, (rank + 1) * share)
    F.l1_loss(ddp(batch[sl]), target[sl]).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], result_path)
    dist.barrier()  # no rank tears gloo down while the other is still at work (fastdrn/tools/train.py)
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_one(tmp_path):
    import time

    import torch.multiprocessing as mp

    cfg = dict(scale=2, n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=2)
    model = fastdrn.DRN(**cfg)
    batch, target = torch.rand(4, 3, 5, 5), torch.rand(4, 3, 10, 10)
    F.l1_loss(model(batch), target).backward()
    single = [p.grad for p in model.parameters()]
    result = tmp_path / "ddp_grads.pt"
    workers = mp.spawn(_ddp_worker, nprocs=2, join=False,
                       args=(2, cfg, model.state_dict(), batch, target, str(tmp_path / "store"), str(result)))
    # A worker's exception is raised by join(); a hang fails here, with the workers stopped, instead of
    # holding the test run until CI's own limit.
    deadline = time.monotonic() + 300
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in workers.processes:
                proc.kill()
            pytest.fail("two gloo workers did not finish within 300 s")
    for g, h in zip(torch.load(result, weights_only=True), single):
        assert rel_err(g, h) <= 1e-5


# ---- the fused output stage (launch option fuse_tail: kernels/shuffle_tail.py) ------------------
TINY = dict(n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=4)


def _count_fused_tail(monkeypatch) -> list:
    """Calls of the fused output stage, counted (it runs as before)."""
    from fastdrn import backend
    from fastdrn.kernels import shuffle_tail as module

    if backend.triton_unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None:
        pytest.skip("the fused kernels do not run here")
    calls, original = [], module.shuffle_tail
    monkeypatch.setattr(module, "shuffle_tail", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("scale,size,channels_last", [
    (2, (2, 5, 3), False),   # x2, batch 2, odd H and W, NCHW in and out
    (3, (1, 1, 7), True),    # x3 with H = 1, channels_last in and out
])
def test_fused_tail_option_matches_reference(scale, size, channels_last, device, monkeypatch):
    """With fuse_tail on and no gradient wanted, the upsampler runs without its bias and one kernel
    does the shuffle, both biases, the tail and the mean: the reference's output, in the input's
    memory format."""
    from helpers import launch_settings

    calls = _count_fused_tail(monkeypatch)
    cfg = dict(scale=scale, **TINY)
    with pytorch_fp32_convs():
        for dtype in dtypes_for(device):
            ref, fast = pair(cfg, device, dtype)
            ref64 = reference.DRN(**cfg).to(device, torch.float64)
            ref64.load_state_dict(ref.state_dict())
            x = image(*size, device, dtype, channels_last=channels_last)
            with launch_settings(fuse_tail=True), torch.no_grad():
                out = fast(x)
            assert calls, "the fused tail did not run"
            calls.clear()
            assert out.dtype == dtype
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert out.is_contiguous(memory_format=fmt)
            assert_close(out, ref64(x.double()), tolerance(device, dtype)[0], f"{dtype} fused tail")


@pytest.mark.parametrize("scale,n_colors", [
    (9, 3),    # one past the kernel's largest scale (8): SPEC section 1 takes any integer >= 2
    (2, 17),   # one past the kernel's 16 output channels (a 17-band image)
])
def test_fused_tail_option_leaves_models_past_the_kernels_limits_unfused(scale, n_colors, device, monkeypatch):
    """FASTDRN_FUSE_TAIL=1 is a speed option: a model the kernel cannot compute (its scale or colour
    count past shuffle_tail's limits) runs its upsampler, shuffle and tail as before and gives the
    reference's output. It raised "shuffle_tail: scale must be from 1 to 8" instead."""
    from helpers import launch_settings

    calls = _count_fused_tail(monkeypatch)
    cfg = dict(TINY, scale=scale, n_colors=n_colors, rgb_mean=[0.45] * n_colors)
    dtype = dtypes_for(device)[0]
    ref, fast = pair(cfg, device, dtype)
    ref64 = reference.DRN(**cfg).to(device, torch.float64)
    ref64.load_state_dict(ref.state_dict())
    x = torch.rand(1, n_colors, 3, 5, dtype=torch.float64).to(device, dtype)
    with pytorch_fp32_convs(), launch_settings(fuse_tail=True), torch.no_grad():
        out = fast(x)
        expected = ref64(x.double())
    assert not calls
    assert_close(out, expected, tolerance(device, dtype)[0], f"x{scale}, {n_colors} colours, fuse_tail on")


def test_fused_tail_option_keeps_the_autograd_path(device, monkeypatch):
    """Where a gradient is wanted the option changes nothing: the conv with its bias, the pixel
    shuffle and the tail run as before, and the gradients match the reference's."""
    from helpers import launch_settings

    calls = _count_fused_tail(monkeypatch)
    cfg = dict(scale=2, **TINY)
    with pytorch_fp32_convs(), launch_settings(fuse_tail=True):
        check_output_and_gradients(cfg, (1, 3, 5), device)
        assert not calls
        # Parameters frozen but the input wanting its gradient: still the autograd path.
        _, fast = pair(cfg, device, dtypes_for(device)[0])
        fast.requires_grad_(False)
        x = image(1, 3, 5, device, dtypes_for(device)[0]).requires_grad_()
        torch.autograd.grad(fast(x).sum(), x)
        assert not calls
        # Only the tail learning (a fine-tune of the output stage): the autograd path, its gradient
        # the reference's; the rest of the model frozen with it gives the fused kernel again.
        ref, fast = pair(cfg, device, dtypes_for(device)[0])
        for model in (ref, fast):
            model.requires_grad_(False)
            model.tail.requires_grad_()
        x = image(1, 3, 5, device, dtypes_for(device)[0])
        grad, expected = (torch.autograd.grad(model(x).sum(), model.tail.weight)[0] for model in (fast, ref))
        assert not calls
        assert_close(grad, expected, tolerance(device, x.dtype)[1], "tail weight gradient, the rest frozen")
        fast.tail.requires_grad_(False)
        fast(x)
        assert calls


def _clamp_tail_output(model, calls):
    model.tail.register_forward_hook(lambda module, args, out: calls.append(1) or out.clamp(0, 1))


def _halve_upsampler_input(model, calls):
    model.upsample.register_forward_pre_hook(lambda module, args: calls.append(1) or (args[0] * 0.5,))


def _reflecting_tail(model, calls):
    model.tail.padding_mode = "reflect"


def _hook_on_every_module(model, calls):
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(module))
    return handle.remove


@pytest.mark.parametrize("change", [
    _clamp_tail_output,      # a forward hook whose return value replaces the tail's output
    _halve_upsampler_input,  # a forward pre-hook that replaces the upsampler's input
    _reflecting_tail,        # a tail that pads by reflection, not the kernel's zeros
    _hook_on_every_module,   # a global module hook (a profiler, a model summary)
])
def test_fused_tail_option_leaves_an_upsampler_or_tail_that_does_more_than_the_kernel(change, device,
                                                                                     monkeypatch):
    """The reference calls its upsampler and tail as modules: hooks, a global module hook, and the
    tail's own padding take part in its output, so with them fuse_tail runs them as modules too."""
    from helpers import launch_settings

    _count_fused_tail(monkeypatch)
    dtype = dtypes_for(device)[0]
    ref, fast = pair(dict(scale=2, **TINY), device, dtype)
    x = image(1, 3, 5, device, dtype)
    outputs, calls = [], []
    for model in (fast, ref):
        calls.append([])
        undo = change(model, calls[-1])
        try:
            with launch_settings(fuse_tail=True), torch.no_grad(), pytorch_fp32_convs():
                outputs.append(model(x))
        finally:
            if undo is not None:
                undo()
    assert [type(m).__name__ for m in calls[0]] == [type(m).__name__ for m in calls[1]]
    assert_close(outputs[0], outputs[1], tolerance(device, dtype)[0], "output")


def test_fused_tail_under_autocast(device, monkeypatch):
    """float16 autocast: the upsampler's output in float16, the kernel casting the float32 parameters
    itself; the output float32 as the reference's tail(v) + mean."""
    from helpers import launch_settings

    calls = _count_fused_tail(monkeypatch)
    cfg = dict(scale=3, **TINY)
    ref, fast = pair(cfg, device)
    ref64 = reference.DRN(**cfg).to(device).double()
    ref64.load_state_dict(ref.state_dict())
    x = image(1, 5, 4, device)
    with launch_settings(fuse_tail=True), torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        out = fast(x)
        eager = ref(x)
    assert calls and out.dtype == eager.dtype == torch.float32
    assert_close(out, ref64(x.double()), 2e-2, "autocast float16 fused tail")


# ---- tensors on a CUDA device other than the current one -----------------------------------------
def test_launch_device_makes_the_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: backend.launch_device switches to the tensors'
    device where it is another (stand-ins for torch.cuda here; this machine may have no GPU)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: ("made current", index))
    assert backend.launch_device(torch.device("cuda", 1)) == ("made current", 1)
    for same in (torch.device("cuda", 0), torch.device("cpu")):
        assert backend.launch_device(same) is None


@pytest.mark.parametrize("training", [True, False])
def test_every_forward_launch_runs_inside_the_device_guard(monkeypatch, training):
    """fastdrn.DRN's forward, training (its one autograd node) and inference (in-place groups,
    shuffle_tail): every Triton launch happens with the guard of its tensors' device entered. Plans
    off, so that every launch goes through kernels/_common.py `launch`."""
    if where(torch.device("cpu")) != "interpreter" or backend.triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("needs the Triton kernels in the interpreter")
    from fastdrn.kernels import _common, gemm, residual_distill, settings, shuffle_tail

    entered, outside, launched = [], [], []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.remove(self.device)

    def launch(*args, **kwargs):
        launched.append(args[0].fn.__name__ if hasattr(args[0], "fn") else args[0].__name__)
        if not entered:
            outside.append(launched[-1])
        return _common.launch(*args, **kwargs)

    monkeypatch.setattr(backend, "launch_device", Guard)
    for module in (gemm, residual_distill, shuffle_tail):
        monkeypatch.setattr(module, "launch", launch)
    ref, fast = pair(dict(scale=2, **SMALL), "cpu")
    x = image(1, 5, 4, "cpu")
    with settings.launch_settings(fuse_tail=not training):
        plans_were = settings.plans_enabled()
        settings.set_launch_plans(False)
        try:
            with torch.set_grad_enabled(training):
                out = fast(x)
        finally:
            settings.set_launch_plans(plans_were)
    assert launched and not outside, f"launched outside the device guard: {outside} (of {launched})"
    assert training or "shuffle_tail_kernel" in launched
    assert_close(out, ref(x), 1e-5, "output")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_model_on_a_device_that_is_not_current():
    """model.to('cuda:1') with cuda:0 current: Triton launched on cuda:0 with pointers into cuda:1's
    memory. Forward and backward against the float64 reference."""
    ref, fast = pair(dict(scale=2, **SMALL), "cpu")
    ref64, fast = ref.to(torch.float64), fast.to("cuda:1")
    x = image(2, 9, 7, "cpu")
    torch.cuda.set_device(0)
    fwd_tol, grad_tol = tolerance(torch.device("cuda"), torch.float32)
    with pytorch_fp32_convs():
        out = fast(x.to("cuda:1"))
        out.square().mean().backward()
    expected = ref64(x.double())
    assert_close(out, expected, fwd_tol, "output")
    ref_grads = torch.autograd.grad(expected.square().mean(), list(ref64.parameters()))
    for (name, p), rg in zip(fast.named_parameters(), ref_grads):
        assert_close(p.grad, rg, grad_tol, f"grad of {name}")
