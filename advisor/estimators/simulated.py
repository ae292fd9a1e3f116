"""Simulated estimator: one full-size training step traced under FakeTensorMode.

Why: the analytical model is a hand-written formula per architecture family; this runs the real
transformers + peft + bitsandbytes code of a training step on *fake* tensors (shapes and dtypes, no
storage) and counts the bytes the allocator would be asked for. It is slower (seconds to minutes)
and much more exact, for any architecture transformers can build, and it referees the analytical one.

What is traced, in the stack our jobs run (``plan.framework == "hf"``):

* the model built from its config on the meta device, in the plan's dtype (full fine-tuning with
  fp32 master weights: fp32 parameters under ``torch.autocast``);
* QLoRA: ``nn.Linear`` layers replaced by bitsandbytes ``Linear4bit`` the way transformers' loader
  does, then quantised by bitsandbytes' own ``quantize_4bit``: packed uint8 NF4 weights, fp32 absmax
  or (double quantisation) uint8 absmax + fp32 second-level constants; unquantised modules in their
  real dtype, then ``prepare_model_for_kbit_training`` (fp32 upcast, checkpointing);
* LoRA via ``peft.get_peft_model`` on the plan's targets (fp32 adapters, peft's default);
* gradient checkpointing via transformers' ``gradient_checkpointing_enable`` (non-reentrant);
* the optimiser the HF Trainer builds (fused ``torch.optim.AdamW``; bitsandbytes ``AdamW`` 8-bit /
  paged), gradient clipping, ``zero_grad(set_to_none=True)``; two optimiser steps, so the second
  runs with optimiser states alive.

A ``TorchDispatchMode`` sees every op's outputs and counts each storage once, freed through a weakref
finaliser: the peak of live bytes is the allocator's *allocated* peak. Two CUDA behaviours a CPU
fake trace cannot see are reproduced explicitly: bitsandbytes' ``gemm_4bit`` takes the
dequantise + ``F.linear`` path on CUDA for training-size inputs (a temporary dequantised weight), and
paged optimiser states (>= 1e5 elements) live in CUDA unified memory, outside the allocator.

Torch is imported lazily: this module imports without the ``train`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from advisor.errors import InvalidInputError
from advisor.estimators.analytical import DEFAULT_COEFFICIENTS, AnalyticalEstimator, Coefficients
from advisor.estimators.base import COMPONENTS, Estimate, MemoryEstimate
from advisor.plans import TrainingPlan, resolve_targets
from advisor.specs import GpuSpec, ModelSpec
from advisor.units import GIB

#: Bump when the trace changes what it counts: old cache entries stop matching.
SIM_VERSION = 3
CACHE_ENV = "TUNEADVISOR_SIMULATED_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/tuneadvisor/simulated")
PHASES = ("after_weights", "forward", "backward", "optimizer_step")
#: bitsandbytes' CUDA gemm_4bit uses its fused kernel only up to this many rows (M = tokens); above
#: it dequantises the weight to a temporary and calls F.linear (backends/cuda/ops.py, 0.50).
BNB_CUSTOM_GEMM_MAX_ROWS = 4
#: bitsandbytes pages optimiser state buffers of at least this many elements (optim/optimizer.py).
BNB_PAGED_MIN_NUMEL = 100_000
#: One step after priming the optimiser states (see trace_step): what a two-step run's second step sees.
STEPS = 1


# ---- results -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceResult:
    """What one traced run measured (bytes), independent of the GPU that will run it."""

    peak_bytes: int
    peak_phase: str  # forward | backward | optimizer_step | after_weights
    phases: dict[str, int]  # peak live bytes per phase (after_weights: live after loading)
    components: dict[str, int]  # live bytes by kind at the peak
    paged_bytes: int  # paged optimiser states (CUDA unified memory, not in the peak)
    param_count: int  # parameters of the built model (before quantisation packs them)
    ops: int
    seconds: float
    fake: bool
    versions: dict[str, str]
    notes: tuple[str, ...] = ()
    cpu_seconds: float = 0.0  # process CPU time of the trace: wall time on an idle core

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TraceResult:
        d = dict(d)
        d["notes"] = tuple(d.get("notes", ()))
        # the cache stores JSON with sorted keys: restore the order the breakdowns are shown in
        d["phases"] = {k: d["phases"][k] for k in PHASES if k in d["phases"]}
        d["components"] = {k: d["components"][k] for k in COMPONENTS if k in d["components"]}
        return cls(**d)


@dataclass(frozen=True)
class SimulatedEstimate(Estimate):
    """An Estimate whose memory comes from a trace; carries the phase breakdown."""

    phases: dict[str, int] = field(default_factory=dict)
    trace: TraceResult | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["phases_gib"] = {k: round(v / GIB, 3) for k, v in self.phases.items()}
        if self.trace is not None:
            d["simulation"] = {
                "traced_peak_gib": round(self.trace.peak_bytes / GIB, 3),
                "peak_phase": self.trace.peak_phase,
                "ops": self.trace.ops,
                "trace_seconds": round(self.trace.seconds, 2),
                "versions": self.trace.versions,
            }
        return d


# ---- model config ------------------------------------------------------------------------------
def _llama_type(m: ModelSpec) -> str:
    text = f"{m.name} {m.hf_id or ''} {' '.join(m.aliases)}".lower()
    if m.norms_per_layer == 4 or re.search(r"gemma-?2-", text):
        return "gemma2"
    if "gemma" in text:
        return "gemma"
    if "qwen" in text:
        return "qwen2"
    if "mistral" in text:
        return "mistral"
    return "llama"


def hf_config(model: ModelSpec) -> dict[str, Any]:
    """The Hugging Face config.json the spec stands for: the file itself where the spec was read
    from one, else rebuilt from the spec's numbers (model_type from the family and name)."""
    src = Path(model.source) if model.source.endswith(".json") else None
    if src is not None and src.is_file():
        cfg = json.loads(src.read_text())
        cfg.setdefault("model_type", "llama")
        return cfg
    f = model.family
    base = dict(
        vocab_size=model.vocab_size,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=model.tie_word_embeddings,
    )
    if f == "llama":
        mt = _llama_type(model)
        if not model.gated_mlp:
            raise InvalidInputError(f"{model.name}: a Llama-format model without a gated MLP cannot be built", "model")
        cfg = dict(
            base,
            model_type=mt,
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.kv_heads,
            head_dim=model.head_size,
        )
        if mt == "llama":
            cfg.update(attention_bias=model.attention_bias, mlp_bias=model.mlp_bias)
        if mt in ("gemma", "gemma2"):
            cfg.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh")
        if mt == "gemma2":
            cfg.update(query_pre_attn_scalar=model.head_size, sliding_window=4096)
        if mt == "mistral":
            cfg.update(sliding_window=None)
        return cfg
    if f == "phi3":
        return dict(
            base,
            model_type="phi3",
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.kv_heads,
            pad_token_id=None,
        )
    if f == "phi":
        return dict(
            base,
            model_type="phi",
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
        )
    if f == "gpt2":
        return dict(
            base,
            model_type="gpt2",
            n_embd=model.hidden_size,
            n_inner=model.intermediate_size,
            n_layer=model.num_layers,
            n_head=model.num_attention_heads,
            n_positions=model.max_position_embeddings,
        )
    if f == "gpt_neox":
        return dict(
            base,
            model_type="gpt_neox",
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            attention_bias=model.attention_bias,
        )
    if f == "t5":
        return dict(
            base,
            model_type="t5",
            d_model=model.hidden_size,
            d_ff=model.intermediate_size,
            d_kv=model.head_size,
            num_layers=model.num_layers,
            num_decoder_layers=model.num_decoder_layers or model.num_layers,
            num_heads=model.num_attention_heads,
            relative_attention_num_buckets=model.relative_attention_num_buckets,
            feed_forward_proj="gated-gelu" if model.gated_mlp else "relu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    raise InvalidInputError(f"{model.name}: family {f!r} cannot be simulated", field="model")


# ---- availability, versions, cache -------------------------------------------------------------
def unavailable_reason() -> str | None:
    """None when the train extra is installed; else why the simulated source cannot run."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if missing:
        return f"the simulated source needs the train extra (pip install 'tuneadvisor[train]'): missing {', '.join(missing)}"
    return None


@functools.cache
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"simulator": str(SIM_VERSION)}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _plan_key(plan: TrainingPlan) -> dict:
    """The plan fields that change the trace (not the GPU: memory is per device, not per model)."""
    d = asdict(plan)
    for k in ("gpu_id", "notes"):
        d.pop(k, None)
    d["lora_targets"] = list(plan.lora_targets)
    return d


def cache_key(config: dict, plan: TrainingPlan, versions: dict[str, str] | None = None) -> str:
    blob = json.dumps(
        {"config": config, "plan": _plan_key(plan), "versions": versions or library_versions()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


class TraceCache:
    """One JSON file per (config, plan, library versions) hash."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> TraceResult | None:
        p = self.path(key)
        try:
            return TraceResult.from_dict(json.loads(p.read_text())["trace"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, trace: TraceResult, config: dict, plan: TrainingPlan) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        doc = {"trace": trace.to_dict(), "config": config, "plan": _plan_key(plan)}
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
        tmp.replace(p)


# ---- validation --------------------------------------------------------------------------------
def check_plan(plan: TrainingPlan) -> None:
    """What a single-process trace can represent; anything else is a clear 4xx."""
    if plan.num_gpus != 1:
        raise InvalidInputError(
            "the simulated source traces one GPU: multi-GPU plans (ddp/fsdp) need source analytical",
            field="num_gpus",
        )


def stack_notes(plan: TrainingPlan) -> list[str]:
    """What the trace of a litgpt / torchtune plan is: transformers' model code with that stack's
    dtype conventions, not the stack's own code."""
    fw = getattr(plan, "framework", "hf")
    notes = []
    if fw != "hf":
        notes.append(
            f"{fw} plan traced in transformers + peft + bitsandbytes code with {fw}'s dtype conventions "
            "(adapters and unquantised modules in the model dtype); its own model, LoRA and NF4 code may keep "
            "other tensors"
        )
    if getattr(plan, "chunked_loss", False):
        how = "128-token chunks in the logits dtype (litgpt)" if fw == "litgpt" else "8 chunks, each upcast to fp32"
        notes.append(f"loss traced as chunked cross-entropy over the sequence: {how}")
    return notes


def lora_target_names(model: ModelSpec, plan: TrainingPlan) -> list[str]:
    """peft target_modules: the bare module names the plan's targets resolve to."""
    return sorted({n.split(".")[-1] for n in resolve_targets(model, plan.lora_targets)})


# ---- the estimator -----------------------------------------------------------------------------
class SimulatedEstimator:
    """Memory from a traced step (cached), speed from the analytical model."""

    name = "simulated"

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        coefficients: Coefficients = DEFAULT_COEFFICIENTS,
        speed: AnalyticalEstimator | None = None,
        timeout_s: float | None = None,
        use_cache: bool = True,
    ):
        self.cache = TraceCache(cache_dir)
        self.k = coefficients
        self.speed_model = speed or AnalyticalEstimator(coefficients)
        self.timeout_s = timeout_s
        self.use_cache = use_cache

    def _prepare(self, model: ModelSpec, plan: TrainingPlan) -> tuple[dict, list[str], str]:
        reason = unavailable_reason()
        if reason:
            raise InvalidInputError(reason, field="source")
        check_plan(plan)
        config = hf_config(model)
        targets = lora_target_names(model, plan) if plan.method != "full" else []
        return config, targets, cache_key(config, plan)

    def cached(self, model: ModelSpec, plan: TrainingPlan) -> TraceResult | None:
        """The stored trace for this model and plan, if one exists (no tracing)."""
        if not self.use_cache:
            return None
        _, _, key = self._prepare(model, plan)
        return self.cache.get(key)

    def trace(self, model: ModelSpec, plan: TrainingPlan, timeout_s: float | None = None) -> TraceResult:
        """The traced step for this model and plan: from the cache, else run (and store) it.

        With a timeout (or the estimator's), the trace runs in a child process killed at the deadline.
        """
        config, targets, key = self._prepare(model, plan)
        if self.use_cache:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        limit = timeout_s if timeout_s is not None else self.timeout_s
        if limit is None:
            result = trace_step(config, plan, targets)
        else:
            result = _trace_in_subprocess(config, plan, targets, limit)
        expected = model.param_count
        if expected and abs(result.param_count - expected) > 0.005 * expected:
            result = replace(
                result,
                notes=(
                    *result.notes,
                    f"transformers builds {result.param_count:,} parameters for this config, the spec counts "
                    f"{expected:,} (e.g. transformers 5 always ties T5's lm_head to its embeddings)",
                ),
            )
        if self.use_cache:
            self.cache.put(key, result, config, plan)
        return result

    def memory_from_trace(self, trace: TraceResult, gpu: GpuSpec) -> MemoryEstimate:
        """Allocated = traced tensor peak + the fixed buffers no trace sees (cuBLAS workspaces, RNG
        state); reserved and device total from it with the analytical model's constants."""
        fixed = self.k.fixed_allocated_bytes
        allocated = trace.peak_bytes + fixed
        comp = trace.components
        static = comp.get("weights", 0) + comp.get("adapters", 0) + comp.get("optimizer_states", 0) + fixed
        reserved, total = self.speed_model.memory_totals(gpu, allocated, static)
        components = {c: int(v) for c, v in comp.items()}
        components["runtime_overhead"] = int(total - sum(components.values()))
        return MemoryEstimate(
            components=components,
            allocated_peak_bytes=int(allocated),
            reserved_peak_bytes=int(reserved),
            device_total_bytes=int(total),
            paged_bytes=int(trace.paged_bytes),
            peak_phase="optimizer step" if trace.peak_phase == "optimizer_step" else "forward/backward",
            device_bytes=gpu.memory_bytes,
        )

    def estimate(
        self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan, timeout_s: float | None = None
    ) -> SimulatedEstimate:
        trace = self.trace(model, plan, timeout_s)
        mem = self.memory_from_trace(trace, gpu)
        notes: list[str] = []
        speed = self.speed_model.speed(model, gpu, plan, notes)
        k = self.k
        notes = [
            f"memory traced under FakeTensorMode ({trace.ops:,} ops, {trace.seconds:.1f} s, "
            f"torch {trace.versions.get('torch')}, transformers {trace.versions.get('transformers')}, "
            f"peft {trace.versions.get('peft')}, bitsandbytes {trace.versions.get('bitsandbytes')}); "
            f"peak in {trace.peak_phase.replace('_', ' ')}",
            f"allocated = traced tensor peak + {k.fixed_allocated_bytes / 2**20:.0f} MiB of fixed buffers; reserved adds "
            f"{k.allocator_fragmentation:.0%} allocator slack on the transient part, the device total "
            f"{k.cuda_context_bytes / 2**20:.0f} MiB of CUDA context (the analytical model's constants)",
            "speed is the analytical model's",
            *trace.notes,
            *notes,
        ]
        if model.assumed:
            notes.append(model.note)
        return SimulatedEstimate(
            plan=plan,
            memory=mem,
            speed=speed,
            source="simulated",
            notes=tuple(dict.fromkeys(notes)),
            phases=dict(trace.phases),
            trace=trace,
        )


MAX_SIMULATE_TOP = 20
MAX_SIMULATE_BUDGET_S = 3600.0


def simulate_ranked(estimator: SimulatedEstimator, model: ModelSpec, ranked, top: int, budget_s: float) -> list[dict]:
    """Trace the `top` ranked plans within `budget_s` seconds in all (a trace past the deadline is
    killed): each entry says the simulated peak next to the analytical one, or why it was skipped."""
    if not 0 <= top <= MAX_SIMULATE_TOP:
        raise InvalidInputError(f"simulate_top must be between 0 and {MAX_SIMULATE_TOP}", field="simulate_top")
    if not 0 < budget_s <= MAX_SIMULATE_BUDGET_S:
        raise InvalidInputError(
            f"simulate_budget_s must be in (0, {MAX_SIMULATE_BUDGET_S:.0f}]", field="simulate_budget_s"
        )
    reason = unavailable_reason()
    if reason:
        raise InvalidInputError(reason, field="simulate_top")
    deadline = time.monotonic() + budget_s
    out: list[dict] = []
    for rp in list(ranked)[:top]:
        cand = rp.candidate
        plan, gpu = cand.plan, cand.gpu
        entry: dict[str, Any] = {
            "rank": rp.rank,
            "plan_id": plan.id,
            "analytical_peak_memory_gib": round(cand.estimate.memory.device_total_bytes / GIB, 3),
        }
        try:
            check_plan(plan)
        except InvalidInputError as exc:
            out.append({**entry, "skipped": str(exc)})
            continue
        left = deadline - time.monotonic()
        cached = estimator.cached(model, plan)
        if cached is None and left <= 0:
            out.append({**entry, "skipped": "simulation time budget spent"})
            continue
        try:
            est = estimator.estimate(model, gpu, plan, timeout_s=None if cached is not None else left)
        except (TimeoutError, RuntimeError) as exc:
            out.append({**entry, "skipped": str(exc)})
            continue
        mem = est.memory
        out.append(
            {
                **entry,
                "peak_memory_gib": round(mem.device_total_bytes / GIB, 3),
                "allocated_peak_gib": round(mem.allocated_peak_bytes / GIB, 3),
                "fits": mem.fits,
                "peak_phase": est.trace.peak_phase if est.trace else mem.peak_phase,
                "phases_gib": {k: round(v / GIB, 3) for k, v in est.phases.items()},
                "cached": cached is not None,
                "trace_seconds": round(est.trace.seconds, 2) if est.trace else None,
            }
        )
    return out


def _trace_worker(config: dict, plan_d: dict, targets: list[str], conn) -> None:
    try:
        res = trace_step(config, TrainingPlan.from_dict(plan_d), targets)
        conn.send(("ok", res.to_dict()))
    except BaseException as exc:  # the parent turns it into a clear error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _trace_in_subprocess(config: dict, plan: TrainingPlan, targets: list[str], timeout_s: float) -> TraceResult:
    """Run the trace in a child process so a deadline is a hard bound (the child is killed)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_trace_worker, args=(config, plan.to_dict(), targets, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise TimeoutError(f"simulation did not finish within {timeout_s:.0f} s")
        try:
            status, payload = parent.recv()
        except EOFError:  # the child died before answering (killed, out of memory, failed to start)
            proc.join(5)
            raise RuntimeError(f"simulation process ended without a result (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    if status != "ok":
        raise RuntimeError(f"simulation failed: {payload}")
    return TraceResult.from_dict(payload)


# =================================================================================================
# The trace itself (torch from here on, imported inside the functions).
# =================================================================================================
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


@functools.cache
def _meter_class():
    """LiveBytesMeter, defined on first use so that importing this module does not import torch."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        gemm_4bit = torch.ops.bitsandbytes.gemm_4bit.default
    except (ImportError, AttributeError):  # pragma: no cover - bitsandbytes is part of the train extra
        gemm_4bit = None

    class LiveBytesMeter(TorchDispatchMode):
        """Counts live storage bytes: each storage once, at the op that created it; freed by a weakref
        finaliser on the storage. Keeps one record per storage lifetime so the composition at the
        peak can be replayed afterwards."""

        def __init__(self, decompose_bnb_gemm: bool = True):
            super().__init__()
            self.live = 0
            self.paged = 0
            self.peak = 0
            self.peak_event = 0
            self.peak_phase = ""
            self.event = 0
            self.ops = 0
            self.phase = "load"
            self.phase_peak: dict[str, int] = {}
            self.decompose_bnb_gemm = decompose_bnb_gemm
            self._paused = False
            self._alive: dict[int, int] = {}  # id(storage) -> record
            # records (parallel lists): bytes, alloc event, free event, category, last dim, op
            self.r_bytes: list[int] = []
            self.r_alloc: list[int] = []
            self.r_free: list[int] = []
            self.r_cat: list[str | None] = []
            self.r_last: list[int] = []
            self.r_op: list[str] = []
            self.r_paged: list[bool] = []

        # -- bookkeeping ----------------------------------------------------------------------
        @contextlib.contextmanager
        def paused(self):
            """Ops in this block are host-side work that never reaches the device allocator."""
            self._paused = True
            try:
                yield
            finally:
                self._paused = False

        def set_phase(self, phase: str) -> None:
            self.phase = phase
            self.phase_peak.setdefault(phase, self.live)
            self.phase_peak[phase] = max(self.phase_peak[phase], self.live)

        def track(self, t, op: str = "", category: str | None = None) -> int | None:
            if not isinstance(t, torch.Tensor):
                return None
            st = t.untyped_storage()
            key = id(st)
            nbytes = st.nbytes()
            rec = self._alive.get(key)
            if rec is not None:
                if self.r_bytes[rec] == nbytes:
                    if category is not None:
                        self.r_cat[rec] = category
                    return rec
                self._free(key)  # resized in place: the old allocation ends, a new one begins
            rec = len(self.r_bytes)
            self.event += 1
            self.r_bytes.append(nbytes)
            self.r_alloc.append(self.event)
            self.r_free.append(-1)
            self.r_cat.append(category)
            self.r_last.append(int(t.shape[-1]) if t.dim() else 1)
            self.r_op.append(op)
            self.r_paged.append(False)
            self._alive[key] = rec
            self.live += nbytes
            weakref.finalize(st, self._free, key, rec)
            if self.live > self.phase_peak.get(self.phase, 0):
                self.phase_peak[self.phase] = self.live
            if self.live > self.peak:
                self.peak = self.live
                self.peak_event = self.event
                self.peak_phase = self.phase
            return rec

        def _free(self, key: int, rec: int | None = None) -> None:
            cur = self._alive.get(key)
            if cur is None or (rec is not None and cur != rec):
                return
            del self._alive[key]
            self.event += 1
            self.r_free[cur] = self.event
            if self.r_paged[cur]:
                self.paged -= self.r_bytes[cur]
            else:
                self.live -= self.r_bytes[cur]

        def mark_paged(self, t) -> None:
            """A buffer bitsandbytes would place in CUDA unified memory: outside the device count."""
            rec = self.track(t, "paged", "optimizer_states")
            if rec is not None and not self.r_paged[rec]:
                self.r_paged[rec] = True
                self.live -= self.r_bytes[rec]
                self.paged += self.r_bytes[rec]

        def categorise(self, tensors, category: str) -> None:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    rec = self._alive.get(id(t.untyped_storage()))
                    if rec is not None:
                        self.r_cat[rec] = category

        def composition(self, event: int, vocab: set[int]) -> dict[str, int]:
            """Live bytes by kind at a given event (replayed from the records)."""
            out: dict[str, int] = {}
            for i, nb in enumerate(self.r_bytes):
                a, f = self.r_alloc[i], self.r_free[i]
                if a > event or (f != -1 and f <= event) or self.r_paged[i]:
                    continue
                cat = self.r_cat[i]
                if cat is None:
                    op = self.r_op[i]
                    if op.startswith("bitsandbytes.dequantize") or op == "bnb-gemm-temp":
                        cat = "quant_temporaries"
                    elif self.r_last[i] in vocab:
                        cat = "logits"
                    else:
                        cat = "activations"
                out[cat] = out.get(cat, 0) + nb
            return out

        def live_at(self, event: int, top: int = 20) -> list[tuple[int, str, str | None, int]]:
            """The largest storages alive at an event: (bytes, op, category, last dim), for reports."""
            rows = [
                (self.r_bytes[i], self.r_op[i], self.r_cat[i], self.r_last[i])
                for i in range(len(self.r_bytes))
                if self.r_alloc[i] <= event and (self.r_free[i] == -1 or self.r_free[i] > event) and not self.r_paged[i]
            ]
            rows.sort(key=lambda r: -r[0])
            return rows[:top]

        # -- dispatch -------------------------------------------------------------------------
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.ops += 1
            if self._paused:
                return func(*args, **kwargs)
            if func is gemm_4bit and self.decompose_bnb_gemm:
                return self._gemm_4bit_cuda_path(*args, **kwargs)
            out = func(*args, **kwargs)
            name = f"{func.namespace}.{func._opname}"
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t, name)
            return out

        def _gemm_4bit_cuda_path(
            self,
            A,
            B,
            shapeB,
            absmax,
            blocksize,
            quant_type,
            bias=None,
            absmax_8bit=None,
            absmax_code=None,
            absmax_offset=None,
        ):
            """bitsandbytes' CUDA gemm_4bit for more than a handful of rows: dequantise, then F.linear."""
            rows = A.numel() // A.shape[-1]
            if rows <= BNB_CUSTOM_GEMM_MAX_ROWS:
                out = gemm_4bit(
                    A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset
                )
                self.track(out, "bitsandbytes.gemm_4bit")
                return out
            if absmax_8bit is not None:
                dq = torch.ops.bitsandbytes.dequantize_blockwise.default(
                    absmax_8bit, absmax, absmax_code, 256, torch.float32
                )
                self.track(dq, "bnb-gemm-temp")
                absmax = dq + absmax_offset
                self.track(absmax, "bnb-gemm-temp")
                del dq
            w = torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, quant_type, shapeB, A.dtype)
            self.track(w, "bnb-gemm-temp")
            out = torch.nn.functional.linear(A, w, bias)
            self.track(out, "aten.linear")
            return out

    return LiveBytesMeter


