"""Training and evaluation data: HR/LR pairing, MATLAB-bicubic LR generation, random paired crops,
and a resumable, distributed batch sampler.

Determinism: every sample drawn during training has a global position p in an endless stream
(step * global_batch + i). The image it shows is the p-th entry of concatenated random permutations
of the data set (permutation c seeded by (seed, c)) and its crop, flips and rotation come from a
numpy generator seeded by (seed, p). Data order and augmentation are therefore a pure function of
(seed, step): independent of the number of DataLoader workers and of the number of processes, and
resuming at step k needs only k.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .image_io import DEFAULT_MAX_PIXELS, ImageReadError, list_images, precision_lost, read_image
from .imresize import downsample

__all__ = ["Pair", "find_pairs", "load_pair", "TrainPatches", "StreamBatchSampler", "estimate_bytes"]


@dataclass
class Pair:
    name: str
    hr: str
    lr: str | None = None


def _lr_folder(lr_dir: str, scale: int) -> Path:
    d = Path(lr_dir)
    for sub in (f"X{scale}", f"x{scale}"):
        if (d / sub).is_dir():
            return d / sub
    return d


def find_pairs(hr_dir: str, lr_dir: str | None, scale: int, warn=None) -> tuple[list[Pair], list[str]]:
    """HR images of ``hr_dir`` with their LR partners (DIV2K naming ``0001.png`` <-> ``X4/0001x4.png``,
    or the same name). Returns (pairs, errors for HR images without an LR partner); the other files
    of ``hr_dir`` are named in one message to ``warn`` when it is given."""
    if not Path(hr_dir).is_dir():
        raise FileNotFoundError(f"{hr_dir}: not a folder")
    hrs = list_images([hr_dir], warn=warn)
    stems = [Path(h).stem for h in hrs]
    # A pair's name keys its results, saved image and cached data: files that share a stem
    # (a.png, a.jpg) are named by their whole file name, or one would stand for the other.
    shared = {stem for stem, n in Counter(stems).items() if n > 1}
    names = [Path(h).name if stem in shared else stem for h, stem in zip(hrs, stems)]
    if lr_dir is None:
        return [Pair(name, h) for name, h in zip(names, hrs)], []
    folder = _lr_folder(lr_dir, scale)
    if not folder.is_dir():
        raise FileNotFoundError(f"{lr_dir}: not a folder")
    by_stem: dict[str, list[str]] = {}
    for f in list_images([folder]):
        by_stem.setdefault(Path(f).stem.lower(), []).append(f)
    found, errors = [], []
    for h, name in zip(hrs, names):
        stem = Path(h).stem
        for cand in (f"{stem}x{scale}", stem, f"{stem}_x{scale}", f"{stem}_lr"):
            lrs = by_stem.get(cand.lower())
            if lrs and len(lrs) > 1:     # bx2.png and bx2.jpg: no telling which is b's
                errors.append(f"{h}: several LR images could be its partner: {', '.join(lrs)}")
                break
            if lrs:
                found.append(Pair(name, h, lrs[0]))
                break
        else:
            errors.append(f"{h}: no LR image {stem}x{scale}.* or {stem}.* in {folder}")
    # HR images that share a stem (a.png, a.bmp) find the same LR image: one would be scored, or
    # trained, against the other's
    partners = Counter(p.lr for p in found)
    pairs = []
    for p in found:
        if partners[p.lr] > 1:
            others = ", ".join(q.hr for q in found if q.lr == p.lr and q is not p)
            errors.append(f"{p.hr}: its LR image {p.lr} is also that of {others}: rename one of them")
        else:
            pairs.append(p)
    return pairs, errors


def _to_array(img) -> np.ndarray:
    """Image -> (H, W, 3) uint8 or uint16 array."""
    m = 65535.0 if img.bits == 16 else 255.0
    a = torch.round(img.rgb.double().clamp(0, 1) * m).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(a.astype(np.uint16 if img.bits == 16 else np.uint8))


def make_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(hr, 1/scale, 'bicubic')`` of an integer image, rounded to its own type."""
    m = 65535.0 if hr.dtype == np.uint16 else 255.0
    t = torch.from_numpy(hr.astype(np.float64)).permute(2, 0, 1) / m
    lr = torch.round(downsample(t, scale).clamp(0, 1) * m).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(lr.astype(hr.dtype))


