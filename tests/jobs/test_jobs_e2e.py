"""End to end on the CPU: real QLoRA, LoRA and full fine-tuning jobs through the HTTP API.

One test submits all three at once: with one CPU slot they also show the queue (never two running,
the later ones seen `queued`). Each must succeed with a falling loss, checkpoints, a result file and
a measurement record; the saved adapter must load with peft and lower the loss on held-out examples
(the output changed, for the better); the full model must load on its own.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from jobs_helpers import AUTH, events, tiny_job, upload, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.needs_torch]


def _heldout_loss(model_dir: Path, model: Any, valid: Path) -> float:
    """Mean loss of `model` on the trained tokens (assistant answers) of the validation examples."""
    import torch
    from transformers import AutoTokenizer

    from advisor.jobs.data import encode_all, pad_batch
    from advisor.jobs.files import read_examples

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    seqs = encode_all(tok, list(read_examples(valid)), "chat")
    ids, labels = pad_batch(seqs, tok.pad_token_id)
    with torch.no_grad():
        return float(model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss)


def _losses(evs: list[dict[str, Any]]) -> list[float]:
    return [e["data"]["train_loss"] for e in evs if e["type"] == "metrics"]


def test_qlora_lora_and_full_jobs_train_for_real_one_slot_at_a_time(client, tiny_root: Path) -> None:
    train = upload(client, tiny_root / "train.jsonl")
    valid = upload(client, tiny_root / "valid.jsonl")
    completion = upload(client, tiny_root / "completion.jsonl")
    bodies = [
        tiny_job(tiny_root / "model", train["id"], "qlora", validation_file=valid["id"], suffix="q"),
        tiny_job(tiny_root / "model", train["id"], "lora"),
        # full fine-tuning of the model without a chat template, on prompt/completion data (plain format)
        tiny_job(tiny_root / "model-plain", completion["id"], "full"),
    ]
    ids = []
    for body in bodies:
        r = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=body)
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["object"] == "fine_tuning.job" and job["status"] == "validating_files"
        assert job["estimate"]["fits"] and job["estimate"]["gpu"] == "cpu"
        ids.append(job["id"])

    seen: dict[str, set[str]] = {i: set() for i in ids}
    deadline = time.monotonic() + 300
    while True:
        states = {i: client.get(f"/v1/fine_tuning/jobs/{i}", headers=AUTH).json()["status"] for i in ids}
        for i, s in states.items():
            seen[i].add(s)
        assert sum(s == "running" for s in states.values()) <= 1, states  # one CPU slot
        if all(s in ("succeeded", "failed", "cancelled") for s in states.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "queued" in seen[ids[1]] and "queued" in seen[ids[2]], seen

    data_dir = Path(client.app.state.settings.data_dir)
    for job_id, body in zip(ids, bodies, strict=True):
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=AUTH).json()
        evs = events(client, job_id)
        assert job["status"] == "succeeded", (job["error"], [e["message"] for e in evs][-5:])
        method = body["method"]["type"]
        assert job["method"]["type"] == "supervised" and job["method"]["advisor"]["type"] == method
        assert job["fine_tuned_model"].startswith("ft:")
        assert job["finished_at"] >= job["created_at"] and job["trained_tokens"] > 0

        # the loss falls; metrics events carry what the issue asks for
        losses = _losses(evs)
        steps = job["progress"]["total_steps"]
        assert len(losses) == steps == job["measured"]["steps"] and steps % 2 == 0 and steps >= 12
        assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 0.5, losses
        metric = next(e for e in evs if e["type"] == "metrics")["data"]
        for key in ("step", "train_loss", "learning_rate", "tokens_per_s", "peak_memory_gib"):
            assert isinstance(metric[key], (int, float)), key

        # prediction next to measurement
        m = job["measured"]
        assert m["tokens_per_s"] > 0 and m["peak_memory_gib"] > 0
        assert m["vs_estimate"]["peak_memory_gib_ratio"] > 0 and job["estimate"]["peak_memory_gib"] > 0

        # checkpoints: one per epoch, newest first
        ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=AUTH).json()["data"]
        assert [c["step_number"] for c in ckpts] == [steps, steps // 2]
        assert ckpts[0]["fine_tuned_model_checkpoint"] == job["fine_tuned_model"] + f":ckpt-step-{steps}"

        # result file: per-step metrics CSV
        (fid,) = job["result_files"]
        rows = list(csv.DictReader(io.StringIO(client.get(f"/v1/files/{fid}/content", headers=AUTH).text)))
        assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))

        out = data_dir / "jobs" / job_id / "output"
        names = {p.name for p in out.iterdir()}
        assert {"tokenizer.json", "tokenizer_config.json"} <= names
        assert ("model.safetensors" if method == "full" else "adapter_model.safetensors") in names

    qlora = client.get(f"/v1/fine_tuning/jobs/{ids[0]}/checkpoints", headers=AUTH).json()["data"]
    assert "full_valid_loss" in qlora[0]["metrics"]

    # every finished job is a measurement in calibration's record shape
    records = [json.loads(x) for x in (data_dir / "measurements" / "jobs.jsonl").read_text().splitlines()]
    assert [r["trial_id"] for r in records] == ids
    for r in records:
        # the trials' meter (live tensor bytes of the steady-state step), the process RSS alongside
        assert r["status"] == "ok" and r["memory"]["meter"] == "cpu:torch_dispatch_live_storage_bytes"
        assert 0 < r["memory"]["peak_bytes"] < r["memory"]["rss_peak_bytes"] and r["step_time_s"] > 0
        assert r["arch"]["model_type"] == "llama" and r["plan"]["method"] in ("qlora", "lora", "full")

    # the adapters load with peft and change the model: lower loss on held-out examples than the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_root / "model"
    base_loss = _heldout_loss(
        model_dir, AutoModelForCausalLM.from_pretrained(str(model_dir)), tiny_root / "valid.jsonl"
    )
    for job_id in ids[:2]:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        tuned = PeftModel.from_pretrained(base, str(data_dir / "jobs" / job_id / "output"))
        tuned_loss = _heldout_loss(model_dir, tuned, tiny_root / "valid.jsonl")
        assert tuned_loss < base_loss - 0.5, (job_id, base_loss, tuned_loss)
    full = AutoModelForCausalLM.from_pretrained(str(data_dir / "jobs" / ids[2] / "output"))
    assert sum(p.numel() for p in full.parameters()) > 0


def test_two_process_ddp_job_on_the_cpu(make_client, tiny_root: Path) -> None:
    """num_gpus 2 -> `accelerate launch` with two processes (gloo DDP on the CPU): same loop, same files."""
    client = make_client(job_gpu_count=2)
    train = upload(client, tiny_root / "train.jsonl")
    body = tiny_job(tiny_root / "model", train["id"], "lora", method={"num_gpus": 2}, hyperparameters={"n_epochs": 1})
    r = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["method"]["advisor"]["sharding"] == "ddp" and r.json()["plan"]["num_gpus"] == 2
    job = wait_job(client, r.json()["id"])
    evs = events(client, job["id"])
    assert job["status"] == "succeeded", (job["error"], [e["message"] for e in evs][-5:])
    assert any("on 2 x cpu" in e["message"] for e in evs)
    losses = _losses(evs)
    assert len(losses) == 9 and sum(losses[:3]) / 3 > sum(losses[-3:]) / 3


def test_out_of_memory_fails_with_code_oom_and_is_a_measurement(tmp_path: Path, tiny_root: Path) -> None:
    """A full fine-tune that needs ~0.7 GB under a 300 MB host-memory budget: a real allocation failure."""
    import os
    import subprocess
    import sys

    from advisor.jobs.spec import JobSpec, ModelSource, resolve_hyperparameters
    from advisor.jobs.tiny import save_tiny_model
    from advisor.plans import TrainingPlan

    model = save_tiny_model(tmp_path / "wide", hidden_size=1024, intermediate_size=2752, num_hidden_layers=4)
    hp = resolve_hyperparameters("full", 64, 1, 4, 1, micro_batch=4)
    plan = TrainingPlan(method="full", gpu_id="cpu", dtype="fp32", micro_batch=4, seq_len=32, grad_checkpointing=False)
    spec = JobSpec(
        job_id="ftjob-oom000000001",
        model=str(model),
        source=ModelSource("local", str(model)),
        plan=plan,
        training_file=str(tiny_root / "train.jsonl"),
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate=hp.learning_rate,
    )
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.json").write_text(json.dumps(spec.to_dict()))
    env = {**os.environ, "ADVISOR_TRAIN_MEMORY_LIMIT_BYTES": str(300 * 2**20), "ADVISOR_TRAIN_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "advisor.jobs.train", "--job-dir", str(job_dir)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    result = json.loads((job_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["code"] == "oom", result["error"]
    record = json.loads((job_dir / "measurement.json").read_text())
    assert record["status"] == "oom" and record["memory"]["peak_bytes"] > 0 and record["plan"]["method"] == "full"


def test_a_dora_job_trains_its_magnitudes_for_real(client, tiny_root: Path) -> None:
    """DoRA end to end: method.type dora -> peft use_dora through the one builder; the magnitudes train
    and are saved with the adapter, the tuned model beats the base on held-out examples."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    train = upload(client, tiny_root / "train.jsonl")
    r = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=tiny_job(tiny_root / "model", train["id"], "dora"))
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    evs = events(client, job["id"])
    assert job["status"] == "succeeded", (job["error"], [e["message"] for e in evs][-5:])
    assert job["method"]["advisor"]["type"] == "dora" and job["method"]["advisor"]["lora"]["r"] == 8
    losses = _losses(evs)
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 0.5, losses
    out = Path(client.app.state.settings.data_dir) / "jobs" / job["id"] / "output"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())  # noqa: SIM118
    model_dir = tiny_root / "model"
    base_loss = _heldout_loss(
        model_dir, AutoModelForCausalLM.from_pretrained(str(model_dir)), tiny_root / "valid.jsonl"
    )
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(out))
    assert _heldout_loss(model_dir, tuned, tiny_root / "valid.jsonl") < base_loss - 0.5
