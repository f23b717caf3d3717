"""fastdrn.make_train_step and fastdrn.make_upscaler: the same losses, parameters, gradients and
outputs as the eager loop written by hand, on the CPU (eager path) and, on a GPU, from replayed
CUDA graphs: Adam and AdamW, a scheduler reaching the graph, fp16 with a GradScaler, the
least-recently-used bound, and what is detected after capture. Also the tile geometry that lets
one graph serve every tile."""
import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastdrn
from fastdrn import graphs
from fastdrn.tools.infer import _windows, forward_tiled, receptive_radius, super_resolve
from helpers import pytorch_fp32_convs, rel_err

SMALL = dict(scale=2, n_feats=8, n_groups=2, n_blocks=2, inner=8, distill=4)
TINY = dict(scale=2, n_feats=8, n_groups=1, n_blocks=1, inner=8, distill=4)
FLOAT32_ROUNDING = 1e-6

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def twins(cfg, device, n=2):
    """n fastdrn.DRNs with the same random weights (biases made non-trivial)."""
    model = fastdrn.DRN(**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return [copy.deepcopy(model).to(device) for _ in range(n)]


def batch(n, h, w, scale, device, nan=False):
    lr = torch.rand(n, 3, h, w, dtype=torch.float64).float().to(device)
    hr = torch.rand(n, 3, h * scale, w * scale, dtype=torch.float64).float().to(device)
    if nan:
        lr[0, 0, 0, 0] = float("nan")
    return lr, hr


def hand_step(model, opt, lr, hr, amp_dtype=None, scaler=None):
    """The eager loop the step must reproduce."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(lr.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
        sr = model(lr)
    loss = F.l1_loss(sr.float(), hr)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss.detach()


def assert_same_params(a, b, tol, what):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        err = rel_err(p, q)
        assert err <= tol, f"{what}: {name} off by {err:.2e}"


def assert_same_grads(a, b, tol, what):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.grad is not None and q.grad is not None, f"{what}: {name} has no gradient"
        err = rel_err(p.grad, q.grad)
        assert err <= tol, f"{what}: grad of {name} off by {err:.2e}"


# ------------------------------------------------------------------------------ CPU: eager path

@pytest.fixture
def torch_math(monkeypatch):
    """The plain PyTorch backend: the step's logic does not depend on it, and it is fast on the CPU."""
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")


@pytest.mark.parametrize("backend_env", ["torch", "auto"])
def test_train_step_follows_the_eager_loop_on_cpu(backend_env, monkeypatch):
    """Adam and a StepLR scheduler, a few steps on fresh odd-sized batches: the same losses,
    parameters and gradients as the hand-written loop, within float32 rounding ("auto" runs the
    Triton kernels through the interpreter, hence the tiny model)."""
    monkeypatch.setenv("FASTDRN_BACKEND", backend_env)
    cfg, steps = (SMALL, 5) if backend_env == "torch" else (TINY, 3)
    stepped, looped = twins(cfg, "cpu")
    start = [p.detach().clone() for p in stepped.parameters()]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (stepped, looped)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    step = fastdrn.make_train_step(stepped, opts[0], F.l1_loss)
    assert not step.cuda_graph
    for _ in range(steps):
        lr, hr = batch(2, 5, 7, cfg["scale"], "cpu")
        loss = step(lr, hr)
        assert loss.dim() == 0 and not loss.requires_grad
        expected = hand_step(looped, opts[1], lr, hr)
        assert rel_err(loss, expected) <= FLOAT32_ROUNDING
        for s in scheds:
            s.step()
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"] == pytest.approx(1e-2 / 2 ** (steps // 2))
    assert_same_params(stepped, looped, FLOAT32_ROUNDING, "after the steps")
    assert_same_grads(stepped, looped, FLOAT32_ROUNDING, "last step")
    assert any(rel_err(p, q) > 1e-4 for p, q in zip(stepped.parameters(), start)), "the steps changed nothing"


def test_train_step_amp_bf16_and_fp16_scaler_follow_the_eager_loop_on_cpu(torch_math):
    """bf16 autocast; fp16 autocast with a GradScaler, including a batch whose NaN makes the scaler
    skip the step and back off."""
    for amp_dtype in (torch.bfloat16, torch.float16):
        stepped, looped = twins(SMALL, "cpu")
        opts = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (stepped, looped)]
        scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if amp_dtype == torch.float16 else None
                   for _ in range(2)]
        step = fastdrn.make_train_step(stepped, opts[0], F.l1_loss, amp_dtype=amp_dtype, grad_scaler=scalers[0])
        for i in range(4):
            nan = amp_dtype == torch.float16 and i == 2
            lr, hr = batch(2, 6, 5, 2, "cpu", nan=nan)
            before = [p.detach().clone() for p in stepped.parameters()]
            loss = step(lr, hr)
            expected = hand_step(looped, opts[1], lr, hr, amp_dtype, scalers[1])
            if nan:
                assert loss.isnan() and expected.isnan()
                assert all(torch.equal(p, q) for p, q in zip(stepped.parameters(), before)), "NaN step not skipped"
            else:
                assert rel_err(loss, expected) <= FLOAT32_ROUNDING
        assert_same_params(stepped, looped, FLOAT32_ROUNDING, f"{amp_dtype}")
        if scalers[0] is not None:
            assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0 ** 9


