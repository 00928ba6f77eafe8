"""Q-GaLore inside ``transformers.Trainer`` and TRL's ``SFTTrainer`` (``optimizers=(opt, scheduler)``), in one
process and under torchrun with 2 ranks and gradient accumulation 2 (issue 4 Must-have 8, issue 16 Must-have 6).

Trainer calls ``optimizer.step()`` every ``gradient_accumulation_steps`` backward passes and ``model.zero_grad()``
after it, and clips ``model.parameters()`` itself. The tests check that a Trainer run is *the same run* as the
plain loop (weights bit for bit, clipping active — so it happened exactly once, by the global norm), that it
trains, and that the settings which would silently break it are refused.

Under torchrun (one launch per module, ``tests/trainer_worker.py``; real gloo processes) Trainer wraps the model in
DDP: the tests check that DDP leaves the INT8 codes and scales to the optimizer, and that Trainer and SFTTrainer
produce the ddp engine's weights bit for bit on the same per-rank micro-batches (exact by construction: same
kernels, same order; with two ranks DDP's average and the optimizer's are the same (a + b) / 2), and the fp64
single-process reference's on the concatenated global batches (INT8 codes exactly, the rest to 1e-10, like
tests/parity/test_ddp.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import SequentialSampler

pytest.importorskip("accelerate")  # transformers.Trainer needs it (the [test] extra installs it)
import trainer_worker as TW  # noqa: E402
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


def test_trainer_deepspeed_and_fsdp_are_refused_with_a_pointer_to_qgalore_finetune(tmp_path, monkeypatch):
    for kw in ({"fsdp": True}, {"deepspeed": {"zero_optimization": {"stage": 2}}}):
        args = training_args(tmp_path, max_grad_norm=1.0, **kw)
        with pytest.raises(ValueError, match="qgalore-finetune"):
            optimizer_for_trainer(int8_model(), config(), args)
        assert args.max_grad_norm == 1.0  # refused before anything was changed
        with pytest.raises(ValueError, match="qgalore-finetune"):
            check_trainer_args(args, QGaLoreOptimizer(int8_model(), config(), layerwise=True, grad_accum=ACCUM))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch` with an FSDP config
    with pytest.raises(ValueError, match="FSDP.*qgalore-finetune"):
        optimizer_for_trainer(int8_model(), config(), training_args(tmp_path))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ValueError, match="one process"):  # options of the multi-process optimizer
        optimizer_for_trainer(int8_model(), config(), training_args(tmp_path), comm_mode="full")


# ------------------------------------------------------------------------------------------------------------
# TRL's SFTTrainer, one process
# ------------------------------------------------------------------------------------------------------------
def test_sft_trainer_one_process_equals_the_plain_loop(tmp_path):
    """SFTTrainer (TRL's tokenisation, completion-only loss, padding, gradient checkpointing) with
    optimizer_for_trainer == the same micro-batches through TRL's own loss (a second, never-trained SFTTrainer's
    training_step) with the optimizer in a plain loop: weights bit for bit, clipping active."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTTrainer

    def build(opt_model, make_opt, out):
        args = TW.sft_config(tmp_path / out)
        opt = make_opt(opt_model, args)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        trainer = SFTTrainer(model=opt_model, args=args, train_dataset=Dataset.from_list(TW.sft_rows()),
                             processing_class=TW.sft_tokenizer(), optimizers=(opt, sched))
        return trainer, opt

    model = TW.sft_model()
    before = snapshot(model)
    trainer, opt = build(model, lambda m, a: optimizer_for_trainer(m, TW.sft_qcfg(), a), "sft")
    assert opt.grad_clip == TW.SFT_CLIP and trainer.args.max_grad_norm == 0.0
    log: list = []
    TW.recording(trainer, log)
    trainer.train()
    assert trainer.state.global_step == TW.SFT_STEPS and len(log) == TW.SFT_STEPS * ACCUM
    assert all((inp["labels"] == -100).any() for inp, _ in log)  # the prompts are masked out of the loss

    ref_model = TW.sft_model()
    ref, ref_opt = build(ref_model, lambda m, a: QGaLoreOptimizer(
        m, TW.sft_qcfg(), dense_state_bits=8, layerwise=True, grad_accum=ACCUM, grad_clip=TW.SFT_CLIP,
        stagger_refresh=True), "ref")
    if model.is_gradient_checkpointing and not ref_model.is_gradient_checkpointing:
        ref_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ref.args.gradient_checkpointing_kwargs)
    ref.current_gradient_accumulation_steps = ACCUM
    norms = []
    for i in range(0, len(log), ACCUM):
        for inputs, nib in log[i:i + ACCUM]:
            ref.training_step(ref_model, TW.clone_inputs(inputs), nib)
        ref_opt.step()
        norms.append(ref_opt.last_step.grad_norm)
        ref_model.zero_grad()
    assert min(norms) > TW.SFT_CLIP  # the clip acted on every step
    got, want = snapshot(model), snapshot(ref_model)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    codes = [k for k in got if k.endswith("weight_codes")]
    assert codes and all(not torch.equal(before[k], got[k]) for k in codes)


