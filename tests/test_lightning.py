"""fastasam under PyTorch Lightning (CPU): every recipe of the README's "PyTorch Lightning" section, step by step
against the plain two-pass loop on the same data, and the configurations that cannot work, shown failing.

Each Trainer run is a few steps of a seeded MLP with BatchNorm; "the same" means bit-identical parameters and
BatchNorm buffers after every step (both sides run the same ops in the same order), unless a test says otherwise.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from torch import nn  # noqa: E402

import fastasam  # noqa: E402
from fastasam.lightning import is_second_pass, manual_step, second_pass_frozen_batchnorm  # noqa: E402

BACKENDS = ["reference", "foreach"]
BATCH, STEPS_PER_EPOCH, EPOCHS = 4, 3, 2
LR, GAMMA = 0.1, 0.7
Snapshot = dict[str, torch.Tensor]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n = BATCH * STEPS_PER_EPOCH
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


X, Y = _data()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X[i:i + BATCH], Y[i:i + BATCH]) for i in range(0, len(X), BATCH)]


def _initial_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


INIT = _initial_net()


def _snapshot(net: nn.Module) -> Snapshot:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _optimizer(params: Any, backend: str) -> fastasam.ASAM:
    return fastasam.ASAM(params, torch.optim.SGD, lr=LR, momentum=0.9, weight_decay=5e-4, rho=0.5, backend=backend)


def _scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=GAMMA)


def _warmup_lr(step: int, warmup: int) -> float:
    return LR * min(1.0, (step + 1) / warmup)


def plain_loop(backend: str = "foreach", *, interval: str = "step", freeze: bool = True, epochs: int = EPOCHS,
               autocast: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               clip: float | None = None, clip_first: bool = True, warmup: int = 0) -> dict[str, list]:
    """The README's two-pass loop: what every Lightning run below must reproduce. Returns per-step snapshots, both
    passes' losses and the learning rate each step ran with. ``clip``: clip the gradients' norm to it after the
    second backward, and after the first too with ``clip_first``. ``warmup``: set the learning rate to
    ``_warmup_lr(step, warmup)`` before each step."""
    net = copy.deepcopy(INIT).train()
    opt = _optimizer(net.parameters(), backend)
    sched = _scheduler(opt)
    out: dict[str, list] = {"snapshots": [], "first": [], "second": [], "lr": []}

    def loss_of(x: torch.Tensor, y: torch.Tensor, clip: float | None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=autocast) if autocast is not None else nullcontext():
            loss = F.cross_entropy(net(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        return loss.detach()

    step = 0
    for _ in range(epochs):
        for x, y in _batches():
            if warmup:
                for group in opt.param_groups:
                    group["lr"] = _warmup_lr(step, warmup)
            step += 1
            out["lr"].append(opt.param_groups[0]["lr"])
            out["first"].append(loss_of(x, y, clip if clip_first else None))
            opt.first_step(zero_grad=True)
            with fastasam.frozen_batchnorm_stats(net) if freeze else nullcontext():
                out["second"].append(loss_of(x, y, clip))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            else:
                opt.second_step(zero_grad=True)
            if interval == "step":
                sched.step()
            out["snapshots"].append(_snapshot(net))
        if interval == "epoch":
            sched.step()
    return out


class Net(L.LightningModule):
    """The README's recipes. ``mode``: "auto" (automatic optimisation), "manual" (``manual_step``), "explicit"
    (manual optimisation calling ``first_step``/``second_step`` on ``self.optimizers()``)."""

    def __init__(self, backend: str = "foreach", *, mode: str = "auto", interval: str = "step",
                 freeze: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = mode == "auto"
        self.net = copy.deepcopy(INIT)
        self.backend, self.mode, self.interval, self.freeze = backend, mode, interval, freeze
        self.snapshots: list[Snapshot] = []
        self.outputs: list[Any] = []
        self.passes: list[bool] = []
        self.lrs: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self.mode == "auto":  # the README's automatic-optimisation recipe
            self.passes.append(is_second_pass(self))
            if not is_second_pass(self):
                self.lrs.append(self.optimizers().param_groups[0]["lr"])
            with second_pass_frozen_batchnorm(self) if self.freeze else nullcontext():
                loss = self.loss(batch)
            if not is_second_pass(self):
                self.log("train_loss", loss)
            return loss
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        if self.mode == "manual":  # the README's manual-optimisation recipe
            loss = manual_step(self, lambda: self.loss(batch), freeze_batchnorm=self.freeze)
            self.log("train_loss", loss)
        else:  # first_step/second_step by hand: right parameters, but Lightning counts no step
            opt = self.optimizers()
            self.manual_backward(self.loss(batch))
            opt.first_step(zero_grad=True)
            with fastasam.frozen_batchnorm_stats(self):
                self.manual_backward(self.loss(batch))
            opt.second_step(zero_grad=True)
        if self.interval == "step":
            self.lr_schedulers().step()
        return None

    def on_train_epoch_end(self) -> None:
        if self.mode != "auto" and self.interval == "epoch":
            self.lr_schedulers().step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.snapshots.append(_snapshot(self.net))
        self.outputs.append(outputs)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = _optimizer(self.parameters(), self.backend)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _scheduler(opt), "interval": self.interval}}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)


def fit(module: Net, epochs: int = EPOCHS, **trainer_kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, enable_checkpointing=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, **trainer_kwargs)
    trainer.fit(module)
    return trainer


def assert_same_steps(expected: list[Snapshot], got: list[Snapshot], what: str = "") -> None:
    assert len(got) == len(expected), f"{what}: {len(got)} steps, expected {len(expected)}"
    for step, (want, have) in enumerate(zip(expected, got)):
        for key in want:
            assert torch.equal(want[key], have[key]), (
                f"{what}: step {step}, {key} differs by {(want[key].float() - have[key].float()).abs().max():.3g}")


# --- automatic optimisation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_automatic_optimisation_matches_plain_loop(backend: str, interval: str) -> None:
    """configure_optimizers returns an ASAM; Lightning's optimizer.step(closure) is the two-pass step, BatchNorm and
    the scheduler (either interval) included."""
    want = plain_loop(backend, interval=interval)
    module = Net(backend, interval=interval)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module)
    assert_same_steps(want["snapshots"], module.snapshots, f"automatic, {backend}, {interval}")
    steps = EPOCHS * STEPS_PER_EPOCH
    assert module.passes == [False, True] * steps  # training_step runs twice per step, then at w + e
    assert trainer.global_step == steps
    assert module.lrs == pytest.approx(want["lr"])
    # logged from the first pass only; the step outputs Lightning keeps are the second pass's
    assert torch.equal(trainer.callback_metrics["train_loss"], want["first"][-1])
    assert all(torch.equal(out["loss"], loss) for out, loss in zip(module.outputs, want["second"]))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_automatic_with_optimizer_step_override() -> None:
    """An optimizer_step override (here Lightning's learning-rate warm-up example) works as long as it passes the
    closure to optimizer.step, which then runs both passes."""

    class WarmUp(Net):
        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
            for group in optimizer.param_groups:
                group["lr"] = _warmup_lr(self.trainer.global_step, 4)
            optimizer.step(closure=optimizer_closure)

    want = plain_loop(warmup=4)
    module = WarmUp()
    fit(module)
    assert module.lrs == pytest.approx(want["lr"])
    assert module.lrs[0] == pytest.approx(LR / 4)
    assert_same_steps(want["snapshots"], module.snapshots, "optimizer_step override")


def test_automatic_without_batchnorm_helper_counts_both_passes() -> None:
    """Without second_pass_frozen_batchnorm the running statistics move on both passes, like the plain loop without
    frozen_batchnorm_stats; the helper is what keeps them to the first pass."""
    module = Net(freeze=False)
    fit(module, epochs=1)
    assert_same_steps(plain_loop(freeze=False, epochs=1)["snapshots"], module.snapshots, "no helper")
    assert module.net[1].num_batches_tracked.item() == 2 * STEPS_PER_EPOCH


def test_automatic_gradient_clipping_by_norm() -> None:
    """Lightning clips after every closure call, so both passes' gradients. Norm clipping rescales the first pass's
    gradient as a whole, which the perturbation rho * g / ||g|| does not see: the run equals the loop that clips both
    passes exactly, and the usual loop that clips only the descent's gradients up to rounding."""
    module = Net()
    fit(module, epochs=1, gradient_clip_val=0.05)
    assert_same_steps(plain_loop(epochs=1, clip=0.05)["snapshots"], module.snapshots, "clip by norm")
    second_only = plain_loop(epochs=1, clip=0.05, clip_first=False)
    unclipped = plain_loop(epochs=1)["snapshots"][-1]["0.weight"]
    assert (unclipped - module.snapshots[-1]["0.weight"]).abs().max() > 1e-3  # the clipping bites
    for want, got in zip(second_only["snapshots"], module.snapshots):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_automatic_gradient_accumulation_is_refused() -> None:
    """accumulate_grad_batches=3 cannot give SAM: Lightning steps after the last micro-batch, so the ascent would use
    the accumulated gradient but the second pass rerun only that last micro-batch at w + e. optimizer.step(closure)
    finds the earlier micro-batches' gradients in .grad from Lightning's closure and refuses them with the fix (the
    community sam.py's loop, a backward and then step(closure) on one batch, is taken as its first pass)."""
    with pytest.raises(RuntimeError, match=r"automatic optimization called step\(closure\) with gradients"
                                           r".*accumulate_grad_batches"):
        fit(Net(freeze=False), epochs=1, accumulate_grad_batches=3)


def test_automatic_with_fp16_gradscaler_raises() -> None:
    """Under a GradScaler Lightning runs the closure itself once, then scaler.step(optimizer): the ascent never
    runs, and fastasam refuses the descent. fp16 needs manual optimisation (manual_step)."""
    with pytest.raises(RuntimeError, match=r"second_step\(\) called without a first_step\(\)"):
        fit(Net(), epochs=1, plugins=[MixedPrecision("16-mixed", "cpu")])


# --- manual optimisation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_step_matches_plain_loop(backend: str, interval: str) -> None:
    """manual_step: both passes with manual_backward, BatchNorm frozen on the second, the scheduler stepped by hand
    per step or per epoch; Lightning counts every step and the scheduler sees optimizer.step() first."""
    want = plain_loop(backend, interval=interval)
    module = Net(backend, mode="manual", interval=interval)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module)
    assert_same_steps(want["snapshots"], module.snapshots, f"manual, {backend}, {interval}")
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    assert module.lrs == pytest.approx(want["lr"])
    assert torch.equal(trainer.callback_metrics["train_loss"], want["first"][-1])
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_manual_explicit_passes_train_but_count_no_step() -> None:
    """first_step/second_step called on self.optimizers() give the same parameters, but bypass the
    LightningOptimizer's step: trainer.global_step stays 0 (max_steps, step-based logging and checkpointing never
    advance) and the scheduler warns that it stepped first. Hence manual_step."""
    module = Net(mode="explicit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module)
    assert_same_steps(plain_loop()["snapshots"], module.snapshots, "explicit passes")
    assert trainer.global_step == 0
    assert [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_manual_step_needs_the_sharpness_optimizer() -> None:
    class Plain(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    with pytest.raises(TypeError, match="expected a fastasam.ASAM or fastasam.SAM optimizer, got SGD"):
        fit(Plain(mode="manual"), epochs=1)


# --- precision --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_bf16_mixed_matches_autocast_loop(mode: str) -> None:
    """precision="bf16-mixed" runs the forward passes under torch.autocast("cpu", torch.bfloat16) with fp32
    parameters and no scaler: the plain loop under the same autocast runs the same ops in the same order, so the
    steps are bit-identical (no tolerance needed), and the parameters stay fp32."""
    want = plain_loop(autocast=torch.bfloat16, epochs=1)
    module = Net(mode=mode)
    trainer = fit(module, epochs=1, precision="bf16-mixed")
    assert trainer.precision_plugin.precision == "bf16-mixed"
    assert_same_steps(want["snapshots"], module.snapshots, f"bf16-mixed, {mode}")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert want["first"][0].dtype == torch.float32  # cross_entropy autocasts to fp32; the bf16 ran in the Linear layers


def test_fp16_mixed_flag_on_cpu_becomes_bf16() -> None:
    """Trainer(accelerator="cpu", precision="16-mixed") warns and runs bf16-mixed: Lightning gives fp16 AMP no CPU
    path through the flag (the README says so)."""
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        trainer = L.Trainer(accelerator="cpu", devices=1, precision="16-mixed", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision_plugin.precision == "bf16-mixed"
    assert getattr(trainer.precision_plugin, "scaler", None) is None


def test_fp16_gradscaler_manual_step_matches_plain_loop() -> None:
    """fp16 AMP with a GradScaler, on CPU through an explicit MixedPrecision("16-mixed", "cpu") plugin (torch's CPU
    autocast and GradScaler support fp16): manual_step runs both passes inside the closure Lightning calls, and
    scaler.step(optimizer) does the restore and the unscaled descent. Equal to the README's GradScaler loop."""
    scaler = torch.amp.GradScaler("cpu")
    want = plain_loop(autocast=torch.float16, scaler=scaler, epochs=1)
    module = Net(mode="manual")
    trainer = fit(module, epochs=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert trainer.global_step == STEPS_PER_EPOCH
    assert_same_steps(want["snapshots"], module.snapshots, "fp16 GradScaler")
    assert trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()
    assert not torch.equal(module.net[0].weight, INIT[0].weight)  # no overflow skipped every step: it trained


# --- packaging --------------------------------------------------------------------------------------------------


def test_core_and_helpers_import_without_lightning() -> None:
    """fastasam and fastasam.lightning import with Lightning blocked: the extra stays optional."""
    code = ("import sys\n"
            "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'): sys.modules[name] = None\n"
            "import fastasam, fastasam.lightning\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


# --- Momentum-SAM ------------------------------------------------------------------------------------------------


class MsamNet(L.LightningModule):
    """Automatic optimisation with fastasam.MSAM, as with any optimizer; records the weights each validation sees."""

    def __init__(self) -> None:
        super().__init__()
        self.net = copy.deepcopy(INIT)
        self.snapshots: list[Snapshot] = []
        self.validated: list[Snapshot] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.validated.append(_snapshot(self.net))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.snapshots.append(_snapshot(self.net))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return fastasam.MSAM(self.parameters(), torch.optim.SGD, rho=0.3, lr=LR, momentum=0.9, backend="foreach")

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)


def test_msam_under_automatic_optimisation_is_the_plain_loop_and_validates_unperturbed() -> None:
    """Lightning's automatic optimisation steps fastasam.MSAM as the plain one-pass loop does, and with
    fastasam.lightning.unperturbed_evaluation() every validation sees the unperturbed weights."""
    from fastasam.lightning import unperturbed_evaluation

    net = copy.deepcopy(INIT)
    opt = fastasam.MSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=LR, momentum=0.9, backend="foreach")
    want, want_unperturbed = [], []
    for _ in range(EPOCHS):
        for x, y in _batches():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            want.append(_snapshot(net))
        with opt.unperturbed():
            want_unperturbed.append(_snapshot(net))
    module = MsamNet()
    fit(module, callbacks=[unperturbed_evaluation()], num_sanity_val_steps=0)
    assert_same_steps(want, module.snapshots, "MSAM, automatic")
    assert_same_steps(want_unperturbed, module.validated, "MSAM, validation weights")
    assert not torch.equal(want_unperturbed[-1]["0.weight"], want[-1]["0.weight"])


class BsamNet(MsamNet):
    """Automatic optimisation with fastasam.BSAM: Lightning's step(closure) runs both passes."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return fastasam.BSAM(self.parameters(), num_data=len(X), lr=LR, rho=0.05, backend="foreach", seed=3)


def test_bsam_under_automatic_optimisation_is_the_two_pass_loop_and_validates_at_its_mean() -> None:
    """Lightning's automatic optimisation steps fastasam.BSAM as its two-pass loop does (the closure at w + noise,
    then at the ascent), and with unperturbed_evaluation() every validation sees the mean."""
    from fastasam.lightning import unperturbed_evaluation

    net = copy.deepcopy(INIT)
    opt = fastasam.BSAM(net.parameters(), num_data=len(X), lr=LR, rho=0.05, backend="foreach", seed=3)
    want, want_mean = [], []
    for _ in range(EPOCHS):
        for x, y in _batches():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(net(x), y).backward()
            opt.second_step()
            want.append(_snapshot(net))
        with opt.unperturbed():
            want_mean.append(_snapshot(net))
    module = BsamNet()
    fit(module, callbacks=[unperturbed_evaluation()], num_sanity_val_steps=0)
    assert_same_steps(want, module.snapshots, "BSAM, automatic")
    assert_same_steps(want_mean, module.validated, "BSAM, validation weights")
    assert not torch.equal(want_mean[-1]["0.weight"], want[-1]["0.weight"])
