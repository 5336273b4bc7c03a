"""A reproducible JPEG ImageFolder for timing input pipelines: ImageNet-like 500x375 RGB JPEGs of ~100 KB.

    python -m benchmarks.jpeg_set DIR [--images 512] [--classes 8] [--seed 0]

Each image is a smooth random colour field (bilinearly upsampled 6x5 grid) with a few soft-edged ellipses and
per-pixel Gaussian noise, saved at quality 90 (4:2:0): the noise sets the entropy, so the files are about as big
as ImageNet's photographs of that size (~100-110 KB) and decode about as slowly. The pixels depend only on
(seed, index); the bytes also on the JPEG encoder (libjpeg-turbo in Pillow's wheels), so sizes may differ slightly
between Pillow builds. Layout: ``DIR/<class>/<index>.JPEG`` (``DIR`` also works as ``--data`` of the benchmark).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 500, 375


def make_image(seed: int, index: int, width: int = WIDTH, height: int = HEIGHT,
               noise: float | None = None) -> np.ndarray:
    """``(height, width, 3)`` uint8 pixels, a function of (seed, index) only; the noise's standard deviation is
    ``noise`` or, by default, drawn from [16, 26] per image (JPEGs of ~85-115 KB at 500x375, quality 90)."""
    rng = np.random.default_rng([seed, index])
    noise = rng.uniform(16, 26) if noise is None else noise
    grid = rng.uniform(20, 235, size=(5, 6, 3))
    ys, xs = np.linspace(0, 4, height), np.linspace(0, 5, width)
    y0, x0 = np.minimum(ys.astype(int), 3), np.minimum(xs.astype(int), 4)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = (grid[y0][:, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1][:, x0] * fy * (1 - fx)
           + grid[y0][:, x0 + 1] * (1 - fy) * fx + grid[y0 + 1][:, x0 + 1] * fy * fx)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(height / 20, height / 2), rng.uniform(width / 25, width / 2)
        inside = 1 / (1 + np.exp(np.minimum(8 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 - 1), 50)))
        img += inside[..., None] * (rng.uniform(0, 255, 3) - img) * rng.uniform(0.5, 1)
    img += rng.normal(0, noise, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_jpegs(root: str | Path, images: int = 512, classes: int = 8, seed: int = 0, quality: int = 90,
               width: int = WIDTH, height: int = HEIGHT) -> Path:
    """Write ``images`` JPEGs (round-robin over ``classes`` directories) under ``root``; returns ``root``."""
    from PIL import Image

    root = Path(root)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        path = root / f"n{i % classes:08d}" / f"{i:06d}.JPEG"
        Image.fromarray(make_image(seed, i, width, height)).save(path, quality=quality, subsampling="4:2:0")
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = make_jpegs(args.dir, args.images, args.classes, args.seed)
    sizes = [f.stat().st_size for f in root.rglob("*.JPEG")]
    print(f"{len(sizes)} JPEGs in {root}: mean {sum(sizes) / len(sizes) / 1e3:.1f} KB")


if __name__ == "__main__":
    main()
