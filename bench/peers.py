"""tuneadvisor beside its peers, on every dataset we have truth for, memory and throughput apart.

    python -m bench.peers            # writes bench/results/peers.{json,md}

Tools (each through its own code where it has any; see the bench/peers_*.py module of each):
- tuneadvisor: AnalyticalEstimator, default coefficients; memory in the statistic the row measured
  (allocated / reserved / device total), throughput from its speed estimate (tokens/s per GPU);
- fitcheck-llm (PyPI): ``fitcheck.estimate`` total (bench/peers_fitcheck.py);
- accelerate estimate-memory: "Training using Adam" (bench/peers_accelerate.py);
- gpu_poor: its published training memory and ms-per-iteration formulas, ported (bench/peers_gpu_poor.py);
- weights x 4: the rule of thumb (bench/peers_rules.py).

Datasets (a missing one is reported "dataset not available", not an error):
- published_1, published_2: reference/published_measurements*.csv through bench.published.load_cases;
  rows whose measured peak is below the static memory their stated set-up must hold are set aside
  for every tool, as bench.accuracy does;
- cpu_truth: our real fp32 CPU training steps (bench/data/cpu_truth.jsonl, committed by bench.cpu_truth);
- simulated_referee_random: the simulated trace's allocated peak over the referee's random design
  (bench/results/simulated_referee_random.json, written by bench.simulated_referee).

For every dataset and quantity each tool gets n (rows it answers), n not expressible (rows whose
set-up it has no input for; the reasons are counted in the JSON), the median / p90 / worst absolute
error and the share within 10%. Tools answer different subsets, so the verdict compares tuneadvisor
with each peer head to head on the rows both answer, by median absolute error.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.catalog import default_catalog
from advisor.estimators.analytical import AnalyticalEstimator
from bench.peers_base import GIB, NotExpressible, PeerCase

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
REFEREE = OUT / "simulated_referee_random.json"
QUANTITIES = ("memory", "throughput")
WITHIN = 10.0  # percent


# ---- rows and tools ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One measured configuration: what every tool is asked, and the truth for each quantity."""

    dataset: str
    key: str
    case: PeerCase
    framework: str = "hf"
    memory_gib: float | None = None  # measured peak per GPU, GiB
    statistic: str = "allocated"  # allocated | active | reserved | device | unknown
    tokens_per_s: float | None = None  # measured, per GPU
    notes: tuple[str, ...] = ()
    oom: bool = False  # the source reports this set-up running out of memory (no peak figure)

    def truth(self, quantity: str) -> float | None:
        return self.memory_gib if quantity == "memory" else self.tokens_per_s


@dataclass(frozen=True)
class Tool:
    name: str
    memory: Callable[[Row], float] | None
    throughput: Callable[[Row], float] | None
    version: str = ""

    def answer(self, quantity: str, row: Row) -> float:
        fn = self.memory if quantity == "memory" else self.throughput
        if fn is None:
            raise NotExpressible(f"{self.name} estimates no {quantity}")
        return fn(row)


_EST = AnalyticalEstimator()


def ours_memory(row: Row) -> float:
    """Our peak in the row's statistic, as bench.accuracy.predict reads it: reserved, the device total
    (nvidia-smi-like, CUDA context included), else allocated (torchtune's "active", unnamed ones)."""
    c = row.case
    mem = _EST.memory(c.model, c.gpu, c.plan)
    if row.statistic == "reserved":
        return mem.reserved_peak_bytes / GIB
    if row.statistic == "device":
        return mem.device_total_bytes / GIB
    return mem.allocated_peak_bytes / GIB


def ours_throughput(row: Row) -> float:
    c = row.case
    return _EST.speed(c.model, c.gpu, c.plan).tokens_per_s / c.plan.num_gpus


def _peer(fn: Callable[[PeerCase], float]) -> Callable[[Row], float]:
    return lambda row: fn(row.case)


