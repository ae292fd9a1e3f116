"""advisor: models | gpus | estimate | recommend (and the edges added by later issues).

Readable tables by default, JSON with --json. Bad input: one line naming the flag, exit code 2.
`estimate` and `recommend` carry the verdict in the exit code (with --json too), so
`advisor estimate ... && accelerate launch ...` only launches a plan that fits with its error band:
0 fits, 1 does not fit or its memory band crosses the GPU's memory (recommend: no plan fits with its
band), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from advisor import calibrate_cli, jobs_cli
from advisor.api import serve as serve_cli
from advisor.api import views
from advisor.calibrate_cli import positive_int  # the argparse type both command sets use
from advisor.catalog import build_catalog
from advisor.catalog.prices import price_label
from advisor.errors import AdvisorError, InvalidInputError
from advisor.estimators.uncertainty import BAND_CROSSES, FITS
from advisor.hub import HubOptions
from advisor.jobs import db_cli
from advisor.launchable import launchability
from advisor.methods import DEFAULT_SEARCH, METHOD_NAMES, get_method
from advisor.plans import PLAN_FIELDS, make_plan
from advisor.recommend import OBJECTIVES, Constraints
from advisor.service import AdvisorService, RecommendRequest
from advisor.specs import ModelSpec, Workload
from advisor.units import DTYPES, GIB


def _params_text(m, digits: int) -> str:
    """E.g. "7.24B params"; a mixture of experts also says how many a token runs through."""
    text = f"{m.param_count / 1e9:.{digits}f}B params"
    if m.is_moe:
        text += f", {m.active_param_count / 1e9:.{digits}f}B active: {m.experts_per_token} of {m.num_experts} experts"
    return text


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: error field -> the flag that sets it (every plan field's flag comes from the plan field table)
FLAGS = {
    **{f.name: _flag(f.name) for f in PLAN_FIELDS if f.metadata["cli"]},
    "model": "--model",
    "gpu": "--gpu",
    "plan.seq_len": "--seq-len",
    "dataset_tokens": "--dataset-tokens",
    "epochs": "--epochs",
    "objective": "--objective",
    "max_budget_usd": "--max-budget-usd",
    "deadline_hours": "--deadline-hours",
    "max_gpus": "--max-gpus",
    "methods": "--methods",
    "gpu_file": "--gpu-file",
    "price_file": "--price-file",
    "providers": "--provider",
    "model_revision": "--revision",
    "price_basis": "--price-basis",
    "source": "--source",
    **calibrate_cli.FLAGS,
}


#: exit codes of `estimate` and `recommend` (what a shell guard reads)
EXIT_FITS, EXIT_NO_FIT, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CODES_HELP = (
    "exit status: 0 the plan fits with its error band; 1 it does not fit, or its memory band (the p90 error the "
    "benches measured for this kind of estimate) crosses the GPU's memory; 2 bad input. "
    "So `advisor estimate ... && accelerate launch ...` only launches a plan that fits."
)
RECOMMEND_EXIT_HELP = (
    "exit status: 0 at least one plan fits with its error band; 1 no plan fits, or every plan's memory band "
    "crosses its GPU's memory; 2 bad input."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _tokens(text: str) -> int:
    """Accepts 5000000, 5e6, 5M, 2B."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 5000000, 5M, 2B)") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return int(v)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(","))


def _plan_args(p: argparse.ArgumentParser) -> None:
    """One flag per plan field of the plan field table (advisor.plans); left out = make_plan's default."""
    for f in PLAN_FIELDS:
        meta = f.metadata
        if not meta["cli"]:
            continue
        default = meta["resolved"] or (",".join(f.default) if isinstance(f.default, tuple) else f.default)
        doc = f"{meta['doc']} (default: {default})"
        if f.name == "method":
            p.add_argument(_flag(f.name), required=True, choices=meta["choices"], help=meta["doc"])
        elif isinstance(f.default, bool):
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif meta["choices"]:
            p.add_argument(_flag(f.name), choices=meta["choices"], default=None, help=doc)
        elif isinstance(f.default, tuple):
            p.add_argument(_flag(f.name), type=_csv, default=None, help=doc)
        else:
            p.add_argument(_flag(f.name), type=_bounded(type(f.default), meta["bounds"]), default=None, help=doc)


def _bounded(kind: type, bounds: tuple | None) -> Callable[[str], Any]:
    """An argparse type that checks the plan field table's bounds, so a bad value fails at parse time."""

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if bounds is not None:
            lo, hi, incl = bounds
            if not (lo <= v <= hi if incl else lo <= v < hi):
                raise argparse.ArgumentTypeError(f"{text!r} must be in [{lo}, {hi}{']' if incl else ')'}")
        return v

    parse.__name__ = kind.__name__
    return parse


