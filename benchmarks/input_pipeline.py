"""The trainer's input pipelines (``--loader``) and their throughput benchmark.

``pil`` (default, CPU decoding; ``PilLoader``): a DataLoader whose workers are created once and live across
epochs (persistent), fed ``(epoch, index)`` pairs by ``EpochSampler`` so the order and every augmentation stay
seeded by (seed, epoch, index) exactly as with workers made anew each epoch; the workers return uint8 CHW images
(decode, draft-scaled where the crop allows, random-resized-crop, flip: ``benchmarks.data.load_image``), batches
are pinned (CUDA) and prefetched (``prefetch_factor`` batches per worker), and the float conversion, ImageNet
normalisation and channels_last happen on the device in the training process (``normalize``): a quarter of the
bytes to copy, and none of the worker time float32 normalisation costs (a third of it here: 319 vs 505 images
per CPU-second, benchmarks/results/input-pipeline-cpu.md). pillow-simd, installed
in place of Pillow (``pip uninstall pillow && pip install pillow-simd``), is used as is: it is a drop-in ``PIL``.

``dali`` (GPU decoding; ``DaliLoader``, ``pip install nvidia-dali-cuda130``, the ``dali`` extra, ~750 MB): NVIDIA
DALI decodes the crop region of each JPEG (nvJPEG, ``decoders.image_slice`` on the "mixed" device: region-of-
interest decoding where the decoder supports it), resizes it and normalises on the GPU, for nodes with too few cores
for ``pil``. The training process reads the files and parses their headers (~0.1 ms an image, one thread). The
sample order (the same ``EpochSampler`` shard of this rank) and each sample's crop region and flip are computed in
Python from (seed, epoch, index), the same as ``pil`` draws them, and handed to DALI (external sources); DALI draws
no random number. So a resumed ``dali`` run trains on the same images, in the same order, with the same crop regions
and flips as the run it continues; its pixels are as reproducible as DALI's decoder and resize kernels on that GPU
and DALI version (not documented as bit-exact: expect, but do not rely on, bit-identical weights after a resume).
Its pixels differ slightly from ``pil``'s (another JPEG decoder and resampler). With ``device_id=None`` the pipeline
runs DALI's CPU operators (how it is tested without a GPU; there a resumed run ends with the same weights, bit for
bit). The header read in Python (``dali_header``) refuses, naming the file, one it cannot read and an image whose
transparency or 16-bit/float samples ``pil`` converts (``benchmarks.data.to_rgb``) and DALI would not the same way.

Benchmark (a fresh process; uint8 output; a warm-up, then the rate). ``--data`` is an ImageFolder
(``ROOT/<class>/<image>``) or the trainer's ``--data`` root (``ROOT/train`` and ``ROOT/val``), whose ``train/`` it
reads (printed; ``training_root``):

    python -m benchmarks.jpeg_set /tmp/jpegs --images 1024          # the reproducible ~100 KB 500x375 JPEG set
    python -m benchmarks.input_pipeline --data /tmp/jpegs --loader pil --workers 2 --images 2000 --node-rate 25000
    python -m benchmarks.input_pipeline --data /data/imagenet --loader pil --workers 8     # reads /data/imagenet/train
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from benchmarks.data import (
    MEAN,
    STD,
    EpochSampler,
    ImageDecodeError,
    ImageFolder,
    ResumableSampler,
    _sample_generator,
    center_crop_box,
    has_transparency,
    random_resized_crop_box,
)

LOADERS = ("pil", "dali")


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` samples: uint8 ``(3, H, W)`` views of HWC pixels stack to a channels_last
    ``(N, 3, H, W)`` batch without transposing; anything else as ``default_collate``."""
    images, labels = zip(*batch)
    if images[0].dtype == torch.uint8 and images[0].permute(1, 2, 0).is_contiguous():
        x = torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
        return x, torch.tensor(labels, dtype=torch.int64)
    return default_collate(batch)


