"""fastdrn.DRN's signature, fastdrn.load (files, BasicSR keys, safetensors, shipped names), export,
--version, the demo's --weights, and the clear error for a clone imported as a namespace package."""
import inspect
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastdrn
import fastdrn.pretrained
from fastdrn import cli, demo, reference
from fastdrn.tools.checkpoint import FORMAT, CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not the DRN defaults anywhere, so that every value must really be read from the file.
ARCH = dict(scale=3, n_feats=12, n_groups=2, n_blocks=2, inner=16, distill=4)


@pytest.fixture(autouse=True)
def _torch_backend(_seed_and_backend, monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")   # plain math: these tests are about files


def _ref(**kw):
    return reference.DRN(**{**ARCH, **kw}).eval()


def _perturbed(sd):
    return {k: v + 0.01 * torch.randn_like(v) if k != "rgb_mean" else v for k, v in sd.items()}


def _same_function(model, ref):
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ DRN signature

def test_drn_signature_is_the_references_plus_keyword_only_recompute():
    ours = inspect.signature(fastdrn.DRN).parameters
    theirs = inspect.signature(reference.DRN).parameters
    assert list(ours)[:-1] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
    assert ours["recompute"].kind is inspect.Parameter.KEYWORD_ONLY
    assert fastdrn.DRN(3, 3, 8, 1, 1, 8, 4).scale == 3                         # positional, as the reference
    with pytest.raises(TypeError):
        fastdrn.DRN(2, n_feat=8)                                               # a typo is not swallowed
    for arg in ("scale", "n_feats", "inner", "distill", "rgb_range", "recompute"):
        assert arg in fastdrn.DRN.__doc__


# ------------------------------------------------------------------------------------ fastdrn.load

def test_load_reads_the_architecture_from_the_shapes_and_metadata(tmp_path):
    ref = _ref(alpha=0.3, rgb_range=255.0, rgb_mean=(0.5, 0.4, 0.3))
    ref.load_state_dict(_perturbed(ref.state_dict()))
    torch.save({"format": FORMAT, "config": {**ARCH, "alpha": 0.3, "rgb_range": 255.0}, "model": ref.state_dict()},
               tmp_path / "train.pt")
    model = fastdrn.load(tmp_path / "train.pt", device="cpu")
    assert type(model) is fastdrn.DRN and not model.training
    assert (model.scale, model.alpha, model.rgb_range) == (3, 0.3, 255.0)
    assert torch.equal(model.rgb_mean, ref.rgb_mean)
    _same_function(model, ref)
    # a plain state_dict carries no alpha: the default, which gives another function
    torch.save(ref.state_dict(), tmp_path / "plain.pt")
    plain = fastdrn.load(str(tmp_path / "plain.pt"))
    assert plain.alpha == 0.2 and plain.rgb_range == 1.0 and plain.scale == 3


def test_load_basicsr_picks_params_ema_says_so_and_key_chooses(tmp_path, capsys):
    raw, ema = _ref(), _ref()
    ema.load_state_dict(_perturbed(raw.state_dict()))
    torch.save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, tmp_path / "net_g_1000.pth")
    _same_function(fastdrn.load(tmp_path / "net_g_1000.pth"), ema)
    err = capsys.readouterr().err
    assert "using the weights under 'params_ema'" in err and "'params'" in err
    _same_function(fastdrn.load(tmp_path / "net_g_1000.pth", key="params"), raw)
    assert "under 'params'" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"no weights under 'nope'.*'params', 'params_ema'"):
        fastdrn.load(tmp_path / "net_g_1000.pth", key="nope")
    # BasicSR without EMA, and DDP/compile prefixes: nothing to choose, nothing said
    torch.save({"params": {"module._orig_mod." + k: v for k, v in raw.state_dict().items()}}, tmp_path / "b.pth")
    _same_function(fastdrn.load(tmp_path / "b.pth"), raw)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("device,message", [
    ("cude", "is not a device"),                            # a typo: torch's own "Expected one of cpu, cuda, ..."
    ("cuda:99", "cannot be used on this machine"),         # no such GPU (or no CUDA at all)
    ("meta", "cannot be used: meta tensors hold no data"),  # Module.to("meta") would drop the weights
])
def test_load_names_a_device_that_cannot_be_used(tmp_path, device, message):
    """fastdrn.load(device=...) handed the value to torch (Module.to's RuntimeError or AssertionError,
    after the file was read); now a ValueError names the argument as --device does, before reading."""
    torch.save(_ref().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=re.escape(f"device={device!r} {message}")):
        fastdrn.load(tmp_path / "w.pt", device=device)
    with pytest.raises(ValueError, match="device="):       # checked before the file: not a missing-file error
        fastdrn.load(tmp_path / "absent.pt", device=device)
    assert fastdrn.load(tmp_path / "w.pt", device=torch.device("cpu")).head.weight.device.type == "cpu"


