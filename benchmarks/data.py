"""ImageNet-style data for the trainer without torchvision: an ImageFolder reader (PIL), a synthetic dataset, the
standard train/eval transforms, and a sampler that can resume in the middle of an epoch.

Every random choice (crop, flip, synthetic pixels) comes from a generator seeded by (seed, epoch, index), so a run
resumed from a checkpoint sees exactly the samples and augmentations the uninterrupted run saw.
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


def _sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63))


class ImageFolder(Dataset):
    """``root/<class>/<image>``: classes are the sorted sub-directory names, as torchvision's ImageFolder."""

    def __init__(self, root: str | Path, image_size: int, train: bool, seed: int = 0) -> None:
        root = Path(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{root} has no class sub-directories; expected {root}/<class>/<image>.jpg")
        self.samples = [(f, c) for c, name in enumerate(self.classes) for f in sorted((root / name).iterdir())
                        if f.suffix.lower() in EXTENSIONS]
        if not self.samples:
            raise FileNotFoundError(f"{root} has class directories but no images ({', '.join(EXTENSIONS)})")
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
            gen = _sample_generator(self.seed, self.epoch, index)
            img = random_resized_crop(img, self.image_size, gen) if self.train else center_crop(img, self.image_size)
            x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        x = x.permute(2, 0, 1).float().div_(255)
        if self.train and torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        return (x - MEAN) / STD, label


def random_resized_crop(img, size: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random area fraction in ``scale`` and aspect ratio (log-uniform) in ``ratio``, resized to ``size``;
    the whole image, center-cropped to the nearest allowed ratio, after 10 misses."""
    from PIL import Image

    w, h = img.size
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
        area = w * h * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + u[1] * (math.log(ratio[1]) - math.log(ratio[0])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(u[2] * (w - cw + 1)), int(u[3] * (h - ch + 1))
            return img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
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