def _new_tensor(shape, dtype, real_init: bool):
    import torch

    t = torch.empty(shape, dtype=dtype)
    if real_init:
        t.normal_(0.0, 0.02) if dtype.is_floating_point else t.zero_()
    return t


def _materialize(model, real_init: bool) -> None:
    """Replace every meta parameter and buffer by a tensor on the (fake or real) CPU; quantise
    bitsandbytes 4-bit weights with bitsandbytes' own quantize_4bit, as loading does."""
    import torch

    try:
        from bitsandbytes.nn import Linear4bit, Params4bit
    except ImportError:  # pragma: no cover - bitsandbytes is part of the train extra
        Linear4bit = Params4bit = None
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in memo:
                mod._parameters[name] = memo[id(p)]
                continue
            if not p.is_meta:
                memo[id(p)] = p
                continue
            if Params4bit is not None and isinstance(p, Params4bit) and isinstance(mod, Linear4bit):
                new = _quantized_weight(mod, p, real_init)
            else:
                new = torch.nn.Parameter(_new_tensor(p.shape, p.dtype, real_init), requires_grad=p.requires_grad)
            memo[id(p)] = new
            mod._parameters[name] = new
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = (
                    _new_tensor(b.shape, b.dtype, False)
                    if not b.is_floating_point()
                    else (_new_tensor(b.shape, b.dtype, real_init))
                )


