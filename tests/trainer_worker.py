"""Rank side of the multi-process tests in ``tests/e2e/test_trainer.py``: ``transformers.Trainer`` and TRL's
``SFTTrainer`` with :func:`~qgalore_dist.train.hf_trainer.optimizer_for_trainer` under
``torchrun --standalone --nproc_per_node 2 tests/trainer_worker.py OUT_DIR``.

Each rank runs, in order (one torchrun for the whole test module):

* ``trainer``: Trainer (its own DDP wrapper, gradient accumulation :data:`ACCUM`, clipping moved into the
  optimizer) on the fp64 tiny LLaMA of ``tests/ddp_worker.py``, recording the micro-batches Trainer fed this rank;
  then ``engine``: the ddp engine's optimizer (``ShardedQGaLoreOptimizer``, no DDP wrapper, dense gradients
  averaged by the optimizer) in a plain loop over those very micro-batches, with Trainer's loss normalisation
  (token losses summed over the global accumulation window ÷ its token count, × world size).
* ``refusals``: hand-built optimizers that do not fit Trainer's DDP (``check_trainer_args``).
* ``sft``: SFTTrainer on a prompt/completion dataset (TRL's tokenisation, completion-only loss, padding, gradient
  checkpointing), recording what its ``training_step`` received; then ``sft_replay``: the same micro-batches
  through a second, never-prepared SFTTrainer's ``training_step`` on a fresh model (no DDP wrapper) with the ddp
  engine's optimizer — TRL's own loss code, nothing re-implemented. Skipped when trl is missing.

Both comparisons are exact by construction: same kernels, same shapes, same order on each rank; the only
difference is who averages the dense gradients (DDP, or the optimizer), which is (a + b) / 2 either way with two
ranks. Writes ``OUT_DIR/r{R}.json`` (records, errors) and ``OUT_DIR/r{R}_{scenario}.pt`` (final model states).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_worker import make_model, qcfg  # noqa: E402
from helpers import tiny_llama, token_batches  # noqa: E402

WORLD, ACCUM, LOCAL_BATCH, SEQ, STEPS = 2, 2, 2, 16, 3
CLIP = 0.05  # below every step's global norm: clipping acts on every step
SEED = 21
SFT_STEPS, SFT_CLIP = 3, 0.5


def cfg():
    """Refresh at step 0 and (staggered) inside the run; fp32 moments / eager update (ddp_worker.qcfg)."""
    return qcfg(update_proj_gap=2)


def global_micro_batches(steps: int = STEPS) -> list[torch.Tensor]:
    """Global micro-batch ``k`` (``WORLD·LOCAL_BATCH`` rows): Trainer's sequential sampler yields the dataset's rows
    in order, and accelerate hands batch ``j`` of them to rank ``j mod WORLD`` — so rank ``r`` gets rows
    ``[r·LOCAL_BATCH, (r+1)·LOCAL_BATCH)`` of each global micro-batch."""
    return token_batches(steps * ACCUM, batch=WORLD * LOCAL_BATCH, seq=SEQ, seed=SEED)


def dataset_rows() -> list[dict]:
    return [{"input_ids": row, "labels": row} for x in global_micro_batches() for row in x]


def window_tokens() -> int:
    """Loss tokens of one optimizer step over all ranks (labels shifted by one: SEQ - 1 per row)."""
    return WORLD * ACCUM * LOCAL_BATCH * (SEQ - 1)


# --- SFT data: a word-level tokenizer over the tiny model's 128 ids, prompt/completion pairs of mixed length -----
SFT_VOCAB = 128


def sft_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(SFT_VOCAB - 3)}
    vocab.update({"<pad>": SFT_VOCAB - 3, "<eos>": SFT_VOCAB - 2, "<unk>": SFT_VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft_rows(n: int = 24) -> list[dict]:
    """Counting sequences: the prompt is 3-6 numbers, the completion the next 2-5 (different lengths: padding)."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 100, (1,), generator=g))
        p, c = 3 + int(torch.randint(0, 4, (1,), generator=g)), 2 + int(torch.randint(0, 4, (1,), generator=g))
        rows.append({"prompt": " ".join(f"t{start + i}" for i in range(p)),
                     "completion": " " + " ".join(f"t{start + p + i}" for i in range(c))})
    return rows


def sft_config(out_dir, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(out_dir), per_device_train_batch_size=LOCAL_BATCH, gradient_accumulation_steps=ACCUM,
                max_steps=SFT_STEPS, max_grad_norm=SFT_CLIP, logging_steps=1, report_to=[], save_strategy="no",
                use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0, max_length=32,
                train_sampling_strategy="sequential")
    base.update(kw)
    return SFTConfig(**base)


