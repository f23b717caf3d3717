"""Training, evaluation and upscaling tools for DRN (the ``fastdrn`` command; see :mod:`fastdrn.cli`).

Importable pieces: :func:`~fastdrn.tools.checkpoint.build_model`, :func:`~fastdrn.tools.checkpoint.load_model`,
:func:`~fastdrn.tools.imresize.imresize` (MATLAB bicubic), :func:`~fastdrn.tools.metrics.psnr_ssim`,
:func:`~fastdrn.tools.infer.super_resolve`, :func:`~fastdrn.tools.upscale.upscale`,
:func:`~fastdrn.tools.evaluate.evaluate`, :func:`~fastdrn.tools.train.train`.
"""
from .checkpoint import CheckpointError, build_model, infer_config, load_model
from .evaluate import evaluate
from .image_io import ImageReadError, read_image, write_image
from .imresize import downsample, imresize, upsample
from .infer import receptive_radius, super_resolve
from .metrics import psnr, psnr_ssim, ssim
from .train import TrainConfig, train
from .upscale import upscale

__all__ = ["CheckpointError", "ImageReadError", "TrainConfig", "build_model", "downsample", "evaluate",
           "imresize", "infer_config", "load_model", "psnr", "psnr_ssim", "read_image", "receptive_radius",
           "ssim", "super_resolve", "train", "upsample", "upscale", "write_image"]
