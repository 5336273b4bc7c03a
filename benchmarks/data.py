"""ImageNet-style data for the trainer without torchvision: an ImageFolder reader (PIL), a synthetic dataset, the
standard train/eval transforms, and a sampler that can resume in the middle of an epoch.

Every random choice (crop, flip, synthetic pixels) comes from a generator seeded by (seed, epoch, index), so a run
resumed from a checkpoint sees exactly the samples and augmentations the uninterrupted run saw. Datasets take an
index or an ``(epoch, index)`` pair: ``EpochSampler`` yields pairs, so loader workers that live across epochs
(persistent workers) augment each sample for the epoch the sampler was set to.

Decoding: the crop region is chosen in the full image's pixel coordinates; a JPEG is then decoded at 1/2, 1/4 or
1/8 scale (``Image.draft``: libjpeg's DCT scaling, much less work) when the region, so scaled, still has at least
the output resolution on both sides, and the same region (divided by the scale, fractional) is resized. The draft
never changes which region is taken or any random draw; it changes pixel values slightly (DCT-domain downscaling
then a shorter bilinear filter, instead of one bilinear filter over the full-resolution region: under one level
of 255 on average, single pixels up to ~16 levels on noisy content). ``draft=False`` always decodes at full scale.
pillow-simd, a drop-in ``PIL`` with faster resampling and conversions, is used when installed in place of Pillow.

Other pixel formats (``to_rgb``): 16-bit greys (PIL's ``I;16`` modes, and ``I`` with values in 0-65535, as a 16-bit
PNG or PGM opens) are scaled to 8 bits (``round(v * 255 / 65535)``); transparency (``RGBA``, ``LA``, ``PA``, a
palette's or a colour's ``tRNS``) is composited onto ``BACKGROUND``, ImageNet's mean colour (transparent pixels
normalise to about 0, whatever colour the file stores under them); ``CMYK``, ``L``, ``1``, ``P`` and ``YCbCr`` are
converted by PIL. Images PIL has no RGB for (32-bit float ``F``, ``I`` outside 0-65535, ``LAB``, ``HSV``) are
refused, and a file that cannot be decoded (truncated, damaged, not an image) raises ``ImageDecodeError`` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
BACKGROUND = (124, 116, 104)  # transparent pixels are composited onto ImageNet's mean colour (MEAN * 255, rounded)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(OSError):
    """An image file that cannot be decoded to RGB; the message names the file, the problem and the fix."""


def has_transparency(img) -> bool:
    """Whether a PIL image has an alpha channel or a ``tRNS`` transparency (a palette's, or one colour's)."""
    return img.mode in ALPHA_MODES or "transparency" in img.info


def to_rgb(img, path: str | Path):
    """``img`` (an open PIL image, not modified) as an 8-bit RGB image, as the module's docstring says; a new image
    unless ``img`` is RGB already. Raises ``ImageDecodeError`` naming ``path`` for a format without an RGB form."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        import numpy as np

        a = np.asarray(img)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ImageDecodeError(f"fastasam: {path} is a {mode} image with values from {int(a.min())} to "
                                   f"{int(a.max())}, not 16-bit samples (0-65535), so it has no 8-bit RGB form here. "
                                   "Fix: convert it to 8-bit RGB (JPEG or PNG), or remove it from the data set")
        grey = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        raise ImageDecodeError(f"fastasam: {path} has 32-bit float pixels (PIL mode F), whose range is not known, so "
                               "it has no 8-bit RGB form here. Fix: convert it to 8-bit RGB (JPEG or PNG), or remove "
                               "it from the data set")
    if has_transparency(img):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"fastasam: {path} is a {mode} image, which PIL cannot convert to RGB ({e}). Fix: "
                               "convert it to 8-bit RGB (JPEG or PNG), or remove it from the data set") from None


def _sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63))


def _epoch_index(item: int | tuple[int, int], default_epoch: int) -> tuple[int, int]:
    return (int(item[0]), int(item[1])) if isinstance(item, tuple | list) else (default_epoch, int(item))


