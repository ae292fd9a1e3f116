"""A job trains exactly what transformers' Trainer trains when it is run by hand on the same model weights,
tokenised data, seed and optimiser: per-step losses equal to 1e-5 (relative).

- fp16 (a LoRA adapter on an fp16 base, under autocast and dynamic loss scaling: on this CPU too) with
  grad_accum 2 and examples of unequal lengths. The first step's loss is also checked by hand, from the
  very micro-batches the Trainer ran: the sum of their token losses over all their trained tokens, which a
  mean of per-micro-batch means (the old accumulation bug, transformers #34191) is not;
- packing: the same agreement, with the collator's block-diagonal masks, position ids and no target
  across an example boundary (test_jobs_trainer.py checks a packed example's logits equal its own);
- resume: a run started from a copy of another run's checkpoint at step 3 continues at step 4 and trains
  steps 4.. exactly as the uninterrupted run did (weights, optimiser, schedule, data position restored).

The jobs run in this process (``Run(spec, job_dir).run()``, what the training process runs), on the tiny model.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.needs_torch]
LR = 5e-3


@pytest.fixture(scope="module")
def data(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 chat examples whose answers are 1..12 numbers long: micro-batches of unequal trained tokens."""
    from advisor.jobs.tiny import counting_examples, write_jsonl

    rows = [counting_examples(1, seed=n, length=1 + (n * 5) % 12)[0] for n in range(12)]
    return write_jsonl(tmp_path_factory.mktemp("vs") / "train.jsonl", rows)


def _spec(tiny_root: Path, train: Path, dtype: str, packing: bool, **kw: Any) -> Any:
    from advisor.jobs.spec import JobSpec, ModelSource
    from advisor.plans import TrainingPlan

    model = tiny_root / "model"
    plan = TrainingPlan(
        method="lora", gpu_id="cpu", dtype=dtype, micro_batch=2, grad_accum=2, seq_len=32, grad_checkpointing=False
    )
    return JobSpec(
        job_id="ftjob-0123456789ab",
        model=str(model),
        source=ModelSource("local", str(model)),
        plan=plan,
        training_file=str(train),
        n_epochs=2,
        batch_size=4,
        learning_rate=LR,
        seed=7,
        packing=packing,
        warmup_ratio=0.2,
        **kw,
    )


def _job(spec: Any, job_dir: Path) -> list[dict[str, Any]]:
    """Run the job in this process; its metrics events."""
    from advisor.jobs.train import EVENTS, EXIT_OK, Run

    job_dir.mkdir(parents=True, exist_ok=True)
    before = signal.getsignal(signal.SIGTERM)
    try:
        code = Run(spec, job_dir).run()
    finally:
        signal.signal(signal.SIGTERM, before)
    evs = [json.loads(x) for x in (job_dir / EVENTS).read_text().splitlines()]
    assert code == EXIT_OK, [e["message"] for e in evs][-3:]
    return evs