def test_bad_arguments_are_refused_by_name():
    model = fastdrn.DRN(**TINY)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="GradScaler"):
        fastdrn.make_train_step(model, opt, F.l1_loss, amp_dtype=torch.float16)
    with pytest.raises(ValueError, match="GradScaler"):
        fastdrn.make_train_step(model, opt, F.l1_loss, amp_dtype=torch.float16,
                                grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    with pytest.raises(ValueError, match="amp_dtype"):
        fastdrn.make_train_step(model, opt, F.l1_loss, amp_dtype=torch.float32)
    with pytest.raises(ValueError, match="amp_dtype"):
        fastdrn.make_upscaler(model, amp_dtype="bf16")
    with pytest.raises(ValueError, match="CUDA device"):
        fastdrn.make_train_step(model, opt, F.l1_loss, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA device"):
        fastdrn.make_upscaler(model, cuda_graph=True)
    with pytest.raises(TypeError, match="loss_fn"):
        fastdrn.make_train_step(model, opt, "l1")
    with pytest.raises(TypeError, match="optimizer"):
        fastdrn.make_train_step(model, model.parameters(), F.l1_loss)
    with pytest.raises(ValueError, match="max_graphs"):
        fastdrn.make_upscaler(model, max_graphs=0)
    with pytest.raises(ValueError, match="no parameters"):
        fastdrn.make_upscaler(torch.nn.ReLU())


def test_optimizers_that_cannot_be_captured_are_refused_at_construction(monkeypatch):
    """Where a graph would be captured (here: pretended, the checks run before any CUDA call), an
    optimizer built without capturable=True, or a GradScaler with an optimizer that reads its inf
    check on the host, is refused with the fix in the message."""
    monkeypatch.setattr(graphs, "capture_unavailable", lambda device: None)
    model = fastdrn.DRN(**TINY)
    with pytest.raises(ValueError, match="capturable=True"):
        fastdrn.make_train_step(model, torch.optim.Adam(model.parameters()), F.l1_loss)
    with pytest.raises(ValueError, match="capturable=True"):
        fastdrn.make_train_step(model, torch.optim.AdamW(model.parameters(), fused=True), F.l1_loss)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="fused=True"):
        fastdrn.make_train_step(model, torch.optim.Adam(model.parameters(), capturable=True), F.l1_loss,
                                amp_dtype=torch.float16, grad_scaler=scaler)
    step = fastdrn.make_train_step(model, torch.optim.Adam(model.parameters(), capturable=True, fused=True),
                                   F.l1_loss, amp_dtype=torch.float16, grad_scaler=scaler)
    assert step.cuda_graph
    assert not fastdrn.make_train_step(model, torch.optim.Adam(model.parameters()), F.l1_loss,
                                       cuda_graph=False).cuda_graph


def test_upscaler_gives_the_model_output_on_cpu(torch_math):
    model, = twins(SMALL, "cpu", 1)
    model.eval()
    up = fastdrn.make_upscaler(model)
    for h, w in ((5, 7), (4, 9), (5, 7)):
        x = torch.rand(2, 3, h, w)
        out = up(x)
        with torch.no_grad():
            expected = model(x)
        assert not out.requires_grad and out.shape == (2, 3, 2 * h, 2 * w)
        assert rel_err(out, expected) <= FLOAT32_ROUNDING
    up16 = fastdrn.make_upscaler(model, amp_dtype=torch.bfloat16)
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    assert rel_err(up16(x), expected) <= FLOAT32_ROUNDING


def test_graph_cache_warms_up_then_keeps_the_most_recent():
    cache = graphs._GraphCache(max_graphs=2)
    assert [cache.due("a") for _ in range(graphs.WARMUP_CALLS + 1)] == [False] * graphs.WARMUP_CALLS + [True]
    for key in "abc":
        cache.add(key, key.upper())
    assert list(cache.graphs) == ["b", "c"] and cache.get("a") is None
    assert cache.get("b") == "B"                        # b is now the most recent
    cache.add("d", "D")
    assert list(cache.graphs) == ["b", "d"]
    for i in range(100):                                # shapes seen once do not pile up
        cache.due(i)
    assert len(cache.warm) == 8 * cache.max_graphs


# -------------------------------------------------- CPU: what a user can get wrong, refused by name

def tiny_step(loss_fn=F.l1_loss, **kw):
    model, = twins(TINY, "cpu", 1)
    return model, fastdrn.make_train_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), loss_fn, **kw)


def assert_unchanged(model, before, what):
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), f"{what} changed the parameters"


def test_inputs_that_are_not_float_tensors_are_refused_by_name(torch_math):
    """A list, an array, None or an integer image (uint8, as image readers give) in place of a float
    batch: a TypeError naming the argument, not an AttributeError or a failure inside the model."""
    model, step = tiny_step()
    up = fastdrn.make_upscaler(model)
    lr, hr = batch(2, 5, 7, 2, "cpu")
    for bad_lr, bad_hr, name in (([lr], hr, "lr"), (lr.numpy(), hr, "lr"), (lr, None, "hr"),
                                 ((lr * 255).to(torch.uint8), hr, "lr"), (lr, (hr * 255).to(torch.uint8), "hr")):
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            step(bad_lr, bad_hr)
    for bad in ([lr], lr.numpy(), (lr * 255).to(torch.uint8)):
        with pytest.raises(TypeError, match=r"\blr\b"):
            up(bad)