def _catalog_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-file", action="append", default=[], help="extra/overriding GPUs (JSON, same fields as the catalog)"
    )
    p.add_argument(
        "--price-file",
        help='price overrides: {"prices": {"a100-80gb": {"price_usd_per_hour": 1.5}}} or provider offers: '
        '{"offers": [{"gpu": "h100-sxm", "provider": "mycloud", "region": "eu", "on_demand_usd_per_gpu_hour": 2.1, '
        '"spot_usd_per_gpu_hour": 1.2, "source": "...", "date": "2026-11-30"}]}',
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="advisor", description="Hardware-aware fine-tuning advisor: will it fit, which method, how long, how much."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list catalog models")
    _catalog_args(p)
    p = sub.add_parser("gpus", help="list catalog GPUs with prices")
    _catalog_args(p)

    p = sub.add_parser(
        "estimate",
        help="memory breakdown and speed of one plan (exit 0 fits, 1 does not fit or band crosses, 2 bad input)",
        description="Memory breakdown, error band and speed of one plan. " + EXIT_CODES_HELP,
    )
    p.add_argument("--model", required=True, help="catalog name, HF id, path to config.json, or a size like 13B")
    _hub_args(p)
    p.add_argument(
        "--gpu",
        required=True,
        help="SkyPilot name (A100 = 40 GB, A100-80GB, H100, L4, A10, A10G), id or alias; A100:8 sets 8 GPUs",
    )
    _plan_args(p)
    p.add_argument("--claim-gib", type=_positive_float, default=None, help="check a published peak-memory claim")
    p.add_argument(
        "--source",
        choices=("auto", "analytical", "simulated"),
        default="auto",
        help="simulated: trace one training step under FakeTensorMode (needs the train extra; seconds to minutes)",
    )
    _catalog_args(p)

    p = sub.add_parser(
        "recommend",
        help="ranked plans for a model, GPU and workload (exit 0 a plan fits, 1 none fits, 2 bad input)",
        description="Ranked plans for a model, GPU and workload. " + RECOMMEND_EXIT_HELP,
    )
    p.add_argument(
        "--model",
        required=True,
        help="catalog name, Hugging Face id (org/name), path to config.json, or a size like 13B",
    )
    _hub_args(p)
    p.add_argument(
        "--gpu",
        action="append",
        default=None,
        help="SkyPilot name (A100 = 40 GB, A100-80GB, H100, L4, A10), id or alias, with a count (A100:8) or a memory "
        "filter (80GB+); repeat for several; default: every catalog GPU",
    )
    p.add_argument(
        "--provider",
        type=_csv,
        default=None,
        help="price GPUs at these providers only (comma-separated: aws,gcp,lambda,runpod,vast,...); default: the "
        "cheapest listed provider per GPU",
    )
    p.add_argument("--price-basis", choices=("on-demand", "spot"), default="on-demand", help="default on-demand")
    p.add_argument("--dataset-tokens", type=_tokens, default=None, help="default 10M")
    p.add_argument("--seq-len", type=positive_int, default=None, help="default 2048")
    p.add_argument("--epochs", type=_positive_float, default=None, help="default 1")
    p.add_argument("--objective", choices=OBJECTIVES, default="cost")
    p.add_argument("--max-budget-usd", type=_positive_float, default=None)
    p.add_argument("--deadline-hours", type=_positive_float, default=None)
    p.add_argument("--max-gpus", type=positive_int, default=8)
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_SEARCH),
        help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default {','.join(DEFAULT_SEARCH)})",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--limit", type=positive_int, default=10)
    _catalog_args(p)
    serve_cli.add_parsers(sub)
    calibrate_cli.add_parser(sub)
    db_cli.add_parser(sub)
    jobs_cli.add_parser(sub)
    return parser


# ---- commands ----------------------------------------------------------------------------------
def _hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--revision", default=None, help="branch, tag or commit sha of a Hugging Face model (also --model org/name@rev)"
    )
    p.add_argument(
        "--no-hub",
        action="store_true",
        help="never look model ids up on the Hugging Face Hub (as ADVISOR_HUB_LOOKUPS=0); HF_TOKEN, HF_HOME, "
        "HF_HUB_OFFLINE and HF_ENDPOINT apply to look-ups as in huggingface_hub",
    )


def _service(args: argparse.Namespace) -> AdvisorService:
    hub = HubOptions.from_env(enabled=False if getattr(args, "no_hub", False) else None)
    return AdvisorService(build_catalog(args.gpu_file, args.price_file), hub=hub)