def _metrics(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"] for e in evs if e["type"] == "metrics"]


def _by_hand(spec: Any, out: Path) -> tuple[list[float], list[dict[str, Any]]]:
    """transformers' Trainer as one would run it by hand: the same model (built by advisor.stack.build with
    the job's seed), sequences, collator, optimiser, schedule and seed. Returns the per-step losses it logged
    and the batches its collator made, in order (the first grad_accum are step 1's micro-batches)."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from advisor.jobs import data as D
    from advisor.jobs.files import read_examples
    from advisor.jobs.train import Collator
    from advisor.stack.build import build

    tok = AutoTokenizer.from_pretrained(spec.source.ref)
    seqs = D.encode_all(tok, read_examples(spec.training_file), "chat")
    seqs = D.pack(seqs, spec.plan.seq_len) if spec.packing else D.truncate(seqs, spec.plan.seq_len)[0]
    built = build(spec.source.ref, spec.plan, "cpu", seed=spec.seed, learning_rate=LR)
    half = spec.plan.dtype == "fp16"
    collator = Collator(tok.pad_token_id, torch.float16 if half else torch.float32)
    made: list[dict[str, Any]] = []

    def collate(items: list[Any]) -> dict[str, Any]:
        made.append(collator(items))
        return made[-1]

    steps = -(-len(seqs) // spec.batch_size) * spec.n_epochs
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=spec.plan.micro_batch,
        gradient_accumulation_steps=spec.plan.grad_accum,
        num_train_epochs=spec.n_epochs,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=int(spec.warmup_ratio * steps),
        max_grad_norm=spec.max_grad_norm,
        fp16=half,
        use_cpu=True,
        seed=spec.seed,
        data_seed=spec.seed,
        remove_unused_columns=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=built.model, args=args, train_dataset=seqs, data_collator=collate, optimizers=(built.optimizer, None)
    )
    if half:  # accelerate leaves fp16 off on a CPU: the autocast and GradScaler it uses on CUDA
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], made


def test_an_fp16_job_with_accumulation_trains_as_the_trainer_by_hand(tiny_root: Path, data: Path, tmp_path) -> None:
    import torch

    from advisor.jobs.train import token_loss_sum
    from advisor.stack.build import build

    spec = _spec(tiny_root, data, "fp16", packing=False)
    job = _metrics(_job(spec, tmp_path / "job"))
    ref, batches = _by_hand(spec, tmp_path / "ref")
    assert len(job) == len(ref) == 6
    assert [m["train_loss"] for m in job] == pytest.approx(ref, rel=1e-5)
    assert all(m["loss_scale"] == 2.0**16 for m in job)  # the steps ran under the GradScaler
    assert job[-1]["train_loss"] < job[0]["train_loss"]

    # step 1 by hand, on the initial weights: token losses summed over both micro-batches / all their tokens
    model = build(spec.source.ref, spec.plan, "cpu", seed=spec.seed).model
    sums, counts = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        for b in batches[:2]:
            sums.append(float(token_loss_sum(model(input_ids=b["input_ids"]).logits, b["labels"])))
            counts.append(int(b["labels"][:, 1:].ne(-100).sum()))
    assert counts[0] != counts[1]  # unequal micro-batches: the weighting matters
    assert job[0]["train_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    naive = sum(s / c for s, c in zip(sums, counts, strict=True)) / 2
    assert abs(naive - job[0]["train_loss"]) > 1e-3


def test_a_packed_job_trains_as_the_trainer_by_hand_and_resumes_where_it_stopped(
    tiny_root: Path, data: Path, tmp_path
) -> None:
    from advisor.jobs import data as D
    from advisor.jobs.train import CHECKPOINTS, TRAINER_STATE

    spec = _spec(tiny_root, data, "fp32", packing=True, checkpoint_every_steps=3, keep_checkpoints=10)
    evs = _job(spec, tmp_path / "job")
    job = _metrics(evs)
    ref, batches = _by_hand(spec, tmp_path / "ref")
    assert len(job) == len(ref) >= 4
    assert [m["train_loss"] for m in job] == pytest.approx(ref, rel=1e-5)
    # the blocks held several examples: block-diagonal masks, and no target at an example's first token
    packed = [b for b in batches if "attention_mask" in b]
    assert packed and all(b["attention_mask"].shape[1:2] == (1,) for b in packed)
    block = next(s for s in D.pack(D.encode_all(_tok(spec), _rows(spec), "chat"), 32) if len(set(s.segments)) > 1)
    starts = [i for i in range(1, len(block.ids)) if block.segments[i] != block.segments[i - 1]]
    assert starts and all(D.loss_labels(block)[i] == D.IGNORE for i in starts)

    # resume: a fresh job directory holding only the step-3 checkpoint continues at step 4, as the run did
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "job" / CHECKPOINTS / "checkpoint-3", resumed / CHECKPOINTS / "checkpoint-3")
    incomplete = resumed / CHECKPOINTS / "checkpoint-5"  # the disk filled mid-save: never resumed from
    shutil.copytree(tmp_path / "job" / CHECKPOINTS / "checkpoint-3", incomplete)
    (incomplete / TRAINER_STATE).unlink()
    again = _job(spec, resumed)
    assert "Resumed from the checkpoint at step 3" in [e["message"] for e in again]
    later = _metrics(again)
    assert [m["step"] for m in later] == [m["step"] for m in job[3:]]
    assert [m["train_loss"] for m in later] == pytest.approx([m["train_loss"] for m in job[3:]], rel=1e-5)
    assert later[-1]["trained_tokens"] == job[-1]["trained_tokens"]


def _tok(spec: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.source.ref)


def _rows(spec: Any) -> Any:
    from advisor.jobs.files import read_examples

    return read_examples(spec.training_file)