def _quantized_weight(mod, p, real_init: bool):
    """What bitsandbytes' Params4bit holds after loading: the packed uint8 NF4 weight, with its
    QuantState (absmax, or uint8 absmax + fp32 second-level constants) made by quantize_4bit.

    A Params4bit cannot wrap a FakeTensor, so the packed tensor is a Parameter carrying the same
    attributes Linear4bit and MatMul4Bit read (quant_state, blocksize, quant_type, ...); the storage
    and the code path through bitsandbytes are the same. Real runs use the same representation.
    """
    import bitsandbytes.functional as F
    import torch

    data = _new_tensor(tuple(p.shape), mod._sim_weight_dtype, real_init)
    packed, qs = F.quantize_4bit(
        data,
        blocksize=p.blocksize,
        compress_statistics=p.compress_statistics,
        quant_type=p.quant_type,
        quant_storage=p.quant_storage,
    )
    del data
    new = torch.nn.Parameter(packed, requires_grad=False)
    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        setattr(new, attr, getattr(p, attr))
    new.quant_state = qs
    new.bnb_quantized = True
    new.module = mod
    mod.quant_state = qs
    return new


def _keep_fp32(model, dtype) -> None:
    """transformers' dtype plan: modules it keeps in fp32 for this dtype (T5's `wo` under fp16)."""
    import torch

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    pats = list(plan)
    for name, mod in model.named_modules():
        if any(re.search(rf"(^|\.){re.escape(p)}($|\.)", name) for p in pats):
            mod.to(torch.float32)


