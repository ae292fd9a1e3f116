"""The training loop's numerics, against transformers' own code on the same data, and how a killed or
starved training process is reported.

- accumulation: a step's loss is the sum over its micro-batches' trained tokens divided by all of them
  (transformers' ``num_items_in_batch`` fix, #34191), so gradients equal one pass over the whole batch;
  a mean of per-micro-batch means (the old loop) would not, and the test shows it differs;
- fp16: where the trainable parameters are fp32 (adapters, master weights) a half plan trains under the
  Trainer's mixed precision, fp16 with a GradScaler (on a CPU too, where accelerate would leave it off);
  the scaled, unscaled gradients are the unscaled ones, an overflow skips the step and halves the scale.
  Pure-half full fine-tuning gets no mixed precision (no scaler can unscale fp16 gradients).
  (test_jobs_vs_trainer.py runs whole fp16 jobs against the Trainer run by hand.)
- packing: a packed block's second example gets exactly the logits it gets alone (a plain causal mask
  would let it attend to the first: the test checks that differs);
- outside SIGTERM -> failed `terminated` (no cancelled event), SIGKILL -> `killed` (the cgroup OOM counter
  did not move), each with a measurement; a file-size cap (RLIMIT_FSIZE, a real write failure) at a
  checkpoint -> `output`.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from jobs_helpers import AUTH, events, tiny_job, upload, wait_for, wait_job

pytestmark = [pytest.mark.needs_torch]
JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture(scope="module")
def model(tiny_root: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_root / "model"), attn_implementation="sdpa")


def _grads(model: Any) -> list[Any]:
    out = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


def _micros() -> list[list[Any]]:
    from advisor.jobs.data import IGNORE, Tokens

    long_ = Tokens(list(range(5, 25)), [IGNORE] * 4 + list(range(9, 25)))  # 16 trained labels
    short = Tokens(list(range(30, 36)), [IGNORE] * 4 + [34, 35])  # 2 trained labels
    return [[long_], [short]]


def test_accumulated_loss_weighs_micro_batches_by_their_tokens(model: Any) -> None:
    import torch

    from advisor.jobs import data as D
    from advisor.jobs.train import token_loss_sum

    micros = _micros()
    n_items = sum(s.loss_tokens for m in micros for s in m)
    assert n_items == 18  # 16 + 2: labels after the first position (the loss is on shifted labels)
    model.zero_grad(set_to_none=True)
    ours = 0.0
    for m in micros:  # token_loss_sum (the validation loss) over the step's tokens
        ids, labels = D.pad_batch(m, 0)
        total = token_loss_sum(model(input_ids=torch.tensor(ids)).logits, torch.tensor(labels))
        (total / n_items).backward()
        ours += float(total.detach()) / n_items
    g_ours = _grads(model)

    hf = 0.0
    for m in micros:  # transformers' fix: the model's own loss given num_items_in_batch
        ids, labels = D.pad_batch(m, 0)
        loss = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels), num_items_in_batch=n_items).loss
        loss.backward()
        hf += float(loss)
    g_hf = _grads(model)
    assert ours == pytest.approx(hf, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ours, g_hf, strict=True))

    naive = 0.0
    for m in micros:  # the old loop: mean per micro-batch / grad_accum
        ids, labels = D.pad_batch(m, 0)
        naive += float(model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss) / len(micros)
    model.zero_grad(set_to_none=True)
    assert abs(naive - ours) > 1e-3  # the weighting matters on this data: the test can fail


def test_fp16_plans_train_under_a_loss_scaler(model: Any, tmp_path: Path) -> None:
    import copy

    import torch
    from transformers import TrainingArguments

    from advisor.jobs import data as D
    from advisor.jobs.train import _trainer_classes, mixed_precision, token_loss_sum

    class Built:  # what mixed_precision reads of a BuiltModel
        def __init__(self, dtype: str, m: Any = model):
            self.plan = type("P", (), {"dtype": dtype})()
            self.model = m

    assert mixed_precision(Built("fp32")) is None and mixed_precision(Built("bf16")) == "bf16"
    assert mixed_precision(Built("fp16")) == "fp16"  # fp32 trainable parameters (adapters, master weights)
    assert mixed_precision(Built("fp16", copy.deepcopy(model).half())) is None  # pure-half full fine-tuning
    # the job's Trainer on a CPU: fp16 autocast and a GradScaler, as on CUDA
    job_trainer, _ = _trainer_classes()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fp16=True, report_to="none")
    trainer = job_trainer(model=model, args=args, plan_optimizer="adamw", cpu_fp16=True)
    scaler = trainer.accelerator.scaler
    assert trainer.accelerator.native_amp and isinstance(scaler, torch.amp.GradScaler)
    assert scaler.get_scale() == 2.0**16
    ids, labels = D.pad_batch(_micros()[0], 0)

    def loss() -> Any:
        return token_loss_sum(model(input_ids=torch.tensor(ids)).logits, torch.tensor(labels)) / 15

    model.zero_grad(set_to_none=True)
    loss().backward()
    plain = _grads(model)
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.0)
    scaler.scale(loss()).backward()
    scaler.unscale_(opt)
    unscaled = _grads(model)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(plain, unscaled, strict=True))
    scaler.update()

    # an overflow: the step is skipped, the scale halves (what keeps fp16 training alive)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters()], lr=1.0)
    scaler.scale(loss()).backward()
    next(iter(model.parameters())).grad.view(-1)[0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model.zero_grad(set_to_none=True)


def test_packed_examples_never_attend_across_their_boundary(model: Any) -> None:
    import torch

    from advisor.jobs import data as D
    from advisor.jobs.train import Collator

    a, b = D.Tokens([5, 6, 7, 8, 9], [5, 6, 7, 8, 9]), D.Tokens([10, 11, 12, 13], [10, 11, 12, 13])
    block = D.pack([a, b], 32)[0]
    segs, pos = D.pad_segments([block])
    assert segs == [[0] * 5 + [1] * 4] and pos == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    batch = Collator(0, torch.float32)([block])  # what the job's Trainer feeds the model
    assert batch["position_ids"].tolist() == pos
    assert batch["labels"][0, 5] == D.IGNORE  # b's first token is not a target of a's last one
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b.ids])).logits[0]
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, 5:]
        crossing = model(input_ids=batch["input_ids"]).logits[0, 5:]  # one causal mask over the block
    assert torch.allclose(alone, packed, atol=1e-4)
    assert not torch.allclose(alone, crossing, atol=1e-2)


# ---- end states, through the API and a real training process -------------------------------------------
def _steps(evs: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["step"] for e in evs if e["type"] == "metrics"]


def _started(client: Any, tiny_root: Path, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    f = upload(client, tiny_root / "train.jsonl")
    body = tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 100}, **extra)
    job = client.post(JOBS, headers=AUTH, json=body).json()
    wait_for(lambda: {"e": events(client, job["id"])}, lambda d: len(_steps(d["e"])) >= 2, timeout=120)
    return job, client.app.state.jobs.get().store.get_job(job["id"])["handle"]


def _measurements(client: Any) -> dict[str, dict[str, Any]]:
    path = Path(client.app.state.settings.data_dir) / "measurements" / "jobs.jsonl"
    return {r["trial_id"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}


@pytest.mark.slow
def test_an_outside_sigterm_and_sigkill_are_reported_as_what_they_were(client, tiny_root: Path) -> None:
    job, handle = _started(client, tiny_root)
    os.killpg(int(handle["pid"]), signal.SIGTERM)  # not through the API: someone else's SIGTERM
    done = wait_job(client, job["id"], timeout=60)
    msgs = [e["message"] for e in events(client, job["id"])]
    assert done["status"] == "failed" and done["error"]["code"] == "terminated", done["error"]
    assert "The job was cancelled" not in msgs and "cancelled by request" not in done["error"]["message"]
    assert _measurements(client)[job["id"]]["step_times_s"]  # the process wrote it on its way out

    job, handle = _started(client, tiny_root)
    os.killpg(int(handle["pid"]), signal.SIGKILL)
    done = wait_job(client, job["id"], timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "killed", done["error"]
    assert "SIGKILL" in done["error"]["message"]
    record = _measurements(client)[job["id"]]  # rebuilt by the manager from the logged step metrics
    assert record["status"] == "error" and len(record["step_times_s"]) >= 2 and record["memory"]["peak_bytes"] > 0


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_an_output_failure(client, tiny_root: Path) -> None:
    from advisor.jobs.train import FSIZE_LIMIT_ENV

    # every file the training process writes is capped below the checkpoint's weights (a real EFBIG)
    client.app.state.jobs.get().manager.launcher.extra_env[FSIZE_LIMIT_ENV] = str(64 * 1024)
    f = upload(client, tiny_root / "train.jsonl")
    job = client.post(JOBS, headers=AUTH, json=tiny_job(tiny_root / "model", f["id"], "full")).json()
    done = wait_job(client, job["id"], timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "output", done["error"]
    assert _measurements(client)[job["id"]]["step_times_s"]