class ImageFolder(Dataset):
    """``root/<class>/<image>``: classes are the sorted sub-directory names, as torchvision's ImageFolder.

    ``dataset[index]`` or ``dataset[(epoch, index)]`` (``epoch`` defaults to ``self.epoch``): ``(image, label)``,
    the image ``(3, image_size, image_size)`` uint8 RGB when ``uint8`` (normalise on the device:
    ``input_pipeline.normalize``), else float32 normalised with ImageNet's ``MEAN``/``STD``. Training images are
    random-resized-cropped and flipped (seeded by (seed, epoch, index)); evaluation images center-cropped.
    """

    def __init__(self, root: str | Path, image_size: int, train: bool, seed: int = 0, uint8: bool = False,
                 draft: bool = True) -> None:
        root = Path(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{root} has no class sub-directories; expected {root}/<class>/<image>.jpg")
        self.samples = [(f, c) for c, name in enumerate(self.classes) for f in sorted((root / name).iterdir())
                        if f.suffix.lower() in EXTENSIONS]
        if not self.samples:
            raise FileNotFoundError(f"{root} has class directories but no images ({', '.join(EXTENSIONS)})")
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, 0
        self.uint8, self.draft = uint8, draft
        self.resize: int | None = None  # evaluation: the short side before the center crop (None: size * 256 / 224)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = _epoch_index(item, self.epoch)
        path, label = self.samples[index]
        x = load_image(path, self.image_size, self.train, _sample_generator(self.seed, epoch, index), self.draft,
                       self.resize)
        if self.uint8:
            return x, label
        return (x.float().div_(255) - MEAN) / STD, label


def load_image(path: str | Path, size: int, train: bool, gen: torch.Generator, draft: bool = True,
               resize: int | None = None) -> torch.Tensor:
    """Decode ``path`` and crop it: training, ``random_resized_crop_box`` then a flip with probability 1/2 (both
    drawn from ``gen``, in that order); evaluation, ``center_crop_box``. Returns ``(3, size, size)`` uint8 RGB (a
    channels-last view: ``permute(1, 2, 0)`` of it is contiguous). JPEGs are decoded at a reduced scale where the
    region allows (see the module's docstring) unless ``draft=False``; other pixel formats go through ``to_rgb``.
    A file that cannot be decoded raises ``ImageDecodeError`` naming it."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            box = random_resized_crop_box(w, h, gen) if train else center_crop_box(w, h, size, resize)
            scale = 1.0
            if draft and img.format == "JPEG":
                bw, bh = box[2] - box[0], box[3] - box[1]
                s = 8
                while s > 1 and (bw / s < size or bh / s < size):
                    s //= 2
                if s > 1:
                    drafted = img.draft("RGB", (w // s, h // s))
                    if drafted is not None:
                        scale = w / drafted[1][2]
            out = to_rgb(img, path).resize((size, size), Image.BILINEAR, box=tuple(v / scale for v in box))
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL fails as OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageDecodeError(f"fastasam: cannot decode {path}: {type(e).__name__}: {e}. It is truncated, damaged "
                               "or not an image. Fix: replace it with a whole copy, or remove it from the data "
                               "set") from e
    if train and torch.rand((), generator=gen) < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def random_resized_crop_box(w: int, h: int, gen: torch.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` in the ``w x h`` image's pixels: a random area fraction in ``scale`` and
    aspect ratio (log-uniform) in ``ratio``; the largest centered square after 10 misses (``random_resized_crop``'s
    draws, from ``gen``)."""
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
        area = w * h * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + u[1] * (math.log(ratio[1]) - math.log(ratio[0])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(u[2] * (w - cw + 1)), int(u[3] * (h - ch + 1))
            return left, top, left + cw, top + ch
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def center_crop_box(w: int, h: int, size: int, resize: int | None = None) -> tuple[float, float, float, float]:
    """``center_crop``'s region in the ``w x h`` image's pixels (fractional): resizing it to ``size`` gives
    ``center_crop``'s pixels within one level of 255 (the same filter; Pillow rounds the fractional box)."""
    short = round(size * 256 / 224) if resize is None else resize  # the short side resized to this first
    rw, rh = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    left, top = (rw - size) // 2, (rh - size) // 2
    sx, sy = w / rw, h / rh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def random_resized_crop(img, size: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random area fraction in ``scale`` and aspect ratio (log-uniform) in ``ratio``, resized to ``size``;
    the whole image, center-cropped to the nearest allowed ratio, after 10 misses."""
    from PIL import Image

    return img.resize((size, size), Image.BILINEAR, box=random_resized_crop_box(*img.size, gen, scale, ratio))


def center_crop(img, size: int):
    """Resize the short side to size * 256 / 224, then take the central ``size`` square (the usual eval crop)."""
    from PIL import Image

    w, h = img.size
    short = round(size * 256 / 224)
    rw, rh = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    img = img.resize((rw, rh), Image.BILINEAR)
    left, top = (rw - size) // 2, (rh - size) // 2
    return img.crop((left, top, left + size, top + size))


class Synthetic(Dataset):
    """Normalised Gaussian images with labels ``index % num_classes``: a data-loading-free ImageNet stand-in."""

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int = 0) -> None:
        self.size, self.num_classes, self.image_size, self.seed, self.epoch = size, num_classes, image_size, seed, 0
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        _, index = _epoch_index(item, 0)
        gen = _sample_generator(self.seed, 0, index)  # fixed images: the same sample every epoch
        return torch.randn(3, self.image_size, self.image_size, generator=gen), index % self.num_classes


class ResumableSampler(Sampler[int]):
    """This rank's share of a per-epoch permutation (seeded by seed and epoch; padded so every rank gets the same
    number of samples), starting ``start`` samples in: how a resumed run skips what it has already trained on.
    ``pad=False`` (evaluation) splits without repeating samples, so ranks may get one sample fewer."""

    def __init__(self, size: int, rank: int, world: int, shuffle: bool, seed: int = 0, pad: bool = True) -> None:
        self.size, self.rank, self.world, self.shuffle, self.seed, self.pad = size, rank, world, shuffle, seed, pad
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(size / world) if pad else len(range(rank, size, world))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            order += order[: self.per_rank * self.world - self.size]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


class EpochSampler(Sampler[tuple[int, int]]):
    """``(epoch, index)`` for each index of ``sampler`` (a ``ResumableSampler``), at most ``limit`` of them from the
    epoch's start (``None``: all), so a loader whose workers persist across epochs augments for the right epoch
    and prefetches nothing past the last step. ``set_epoch(epoch, start)`` as ``ResumableSampler``'s."""

    def __init__(self, sampler: ResumableSampler, limit: int | None = None) -> None:
        self.sampler, self.limit = sampler, sampler.per_rank if limit is None else min(limit, sampler.per_rank)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        indices = self.sampler._indices()[self.sampler.start : self.limit]
        return iter([(epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(0, self.limit - self.sampler.start)