@pytest.mark.parametrize("dtype", [
    torch.float64,   # a float64 data pipeline into a float32 model
    torch.float16,   # a half batch without amp_dtype
])
def test_lr_in_another_dtype_than_the_model_is_refused_by_name_unless_autocast_casts_it(torch_math, dtype):
    """Without autocast, the first convolution failed with PyTorch's "Input type (double) and bias type
    (float)"; now a TypeError names lr's dtype and the model's, before any parameter changes. Under
    autocast (amp_dtype, or the caller's own) the convolutions cast a float16 input: that stays valid;
    autocast never casts float64, which still fails there, so it is refused by name too."""
    model, step = tiny_step()
    up = fastdrn.make_upscaler(model)
    amp = fastdrn.make_train_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.l1_loss,
                                  amp_dtype=torch.bfloat16)
    up_amp = fastdrn.make_upscaler(model, amp_dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    lr, hr = batch(2, 5, 7, 2, "cpu")
    lr = lr.to(dtype)
    named = rf"lr is {dtype}, but the model's parameters are torch.float32"
    with pytest.raises(TypeError, match=named):
        step(lr, hr)
    with pytest.raises(TypeError, match=named):
        up(lr)
    assert_unchanged(model, before, f"a refused {dtype} lr")
    for outer, calls in ((contextlib.nullcontext(), (lambda: amp(lr, hr), lambda: up_amp(lr))),
                         (torch.autocast("cpu", dtype=torch.bfloat16), (lambda: step(lr, hr), lambda: up(lr)))):
        with outer:
            for call in calls:
                if dtype == torch.float64:
                    with pytest.raises(TypeError, match=named + ".*autocast does not cast float64"):
                        call()
                else:
                    assert torch.isfinite(call()).all()


def test_empty_batch_is_refused_by_the_train_step(torch_math):
    """An empty batch (N, H or W of 0) has no loss to step on: a ValueError before the model runs, not
    pixel_shuffle's backward failing on it. The upscaler gives the empty output, as the model does."""
    model, step = tiny_step()
    before = [p.detach().clone() for p in model.parameters()]
    lr, hr = batch(2, 5, 7, 2, "cpu")
    for bad_lr, bad_hr in ((lr[:0], hr[:0]), (lr[:, :, :0], hr[:, :, :0])):
        with pytest.raises(ValueError, match="empty"):
            step(bad_lr, bad_hr)
    assert_unchanged(model, before, "an empty batch")
    assert fastdrn.make_upscaler(model)(lr[:0]).shape == (0, 3, 10, 14)


@pytest.mark.parametrize("wrap", [
    lambda sr: (sr, sr.mean()),     # a tuple (an output and an auxiliary value)
    lambda sr: {"sr": sr},          # a dict of named outputs
])
def test_model_returning_something_other_than_a_tensor_is_refused_by_name(torch_math, wrap):
    """The step's loss and shape check need the forward's output as a tensor: a tuple or dict failed
    with "'tuple' object has no attribute 'shape'"; now a TypeError says what the forward returned,
    before backward and the optimizer step. So does the upscaler, which handed a tuple back on the
    eager path (and would fail on a replay's clone)."""
    drn, = twins(TINY, "cpu", 1)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drn = drn

        def forward(self, x):
            return wrap(self.drn(x))

    model = Wrapped()
    step = fastdrn.make_train_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.l1_loss)
    before = [p.detach().clone() for p in model.parameters()]
    got = type(wrap(torch.zeros(1))).__name__
    with pytest.raises(TypeError, match=rf"model's forward must return .* one tensor, got a {got}"):
        step(*batch(2, 5, 7, 2, "cpu"))
    assert_unchanged(model, before, f"a forward returning a {got}")
    with pytest.raises(TypeError, match=rf"model's forward must return .* one tensor, got a {got}"):
        fastdrn.make_upscaler(model)(batch(2, 5, 7, 2, "cpu")[0])  # eagerly it was handed back as is


@pytest.mark.parametrize("hr_shape", [
    (1, 3, 10, 14),   # one target for a batch of two: l1_loss broadcasts it, with only a warning
    (3, 10, 14),      # a target without its batch dimension: broadcast too
    (2, 3, 15, 21),   # the target of a x3 model for this x2 one
    (2, 3, 10, 15),   # one column too many (an odd HR crop)
])
def test_target_not_shaped_like_the_output_is_refused(torch_math, hr_shape):
    model, step = tiny_step()
    before = [p.detach().clone() for p in model.parameters()]
    lr = torch.rand(2, 3, 5, 7)
    with pytest.raises(ValueError, match=r"hr.*\(2, 3, 10, 14\)"):
        step(lr, torch.rand(*hr_shape))
    assert_unchanged(model, before, "a mismatched target")


def test_loss_fn_results_that_are_not_a_loss_are_refused_by_name(torch_math):
    """loss_fn returning a float, a tuple, an unreduced loss or a loss cut from autograd: an error
    naming loss_fn and what it returned, before any optimizer step. A one-element loss of shape (1,)
    is a loss, returned 0-d as documented."""
    lr, hr = batch(2, 5, 7, 2, "cpu")
    for loss_fn, error, what in ((lambda sr, hr: 1.0, TypeError, "float"),
                                 (lambda sr, hr: (F.l1_loss(sr, hr), 0), TypeError, "tuple"),
                                 (lambda sr, hr: F.l1_loss(sr, hr, reduction="none"), ValueError, r"\(2, 3, 10, 14\)"),
                                 (lambda sr, hr: F.l1_loss(sr, hr).detach(), ValueError, "autograd")):
        model, step = tiny_step(loss_fn)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(error, match=f"loss_fn.*{what}"):
            step(lr, hr)
        assert_unchanged(model, before, "a refused loss")
    stepped, looped = twins(TINY, "cpu")
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (stepped, looped)]
    loss = fastdrn.make_train_step(stepped, opts[0], lambda sr, hr: F.l1_loss(sr, hr).reshape(1))(lr, hr)
    assert loss.dim() == 0 and rel_err(loss, hand_step(looped, opts[1], lr, hr)) <= FLOAT32_ROUNDING
    assert_same_params(stepped, looped, FLOAT32_ROUNDING, "a loss of shape (1,)")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_train_step_without_autograd_is_refused(torch_math, mode):
    """A step called inside torch.no_grad() or torch.inference_mode() (an evaluation block around the
    loop) cannot compute gradients: said so, not "element 0 of tensors does not require grad"."""
    model, step = tiny_step()
    lr, hr = batch(2, 5, 7, 2, "cpu")
    with mode(), pytest.raises(RuntimeError, match=mode.__name__):
        step(lr, hr)


def test_gradients_never_accumulate_for_parameters_unfrozen_later_or_outside_the_model(torch_math):
    """Fine-tuning: the head frozen when the step is made and unfrozen halfway; and a learnable loss
    weight that the optimizer steps but the model does not hold. Every call starts from no gradients
    for both, as opt.zero_grad(set_to_none=True) in the eager loop does."""
    stepped, looped = twins(TINY, "cpu")
    weights = [torch.nn.Parameter(torch.tensor(1.5)) for _ in range(2)]
    for m in (stepped, looped):
        m.head.requires_grad_(False)
    opts = [torch.optim.SGD([*m.parameters(), w], lr=0.1, momentum=0.9) for m, w in zip((stepped, looped), weights)]
    step = fastdrn.make_train_step(stepped, opts[0], lambda sr, hr: weights[0] * F.l1_loss(sr, hr))
    for i in range(4):
        if i == 2:
            for m in (stepped, looped):
                m.head.requires_grad_(True)
        lr, hr = batch(2, 5, 7, 2, "cpu")
        loss = step(lr, hr)
        opts[1].zero_grad(set_to_none=True)
        expected = weights[1] * F.l1_loss(looped(lr), hr)
        expected.backward()
        opts[1].step()
        assert rel_err(loss, expected) <= FLOAT32_ROUNDING, f"step {i}"
        assert rel_err(weights[0].grad, weights[1].grad) <= FLOAT32_ROUNDING, f"step {i}: the loss weight's gradient"
    assert_same_grads(stepped, looped, FLOAT32_ROUNDING, "after unfreezing the head")
    assert_same_params(stepped, looped, FLOAT32_ROUNDING, "after unfreezing the head")
    assert rel_err(weights[0], weights[1]) <= FLOAT32_ROUNDING