def normalize(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` RGB on the device -> float32 ``(x / 255 - MEAN) / STD`` (channels_last if asked);
    a float batch (already normalised, e.g. synthetic data) only gets the memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if x.dtype != torch.uint8:
        return x.contiguous(memory_format=fmt)
    mean = (MEAN * 255).to(x.device).view(1, 3, 1, 1)
    inv_std = (1 / (STD * 255)).to(x.device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=fmt).float().sub_(mean).mul_(inv_std)


class PilLoader:
    """Batches of ``dataset`` in ``sampler``'s order (at most ``limit`` samples an epoch), as
    ``(x, y)``: x float32 ``(batch, 3, S, S)`` normalised on ``device`` (``normalize=False``: the workers' uint8,
    left on the host), y int64 ``(batch,)`` on ``device``. Workers (``workers > 0``) are created at the first
    iteration and kept; call ``set_epoch(epoch, start)`` before each epoch."""

    def __init__(self, dataset, sampler: ResumableSampler, batch: int, workers: int, device: torch.device,
                 channels_last: bool = False, limit: int | None = None, drop_last: bool = True,
                 prefetch: int = 4, normalize: bool = True) -> None:
        self.sampler = EpochSampler(sampler, limit)
        self.device, self.channels_last, self.normalize = device, channels_last, normalize
        self.loader = DataLoader(dataset, batch_size=batch, sampler=self.sampler, num_workers=workers,
                                 collate_fn=collate, drop_last=drop_last, persistent_workers=workers > 0,
                                 prefetch_factor=prefetch if workers > 0 else None,
                                 pin_memory=device.type == "cuda" and normalize)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            if self.normalize:
                x = normalize(x.to(self.device, non_blocking=True), self.channels_last)
                y = y.to(self.device, non_blocking=True)
            yield x, y


def dali_header(path: str | Path, data) -> tuple[int, int]:
    """``(width, height)`` of the image file ``path`` whose bytes are ``data`` (a uint8 array), from its header (PIL,
    nothing decoded). Raises ``ImageDecodeError`` naming ``path`` for a header PIL cannot read, and for an image the
    ``pil`` loader converts in a way DALI's decoder would not (transparency composited onto ``data.BACKGROUND``,
    16-bit or float samples scaled: ``benchmarks.data.to_rgb``), so that both loaders train on the same pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.tobytes())) as img:
            w, h = img.size
            mode, transparent = img.mode, has_transparency(img)
    except Exception as e:  # noqa: BLE001 - PIL fails as OSError, SyntaxError, ValueError, ...
        detail = ("PIL does not recognise it" if isinstance(e, UnidentifiedImageError)  # its text names the BytesIO
                  else f"{type(e).__name__}: {e}")
        raise ImageDecodeError(f"fastasam: --loader dali: cannot read the header of {path} ({detail}): it is "
                               "truncated, damaged or not an image. Fix: replace it with a whole copy, or remove it "
                               "from the data set") from e
    if transparent or mode.startswith("I") or mode == "F":
        what = (f"transparency ({mode})" if transparent
                else f"{'32-bit float' if mode == 'F' else '16-bit'} samples ({mode})")
        raise ImageDecodeError(f"fastasam: --loader dali: {path} has {what}, which --loader pil converts "
                               "(benchmarks.data.to_rgb) and DALI's decoder would not the same way. Fix: convert it to "
                               "8-bit RGB (a JPEG), or use --loader pil")
    return w, h


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliLoader:
    """``PilLoader``'s contract with NVIDIA DALI doing the decoding, crop, resize, flip and normalisation (on the
    GPU ``device_id``; ``None``: DALI's CPU operators, the batches then on the CPU). ``dataset`` is an
    ``ImageFolder`` (its files, labels, seed, ``train`` and ``image_size``); the order, crop regions and flips come
    from ``sampler`` and (seed, epoch, index) as ``pil``'s (see the module's docstring for what a resume keeps).
    ``normalize=False``: uint8 ``(batch, 3, S, S)`` out. The last partial batch is dropped when ``drop_last``.
    One batch ahead is scheduled (read, crop regions drawn, fed to DALI) when a batch is handed out, so DALI
    decodes it while the caller trains."""

    def __init__(self, dataset: ImageFolder, sampler: ResumableSampler, batch: int, device_id: int | None,
                 threads: int = 4, limit: int | None = None, drop_last: bool = True, normalize: bool = True,
                 channels_last: bool = False) -> None:
        if not dali_available():
            raise ImportError("fastasam: --loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or the "
                              "'dali' extra); or use --loader pil")
        from nvidia.dali import fn, pipeline_def, types

        self.dataset, self.batch, self.device_id, self.drop_last = dataset, batch, device_id, drop_last
        self.sampler, self.normalize, self.channels_last = EpochSampler(sampler, limit), normalize, channels_last
        self._pending = 0
        size = dataset.image_size
        layout = "HWC" if channels_last and normalize else "CHW"  # HWC permuted to NCHW is channels_last

        @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            labels = fn.external_source(name="labels", dtype=types.INT64)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
            shape = fn.external_source(name="shape", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            images = fn.decoders.image_slice(jpegs, anchor, shape, device="cpu" if device_id is None else "mixed",
                                             output_type=types.RGB, axis_names="WH", normalized_anchor=False,
                                             normalized_shape=False)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                               antialias=True)
            if normalize:
                images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mirror=mirror,
                                                  mean=(MEAN.flatten() * 255).tolist(),
                                                  std=(STD.flatten() * 255).tolist())
            else:
                images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
            return images, labels.gpu() if device_id is not None else labels

        self.pipe = pipe()
        self.pipe.build()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch if self.drop_last else -(-n // self.batch)

    def _inputs(self, items: list[tuple[int, int]]) -> dict:
        import numpy as np

        ds, out = self.dataset, {"jpegs": [], "labels": [], "anchor": [], "shape": [], "mirror": []}
        for epoch, index in items:
            path, label = ds.samples[index]
            data = np.fromfile(path, dtype=np.uint8)
            w, h = dali_header(path, data)
            gen = _sample_generator(ds.seed, epoch, index)
            if ds.train:
                box = random_resized_crop_box(w, h, gen)
                flip = bool(torch.rand((), generator=gen) < 0.5)
            else:
                box, flip = center_crop_box(w, h, ds.image_size, ds.resize), False
            out["jpegs"].append(data)
            out["labels"].append(np.array([label], dtype=np.int64))
            out["anchor"].append(np.array(box[:2], dtype=np.float32))
            out["shape"].append(np.array([box[2] - box[0], box[3] - box[1]], dtype=np.float32))
            out["mirror"].append(np.array([int(flip)], dtype=np.int32))
        return out

    def _schedule(self, items: list[tuple[int, int]]) -> None:
        for name, data in self._inputs(items).items():
            self.pipe.feed_input(name, data)
        self.pipe.schedule_run()
        self._pending += 1

    def _to_torch(self, out) -> torch.Tensor:
        """A torch copy of a DALI output batch (on the GPU ``device_id``, on the current stream; or the CPU)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = out.as_tensor()
        cuda = self.device_id is not None
        x = torch.empty(t.shape(), dtype=to_torch_type[t.dtype],
                        device=torch.device("cuda", self.device_id) if cuda else torch.device("cpu"))
        feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device_id) if cuda else None)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self._pending:  # a previous iteration left early: drop its scheduled batch
            self.pipe.outputs()
            self._pending -= 1
        items = list(self.sampler)
        batches = [items[k : k + self.batch] for k in range(0, len(items), self.batch)]
        if batches and self.drop_last and len(batches[-1]) < self.batch:
            batches.pop()
        if batches:
            self._schedule(batches[0])
        for k in range(len(batches)):
            images, labels = self.pipe.outputs()
            self._pending -= 1
            x, y = self._to_torch(images), self._to_torch(labels).view(-1)  # copies: DALI's buffers are free again
            if k + 1 < len(batches):
                self._schedule(batches[k + 1])  # decoded while the caller trains on this batch
            if self.normalize and self.channels_last:
                x = x.permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W), channels_last without a copy
            yield x, y


def make_loader(kind: str, dataset, sampler: ResumableSampler, batch: int, workers: int, device: torch.device,
                channels_last: bool = False, limit: int | None = None, drop_last: bool = True,
                normalize: bool = True):
    """``PilLoader`` or ``DaliLoader`` (``kind``); synthetic data always goes through ``PilLoader``."""
    if kind == "dali" and isinstance(dataset, ImageFolder):
        device_id = device.index if device.type == "cuda" else None
        if device_id is None and device.type == "cuda":
            device_id = torch.cuda.current_device()
        return DaliLoader(dataset, sampler, batch, device_id, threads=max(workers, 1), limit=limit,
                          drop_last=drop_last, normalize=normalize, channels_last=channels_last)
    if kind not in LOADERS:
        raise ValueError(f"fastasam: unknown loader {kind!r}; choose one of {', '.join(LOADERS)}")
    return PilLoader(dataset, sampler, batch, workers, device, channels_last, limit, drop_last, normalize=normalize)


def _versions() -> dict:
    import PIL

    v = {"python": platform.python_version(), "torch": torch.__version__, "PIL": PIL.__version__,
         "pillow_simd": ".post" in PIL.__version__ or "simd" in PIL.__version__.lower()}
    if dali_available():
        import nvidia.dali

        v["dali"] = nvidia.dali.__version__
    return v


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
        return out.stdout.strip() + (" (benchmarks/ modified)" if dirty else "") if out.returncode == 0 else "?"
    except OSError:
        return "?"


def training_root(data: Path) -> Path:
    """The ImageFolder the benchmark reads for ``--data``: ``data/train`` when ``data`` has a ``train/`` directory
    (the trainer's ``--data`` root, with ``train/`` and ``val/``), else ``data`` itself (``data/<class>/<image>``)."""
    data = Path(data)
    return data / "train" if (data / "train").is_dir() else data


def measure(data: Path, loader: str = "pil", workers: int = 1, images: int = 2000, warmup: int = 200,
            batch: int = 32, image_size: int = 224, progress_s: float = 5.0, out=sys.stdout,
            float_in_workers: bool = False) -> dict:
    """Time ``loader`` over the training transform of the JPEGs under ``data``, an ImageFolder root (``main`` passes
    ``training_root``'s), uint8 out (on the host for ``pil``, DALI's CPU operators for ``dali``): ``warmup`` images
    untimed (workers start, caches warm), then ``images`` timed. Returns images/s in total and per core (``workers``
    processes, or DALI threads), and per CPU-second of the loader's processes. ``float_in_workers``: the workers
    normalise to float32 (``pil``; the trainer's previous pipeline), for comparison."""
    ds = ImageFolder(data, image_size, train=True, uint8=not float_in_workers)
    sampler = ResumableSampler(len(ds), 0, 1, shuffle=True, seed=0)
    ld = make_loader(loader, ds, sampler, batch, workers, torch.device("cpu"), normalize=False, drop_last=True)
    cores = max(workers, 1)

    def batches() -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            ld.set_epoch(epoch)
            for x, _ in ld:
                yield x
            epoch += 1

    it, seen = batches(), 0
    while seen < warmup:
        seen += len(next(it))
    pids = [os.getpid(), *(w.pid for w in getattr(getattr(ld, "loader", None), "_iterator", None) and
                           ld.loader._iterator._workers or [])]
    cpu0, load0 = _cpu_seconds(pids), os.getloadavg()[0]
    t0 = last = time.perf_counter()
    seen = 0
    while seen < images:
        x = next(it)
        assert x.dtype == (torch.float32 if float_in_workers else torch.uint8)
        assert x.shape[1:] == (3, image_size, image_size)
        seen += len(x)
        now = time.perf_counter()
        if now - last >= progress_s:
            rate = seen / (now - t0)
            print(f"  {seen}/{images} images, {rate:.0f} images/s, {rate / cores:.0f} per core", file=out, flush=True)
            last = now
    rate = seen / (time.perf_counter() - t0)
    cpu = _cpu_seconds(pids) - cpu0
    return {"images_per_cpu_s": seen / cpu if cpu > 0 else None, "loader": loader, "workers": workers,
            "output": "float32 (normalised in the workers)" if float_in_workers else "uint8",
            "load_average_1min": [load0, os.getloadavg()[0]],
            "cores": cores, "images": seen, "warmup": warmup,
            "batch": batch, "image_size": image_size, "images_per_s": rate, "images_per_s_per_core": rate / cores}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.train_imagenet import float_flag, int_flag  # here: train_imagenet imports this module

    p = argparse.ArgumentParser(description="Images/s of the trainer's input pipelines on a JPEG ImageFolder "
                                "(training transform, uint8 out, after a warm-up), and the cores a node needs.")
    p.add_argument("--data", type=Path,
                   help="an ImageFolder of JPEGs (DIR/<class>/<image>, e.g. from --make-jpegs), or the trainer's "
                        "--data root (DIR/train/ and DIR/val/): then DIR/train/ is read (the line 'data: ...' says "
                        "which)")
    p.add_argument("--make-jpegs", type=Path, metavar="DIR",
                   help="first write the reproducible JPEG set (benchmarks.jpeg_set) to DIR and use it as --data")
    p.add_argument("--jpegs", type=int_flag(1), default=1024, help="images --make-jpegs writes")
    p.add_argument("--loader", default="pil", choices=LOADERS)
    p.add_argument("--workers", type=int_flag(0), default=os.cpu_count() or 1,
                   help="loader worker processes (pil; 0: the main process) or DALI threads")
    p.add_argument("--images", type=int_flag(1), default=2000, help="timed images (after --warmup)")
    p.add_argument("--warmup", type=int_flag(0), default=200)
    p.add_argument("--batch", type=int_flag(1), default=32)
    p.add_argument("--image-size", type=int_flag(1), default=224)
    p.add_argument("--node-rate", type=float_flag(0, low_open=True), default=25000,
                   help="images/s an N-GPU node trains at")
    p.add_argument("--gpus", type=int_flag(1), default=8, help="GPUs of that node (for the printed line)")
    p.add_argument("--float-in-workers", action="store_true",
                   help="pil: normalise to float32 in the workers (the previous pipeline), for comparison")
    p.add_argument("--repeat", type=int_flag(1), default=1, help="runs, each in a fresh process; the best is reported")
    p.add_argument("--json", type=Path, help="write the result (and the machine, versions, date, commit) here")
    p.add_argument("--progress", type=float_flag(0, low_open=True), default=5.0,
                   help="seconds between progress lines")
    args = p.parse_args(argv)
    if args.make_jpegs:
        from benchmarks.jpeg_set import make_jpegs

        args.data = make_jpegs(args.make_jpegs, args.jpegs)
    if args.data is None:
        p.error("give --data DIR (an ImageFolder of JPEGs, or the trainer's --data root) or --make-jpegs DIR")
    root = training_root(args.data)
    if root != Path(args.data):
        print(f"data: {root} (the train/ split of the trainer's --data root {args.data})",
              file=sys.stderr if args.json and str(args.json) == "/dev/stdout" else sys.stdout, flush=True)
    runs = []
    for r in range(args.repeat):
        if args.repeat == 1 and os.environ.get("_INPUT_PIPELINE_CHILD"):
            res = measure(root, args.loader, args.workers, args.images, args.warmup, args.batch,
                          args.image_size, args.progress, float_in_workers=args.float_in_workers)
        else:  # a fresh process per run: no warm page cache of decoded state, workers started from scratch
            cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--data", str(root), "--loader",
                   args.loader, "--workers", str(args.workers), "--images", str(args.images), "--warmup",
                   str(args.warmup), "--batch", str(args.batch), "--image-size", str(args.image_size),
                   "--progress", str(args.progress), "--json", "/dev/stdout",
                   *(["--float-in-workers"] if args.float_in_workers else [])]
            env = {**os.environ, "_INPUT_PIPELINE_CHILD": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  cwd=Path(__file__).resolve().parents[1])
            if proc.returncode:
                raise RuntimeError(f"fastasam: benchmark run failed:\n{proc.stdout}{proc.stderr}")
            lines = proc.stdout.splitlines()
            start = next(i for i, line in enumerate(lines) if line.startswith("{"))
            if start:
                print("\n".join(lines[:start]), flush=True)
            res = json.loads("\n".join(lines[start:]))["runs"][0]
        print(f"run {r + 1}/{args.repeat}: {args.loader}, {res['cores']} core(s): {res['images_per_s']:.0f} "
              f"images/s, {res['images_per_s_per_core']:.0f} per core (wall); {res['images_per_cpu_s'] or 0:.0f} "
              "per CPU-second of the loader's processes", file=sys.stderr if args.json and
              str(args.json) == "/dev/stdout" else sys.stdout, flush=True)
        runs.append(res)
    best = max(runs, key=lambda r: r["images_per_s_per_core"])
    need = args.node_rate / best["images_per_s_per_core"]
    best_cpu = max((r["images_per_cpu_s"] or 0 for r in runs), default=0)
    sizes = [f.stat().st_size for f in root.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg")]
    result = {"best": best, "runs": runs, "data": str(root), "node_rate": args.node_rate, "gpus": args.gpus,
              "cores_needed": need, "best_images_per_cpu_s": best_cpu,
              "cores_needed_by_cpu_time": args.node_rate / best_cpu if best_cpu else None,
              "jpegs": len(sizes), "mean_jpeg_kb": sum(sizes) / max(len(sizes), 1) / 1e3,
              "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
              "versions": _versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": _commit()}
    summary = (f"{args.loader}: best of {len(runs)}: {best['images_per_s']:.0f} images/s on {best['cores']} "
               f"core(s) = {best['images_per_s_per_core']:.0f} images/s per core; an {args.gpus}-GPU node at "
               f"{args.node_rate:.0f} images/s needs {need:.0f} cores"
               + (f" ({best_cpu:.0f} images per CPU-second: {args.node_rate / best_cpu:.0f} cores busy only with "
                  "it)" if best_cpu else ""))
    if args.json:
        if str(args.json) == "/dev/stdout":
            print(json.dumps(result, indent=1), flush=True)
        else:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not (args.json and str(args.json) == "/dev/stdout"):
        print(summary, flush=True)
    return result


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (Linux /proc; 0 elsewhere): a per-core rate that a busy
    machine's other processes do not dilute."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    main()
