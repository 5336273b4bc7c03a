"""The trainer's input pipelines (benchmarks/input_pipeline.py, benchmarks/data.py) on small generated JPEG
ImageFolders: the uint8 contract, the (seed, epoch, index) order and augmentation with persistent workers and after
a resume, draft decoding's crop region, a resumed trainer run with workers, DALI's CPU operators (when DALI is
installed), and the benchmark's output."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch

pytest.importorskip("PIL.Image")
np = pytest.importorskip("numpy")

from benchmarks import data, input_pipeline, jpeg_set, train_imagenet  # noqa: E402
from benchmarks.data import MEAN, STD, ImageFolder, ResumableSampler, load_image  # noqa: E402
from benchmarks.input_pipeline import PilLoader, dali_available  # noqa: E402

SIZE = 24


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """12 JPEGs of 64x48 in 3 classes."""
    return jpeg_set.make_jpegs(tmp_path_factory.mktemp("jpegs"), images=12, classes=3, width=64, height=48)


def _epochs(loader, epochs, start=0):
    out = []
    for e in epochs:
        loader.set_epoch(e, start if e == epochs[0] else 0)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def test_pil_loader_yields_uint8_chw_batches_and_labels(jpegs):
    ds = ImageFolder(jpegs, SIZE, train=True, uint8=True)
    x, label = ds[(0, 5)]
    assert x.dtype == torch.uint8 and x.shape == (3, SIZE, SIZE) and label == ds.samples[5][1]
    sampler = ResumableSampler(len(ds), 0, 1, shuffle=True, seed=0)
    raw = PilLoader(ds, sampler, 4, 0, torch.device("cpu"), normalize=False)
    raw.set_epoch(0)
    batches = list(raw)
    assert len(batches) == 3 and all(b[0].dtype == torch.uint8 and b[0].shape == (4, 3, SIZE, SIZE) for b in batches)
    order = sampler._indices()
    assert torch.cat([y for _, y in batches]).tolist() == [ds.samples[i][1] for i in order]
    assert torch.equal(batches[0][0][0], ds[(0, order[0])][0])
    # normalised on the device (here the CPU): the float path's values, in the trainer's format
    norm = PilLoader(ds, ResumableSampler(len(ds), 0, 1, shuffle=True, seed=0), 4, 0, torch.device("cpu"),
                     channels_last=True)
    norm.set_epoch(0)
    x, y = next(iter(norm))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.is_contiguous(memory_format=torch.channels_last)
    floats = ImageFolder(jpegs, SIZE, train=True, uint8=False)
    expect = torch.stack([floats[(0, i)][0] for i in order[:4]])
    assert torch.allclose(x, expect, atol=1e-5)
    assert torch.allclose(x, (batches[0][0].float() / 255 - MEAN) / STD, atol=1e-5)


def test_persistent_workers_keep_the_seeded_order_and_augmentation(jpegs):
    """Workers made once serve three epochs (and a loader resumed mid-epoch) exactly what indexing the dataset
    with (epoch, index) in the sampler's order gives, and the same worker processes serve every epoch."""
    ds = ImageFolder(jpegs, SIZE, train=True, uint8=True)

    def loader(workers):
        return PilLoader(ds, ResumableSampler(len(ds), 0, 1, shuffle=True, seed=3), 4, workers,
                         torch.device("cpu"), normalize=False, limit=8)  # 2 steps an epoch, 4 images left over

    persistent = loader(2)
    got = _epochs(persistent, [0, 1, 2])
    pids = [w.pid for w in persistent.loader._iterator._workers]
    _epochs(persistent, [3])
    assert [w.pid for w in persistent.loader._iterator._workers] == pids and len(pids) == 2
    for e, batches in enumerate(got):
        order = ResumableSampler(len(ds), 0, 1, shuffle=True, seed=3)
        order.set_epoch(e)
        idx = order._indices()[:8]
        assert torch.cat([y for _, y in batches]).tolist() == [ds.samples[i][1] for i in idx]
        expect = torch.stack([load_image(ds.samples[i][0], SIZE, True, data._sample_generator(0, e, i)) for i in idx])
        assert torch.equal(torch.cat([x for x, _ in batches]), expect), f"epoch {e}"
    assert not torch.equal(got[0][0][0], got[1][0][0])  # another epoch, another order and augmentation
    resumed = _epochs(loader(2), [1, 2], start=4)  # a run resumed after epoch 1's first step
    assert len(resumed[0]) == 1 and torch.equal(resumed[0][0][0], got[1][1][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed[1], got[2]))