def test_load_refuses_code_corruption_and_foreign_files(tmp_path):
    torch.save({"params": _ref().state_dict(), "extra": np.arange(3)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        fastdrn.load(tmp_path / "pickled.pth")
    torch.save(_ref().state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        fastdrn.load(tmp_path / "cut.pt")
    torch.save({"fc.weight": torch.randn(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DRN state_dict"):
        fastdrn.load(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        fastdrn.load(tmp_path / "absent.pt")


@pytest.mark.parametrize("kind", ["zip", "safetensors", "refused"])  # the three ways a load ends
def test_a_checkpoint_file_is_opened_once(kind, tmp_path, monkeypatch):
    """Every check (the kind of file, safetensors or zip, the CRCs, why torch.load refused it) reads
    the one open file that is loaded: a path opened again could by then name another file."""
    from fastdrn.tools import checkpoint

    path = tmp_path / "w.pt"
    if kind == "safetensors":
        st = pytest.importorskip("safetensors.torch")
        st.save_file({"w": torch.randn(2, 3)}, str(path), metadata={"fastdrn.config": '{"scale": 2}'})
    else:
        torch.save({"w": torch.randn(2, 3)} if kind == "zip" else {"x": np.arange(3)}, path)
    opened = []
    real_os_open, real_open = os.open, open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_os_open(p, *a, **k))
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    if kind == "refused":
        with pytest.raises(CheckpointError, match="weights_only=True"):
            checkpoint.load_checkpoint(path)
    else:
        obj = checkpoint.load_checkpoint(path)
        tensors = obj["state_dict"] if kind == "safetensors" else obj
        assert tensors["w"].shape == (2, 3)
        if kind == "safetensors":
            assert obj["config"] == {"scale": 2}
    assert opened.count(str(path)) == 1, opened



class _RunsCode:
    """Unpickling this calls os.system: a checkpoint holding it must be refused without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_says_what_a_file_that_is_not_a_checkpoint_is(tmp_path, capsys):
    """torch's own message for these leads with advice to load with weights_only=False (which would
    run the file's code) and hides the reason; the errors say what the file is instead."""
    import pickle
    marker = tmp_path / "code_ran"
    torch.save({"params": _ref().state_dict(), "hook": _RunsCode(marker)}, tmp_path / "code.pth")
    with open(tmp_path / "code_raw.pkl", "wb") as f:
        pickle.dump({"params": _RunsCode(marker)}, f, protocol=4)
    torch.save(_ref().state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "empty.pt").write_bytes(b"")
    PILImage.new("RGB", (4, 4)).save(tmp_path / "photo.pth", format="PNG")
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    cases = {"code.pth": "refused: it holds a Python object (posix.system) that loading would have to run",
             "code_raw.pkl": "refused: a pickle that torch.load(weights_only=True) cannot read",
             "cut.pt": "the checkpoint is truncated or damaged: a zip file without the directory at its end",
             "empty.pt": "the file is empty",
             "photo.pth": "not a checkpoint: a PNG image, neither a PyTorch file",
             "notes.pt": "not a checkpoint: neither a PyTorch file"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError) as e:
            fastdrn.load(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {message}"), str(e.value)
        assert "weights_only` set to `False`" not in str(e.value)
    assert not marker.exists()                                   # nothing ran
    with pytest.raises(CheckpointError, match="a folder, not a checkpoint file"):
        fastdrn.load(tmp_path)
    capsys.readouterr()
    assert cli.main(["upscale", str(tmp_path / "photo.pth"), "-o", str(tmp_path / "o.png"),
                     "--weights", str(tmp_path / "cut.pt")]) == 2
    assert "cut.pt: the checkpoint is truncated or damaged" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists() and not marker.exists()



def test_a_checkpoint_recording_an_infinite_rgb_range_is_refused(tmp_path):
    """It loaded, and every upscaled pixel came out NaN (written to the image file as bytes)."""
    sd = _ref().state_dict()
    for value in (float("inf"), float("nan"), 0.0):
        torch.save({"state_dict": sd, "config": {"rgb_range": value}}, tmp_path / "w.pt")
        with pytest.raises(CheckpointError, match=re.escape(f"DRN: rgb_range must be finite and > 0, got {value}")):
            fastdrn.load(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="rgb_range must be finite"):
        fastdrn.DRN(scale=2, n_feats=8, n_groups=1, n_blocks=1, rgb_range=float("inf"))


@pytest.mark.parametrize("key,tensor,message", [
    # infer_config read shape[1] of these unchecked: IndexError "tuple index out of range"
    ("head.weight", torch.zeros(()), r"head.weight has shape \(\), not that of a 3x3 conv weight"),
    ("head.weight", torch.zeros(12), r"head.weight has shape \(12,\), not that of a 3x3 conv weight"),
    ("groups.0.blocks.0.squeeze.weight", torch.zeros(16), r"squeeze.weight has shape \(16,\)"),
    ("upsample.weight", torch.zeros(108), r"upsample.weight has shape \(108,\)"),
    # and divided by head.weight's rows: ZeroDivisionError
    ("head.weight", torch.zeros(0, 3, 3, 3), r"head.weight has shape \(0, 3, 3, 3\), not that of a 3x3 conv"),
])
def test_a_state_dict_of_misshapen_tensors_is_refused_by_name(tmp_path, key, tensor, message):
    torch.save({**_ref().state_dict(), key: tensor}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=message):
        fastdrn.load(tmp_path / "w.pt")


def test_an_rgb_mean_override_wins_over_the_checkpoints():
    """Overrides win over the checkpoint, but rgb_mean is also a buffer in the state_dict: loading
    it put the checkpoint's mean back, while the config returned said the override's."""
    from fastdrn.tools.checkpoint import load_model
    sd = _ref(rgb_mean=(0.5, 0.4, 0.3)).state_dict()
    model, cfg = load_model(sd, overrides={"rgb_mean": (0.1, 0.2, 0.3)})
    assert cfg["rgb_mean"] == (0.1, 0.2, 0.3)
    torch.testing.assert_close(model.rgb_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    want = _ref(rgb_mean=(0.1, 0.2, 0.3))    # the checkpoint's weights, the override's mean
    want.load_state_dict({k: v for k, v in sd.items() if k != "rgb_mean"}, strict=False)
    _same_function(model, want)


def test_a_state_dict_of_meta_tensors_is_refused_by_name(tmp_path):
    """torch.save of a model built on the meta device (deferred initialization) holds shapes and no
    data: check_finite called .item() on it, RuntimeError 'cannot be called on meta tensors'."""
    torch.save({k: v.to("meta") for k, v in _ref().state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w.pt: .*tensors on the meta device hold no values: rgb_mean, head.weight"):
        fastdrn.load(tmp_path / "w.pt")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.qint8])
def test_integer_or_quantized_weights_are_refused_by_name(tmp_path, dtype):
    """Integer codes (a quantized export without its scales) loaded as float weights 100 times too
    big, silently; qint8 tensors failed in load_state_dict's copy with a RuntimeError."""
    sd = _ref().state_dict()
    for k in ("head.weight", "tail.bias"):
        sd[k] = (torch.quantize_per_tensor(sd[k], 0.01, 0, dtype) if dtype == torch.qint8
                 else (sd[k] * 100).round().to(dtype))
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"floating-point tensors can be weights; the checkpoint "
                                                        f"holds head.weight: dtype {dtype}, tail.bias: dtype {dtype}")):
        fastdrn.load(tmp_path / "w.pt")


def test_a_state_dict_with_keys_that_are_not_names_is_refused(tmp_path):
    """Tensors keyed by number (a list of parameters saved as a dict): the prefix removal called
    .startswith on an int, AttributeError."""
    torch.save({**_ref().state_dict(), 3: torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w.pt: .*key 3 \(int\) is not a parameter name"):
        fastdrn.load(tmp_path / "w.pt")


def test_a_key_held_with_and_without_a_wrapper_prefix_is_refused(tmp_path):
    """module.head.weight and head.weight both became head.weight: the later one won, silently."""
    sd = _ref().state_dict()
    torch.save({**sd, "module.head.weight": sd["head.weight"] + 1}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w.pt: .*holds 'head.weight' twice \(as 'head.weight' and "
                                              r"'module.head.weight'\)"):
        fastdrn.load(tmp_path / "w.pt")


def test_weights_with_nan_or_inf_are_refused_by_name(tmp_path, capsys):
    """A diverged run's last.pt (NaN weights) loaded, and upscale wrote images of NaN cast to bytes."""
    sd = _ref().state_dict()
    sd["groups.0.blocks.0.conv.bias"][1] = float("nan")
    sd["tail.weight"][0, 0, 0, 0] = float("-inf")
    torch.save(sd, tmp_path / "diverged.pt")
    with pytest.raises(CheckpointError, match=re.escape("diverged.pt: its weights hold NaN or infinite values "
                                                        "(groups.0.blocks.0.conv.bias, tail.weight)")):
        fastdrn.load(tmp_path / "diverged.pt")
    PILImage.new("RGB", (5, 4)).save(tmp_path / "a.png")
    assert cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"),
                     "--weights", str(tmp_path / "diverged.pt")]) == 2
    assert "NaN or infinite" in capsys.readouterr().err and not (tmp_path / "b.png").exists()
    # nor does training start from them, by --init or --resume
    from fastdrn.tools.train import TrainConfig, Trainer, check_training_checkpoint
    cfg = TrainConfig(hr_dir=str(tmp_path), out=str(tmp_path / "run"), scale=2, n_feats=8, n_groups=2, n_blocks=2,
                      inner=8, distill=4, init=str(tmp_path / "diverged.pt"), device="cpu")
    with pytest.raises(CheckpointError, match="diverged.pt: its weights hold NaN or infinite values"):
        Trainer(cfg, log=lambda m: None)
    ckpt = {"format": FORMAT, "step": 3, "config": {**ARCH, "alpha": 0.2, "rgb_range": 1.0, "rgb_mean": [0.5] * 3},
            "model": sd, "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {}, "rng": {"torch": 0, "numpy": 0, "python": 0}}
    with pytest.raises(CheckpointError, match="last.pt: its weights hold NaN or infinite values"):
        check_training_checkpoint(ckpt, "last.pt")


def test_load_safetensors_with_config_and_without_the_package(tmp_path, monkeypatch):
    st = pytest.importorskip("safetensors.torch")
    ref = _ref(alpha=0.25)
    ref.load_state_dict(_perturbed(ref.state_dict()))
    torch.save({"params": ref.state_dict(), "config": {"alpha": 0.25}}, tmp_path / "w.pth")
    cli.main(["export", "--weights", str(tmp_path / "w.pth"), "-o", str(tmp_path / "w.safetensors")])
    model = fastdrn.load(tmp_path / "w.safetensors")
    assert model.alpha == 0.25
    _same_function(model, ref)
    # someone else's safetensors file: bare tensors, found by content whatever its name
    st.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "bare.bin"))
    bare = fastdrn.load(tmp_path / "bare.bin")
    assert bare.alpha == 0.2                                       # no metadata: the default
    same_weights = _ref()
    same_weights.load_state_dict(ref.state_dict())
    _same_function(bare, same_weights)
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])   # header intact, data cut short
    with pytest.raises(CheckpointError, match="cut.safetensors: cannot be read as safetensors"):
        fastdrn.load(tmp_path / "cut.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)          # the optional package absent
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match="pip install safetensors"):
        fastdrn.load(tmp_path / "w.safetensors")


# ------------------------------------------------------------------------------------ shipped names

def test_shipped_names_resolve_to_files_in_the_weights_folder(tmp_path, monkeypatch, capsys):
    with pytest.raises(CheckpointError, match=r"'drn-plus-x4' names weights fastdrn will ship.*ships none yet"):
        fastdrn.load("drn-plus-x4")
    with pytest.raises(CheckpointError, match="not a weight name fastdrn knows"):
        fastdrn.load("drn-x7")
    monkeypatch.setattr(fastdrn.pretrained, "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'drn-x2' names weights fastdrn will ship.*ships none yet"):
        fastdrn.load("drn-x2")
    x3 = reference.drn(3, n_groups=1, n_blocks=1)       # the name promises its scale: another is refused
    torch.save({"params": x3.state_dict()}, tmp_path / "drn-x2.pt")
    with pytest.raises(CheckpointError, match="scale: checkpoint has 3, expected 2"):
        fastdrn.load("drn-x2")
    # adding the file is all it takes, whatever its architecture (read from the shapes)
    ref = reference.DRN(scale=2, n_feats=16, n_groups=2, n_blocks=3, inner=24, distill=4).eval()
    torch.save({"params": ref.state_dict()}, tmp_path / "drn-x2.pt")
    _same_function(fastdrn.load("drn-x2"), ref)
    paper = reference.drn(2).eval()
    torch.save({"params": paper.state_dict()}, tmp_path / "drn-x2.pt")
    _same_function(fastdrn.load("drn-x2"), paper)
    # the command line takes the same names
    img = tmp_path / "a.png"
    PILImage.fromarray((np.random.rand(10, 12, 3) * 255).astype(np.uint8)).save(img)
    assert cli.main(["upscale", str(img), "-o", str(tmp_path / "b.png"), "--weights", "drn-x2",
                     "--device", "cpu"]) == 0
    assert PILImage.open(tmp_path / "b.png").size == (24, 20)


def test_the_command_line_checks_the_scale_a_shipped_name_promises(tmp_path, monkeypatch, capsys):
    """upscale and eval pass expect={"scale": None} without --scale, and that None replaced the
    name's promise: a drn-x2 file holding an x3 model upscaled by 3 without a word."""
    monkeypatch.setattr(fastdrn.pretrained, "WEIGHTS_DIR", str(tmp_path))
    torch.save({"params": reference.drn(3, n_groups=1, n_blocks=1).state_dict()}, tmp_path / "drn-x2.pt")
    img = tmp_path / "a.png"
    PILImage.fromarray((np.random.rand(5, 7, 3) * 255).astype(np.uint8)).save(img)
    assert cli.main(["upscale", str(img), "-o", str(tmp_path / "b.png"), "--weights", "drn-x2",
                     "--device", "cpu"]) == 2
    assert "scale: checkpoint has 3, expected 2" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_setup_installs_every_weight_file_kind():
    setup = open(os.path.join(ROOT, "setup.py")).read()
    for suffix in fastdrn.pretrained.WEIGHT_SUFFIXES:
        assert f'"weights/*{suffix}"' in setup
    assert '"fastdrn.integrations"' in setup


# ------------------------------------------------------------------------------------------ export

def _training_checkpoint(path, ema=True):
    raw, avg = _ref(alpha=0.3), _ref(alpha=0.3)
    avg.load_state_dict(_perturbed(raw.state_dict()))
    ck = {"format": FORMAT, "config": {**ARCH, "alpha": 0.3}, "model": raw.state_dict(), "step": 5}
    if ema:
        ck["params_ema"] = avg.state_dict()
    torch.save(ck, path)
    return raw, avg


def _basicsr_load_network(net, path, param_key):
    """What BasicSR's BaseModel.load_network does with a file."""
    load_net = torch.load(path, map_location="cpu", weights_only=True)
    if param_key is not None:
        if param_key not in load_net and "params" in load_net:
            param_key = "params"
        load_net = load_net[param_key]
    load_net = {k[7:] if k.startswith("module.") else k: v for k, v in load_net.items()}
    net.load_state_dict(load_net, strict=True)


def test_export_to_basicsr_plain_and_safetensors(tmp_path, capsys):
    raw, avg = _training_checkpoint(tmp_path / "last.pt")
    assert cli.main(["export", "--weights", str(tmp_path / "last.pt"), "-o", str(tmp_path / "net_g.pth")]) == 0
    assert "basicsr: params + params_ema" in capsys.readouterr().out
    for key, expected in (("params", raw), ("params_ema", avg)):
        net = reference.DRN(**ARCH, alpha=0.3).eval()
        _basicsr_load_network(net, tmp_path / "net_g.pth", key)
        _same_function(net, expected)
    assert fastdrn.load(tmp_path / "net_g.pth").alpha == 0.3            # the config travels along
    # plain: the EMA weights, loadable by plain PyTorch; what it cannot hold is said
    assert cli.main(["export", "--weights", str(tmp_path / "last.pt"), "-o", str(tmp_path / "p.pt"),
                     "--format", "plain"]) == 0
    assert "warning: a plain state_dict cannot hold {'alpha': 0.3}" in capsys.readouterr().err
    net = reference.DRN(**ARCH, alpha=0.3).eval()
    net.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True), strict=True)
    _same_function(net, avg)
    # --key exports one entry; without EMA, only params
    assert cli.main(["export", "--weights", str(tmp_path / "last.pt"), "-o", str(tmp_path / "k.pth"),
                     "--key", "model"]) == 0
    assert set(torch.load(tmp_path / "k.pth", weights_only=True)) == {"params", "config"}
    _training_checkpoint(tmp_path / "noema.pt", ema=False)
    cli.main(["export", "--weights", str(tmp_path / "noema.pt"), "-o", str(tmp_path / "n.pth")])
    assert set(torch.load(tmp_path / "n.pth", weights_only=True)) == {"params", "config"}
    assert cli.main(["export", "--weights", str(tmp_path / "absent.pt"), "-o", str(tmp_path / "x.pth")]) == 2



def test_export_errors_name_the_checkpoint_once(tmp_path, capsys):
    """export loads the file itself and then builds the model from the loaded object, whose messages
    called it "checkpoint", and prefixed its name: "q.pt: checkpoint: its weights hold NaN"."""
    sd = _ref().state_dict()
    diverged = {**sd, "tail.weight": sd["tail.weight"] * float("nan")}
    cases = {"diverged.pt": (diverged, [], "its weights hold NaN or infinite values (tail.weight)"),
             "other.pt": ({"fc.weight": torch.rand(3, 3)}, [], "not a DRN state_dict: missing head.weight"),
             "entries.pt": ({"params": sd, "params_ema": sd}, ["--key", "nope"], "no weights under 'nope'")}
    for name, (obj, extra, what) in cases.items():
        path = str(tmp_path / name)
        torch.save(obj, path)
        capsys.readouterr()
        assert cli.main(["export", "--weights", path, "-o", str(tmp_path / "q.pt"), *extra]) == 2
        err = capsys.readouterr().err
        assert what in err and err.count(name) == 1, err
        assert f"{name}: checkpoint:" not in err and not (tmp_path / "q.pt").exists(), err


def test_export_never_writes_over_the_checkpoint_it_reads(tmp_path, capsys):
    """`export --weights last.pt -o last.pt --format plain` replaced a training checkpoint (optimizer,
    EMA, step) with a bare state_dict; through a symbolic link as well."""
    _training_checkpoint(tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    os.symlink(tmp_path / "last.pt", tmp_path / "link.pt")
    for out in ("last.pt", "link.pt"):
        capsys.readouterr()
        assert cli.main(["export", "--weights", str(tmp_path / "last.pt"), "-o", str(tmp_path / out),
                         "--format", "plain"]) == 2
        assert "the output is the checkpoint being exported" in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == before and os.path.islink(tmp_path / "link.pt")
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "link.pt"]



def test_export_format_must_match_a_torch_or_safetensors_extension(tmp_path, capsys):
    """--format plain -o w.safetensors wrote a pickle under a safetensors name (and the reverse),
    which other tools then fail to read."""
    torch.save(_ref().state_dict(), tmp_path / "w.pth")
    for out, fmt in (("e.safetensors", "plain"), ("e.safetensors", "basicsr"), ("e.pth", "safetensors"),
                     ("e.pt", "safetensors")):
        capsys.readouterr()
        assert cli.main(["export", "--weights", str(tmp_path / "w.pth"), "-o", str(tmp_path / out), "--format", fmt]) == 2
        assert f"--format {fmt} does not match the output file {tmp_path / out}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]


def test_export_in_fp16_halves_the_file_and_loads_as_float32(tmp_path, capsys):
    raw, avg = _training_checkpoint(tmp_path / "last.pt")
    args = ["export", "--weights", str(tmp_path / "last.pt"), "--key", "params_ema"]
    assert cli.main([*args, "-o", str(tmp_path / "w32.pt")]) == 0
    assert cli.main([*args, "-o", str(tmp_path / "w16.pt"), "--dtype", "fp16"]) == 0
    assert "in fp16" in capsys.readouterr().out
    stored = torch.load(tmp_path / "w16.pt", weights_only=True)["params"]
    assert stored["rgb_mean"].dtype == torch.float32                  # buffers keep their precision
    assert {v.dtype for k, v in stored.items() if k != "rgb_mean"} == {torch.float16}
    assert os.path.getsize(tmp_path / "w16.pt") < 0.6 * os.path.getsize(tmp_path / "w32.pt")
    model = fastdrn.load(tmp_path / "w16.pt")
    assert model.head.weight.dtype == torch.float32 and model.alpha == 0.3
    for k, v in avg.state_dict().items():                             # each weight rounded to fp16, no more
        torch.testing.assert_close(model.state_dict()[k], v.half().float() if k != "rgb_mean" else v,
                                   rtol=0, atol=0)
    # a weight fp16 cannot hold is refused, not written as inf
    big = _ref()
    with torch.no_grad():
        big.tail.weight[0, 0, 0, 0] = 1e5
    torch.save(big.state_dict(), tmp_path / "big.pt")
    assert cli.main(["export", "--weights", str(tmp_path / "big.pt"), "-o", str(tmp_path / "b.pt"),
                     "--dtype", "fp16"]) == 2
    assert "tail.weight holds values (up to 1e+05)" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists()


# ------------------------------------------------------------------------------------ CLI, demo

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fastdrn {fastdrn.__version__}"
    r = subprocess.run([sys.executable, "-m", "fastdrn", "--version"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"fastdrn {fastdrn.__version__}"


def test_demo_builds_what_the_checkpoint_holds(tmp_path, capsys):
    raw, avg = _training_checkpoint(tmp_path / "last.pt")
    img = tmp_path / "in.png"
    PILImage.fromarray((np.random.rand(11, 13, 3) * 255).astype(np.uint8)).save(img)
    assert demo.main([str(img), "--weights", str(tmp_path / "last.pt"), "--out", str(tmp_path / "o.png"),
                      "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "DRN x3" in out and "weights from" in out
    err = float(re.search(r"reference: ([0-9.e+-]+)", out).group(1))
    assert err < 1e-5
    assert PILImage.open(tmp_path / "o.png").size == (39, 33)
    with pytest.raises(SystemExit, match="holds a x3 model"):
        demo.main([str(img), "--weights", str(tmp_path / "last.pt"), "--scale", "2", "--device", "cpu",
                   "--out", str(tmp_path / "o.png")])
    with pytest.raises(SystemExit, match="ships none yet"):
        demo.main([str(img), "--weights", "drn-plus-x2", "--device", "cpu", "--out", str(tmp_path / "o.png")])


def test_demo_says_its_weights_are_random(tmp_path, capsys):
    img = tmp_path / "in.png"
    PILImage.fromarray((np.random.rand(6, 7, 3) * 255).astype(np.uint8)).save(img)
    assert demo.main([str(img), "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out


def test_readme_explains_a_clone_imported_from_its_parent_folder(tmp_path):
    """Python imports a folder named fastdrn without __init__.py (the clone's root) as an empty namespace
    package, and no code of ours runs to say so (a root __init__.py would make pytest import the clone
    as the package): the README names the error it gives and the way out."""
    (tmp_path / "fastdrn" / "fastdrn").mkdir(parents=True)         # a clone's root and its package folder
    r = subprocess.run([sys.executable, "-c", "import fastdrn; fastdrn.load"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode != 0
    error = r.stderr.strip().splitlines()[-1]
    assert error == "AttributeError: module 'fastdrn' has no attribute 'load'"
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "module 'fastdrn' has no attribute" in readme and "namespace package" in readme
