"""JobSpec and model sources: strict values, no path outside the allowed roots, OpenAI's auto rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advisor.errors import InvalidInputError
from advisor.jobs.errors import ModelSourceError
from advisor.jobs.spec import (
    HF_ID,
    JobSpec,
    ModelSource,
    local_model_source,
    resolve_hyperparameters,
)
from advisor.plans import TrainingPlan


def _spec(**kw) -> JobSpec:
    plan = TrainingPlan(method="lora", gpu_id="cpu", dtype="fp32", micro_batch=2, grad_accum=2, seq_len=32)
    base = dict(
        job_id="ftjob-0123456789ab",
        model="/models/m",
        source=ModelSource("local", "/models/m"),
        plan=plan,
        training_file="/data/files/file-1.jsonl",
        n_epochs=1,
        batch_size=4,
        learning_rate=1e-4,
    )
    base.update(kw)
    return JobSpec(**base)


def test_spec_round_trips_through_json() -> None:
    spec = _spec(suffix="my-run", notes=("n",))
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.plan.id == spec.plan.id
    assert spec.fine_tuned_model == "ft:m:my-run:ftjob-0123456789ab"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"job_id": "ftjob-x; rm -rf /"}, "job_id"),
        ({"training_file": "relative/file.jsonl"}, "training_file"),
        ({"training_file": "/data/../etc/passwd"}, "training_file"),
        ({"validation_file": "/data/a\x00b"}, "validation_file"),
        ({"suffix": "a b$(x)"}, "suffix"),
        ({"batch_size": 8}, "batch_size"),  # 2 x 2 x 1 != 8
        ({"device": "tpu"}, "device"),
        ({"learning_rate": float("nan")}, "hyperparameters.learning_rate_multiplier"),
    ],
)
def test_spec_refuses_unsafe_or_inconsistent_values(kw, field) -> None:
    with pytest.raises(InvalidInputError) as e:
        _spec(**kw)
    assert e.value.field == field


@pytest.mark.parametrize("good", ["meta-llama/Llama-2-7b-hf", "gpt2", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_hf_ids_accepted(good: str) -> None:
    assert HF_ID.match(good)
    ModelSource("hf", good)


@pytest.mark.parametrize("bad", ["a/../b", "-rf/x", "a;rm/x", "a/b/c", "a b/c", "$(x)/y", ""])
def test_hf_ids_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        ModelSource("hf", bad)


def test_local_model_must_be_inside_a_root_even_through_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "m", outside / "m"):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    assert local_model_source(str(root / "m"), [root]).ref == str((root / "m").resolve())
    (root / "escape").symlink_to(outside / "m")
    with pytest.raises(ModelSourceError, match="outside the allowed model roots"):
        local_model_source(str(root / "escape"), [root])
    with pytest.raises(ModelSourceError, match="outside"):
        local_model_source(str(root / ".." / "outside" / "m"), [root])
    with pytest.raises(ModelSourceError, match="absolute"):
        local_model_source("root/m", [root])
    with pytest.raises(ModelSourceError, match="no local model directories"):
        local_model_source(str(root / "m"), [])
    (root / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        local_model_source(str(root / "empty"), [root])


def test_auto_hyperparameters_follow_openai_rules() -> None:
    hp = resolve_hyperparameters("lora", 10_000)
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (3, 20, 1.0)
    assert hp.learning_rate == pytest.approx(2e-4)
    assert hp.micro_batch * hp.grad_accum == hp.batch_size and len(hp.chosen) == 3
    assert resolve_hyperparameters("full", 10**7).batch_size == 256  # capped
    assert resolve_hyperparameters("full", 5).batch_size == 1
    assert resolve_hyperparameters("full", 5).learning_rate == pytest.approx(2e-5)
    # auto batches round up to whole micro-batches on every process
    hp = resolve_hyperparameters("lora", 10_000, micro_batch=8, world=2)
    assert hp.batch_size == 32 and hp.micro_batch == 8 and hp.grad_accum == 2


def test_explicit_batch_must_split_into_micro_batches() -> None:
    with pytest.raises(InvalidInputError) as e:
        resolve_hyperparameters("lora", 100, batch_size=6, micro_batch=4)
    assert e.value.field == "hyperparameters.batch_size"
    with pytest.raises(InvalidInputError) as e:
        resolve_hyperparameters("lora", 100, n_epochs=0)
    assert e.value.field == "hyperparameters.n_epochs"