def test_draft_decoding_takes_the_same_region_as_full_decoding(tmp_path, monkeypatch):
    """A 512x384 JPEG cropped to 24x24: most random crops allow a 1/2-1/8 scale decode; the pixels match the full
    decode within interpolation differences, far closer than a crop of a neighbouring region would."""
    from PIL import Image, JpegImagePlugin

    path = tmp_path / "big.jpg"
    Image.fromarray(jpeg_set.make_image(0, 1, 512, 384, noise=0)).save(path, quality=95)
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = draft(self, mode, size)
        scales.append(512 / out[1][2])
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for k in range(20):
        for train in (True, False):
            gen = data._sample_generator(0, 0, k)
            full = load_image(path, SIZE, train, gen, draft=False).float()
            gen = data._sample_generator(0, 0, k)
            fast = load_image(path, SIZE, train, gen).float()
            assert (fast - full).abs().mean() < 1.5, (k, train)  # levels out of 255 (measured: <= 0.5)
            assert (fast - full).abs().max() < 12, (k, train)  # (measured: <= 4)
    assert len(scales) >= 25 and max(scales) == 8  # the draft was taken, down to 1/8
    # the comparison's sensitivity: the same crop shifted by 1/8 of its width differs far more
    gen = data._sample_generator(0, 0, 0)
    left, top, right, bottom = data.random_resized_crop_box(512, 384, gen)
    flip = bool(torch.rand((), generator=gen) < 0.5)
    dx = (right - left) / 8
    with Image.open(path) as img:
        shifted = img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR, box=(left + dx, top, right + dx, bottom))
    shifted = torch.from_numpy(np.array(shifted)).permute(2, 0, 1).float()
    full = load_image(path, SIZE, True, data._sample_generator(0, 0, 0), draft=False).float()
    assert (full.flip(-1) if flip else full).sub(shifted).abs().mean() > 6


def test_the_crop_boxes_give_the_crop_functions_pixels(jpegs):
    """Full-scale decoding: the training crop is ``random_resized_crop``'s, bit for bit; the evaluation crop is
    ``center_crop``'s within one level (a fractional box)."""
    from PIL import Image

    for path, _ in ImageFolder(jpegs, SIZE, train=True).samples[:6]:
        with Image.open(path) as img:
            img = img.convert("RGB")
            rrc = np.array(data.random_resized_crop(img, SIZE, data._sample_generator(0, 2, 7)))
            cc = np.array(data.center_crop(img, SIZE)).astype(int)
        gen = data._sample_generator(0, 2, 7)
        x = load_image(path, SIZE, True, gen, draft=False).permute(1, 2, 0).numpy()
        gen = data._sample_generator(0, 2, 7)
        data.random_resized_crop_box(64, 48, gen)
        assert (x == (rrc[:, ::-1] if torch.rand((), generator=gen) < 0.5 else rrc)).all()
        y = load_image(path, SIZE, False, gen, draft=False).permute(1, 2, 0).numpy().astype(int)
        assert abs(y - cc).max() <= 1


def _folder(root, per_class):
    for split, n in (("train", per_class), ("val", 1)):
        jpeg_set.make_jpegs(root / split, images=3 * n, classes=3, width=40, height=32)
    return root


def _trainer_args(data_dir, ckpt, *extra):
    return ["--data", str(data_dir), "--arch", "resnet_tiny", "--opt", "sgd", "--image-size", "16", "--epochs", "2",
            "--global-batch", "4", "--lr", "0.05", "--amp", "none", "--ckpt-dir", str(ckpt), "--print-every", "1",
            "--loader", "pil", *extra]


def _assert_same_weights(run_a, run_b) -> None:
    a = torch.load(run_a / "last.pt", weights_only=True)
    b = torch.load(run_b / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_the_trainer_with_persistent_workers_resumes_bit_exact(tmp_path):
    """Two epochs of 3 steps without workers, and the same run on 2 persistent workers stopped after step 2 and
    resumed: the same weights, bit for bit (the data does not depend on the number of workers)."""
    root = _folder(tmp_path / "data", 4)
    whole = train_imagenet.main(_trainer_args(root, tmp_path / "a", "--workers", "0"))
    stopped = train_imagenet.main(_trainer_args(root, tmp_path / "b", "--workers", "2", "--max-steps", "2"))
    assert stopped["stopped"] and stopped["steps"] == 2
    resumed = train_imagenet.main(_trainer_args(root, tmp_path / "b", "--workers", "2", "--resume"))
    assert whole["steps"] == resumed["steps"] == 6
    _assert_same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, "
                    "the 'dali' extra): the dali loader is untested here")