def sft_model():
    from qgalore_dist import quantize_model

    model = tiny_llama(seed=1)
    quantize_model(model, group_size=32, seed=0)
    return model


def sft_qcfg():
    from qgalore_dist import QGaLoreConfig

    return QGaLoreConfig(rank=8, update_proj_gap=2, scale=0.25, lr=0.01, weight_group_size=32, state_min_numel=0,
                         state_block_size=32)


def clone_inputs(inputs: dict) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in inputs.items()}


def recording(trainer, log: list) -> None:
    """Record what ``trainer.training_step`` receives (before compute_loss edits the dict)."""
    inner = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        nib = num_items_in_batch.detach().clone() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        log.append((clone_inputs(inputs), nib))
        return inner(model, inputs, num_items_in_batch)

    trainer.training_step = training_step


def norm_callback(opt, out: list):
    """A TrainerCallback appending each step's global pre-clip norm (``optimizer.last_step``) to ``out``."""
    from transformers import TrainerCallback

    class Norms(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            out.append(opt.last_step.grad_norm)

    return Norms()


def all_reduce_bytes(opt) -> int:
    """Bytes the optimizer all-reduced (sent) in its last step: the dense gradients, if it reduces them."""
    return int(opt.last_comm["by_primitive"].get("all_reduce", {}).get("sent", 0))


def dense_grad_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def ddp_facts(wrapped, model) -> dict:
    """What Trainer's DDP wrapper does with the INT8 tensors and the dense parameters."""
    from qgalore_dist.train.hf_trainer import int8_tensor_names

    int8 = set(int8_tensor_names(model))
    ignored = set(getattr(wrapped, "parameters_to_ignore", ()))
    synced_buffers = set(getattr(wrapped, "named_module_buffers", {}) or {})
    reduced = [n for n, p in model.named_parameters() if p.requires_grad and n not in ignored]
    return {"wrapper": type(wrapped).__name__, "int8": sorted(int8), "int8_ignored": sorted(int8 & ignored),
            "int8_synced_buffers": sorted(int8 & synced_buffers), "reduced_params": reduced,
            "int8_params": [n for n, _ in model.named_parameters() if n in int8]}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    assert int(os.environ["WORLD_SIZE"]) == WORLD
    record: dict = {"rank": rank, "scenarios": {}, "timings": {}}
    keep: dict = {}

    def scenario(name, fn):
        t = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                record["scenarios"][name] = fn()
        except Exception:
            record["scenarios"][name] = {"error": traceback.format_exc()}
        record["timings"][name] = round(time.monotonic() - t, 2)

    def trainer_run():
        import torch.distributed as dist
        from transformers import Trainer, TrainingArguments

        from qgalore_dist.train.hf_trainer import check_trainer_args, optimizer_for_trainer

        args = TrainingArguments(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=LOCAL_BATCH,
                                 gradient_accumulation_steps=ACCUM, max_steps=STEPS, max_grad_norm=CLIP,
                                 logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True, seed=0,
                                 train_sampling_strategy="sequential")
        model = make_model()
        opt = optimizer_for_trainer(model, cfg(), args, dense_state_bits=32, replica_check_every=2)
        check_trainer_args(args, opt)
        norms: list = []
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset_rows(), optimizers=(opt, sched),
                          callbacks=[norm_callback(opt, norms)])
        log: list = []
        recording(trainer, log)
        trainer.train()
        torch.save(model.state_dict(), out_dir / f"r{rank}_trainer.pt")
        keep["trainer_batches"] = [(inp["input_ids"], nib) for inp, nib in log]
        return {"dist": [dist.get_rank(), dist.get_world_size(), dist.get_backend()],
                "global_step": trainer.state.global_step, "norms": norms, "clip": opt.grad_clip,
                "optimizer": type(opt).__name__, "reduce_dense": opt.reduce_dense, "owned": sorted(opt.owned),
                "svd_count": opt.svd_count, "repairs": list(opt.replica_repairs),
                "max_grad_norm_after": args.max_grad_norm, "ddp": ddp_facts(trainer.model_wrapped, model),
                "all_reduce_bytes": all_reduce_bytes(opt), "dense_grad_bytes": dense_grad_bytes(model),
                "batches": [inp["input_ids"].tolist() for inp, _ in log],
                "num_items": [int(nib) if nib is not None else None for _, nib in log],
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}

    def engine_run():
        from qgalore_dist.parallel import Collectives, ShardedQGaLoreOptimizer

        model = make_model()
        opt = ShardedQGaLoreOptimizer(model, cfg(), Collectives(), dense_state_bits=32, stagger_refresh=True,
                                      grad_clip=CLIP, replica_check_every=2)
        norms = []
        m = torch.tensor(window_tokens())
        batches = keep["trainer_batches"]
        for i in range(0, len(batches), ACCUM):
            for x, _ in batches[i:i + ACCUM]:
                # Trainer's normalisation: Σ token losses / global window tokens, × world (DDP / the optimizer ÷ N)
                (model(input_ids=x, labels=x, num_items_in_batch=m).loss * WORLD).backward()
            opt.step()
            norms.append(opt.last_step.grad_norm)
            opt.zero_grad()
        torch.save(model.state_dict(), out_dir / f"r{rank}_engine.pt")
        return {"norms": norms, "svd_count": opt.svd_count, "all_reduce_bytes": all_reduce_bytes(opt)}

    def refusals():
        # optimizers built by hand that do not fit Trainer under torchrun: check_trainer_args says so on every rank
        from transformers import TrainingArguments

        from qgalore_dist import QGaLoreOptimizer
        from qgalore_dist.parallel import Collectives, ShardedQGaLoreOptimizer
        from qgalore_dist.train.hf_trainer import check_trainer_args

        args = TrainingArguments(output_dir=str(out_dir / "refusals"), gradient_accumulation_steps=ACCUM,
                                 max_grad_norm=0.0, use_cpu=True, report_to=[])
        out = {}
        for label, build in (
                ("single_process_optimizer", lambda m: QGaLoreOptimizer(m, cfg(), layerwise=True, grad_accum=ACCUM)),
                ("dense_reduced_twice", lambda m: ShardedQGaLoreOptimizer(m, cfg(), Collectives()))):
            try:
                check_trainer_args(args, build(make_model()))
                out[label] = None
            except ValueError as exc:
                out[label] = str(exc)
        return out

    def sft_run():
        from datasets import Dataset
        from trl import SFTTrainer

        from qgalore_dist.train.hf_trainer import optimizer_for_trainer

        args = sft_config(out_dir / "sft")
        model = sft_model()
        opt = optimizer_for_trainer(model, sft_qcfg(), args)
        norms: list = []
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows()),
                             processing_class=sft_tokenizer(), optimizers=(opt, sched),
                             callbacks=[norm_callback(opt, norms)])
        log: list = []
        recording(trainer, log)
        trainer.train()
        torch.save(model.state_dict(), out_dir / f"r{rank}_sft.pt")
        keep["sft_log"] = log
        keep["sft_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
        first = log[0][0]
        return {"global_step": trainer.state.global_step, "norms": norms, "optimizer": type(opt).__name__,
                "ddp": ddp_facts(trainer.model_wrapped, model), "micro_batches": len(log),
                "gradient_checkpointing": keep["sft_checkpointing"], "input_keys": sorted(first),
                "masked_labels": int((first["labels"] == -100).sum()) if "labels" in first else None,
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}

    def sft_replay():
        from datasets import Dataset
        from trl import SFTTrainer

        from qgalore_dist.parallel import Collectives, ShardedQGaLoreOptimizer

        model = sft_model()
        opt = ShardedQGaLoreOptimizer(model, sft_qcfg(), Collectives(), dense_state_bits=8, stagger_refresh=True,
                                      grad_clip=SFT_CLIP)
        norms = []
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        # never trained, never prepared: its training_step runs TRL's compute_loss on the bare model
        ref = SFTTrainer(model=model, args=sft_config(out_dir / "sft_ref"), train_dataset=Dataset.from_list(sft_rows()),
                         processing_class=sft_tokenizer(), optimizers=(opt, sched))
        if keep["sft_checkpointing"] and not model.is_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ref.args.gradient_checkpointing_kwargs)
        ref.current_gradient_accumulation_steps = ACCUM
        log = keep["sft_log"]
        for i in range(0, len(log), ACCUM):
            for inputs, nib in log[i:i + ACCUM]:
                ref.training_step(model, clone_inputs(inputs), nib)
            opt.step()
            norms.append(opt.last_step.grad_norm)
            model.zero_grad()
        torch.save(model.state_dict(), out_dir / f"r{rank}_sft_replay.pt")
        return {"norms": norms, "gradient_checkpointing": bool(model.is_gradient_checkpointing)}

    scenario("trainer", trainer_run)
    if "error" not in record["scenarios"]["trainer"]:
        scenario("engine", engine_run)
    scenario("refusals", refusals)
    try:
        import trl  # noqa: F401

        have_trl = True
    except ImportError:
        have_trl = False
        record["scenarios"]["sft"] = {"skipped": "trl is not installed"}
    if have_trl:
        scenario("sft", sft_run)
        if "error" not in record["scenarios"]["sft"]:
            scenario("sft_replay", sft_replay)
    (out_dir / f"r{rank}.json").write_text(json.dumps(record))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