def _build_model(config: dict, plan: TrainingPlan, targets: list[str]):
    """The model of the plan on the meta device, with quantisation, adapters and checkpointing applied."""
    import warnings

    import torch
    import transformers

    half = _dtype(plan.dtype)
    master = plan.method == "full" and plan.master_weights and plan.dtype != "fp32"
    param_dtype = torch.float32 if master else half
    cfg_d = dict(config)
    model_type = cfg_d.pop("model_type", "llama")
    cfg = transformers.AutoConfig.for_model(model_type, **cfg_d)
    cfg.use_cache = False
    attn = "eager" if plan.attention == "eager" else "sdpa"
    notes: list[str] = []
    if plan.attention == "flash":
        notes.append("flash attention traced as SDPA's flash kernel (the same saved tensors: output and logsumexp)")
    auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = auto.from_config(cfg, dtype=param_dtype, attn_implementation=attn)
        except ValueError as exc:
            if attn != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            with torch.device("meta"):
                model = auto.from_config(cfg, dtype=param_dtype, attn_implementation="eager")
            notes.append(
                f"transformers has no SDPA path for {model_type}: traced with eager attention (its default); "
                "flash-attention-2 would save less"
            )
        _keep_fp32(model, param_dtype)
        param_count = sum(p.numel() for p in model.parameters())
        if plan.method == "qlora":
            _quantize_linears(model, plan, half)
        ckpt_kwargs = {"use_reentrant": False}
        hf_stack = getattr(plan, "framework", "hf") == "hf"
        if plan.method == "qlora":
            from peft import prepare_model_for_kbit_training

            if plan.kbit_upcast and hf_stack:
                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=plan.grad_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
                )
            else:
                model.requires_grad_(False)
                if plan.grad_checkpointing:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        elif plan.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        if plan.method in ("lora", "qlora"):
            from peft import LoraConfig, TaskType, get_peft_model

            lcfg = LoraConfig(
                r=plan.lora_r,
                lora_alpha=plan.lora_alpha,
                lora_dropout=plan.lora_dropout,
                target_modules=targets,
                bias="none",
                task_type=TaskType.SEQ_2_SEQ_LM if cfg.is_encoder_decoder else TaskType.CAUSAL_LM,
            )
            # peft upcasts adapters to fp32; litgpt / torchtune keep them in the model dtype
            model = get_peft_model(model, lcfg, low_cpu_mem_usage=True, autocast_adapter_dtype=hf_stack)
            if not hf_stack:
                for name, p in model.named_parameters():
                    if "lora_" in name and p.dtype != half:
                        p.data = p.data.to(half)
    model.train()
    return model, cfg, param_count, notes + stack_notes(plan)


