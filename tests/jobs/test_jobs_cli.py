"""`advisor jobs` against a live service: create (uploading the file), follow to the end with the exit
code saying how it ended, list, events, get; a refused request is exit 2 with the server's reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jobs_helpers import KEY, job_settings, kill_job_processes

pytestmark = [pytest.mark.slow, pytest.mark.needs_torch]


def test_jobs_cli_creates_follows_lists_and_reports_refusals(
    tmp_path: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from advisor.api.app import create_app
    from advisor.api.testing import serve_in_thread
    from advisor.cli import main

    data = tmp_path / "data"
    data.mkdir()
    try:
        with serve_in_thread(create_app(job_settings(data, [tiny_root]))) as url:
            base = ["jobs", "--url", url, "--api-key", KEY]
            model = str(tiny_root / "model")
            create = ["create", "--model", model, "--method", "lora", "--training-file", str(tiny_root / "train.jsonl")]
            code = main([*base, *create, "--seq-len", "32", "--epochs", "1", "--batch-size", "16", "--follow"])
            out, err = capsys.readouterr()
            assert code == 0, (out, err)
            assert f"uploaded {tiny_root / 'train.jsonl'} as file-" in err and "(64 examples)" in err
            job_id = out.splitlines()[0]
            assert job_id.startswith("ftjob-")
            done = re.search(r"^succeeded  \[#{30}\] step (\d+)/(\d+)  loss \d+\.\d{4}", out, re.MULTILINE)
            assert done and done[1] == done[2], out  # the bar is full at the last step
            assert out.rstrip().endswith(f"fine-tuned model: ft:model::{job_id}")

            assert main([*base, "list"]) == 0
            listing = capsys.readouterr().out.splitlines()
            assert listing[0].split() == ["ID", "STATUS", "MODEL", "METHOD", "CREATED"]
            assert listing[1].split()[:4] == [job_id, "succeeded", model, "lora"]

            assert main([*base, "events", job_id]) == 0
            events = capsys.readouterr().out.splitlines()
            assert "Created fine-tuning job" in events[0] and any(f"Step {done[1]}/{done[1]}" in e for e in events)

            assert main([*base, "get", job_id]) == 0
            job = json.loads(capsys.readouterr().out)
            assert job["method"]["type"] == "supervised" and job["method"]["advisor"]["seq_len"] == 32

            assert main([*base, "cancel", job_id]) == 2  # finished: the server refuses, the CLI says why
            assert "HTTP 409 conflict (fine_tuning_job_id): the job has already succeeded" in capsys.readouterr().err
            assert main([*base, "follow", "ftjob-doesnotexist"]) == 2
            assert "HTTP 404 not_found" in capsys.readouterr().err
    finally:
        kill_job_processes(data)
