"""A bad profile file is quarantined, never a 500 elsewhere; served profile documents leave out the run directory
and the command line; trial processes get a scrubbed environment (issue 14, items 5, 9 and 11).

The three bad profiles are the ones the issue reproduced on a running service: empty coefficient groups
(a 500 on /v1/estimate for other GPUs and on recommend over every GPU), `fp32_tflops: "fast"` in a calibrated
CPU's device (a 500 on GET /v1/gpus) and a NaN coefficient (a 200 with `step_time_s: null`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from advisor.api.app import create_app
from advisor.api.settings import Settings
from advisor.catalog import default_catalog
from advisor.errors import InvalidInputError
from advisor.profiles import PROFILE_SUBDIR, FittedRange, HeldOut, Profile, ProfileStore

CAT = default_catalog()
A100 = CAT.gpu("a100-80gb")
KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ESTIMATE = {"model": "llama-3.2-1b", "plan": {"method": "lora", "dtype": "bf16", "seq_len": 512, "micro_batch": 1}}


def good_profile(device: dict, pid: str) -> dict:
    """A valid profile document (what calibration.fit writes), as JSON."""
    speed = dict.fromkeys(
        (
            "narrow",
            "eager_attention",
            "dequant_traffic",
            "adapter_weight_traffic",
            "logits_fresh",
            "step_s",
        ),
        0.0,
    ) | {"gemm": 2.0, "attention": 2.0, "traffic": 1.5, "optimizer_traffic": 1.5, "logits": 1.0, "host_ops": 1e-5}
    p = Profile(
        id=pid,
        created_at="2026-01-01T00:00:00+0000",
        device=device,
        software={"torch": "2.13.0"},
        coefficients={
            "memory": {"activation_scale": {"llama": 1.1}, "logits_scale": 1.0, "fixed_bytes": 1e6},
            "speed": speed,
            "runtime": {"allocator_fragmentation": 0.1, "cuda_context_bytes": 600 * 2**20},
        },
        fitted_range=FittedRange(("llama",), ("lora",), ("bf16",), ("adamw",), ("sdpa",), {"seq_len": (64.0, 2048.0)}),
        held_out=HeldOut(3.0, 9.0, 8.0, 20.0, 40, 38, 6, {"memory_median_abs_pct_error": 12.0}),
        meters={"peak_memory": "cuda:max_memory_allocated"},
        provenance={"command": "advisor calibrate --out /srv/secret/run", "run_dir": "/srv/secret/run", "budget": "x"},
    )
    return json.loads(json.dumps(p.to_dict()))


def cpu_device() -> dict:
    return A100.to_dict() | {
        "id": "cpu-test-box-2t",
        "name": "CPU test box (2 threads)",
        "gpu_class": "cpu",
        "vendor": "cpu",
        "platform": "cpu",
        "bf16_supported": False,
        "bf16_tflops": None,
        "sm_count": None,
        "aliases": [],
    }


def empty_groups() -> dict:
    doc = good_profile(A100.to_dict(), "a100-empty-groups")
    doc["coefficients"] = {"memory": {}, "speed": {}, "runtime": {}}
    return doc


def fast_cpu() -> dict:
    doc = good_profile(cpu_device(), "cpu-fast")
    doc["device"]["fp32_tflops"] = "fast"
    return doc


def nan_coefficient() -> dict:
    doc = good_profile(A100.to_dict(), "a100-nan")
    doc["coefficients"]["speed"]["gemm"] = float("nan")
    return doc


def write(data_dir: Path, doc: dict) -> None:
    root = data_dir / PROFILE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{doc['id']}.json").write_text(json.dumps(doc))  # NaN is written as JSON's non-standard NaN


def client_for(data_dir: Path) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir, api_keys=[KEY])))


def readiness(c: TestClient) -> dict:
    r = c.get("/readyz")
    return {ch["name"]: ch for ch in r.json()["checks"]} | {"_status": r.status_code}


@pytest.mark.parametrize("bad", [empty_groups, fast_cpu, nan_coefficient], ids=lambda f: f.__name__)
def test_a_bad_profile_is_quarantined_and_every_endpoint_keeps_the_catalogs_numbers(tmp_path, bad):
    doc = bad()
    write(tmp_path, doc)
    with client_for(tmp_path) as c:
        # other GPUs (the scaled rule would take the bad profile as its source), and the profiled A100 itself
        for gpu in ("h100-sxm", "a100-80gb"):
            r = c.post("/v1/estimate", json=ESTIMATE | {"gpu": gpu})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["source"] == "analytical"
            assert isinstance(body["step_time_s"], float) and math.isfinite(body["step_time_s"])
        r = c.post("/v1/recommend", json={"model": "llama-3.2-1b", "workload": {"seq_len": 512}})
        assert r.status_code == 200, r.text
        r = c.get("/v1/gpus")
        assert r.status_code == 200, r.text
        gpus = r.json()["gpus"] if isinstance(r.json(), dict) else r.json()
        assert doc["device"]["id"] not in {g["id"] for g in gpus if g["id"].startswith("cpu-")}
        a100 = next(g for g in gpus if g["id"] == "a100-80gb")
        assert a100["fp32_tflops"] == A100.fp32_tflops
        # /readyz names the quarantined profile (its id, never the data directory's path)
        ready = readiness(c)
        check = ready["calibration_profiles"]
        assert ready["_status"] == 503 and not check["ok"]
        assert doc["id"] in check["detail"] and "quarantined" in check["detail"]
        assert str(tmp_path) not in check["detail"]
        # the calibration listing (behind a key) shows only valid profiles
        listing = c.get("/v1/calibrations", headers=AUTH).json()
        assert listing["profiles"] == []


def test_the_store_says_why_and_names_the_field(tmp_path):
    from advisor.profiles import validate_profile

    for bad in (empty_groups(), fast_cpu(), nan_coefficient()):
        write(tmp_path, bad)
    store = ProfileStore(tmp_path / PROFILE_SUBDIR)
    assert store.profiles() == []
    why = {q.id: q.reason for q in store.quarantined()}
    assert set(why) == {"a100-empty-groups", "cpu-fast", "a100-nan"}
    assert "coefficients.memory must be a non-empty object" in why["a100-empty-groups"]
    assert "fp32_tflops must be a positive number, got 'fast'" in why["cpu-fast"]
    assert "coefficients.speed.gemm must be a finite number, got nan" in why["a100-nan"]
    # infinities and wrong types too; saving validates (a fit that produced a NaN is not installed)
    inf = good_profile(A100.to_dict(), "a100-inf")
    inf["held_out"]["memory_median_abs_pct_error"] = float("inf")
    with pytest.raises(InvalidInputError, match=r"held_out\.memory_median_abs_pct_error"):
        validate_profile(Profile.from_dict(inf))
    with pytest.raises(InvalidInputError, match=r"coefficients\.speed\.gemm"):
        store.save(Profile.from_dict(nan_coefficient()))
    # fixing the file brings it back at once (the store re-reads changed files)
    write(tmp_path, good_profile(A100.to_dict(), "a100-nan"))
    assert [p.id for p in store.profiles()] == ["a100-nan"]
    assert "a100-nan" not in {q.id for q in store.quarantined()}


def test_calibrate_list_reports_quarantined_profiles(tmp_path, capsys):
    import argparse

    from advisor.calibrate_cli import add_parser, cmd_calibrate

    write(tmp_path, good_profile(A100.to_dict(), "a100-good"))
    write(tmp_path, nan_coefficient())
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert cmd_calibrate(parser.parse_args(["calibrate", "--list", "--data-dir", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert "a100-good" in out
    assert "QUARANTINED a100-nan" in out and "coefficients.speed.gemm must be a finite number" in out
    assert cmd_calibrate(parser.parse_args(["calibrate", "--list", "--json", "--data-dir", str(tmp_path)])) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["id"] for p in listed["profiles"]] == ["a100-good"]
    assert [q["id"] for q in listed["quarantined"]] == ["a100-nan"]


def test_served_profile_documents_leave_out_the_run_directory_and_command_line(tmp_path):
    doc = good_profile(A100.to_dict(), "a100-good")
    write(tmp_path, doc)
    with client_for(tmp_path) as c:
        r = c.get("/v1/calibrations/a100-good", headers=AUTH)
        assert r.status_code == 200, r.text
        served = r.json()["profile_document"]
    assert "run_dir" not in served["provenance"] and "command" not in served["provenance"]
    assert served["provenance"]["budget"] == "x"
    assert "/srv/secret" not in json.dumps(served)
    # the file keeps them for the operator
    on_disk = json.loads((tmp_path / PROFILE_SUBDIR / "a100-good.json").read_text())
    assert on_disk["provenance"]["run_dir"] == "/srv/secret/run"


# ---- installing: a small or worse calibration does not silently become the device's profile ----------------
def test_a_small_or_worse_fit_is_not_installed_unless_forced(tmp_path):
    from dataclasses import replace

    from advisor.profiles import MIN_INSTALL_TRIALS, install_decision

    store = ProfileStore(tmp_path)
    current = Profile.from_dict(good_profile(A100.to_dict(), "a100-current"))  # 40 trials, 6 groups
    assert store.install(current)[1].install  # the device had none
    two = replace(
        Profile.from_dict(good_profile(A100.to_dict(), "a100-two-trials")),
        created_at="2026-02-01T00:00:00+0000",
        held_out=HeldOut(0.5, 1.0, 0.5, 1.0, 2, 2, 2, {}),  # better numbers, from two trials
    )
    path, decision = store.install(two)
    assert path is None and not decision.install and f"fewer than the {MIN_INSTALL_TRIALS} trials" in decision.reason
    assert store.match(A100).id == "a100-current"  # estimates keep the current profile
    worse = replace(two, id="a100-worse", held_out=HeldOut(5.0, 9.0, 4.0, 20.0, 40, 38, 6, {}))
    path, decision = store.install(worse)
    assert path is None and "does not beat the device's profile a100-current" in decision.reason
    no_step = replace(two, id="a100-no-step", held_out=HeldOut(1.0, 9.0, None, None, 40, 0, 6, {}))
    assert not store.install(no_step)[1].install  # cannot say it predicts step time better
    better = replace(two, id="a100-better", held_out=HeldOut(2.0, 9.0, 7.0, 20.0, 40, 38, 6, {}))
    path, decision = store.install(better)
    assert path is not None and decision.replaces == "a100-current" and store.match(A100).id == "a100-better"
    path, decision = store.install(replace(two, created_at="2026-03-01T00:00:00+0000"), force=True)
    assert path is not None and decision.reason == "installed explicitly (force)"
    assert store.match(A100).id == "a100-two-trials"
    assert install_decision(two, None).install is False  # small: not even for a device without a profile


@pytest.mark.needs_torch
def test_api_cancel_and_who_may_force_an_install(tmp_path):
    import time

    from advisor.api.auth import match_key

    other = "another-key-0123456789abcdef"
    settings = Settings(data_dir=tmp_path, api_keys=[KEY, other], calibration_install_keys=[match_key(KEY, [KEY])])
    with TestClient(create_app(settings)) as c:
        body = {"device": "cpu", "max_trials": 2, "threads": 1, "install": "force"}
        r = c.post("/v1/calibrations", json=body, headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 403 and r.json()["field"] == "install", r.text
        r = c.post("/v1/calibrations", json=body, headers=AUTH)
        assert r.status_code == 202, r.text
        run = r.json()["id"]
        r = c.post(f"/v1/calibrations/{run}/cancel", headers=AUTH)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while (status := c.get(f"/v1/calibrations/{run}", headers=AUTH).json()["run"])["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["status"] == "cancelled" and status["error"].startswith("cancelled")
        assert not status["installed"] and c.get("/v1/calibrations", headers=AUTH).json()["profiles"] == []
        assert c.post(f"/v1/calibrations/{run}/cancel", headers=AUTH).status_code == 409
        assert c.post("/v1/calibrations/nope/cancel", headers=AUTH).status_code == 404
        assert c.post(f"/v1/calibrations/{run}/cancel").status_code == 401


@pytest.mark.needs_torch
def test_a_real_trial_process_has_a_scrubbed_environment_and_cancelling_kills_it(tmp_path, monkeypatch):
    """A real trial process (forked by the real trial server) is held at its spec, a FIFO nobody writes, while
    its environment is read from /proc: the server's keys, secrets and tokens are not there. Then the run's
    `should_stop` turns true: the trial process is killed and RunCancelled raised."""
    import os

    from calibration.runner import RunCancelled, TrialServer

    secrets = {
        "ADVISOR_API_KEYS": "key-one,key-two",
        "ADVISOR_WEBHOOK_SECRET": "whsec",
        "ADVISOR_DATABASE_URL": "postgresql://u:pw@db/advisor",
        "HF_TOKEN": "hf_secret",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "PGPASSWORD": "pg",
        "CUDA_LAUNCH_TOKEN": "under-a-kept-prefix",
        "UNRELATED_SETTING": "x",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = tmp_path / "held.trial.json"
    os.mkfifo(spec)
    server = TrialServer(tmp_path / "server.log")
    environ: list[str] = []

    def should_stop() -> bool:  # polled while the trial runs: read its environment, then cancel
        if not environ:
            assert server.current_pid is not None
            environ.append(str(server.current_pid))
            environ.append(Path(f"/proc/{server.current_pid}/environ").read_bytes().decode())
        return True

    try:
        with pytest.raises(RunCancelled, match="held"):
            server.run(spec, tmp_path / "r.json", tmp_path / "t.log", timeout_s=120, should_stop=should_stop)
        assert server.current_pid is None and server.alive()  # the server goes on (the run's finally closes it)
        assert not Path(f"/proc/{environ[0]}").exists()  # killed and reaped
    finally:
        server.close()
    env = dict(item.split("=", 1) for item in environ[1].split("\0") if "=" in item)
    assert not set(secrets) & set(env), set(secrets) & set(env)
    assert env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env.get("PATH")