@pytest.mark.parametrize("cuda_graph", [
    "False",  # truthy: on a GPU it would capture, against what it says
    "no",     # the same, and on the CPU it raised as cuda_graph=True
    0.0,      # falsy: ran eagerly by accident of its value
])
def test_cuda_graph_that_is_not_a_bool_is_refused(cuda_graph):
    model = fastdrn.DRN(**TINY)
    with pytest.raises(TypeError, match="cuda_graph"):
        fastdrn.make_train_step(model, torch.optim.Adam(model.parameters()), F.l1_loss, cuda_graph=cuda_graph)
    with pytest.raises(TypeError, match="cuda_graph"):
        fastdrn.make_upscaler(model, cuda_graph=cuda_graph)


def test_max_graphs_true_is_refused():
    """True is an int (1) to isinstance: it would keep one graph."""
    model = fastdrn.DRN(**TINY)
    with pytest.raises(ValueError, match="max_graphs"):
        fastdrn.make_upscaler(model, max_graphs=True)
    with pytest.raises(ValueError, match="max_graphs"):
        fastdrn.make_train_step(model, torch.optim.Adam(model.parameters()), F.l1_loss, max_graphs=True)


def test_grad_scaler_that_is_not_a_grad_scaler_is_refused():
    model = fastdrn.DRN(**TINY)
    for scaler in ("dynamic", 2.0 ** 16):
        with pytest.raises(TypeError, match="grad_scaler"):
            fastdrn.make_train_step(model, torch.optim.Adam(model.parameters()), F.l1_loss,
                                    amp_dtype=torch.float16, grad_scaler=scaler)


def test_what_the_graphs_baked_in_is_checked_before_each_replay(torch_math):
    """The checks a captured step runs before each replay, driven on the CPU through the step's own
    bake (no graph needed): optimizer.load_state_dict when the optimizer's first parameter is frozen
    (it has no state to tell a reload by), and parameters unfrozen, each drop the graphs; nothing
    changed keeps them."""
    model, = twins(TINY, "cpu", 1)
    model.head.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = fastdrn.make_train_step(model, opt, F.l1_loss)
    for _ in range(2):
        step(*batch(2, 5, 7, 2, "cpu"))
    saved = copy.deepcopy(opt.state_dict())
    step._baked = step._bake()
    step._check_unchanged()
    assert step._baked is not None, "dropped with nothing changed"
    opt.load_state_dict(saved)
    step._check_unchanged()
    assert step._baked is None, "optimizer.load_state_dict not noticed"
    step._baked = step._bake()
    model.head.requires_grad_(True)
    step._check_unchanged()
    assert step._baked is None, "the unfrozen head not noticed"


@pytest.mark.parametrize("opt_cls,advice", [
    (torch.optim.Adam, "capturable=True"),   # has the option: a tensor lr reaches the graph
    (torch.optim.SGD, "SGD has no capturable option"),   # captured as it is; capturable=True is a TypeError
])
def test_a_changed_float_lr_gets_advice_the_optimizer_can_take(torch_math, opt_cls, advice):
    """After capture (the bake driven on the CPU, as above) a float lr that changed raises; the fix it
    names must be one this optimizer accepts: SGD(capturable=True) is a TypeError."""
    model, = twins(TINY, "cpu", 1)
    opt = opt_cls(model.parameters(), lr=1e-2)
    step = fastdrn.make_train_step(model, opt, F.l1_loss)
    step(*batch(2, 5, 7, 2, "cpu"))
    step._baked = step._bake()
    opt.param_groups[0]["lr"] = 5e-3
    with pytest.raises(RuntimeError, match=r"\['lr'\] changed") as err:
        step._check_unchanged()
    assert advice in str(err.value) and "step.reset()" in str(err.value)
    if opt_cls is torch.optim.SGD:
        assert "capturable=True" not in str(err.value)
        with pytest.raises(TypeError):
            torch.optim.SGD(model.parameters(), capturable=True)


def test_optimizer_of_another_model_is_refused(torch_math):
    """An optimizer built over a copy of the model (made before a deepcopy, or for another model)
    steps none of this model's parameters: every call would train nothing, silently."""
    model, other = twins(TINY, "cpu")
    with pytest.raises(ValueError, match="optimizer.*none of"):
        fastdrn.make_train_step(model, torch.optim.Adam(other.parameters()), F.l1_loss)
    model.head.requires_grad_(False)       # the trainable parameters it steps are enough
    fastdrn.make_train_step(model, torch.optim.Adam([*model.head.parameters(), *model.tail.parameters()]), F.l1_loss)


def test_loss_class_in_place_of_a_loss_is_refused():
    """loss_fn=torch.nn.L1Loss (the class, not L1Loss()) is callable: each call built an L1Loss with
    sr and hr as its legacy size_average and reduce, failing with "Boolean value of Tensor with more
    than one value is ambiguous"."""
    model = fastdrn.DRN(**TINY)
    with pytest.raises(TypeError, match=r"L1Loss\(\)"):
        fastdrn.make_train_step(model, torch.optim.Adam(model.parameters()), torch.nn.L1Loss)


