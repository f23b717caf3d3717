"""Host cost of fastdrn.DRN against the eager reference model, measurable without a GPU.

    python bench/host_launches.py [--scale 4] [--width 16] [--reps 30] [--settle 3] [--autocast]

Triton's own GPU launch path runs (argument binding, specialization, the kernel-cache lookup and
the call into the compiled kernel's launcher) on CPU tensors, with only the bottom replaced: Triton's
active driver is a stand-in that reports device 0, stream 0 and an sm_90 target, and compiling a
kernel returns a stub whose launcher only counts. Nothing compiles, nothing runs on a device; the
time measured is what a GPU would wait on while the host issues the work. fastdrn.DRN and the eager
reference model (fastdrn.reference.DRN) of the same structure (the paper's groups and blocks, at a
tiny width and image, so that arithmetic is negligible next to the host cost) are timed in the same
process, one thread (OMP_NUM_THREADS=1), over --reps rounds that each run fastdrn then the reference
back to back, each timed after --settle (3) untimed calls of its own (paired_rounds). Prints:
  - microseconds per launch: a block's largest kernel through Triton's JITFunction.run and through
    fastdrn's launch, a block's forward through fastdrn.ops, and one aten op for scale;
  - host time of a training step (forward, L1 loss, backward, then the gradients set to None over a
    list of the parameters, as an optimizer's zero_grad does) and of an inference forward, fastdrn
    and the reference (the minimum over the rounds), and their ratio (the median of the rounds'
    ratios, which the machine's drifting speed moves far less than a ratio of two minima);
  - kernel launches per training step: the Triton launches counted (those made by fastdrn's launchers,
    and those replayed from launch plans, kernels/plans.py), plus the aten primitives that launch a
    kernel on a GPU (copies, sums, fills, convolutions...), counted with torch.profiler.
Times are CPU host times on this machine; the counts are exact.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts its thread pool: threads inflate small ops
os.environ.pop("TRITON_INTERPRET", None)  # Triton's GPU launch path, not its interpreter
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # this checkout's fastdrn, not an installed one
    sys.path.insert(1, REPO)

import torch  # noqa: E402
import triton  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SMALL = dict(n_feats=16, n_groups=2, n_blocks=3, inner=16, distill=4)
# aten primitives that launch a kernel on a GPU (composites such as clone or _to_copy end in copy_).
LAUNCHING = {"aten::copy_", "aten::sum", "aten::cat", "aten::add", "aten::add_", "aten::mul", "aten::mul_",
             "aten::fill_", "aten::zero_", "aten::sub", "aten::div", "aten::abs", "aten::sgn", "aten::sign",
             "aten::neg", "aten::mean", "aten::convolution", "aten::convolution_backward", "aten::flip",
             "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::elu", "aten::elu_backward", "aten::where"}


class StubKernel:
    """Stands in for a compiled kernel: its launcher counts launches (and logs them when `log` is a
    list) and runs nothing. Keeps what Triton compiled it for: signature, constexprs, options."""

    launches = 0
    triton_runs = 0
    last = None
    last_args: tuple = ()
    log: list | None = None
    function = None
    packed_metadata = None

    def __init__(self, signature=None, constexprs=None, options=None):
        self.signature, self.constexprs, self.options = signature, constexprs, options

    def run(self, *args):
        StubKernel.launches += 1
        StubKernel.last = self
        if FakeGPUDriver.timing is not None:  # only then: holding the arguments would keep tensors alive
            StubKernel.last_args = args
        if StubKernel.log is not None:
            StubKernel.log.append((self, args))

    def launch_metadata(self, grid, stream, *args):
        return None


class FakeGPUDriver:
    """Triton's active driver as far as the launch path asks: device 0, stream 0, sm_90, and a
    benchmarker for the autotuner that runs each config once and reports timing(the stub it ran, the
    launcher's arguments) milliseconds (all equal by default)."""

    timing = None

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cpu

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None):
            kernel_call()
            ms = 1.0 if FakeGPUDriver.timing is None else FakeGPUDriver.timing(StubKernel.last, StubKernel.last_args)
            return [ms, ms, ms]
        return bench


def _stub_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = StubKernel(signature, constexprs, options)
    self.device_caches[device][0][key] = kernel
    return kernel