def _missing(name: str, exc: ImportError) -> Tool:
    """A peer whose library is not installed (pip install -e '.[dev,train]'): it answers no row."""

    def refuse(row: Row) -> float:
        raise NotExpressible(f"{name} not installed ({exc.name})")

    return Tool(name, refuse, None, "not installed")


def tools() -> list[Tool]:
    from bench import peers_gpu_poor, peers_rules

    out = [Tool("tuneadvisor", ours_memory, ours_throughput, "analytical")]
    try:
        from bench import peers_fitcheck

        out.append(Tool("fitcheck-llm", _peer(peers_fitcheck.memory_gib), None, peers_fitcheck.VERSION))
    except ImportError as exc:
        out.append(_missing("fitcheck-llm", exc))
    try:
        from bench import peers_accelerate

        out.append(
            Tool("accelerate estimate-memory", _peer(peers_accelerate.memory_gib), None, peers_accelerate.VERSION)
        )
    except ImportError as exc:
        out.append(_missing("accelerate estimate-memory", exc))
    out += [
        Tool("gpu_poor (port)", _peer(peers_gpu_poor.memory_gib), _peer(peers_gpu_poor.tokens_per_s), "App.js@05d18ab"),
        Tool("weights x 4", _peer(peers_rules.memory_gib), None, "rule of thumb"),
    ]
    return out


# ---- datasets ----------------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    description: str
    rows: list[Row] = field(default_factory=list)
    available: bool = True
    reason: str = ""  # why not available
    set_aside: list[dict] = field(default_factory=list)  # rows kept out of every tool's score, with why


def _throughput_view(c, cat, ds: Dataset, key: str):
    """The case as bench.throughput scores its throughput (plans it builds for rows the loader skipped
    for memory-only reasons; figures no GPU could reach at the stated set-up set aside), so both benches
    score the same rows; the loader's own reading where bench.throughput is not there."""
    try:
        from bench.throughput import MAX_IMPLIED_MFU, implied_mfu, throughput_case
    except ImportError:
        return c if getattr(c, "throughput_skip", "no throughput figure") is None else None
    t = throughput_case(c, cat)
    if t.throughput_skip is not None or t.plan is None or t.model is None or t.measured_tokens_per_s is None:
        return None
    if implied_mfu(t, cat) > MAX_IMPLIED_MFU:
        ds.set_aside.append({"key": key, "quantity": "throughput", "why": "figure above the GPU's dense peak"})
        return None
    return t


def _published(name: str) -> Dataset:
    desc = {
        "published_1": "reference/published_measurements.csv",
        "published_2": "reference/published_measurements_2.csv",
    }[name]
    ds = Dataset(name, f"published measurements ({desc})")
    try:
        from bench.published import load_cases

        cases = load_cases((name,))
    except Exception as exc:  # the loader is another helper's; say what failed instead of crashing
        return Dataset(name, ds.description, available=False, reason=f"loader failed: {exc!r}"[:300])
    try:
        from bench.accuracy import static_floor
    except ImportError:  # pragma: no cover - bench.accuracy always ships it today
        static_floor = None
    cat = default_catalog()
    for c in cases:
        key = getattr(c, "key", f"{name}:{c.row}")
        t = _throughput_view(c, cat, ds, key) if getattr(c, "measured_tokens_per_s", None) is not None else None
        if t is not None:
            ds.rows.append(
                Row(
                    name,
                    key,
                    PeerCase(t.model, t.plan, cat.gpu(t.plan.gpu_id)),
                    t.framework,
                    tokens_per_s=t.measured_tokens_per_s,
                    notes=tuple(getattr(t, "stack_notes", ())),
                )
            )
        if c.model is None or c.plan is None or c.skip is not None:
            continue
        gpu = cat.gpu(c.plan.gpu_id)
        if c.kind.startswith("measured (OOM)"):
            ds.rows.append(Row(name, key, PeerCase(c.model, c.plan, gpu), c.framework, statistic="device", oom=True))
            continue
        if c.measured_gib is None:
            continue
        if static_floor is not None and static_floor(c, _EST) / GIB > c.measured_gib * 1.02:
            ds.set_aside.append(
                {
                    "key": key,
                    "quantity": "memory",
                    "why": "measured peak below the weights + gradients + optimiser states its stated set-up holds",
                }
            )
            continue
        ds.rows.append(
            Row(
                name,
                key,
                PeerCase(c.model, c.plan, gpu),
                c.framework,
                memory_gib=c.measured_gib,
                statistic=c.statistic,
                notes=tuple(getattr(c, "stack_notes", ())),
            )
        )
    return ds