def _quantize_linears(model, plan: TrainingPlan, half) -> None:
    """Swap nn.Linear for bitsandbytes Linear4bit exactly where transformers' bnb loader does."""
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=plan.double_quant,
        bnb_4bit_compute_dtype=half,
    )
    skip = HfQuantizer.get_modules_to_not_convert(
        model, qc.llm_int8_skip_modules, list(getattr(model, "_keep_in_fp32_modules", None) or [])
    )
    # the checkpoint's dtype of every module before quantisation (what loading reads)
    dtypes = {name: mod.weight.dtype for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qc)
    from bitsandbytes.nn import Linear4bit

    for name, mod in model.named_modules():
        if isinstance(mod, Linear4bit):
            mod._sim_weight_dtype = dtypes.get(name, half)
            if mod.bias is not None:
                mod.bias = torch.nn.Parameter(mod.bias.to(dtypes.get(name, half)), requires_grad=False)
    model.is_loaded_in_4bit = True


def _optimizer(params: list, plan: TrainingPlan, meter):
    """The optimiser the HF Trainer builds for the plan (adamw_torch_fused / bitsandbytes AdamW)."""
    import torch

    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    import bitsandbytes as bnb

    paged = plan.optimizer.startswith("paged")
    bits = 8 if "8bit" in plan.optimizer else 32
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # its quantisation maps are host tensors computed from real values (.tolist()): not device memory
    with unset_fake_temporarily(), meter.paused():
        opt = bnb.optim.AdamW(params, lr=1e-4, weight_decay=0.0, optim_bits=bits, is_paged=paged)

    def get_state_buffer(p, dtype=torch.float32):
        buf = torch.zeros_like(p, dtype=dtype)
        if paged and p.numel() >= BNB_PAGED_MIN_NUMEL:
            meter.mark_paged(buf)
        return buf

    opt.get_state_buffer = get_state_buffer  # the CUDA branch of Optimizer8bit.get_state_buffer
    return opt