def test_ddp_model_is_not_captured(monkeypatch, tmp_path):
    """The docs say DistributedDataParallel is not captured: with cuda_graph=None a DDP model runs
    eagerly, and cuda_graph=True raises, where a graph would be captured (pretended here, as above;
    the process group is one gloo process)."""
    import torch.distributed as dist

    monkeypatch.setattr(graphs, "capture_unavailable", lambda device: None)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = fastdrn.DRN(**TINY)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), capturable=True)
        assert fastdrn.make_train_step(model, opt, F.l1_loss).cuda_graph
        assert not fastdrn.make_train_step(ddp, opt, F.l1_loss).cuda_graph
        with pytest.raises(ValueError, match="DistributedDataParallel"):
            fastdrn.make_train_step(ddp, opt, F.l1_loss, cuda_graph=True)
    finally:
        dist.destroy_process_group()


class _Looked(Exception):
    """Raised by a runner's graph-cache lookup once it has recorded the key (_recorded_keys)."""


def _recorded_keys(runner, args) -> tuple:
    """(keys, look): each look() calls runner(*args) as far as its graph-cache lookup, whose key it
    appends to keys; nothing is captured or replayed."""
    keys = []

    def get(key):
        keys.append(key)
        raise _Looked

    runner._cache.get = get

    def look():
        with pytest.raises(_Looked):
            runner(*args)

    return keys, look


def test_the_callers_autocast_is_part_of_the_graph_key(monkeypatch):
    """A graph captured inside the caller's torch.autocast has its casts baked in: calls of one shape
    inside and outside it, or under another autocast dtype, must not replay each other's graph. Where a
    graph would be captured (pretended, as above; the model's device type is the CPU's here), the keys
    the step and the upscaler look up are recorded before any CUDA call."""
    monkeypatch.setattr(graphs, "capture_unavailable", lambda device: None)
    model, = twins(TINY, "cpu", 1)
    step = fastdrn.make_train_step(model, torch.optim.Adam(model.parameters(), capturable=True), F.l1_loss)
    up = fastdrn.make_upscaler(model)
    lr, hr = batch(2, 5, 7, 2, "cpu")
    for runner, args in ((step, (lr, hr)), (up, (lr,))):
        keys, look = _recorded_keys(runner, args)
        for outer in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16),
                      torch.autocast("cpu", dtype=torch.float16), torch.autocast("cpu", enabled=False)):
            with outer:
                look()
        assert len(set(keys[:3])) == 3, f"{type(runner).__name__}: one key inside and outside autocast"
        assert keys[3] == keys[0], f"{type(runner).__name__}: autocast(enabled=False) is no autocast"


def test_the_backend_and_launch_settings_are_part_of_the_graph_key(monkeypatch):
    """A graph holds the kernels its capture ran: after FASTDRN_BACKEND=torch (read at every call,
    README) or set_launch_options(fuse_tail=True / fold_backward=False) a replay ran the old graph,
    the forced backend or the memory setting never reaching a captured shape. Keys looked up as in
    the autocast test above (capture pretended, no CUDA call)."""
    from helpers import launch_settings

    monkeypatch.setattr(graphs, "capture_unavailable", lambda device: None)
    model, = twins(TINY, "cpu", 1)
    step = fastdrn.make_train_step(model, torch.optim.Adam(model.parameters(), capturable=True), F.l1_loss)
    up = fastdrn.make_upscaler(model)
    lr, hr = batch(2, 5, 7, 2, "cpu")
    for runner, args, setting in ((step, (lr, hr), dict(fold_backward=False)), (up, (lr,), dict(fuse_tail=True))):
        keys, look = _recorded_keys(runner, args)
        monkeypatch.delenv("FASTDRN_BACKEND", raising=False)
        look()                                          # auto
        monkeypatch.setenv("FASTDRN_BACKEND", "torch")  # PyTorch's math asked for
        look()
        monkeypatch.setenv("FASTDRN_BACKEND", "auto")   # auto again: the first graph
        look()
        with launch_settings(**setting):                # another launch setting
            look()
        look()                                          # the setting restored: the first graph
        name = type(runner).__name__
        assert keys[1] != keys[0], f"{name}: FASTDRN_BACKEND=torch replays the auto graph"
        assert keys[2] == keys[0], f"{name}: auto is the default"
        assert keys[3] != keys[0], f"{name}: {setting} replays the graph captured without it"
        assert keys[4] == keys[0], f"{name}: the same settings again, a new key"


# ----------------------------------------------------------------------------------- tiling

@pytest.mark.parametrize("size,tile,overlap", [(45, 11, 7), (38, 11, 7), (20, 16, 3), (7, 3, 0), (24, 5, 20),
                                               (1, 1, 0), (13, 13, 2), (100, 7, 9)])
def test_tile_windows_share_one_shape_and_enough_context(size, tile, overlap):
    wins = list(_windows(size, tile, overlap))
    assert {w1 - w0 for _, _, w0, w1 in wins} == {min(size, tile + 2 * overlap)}
    assert [c0 for c0, *_ in wins] == list(range(0, size, tile)) and wins[-1][1] == size
    for c0, c1, w0, w1 in wins:
        assert 0 <= w0 <= c0 < c1 <= w1 <= size
        assert w0 == 0 or c0 - w0 >= overlap, "too little context before the core"
        assert w1 == size or w1 - c1 >= overlap, "too little context after the core"


def test_tiles_run_at_one_shape_and_equal_the_untiled_image(torch_math):
    model, = twins({**SMALL, "scale": 3}, "cpu", 1)
    model.eval()
    r = receptive_radius(SMALL)
    x = torch.rand(1, 3, 45, 38)
    shapes = []

    def recording(t):
        shapes.append(tuple(t.shape))
        return model(t)
    with torch.no_grad():
        full = model(x)
        tiled = forward_tiled(recording, x, 3, tile=11, overlap=r)
    assert len(shapes) == 5 * 4 and set(shapes) == {(1, 3, 11 + 2 * r, 11 + 2 * r)}
    assert (tiled - full).abs().max().item() < 1e-5
    up = fastdrn.make_upscaler(model)
    assert (super_resolve(up, x[0], 3, tile=11, radius=r) - full[0]).abs().max().item() < 1e-5


