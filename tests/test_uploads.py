"""What a warm step copies from the host to a CUDA device: only small tables (hyper-parameters after a change,
Adam's bias corrections every step), always asynchronously from page-locked memory."""

from __future__ import annotations

import pytest
import torch

import fastasam
from fastasam.backends import _multi_tensor
from tests.conftest import soup_loss


class _FakeCudaTensor:
    """Stands for a CUDA table on a machine without a GPU: records what is copied into it."""

    device = torch.device("cuda", 0)

    def __init__(self) -> None:
        self.copies: list[tuple[torch.Tensor, bool]] = []

    def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> None:
        self.copies.append((src.clone(), non_blocking, getattr(src, "_pinned_for_test", False)))


def test_upload_to_cuda_copies_asynchronously_from_pinned_memory(monkeypatch):
    def pin_memory(self: torch.Tensor) -> torch.Tensor:
        out = self.clone()
        out._pinned_for_test = True
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    dst = _FakeCudaTensor()
    host = torch.tensor([1.0, 2.0])
    _multi_tensor._upload(dst, host, "hyper-parameters")
    host.fill_(7.0)  # the caller may change its table right after: the copy reads a pinned snapshot
    src, non_blocking, pinned = dst.copies[-1]
    assert pinned and non_blocking and src.tolist() == [1.0, 2.0]
    made_pinned = torch.tensor([3.0])
    _multi_tensor._upload(dst, made_pinned, "hyper-parameters", pinned=True)  # already pinned: no second copy
    src, non_blocking, pinned = dst.copies[-1]
    assert non_blocking and not pinned and src.tolist() == [3.0]


def test_upload_refuses_a_change_during_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    dst = _FakeCudaTensor()
    with pytest.raises(RuntimeError, match="hyper-parameters changed while a CUDA graph is being captured"):
        _multi_tensor._upload(dst, torch.zeros(2), "hyper-parameters")
    assert not dst.copies


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("base", [torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_warm_steps_copy_only_from_pinned_memory_on_the_gpu(monkeypatch, backend, base):
    if backend not in fastasam.available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (300, 7)]
    opt = fastasam.ASAM(params, base, lr=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # a new lr every step: SGD re-uploads

    def step() -> None:
        soup_loss(params).backward()
        opt.first_step(zero_grad=True)
        soup_loss(params).backward()
        opt.second_step(zero_grad=True)
        sched.step()

    for _ in range(2):
        step()
    copies = []
    real = torch.Tensor.copy_

    def spy(self, src, non_blocking=False):
        if self.is_cuda and src.device.type == "cpu":
            copies.append((src.is_pinned(), non_blocking))
        return real(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    for _ in range(3):
        step()
    monkeypatch.undo()
    assert copies, "the hyper-parameters changed every step, so some table was uploaded"
    assert all(pinned and non_blocking for pinned, non_blocking in copies), copies