def _json_rows(path: Path) -> list[dict] | str:
    if not path.exists():
        return f"{path.relative_to(ROOT)} not found"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path.relative_to(ROOT)} unreadable: {exc}"
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        return f"{path.relative_to(ROOT)} has no rows"
    return rows


def _first(r: dict, *keys: str) -> Any:
    for k in keys:
        if r.get(k) is not None:
            return r[k]
    return None


def _cpu_truth() -> Dataset:
    """Our real fp32 CPU steps (bench/data/cpu_truth.jsonl, read as bench.cpu_truth scores it): the
    allocated peak and tokens per second of one micro-step (cpu_truth.md gives step-time errors)."""
    ds = Dataset("cpu_truth", "real fp32 training steps on this CPU (bench/data/cpu_truth.jsonl, bench.cpu_truth)")
    try:
        from bench.cpu_truth import DATA, _gpu, read_rows

        rows = read_rows(DATA)
    except Exception as exc:  # the reader is another helper's; say what failed instead of crashing
        ds.available, ds.reason = False, f"bench.cpu_truth not readable: {exc!r}"[:300]
        return ds
    if not rows:
        ds.available, ds.reason = False, "bench/data/cpu_truth.jsonl not found or empty"
        return ds
    from dataclasses import replace

    from advisor.catalog import model_from_config
    from advisor.plans import TrainingPlan

    for r in rows:
        key = f"cpu_truth:{r.get('case_id')}"
        if r.get("status") != "ok" or not r.get("peak_bytes"):
            ds.set_aside.append({"key": key, "quantity": "both", "why": f"run status {r.get('status')}"})
            continue
        try:
            model = model_from_config(dict(r["arch"]), name=str(r["case_id"]))
            plan = TrainingPlan.from_dict(r["plan"])
            cpu = replace(_gpu(r["device"]), id=plan.gpu_id)
        except Exception as exc:
            ds.set_aside.append({"key": key, "quantity": "both", "why": f"row not readable: {exc!r}"[:300]})
            continue
        step = r.get("step_time_s")
        ds.rows.append(
            Row(
                ds.name,
                key,
                PeerCase(model, plan, cpu),
                memory_gib=r["peak_bytes"] / GIB,
                statistic="allocated",
                tokens_per_s=plan.micro_batch * plan.seq_len / step if step else None,
            )
        )
    return ds


def _referee() -> Dataset:
    """The referee's random design: each result row's design entry (by id) is rebuilt with
    bench.referee_design.model_of on the GPU the referee traced (h100-80gb unless the file says)."""
    ds = Dataset(
        "simulated_referee_random",
        "simulated trace, allocated peak, random design (bench/results/simulated_referee_random.json)",
    )
    rows = _json_rows(REFEREE)
    if isinstance(rows, str):
        ds.available, ds.reason = False, rows
        return ds
    from advisor.plans import TrainingPlan
    from bench.referee_design import model_of

    data = json.loads(REFEREE.read_text())
    design = {d["id"]: d for d in data.get("design", [])}
    cat = default_catalog()
    gpu = cat.gpu(str(data.get("gpu", "h100-80gb")))
    for r in rows:
        key = f"referee:{r.get('id')}"
        gib = _first(r, "simulated_gib", "simulated_allocated_gib")
        d = design.get(r.get("id"))
        if gib is None or d is None:
            ds.set_aside.append({"key": key, "quantity": "memory", "why": "no simulated peak or no design entry"})
            continue
        try:
            model = model_of(d)
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d["plan"].items()}
            plan = TrainingPlan(gpu_id=gpu.id, **fields)
        except Exception as exc:
            ds.set_aside.append({"key": key, "quantity": "memory", "why": f"row not readable: {exc!r}"[:300]})
            continue
        ds.rows.append(Row(ds.name, key, PeerCase(model, plan, gpu), memory_gib=gib))
    return ds