def test_the_trainer_with_dali_resumes_to_the_same_weights(tmp_path):
    """--loader dali on DALI's CPU operators: a run stopped after step 2 and resumed ends with the uninterrupted
    run's weights (the crop regions and flips come from (seed, epoch, index), not from DALI's generator)."""
    root = _folder(tmp_path / "data", 4)
    train_imagenet.main(_trainer_args(root, tmp_path / "a", "--loader", "dali", "--workers", "1"))
    train_imagenet.main(_trainer_args(root, tmp_path / "b", "--loader", "dali", "--workers", "1", "--max-steps", "2"))
    resumed = train_imagenet.main(_trainer_args(root, tmp_path / "b", "--loader", "dali", "--workers", "1",
                                                "--resume"))
    assert resumed["steps"] == 6 and not resumed["stopped"]
    _assert_same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, "
                    "the 'dali' extra): the dali loader is untested here")
def test_dali_on_its_cpu_operators_has_the_pil_contract(jpegs):
    from benchmarks.input_pipeline import DaliLoader

    for train in (True, False):
        ds = ImageFolder(jpegs, SIZE, train=train, uint8=True)
        pil = PilLoader(ds, ResumableSampler(len(ds), 0, 1, shuffle=train, seed=1), 4, 0, torch.device("cpu"),
                        limit=8)
        dali = DaliLoader(ds, ResumableSampler(len(ds), 0, 1, shuffle=train, seed=1), 4, None, threads=1, limit=8,
                          channels_last=train)
        for start in (0, 4):  # an epoch, and one resumed after its first step
            a, b = _epochs(pil, [1], start)[0], _epochs(dali, [1], start)[0]
            assert len(a) == len(b) == (8 - start) // 4
            for (xa, ya), (xb, yb) in zip(a, b):
                assert xb.dtype == xa.dtype == torch.float32 and xb.shape == xa.shape == (4, 3, SIZE, SIZE)
                assert yb.dtype == torch.int64 and torch.equal(ya, yb)
                assert xb.is_contiguous(memory_format=torch.channels_last if train else torch.contiguous_format)
                # the same region and flip; another decoder and resampler (normalised units: 1 = ~57 levels)
                assert (xa - xb).abs().mean() < 0.06, (train, start)  # measured <= 0.035; flips inverted: 0.49


def test_the_benchmark_prints_and_writes_its_numbers(jpegs, tmp_path, capsys):
    out = input_pipeline.main(["--data", str(jpegs), "--workers", "1", "--images", "16", "--warmup", "4", "--batch",
                               "4", "--image-size", str(SIZE), "--node-rate", "1000", "--json",
                               str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    best = saved["best"]
    assert best["images"] >= 16 and best["images_per_s"] > 0 and best["images_per_s_per_core"] == best["images_per_s"]
    assert saved["cores_needed"] == pytest.approx(1000 / best["images_per_s_per_core"])
    assert saved["versions"]["PIL"] and saved["commit"] and saved["machine"]["cores"] and out["jpegs"] == 12
    assert f"needs {saved['cores_needed']:.0f} cores" in printed and "per core" in printed


def test_the_jpeg_set_is_reproducible_and_about_100_kb(tmp_path):
    a = jpeg_set.make_jpegs(tmp_path / "a", images=2, classes=2)
    b = jpeg_set.make_jpegs(tmp_path / "b", images=2, classes=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files) == 2 and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert all(80_000 < (a / f).stat().st_size < 125_000 for f in files)
    shutil.rmtree(tmp_path)
    assert sys.modules["benchmarks.jpeg_set"].WIDTH == 500


# --- images PIL decodes in other modes, and files it cannot decode --------------------------------------------------

def _whole(path, size=8) -> np.ndarray:
    """``load_image``'s evaluation crop of a ``size`` x ``size`` image at its own size: its pixels, HWC."""
    x = load_image(path, size, False, data._sample_generator(0, 0, 0), resize=size)
    return x.permute(1, 2, 0).numpy().astype(int)


def test_other_image_modes_decode_to_the_right_rgb(tmp_path):
    """16-bit greys scaled to 8 bits, CMYK converted, transparency (RGBA, LA, a palette's tRNS) composited onto
    data.BACKGROUND, 1-bit black and white; a 32-bit float image is refused naming the file."""
    from PIL import Image

    bg = np.array(getattr(data, "BACKGROUND", (124, 116, 104)))
    grey16 = np.tile(np.array([0, 257, 1000, 30000, 65535, 65535, 128 * 257, 65280], dtype=np.uint16), (8, 1))
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    got = _whole(tmp_path / "grey16.png")
    assert (got == np.round(grey16.astype(float) * 255 / 65535)[:, :, None]).all(), got[0]

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:, :4] = (200, 100, 50)
    rgb[:, 4:] = (20, 180, 240)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(_whole(tmp_path / "cmyk.jpg") - rgb).mean() < 4

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :, :3] = (200, 100, 50)
    rgba[:, :4, 3] = 0  # the left half transparent, the right half opaque, one column half-transparent
    rgba[:, 4:, 3] = 255
    rgba[:, 3, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    got = _whole(tmp_path / "rgba.png")
    assert (got[:, :3] == bg).all() and (got[:, 4:] == (200, 100, 50)).all(), got[0]
    assert np.abs(got[:, 3] - (np.array([200, 100, 50]) * 128 + bg * 127) / 255).max() <= 1

    la = np.zeros((8, 8, 2), dtype=np.uint8)
    la[:, :, 0], la[:, 4:, 1] = 90, 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    got = _whole(tmp_path / "la.png")
    assert (got[:, :4] == bg).all() and (got[:, 4:] == 90).all(), got[0]

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0])
    pal.paste(1, (4, 0, 8, 8))
    pal.save(tmp_path / "palette.png", transparency=0)  # index 0 (red) transparent
    got = _whole(tmp_path / "palette.png")
    assert (got[:, :4] == bg).all() and (got[:, 4:] == (0, 255, 0)).all(), got[0]

    bits = Image.new("1", (8, 8), 0)
    bits.paste(1, (4, 0, 8, 8))
    bits.save(tmp_path / "bits.png")
    got = _whole(tmp_path / "bits.png")
    assert (got[:, :4] == 0).all() and (got[:, 4:] == 255).all()

    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(OSError, match=rf"fastasam: {re.escape(str(tmp_path / 'float.tif'))} .*32-bit float.*Fix"):
        _whole(tmp_path / "float.tif")