def test_cli_takes_no_cuda_graph():
    from fastdrn.cli import build_parser

    p = build_parser()
    assert p.parse_args(["upscale", "a.png", "-o", "b.png", "--weights", "w"]).cuda_graph is True
    assert p.parse_args(["upscale", "a.png", "-o", "b.png", "--weights", "w", "--no-cuda-graph"]).cuda_graph is False
    assert p.parse_args(["eval", "--weights", "w", "--hr-dir", "d", "--no-cuda-graph"]).cuda_graph is False
    assert p.parse_args(["train", "--hr-dir", "d", "--scale", "2", "--out", "o", "--no-cuda-graph"]).cuda_graph is False


# ------------------------------------------------------------------------ CUDA: captured graphs

def capturable(cls, model, lr=1e-3, **kw):
    return cls(model.parameters(), lr=torch.tensor(lr, device="cuda"), capturable=True, **kw)


def run_pair(graphed, eager, step_g, step_e, batches, tol=1e-5, grads=True):
    """Both steps over the same batches: every loss, and every step's gradients, alike."""
    losses = []
    for lr, hr in batches:
        losses.append((step_g(lr, hr), step_e(lr, hr)))
        if grads:
            assert_same_grads(graphed, eager, 10 * tol, "a step's gradients")
    # compared at the end: a returned loss aliasing the graph's static output would have changed since
    for i, (a, b) in enumerate(losses):
        assert rel_err(a, b) <= tol, f"loss {i}: {a.item()} vs {b.item()}"


@cuda
@pytest.mark.parametrize("opt_cls,fused", [(torch.optim.Adam, False), (torch.optim.Adam, True),
                                           (torch.optim.AdamW, False), (torch.optim.AdamW, True)])
def test_captured_step_replays_the_eager_step(opt_cls, fused):
    graphed, eager = twins(SMALL, "cuda")
    kw = dict(fused=fused, weight_decay=0.05 if opt_cls is torch.optim.AdamW else 0.0)
    step_g = fastdrn.make_train_step(graphed, capturable(opt_cls, graphed, **kw), F.l1_loss, cuda_graph=True)
    step_e = fastdrn.make_train_step(eager, capturable(opt_cls, eager, **kw), F.l1_loss, cuda_graph=False)
    n = graphs.WARMUP_CALLS
    batches = [batch(2, 16, 12, 2, "cuda") for _ in range(n + 4)]
    run_pair(graphed, eager, step_g, step_e, batches[:n + 1])
    assert step_g.num_graphs == 1
    before = [p.detach().clone() for p in graphed.parameters()]
    run_pair(graphed, eager, step_g, step_e, batches[n + 1:])
    torch.cuda.synchronize()
    assert any(rel_err(p, q) > 1e-6 for p, q in zip(graphed.parameters(), before)), "the replays did nothing"
    assert_same_params(graphed, eager, 1e-5, "after the replays")


@cuda
def test_scheduler_reaches_the_graph_through_a_tensor_lr():
    graphed, eager = twins(SMALL, "cuda")
    opts = [capturable(torch.optim.Adam, m, lr=2e-3) for m in (graphed, eager)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    step_g = fastdrn.make_train_step(graphed, opts[0], F.l1_loss)
    step_e = fastdrn.make_train_step(eager, opts[1], F.l1_loss, cuda_graph=False)
    assert step_g.cuda_graph
    for _ in range(graphs.WARMUP_CALLS + 5):
        run_pair(graphed, eager, step_g, step_e, [batch(2, 12, 16, 2, "cuda")])
        for s in scheds:
            s.step()
    assert step_g.num_graphs == 1
    assert_same_params(graphed, eager, 1e-5, "with a StepLR schedule")
    # lr 0 in the tensor: a replay leaves the parameters exactly as they were
    opts[0].param_groups[0]["lr"].fill_(0.0)
    before = [p.detach().clone() for p in graphed.parameters()]
    step_g(*batch(2, 12, 16, 2, "cuda"))
    assert all(torch.equal(p, q) for p, q in zip(graphed.parameters(), before))
    opts[0].param_groups[0]["lr"].fill_(1e-3)
    step_g(*batch(2, 12, 16, 2, "cuda"))
    assert not all(torch.equal(p, q) for p, q in zip(graphed.parameters(), before))


@cuda
def test_float_lr_changed_after_capture_raises():
    model, = twins(SMALL, "cuda", 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step = fastdrn.make_train_step(model, opt, F.l1_loss)
    lr, hr = batch(2, 12, 12, 2, "cuda")
    for _ in range(graphs.WARMUP_CALLS + 1):
        step(lr, hr)
    assert step.num_graphs == 1
    sched.step()
    with pytest.raises(RuntimeError, match=r"\['lr'\].*tensor"):
        step(lr, hr)
    step.reset()
    for _ in range(graphs.WARMUP_CALLS + 1):
        step(lr, hr)
    assert step.num_graphs == 1


@cuda
def test_fp16_with_grad_scaler_skips_nan_steps_in_the_graph():
    graphed, eager = twins(SMALL, "cuda")
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 12) for _ in range(2)]
    steps = [fastdrn.make_train_step(m, capturable(torch.optim.Adam, m, fused=True), F.l1_loss,
                                     amp_dtype=torch.float16, grad_scaler=s, cuda_graph=g)
             for m, s, g in ((graphed, scalers[0], True), (eager, scalers[1], False))]
    n = graphs.WARMUP_CALLS
    run_pair(graphed, eager, *steps, [batch(2, 16, 16, 2, "cuda") for _ in range(n + 2)], tol=1e-3, grads=False)
    assert steps[0].num_graphs == 1
    before = [p.detach().clone() for p in graphed.parameters()]
    scale = scalers[0].get_scale()
    bad = batch(2, 16, 16, 2, "cuda", nan=True)
    steps[0](*bad)
    steps[1](*bad)
    assert all(torch.equal(p, q) for p, q in zip(graphed.parameters(), before)), "the NaN step was applied"
    assert scalers[0].get_scale() == scalers[1].get_scale() == scale / 2
    run_pair(graphed, eager, *steps, [batch(2, 16, 16, 2, "cuda") for _ in range(2)], tol=1e-3, grads=False)
    assert_same_params(graphed, eager, 1e-3, "fp16 with a GradScaler")
    with pytest.raises(ValueError, match="fused=True"):
        fastdrn.make_train_step(graphed, capturable(torch.optim.Adam, graphed), F.l1_loss,
                                amp_dtype=torch.float16, grad_scaler=scalers[0])


