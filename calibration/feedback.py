"""Finished jobs' measurements as extra rows of a calibration fit: the feedback loop.

A job that trained at least one step leaves a measurement in the job store (the ``measured`` column:
peak memory and the meter that produced it, median step time) and, in its job directory, the same run
as a calibration record (``measurement.json``, ``calibration.trial.TrialResult``'s shape: architecture,
plan, memory reading). ``job_records`` reads the store (the same SQLAlchemy URL the service uses) and
turns each finished job into that record shape, so ``calibration.fit`` can take it beside its trials.

What a job row carries beyond a trial row:

* ``memory_meters``: meter name -> peak bytes, every meter the job recorded. The fit uses a job only
  when one of these is the meter the profile is fitted on (``cpu:torch_dispatch_live_storage_bytes``
  on a CPU, ``cuda:max_memory_allocated`` on a GPU): a whole-process RSS is not comparable to live
  tensor bytes, and the fit says so instead of mixing them.
* ``source: "job"``, ``job_id``, and ``skip`` (why the row cannot join any fit: no architecture, no
  memory figure), so every finished job is accounted for.

Accepted from the job (``advisor.jobs.train``), newest form first: ``measured["memory_meters"]``
({meter: bytes}); ``measured["memory_meter"]`` with ``measured["peak_memory_gib"]``;
``measurement.json``'s ``memory`` reading (``meter``, ``peak_bytes``, ``reserved_bytes``,
``rss_peak_bytes``); ``measured["step_time_meter"]`` or the record's ``step_time_meter``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.jobs.store import Store
from advisor.stack.outcomes import CPU_LIVE_METER, CPU_RSS_METER, CUDA_ALLOCATED_METER, CUDA_RESERVED_METER

__all__ = [
    "CPU_LIVE_METER",
    "CPU_RSS_METER",
    "CUDA_ALLOCATED_METER",
    "CUDA_RESERVED_METER",
    "JobFeedback",
    "job_records",
    "job_store_url",
    "read_job_feedback",
    "select_job_rows",
]

JOB_PREFIX = "job:"
MEASUREMENT = "measurement.json"  # advisor.jobs.train.MEASUREMENT


@dataclass
class JobFeedback:
    """Finished jobs' rows for a fit (``job_records``) and where they came from."""

    rows: list[dict[str, Any]]
    source: str  # the job store's URL, password hidden
    #: set by the fit: the rows it used (memory = the fitted meter's reading) and those it skipped (with `skip`)
    used: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def read_job_feedback(
    data_dir: str | Path | None = None, store: Store | str | None = None, jobs_dir: str | Path | None = None
) -> JobFeedback:
    """``job_records`` from the service's job store (or `store`), ready for ``calibration.fit.write_fit(jobs=...)``."""
    from sqlalchemy.engine import make_url

    url = store.url if isinstance(store, Store) else str(store or job_store_url(data_dir))
    rows = job_records(store if store is not None else url, data_dir=data_dir, jobs_dir=jobs_dir)
    return JobFeedback(rows=rows, source=make_url(url).render_as_string(hide_password=True))


def service_settings(data_dir: str | Path | None = None) -> Any:
    """The service's Settings (``ADVISOR_*``), with `data_dir` (e.g. ``advisor calibrate --data-dir``) on top."""
    from advisor.api.settings import Settings

    return Settings(data_dir=Path(data_dir)) if data_dir is not None else Settings()


def job_store_url(data_dir: str | Path | None = None) -> str:
    """The job store's URL exactly as the service resolves it: ``ADVISOR_DATABASE_URL``, else SQLite in the data dir."""
    return str(service_settings(data_dir).resolved_database_url)