def test_a_file_that_cannot_be_decoded_is_named(tmp_path):
    """A truncated JPEG, a truncated PNG and a text file named .jpg: the error names the file, in the dataset and
    through the loader's workers."""
    from PIL import Image

    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    pixels = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    for ext in ("jpg", "png"):
        Image.fromarray(pixels).save(tmp_path / f"whole.{ext}")
        whole = (tmp_path / f"whole.{ext}").read_bytes()
        (root / "a" / f"truncated.{ext}").write_bytes(whole[: len(whole) // 2])
    (root / "a" / "text.jpg").write_text("not an image\n")
    ds = ImageFolder(root, SIZE, train=True, uint8=True)
    for k, (path, _) in enumerate(ds.samples):
        with pytest.raises(OSError, match=rf"fastasam: cannot decode {re.escape(str(path))}: .*Fix"):
            ds[k]
    loader = PilLoader(ds, ResumableSampler(len(ds), 0, 1, shuffle=False), 1, 1, torch.device("cpu"))
    loader.set_epoch(0)
    with pytest.raises(OSError, match=rf"cannot decode {re.escape(str(ds.samples[0][0]))}"):
        next(iter(loader))


def test_the_dali_loader_refuses_what_it_would_decode_otherwise_naming_the_file(tmp_path):
    """--loader dali reads each file's header in Python: an unreadable header, and an image whose transparency or
    16-bit samples the pil loader converts (DALI would not, the same way), are errors naming the file."""
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    (tmp_path / "text.jpg").write_text("not an image\n")
    header = getattr(input_pipeline, "dali_header", None)
    assert header is not None, "input_pipeline.dali_header(path, data) reads (width, height)"
    assert header(tmp_path / "ok.jpg", np.fromfile(tmp_path / "ok.jpg", dtype=np.uint8)) == (8, 8)
    for name, match in (("rgba.png", "transparency"), ("grey16.png", "16-bit"), ("text.jpg", "cannot read")):
        path = tmp_path / name
        with pytest.raises(OSError, match=rf"^fastasam: .*{match}.*Fix") as err:
            header(path, np.fromfile(path, dtype=np.uint8))
        assert str(path) in str(err.value)


def test_the_benchmark_takes_the_trainers_data_root(tmp_path, monkeypatch, capsys):
    """``--data`` the trainer's root (train/ and val/): the benchmark reads its train/ and says so; a class-folder
    root is read as it is. In-process (the child's path)."""
    root = _folder(tmp_path / "data", 4)
    monkeypatch.setenv("_INPUT_PIPELINE_CHILD", "1")
    flags = ["--workers", "0", "--images", "8", "--warmup", "4", "--batch", "4", "--image-size", "16"]
    out = input_pipeline.main(["--data", str(root), *flags])
    assert out["data"] == str(root / "train") and out["jpegs"] == 12  # train/'s images only, not val/'s
    assert f"{root / 'train'} (the train/ split of the trainer's --data root {root})" in capsys.readouterr().out
    out = input_pipeline.main(["--data", str(root / "train"), *flags])
    assert out["data"] == str(root / "train") and out["jpegs"] == 12
    with pytest.raises(SystemExit):
        input_pipeline.main(["--help"])
    assert "train/" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        input_pipeline.main(["--data", str(root), "--batch", "0"])
    assert "argument --batch: " in capsys.readouterr().err