@cuda
def test_bf16_autocast_step_replays_the_eager_step():
    graphed, eager = twins(SMALL, "cuda")
    steps = [fastdrn.make_train_step(m, capturable(torch.optim.Adam, m, fused=True), F.l1_loss,
                                     amp_dtype=torch.bfloat16, cuda_graph=g) for m, g in ((graphed, True), (eager, False))]
    run_pair(graphed, eager, *steps, [batch(2, 16, 16, 2, "cuda") for _ in range(graphs.WARMUP_CALLS + 3)],
             tol=1e-3, grads=False)
    assert steps[0].num_graphs == 1
    assert_same_params(graphed, eager, 1e-3, "bf16 autocast")


@cuda
def test_uncapturable_optimizer_is_refused():
    model, = twins(SMALL, "cuda", 1)
    with pytest.raises(ValueError, match="capturable=True"):
        fastdrn.make_train_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), F.l1_loss)


@cuda
def test_shapes_beyond_the_bound_are_evicted_and_replays_interleave():
    """max_graphs=2 over three shapes; then two captured shapes alternate: every step's loss and
    gradients (restored into .grad from the graph that ran) match the eager twin."""
    graphed, eager = twins(SMALL, "cuda")
    step_g = fastdrn.make_train_step(graphed, capturable(torch.optim.Adam, graphed), F.l1_loss, max_graphs=2)
    step_e = fastdrn.make_train_step(eager, capturable(torch.optim.Adam, eager), F.l1_loss, cuda_graph=False)
    n = graphs.WARMUP_CALLS + 1
    counts = []
    for shape in ((2, 8, 8), (2, 12, 8), (1, 8, 12), (2, 8, 8)):
        run_pair(graphed, eager, step_g, step_e, [batch(*shape, 2, "cuda") for _ in range(n)])
        counts.append(step_g.num_graphs)
    assert counts == [1, 2, 2, 2]
    for shape in ((1, 8, 12), (2, 8, 8)) * 3:           # both captured now: replays only
        run_pair(graphed, eager, step_g, step_e, [batch(*shape, 2, "cuda")])
    assert step_g.num_graphs == 2
    assert_same_params(graphed, eager, 1e-5, "after evictions and interleaved replays")


@cuda
def test_new_parameter_storage_and_loaded_optimizer_state_are_recaptured():
    graphed, eager = twins(SMALL, "cuda")
    opts = [capturable(torch.optim.Adam, m) for m in (graphed, eager)]
    step_g = fastdrn.make_train_step(graphed, opts[0], F.l1_loss)
    step_e = fastdrn.make_train_step(eager, opts[1], F.l1_loss, cuda_graph=False)
    batches = lambda k: [batch(2, 8, 8, 2, "cuda") for _ in range(k)]  # noqa: E731
    run_pair(graphed, eager, step_g, step_e, batches(2))
    snapshot = copy.deepcopy(opts[1].state_dict()), copy.deepcopy(eager.state_dict())
    run_pair(graphed, eager, step_g, step_e, batches(graphs.WARMUP_CALLS))
    assert step_g.num_graphs == 1
    # back to the earlier state, as a resume would: the graph must not keep the replaced Adam moments
    for opt, model in zip(opts, (graphed, eager)):
        opt.load_state_dict(copy.deepcopy(snapshot[0]))
        model.load_state_dict(snapshot[1])
    run_pair(graphed, eager, step_g, step_e, batches(graphs.WARMUP_CALLS + 2))
    assert_same_params(graphed, eager, 1e-5, "after optimizer.load_state_dict")
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert rel_err(opts[0].state[p]["exp_avg"], opts[1].state[q]["exp_avg"]) <= 1e-5
    # new storage for every parameter (what model.to(...) does)
    with torch.no_grad():
        for p in graphed.parameters():
            p.data = p.data.clone()
    run_pair(graphed, eager, step_g, step_e, batches(1))
    assert step_g.num_graphs == 0                        # dropped, warming up again
    run_pair(graphed, eager, step_g, step_e, batches(graphs.WARMUP_CALLS + 1))
    assert step_g.num_graphs == 1
    assert_same_params(graphed, eager, 1e-5, "after new parameter storage")


@cuda
def test_parameters_unfrozen_after_capture_are_recaptured():
    """The head frozen while the shape is captured, then unfrozen: the graph's backward has no
    gradients for it, so the step captures again and the head trains as in the eager twin."""
    graphed, eager = twins(SMALL, "cuda")
    for m in (graphed, eager):
        m.head.requires_grad_(False)
    step_g = fastdrn.make_train_step(graphed, capturable(torch.optim.Adam, graphed), F.l1_loss)
    step_e = fastdrn.make_train_step(eager, capturable(torch.optim.Adam, eager), F.l1_loss, cuda_graph=False)
    n = graphs.WARMUP_CALLS + 1
    run_pair(graphed, eager, step_g, step_e, [batch(2, 8, 8, 2, "cuda") for _ in range(n)], grads=False)
    assert step_g.num_graphs == 1 and graphed.head.weight.grad is None
    head = graphed.head.weight.detach().clone()
    for m in (graphed, eager):
        m.head.requires_grad_(True)
    run_pair(graphed, eager, step_g, step_e, [batch(2, 8, 8, 2, "cuda") for _ in range(n + 1)])
    assert step_g.num_graphs == 1
    assert not torch.equal(graphed.head.weight, head), "the unfrozen head did not train"
    assert_same_params(graphed, eager, 1e-5, "after unfreezing the head")