def load_pair(pair: Pair, scale: int, max_pixels: int | None = DEFAULT_MAX_PIXELS,
              on_warning: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair -> (lr, hr) (H, W, 3) integer arrays with hr exactly ``scale`` times lr.

    Without an LR file, HR is cropped to a multiple of ``scale`` and LR is made by MATLAB bicubic.
    With one, HR is cropped to ``scale`` x the LR size (the usual "mod crop"). Raises ImageReadError
    (also for an image of more than ``max_pixels`` pixels, refused before it is decoded).
    ``on_warning`` is told of each image read at fewer bits than its file holds.
    """
    def read(path):
        img = read_image(path, max_pixels=max_pixels)
        lost = precision_lost(img, path)
        if lost and on_warning:
            on_warning(lost)
        return img

    hr_img = read(pair.hr)
    hr = _to_array(hr_img)
    if pair.lr is None:
        h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
        if h == 0 or w == 0:
            raise ImageReadError(f"{pair.hr}: smaller than the scale {scale}")
        hr = np.ascontiguousarray(hr[:h, :w])
        return make_lr(hr, scale), hr
    lr_img = read(pair.lr)
    lr = _to_array(lr_img)
    if lr.dtype != hr.dtype:
        lr = (lr.astype(np.float64) * (257.0 if hr.dtype == np.uint16 else 1 / 257.0)).round().astype(hr.dtype)
    h, w = lr.shape[0] * scale, lr.shape[1] * scale
    if hr.shape[0] < h or hr.shape[1] < w or hr.shape[0] >= h + scale or hr.shape[1] >= w + scale:
        raise ImageReadError(f"{pair.lr}: LR size {lr.shape[1]}x{lr.shape[0]} does not match HR "
                             f"{hr.shape[1]}x{hr.shape[0]} at scale {scale}")
    return lr, np.ascontiguousarray(hr[:h, :w])


def estimate_bytes(pairs: list[Pair], scale: int) -> int:
    """Decoded size of the training pairs (HR + LR, 3 channels, 8 bits), from the file headers only."""
    from PIL import Image as PILImage
    total = 0
    for p in pairs:
        try:
            with PILImage.open(p.hr) as im:
                w, h = im.size
        except Exception:
            continue
        total += 3 * w * h * (1 + 1 / scale ** 2)
    return int(total)


class _Store:
    """Decoded pairs: in memory, as .npy files on disk (memory-mapped), or decoded on every use."""

    def __init__(self, pairs: list[Pair], scale: int, mode: str, cache_dir: str | None,
                 on_error: Callable[[str], None], patch: int, on_warning: Callable[[str], None] | None = None):
        self.scale, self.mode, self.cache_dir = scale, mode, cache_dir
        self.pairs, self.mem, self.files = [], [], []
        for p in pairs:
            try:
                lr, hr = self._cached(p, on_warning) if mode == "disk" else load_pair(p, scale, on_warning=on_warning)
                if min(lr.shape[:2]) < patch:
                    raise ImageReadError(f"{p.hr}: LR image {lr.shape[1]}x{lr.shape[0]} is smaller than "
                                         f"the {patch}x{patch} patch")
            except ImageReadError as e:
                on_error(str(e))
                continue
            self.pairs.append(p)
            if mode == "memory":
                self.mem.append((lr, hr))
            del lr, hr

    def _cache_paths(self, p: Pair) -> tuple[str, str]:
        st = [os.stat(p.hr)] + ([os.stat(p.lr)] if p.lr else [])
        key = repr((os.path.abspath(p.hr), p.lr and os.path.abspath(p.lr), self.scale,
                    [(s.st_size, s.st_mtime_ns) for s in st]))
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        # the digest tells files apart; the name, cut short, keeps a long one under the 255-byte limit
        base = os.path.join(self.cache_dir, f"{p.name[:64]}_x{self.scale}_{digest}")
        return base + "_lr.npy", base + "_hr.npy"

    def _load_cached(self, lr_path: str, hr_path: str) -> tuple[np.ndarray, np.ndarray] | str:
        """The cached (lr, hr), or why they cannot be used (a file cut short, not an array, or
        arrays that are not an image pair at this scale)."""
        arrays = []
        for path in (lr_path, hr_path):
            try:
                arrays.append(np.load(path, mmap_mode="r"))
            except (ValueError, OSError, EOFError) as e:
                return f"{path}: {e}"
        lr, hr = arrays
        s = self.scale
        if (lr.ndim != 3 or lr.shape[2] != 3 or lr.dtype not in (np.uint8, np.uint16) or hr.dtype != lr.dtype
                or hr.shape != (lr.shape[0] * s, lr.shape[1] * s, 3)):
            return f"{hr_path}: holds {hr.dtype} {hr.shape} beside {lr_path}'s {lr.dtype} {lr.shape}, not an x{s} pair"
        return lr, hr

    def _cached(self, p: Pair, on_warning: Callable[[str], None] | None = None):
        from .checkpoint import atomic_write
        try:
            lr_path, hr_path = self._cache_paths(p)
        except OSError:          # an image that is gone (a broken link): load_pair names it
            return load_pair(p, self.scale, on_warning=on_warning)
        if os.path.exists(lr_path) and os.path.exists(hr_path):
            got = self._load_cached(lr_path, hr_path)
            if not isinstance(got, str):
                return got
            if on_warning:       # a cache is remade from the image, never trusted or fatal
                on_warning(f"damaged cache file {got}: {p.hr} decoded again")
        lr, hr = load_pair(p, self.scale, on_warning=on_warning)
        atomic_write(hr_path, lambda tmp: np.save(tmp, hr))
        atomic_write(lr_path, lambda tmp: np.save(tmp, lr))
        return np.load(lr_path, mmap_mode="r"), np.load(hr_path, mmap_mode="r")

    def __len__(self):
        return len(self.pairs)

    def get(self, i: int):
        if self.mode == "memory":
            return self.mem[i]
        if self.mode == "disk":
            return self._cached(self.pairs[i])
        return load_pair(self.pairs[i], self.scale)


class TrainPatches(Dataset):
    """Random paired crops (``patch`` x ``patch`` LR, the matching HR) with the eight flips/rotations.

    Items are addressed by ``(image index, sample seed)`` tuples from :class:`StreamBatchSampler`.
    Returns float32 (3, p, p) LR and (3, p*s, p*s) HR tensors in [0, rgb_range].
    """

    def __init__(self, pairs: list[Pair], scale: int, patch: int = 48, augment: bool = True,
                 cache: str = "memory", cache_dir: str | None = None, rgb_range: float = 1.0,
                 on_error: Callable[[str], None] | None = None, on_warning: Callable[[str], None] | None = None):
        if cache not in ("memory", "disk", "none"):
            raise ValueError(f"cache must be memory, disk or none, got {cache!r}")
        if cache == "disk" and not cache_dir:
            raise ValueError("cache='disk' needs a cache_dir")
        self.errors: list[str] = []

        def err(msg):
            self.errors.append(msg)
            if on_error:
                on_error(msg)

        self.store = _Store(pairs, scale, cache, cache_dir, err, patch, on_warning)
        self.scale, self.patch, self.augment, self.rgb_range = scale, patch, augment, rgb_range

    def __len__(self):
        return len(self.store)

    def __getitem__(self, key):
        idx, seed = key
        lr, hr = self.store.get(idx)
        rng = np.random.default_rng(seed)
        p, s = self.patch, self.scale
        y = int(rng.integers(0, lr.shape[0] - p + 1))
        x = int(rng.integers(0, lr.shape[1] - p + 1))
        lp = np.asarray(lr[y:y + p, x:x + p])
        hp = np.asarray(hr[y * s:(y + p) * s, x * s:(x + p) * s])
        if self.augment:
            hflip, vflip, rot = rng.random(3) < 0.5
            if hflip:
                lp, hp = lp[:, ::-1], hp[:, ::-1]
            if vflip:
                lp, hp = lp[::-1], hp[::-1]
            if rot:
                lp, hp = lp.transpose(1, 0, 2), hp.transpose(1, 0, 2)
        m = 65535.0 if hr.dtype == np.uint16 else 255.0
        f = self.rgb_range / m
        lt = torch.from_numpy(np.ascontiguousarray(lp.transpose(2, 0, 1)).astype(np.float32)) * f
        ht = torch.from_numpy(np.ascontiguousarray(hp.transpose(2, 0, 1)).astype(np.float32)) * f
        return lt, ht


class StreamBatchSampler(Sampler):
    """Batches of ``(image index, sample seed)`` for steps ``start_step .. total_steps - 1``.

    The global batch of step t is stream positions ``[t * B, (t + 1) * B)``; process ``rank`` of
    ``world_size`` takes the contiguous slice ``rank * B / W .. (rank + 1) * B / W`` of it (the same
    sharding as ``DistributedSampler``, and the union over ranks is exactly the single-process batch).
    """

    def __init__(self, n_items: int, global_batch: int, total_steps: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        if n_items < 1:
            raise ValueError("no training images")
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        self.n, self.batch, self.total, self.seed = n_items, global_batch, total_steps, seed
        self.start, self.rank, self.world = start_step, rank, world_size
        self.local = global_batch // world_size

    @lru_cache(maxsize=4)
    def _perm(self, chunk: int) -> list[int]:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, chunk, 0x5EED]).generate_state(1)[0]))
        return torch.randperm(self.n, generator=g).tolist()

    def item(self, pos: int) -> tuple[int, list[int]]:
        return self._perm(pos // self.n)[pos % self.n], [self.seed, pos]

    def __len__(self):
        return max(0, self.total - self.start)

    def __iter__(self):
        for step in range(self.start, self.total):
            first = step * self.batch + self.rank * self.local
            yield [self.item(p) for p in range(first, first + self.local)]