def datasets() -> list[Dataset]:
    return [_published("published_1"), _published("published_2"), _cpu_truth(), _referee()]


# ---- scoring -----------------------------------------------------------------------------------------
def pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def summary(errors: Iterable[float]) -> dict:
    """median, p90, worst of |error| in %, and the share within 10%."""
    a = sorted(abs(e) for e in errors)
    if not a:
        return {"n": 0, "median_abs_pct": None, "p90_abs_pct": None, "worst_abs_pct": None, "within_10pct": None}
    p90 = a[min(len(a) - 1, round(0.9 * (len(a) - 1)))]
    return {
        "n": len(a),
        "median_abs_pct": round(statistics.median(a), 1),
        "p90_abs_pct": round(p90, 1),
        "worst_abs_pct": round(a[-1], 1),
        "within_10pct": round(sum(e <= WITHIN for e in a) / len(a), 3),
    }


def score(ds: Dataset, quantity: str, tool_list: list[Tool]) -> dict:
    """Each tool's answer on each row that has a truth for `quantity`, and the summaries."""
    rows = [r for r in ds.rows if r.truth(quantity) is not None]
    per_row: list[dict] = []
    for r in rows:
        truth = r.truth(quantity)
        p = r.case.plan
        label = f"{r.case.model.name} {p.method} {r.framework} {p.num_gpus}x{r.case.gpu.id} {p.micro_batch}x{p.seq_len}"
        entry: dict[str, Any] = {
            "key": r.key,
            "label": label,
            "model": r.case.model.name,
            "method": p.method,
            "framework": r.framework,
            "num_gpus": p.num_gpus,
            "gpu": r.case.gpu.id,
            "truth": round(truth, 4),
            "values": {},
            "errors": {},
            "not_expressible": {},
        }
        for t in tool_list:
            try:
                value = t.answer(quantity, r)
            except NotExpressible as exc:
                entry["not_expressible"][t.name] = str(exc)
                continue
            except Exception as exc:  # a tool that fails on a row answers nothing there; the reason is kept
                entry["not_expressible"][t.name] = f"error: {type(exc).__name__}: {exc}"[:200]
                continue
            entry["values"][t.name] = round(value, 4)
            entry["errors"][t.name] = round(pct(value, truth), 2)
        per_row.append(entry)
    tables = {}
    for t in tool_list:
        errs = [e["errors"][t.name] for e in per_row if t.name in e["errors"]]
        reasons = Counter(e["not_expressible"][t.name] for e in per_row if t.name in e["not_expressible"])
        s = summary(errs)
        s["n_not_expressible"] = sum(reasons.values())
        s["not_expressible_reasons"] = dict(reasons.most_common())
        tables[t.name] = s
    ours = tool_list[0].name
    h2h = {}
    for t in tool_list[1:]:
        shared = [e for e in per_row if ours in e["errors"] and t.name in e["errors"]]
        if not shared:
            continue
        h2h[t.name] = {
            "n_shared": len(shared),
            "ours": summary(e["errors"][ours] for e in shared),
            "peer": summary(e["errors"][t.name] for e in shared),
            "peer_closer_rows": [
                {"key": e["key"], "ours_pct": e["errors"][ours], "peer_pct": e["errors"][t.name]}
                for e in shared
                if abs(e["errors"][t.name]) < abs(e["errors"][ours])
            ],
        }
    return {"n_rows": len(rows), "tools": tables, "head_to_head": h2h, "rows": per_row}