def _checkpoint_lines(m: ModelSpec) -> list[str]:
    """What the Hub said about a model's checkpoint (nothing for catalog models)."""
    if m.checkpoint_params is None and m.revision is None:
        return []
    at = f" at {m.revision[:12]}" if m.revision else ""
    if m.checkpoint_params is None:
        lines = [f"checkpoint: {m.hf_id}{at}"]
    else:
        stored = ", ".join(f"{d} {n / 1e9:.3f}B" for d, n in m.checkpoint_dtypes)
        lines = [f"checkpoint: {m.hf_id}{at}: {m.checkpoint_params:,} parameters stored ({stored})"]
    return lines + ([f"model note: {m.note}"] if m.note else [])


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    svc = _service(args)
    models = svc.catalog.models
    if args.json:
        print(json.dumps([{**m.to_dict(), "params": m.param_count} for m in models], indent=1))
        return 0
    rows = [
        [m.name, m.hf_id, m.family, f"{m.param_count / 1e9:.2f}B", m.num_layers, m.hidden_size, m.vocab_size]
        for m in models
    ]
    print(_table(rows, ["name", "hf_id", "family", "params", "layers", "hidden", "vocab"]))
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    svc = _service(args)
    gpus = svc.catalog.gpus
    if args.json:
        print(json.dumps([g.to_dict() for g in gpus], indent=1))
        return 0
    rows = [
        [
            g.id,
            g.name,
            f"{g.memory_gib:.1f}",
            g.bf16_tflops or "-",
            g.fp16_tflops,
            g.memory_bandwidth_gbps,
            "yes" if g.bf16_supported else "no",
            g.price_usd_per_hour,
            g.price_date,
        ]
        for g in gpus
    ]
    print(_table(rows, ["id", "name", "GiB", "bf16 TF", "fp16 TF", "GB/s", "bf16", "$/h", "price date"]))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    svc = _service(args)
    model = svc.model(args.model, args.revision)
    gpu, count = svc.gpu_and_count(args.gpu)
    fields = {f.name: getattr(args, f.name) for f in PLAN_FIELDS if f.metadata["cli"] and f.name != "method"}
    if count is not None:
        if fields.get("num_gpus") not in (None, count):
            raise InvalidInputError(
                f"--gpu {args.gpu} says {count} GPUs, --num-gpus says {fields['num_gpus']}. To fix: give one count",
                field="gpu",
            )
        fields["num_gpus"] = count
    plan = make_plan(args.method, gpu, **fields)
    workload = Workload.given(seq_len=plan.seq_len)  # for the hours and cost; its assumptions are stated
    res = svc.estimate(model, gpu, plan, claimed_memory_gib=args.claim_gib, source=args.source, workload=workload)
    code = EXIT_FITS if res.estimate.memory.verdict == FITS else EXIT_NO_FIT
    if args.json:
        print(json.dumps(views.as_json(views.estimate_response(res)), indent=1))
        return code
    est, mem, speed = res.estimate, res.estimate.memory, res.estimate.speed
    print(
        f"{model.name} ({_params_text(model, 2)}) · {plan.method} on {plan.num_gpus}x {gpu.name} · "
        f"{plan.dtype} · micro-batch {plan.micro_batch} x {plan.seq_len} tokens · "
        f"checkpointing {'on' if plan.grad_checkpointing else 'off'} · {plan.optimizer}"
    )
    for line in _checkpoint_lines(model):
        print(line)
    rows = [[k, f"{v / GIB:.2f}"] for k, v in mem.components.items()]
    rows.append(["= peak (device total)", f"{mem.device_total_bytes / GIB:.2f}"])
    print(_table(rows, ["memory per GPU", "GiB"]))
    verdict = {FITS: "FITS", BAND_CROSSES: "MAY NOT FIT"}.get(mem.verdict, "DOES NOT FIT")
    print(
        f"{verdict}: {mem.device_total_bytes / GIB:.2f} of {mem.device_bytes / GIB:.2f} GiB "
        f"(headroom {mem.headroom_bytes / GIB:.2f} GiB; allocated peak {mem.allocated_peak_bytes / GIB:.2f}, "
        f"reserved {mem.reserved_peak_bytes / GIB:.2f}; peak during {mem.peak_phase})"
    )
    print(f"band: {mem.verdict_reason}")
    if mem.band is not None:
        print(f"band basis: {mem.band.basis}")
    if mem.paged_bytes:
        print(
            f"paged optimiser states: {mem.paged_bytes / GIB:.2f} GiB in managed memory, may spill to host RAM (not counted above)"
        )
    phases = getattr(est, "phases", None)  # a simulated estimate's traced phases
    if phases:
        print("traced live GiB: " + " · ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in phases.items()))
    step_band = (
        f" (band {speed.step_time_low_s:.3f}-{speed.step_time_high_s:.3f} s, p90 {speed.band.p90_pct:.1f}%)"
        if speed.band is not None and speed.band.p90_pct is not None
        else " (no step-time band: " + (speed.band.basis if speed.band else "none") + ")"
    )
    print(
        f"step time {speed.step_time_s:.3f} s{step_band} · {speed.tokens_per_s:.0f} tokens/s · MFU {speed.mfu:.2f} · "
        f"source {est.source}"
    )
    if res.claim is not None:
        c = res.claim
        print(f"claim {c.claimed_gib:.2f} GiB: {'possible' if c.possible else 'IMPOSSIBLE'}: {c.reason}")
    for n in est.notes:
        print(f"note: {n}")
    return code


def cmd_recommend(args: argparse.Namespace) -> int:
    svc = _service(args)
    workload = Workload.given(args.dataset_tokens, args.seq_len, args.epochs)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    req = RecommendRequest(
        model=args.model,
        gpus=tuple(args.gpu) if args.gpu else None,
        workload=workload,
        objective=args.objective,
        constraints=Constraints(args.max_budget_usd, args.deadline_hours, args.max_gpus, methods),
        dtype=args.dtype,
        limit=args.limit,
        providers=args.provider,
        price_basis=args.price_basis,
        model_revision=args.revision,
    )
    res = svc.recommend(req)
    safe = any(r.candidate.estimate.memory.verdict == FITS for r in res.recommendation.plans)
    code = EXIT_FITS if safe else EXIT_NO_FIT
    if args.json:
        print(json.dumps(views.as_json(views.recommend_response(res)), indent=1))
        return code
    rec, m = res.recommendation, res.model
    print(
        f"{m.name} ({_params_text(m, 3)}) · objective {rec.objective} · "
        f"{res.workload.total_tokens:,.0f} tokens at seq {res.workload.seq_len} · "
        f"{rec.n_candidates} plans evaluated, {rec.n_feasible} fit"
    )
    for line in _checkpoint_lines(m):
        print(line)
    for a in res.assumptions:
        print(f"assumed: {a}")
    if rec.plans:
        rows = []
        for r in rec.plans:
            c = r.candidate
            p, e = c.plan, c.estimate
            rows.append(
                [
                    r.rank,
                    p.method,
                    f"{p.num_gpus}x {c.gpu.id}" + (f" ({p.nodes} nodes)" if p.nodes > 1 else ""),
                    f"r{p.lora_r} {','.join(p.lora_targets)}" if get_method(p.method).adapter else "",
                    p.micro_batch,
                    "on" if p.grad_checkpointing else "off",
                    p.optimizer,
                    f"{e.memory.device_total_bytes / GIB:.1f}" + ("!" if e.memory.verdict == BAND_CROSSES else ""),
                    f"{e.memory.low_bytes / GIB:.1f}-{e.memory.high_bytes / GIB:.1f}",
                    f"{e.speed.step_time_s:.2f}",
                    f"{e.speed.tokens_per_s:.0f}",
                    f"{c.cost.hours:.2f}",
                    "-" if c.cost.cost_usd is None else f"{c.cost.cost_usd:.2f}",
                    "yes" if launchability(p).launchable else "no*",
                ]
            )
        print(
            _table(
                rows,
                [
                    "#",
                    "method",
                    "gpus",
                    "lora",
                    "mb",
                    "ckpt",
                    "optimizer",
                    "peak GiB",
                    "band GiB",
                    "step s",
                    "tok/s",
                    "hours",
                    "$",
                    "launch",
                ],
            )
        )
        for r in rec.plans:
            why_not = launchability(r.candidate.plan).reason
            if why_not:
                print(f"no* #{r.rank}: not launchable by the job runner: {why_not}")
        if any(r.candidate.estimate.memory.verdict == BAND_CROSSES for r in rec.plans):
            print("!: the memory band crosses the GPU's memory (may run out of memory); ranked after the safe plans")
        print(f"why #1: {rec.plans[0].why}")
        for gpu in dict.fromkeys(r.candidate.gpu for r in rec.plans):
            print(
                f"price {gpu.id}: {price_label(gpu)} ({gpu.price_source}{', ' + gpu.price_date if gpu.price_date else ''})"
            )
            if gpu.caveat:
                print(f"caveat {gpu.id}: {gpu.caveat}")
    else:
        print("no plan fits.")
    for r in rec.rejected[:6]:
        print(f"rejected {r.group}: {r.reason}. {r.to_fix}")
    for n in rec.notes:
        print(f"note: {n}")
    return code


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "models": cmd_models,
    "gpus": cmd_gpus,
    "estimate": cmd_estimate,
    "recommend": cmd_recommend,
    "serve": serve_cli.cmd_serve,
    "openapi": serve_cli.cmd_openapi,
    "calibrate": calibrate_cli.cmd_calibrate,
    "db": db_cli.cmd_db,
    "jobs": jobs_cli.cmd_jobs,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AdvisorError as exc:
        flag = FLAGS.get(exc.field or "", exc.field or "input")
        print(f"advisor {args.command}: error: {flag}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