def job_records(
    store: Store | str | None = None,
    data_dir: str | Path | None = None,
    jobs_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Every finished job with a measurement, as a calibration record (oldest first).

    `store`: a Store or a URL (default: the service's); `jobs_dir`: where the job directories are (default:
    <data dir>/jobs), read for each job's ``measurement.json`` (architecture and full memory reading).
    A store URL whose database does not exist yet gives no rows (no job has ever run)."""
    settings = service_settings(data_dir)
    jdir = Path(jobs_dir).expanduser() if jobs_dir else settings.resolved_data_dir / "jobs"
    own = not isinstance(store, Store)
    if own:
        url = str(store) if store is not None else str(settings.resolved_database_url)
        if _missing_sqlite(url):
            return []
        store = Store(url)
    assert isinstance(store, Store)
    try:
        rows = store.finished_measurements()
    except Exception as exc:  # an empty database (no tables yet) is not an error: no job ran
        if "no such table" in str(exc):
            return []
        raise
    finally:
        if own:
            store.close()
    return [job_record(r, _read_json(jdir / r["id"] / MEASUREMENT)) for r in rows]


def job_record(row: dict[str, Any], record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One store row (``Store.finished_measurements``), plus its measurement.json when there is one,
    as a TrialResult-shaped dict."""
    spec = dict(row.get("spec") or {})
    measured = dict(row.get("measured") or {})
    rec = dict(record or {})
    if rec.get("trial_id") not in (None, row["id"]):
        rec = {}  # a stale file from another job: ignore it
    plan = dict(spec.get("plan") or rec.get("plan") or {})
    meters = _meters(measured, rec.get("memory"))
    primary = measured.get("memory_meter") or (rec.get("memory") or {}).get("meter")
    memory = None
    if primary in meters:
        memory = {
            "meter": primary,
            "peak_bytes": meters[primary],
            "reserved_bytes": meters.get(CUDA_RESERVED_METER),
            "device_total_bytes": None,
            "device_total_meter": None,
        }
    arch, arch_source = _arch(spec, rec)
    error = row.get("error") or {}
    status = row.get("status")
    if status == "failed":
        status = "oom" if error.get("code") == "oom" else "error"
    else:  # succeeded, or cancelled after training steps: its steps are measurements
        status = "ok"
    skip = None
    if arch is None:
        skip = "architecture unknown (no measurement.json with arch, no local config.json)"
    elif not meters:
        skip = "no memory figure"
    elif not plan:
        skip = "no plan"
    step_time_meter = measured.get("step_time_meter") or rec.get("step_time_meter")
    if step_time_meter is None:  # advisor.jobs.train: wall clock per optimiser step, synchronised on CUDA
        step_time_meter = "cuda_synchronized_wall" if spec.get("device") == "cuda" else "wall"
    return {
        "trial_id": JOB_PREFIX + row["id"],
        "group": JOB_PREFIX + str(row.get("model") or spec.get("model") or row["id"]),
        "status": status,
        "arch": arch,
        "plan": plan,
        "device": rec.get("device") or spec.get("device") or "cpu",
        "error": None if not error else f"{error.get('code')}: {str(error.get('message', ''))[:200]}",
        "memory": memory,
        "memory_meters": meters,
        "step_time_s": measured.get("step_time_s", rec.get("step_time_s")),
        "step_time_meter": step_time_meter,
        "timing_spread": rec.get("timing_spread"),
        "cpu_contention": rec.get("cpu_contention"),
        "threads": rec.get("threads"),
        "loss": measured.get("final_loss", rec.get("loss")),
        "source": "job",
        "job_id": row["id"],
        "arch_source": arch_source,
        "finished_at": row.get("finished_at"),
        "skip": skip,
    }


def _meters(measured: dict[str, Any], memory: dict[str, Any] | None) -> dict[str, int]:
    """meter name -> peak bytes, from every place a job may have put one."""
    out: dict[str, int] = {}
    mem = memory or {}
    if mem.get("meter") and mem.get("peak_bytes") is not None:
        out[mem["meter"]] = int(mem["peak_bytes"])
    if mem.get("reserved_bytes") is not None:
        out[CUDA_RESERVED_METER] = int(mem["reserved_bytes"])
    if mem.get("rss_peak_bytes"):
        out.setdefault(CPU_RSS_METER, int(mem["rss_peak_bytes"]))
    if measured.get("memory_meter") and measured.get("peak_memory_gib") is not None:
        out[measured["memory_meter"]] = round(float(measured["peak_memory_gib"]) * 2**30)
    for name, value in (measured.get("memory_meters") or {}).items():
        if value is not None:
            out[str(name)] = int(value)
    return out


def _arch(spec: dict[str, Any], rec: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The trained architecture: the job's own record, else the local model's config.json, else the
    Hugging Face cache's copy (no download)."""
    if rec.get("arch"):
        return dict(rec["arch"]), MEASUREMENT
    source = spec.get("source") or {}
    if source.get("kind") == "local":
        cfg = _read_json(Path(source["ref"]) / "config.json")
        if cfg and cfg.get("model_type"):
            return cfg, "local config.json"
    if source.get("kind") == "hf":
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(source["ref"], "config.json", revision=source.get("revision"))
        except Exception:
            hit = None
        if isinstance(hit, str):
            cfg = _read_json(Path(hit))
            if cfg and cfg.get("model_type"):
                return cfg, "Hugging Face cache config.json"
    return None, None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _missing_sqlite(url: str) -> bool:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return False
    return not Path(u.database).expanduser().exists()


# ---- selection: which rows join a fit ------------------------------------------------------------------
def fitted_meter(gpu_class: str) -> str:
    """The meter a profile's peak memory is fitted on (the trials' meter)."""
    return CPU_LIVE_METER if gpu_class == "cpu" else CUDA_ALLOCATED_METER


def _norm(text: str) -> str:
    t = text.lower()
    for word in ("nvidia", "geforce", "tesla", "cuda"):
        t = t.replace(word, "")
    return "".join(c for c in t if c.isalnum())


def same_device(row: dict[str, Any], device: dict[str, Any]) -> str | None:
    """None when the job ran on the profile's device, else why not."""
    cpu_profile = device.get("gpu_class") == "cpu"
    kind = str(row.get("device") or "cpu").split(":")[0]
    if cpu_profile != (kind == "cpu"):
        return f"device {kind} != {'cpu' if cpu_profile else 'cuda'}"
    if cpu_profile:
        return None
    if (row.get("plan") or {}).get("gpu_id") == device.get("id"):
        return None
    name = _norm(str(row.get("device") or ""))
    keys = [_norm(str(x)) for x in (device.get("name"), device.get("id"), *(device.get("aliases") or ()))]
    if name and any(k and k in name for k in keys):
        return None
    return f"device {row.get('device')} != {device.get('name')}"


def select_job_rows(
    rows: Iterable[dict[str, Any]], device: dict[str, Any], threads: int | None, step_time_meter: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows that join the fit, each with ``memory`` set to the fitted meter's reading; skipped rows with
    ``skip`` = the reason). A usable memory figure with a step time measured differently from the trials
    (another clock, another thread count) joins the memory fit only (``step_time_s`` None, ``step_time_skip``)."""
    meter = fitted_meter(device.get("gpu_class", "cpu"))
    used: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for r in rows:
        reason = r.get("skip")
        if reason is None and r.get("status") != "ok":
            reason = f"status {r.get('status')}"
        if reason is None:
            reason = same_device(r, device)
        meters = r.get("memory_meters") or {}
        if reason is None and meter not in meters:
            have = ", ".join(sorted(meters)) or "none"
            reason = f"meter {have} != {meter}"
        if reason is not None:
            skipped.append({**r, "skip": reason})
            continue
        row = dict(r)
        mem = dict(row.get("memory") or {})
        row["memory"] = {
            **mem,
            "meter": meter,
            "peak_bytes": meters[meter],
            "reserved_bytes": meters.get(CUDA_RESERVED_METER) if meter == CUDA_ALLOCATED_METER else None,
        }
        why_not_time = None
        if row.get("step_time_s") is None:
            why_not_time = "no step time"
        elif step_time_meter and row.get("step_time_meter") != step_time_meter:
            why_not_time = f"step time meter {row.get('step_time_meter')} != {step_time_meter}"
        elif device.get("gpu_class") == "cpu" and threads and row.get("threads") and row["threads"] != threads:
            why_not_time = f"{row['threads']} threads != {threads}"
        if why_not_time:
            row["step_time_s"] = None
            row["step_time_skip"] = why_not_time
        used.append(row)
    return used, skipped


def summary_line(used: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> str:
    """ "N job measurements used, M skipped: reason (count); ..." (the fit's report line)."""
    counts: dict[str, int] = {}
    for r in skipped:
        counts[r["skip"]] = counts.get(r["skip"], 0) + 1
    timed = sum(1 for r in used if r.get("step_time_s") is not None)
    head = f"{len(used)} job measurements used ({timed} with step time), {len(skipped)} skipped"
    if not counts:
        return head
    return head + ": " + "; ".join(f"{k} ({n})" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