# ------------------------------------------------------------------------------------------------------------
# torchrun, 2 ranks, gradient accumulation 2: Trainer and SFTTrainer (tests/trainer_worker.py)
# ------------------------------------------------------------------------------------------------------------
def _single_process_reference() -> dict:
    """The fp64 single-process run on the concatenated global micro-batches (layer-wise, accumulation 2: the
    ddp engine's refresh rule), with Trainer's normalisation (Σ token losses / the window's token count)."""
    model = TW.make_model()
    opt = QGaLoreOptimizer(model, TW.cfg(), dense_state_bits=32, layerwise=True, grad_accum=TW.ACCUM,
                           grad_clip=TW.CLIP, stagger_refresh=True)
    m = torch.tensor(TW.window_tokens())
    batches = TW.global_micro_batches()
    norms = []
    for i in range(0, len(batches), TW.ACCUM):
        for x in batches[i:i + TW.ACCUM]:
            model(input_ids=x, labels=x, num_items_in_batch=m).loss.backward()
        opt.step()
        norms.append(opt.last_step.grad_norm)
        opt.zero_grad()
    return {"model": snapshot(model), "norms": norms, "svd_count": opt.svd_count}


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    """One ``torchrun --standalone --nproc_per_node 2 tests/trainer_worker.py`` for the module; the single-process
    reference is computed meanwhile."""
    out = tmp_path_factory.mktemp("trainer_torchrun")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(TW.WORLD), str(Path(TW.__file__).resolve()), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run single-threaded: same kernels, same rounding
    try:
        ref = _single_process_reference()
    finally:
        torch.set_num_threads(threads)
    try:
        log = proc.communicate(timeout=400)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        log = (proc.communicate()[0] or "") + "\n[killed: torchrun timed out]"
    ranks = []
    for rank in range(TW.WORLD):
        f = out / f"r{rank}.json"
        ranks.append(json.loads(f.read_text()) if f.exists() else {"missing": log[-4000:]})
    return SimpleNamespace(dir=out, ranks=ranks, ref=ref)


def _records(run, scenario: str) -> list[dict]:
    recs = []
    for rank, rec in enumerate(run.ranks):
        if "missing" in rec:
            pytest.fail(f"rank {rank} wrote no result:\n{rec['missing']}")
        res = rec["scenarios"].get(scenario)
        assert res is not None, f"rank {rank}: scenario {scenario} did not run"
        assert "error" not in res, f"rank {rank}: {scenario}:\n{res['error']}"
        recs.append(res)
    return recs


def _state(run, rank: int, scenario: str) -> dict[str, torch.Tensor]:
    return torch.load(run.dir / f"r{rank}_{scenario}.pt")


