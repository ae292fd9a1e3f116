"""The official `openai` package, pointed at a running service, drives a real job end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs_helpers import KEY, job_settings, kill_job_processes, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.needs_torch]
openai = pytest.importorskip("openai")


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

            job = client.fine_tuning.jobs.create(
                model=str(tiny_root / "model"),
                training_file=f.id,
                suffix="oai",
                seed=3,
                hyperparameters={"n_epochs": 100, "batch_size": 4, "learning_rate_multiplier": 50},
                extra_body={"method": {"type": "lora", "seq_len": 32, "gradient_checkpointing": False}},
            )
            assert job.id.startswith("ftjob-") and job.status in ("validating_files", "queued", "running")
            assert job.seed == 3 and job.hyperparameters.n_epochs == 100

            assert [j.id for j in client.fine_tuning.jobs.list(limit=5)] == [job.id]
            assert client.fine_tuning.jobs.retrieve(job.id).model == str(tiny_root / "model")

            # follow the events until training steps show up
            def metrics() -> dict:
                evs = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
                return {"m": [e for e in evs if e.type == "metrics"], "all": evs}

            seen = wait_for(metrics, lambda d: len(d["m"]) >= 2, timeout=120)
            step = seen["m"][0].data
            assert step["train_loss"] > 0 and step["tokens_per_s"] > 0 and step["learning_rate"] > 0
            assert any(e.message.startswith("Created fine-tuning job") for e in seen["all"])

            cancelled = client.fine_tuning.jobs.cancel(job.id)
            assert cancelled.status in ("cancelling", "cancelled")
            final = wait_for(
                lambda: {"j": client.fine_tuning.jobs.retrieve(job.id)},
                lambda d: d["j"].status == "cancelled",
                timeout=60,
            )["j"]
            assert final.error.code == "cancelled" and final.finished_at is not None
            for ck in client.fine_tuning.jobs.checkpoints.list(job.id):  # one per finished epoch, if any
                assert ck.fine_tuning_job_id == job.id and ck.step_number % 9 == 0 and ck.metrics.train_loss > 0

            with pytest.raises(openai.NotFoundError):
                client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
            bad = openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-valid-key-at-all", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.fine_tuning.jobs.list()
    finally:
        kill_job_processes(data)