def oom_agreement(ds: Dataset, tool_list: list[Tool]) -> dict:
    """Rows reported out of memory: does each tool's figure exceed the GPU's memory? (tuneadvisor
    answers with its device total, CUDA context included, the figure its fit verdict uses.)"""
    rows = [r for r in ds.rows if r.oom]
    out: dict[str, Any] = {"n_rows": len(rows), "tools": {}}
    for t in tool_list:
        said, answered = 0, 0
        for r in rows:
            try:
                value = t.answer("memory", r)
            except Exception:
                continue
            answered += 1
            said += value > r.case.gpu.memory_gib
        out["tools"][t.name] = {"n": answered, "predicts_oom": said}
    return out


def verdict(result: dict, ours: str = "tuneadvisor") -> dict:
    """Best tool by median |error| head to head; where a peer beats us, the rows that make it so."""
    if not result["n_rows"]:
        return {"best": None, "ours_best": None, "text": "no rows with this quantity"}
    if result["tools"][ours]["n"] == 0:
        return {"best": None, "ours_best": None, "text": "tuneadvisor answers no row"}
    beaten = []
    for peer, h in result["head_to_head"].items():
        if h["peer"]["median_abs_pct"] < h["ours"]["median_abs_pct"]:
            beaten.append(peer)
    if not result["head_to_head"]:
        return {"best": ours, "ours_best": True, "text": "tuneadvisor is the only tool that expresses these rows"}
    if not beaten:
        return {"best": ours, "ours_best": True, "text": "tuneadvisor best head to head against every peer"}
    parts = []
    for peer in beaten:
        h = result["head_to_head"][peer]
        parts.append(
            f"{peer} has the lower median on the {h['n_shared']} rows both answer "
            f"({h['peer']['median_abs_pct']}% vs our {h['ours']['median_abs_pct']}%; closer on "
            f"{len(h['peer_closer_rows'])} of them)"
        )
    return {"best": beaten[0], "ours_best": False, "text": "; ".join(parts)}


# ---- report ------------------------------------------------------------------------------------------
#: Why a peer beats us where it does, from reading the rows (bench/results/peers.json lists them); shown
#: only while that peer still beats us on that dataset and quantity.
EXPLANATIONS: dict[tuple[str, str, str], str] = {
    ("published_2", "memory", "weights x 4"): (
        "a coincidence of five rows, not a better model: the rule has no activation, adapter, logits or "
        "CUDA-context term. Three rows are QLoRA Llama-2-7B runs that measured 15-16 GiB, and four times the "
        "NF4 model (3.9 GiB) is 15.5 GiB; one is Llama-2-70B LoRA under FSDP on 8 H100s, where 4 x 138 GB / 8 "
        "= 69 GB meets a figure read off a monitoring screenshot (72-80 GB). On the fifth (Llama-2-70B QLoRA, "
        "FSDP on 2 GPUs) the same rule is +104%, and it is 50-90% off at the median on every other dataset "
        "(Elsewhere)."
    ),
    ("published_2", "memory", "fitcheck-llm"): (
        "three rows, all QLoRA Llama-2-7B. On the two lit-gpt rows (Oct 2023, bitsandbytes NF4, micro-batch 1, "
        "padded to the longest Alpaca sample, ~1.3k tokens) our activations are too large: we count each "
        "quantised layer's input saved in fp32 (MatMul4Bit as lit-gpt drove it); bf16 saves would fit these "
        "rows to -1..-3% but take the 2024 lit-gpt QLoRA rows of published_1 to -14..-17%, so the count is "
        "left as is and the gap stays unresolved (bench/results/accuracy.md). fitcheck's single activation "
        "formula gives less (about two thirds of ours) and lands 6-8% low. On the axolotl row (RTX 4090, "
        "'about 17 GB', statistic not named) both are 8-10% low. fitcheck refuses no row here, but it "
        "expresses no FSDP row; on the rows both answer in the other datasets we are ahead (Elsewhere)."
    ),
}


def _fmt(v: Any, suffix: str = "") -> str:
    return "-" if v is None else f"{v}{suffix}"


