"""Hugging Face: ``fastasam.hf.SAMTrainer`` under ``transformers.Trainer`` and the ``accelerate`` recipe, on a tiny
BERT built from a config (nothing downloaded), each against the plain two-pass loop on the same batches."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import fastasam  # noqa: E402
from fastasam.hf import SAMTrainer, unwrap  # noqa: E402

RHO, LR, STEPS, BATCH = 0.5, 1e-2, 4, 4


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = STEPS * BATCH) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 50, (n, 8), generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Recording(SAMTrainer):
    """Keeps each step's batch, so the plain loop can replay the Trainer's (shuffled) order."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
                lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=3, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def plain_loop(model, batches, clip: float) -> list[torch.Tensor]:
    """The two passes by hand with the linear schedule the Trainer uses, on the Trainer's batches."""
    opt = fastasam.ASAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (STEPS - s) / STEPS))
    model.train()
    for inputs in batches:
        model(**inputs).loss.backward()
        opt.first_step(zero_grad=True)
        model(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True)
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_sam_trainer_equals_the_two_pass_loop(tmp_path, how):
    """Same weights after 4 steps as the plain loop (Trainer's clipping of the second pass's gradient and its linear
    schedule included), the schedule reached the fastasam optimizer, and the Trainer logged the first pass's loss."""
    model = tiny_bert()
    start = copy.deepcopy(model)
    if how == "optimizers":
        kw = {"optimizers": (fastasam.ASAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=LR, weight_decay=0.0),
                             None)}
    else:
        kw = {"optimizer_cls_and_kwargs": (fastasam.ASAM, {"base_optimizer": torch.optim.AdamW, "rho": RHO,
                                                           "lr": LR})}
    trainer = Recording(model=model, args=args(tmp_path), train_dataset=Rows(), **kw)
    trainer.batches = []
    trainer.train()
    assert len(trainer.batches) == STEPS
    opt = unwrap(trainer.optimizer)
    assert isinstance(opt, fastasam.ASAM) and not opt.perturbed
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the linear schedule ran to its end
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    want = plain_loop(start, trainer.batches, clip=1.0)
    for a, b in zip(model.parameters(), want):
        torch.testing.assert_close(a.detach(), b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(next(start.parameters()), next(tiny_bert().parameters()))  # the weights moved


def test_sam_trainer_in_bf16_trains(tmp_path):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    opt = fastasam.ASAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=LR)
    trainer = SAMTrainer(model=model, args=args(tmp_path, bf16=True), train_dataset=Rows(), optimizers=(opt, None))
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_sam_trainer_refuses_gradient_accumulation_and_plain_optimizers(tmp_path):
    model = tiny_bert()
    opt = fastasam.ASAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=LR)
    trainer = SAMTrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=2, max_steps=1),
                         train_dataset=Rows(), optimizers=(opt, None))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        trainer.train()
    trainer = SAMTrainer(model=tiny_bert(), args=args(tmp_path, max_steps=1), train_dataset=Rows())
    with pytest.raises(TypeError, match="not .* a fastasam optimizer"):
        trainer.train()


