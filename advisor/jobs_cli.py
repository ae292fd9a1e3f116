"""`advisor jobs ...`: fine-tuning jobs on a running service, through advisor.client.

Why a client of the HTTP API and not of the job layer: the jobs run where the service runs (its
devices, its store); the CLI is how a person drives them from a shell, with the same checks and
errors an API caller gets. The server is ``--url`` (or ADVISOR_URL), the key ``--api-key`` (or
ADVISOR_API_KEY).

``create`` takes a plan id from ``advisor recommend`` / ``/v1/recommend``, an explicit ``--method``,
or neither: then it asks the service's recommend for the model and GPU and starts its top plan that
this deployment can launch. ``follow`` draws a progress bar with the loss until the job ends; its exit
code says how it ended (0 succeeded, 1 failed or cancelled, 2 a refused request).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from advisor.client import AdvisorAPIError, AdvisorClient

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
TERMINAL = ("succeeded", "failed", "cancelled")
EXIT_HELP = "exit 0 succeeded, 1 failed or cancelled, 2 a refused request"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("jobs", help="fine-tuning jobs on a running service (create, list, follow, cancel, ...)")
    p.add_argument("--url", default=os.environ.get("ADVISOR_URL", "http://127.0.0.1:8000"), help="the service")
    p.add_argument("--api-key", default=os.environ.get("ADVISOR_API_KEY"), help="default: ADVISOR_API_KEY")
    jobs = p.add_subparsers(dest="action", required=True, parser_class=type(p))

    c = jobs.add_parser("create", help="start a job: from a plan id, a method, or the top plan of a recommend")
    c.add_argument("--model", required=True, help="catalog name, Hugging Face id, or a model directory on the server")
    c.add_argument("--training-file", required=True, help="a file id (file-...) or a local JSONL file to upload")
    c.add_argument("--validation-file", default=None, help="a file id or a local JSONL file")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--plan-id", default=None, help="a plan id from recommend: the job runs that plan")
    how.add_argument("--method", default=None, help="full, lora, qlora, ... (no recommend)")
    c.add_argument("--gpu", default=None, help="recommend for this GPU (default: the service's job device)")
    c.add_argument("--seq-len", type=int, default=None, help="training sequence length")
    c.add_argument("--epochs", type=int, default=None, help="n_epochs (default auto)")
    c.add_argument("--batch-size", type=int, default=None, help="sequences per optimiser step (default auto)")
    c.add_argument("--suffix", default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--follow", action="store_true", help="then follow it to its end (exit code as `follow`)")

    jobs.add_parser("list", help="your jobs, newest first").add_argument("--limit", type=int, default=20)
    for name, text in (
        ("get", "one job as JSON"),
        ("cancel", "cancel a job"),
        ("pause", "pause a job (a running one checkpoints first)"),
        ("resume", "resume a paused job from its last checkpoint"),
        ("logs", "the tail of the training process' log"),
    ):
        jobs.add_parser(name, help=text).add_argument("job_id")
    e = jobs.add_parser("events", help="a job's events, oldest first")
    e.add_argument("job_id")
    e.add_argument("--limit", type=int, default=100)
    f = jobs.add_parser("follow", help=f"a progress bar with the loss until the job ends ({EXIT_HELP})")
    f.add_argument("job_id")
    f.add_argument("--interval", type=float, default=1.0, help="seconds between polls")


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        with AdvisorClient(args.url, api_key=args.api_key, timeout=60) as client:
            return ACTIONS[args.action](client, args)
    except AdvisorAPIError as exc:  # the one place an API error becomes a message and an exit code
        print(f"advisor jobs {args.action}: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def _file_id(client: AdvisorClient, ref: str | None) -> str | None:
    """A file id as is; a local file is uploaded first."""
    if ref is None or (ref.startswith("file-") and not Path(ref).exists()):
        return ref
    path = Path(ref)
    uploaded = client.upload_file(path.name, path.read_bytes())
    print(f"uploaded {path} as {uploaded.id} ({uploaded.examples} examples)", file=sys.stderr)
    return uploaded.id


def _top_plan(client: AdvisorClient, args: argparse.Namespace) -> str:
    """The first plan of a recommend that this deployment can launch; a model directory on this machine
    is posted as its config.json."""
    config = Path(args.model) / "config.json"
    model: Any = json.loads(config.read_text()) if config.is_file() else args.model
    workload = {"seq_len": args.seq_len} if args.seq_len else None
    rec = client.recommend(model, gpu=args.gpu, workload=workload)
    for ranked in rec.plans:
        if getattr(ranked, "launchable", True):
            print(f"recommend's top plan: {ranked.plan.id}", file=sys.stderr)
            return ranked.plan.id
    raise AdvisorAPIError(409, "no_launchable_plan", "recommend found no plan this deployment can launch")


def _create(client: AdvisorClient, args: argparse.Namespace) -> int:
    hp = {k: v for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    method: dict[str, Any] | None = None
    plan_id = args.plan_id
    if args.method:
        advisor = {"type": args.method, **({"seq_len": args.seq_len} if args.seq_len else {})}
        method = {"type": "supervised", "supervised": {"hyperparameters": hp}, "advisor": advisor}
    elif plan_id is None:
        plan_id = _top_plan(client, args)
    if plan_id is not None and args.seq_len:
        method = {"type": "supervised", "advisor": {"seq_len": args.seq_len}}
    job = client.create_job(
        args.model,
        _file_id(client, args.training_file),
        plan_id=plan_id,
        method=method,
        hyperparameters=hp if hp and not args.method else None,
        validation_file=_file_id(client, args.validation_file),
        suffix=args.suffix,
        seed=args.seed,
    )
    print(job.id)
    if args.follow:
        args.job_id, args.interval = job.id, 1.0
        return _follow(client, args)
    return EXIT_OK


def _list(client: AdvisorClient, args: argparse.Namespace) -> int:
    rows = [
        [j.id, j.status, j.model, (j.method.advisor or {}).get("type", "") if j.method else "", _when(j.created_at)]
        for j in client.jobs(limit=args.limit).data
    ]
    widths = [max(len(str(r[i])) for r in [["ID", "STATUS", "MODEL", "METHOD", "CREATED"], *rows]) for i in range(5)]
    for r in [["ID", "STATUS", "MODEL", "METHOD", "CREATED"], *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _show(job: Any) -> int:
    print(json.dumps(job.model_dump(mode="json"), indent=2))
    return EXIT_OK


def _events(client: AdvisorClient, args: argparse.Namespace) -> int:
    for e in client.job_events(args.job_id, limit=args.limit, order="asc").data:
        print(f"{_when(e.created_at)}  {e.level:<5}  {e.message}")
    return EXIT_OK


def bar(progress: dict[str, Any] | None, width: int = 30) -> str:
    """`[#####-----] step 8/900  loss 5.8050  4980 tok/s` from a job's progress."""
    p = progress or {}
    step, total = int(p.get("step") or 0), int(p.get("total_steps") or 0)
    filled = int(width * step / total) if total else 0
    text = f"[{'#' * filled}{'-' * (width - filled)}] step {step}/{total or '?'}"
    if p.get("train_loss") is not None:
        text += f"  loss {p['train_loss']:.4f}"
    if p.get("tokens_per_s"):
        text += f"  {p['tokens_per_s']:.0f} tok/s"
    return text


def _follow(client: AdvisorClient, args: argparse.Namespace) -> int:
    """Redraws one line on a terminal; elsewhere prints a line whenever the step or status changes."""
    tty = sys.stdout.isatty()
    last = ""
    while True:
        job = client.job(args.job_id)
        line = f"{job.status:<10} {bar(job.progress)}"
        if line != last:
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last = line
        if job.status in TERMINAL:
            if tty:
                print()
            if job.status == "succeeded":
                print(f"fine-tuned model: {job.fine_tuned_model}")
                return EXIT_OK
            if job.error:
                print(f"{job.status}: {job.error.code}: {job.error.message}")
            return EXIT_FAILED
        time.sleep(args.interval)


ACTIONS = {
    "create": _create,
    "list": _list,
    "get": lambda c, a: _show(c.job(a.job_id)),
    "cancel": lambda c, a: _show(c.cancel_job(a.job_id)),
    "pause": lambda c, a: _show(c.pause_job(a.job_id)),
    "resume": lambda c, a: _show(c.resume_job(a.job_id)),
    "logs": lambda c, a: print(c.job_logs(a.job_id), end="") or EXIT_OK,
    "events": _events,
    "follow": _follow,
}