def render(res: dict) -> str:
    lines = [
        "# Peers side by side",
        "",
        f"`{res['command']}` at {res['commit']} ({res['date']}). Errors are (predicted - measured) / measured; "
        "the tables give |error|. n = rows the tool answers; n n/e = rows whose set-up it cannot express "
        "(reasons in peers.json). The verdict compares tuneadvisor with each peer on the rows both answer.",
        "",
        "Tools: " + ", ".join(f"{t['name']} ({t['version']})" for t in res["tools"]),
        "",
        "Each peer gives one figure and is compared with whatever the row measured; tuneadvisor answers in "
        "the row's statistic (allocated, reserved or device total). On the CPU rows the peers still add "
        "their CUDA context and allocator constants (fitcheck 500 MiB + 5%, gpu_poor 650 MB): they have no "
        "CPU device. A paged optimiser is expressed as its unpaged twin and LoRA on lm_head / embeddings "
        "as the block targets alone (no peer has inputs for them); modules_to_save, DoRA, FSDP, 8-bit "
        "states where a peer has none, and fp32 on gpu_poor are not expressible.",
        "",
    ]
    ours_name = res["tools"][0]["name"]
    for name, d in res["datasets"].items():
        lines += [f"## {name}", "", d["description"], ""]
        if not d["available"]:
            lines += [f"dataset not available: {d['reason']}", ""]
            continue
        if d["set_aside"]:
            lines += [f"{len(d['set_aside'])} rows set aside for every tool (peers.json says why).", ""]
        o = d.get("oom", {})
        if o.get("n_rows"):
            lines += [
                f"Rows the source reports out of memory ({o['n_rows']}): tools whose figure exceeds the GPU's memory: "
                + ", ".join(f"{t} {x['predicts_oom']}/{x['n']}" for t, x in o["tools"].items())
                + ".",
                "",
            ]
        for q in QUANTITIES:
            r = d[q]
            unit = "peak memory" if q == "memory" else "throughput (tokens/s per GPU)"
            lines += [f"### {name}: {unit}, {r['n_rows']} rows", ""]
            if not r["n_rows"]:
                lines += ["no measured rows for this quantity", ""]
                continue
            lines += [
                "| tool | n | n n/e | median | p90 | worst | within 10% |",
                "|---|---|---|---|---|---|---|",
            ]
            for tool, s in r["tools"].items():
                w = None if s["within_10pct"] is None else round(100 * s["within_10pct"])
                lines.append(
                    f"| {tool} | {s['n']} | {s['n_not_expressible']} | {_fmt(s['median_abs_pct'], '%')} | "
                    f"{_fmt(s['p90_abs_pct'], '%')} | {_fmt(s['worst_abs_pct'], '%')} | {_fmt(w, '%')} |"
                )
            if r["head_to_head"]:
                lines += [
                    "",
                    "| head to head | shared rows | median: tuneadvisor / peer | p90: tuneadvisor / peer | "
                    "worst: tuneadvisor / peer | within 10%: tuneadvisor / peer |",
                    "|---|---|---|---|---|---|",
                ]
                for peer, h in r["head_to_head"].items():
                    o, pe = h["ours"], h["peer"]
                    lines.append(
                        f"| {peer} | {h['n_shared']} | {o['median_abs_pct']}% / {pe['median_abs_pct']}% | "
                        f"{o['p90_abs_pct']}% / {pe['p90_abs_pct']}% | {o['worst_abs_pct']}% / {pe['worst_abs_pct']}% | "
                        f"{round(100 * o['within_10pct'])}% / {round(100 * pe['within_10pct'])}% |"
                    )
            reasons = [
                f"{tool}: " + "; ".join(f"{why} ({k})" for why, k in s["not_expressible_reasons"].items())
                for tool, s in r["tools"].items()
                if s["not_expressible_reasons"] and s["n"]
            ]
            if reasons:
                lines += ["", "Not expressible: " + " | ".join(reasons)]
            v = r["verdict"]
            lines += ["", f"**Verdict:** {v['text']}."]
            if v["ours_best"] is False:
                for peer, other in v.get("elsewhere", {}).items():
                    if other:
                        lines += [
                            "",
                            f"Elsewhere ({peer} median vs ours): "
                            + "; ".join(
                                f"{o}: {x['peer_median_abs_pct']}% vs {x['ours_median_abs_pct']}% (n {x['n']})"
                                for o, x in other.items()
                            )
                            + ".",
                        ]
                    note = EXPLANATIONS.get((name, q, peer))
                    if note:
                        lines.append(f"Why ({peer}): {note}")
                    shared = [e for e in r["rows"] if ours_name in e["errors"] and peer in e["errors"]]
                    lines += ["", f"| row ({peer} head to head) | set-up | tuneadvisor | {peer} |", "|---|---|---|---|"]
                    for e in shared[:20]:
                        lines.append(
                            f"| {e['key']} | {e['label']} | {e['errors'][ours_name]:+.1f}% | {e['errors'][peer]:+.1f}% |"
                        )
            lines.append("")
    return "\n".join(lines) + "\n"


