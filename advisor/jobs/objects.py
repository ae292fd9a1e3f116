"""Store rows -> the objects OpenAI's fine-tuning API returns (so its clients parse them), plus ours.

Our extensions sit beside OpenAI's fields and never change their meaning: ``method`` is OpenAI's
(``type: supervised`` with ``supervised.hyperparameters``: clients branch on the type) and carries the
training method we ran (full | lora | qlora and its settings) in its ``advisor`` extension object,
``plan``/``plan_id`` the TrainingPlan,
``estimate`` what the estimator predicted at launch and ``measured`` what the run measured (with
``vs_estimate`` ratios), ``progress`` the latest step's metrics.
"""

from __future__ import annotations

from typing import Any

ORGANIZATION = "org-local"


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    spec = row.get("spec") or {}
    progress = row.get("progress") or None
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": int(row["created_at"]),
        "error": row.get("error"),
        "fine_tuned_model": row.get("fine_tuned_model"),
        "finished_at": row.get("finished_at"),
        "hyperparameters": row.get("hyperparameters") or {},
        "model": row["model"],
        "organization_id": ORGANIZATION,
        "result_files": row.get("result_files") or [],
        "seed": int(row["seed"]),
        "status": row["status"],
        "trained_tokens": row.get("trained_tokens"),
        "training_file": row["training_file"],
        "validation_file": row.get("validation_file"),
        "estimated_finish": _estimated_finish(row, progress),
        "integrations": [],
        "metadata": row.get("metadata"),
        "suffix": row.get("suffix"),
        "method": method_object(row),
        "plan_id": row.get("plan_id"),
        "plan": spec.get("plan"),
        "estimate": row.get("estimate"),
        "measured": row.get("measured"),
        "progress": progress,
    }


#: OpenAI's method types; a stored method named anything else (full, lora, qlora, ...) is supervised
OPENAI_METHODS = ("supervised", "dpo", "reinforcement")


def method_object(row: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's `method`: {type: supervised, supervised: {hyperparameters}}, and what ran (full, LoRA,
    QLoRA and their knobs, as the store keeps them) in the `advisor` extension object."""
    ran = row.get("method")
    if not ran:
        return None
    kind = ran.get("type")
    if kind in OPENAI_METHODS:  # already OpenAI's shape
        return dict(ran)
    hp = row.get("hyperparameters") or {}
    return {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {k: hp.get(k) for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
        },
        "advisor": dict(ran),
    }


#: OpenAI's checkpoint metrics (None where the run did not measure it); other keys follow them
CHECKPOINT_METRICS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)


def _estimated_finish(row: dict[str, Any], progress: dict[str, Any] | None) -> int | None:
    if row["status"] != "running" or not progress or not row.get("started_at"):
        return None
    step, total, elapsed = progress.get("step"), progress.get("total_steps"), progress.get("elapsed_s")
    if not step or not total or not elapsed:
        return None
    return int(row["started_at"] + elapsed / step * total)


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.event",
        "created_at": int(row["created_at"]),
        "level": row["level"],
        "message": row["message"],
        "data": row.get("data"),
        "type": row["type"],
    }


def checkpoint_object(row: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    base = (
        job.get("fine_tuned_model")
        or f"ft:{job['model'].rstrip('/').split('/')[-1]}:{job.get('suffix') or ''}:{job['id']}"
    )
    measured = dict(row.get("metrics") or {})
    measured.setdefault("step", int(row["step"]))
    metrics = {k: measured.pop(k, None) for k in CHECKPOINT_METRICS} | measured
    return {
        "id": row["id"],
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(row["created_at"]),
        "fine_tuned_model_checkpoint": f"{base}:ckpt-step-{row['step']}",
        "fine_tuning_job_id": row["job_id"],
        "metrics": metrics,
        "step_number": int(row["step"]),
    }


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": int(row["bytes"]),
        "created_at": int(row["created_at"]),
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
        "examples": row.get("examples"),
        "format": row.get("format"),
    }


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
