"""The official `openai` package, pointed at a running service, drives real jobs end to end: its types
parse our objects (method.type supervised, checkpoint metrics, event ids), its exception classes
come from our statuses, and a fine-tuned model shows up in its models list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jobs_helpers import KEY, job_settings, kill_job_processes, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.needs_torch]
openai = pytest.importorskip("openai")

TINY = {"seq_len": 32, "gradient_checkpointing": False}


def _wait_status(client: Any, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> Any:
    return wait_for(
        lambda: {"j": client.fine_tuning.jobs.retrieve(job_id)}, lambda d: d["j"].status in statuses, timeout
    )["j"]


def test_openai_client_creates_lists_retrieves_follows_and_cancels(tmp_path: Path, tiny_root: Path) -> None:
    from advisor.api.app import create_app
    from advisor.api.testing import serve_in_thread

    data = tmp_path / "data"
    data.mkdir()
    app = create_app(job_settings(data, [tiny_root]))
    try:
        with serve_in_thread(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            with (tiny_root / "train.jsonl").open("rb") as fh:
                f = client.files.create(file=fh, purpose="fine-tune")
            assert f.id.startswith("file-") and f.purpose == "fine-tune" and f.bytes > 0
            assert [x.id for x in client.files.list()] == [f.id]

            # OpenAI's method form, our knobs in its `advisor` extension
            done = client.fine_tuning.jobs.create(
                model=str(tiny_root / "model"),
                training_file=f.id,
                suffix="done",
                method={
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}},
                    "advisor": {"type": "lora", **TINY},  # type: ignore[typeddict-unknown-key]
                },
            )
            assert done.method.type == "supervised" and done.method.supervised.hyperparameters.n_epochs == 1
            assert done.method.advisor["type"] == "lora" and done.method.advisor["seq_len"] == 32

            # the older form (type lora, knobs beside it) is accepted too, and answers OpenAI's shape
            job = client.fine_tuning.jobs.create(
                model=str(tiny_root / "model"),
                training_file=f.id,
                suffix="oai",
                seed=3,
                hyperparameters={"n_epochs": 100, "batch_size": 4, "learning_rate_multiplier": 50},
                extra_body={"method": {"type": "lora", **TINY}},
            )
            assert job.id.startswith("ftjob-") and job.status in ("validating_files", "queued", "running")
            assert job.seed == 3 and job.hyperparameters.n_epochs == 100 and job.method.type == "supervised"

            assert [j.id for j in client.fine_tuning.jobs.list(limit=5)] == [job.id, done.id]
            assert client.fine_tuning.jobs.retrieve(job.id).model == str(tiny_root / "model")

            finished = _wait_status(client, done.id, ("succeeded", "failed", "cancelled"), timeout=180)
            assert finished.status == "succeeded", finished.error
            ckpts = list(client.fine_tuning.jobs.checkpoints.list(done.id))
            assert ckpts and ckpts[0].id.startswith("ftckpt-") and ckpts[0].fine_tuning_job_id == done.id
            m = ckpts[0].metrics
            assert m.step == ckpts[0].step_number and m.train_loss > 0
            assert {"train_mean_token_accuracy", "valid_loss", "full_valid_loss"} <= set(m.model_dump())

            # the fine-tuned model is a model: listed (beside the base models) and retrievable
            models = client.models.list()
            ids = [x.id for x in models.data]
            assert finished.fine_tuned_model in ids and str(tiny_root / "model") in ids
            got = client.models.retrieve(finished.fine_tuned_model)
            assert (got.id, got.object, got.owned_by) == (finished.fine_tuned_model, "model", "org-local")
            assert got.created == finished.finished_at
            assert client.models.retrieve(str(tiny_root / "model")).owned_by == "local"

            # follow the events until training steps show up
            def metrics() -> dict:
                evs = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
                return {"m": [e for e in evs if e.type == "metrics"], "all": evs}

            seen = wait_for(metrics, lambda d: len(d["m"]) >= 2, timeout=120)
            step = seen["m"][0].data
            assert step["train_loss"] > 0 and step["tokens_per_s"] > 0 and step["learning_rate"] > 0
            assert all(e.id.startswith("ftevent-") for e in seen["all"])
            assert any(e.message.startswith("Created fine-tuning job") for e in seen["all"])

            paused = client.fine_tuning.jobs.pause(job.id)
            assert paused.id == job.id
            assert _wait_status(client, job.id, ("paused",)).status == "paused"
            with pytest.raises(openai.ConflictError):
                client.fine_tuning.jobs.resume(done.id)  # only a paused job resumes
            resumed = client.fine_tuning.jobs.resume(job.id)
            assert resumed.status in ("queued", "running")
            _wait_status(client, job.id, ("running",))

            cancelled = client.fine_tuning.jobs.cancel(job.id)
            assert cancelled.status in ("cancelling", "cancelled")
            final = _wait_status(client, job.id, ("cancelled",), timeout=60)
            assert final.error.code == "cancelled" and final.finished_at is not None
            assert final.fine_tuned_model not in [x.id for x in client.models.list().data]

            with pytest.raises(openai.NotFoundError):
                client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve("ft:model:nope:ftjob-doesnotexist")
            with pytest.raises(openai.ConflictError):
                client.fine_tuning.jobs.cancel(done.id)
            with pytest.raises(openai.BadRequestError) as bad_request:
                client.fine_tuning.jobs.create(model=str(tiny_root / "model"), training_file=f.id, seed=-1)
            assert bad_request.value.param == "seed" and bad_request.value.type == "invalid_request_error"
            with pytest.raises(openai.BadRequestError) as dpo:
                client.fine_tuning.jobs.create(
                    model=str(tiny_root / "model"), training_file=f.id, method={"type": "dpo"}
                )
            assert dpo.value.param == "method.type" and "supervised" in dpo.value.message
            bad = openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-valid-key-at-all", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.fine_tuning.jobs.list()
    finally:
        kill_job_processes(data)
