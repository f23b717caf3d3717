"""Upscale one image with fastdrn.DRN and check it against the reference model.

    python -m fastdrn.demo [IMAGE] [--scale 2] [--out upscaled.png] [--weights CKPT]

Without IMAGE a built-in test pattern is used. Without --weights the network's weights are RANDOM
(the paper-size DRN): the output shows that the kernels run (which backend, how long) and agree with
the plain PyTorch reference on the same weights, not what a trained model looks like. --weights
takes anything fastdrn.load reads (a checkpoint from `fastdrn train`, a state_dict, BasicSR's .pth,
safetensors, a shipped name such as drn-x2), and the model is built with the architecture the
checkpoint holds.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import fastdrn
from fastdrn import reference
from fastdrn.tools.checkpoint import infer_config


def test_pattern(height: int = 96, width: int = 128) -> np.ndarray:
    """Rings, stripes and a colour ramp: edges at every orientation and frequency."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot(x - width / 2, y - height / 2)
    rings = 0.5 + 0.5 * np.cos(r * r / 60.0)
    stripes = (np.floor(x / 6) % 2).astype(np.float32)
    ramp = x / (width - 1)
    return np.stack([rings, 0.6 * rings + 0.4 * stripes, ramp], axis=-1)


def load_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise SystemExit(f"demo: cannot read image {path!r}: {exc}") from exc


def save_image(array: np.ndarray, path: str) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written image."""
    img = Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png")
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", help="image file to upscale (default: a built-in test pattern)")
    parser.add_argument("--scale", type=int, default=None,
                        help="upscaling factor (default: the checkpoint's, or 2 with random weights)")
    parser.add_argument("--out", default="upscaled.png")
    parser.add_argument("--weights", help="a checkpoint or shipped weight name, as fastdrn.load takes "
                                          "(default: random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    pixels = load_image(args.image) if args.image else test_pattern()
    if args.weights:
        try:
            model = fastdrn.load(args.weights, device=args.device)
        except ValueError as exc:   # CheckpointError: a missing, corrupt or foreign file
            raise SystemExit(f"demo: {exc}") from exc
        if args.scale is not None and args.scale != model.scale:
            raise SystemExit(f"demo: --scale {args.scale}, but {args.weights} holds a x{model.scale} model")
        source = f"weights from {args.weights}"
    else:
        torch.manual_seed(0)
        model = fastdrn.drn(args.scale or 2).to(args.device).eval()
        source = ("RANDOM weights (no --weights given; --weights drn-x2 takes the shipped ones): the output "
                  "shows the kernels at work, not what a trained DRN gives")
    config = {**infer_config(model.state_dict()), "alpha": model.alpha, "rgb_range": model.rgb_range}
    ref = reference.DRN(**config).to(args.device).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    # The model's white is rgb_range; the image's is 1.
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).to(args.device) * model.rgb_range

    print(f"fastdrn {fastdrn.__version__}: DRN x{model.scale}, input {tuple(x.shape)} on {args.device}")
    print(f"model: {source}")
    print(f"backend: {model.backend}")
    with torch.inference_mode():
        model(x)  # warm-up: kernel compilation and autotuning stay out of the timing
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        expected = ref(x)
    err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    print(f"upscaled to {tuple(out.shape)} in {elapsed * 1e3:.1f} ms; relative difference from the reference: {err:.2e}")
    save_image((out[0] / model.rgb_range).permute(1, 2, 0).float().cpu().numpy(), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
