"""torch.compile(fastdrn.DRN(...), fullgraph=True): no graph break anywhere in training or inference.

On the CPU the model runs its plain PyTorch path (FASTDRN_BACKEND=torch, or auto without the
interpreter: Triton's interpreter cannot run on the fake tensors compilation traces with), compiled
with backend="aot_eager" (dynamo and AOTAutograd, the same graph capture as inductor, without
generating code). Outputs, every parameter gradient, a few Adam steps and the no-grad inference
path (which writes a group's blocks in place into one buffer) are checked against the float64
reference and the eager model. tests/test_model.py covers the compiled training step on a GPU.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastdrn
from fastdrn import reference
from helpers import assert_close, rel_err

CFG = dict(scale=3, n_feats=8, n_groups=2, n_blocks=2, inner=8, distill=4)
TOL = 1e-5  # docs/numerics.md, float32


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")


@pytest.fixture(params=["forced", "auto"])
def torch_path_both_ways(request, monkeypatch):
    """The plain PyTorch path, named two ways: FASTDRN_BACKEND=torch, or auto with no interpreter."""
    if request.param == "forced":
        monkeypatch.setenv("FASTDRN_BACKEND", "torch")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def models():
    """A fastdrn.DRN and a float64 reference with the same (non-trivial) weights."""
    ref = reference.DRN(**CFG)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    fast = fastdrn.DRN(**CFG)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast, ref.double()


def compiled(model):
    torch._dynamo.reset()  # no cached graph from another test: each test traces afresh
    return torch.compile(model, fullgraph=True, backend="aot_eager")


def test_compiled_training_matches_the_reference(torch_path_both_ways):
    fast, ref64 = models()
    assert fast.backend.startswith("torch")
    model = compiled(fast)
    for channels_last in (False, True):
        x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
        target = torch.rand(2, 3, 15, 21, dtype=torch.float64)
        x32 = x.float().contiguous(memory_format=torch.channels_last) if channels_last else x.float()
        out = model(x32)
        expected = ref64(x)
        assert_close(out, expected, TOL, "compiled output")
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        grads = torch.autograd.grad(F.l1_loss(out, target.float()), list(fast.parameters()))
        ref_grads = torch.autograd.grad(F.l1_loss(expected, target), list(ref64.parameters()))
        for (name, _), g, rg in zip(fast.named_parameters(), grads, ref_grads):
            assert_close(g, rg, TOL, f"compiled gradient of {name}")


def test_compiled_adam_steps_follow_the_eager_model(torch_path):
    fast, _ = models()
    eager = copy.deepcopy(fast)
    model = compiled(fast)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (fast, eager)]
    for _ in range(3):
        x, target = torch.rand(2, 3, 4, 6), torch.rand(2, 3, 12, 18)
        for net, opt in ((model, opts[0]), (eager, opts[1])):
            opt.zero_grad(set_to_none=True)
            F.l1_loss(net(x), target).backward()
            opt.step()
    for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
        assert rel_err(p, q) <= TOL, name


def test_compiled_inference_matches_the_reference(torch_path):
    fast, ref64 = models()
    model = compiled(fast.eval())
    for shape in ((1, 3, 6, 5), (2, 3, 4, 9)):
        x = torch.rand(*shape, dtype=torch.float64)
        with torch.no_grad():
            out = model(x.float())
        assert not out.requires_grad
        assert_close(out, ref64(x), TOL, f"compiled inference {shape}")


def test_compiled_model_in_a_train_step(torch_path):
    """make_train_step takes a compiled model as it takes any module (eager on the CPU)."""
    fast, _ = models()
    eager = copy.deepcopy(fast)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (fast, eager)]
    step = fastdrn.make_train_step(compiled(fast), opts[0], F.l1_loss)
    for _ in range(3):
        x, target = torch.rand(2, 3, 5, 4), torch.rand(2, 3, 15, 12)
        loss = step(x, target)
        opts[1].zero_grad(set_to_none=True)
        expected = F.l1_loss(eager(x), target)
        expected.backward()
        opts[1].step()
        assert rel_err(loss, expected) <= TOL
    for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
        assert rel_err(p, q) <= TOL, name


@pytest.mark.parametrize("first_call", [False, True])
def test_the_fused_paths_glue_traces_without_graph_breaks(first_call, monkeypatch):
    """On a GPU the model's fused path runs fastdrn.ops's own code (checks, the group signatures,
    the weight packing, the cast) around the registered ops while torch.compile traces it. Here the
    fused ops are stood in for by the reference math (Triton's interpreter cannot run on the fake
    tensors compilation traces with), the rest of the glue is fastdrn's own, and it must trace
    with fullgraph=True, training and inference, and give the eager model's results. first_call: the
    compiled call is the first fused call of the process, so tracing also reaches the lazy import
    of the kernels (it failed there on an H200 at 6ef71f3)."""
    from fastdrn import backend, ops

    def chain(z, weights, alpha, recompute, compress, signature, packs, packs_t):
        skip = z
        for i in range(0, len(weights), 6):
            z = reference.residual_distill(z, *weights[i:i + 6], alpha)
        return reference.compress_skip(z, *compress, skip, alpha) if compress else z

    def group_(buffer, weights, alpha, compress=None, packs=None, signature=None):
        z = buffer[:, :weights[0].shape[1]]
        for i in range(0, len(weights), 6):
            z = reference.residual_distill(z, *weights[i:i + 6], alpha)
        return z if compress is None else reference.compress_skip(z, *compress, alpha)

    from fastdrn.kernels import residual_distill as rd

    # The fused ops stood in for where ops finds them (the kernels module), the rest as it is.
    monkeypatch.setattr(rd, "residual_distill_chain", chain)
    monkeypatch.setattr(rd, "residual_distill_group_", group_)
    monkeypatch.setattr(rd, "compress_skip", reference.compress_skip)
    # The fused path chosen, through the kernels-mode check the real choice runs (traced as a constant).
    monkeypatch.setattr(backend, "use_triton", lambda op, device, dtype=None: backend._kernels_mode_mismatch(
        backend.interpreting()) is None)
    fast, _ = models()
    x = torch.rand(1, 3, 5, 4)
    monkeypatch.setattr(ops, "_kernels", None)
    with torch.no_grad():
        expected = fast(x)
    if first_call:
        monkeypatch.setattr(ops, "_kernels", None)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert_close(out, expected, TOL, "compiled training forward")
    assert all(p.grad is not None for p in fast.parameters())
    with torch.no_grad():
        assert_close(compiled(x), expected, TOL, "compiled inference")


@pytest.mark.skipif(not fastdrn.backend.interpreting(), reason="about Triton's interpreter")
def test_compiling_under_the_interpreter_runs_pytorch_math_or_says_why(monkeypatch):
    """With TRITON_INTERPRET=1, auto chose the kernels under torch.compile too, and tracing crashed
    inside them ("Cannot access data pointer of Tensor (e.g. FakeTensor ...)"): the interpreter
    cannot run on the fake tensors compilation traces with. auto now traces PyTorch's math there,
    and a forced backend says why it cannot run."""
    fast, ref = models()
    x = torch.rand(1, 3, 5, 4)
    with torch.no_grad():
        assert_close(compiled(fast)(x), ref(x.double()), TOL, "compiled inference under the interpreter")
    out = compiled(fast)(x)
    out.sum().backward()
    assert_close(out, ref(x.double()), TOL, "compiled training forward under the interpreter")
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    torch._dynamo.reset()
    try:
        with pytest.raises(RuntimeError, match="FASTDRN_BACKEND=triton but .*torch.compile"), torch.no_grad():
            torch.compile(fast, backend="aot_eager")(x)
    finally:
        # Dynamo keeps state from the failed trace: the next fullgraph compile of a DRN in this
        # process failed ("missing tp_iter ... dict_values") until a reset.
        torch._dynamo.reset()