def _assert_equal_states(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.dist
def test_torchrun_trainer_feeds_each_rank_its_share_of_the_global_batch(torchrun):
    recs = _records(torchrun, "trainer")
    glob = TW.global_micro_batches()
    for rank, r in enumerate(recs):
        assert r["dist"] == [rank, TW.WORLD, "gloo"] and r["global_step"] == TW.STEPS
        assert r["batches"] == [x[rank * TW.LOCAL_BATCH:(rank + 1) * TW.LOCAL_BATCH].tolist() for x in glob]
        # Trainer's loss: Σ token losses / the tokens of the whole window on every rank (× world size)
        assert r["num_items"] == [TW.window_tokens()] * len(glob)
        assert r["optimizer"] == "ShardedQGaLoreOptimizer" and r["reduce_dense"] is False
        assert r["clip"] == TW.CLIP and r["max_grad_norm_after"] == 0.0


@pytest.mark.dist
def test_torchrun_ddp_leaves_the_int8_tensors_to_the_optimizer(torchrun):
    recs = _records(torchrun, "trainer")
    dense = [n for n, p in TW.make_model().named_parameters() if p.requires_grad]
    for r in recs:
        ddp = r["ddp"]
        assert ddp["wrapper"] == "DistributedDataParallel"  # Trainer did wrap the model
        assert ddp["int8"] and ddp["int8_ignored"] == ddp["int8"]  # no start-up broadcast, no buffer sync
        assert ddp["int8_synced_buffers"] == [] and ddp["int8_params"] == []  # no gradient bucket either
        assert ddp["reduced_params"] == dense  # DDP averages the dense gradients (embeddings, norms, lm_head)
        assert r["repairs"] == []  # replica checks every 2 steps found nothing to repair
    # ... and the optimizer does not average them a second time: its all-reduces carry only the norm and the
    # presence flags, while the ddp engine's (no DDP wrapper) carry the dense gradients
    for r, e in zip(recs, _records(torchrun, "engine")):
        assert r["all_reduce_bytes"] < r["dense_grad_bytes"] / 100 <= e["all_reduce_bytes"] / 100
    owned = [set(r["owned"]) for r in recs]  # each projected matrix reduced to and stepped by one owner
    assert owned[0].isdisjoint(owned[1]) and len(owned[0] | owned[1]) == len(recs[0]["ddp"]["int8"]) // 2


@pytest.mark.dist
def test_torchrun_trainer_equals_the_ddp_engine_bit_for_bit(torchrun):
    trainer, engine = _records(torchrun, "trainer"), _records(torchrun, "engine")
    for rank in range(TW.WORLD):
        assert trainer[rank]["norms"] == engine[rank]["norms"] == trainer[0]["norms"]
        assert min(trainer[rank]["norms"]) > TW.CLIP  # clipping acted on every step — once, by the global norm
        _assert_equal_states(_state(torchrun, rank, "trainer"), _state(torchrun, rank, "engine"),
                             f"rank {rank}: Trainer vs the ddp engine")
    _assert_equal_states(_state(torchrun, 0, "trainer"), _state(torchrun, 1, "trainer"), "replicas")


@pytest.mark.dist
def test_torchrun_trainer_matches_the_single_process_run_on_the_global_batches(torchrun):
    recs = _records(torchrun, "trainer")
    ref = torchrun.ref
    assert recs[0]["norms"] == pytest.approx(ref["norms"], rel=1e-12)
    assert sum(r["svd_count"] for r in recs) == ref["svd_count"]  # each refresh once, at its owner
    got = _state(torchrun, 0, "trainer")
    assert got.keys() == ref["model"].keys()
    for k, want in ref["model"].items():
        if k.endswith(("weight_codes", "weight_scales")):
            assert torch.equal(got[k], want), f"{k} differs from the single-process run"
        else:
            assert torch.allclose(got[k], want, rtol=1e-10, atol=1e-13), f"{k}: {(got[k] - want).abs().max():.3e}"


@pytest.mark.dist
def test_torchrun_hand_built_optimizers_are_refused(torchrun):
    for r in _records(torchrun, "refusals"):
        assert "optimizer_for_trainer" in (r["single_process_optimizer"] or "")
        assert "reduce_dense=False" in (r["dense_reduced_twice"] or "")


@pytest.mark.dist
def test_torchrun_sft_trainer_equals_the_ddp_engine_bit_for_bit(torchrun):
    pytest.importorskip("trl")
    sft, replay = _records(torchrun, "sft"), _records(torchrun, "sft_replay")
    init = snapshot(TW.sft_model())
    for rank in range(TW.WORLD):
        r = sft[rank]
        assert r["global_step"] == TW.SFT_STEPS and r["micro_batches"] == TW.SFT_STEPS * TW.ACCUM
        assert r["optimizer"] == "ShardedQGaLoreOptimizer" and r["ddp"]["int8_ignored"] == r["ddp"]["int8"]
        assert r["gradient_checkpointing"] and r["masked_labels"] > 0  # TRL's defaults: checkpointing, completion loss
        assert r["norms"] == replay[rank]["norms"] == sft[0]["norms"] and min(r["norms"]) > TW.SFT_CLIP
        _assert_equal_states(_state(torchrun, rank, "sft"), _state(torchrun, rank, "sft_replay"),
                             f"rank {rank}: SFTTrainer vs the ddp engine")
    got = _state(torchrun, 0, "sft")
    _assert_equal_states(got, _state(torchrun, 1, "sft"), "replicas")
    assert all(not torch.equal(init[k], got[k]) for k in got if k.endswith("weight_codes"))
