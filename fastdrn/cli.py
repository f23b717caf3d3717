"""The ``fastdrn`` command: ``train``, ``eval``, ``upscale``, ``export`` and ``env`` (the functions
live in fastdrn.tools; docs/cli.md walks through them).

    fastdrn train --hr-dir DIR [--lr-dir DIR] --scale S --out DIR [--epochs N | --steps N] [--ema D] ...
    fastdrn eval --weights CKPT --hr-dir DIR [--lr-dir DIR] [--crop-border N] [--no-y] [--json FILE]
    fastdrn upscale INPUT [INPUT ...] -o OUTPUT --weights CKPT [--tile N] [--tile-overlap N]
                    [--dtype fp32|bf16|fp16] [--self-ensemble] [--device D] [--no-cuda-graph]
    fastdrn export --weights CKPT -o OUT [--format basicsr|plain|safetensors]
    fastdrn env [--json] [--no-extension]
    fastdrn --version

``--weights`` takes a checkpoint path or a shipped weight name (``drn-x4``; see fastdrn.pretrained).
Multi-GPU training: ``torchrun --nproc_per_node N -m fastdrn.cli train ...``.
On a CUDA device each command replays a captured CUDA graph per input shape (``--no-cuda-graph``: eager).
Exit codes: 0 success, 1 some input failed, 2 usage or checkpoint error, 130 interrupted (Ctrl-C
twice), and for ``train`` stopped by a signal 128 + its number (143 for SIGTERM, 130 for SIGINT),
after saving ``last.pt``.
"""
from __future__ import annotations

import argparse
import math
import sys


def _positive(v: str) -> int:
    i = int(v)
    if i < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return i


def _quality(v: str) -> int:
    i = int(v)
    if not 0 <= i <= 100:
        raise argparse.ArgumentTypeError(f"expected a quality from 0 to 100, got {v}")
    return i


def _finite_positive(v: str) -> float:
    x = float(v)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {v}")
    return x


def _model_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (read from the checkpoint's shapes; these override or check)")
    g.add_argument("--scale", type=int, help="expected upscaling factor (an error if the checkpoint differs)")
    g.add_argument("--alpha", type=_finite_positive, help="ELU alpha (default: checkpoint's, else 0.2)")
    g.add_argument("--rgb-range", type=_finite_positive, help="value of white (default: checkpoint's, else 1.0)")


def _weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="a checkpoint (fastdrn train's last.pt/best.pt, a state_dict, BasicSR's .pth, "
                        ".safetensors) or a shipped weight name (drn-x2, drn-x3, drn-x4)")
    p.add_argument("--key", default=None,
                   help="the checkpoint entry to read, e.g. params or params_ema (default: params_ema "
                        "when present, else params/model)")


def _inference_args(p: argparse.ArgumentParser) -> None:
    _weights_args(p)
    p.add_argument("--tile", type=_positive, default=0, help="LR tile size for big images (0: whole image)")
    p.add_argument("--tile-overlap", type=_positive, default=None,
                   help="LR pixels of context around each tile (default: the receptive-field radius: seamless)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--self-ensemble", action="store_true", help="average over the 8 flips/rotations (x8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first bad image")
    p.add_argument("--max-pixels", type=_positive, default=None,
                   help="refuse images of more pixels than this before decoding them, a guard against "
                        "decompression bombs (default: Pillow's limit, 89478485; 0: no limit)")
    _cuda_graph_arg(p)


