"""Write the photographs scikit-image ships as PNG files: training ones and held-out ones.

    python3 training/photos.py photos        # photos/train/*.png, photos/heldout/*.png

The shipped weights (docs/weights.md) were trained on photos/train and evaluated on photos/heldout;
nothing held out is ever trained on. Grey photographs are written as RGB (three equal channels):
DRN takes RGB. Needs scikit-image (pip install scikit-image; its photographs are in the wheel,
no download). Licences: scikit-image's data/README (public domain or CC0 for these images).
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

# The classic natural scenes, never trained on: the model card's numbers and the test crop are from these.
HELD_OUT = ("astronaut", "chelsea", "coffee")
# Photographs in scikit-image's wheel of at least 192 pixels a side (an x4 patch of the paper's
# 48 LR pixels): colour ones, then grey ones. Not used: page, text and microaneurysms (smaller),
# clock (motion-blurred on purpose), cell (a microscope image, not chosen) and cat (chelsea, held
# out); the rest of skimage.data is drawings, synthetic images, volumes or downloaded files.
TRAIN_RGB = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina")
TRAIN_GREY = ("camera", "coins", "moon", "brick", "grass", "gravel")


def rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def photographs() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(training photographs, held-out photographs), by name, as uint8 RGB arrays."""
    from skimage import data
    left, right, _disparity = data.stereo_motorcycle()
    train = {name: rgb(getattr(data, name)()) for name in TRAIN_RGB + TRAIN_GREY}
    train["motorcycle_left"], train["motorcycle_right"] = left, right   # a stereo pair: same side of the split
    held_out = {name: getattr(data, name)() for name in HELD_OUT}
    return train, held_out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    train, held_out = photographs()
    for folder, images in (("train", train), ("heldout", held_out)):
        os.makedirs(os.path.join(argv[0], folder), exist_ok=True)
        for name, image in images.items():
            Image.fromarray(image).save(os.path.join(argv[0], folder, f"{name}.png"))
        print(f"{os.path.join(argv[0], folder)}: {len(images)} photographs ({', '.join(sorted(images))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
