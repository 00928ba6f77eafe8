"""QGaLoreOptimizer inside ``transformers.Trainer(optimizers=(opt, scheduler))`` (issue 4, Must-have 8).

Trainer calls ``optimizer.step()`` every ``gradient_accumulation_steps`` backward passes and ``model.zero_grad()``
after it, and clips ``model.parameters()`` itself. The tests check that a Trainer run is *the same run* as the
plain loop (weights bit for bit, clipping active — so it happened exactly once, by the global norm), that it
trains, and that the settings which would silently break it are refused.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import SequentialSampler

pytest.importorskip("accelerate")  # transformers.Trainer needs it (the [test] extra installs it)
from helpers import tiny_llama, token_batches, train  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from qgalore_dist import QGaLoreConfig, QGaLoreOptimizer, quantize_model  # noqa: E402
from qgalore_dist.train.hf_trainer import check_trainer_args, optimizer_for_trainer  # noqa: E402

ACCUM, STEPS, BATCH = 2, 4, 2


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def int8_model():
    model = tiny_llama(seed=0)
    quantize_model(model, group_size=32, seed=0)
    return model


def config() -> QGaLoreConfig:
    # gap 3 over 4 steps: refreshes at step 0 and inside the run, so the first-micro-batch refresh path runs too
    return QGaLoreConfig(rank=8, update_proj_gap=3, scale=0.25, lr=0.01, weight_group_size=32, state_min_numel=0,
                         state_block_size=32)


def training_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                max_steps=STEPS, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


class InOrderTrainer(Trainer):
    """Batches in dataset order, so the plain loop can be fed the very same micro-batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def snapshot(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: v.clone() for k, v in sd.items()}


def test_trainer_run_equals_the_plain_loop_with_clipping_once(tmp_path):
    micro = token_batches(STEPS * ACCUM, batch=BATCH, seq=16, seed=3)
    # reference: the plain loop (tests/helpers.train), clip 0.05 so clipping is active on every step
    ref_model = int8_model()
    ref_opt = QGaLoreOptimizer(ref_model, config(), dense_state_bits=8, layerwise=True, grad_accum=ACCUM,
                               grad_clip=0.05, stagger_refresh=True)
    norms = []
    step = ref_opt.step
    ref_opt.step = lambda *a, **k: (step(*a, **k), norms.append(ref_opt.last_step.grad_norm))  # noqa: E731
    train(ref_model, ref_opt, micro, accum=ACCUM)
    assert len(norms) == STEPS and min(norms) > 0.05  # the clip really acted

    model = int8_model()
    args = training_args(tmp_path, max_grad_norm=0.05)
    opt = optimizer_for_trainer(model, config(), args)
    assert opt.grad_clip == 0.05 and opt.grad_accum == ACCUM and args.max_grad_norm == 0.0
    check_trainer_args(args, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    data = [{"input_ids": row, "labels": row} for x in micro for row in x]
    trainer = InOrderTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    # the plain loop divides each micro-batch's mean loss by ACCUM; Trainer does the same unless the model takes
    # num_items_in_batch (then it sums token losses over the window), which rounds differently
    trainer.model_accepts_loss_kwargs = False
    trainer.train()

    assert trainer.state.global_step == STEPS
    assert opt.svd_count == ref_opt.svd_count > len(opt.matrices)  # step-0 refreshes and later ones
    ref, got = snapshot(ref_model), snapshot(model)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_trainer_trains_an_int8_model(tmp_path):
    model = int8_model()
    before = snapshot(model)
    args = training_args(tmp_path, max_steps=12, max_grad_norm=1.0)
    opt = optimizer_for_trainer(model, config().replace(update_proj_gap=4), args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    data = [{"input_ids": row, "labels": row} for x in token_batches(64, batch=1, seq=16, seed=5) for row in x]
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    after = snapshot(model)
    codes = [k for k in after if k.endswith("weight_codes")]
    assert codes and all(not torch.equal(before[k], after[k]) for k in codes)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_settings_that_would_break_silently_are_refused(tmp_path):
    model = int8_model()
    # Trainer's default max_grad_norm=1.0 would clip the dense gradients by a partial norm
    opt = QGaLoreOptimizer(model, config(), layerwise=True, grad_accum=ACCUM, grad_clip=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        check_trainer_args(training_args(tmp_path), opt)
    # grad_accum=1 without clipping steps inside backward: accumulation would become extra steps
    in_bwd = QGaLoreOptimizer(int8_model(), config(), layerwise=True, grad_accum=1)
    assert in_bwd.in_backward
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        check_trainer_args(training_args(tmp_path, max_grad_norm=0.0), in_bwd)
    # ... and at run time, a second backward before step() raises instead of stepping twice
    m2 = int8_model()
    opt2 = QGaLoreOptimizer(m2, config(), layerwise=True, grad_accum=1)
    x = token_batches(1, seed=9)[0]
    m2(input_ids=x, labels=x).loss.backward()
    with pytest.raises(RuntimeError, match="second backward pass before optimizer.step"):
        m2(input_ids=x, labels=x).loss.backward()
    opt2.zero_grad()
    opt2.step()  # a step resets the check
    m2(input_ids=x, labels=x).loss.backward()