@cuda
def test_upscaler_replays_the_forward_and_returns_owned_outputs():
    model, = twins(SMALL, "cuda", 1)
    model.eval()
    up = fastdrn.make_upscaler(model, max_graphs=2)
    xs = [torch.rand(1, 3, 20, 24, device="cuda") for _ in range(graphs.WARMUP_CALLS + 3)]
    outs = [up(x) for x in xs]
    assert up.num_graphs == 1
    with torch.no_grad():
        for x, out in zip(xs, outs):                     # compared after all calls: no aliasing
            assert rel_err(out, model(x)) <= 1e-5
    for shape in ((1, 3, 12, 16), (2, 3, 8, 8)):
        for _ in range(graphs.WARMUP_CALLS + 1):
            x = torch.rand(*shape, device="cuda")
            with torch.no_grad():
                assert rel_err(up(x), model(x)) <= 1e-5
    assert up.num_graphs == 2
    up16 = fastdrn.make_upscaler(model, amp_dtype=torch.bfloat16)
    x = torch.rand(1, 3, 20, 24, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(x)
    for _ in range(graphs.WARMUP_CALLS + 2):
        assert rel_err(up16(x), expected) <= 1e-2
    assert up16.num_graphs == 1


@cuda
def test_tiled_upscaling_replays_one_graph_for_every_tile():
    model, = twins({**SMALL, "scale": 3}, "cuda", 1)
    model.eval()
    r = receptive_radius(SMALL)
    x = torch.rand(3, 45, 38)
    up = fastdrn.make_upscaler(model)
    with pytorch_fp32_convs():  # cuDNN's TF32 would round each tile's convs differently from the image's
        full = super_resolve(model, x, 3, device="cuda")
        tiled = super_resolve(up, x, 3, tile=11, radius=r)
    assert up.num_graphs == 1
    assert rel_err(tiled, full) <= 1e-4


def _train_images(tmp_path):
    import numpy as np
    from PIL import Image

    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 44, 3)) * 255).astype(np.uint8)).save(hr_dir / f"{i}.png")
    return hr_dir


def _train_cfg(hr_dir, out, **kw):
    from fastdrn.tools.train import TrainConfig

    out.mkdir(exist_ok=True)
    return TrainConfig(hr_dir=str(hr_dir), out=str(out), scale=2, patch_size=12, batch_size=4, lr=1e-3,
                       workers=0, progress=False, iters_per_epoch=2, lr_step=1, device="cuda",
                       n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=4, **kw)


@cuda
def test_trainer_on_cuda_replays_the_eager_run(tmp_path):
    """fastdrn train on a GPU (graphed by default; the lr halves every 2 steps through the tensor
    the graph reads) ends where --no-cuda-graph ends."""
    from fastdrn.tools.train import Trainer

    hr_dir = _train_images(tmp_path)
    models = {}
    for graphed in (True, False):
        t = Trainer(_train_cfg(hr_dir, tmp_path / str(graphed), steps=graphs.WARMUP_CALLS + 4, cuda_graph=graphed))
        assert t.train_step.cuda_graph is graphed
        t.fit()
        models[graphed] = t.model
        if graphed:
            assert t.train_step.num_graphs == 1
            assert isinstance(t.optimizer.param_groups[0]["lr"], torch.Tensor)
        t.close()
    assert_same_params(models[True], models[False], 1e-5, "fastdrn train with and without --no-cuda-graph")


@cuda
def test_trainer_on_cuda_resumes_a_graphed_run(tmp_path):
    """A checkpoint of a graphed run (lr kept as a device tensor) resumes, graphed or not, where the
    uninterrupted run goes."""
    from fastdrn.tools.train import train

    hr_dir = _train_images(tmp_path)
    total = 2 * graphs.WARMUP_CALLS + 2
    assert train(_train_cfg(hr_dir, tmp_path / "full", steps=total)) == 0
    for resumed_graphed in (True, False):
        part = tmp_path / f"part{resumed_graphed}"
        assert train(_train_cfg(hr_dir, part, steps=graphs.WARMUP_CALLS + 1)) == 0
        assert train(_train_cfg(hr_dir, part, steps=total, resume="auto", cuda_graph=resumed_graphed)) == 0
        a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
        b = torch.load(part / "last.pt", weights_only=True)
        assert a["step"] == b["step"] == total
        for k in a["model"]:
            assert rel_err(b["model"][k], a["model"][k]) <= 1e-5, k
        assert float(b["optimizer"]["param_groups"][0]["lr"]) == pytest.approx(1e-3 / 2 ** (total // 2))
    # a checkpoint made on the CPU (plain Adam: float lr, step counts on the host) resumes graphed on the GPU
    cpu_part = tmp_path / "cpu_part"
    cpu_cfg = _train_cfg(hr_dir, cpu_part, steps=graphs.WARMUP_CALLS + 1)
    assert train(dataclasses.replace(cpu_cfg, device="cpu")) == 0
    assert train(_train_cfg(hr_dir, cpu_part, steps=total, resume="auto")) == 0
    b = torch.load(cpu_part / "last.pt", weights_only=True)
    assert b["step"] == total and b["optimizer"]["param_groups"][0]["capturable"] is True
    for k in a["model"]:  # the first steps ran on the CPU: alike, not equal
        assert rel_err(b["model"][k], a["model"][k]) <= 1e-2, k


def test_readme_example_runs(torch_math, capsys):
    """The README's "Whole-step CUDA graphs" example, as written (on a GPU it captures)."""
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme.split("## Whole-step CUDA graphs", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md (Whole-step CUDA graphs)", "exec"), namespace)
    assert namespace["sr"].shape == (1, 3, 64, 80)
    assert namespace["step"].cuda_graph == torch.cuda.is_available()
    assert "loss 0." in capsys.readouterr().out


def test_a_callers_autocast_runs_without_its_weight_cast_cache():
    """A caller's autocast around a whole loop keeps its weight-cast cache across calls; a capture
    under it would read the casts an earlier eager call cached and replay those stale weights. The
    step's and the upscaler's forward run under the caller's autocast with the cache off (and leave
    the caller's setting as it was)."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                         torch.is_autocast_cache_enabled()))
            return self.conv(x)

    model = Probe()
    step = fastdrn.make_train_step(model, torch.optim.Adam(model.parameters()), F.l1_loss, cuda_graph=False)
    up = fastdrn.make_upscaler(model, cuda_graph=False)
    x = torch.rand(1, 3, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(x, x)
        up(x)
        assert torch.is_autocast_cache_enabled()
    assert seen == [(True, torch.bfloat16, False)] * 2