def test_accelerate_recipe_equals_the_two_pass_loop():
    """The module docstring's accelerate loop: prepare, backward, unwrap(opt).first_step, backward, opt.step()."""
    model, start = tiny_bert(), None
    start = copy.deepcopy(model)
    data = Rows()
    batches = [{k: v[i:i + BATCH] for k, v in (("input_ids", data.ids), ("labels", data.labels))}
               for i in range(0, len(data), BATCH)]
    accelerator = accelerate.Accelerator(cpu=True)
    opt = fastasam.ASAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=LR, weight_decay=0.0)
    model, opt = accelerator.prepare(model, opt)
    for inputs in batches:
        accelerator.backward(model(**inputs).loss)
        unwrap(opt).first_step(zero_grad=True)
        with fastasam.frozen_batchnorm_stats(model):
            accelerator.backward(model(**inputs).loss)
        opt.step()
        opt.zero_grad()
    ref = fastasam.ASAM(start.parameters(), torch.optim.AdamW, rho=RHO, lr=LR, weight_decay=0.0)
    for inputs in batches:
        start(**inputs).loss.backward()
        ref.first_step(zero_grad=True)
        start(**inputs).loss.backward()
        ref.second_step(zero_grad=True)
    for a, b in zip(model.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_step_without_a_closure_is_the_second_step_only_after_the_first():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastasam.ASAM([p], torch.optim.SGD, lr=0.1, rho=0.5)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    opt.first_step()
    assert opt.perturbed
    opt.step()
    assert not opt.perturbed and torch.allclose(p, torch.full((3,), 0.9))


def test_msam_under_the_trainer_is_the_plain_loop_and_evaluates_unperturbed(tmp_path):
    """fastasam.MSAM in SAMTrainer: the Trainer's own one-pass training step (clipping and the linear schedule
    included), the plain MSAM loop's weights, and evaluate() at the unperturbed weights."""
    model = tiny_bert()
    start = copy.deepcopy(model)
    opt = fastasam.MSAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=LR, weight_decay=0.0)
    trainer = Recording(model=model, args=args(tmp_path), train_dataset=Rows(), eval_dataset=Rows(),
                        optimizers=(opt, None))
    trainer.batches = []
    trainer.train()
    ref = fastasam.MSAM(start.parameters(), torch.optim.AdamW, rho=RHO, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: max(0.0, (STEPS - s) / STEPS))
    start.train()
    for inputs in trainer.batches:
        start(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(start.parameters(), 1.0)
        ref.step()
        ref.zero_grad()
        sched.step()
    for a, b in zip(model.parameters(), start.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)
    seen = []
    hook = model.bert.embeddings.word_embeddings.register_forward_hook(
        lambda m, i, o: seen.append(m.weight.detach().clone()))
    trainer.evaluate()
    hook.remove()
    with ref.unperturbed():
        want = start.bert.embeddings.word_embeddings.weight.detach().clone()
    torch.testing.assert_close(seen[0], want, atol=1e-6, rtol=1e-5)
    assert not torch.equal(seen[0], model.bert.embeddings.word_embeddings.weight)  # back at w~ after it


def test_bsam_under_the_trainer_is_the_two_pass_loop_and_evaluates_at_its_mean(tmp_path):
    """fastasam.BSAM in SAMTrainer: its two passes (clipping and the linear schedule included) give the plain
    loop's weights, and evaluate() runs at the mean, leaving the noisy point in place after."""
    model = tiny_bert()
    start = copy.deepcopy(model)

    def make(m):
        return fastasam.BSAM(m.parameters(), num_data=len(Rows()), lr=LR, rho=0.01, backend="foreach", seed=5)

    trainer = Recording(model=model, args=args(tmp_path), train_dataset=Rows(), eval_dataset=Rows(),
                        optimizers=(make(model), None))
    trainer.batches = []
    trainer.train()
    ref = make(start)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: max(0.0, (STEPS - s) / STEPS))
    start.train()
    for inputs in trainer.batches:
        start(**inputs).loss.backward()
        ref.first_step(zero_grad=True)
        start(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(start.parameters(), 1.0)
        ref.second_step(zero_grad=True)
        sched.step()
    for a, b in zip(model.parameters(), start.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)
    seen = []
    hook = model.bert.embeddings.word_embeddings.register_forward_hook(
        lambda m, i, o: seen.append(m.weight.detach().clone()))
    trainer.evaluate()
    hook.remove()
    with ref.unperturbed():
        want = start.bert.embeddings.word_embeddings.weight.detach().clone()
    torch.testing.assert_close(seen[0], want, atol=1e-6, rtol=1e-5)
    assert not torch.equal(seen[0], model.bert.embeddings.word_embeddings.weight)  # back at w + noise after it