def _quant_state_tensors(model) -> list:
    out = []
    for mod in model.modules():
        qs = getattr(mod, "quant_state", None)
        if qs is None:
            continue
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            out.append(t)
        if getattr(qs, "state2", None) is not None:
            out.extend([qs.state2.absmax, qs.state2.code])
    return out


def trace_step(
    config: dict,
    plan: TrainingPlan,
    targets: list[str],
    *,
    fake: bool = True,
    steps: int = STEPS,
    prime_optimizer: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> TraceResult:
    """Trace `steps` optimiser steps of the plan and count live bytes.

    fake=True runs on fake tensors (no storage, any size); fake=False runs the same code on real CPU
    tensors (tiny models only): the check that the fake count equals the real one.

    prime_optimizer: first run one optimiser step on zero gradients, which leaves exactly the states a
    first training step leaves (and peaks as its optimiser step does), so one traced step then sees
    what the second step of a two-step run sees, at half the cost. A test holds the two equal.
    """
    import gc

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    check_plan(plan)
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    _prime_bitsandbytes()
    model, cfg, param_count, notes = _build_model(config, plan, targets)
    meter = _meter_class()()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake:
        fake_mode.cache_enabled = False  # hashing each op's arguments costs more than it saves here
    half = _dtype(plan.dtype)
    autocast = (
        torch.autocast("cpu", dtype=half)
        if plan.method == "full" and plan.master_weights and plan.dtype != "fp32"
        else contextlib.nullcontext()
    )
    vocab = {int(cfg.vocab_size)}
    b, s = plan.micro_batch, plan.seq_len
    micro_steps = min(plan.grad_accum, 2)
    gc_was = gc.isenabled()
    gc.disable()  # frees happen when references drop, as in the real run, not when a collection runs
    try:
        with _real_run_decisions(), _cuda_kernel_choices(), fake_mode, meter:
            _materialize(model, real_init=not fake)
            params = [p for p in model.parameters() if p.requires_grad]
            adapter_ids = {id(p) for n, p in model.named_parameters() if "lora_" in n}
            meter.categorise([p for p in model.parameters() if id(p) not in adapter_ids], "weights")
            meter.categorise([p for p in model.parameters() if id(p) in adapter_ids], "adapters")
            meter.categorise(list(model.buffers()), "weights")
            meter.categorise(_quant_state_tensors(model), "weights")
            opt = _optimizer(params, plan, meter)
            gc.collect()
            meter.set_phase("after_weights")
            after_weights = meter.live
            if prime_optimizer:
                meter.set_phase("optimizer_step")
                for p in params:
                    p.grad = torch.zeros_like(p)
                opt.step()
                _track_states(meter, opt)
                opt.zero_grad(set_to_none=True)
            for step in range(steps):
                for _ in range(micro_steps):
                    ids = torch.randint(0, int(cfg.vocab_size), (b, s))
                    labels = ids.clone()
                    meter.set_phase("forward")
                    loss = _forward_loss(model, ids, labels, autocast, plan)
                    del ids, labels
                    meter.set_phase("backward")
                    (loss / micro_steps).backward()
                    del loss
                meter.categorise([p.grad for p in params if p.grad is not None], "gradients")
                meter.set_phase("optimizer_step")
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # CUDA's default
                opt.step()
                _track_states(meter, opt)
                opt.zero_grad(set_to_none=True)
                if log:
                    log(f"step {step + 1}: peak {meter.peak / GIB:.3f} GiB in {meter.peak_phase}")
            paged = meter.paged
            del opt, params
    finally:
        if gc_was:
            gc.enable()
    comp = meter.composition(meter.peak_event, vocab)
    phases = {
        "after_weights": after_weights,
        "forward": meter.phase_peak.get("forward", 0),
        "backward": meter.phase_peak.get("backward", 0),
        "optimizer_step": meter.phase_peak.get("optimizer_step", 0),
    }
    return TraceResult(
        peak_bytes=int(meter.peak),
        peak_phase=meter.peak_phase,
        phases=phases,
        components={k: int(comp.get(k, 0)) for k in COMPONENTS if k != "runtime_overhead"},
        paged_bytes=int(paged),
        param_count=int(param_count),
        ops=meter.ops,
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - c0,
        fake=fake,
        versions=library_versions(),
        notes=tuple(notes),
    )


def _forward_loss(model, ids, labels, autocast, plan: TrainingPlan):
    """The Trainer's compute_loss: the model output (logits) dies here, only the loss lives on."""
    import torch
    import torch.nn.functional as F

    if not getattr(plan, "chunked_loss", False):
        with autocast:
            out = model(input_ids=ids, labels=labels)
        return out.loss
    with autocast:
        logits = model(input_ids=ids).logits
    # causal shift as transformers does it: the label of position t is token t + 1
    target = F.pad(labels, (0, 1), value=-100)[..., 1:]
    if getattr(plan, "framework", "hf") == "litgpt":  # litgpt chunked_cross_entropy(chunk_size=128)
        pairs = zip(logits.split(128, dim=1), target.split(128, dim=1), strict=True)
        losses = [F.cross_entropy(lg.reshape(-1, lg.size(-1)), t.reshape(-1), reduction="none") for lg, t in pairs]
        return torch.cat(losses).mean()
    # torchtune CEWithChunkedOutputLoss: 8 chunks, each upcast to fp32
    pairs = zip(logits.chunk(8, dim=1), target.chunk(8, dim=1), strict=True)
    total = sum(F.cross_entropy(lg.float().reshape(-1, lg.size(-1)), t.reshape(-1), reduction="sum") for lg, t in pairs)
    return total / target.numel()


def _track_states(meter, opt) -> None:
    """Label the optimiser states; bitsandbytes' qmaps enter here: on CUDA, init_state copies its
    host maps to the device, on the CPU the same tensor is reused (no op to see)."""
    import torch

    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                meter.track(v, "optimizer.state", "optimizer_states")


@contextlib.contextmanager
def _real_run_decisions():
    """Give transformers, on fake tensors, the answers it computes from real data in a real run.

    transformers checks position_ids for several sequences packed in one row (a data-dependent test);
    on fake tensors it cannot look and builds an explicit block mask, which moves SDPA off its causal
    kernel. Our inputs are one sequence per row (no position_ids passed), for which the real check
    returns None: the same ops run here, then the answer the real data gives is returned.
    """
    from torch._subclasses.fake_tensor import is_fake

    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover
        yield
        return
    orig = getattr(masking_utils, "find_packed_sequence_indices", None)
    if orig is None:
        yield
        return

    def find_packed_sequence_indices(position_ids):
        out = orig(position_ids)
        return None if out is not None and is_fake(out) else out

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig


@contextlib.contextmanager
def _cuda_kernel_choices():
    """Make the CPU trace take the kernels CUDA takes where they differ in what backward keeps.

    * dropout: CUDA's fused kernel (native_dropout) keeps a 1-byte mask; the CPU path keeps a scaled
      noise tensor in the input dtype. Traced as native_dropout.
    * SDPA with dropout: CUDA's flash / memory-efficient kernels draw the mask from a Philox seed
      inside the kernel (nothing saved); the CPU falls back to the math path and keeps the s x s
      probabilities. Traced without the dropout: the tensors the fused kernel keeps.

    * autocast: CUDA's autocast runs pow, exp, log, rsqrt, reciprocal, logsumexp, layer_norm and
      softplus in fp32 (aten/src/ATen/autocast_mode.cpp); CPU autocast leaves them in the half dtype.
      Under autocast, their functional forms (torch.pow(x, 3), as transformers' gelu_new calls it) get
      half inputs cast to fp32, as on CUDA; the method forms (x.pow(3)) are not reached.

    The functions are swapped on torch / torch.nn.functional for the duration of the trace (a function
    mode would not reach the recomputation that checkpointing runs inside backward).
    """
    import torch
    import torch.nn.functional as F

    dropout, sdpa = F.dropout, F.scaled_dot_product_attention
    halves = (torch.float16, torch.bfloat16)

    def fp32_under_autocast(fn):
        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in halves else a for a in args)
            return fn(*args, **kwargs)

        return run

    fp32_ops = [(torch, n) for n in ("pow", "exp", "log", "rsqrt", "reciprocal", "logsumexp")]
    fp32_ops += [(F, n) for n in ("layer_norm", "softplus")]
    originals = [(mod, name, getattr(mod, name)) for mod, name in fp32_ops]

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    def flash_sdpa(*args, **kwargs):
        if len(args) > 4:
            args = (*args[:4], 0.0, *args[5:])
        elif kwargs.get("dropout_p"):
            kwargs = {**kwargs, "dropout_p": 0.0}
        return sdpa(*args, **kwargs)

    F.dropout, F.scaled_dot_product_attention = fused_dropout, flash_sdpa
    for mod, name, fn in originals:
        setattr(mod, name, fp32_under_autocast(fn))
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa
        for mod, name, fn in originals:
            setattr(mod, name, fn)


def _prime_bitsandbytes() -> None:
    """bitsandbytes caches its 8-bit quantisation map in a module dict on first use; create it with
    real tensors, outside any fake mode, so a trace never leaves a fake tensor in that cache."""
    import logging

    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its CPU backend warns at import about an optional kernels package
    try:
        import bitsandbytes.functional as F
    except ImportError:  # pragma: no cover
        return
    finally:
        quiet.setLevel(level)
    if "dynamic" not in F.name2qmap:
        F.name2qmap["dynamic"] = F.create_dynamic_map()
