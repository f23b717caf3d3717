"""`fastdrn env`: the report a user runs first, and pastes into a bug report. It must say what runs on
each device and dtype as the ops decide it (backend.describe, extension.unavailable_reason), not a
second opinion."""
import json
import re
import types
from pathlib import Path

import torch

from fastdrn import backend, cli, extension
from fastdrn.tools import env

REPO = Path(__file__).resolve().parent.parent


def _run(capsys, *args):
    assert cli.main(["env", *args]) == 0
    return capsys.readouterr().out


def test_text_report_says_what_runs_and_why(capsys, monkeypatch):
    monkeypatch.setenv("FASTDRN_WEIGHT_GRAD_BLOCKS", "2")
    out = _run(capsys)
    assert f"torch: {torch.__version__}" in out
    for dtype in ("float32", "bfloat16", "float16"):  # the ops' own answer, reason included
        assert f"  cpu {dtype}: {backend.describe('cpu', getattr(torch, dtype))}" in out
    assert f"  cpu: {extension.unavailable_reason(torch.device('cpu')) or 'runs'}" in out
    assert "FASTDRN_WEIGHT_GRAD_BLOCKS=2" in out


def test_json_report_without_loading_the_extension(capsys, monkeypatch):
    """--no-extension: loading builds the extension on first use, which takes minutes."""
    monkeypatch.setattr(extension, "load_error", lambda: (_ for _ in ()).throw(AssertionError("loaded")))
    info = json.loads(_run(capsys, "--json", "--no-extension"))
    assert info["pixel_shuffle"] is None
    assert info["fused_ops"]["cpu"]["bfloat16"] == backend.describe("cpu", torch.bfloat16)
    assert set(info["launch_options"]) >= {"num_warps", "autotune", "fold_backward"}


def test_each_gpu_is_listed_with_its_backend(capsys, monkeypatch):
    """A stand-in GPU (this machine has none): named with its capability, and a line per dtype."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(
        name="Stand-in GPU", major=9, minor=0, total_memory=80 * 2**30, multi_processor_count=132))
    out = _run(capsys, "--no-extension")
    assert "  cuda:0: Stand-in GPU, compute capability 9.0, 80.0 GiB, 132 SMs" in out
    assert f"  cuda:0 float16: {backend.describe('cuda:0', torch.float16)}" in out


def test_every_setting_fastdrn_reads_is_reported():
    """The list the report (and every benchmark row) records: a setting added to the code and not to
    it would go unreported."""
    read = set()
    for path in [*REPO.joinpath("fastdrn").rglob("*.py"), *REPO.joinpath("kernels").glob("*.py")]:
        read |= set(re.findall(r"[\"'](FASTDRN_[A-Z_]+)[\"']", path.read_text()))
    assert read and read <= set(env.SETTINGS_VARIABLES), sorted(read - set(env.SETTINGS_VARIABLES))


def test_a_setting_it_cannot_read_is_named(capsys, monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "cudnn")
    assert cli.main(["env", "--no-extension"]) == 2
    assert "FASTDRN_BACKEND='cudnn'" in capsys.readouterr().err