def _cuda_graph_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run every step eagerly instead of replaying a captured CUDA graph per input shape "
                        "(graphs are used on CUDA devices only)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="fastdrn", description="DRN super-resolution: train a model on photographs, evaluate it "
        "(PSNR/SSIM), upscale images with it, export its weights; say what runs here (env).",
        epilog="'fastdrn COMMAND --help' lists each command's options; docs/cli.md has a walkthrough.")
    parser.add_argument("--version", action="version", version=f"fastdrn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale image files or folders")
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    up.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    _inference_args(up)
    up.add_argument("--format", choices=("png", "jpeg", "webp"), default=None,
                    help="output format (default: the input's, PNG for others)")
    up.add_argument("--quality", type=_quality, default=None, help="JPEG/WebP quality, 0 to 100 (default 95)")
    up.add_argument("--suffix", default="", help="added to output file names, e.g. _x4")
    up.add_argument("--skip-existing", action="store_true",
                    help="leave an image whose output file exists as it is (to resume a run: outputs are only "
                         "ever complete files); by default an existing output is replaced")
    _model_overrides(up)

    ev = sub.add_parser("eval", help="PSNR/SSIM (Y channel, border cropped) against bicubic")
    ev.add_argument("--hr-dir", required=True)
    ev.add_argument("--lr-dir", default=None,
                    help="LR images (DIV2K/benchmark naming, an X<scale> subfolder is used if present); "
                         "default: MATLAB bicubic downsampling of the HR images")
    ev.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    ev.add_argument("--save-dir", default=None, help="also save the SR images here")
    ev.add_argument("--crop-border", type=_positive, default=None,
                    help="pixels cropped on every side before measuring (default: the scale)")
    ev.add_argument("--no-y", dest="y_channel", action="store_false",
                    help="measure on RGB instead of the Y channel of YCbCr")
    _inference_args(ev)
    _model_overrides(ev)

    ex = sub.add_parser("export", help="write a checkpoint's weights for BasicSR, plain PyTorch or safetensors")
    _weights_args(ex)
    ex.add_argument("-o", "--output", required=True, help="file to write")
    ex.add_argument("--format", choices=("basicsr", "plain", "safetensors"), default=None,
                    help="basicsr: {'params', 'params_ema' with EMA} for BasicSR's load_network; plain: a bare "
                         "state_dict (EMA weights when present); safetensors: those tensors with the config "
                         "(default: safetensors for a .safetensors output, else basicsr)")
    ex.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                    help="the type the weights are stored in (fp16: half the size; they load as float32)")

    en = sub.add_parser("env", help="versions, GPUs, and which kernels run on each device and dtype (and why)")
    en.add_argument("--json", action="store_true", help="print it as JSON")
    en.add_argument("--no-extension", dest="load_extension", action="store_false",
                    help="do not load the pixel-shuffle extension (which builds it on first use)")

    tr = sub.add_parser("train", help="train a DRN with the paper's recipe",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--hr-dir", required=True, help="HR training images (e.g. DIV2K_train_HR)")
    tr.add_argument("--lr-dir", default=None, help="LR images (e.g. DIV2K_train_LR_bicubic, its X<s> "
                                                   "subfolder is used); default: MATLAB bicubic from HR")
    tr.add_argument("--scale", type=int, required=True)
    tr.add_argument("--out", required=True, help="folder for checkpoints (last.pt, best.pt)")
    n = tr.add_mutually_exclusive_group()
    n.add_argument("--epochs", type=int, default=None,
                   help="training length in epochs (default 800; a resumed run keeps its own length)")
    n.add_argument("--steps", type=int, default=None, help="total optimizer steps (instead of --epochs)")
    tr.add_argument("--iters-per-epoch", type=_positive, default=1000,
                    help="iterations per epoch (EDSR convention); 0: one pass over the images")
    tr.add_argument("--patch-size", type=int, default=48, help="LR patch side")
    tr.add_argument("--batch-size", type=int, default=16, help="global batch (split across processes)")
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--lr-step", type=int, default=200, help="epochs between learning-rate decays")
    tr.add_argument("--lr-gamma", type=float, default=0.5)
    tr.add_argument("--beta1", type=float, default=0.9)
    tr.add_argument("--beta2", type=float, default=0.999)
    tr.add_argument("--eps", type=float, default=1e-8)
    tr.add_argument("--no-augment", dest="augment", action="store_false", help="no flips/rotations")
    g = tr.add_argument_group("model (DRN defaults; DRN+ is --inner 256)")
    g.add_argument("--n-feats", type=int, default=64)
    g.add_argument("--n-groups", type=int, default=6)
    g.add_argument("--n-blocks", type=int, default=9)
    g.add_argument("--inner", type=int, default=64)
    g.add_argument("--distill", type=int, default=8)
    g.add_argument("--alpha", type=_finite_positive, default=0.2)
    g.add_argument("--rgb-range", type=_finite_positive, default=1.0)
    tr.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                    help="keep an exponential moving average of the weights with this decay (e.g. 0.999; "
                         "0: off); saved as params_ema and used for validation and export")
    tr.add_argument("--workers", type=_positive, default=None,
                    help="DataLoader worker processes (default: 4 but at most the CPU cores when training on a GPU; "
                         "0 on the CPU, whose cores the model needs)")
    tr.add_argument("--cache", choices=("auto", "memory", "disk", "none"), default="auto",
                    help="decoded images: in memory, as .npy files, or decoded every time "
                         "(auto: memory below 4 GiB)")
    tr.add_argument("--cache-dir", default=None, help="for --cache disk (default OUT/cache)")
    tr.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (OUT/last.pt)")
    tr.add_argument("--init", default=None, metavar="WEIGHTS",
                    help="start from these weights (a checkpoint or a shipped name) of the same architecture, "
                         "the scale aside: all but the upsampling convolution are copied, e.g. x2 from an x4 "
                         "model's body (ignored when resuming)")
    tr.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: an epoch)")
    tr.add_argument("--val-hr-dir", default=None, help="validation HR images")
    tr.add_argument("--val-lr-dir", default=None)
    tr.add_argument("--val-every", type=int, default=None, help="steps between validations (default: an epoch)")
    tr.add_argument("--val-max", type=int, default=None, help="use at most this many validation images")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None)
    tr.add_argument("--log-every", type=int, default=None,
                    help="steps between progress lines when not on a terminal (default: by time, see --log-interval)")
    tr.add_argument("--log-interval", type=float, default=30.0,
                    help="seconds between progress lines when not on a terminal")
    tr.add_argument("--no-progress", dest="progress", action="store_false")
    tr.add_argument("--fail-fast", action="store_true", help="stop at the first bad image")
    _cuda_graph_arg(tr)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .tools.checkpoint import CheckpointError

    def log(msg: str) -> None:
        stream = sys.stderr if msg.startswith(("error:", "warning:")) else sys.stdout
        print(msg, file=stream, flush=True)

    max_pixels = None
    if args.command in ("upscale", "eval"):
        from .tools.image_io import DEFAULT_MAX_PIXELS
        max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
        if args.tile_overlap is not None and not args.tile:
            log("warning: --tile-overlap has no effect without --tile (the whole image is run at once)")
    try:
        if args.command == "env":  # inside: a setting it cannot read is a ValueError that names it
            from .tools.env import main as env_main
            return env_main(as_json=args.json, load_extension=args.load_extension)
        if args.command == "upscale":
            from .tools.upscale import upscale
            failed = upscale(args.inputs, args.output, args.weights, key=args.key, tile=args.tile or None,
                             tile_overlap=args.tile_overlap, dtype=args.dtype, self_ensemble=args.self_ensemble,
                             device=args.device, fail_fast=args.fail_fast, fmt=args.format,
                             quality=args.quality, suffix=args.suffix, scale=args.scale,
                             overrides={"alpha": args.alpha, "rgb_range": args.rgb_range},
                             max_pixels=max_pixels, cuda_graph=None if args.cuda_graph else False,
                             skip_existing=args.skip_existing, log=log)
            return 1 if failed else 0
        if args.command == "eval":
            from .tools.evaluate import evaluate
            res = evaluate(args.weights, args.hr_dir, args.lr_dir, scale=args.scale, key=args.key,
                           crop_border=args.crop_border, y_channel=args.y_channel,
                           self_ensemble=args.self_ensemble, json_path=args.json, tile=args.tile or None,
                           tile_overlap=args.tile_overlap, dtype=args.dtype, device=args.device,
                           fail_fast=args.fail_fast, save_dir=args.save_dir,
                           overrides={"alpha": args.alpha, "rgb_range": args.rgb_range},
                           max_pixels=max_pixels, cuda_graph=None if args.cuda_graph else False,
                           log=log)
            return 1 if res["failed"] or not res["images"] else 0
        if args.command == "export":
            from .tools.checkpoint import export
            export(args.weights, args.output, fmt=args.format, key=args.key, log=log, dtype=args.dtype)
            return 0
        if args.command == "train":
            from .tools.train import TrainConfig, train
            fields = {f for f in TrainConfig.__dataclass_fields__}
            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
            return train(cfg, log=log)
    except CheckpointError as e:
        print(f"fastdrn: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"fastdrn: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # ImageReadError under --fail-fast, unwritable output
        print(f"fastdrn: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # eval: the model's error, named by image (upscale reports it per image)
        if args.command != "eval":
            raise
        print(f"fastdrn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastdrn: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