def run(dataset_list: list[Dataset] | None = None, tool_list: list[Tool] | None = None) -> dict:
    tool_list = tool_list or tools()
    dataset_list = dataset_list if dataset_list is not None else datasets()
    out: dict[str, Any] = {}
    flat: list[dict] = []
    for ds in dataset_list:
        d: dict[str, Any] = {
            "description": ds.description,
            "available": ds.available,
            "reason": ds.reason,
            "set_aside": ds.set_aside,
        }
        if ds.available:
            d["oom"] = oom_agreement(ds, tool_list)
            for q in QUANTITIES:
                res = score(ds, q, tool_list)
                res["verdict"] = verdict(res, tool_list[0].name)
                d[q] = res
                for e in res["rows"]:
                    flat.append(
                        {
                            "dataset": ds.name,
                            "quantity": q,
                            **{k: e[k] for k in ("key", "model", "method", "framework", "num_gpus", "gpu")},
                            **{f"{_slug(t)}_{q}_error_pct": err for t, err in e["errors"].items()},
                        }
                    )
        out[ds.name] = d
    _elsewhere(out)
    return {"datasets": out, "rows": flat}


def _elsewhere(out: dict) -> None:
    """For a peer that beats us on a dataset: its median and ours on the other datasets, the same
    quantity (a rule that wins on a few rows by coincidence is far off elsewhere)."""
    for name, d in out.items():
        for q in QUANTITIES:
            v = d.get(q, {}).get("verdict")
            if not v or v.get("ours_best") is not False:
                continue
            v["elsewhere"] = {}
            for peer, h in d[q]["head_to_head"].items():
                if h["peer"]["median_abs_pct"] >= h["ours"]["median_abs_pct"]:
                    continue
                v["elsewhere"][peer] = {
                    other: {
                        "n": o[q]["tools"][peer]["n"],
                        "peer_median_abs_pct": o[q]["tools"][peer]["median_abs_pct"],
                        "ours_median_abs_pct": o[q]["tools"][next(iter(o[q]["tools"]))]["median_abs_pct"],
                    }
                    for other, o in out.items()
                    if other != name and o.get("available") and o[q]["tools"].get(peer, {}).get("n")
                }


#: tool name -> the prefix of its "<prefix>_<quantity>_error_pct" keys in peers.json rows
SLUGS = {
    "tuneadvisor": "analytical",
    "fitcheck-llm": "fitcheck",
    "accelerate estimate-memory": "accelerate",
    "gpu_poor (port)": "gpu_poor",
    "weights x 4": "weights_x4",
}


def _slug(tool: str) -> str:
    return SLUGS.get(tool, tool.split(" ")[0].replace("-", "_").lower())


def main() -> int:
    t0 = time.process_time()
    tool_list = tools()
    res = run(tool_list=tool_list)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {
        "command": "python -m bench.peers",
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "python": platform.python_version(),
        "tools": [{"name": t.name, "version": t.version} for t in tool_list],
        **res,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "peers.json").write_text(json.dumps(res, indent=1) + "\n")
    md = render(res)
    (OUT / "peers.md").write_text(md)
    print(md)
    print(f"({time.process_time() - t0:.1f} s CPU)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