def install_fake_gpu() -> None:
    """Route Triton's launch path to the stand-ins, count the launches that go through Triton's own
    JITFunction.run (StubKernel.triton_runs), let fastdrn's ops take their Triton path on CPU
    tensors (they would otherwise run PyTorch math there), and answer device-property queries."""
    import fastdrn.backend

    driver.set_active(FakeGPUDriver())
    JITFunction._do_compile = _stub_compile
    triton_run = JITFunction.run

    def counted_run(self, *args, **kwargs):
        StubKernel.triton_runs += 1
        return triton_run(self, *args, **kwargs)

    JITFunction.run = counted_run
    fastdrn.backend.triton_unavailable_reason = lambda device, dtype=None: None


def best_of(fn, reps: int, inner: int) -> float:
    """Minimum over `reps` rounds of the mean CPU time of `inner` calls, in seconds. CPU time of this
    process (time.process_time), so that other processes on a shared machine count as little as
    they can."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        for _ in range(inner):
            fn()
        best = min(best, (time.process_time() - start) / inner)
    return best


def paired_rounds(fast, ref, reps: int, settle: int = 3) -> tuple:
    """(min CPU seconds of fast, min of ref, median of the per-round ratios fast / ref) over `reps`
    rounds. A round runs fast `settle` times and then once timed, then ref the same way. The
    machine's speed drifts over seconds (shared cores, frequency), so timing all of one model's
    rounds and then all of the other's compares two different machines; a round's ratio is taken at
    one speed, and the median of the ratios does not move with the drift. The untimed calls put each
    model in the state a training loop keeps it in, its own step just run. Timed right after the
    reference's step, fastdrn's ran 9% slower than the same code timed right after a fastdrn step
    (2026-11-29, this 2-core CPU, in one process, medians of 150 rounds, twice); with one untimed
    call of its own first, 3.5% slower; with three, 1-2%, this machine's noise."""
    for _ in range(3):
        fast()
        ref()
    fast_times, ref_times = [], []
    for _ in range(reps):
        for fn, times in ((fast, fast_times), (ref, ref_times)):
            for _ in range(settle):
                fn()
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
    ratios = sorted(f / r for f, r in zip(fast_times, ref_times))
    return min(fast_times), min(ref_times), ratios[len(ratios) // 2]


@contextlib.contextmanager
def launches_observed(observe):
    """Within: every fastdrn kernel module's launch(...) calls observe(kernel, tuned, interpreter,
    args) first (the modules import launch from kernels/_common.py by name)."""
    from fastdrn.kernels import _common

    launch = _common.launch

    def observed_launch(kernel, tuned, grid, interpreter, **args):
        observe(kernel, tuned, interpreter, args)
        return launch(kernel, tuned, grid, interpreter, **args)

    users = [m for name, m in list(sys.modules.items()) if name.startswith("fastdrn.kernels.")
             and m is not _common and getattr(m, "launch", None) is launch]
    for module in users:
        module.launch = observed_launch
    try:
        yield
    finally:
        for module in users:
            module.launch = launch


def launch_costs(reps: int) -> dict:
    """Microseconds per launch of the kernel with the most arguments in a residual distilling block's
    forward (D = 16, F = 16, d = 8, 1x8x8), with the arguments its launcher passed: through Triton's
    JITFunction.run, and through fastdrn's launch (its lean path once warm); the whole block forward
    through fastdrn.ops.residual_distill (its launches, allocations and checks); and one aten add of
    two small tensors, for scale. The launches are recorded from the public op, so that this follows
    the launchers whatever their arguments."""
    from fastdrn import ops
    from fastdrn.kernels import _common, set_launch_plans

    z = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    weights = [torch.randn(16, 16, 1, 1), torch.randn(16), torch.randn(16, 16, 3, 3), torch.randn(16),
               torch.randn(24, 16, 1, 1), torch.randn(24)]
    with torch.no_grad():
        ops.residual_distill(z, *weights)  # imports the kernel modules (and warms the launches)
    recorded = []
    set_launch_plans(False)  # through the launchers, which a warm call's launch plan goes around
    try:
        with torch.no_grad(), launches_observed(lambda *call: recorded.append(call)):
            ops.residual_distill(z, *weights)
    finally:
        set_launch_plans(True)
    kernel, tuned, interpreter, args = max(recorded, key=lambda call: len(call[3]))
    config = _common.fixed_config(interpreter, [interpreter] if tuned is None else tuned.configs) or tuned.configs[0]

    def grid(meta):
        return (1,)

    def triton_run():
        kernel[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

    def fastdrn_launch():
        _common.launch(kernel, tuned, grid, interpreter, **args)

    small = torch.randn(16)
    label = f"{kernel.__name__}, {len(args) + len(config.kwargs)} arguments"
    with torch.no_grad():
        with _common.direct_launches():  # as the eager path runs them
            costs = {f"Triton's JITFunction.run ({label})": best_of(triton_run, reps, 200) * 1e6,
                     f"fastdrn launch (lean path; {label})": best_of(fastdrn_launch, reps, 200) * 1e6}
        costs["a block's forward through fastdrn.ops"] = best_of(lambda: ops.residual_distill(z, *weights), reps, 50) * 1e6
        costs["aten add (for scale)"] = best_of(lambda: torch.add(small, small), reps, 200) * 1e6
    return costs


def model_costs(args) -> dict:
    """Host seconds of a training step (forward, L1 loss, backward, gradients cleared) and of an inference forward,
    fastdrn and the reference with the same weights; and the launches of a warm training step."""
    import fastdrn
    from fastdrn import reference

    torch.manual_seed(0)
    cfg = SMALL if args.small else dict(n_feats=args.width, inner=args.width, distill=max(1, min(8, args.width // 2)))
    ref = reference.DRN(scale=args.scale, **cfg)
    fast = fastdrn.DRN(scale=args.scale, **cfg)
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, args.size, args.size)
    hr = torch.rand(1, 3, args.size * args.scale, args.size * args.scale)

    def step(model):
        params = list(model.parameters())  # what an optimizer's zero_grad walks: not Module.parameters()

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
                out = model(x)
            torch.nn.functional.l1_loss(out.float(), hr).backward()
            for param in params:
                param.grad = None
        return run

    def infer(model):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
                model(x)
        return run

    times = {}
    for phase, make in (("train", step), ("infer", infer)):
        times[phase] = paired_rounds(make(fast), make(ref), args.reps, args.settle)
    StubKernel.launches = StubKernel.triton_runs = 0
    calls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof, launches_observed(lambda *call: calls.append(None)):
        step(fast)()
    times["triton launches"], times["through triton"] = StubKernel.launches, StubKernel.triton_runs
    times["launch calls"] = len(calls)
    times["aten launches"] = sum(1 for e in prof.events() if e.name in LAUNCHING)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--width", type=int, default=8, help="n_feats and inner of both models (tiny: host cost only)")
    p.add_argument("--size", type=int, default=4, help="LR image side")
    p.add_argument("--small", action="store_true", help="the tests' small DRN (2 groups of 3 blocks) instead")
    p.add_argument("--autocast", action="store_true",
                   help="bf16 autocast (the reference then runs bf16 convolutions on the CPU, whose arithmetic "
                        "is not host overhead: its time, and the ratio, flatter fastdrn)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--settle", type=int, default=3,
                   help="untimed calls of each model before its timed one in a round (0: the method before 2026-11-29)")
    args = p.parse_args()
    torch.set_num_threads(1)
    install_fake_gpu()

    for name, us in launch_costs(args.reps).items():
        print(f"launch: {name:62s} {us:6.1f} us")
    t = model_costs(args)
    shape = "2 groups x 3 blocks, the tests' small DRN" if args.small else f"6 groups x 9 blocks, width {args.width}"
    print(f"DRN x{args.scale} ({shape}), 1x3x{args.size}x{args.size}, "
          f"{'bf16 autocast' if args.autocast else 'fp32'}:")
    for phase, what in (("train", "training step"), ("infer", "inference")):
        fast, ref, ratio = t[phase]
        print(f"{what:14s} host: fastdrn {fast * 1e3:6.2f} ms, reference {ref * 1e3:6.2f} ms (mins), "
              f"ratio {ratio:.2f}x (median of paired rounds)")
    print(f"launches per training step {t['triton launches'] + t['aten launches']} "
          f"({t['triton launches']} Triton + {t['aten launches']} aten); through the launchers {t['launch calls']}, "
          f"replayed from launch plans {t['triton launches'] - t['launch calls']}; "
          f"through Triton's own run once warm: {t['through triton']}")
    print(f"(CPU host times: process CPU time, {args.reps} rounds of {args.settle} untimed calls and 1 timed a model, "
          f"one thread; Triton {triton.__version__}, "
          f"torch {torch.__version__}; nothing compiled or launched)")


if __name__ == "__main__":
    main()
