"""Which trials to run: scaled-down real architectures x sequence length x micro-batch x method.

Why this shape: the fit needs every term of the analytical model to move independently (weights,
adapters, activations, logits, quantisation temporaries; FLOPs, memory traffic, per-layer and
per-adapter overheads), and held-out validation needs several *configuration groups* (architectures)
per family, so that each group can be predicted from the others.

Architectures are the catalog's Llama, Qwen2 and GPT-2 shapes (their width ratios, GQA, biases,
tied embeddings, norm and MLP kinds) scaled down in width, depth and vocabulary, random-initialised:
nothing is downloaded. ``lora``, ``qlora`` and ``dora`` always; ``full`` for the small configurations.

On a GPU the design grows with the card: each group is sized by the analytical estimate so that
its largest trials fill a real fraction of the device memory (up to ~85%); on the CPU it stays small.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from typing import Any

from advisor.catalog import default_catalog, model_from_config
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import ALL_LINEAR, TrainingPlan
from advisor.specs import GpuSpec, ModelSpec
from calibration.trial import TrialSpec

BUDGETS = ("quick", "standard", "thorough")

#: family -> (catalog model whose shape is scaled down, HF model_type)
TEMPLATES: dict[str, tuple[str, str]] = {
    "llama": ("llama-3.2-1b", "llama"),
    "qwen2": ("qwen2.5-0.5b", "qwen2"),
    "gpt2": ("gpt2", "gpt2"),
}

#: LoRA adapter shapes tried: (rank, targets)
ADAPTERS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (8, ("q", "v")),
    (16, (ALL_LINEAR,)),
    (4, ("q", "k", "v", "o")),
    (32, ("gate", "up", "down")),
    (64, (ALL_LINEAR,)),
)


@dataclass(frozen=True)
class Arch:
    """One configuration group: a scaled-down architecture."""

    name: str
    family: str
    hidden: int
    layers: int
    vocab: int
    head_dim: int

    @classmethod
    def scaled(cls, family: str, hidden: int, layers: int, vocab: int, head_dim: int) -> Arch:
        """The group named by its numbers, e.g. ``llama-h64-l2-v1k`` (vocabulary in k of 1024, or of 1000)."""
        v = str(vocab) if vocab < 1000 else f"{vocab // 1024}k" if vocab % 1024 == 0 else f"{vocab // 1000}k"
        return cls(f"{family}-h{hidden}-l{layers}-v{v}", family, hidden, layers, vocab, head_dim)

    def config(self) -> dict[str, Any]:
        return scaled_config(self.family, self.hidden, self.layers, self.vocab, self.head_dim)


def _archs(*rows: tuple[str, int, int, int, int]) -> list[Arch]:
    """Configuration groups from (family, hidden, layers, vocab, head_dim) rows."""
    return [Arch.scaled(*row) for row in rows]


@dataclass(frozen=True)
class Budget:
    archs: tuple[Arch, ...]
    trials_per_arch: int
    seq_lens: tuple[int, ...]
    micro_batches: tuple[int, ...]
    max_tokens: int  # micro_batch x seq_len cap per trial
    full_max_hidden: int  # full fine-tuning only for configurations up to this width
    warmup_steps: int
    timed_steps: int
    timeout_s: float
    # passes over the design whose step times are kept at their minimum: a shared CPU (a VM's vCPUs) stretches
    # even process CPU time, by up to 2x, for minutes at a time; a second pass minutes later rarely repeats it
    timing_passes: int = 1


#: CPU configuration groups: (first budget that has it, family, hidden, layers, vocab, head_dim)
CPU_GROUPS: tuple[tuple[str, str, int, int, int, int], ...] = (
    ("quick", "llama", 64, 2, 1024, 32),
    ("quick", "llama", 128, 3, 2048, 32),
    ("quick", "llama", 192, 2, 4096, 64),
    ("quick", "llama", 256, 4, 512, 64),
    ("quick", "llama", 384, 2, 1024, 64),
    ("quick", "qwen2", 96, 3, 2048, 32),
    ("quick", "qwen2", 192, 2, 1024, 64),
    ("quick", "qwen2", 256, 3, 512, 64),
    ("quick", "gpt2", 64, 3, 2048, 32),
    ("quick", "gpt2", 160, 2, 1024, 32),
    ("quick", "gpt2", 128, 4, 512, 32),
    # large vocabularies at narrow widths: the loss over tokens x vocabulary (and, on a CPU, its tensors
    # beyond the allocator's mmap threshold) must move apart from the blocks, or the fit cannot tell them
    ("quick", "llama", 64, 2, 32768, 32),
    ("quick", "qwen2", 128, 2, 24576, 32),
    ("quick", "gpt2", 96, 2, 16384, 32),
    ("standard", "llama", 320, 2, 2048, 64),
    ("standard", "qwen2", 128, 4, 4096, 32),
    ("standard", "gpt2", 256, 3, 4096, 64),
)


def _cpu_budget(name: str) -> Budget:
    archs = tuple(_archs(*(g[1:] for g in CPU_GROUPS if BUDGETS.index(g[0]) <= BUDGETS.index(name))))
    if name == "quick":
        return Budget(archs, 8, (64, 128, 256, 512), (1, 2, 4), 1024, 128, 1, 3, 300, timing_passes=2)
    if name == "standard":
        return Budget(archs, 10, (64, 128, 256, 512), (1, 2, 4), 2048, 192, 1, 5, 600, timing_passes=2)
    return Budget(archs, 16, (64, 128, 256, 512, 1024), (1, 2, 4, 8), 4096, 256, 2, 7, 900, timing_passes=3)


def _gpu_archs(device: GpuSpec, name: str) -> tuple[Arch, ...]:
    """Widths and depths that reach the card: from ~50M to a few billion parameters."""
    mem_gib = device.memory_gib
    big = _archs(
        ("llama", 512, 8, 32000, 64),
        ("qwen2", 896, 12, 32768, 64),
        ("gpt2", 768, 12, 50257, 64),
        ("llama", 1536, 16, 32000, 128),
        ("qwen2", 1536, 16, 65536, 128),
        ("gpt2", 1280, 24, 50257, 64),
        ("llama", 2048, 16, 128256, 64),
    )
    if mem_gib >= 40:  # ~3B parameters: Llama-3.2-3B's shape
        big += _archs(("llama", 3072, 28, 128256, 128))
    if name == "quick":
        return tuple(big[:4])
    return tuple(big)


def _gpu_budget(device: GpuSpec, name: str) -> Budget:
    per = {"quick": 6, "standard": 10, "thorough": 16}[name]
    seqs = (256, 512, 1024, 2048, 4096)
    return Budget(_gpu_archs(device, name), per, seqs, (1, 2, 4, 8, 16), 65536, 2048, 2, 8, 1200)


def budget_for(device: GpuSpec, name: str) -> Budget:
    if name not in BUDGETS:
        raise InvalidInputError(f"budget must be one of {', '.join(BUDGETS)}", field="budget")
    return _cpu_budget(name) if device.gpu_class == "cpu" else _gpu_budget(device, name)


# ---- architectures ---------------------------------------------------------------------------------
def _round_to(x: float, m: int) -> int:
    return max(m, round(x / m) * m)


def scaled_config(family: str, hidden: int, layers: int, vocab: int, head_dim: int) -> dict[str, Any]:
    """A HF config dict of `family`'s catalog shape at this width, depth and vocabulary."""
    if family not in TEMPLATES:
        raise InvalidInputError(f"family must be one of {', '.join(TEMPLATES)}", field="family")
    template: ModelSpec = default_catalog().model(TEMPLATES[family][0])
    mtype = TEMPLATES[family][1]
    heads = max(1, hidden // head_dim)
    ratio = template.intermediate_size / template.hidden_size
    inter = _round_to(hidden * ratio, 16)
    special = {"bos_token_id": 0, "eos_token_id": vocab - 1, "pad_token_id": None}
    if mtype == "gpt2":
        return {
            "model_type": "gpt2",
            "n_embd": hidden,
            "n_layer": layers,
            "n_head": heads,
            "n_inner": inter,
            "vocab_size": vocab,
            "n_positions": 8192,
            **special,
        }
    kv_groups = template.num_attention_heads // template.kv_heads
    kv = max(1, heads // kv_groups)
    while heads % kv:
        kv -= 1
    return {
        "model_type": mtype,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": template.tie_word_embeddings,
        **special,
    }


def catalog_config(name: str, model_type: str) -> dict[str, Any]:
    """A HF config dict of a catalog model (Llama-format families): a full-size random-initialised check."""
    m = default_catalog().model(name)
    return {
        "model_type": model_type,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": m.tie_word_embeddings,
    }


# ---- trials ----------------------------------------------------------------------------------------
def device_plan(device: GpuSpec, method: str, seq: int, mb: int, ckpt: bool, **kw: Any) -> TrainingPlan:
    """A `method` plan of `mb` x `seq` tokens on `device`, in the device's default dtype."""
    return TrainingPlan(
        method=method,
        gpu_id=device.id,
        dtype=device.default_dtype(),
        micro_batch=mb,
        seq_len=seq,
        grad_checkpointing=ckpt,
        **kw,
    )


def _plan(method: str, device: GpuSpec, seq: int, mb: int, ckpt: bool, adapter, optimizer: str) -> TrainingPlan:
    r, targets = adapter if method != "full" else (16, (ALL_LINEAR,))  # no adapter: one canonical plan
    return device_plan(
        device, method, seq, mb, ckpt, optimizer=optimizer, lora_r=r, lora_alpha=2 * r, lora_targets=targets
    )


def design(
    device: GpuSpec, budget: str = "quick", device_str: str = "cpu", seed: int = 0, threads: int | None = None
) -> list[TrialSpec]:
    """The trial list for `device` under `budget` (deterministic for a given seed)."""
    b = budget_for(device, budget)
    rng = random.Random(seed)
    estimator = AnalyticalEstimator()
    gpu = device.gpu_class != "cpu"
    trials: list[TrialSpec] = []
    for arch in b.archs:
        cfg = arch.config()
        spec = model_from_config(dict(cfg), name=arch.name)
        methods = ["lora", "qlora", "dora"] + (["full"] if arch.hidden <= b.full_max_hidden else [])
        grid = list(itertools.product(methods, b.seq_lens, b.micro_batches, (True, False), range(len(ADAPTERS))))
        rng.shuffle(grid)
        chosen: list[TrainingPlan] = []
        seen_methods: set[tuple[str, bool]] = set()
        # first pass: cover every method x checkpointing pair, then fill up to trials_per_arch
        for pass_ in (0, 1):
            for method, seq, mb, ckpt, ai in grid:
                if len(chosen) >= b.trials_per_arch:
                    break
                if seq * mb > b.max_tokens:
                    continue
                if pass_ == 0 and (method, ckpt) in seen_methods:
                    continue
                optimizer = "adamw-8bit" if (gpu and method == "full" and rng.random() < 0.3) else "adamw"
                plan = _plan(method, device, seq, mb, ckpt, ADAPTERS[ai], optimizer)
                if plan in chosen:
                    continue
                if gpu and not _fits_gpu(estimator, spec, device, plan):
                    continue
                chosen.append(plan)
                seen_methods.add((method, ckpt))
        if not gpu:
            # eager attention (Gemma-2 has no other path in transformers): its s x s scores and softmax cost
            # differently from SDPA, so one LoRA trial of each group runs it too (the rng is not touched)
            base = next((p for p in chosen if p.method == "lora" and p.seq_len >= 128), None)
            if base is not None:
                chosen.append(replace(base, attention="eager"))
        if "full" in methods:
            # the fewest tokens: the optimiser step (all gradients alive) may hold the peak, which the fit needs
            step = _plan("full", device, min(b.seq_lens), 1, False, ADAPTERS[0], "adamw")
            if step not in chosen:
                chosen.append(step)
        if gpu:
            chosen = _with_fill_trials(chosen, estimator, spec, device, b)
        for plan in chosen:
            trials.append(
                TrialSpec(
                    id=f"{arch.name}/{_plan_label(plan)}",
                    group=arch.name,
                    arch=cfg,
                    plan=plan.to_dict(),
                    device=device_str,
                    warmup_steps=b.warmup_steps,
                    timed_steps=b.timed_steps,
                    threads=threads,
                    seed=seed,
                    timeout_s=b.timeout_s,
                )
            )
    return trials


def _with_fill_trials(
    chosen: list[TrainingPlan], estimator: AnalyticalEstimator, spec: ModelSpec, device: GpuSpec, b: Budget
) -> list[TrainingPlan]:
    """Make sure the group's largest LoRA and QLoRA trials fill the card (up to ~85% by the prior)."""
    out = list(chosen)
    for method in ("lora", "qlora"):
        best: tuple[int, TrainingPlan] | None = None
        for seq, mb in itertools.product(b.seq_lens, b.micro_batches):
            if seq * mb > b.max_tokens:
                continue
            plan = _plan(method, device, seq, mb, False, ADAPTERS[1], "adamw")
            mem = estimator.estimate(spec, device, plan).memory.device_total_bytes
            if mem <= 0.85 * device.memory_bytes and (best is None or mem > best[0]):
                best = (mem, plan)
        if best is not None and best[1] not in out:
            out.append(best[1])
    return out


def _fits_gpu(estimator: AnalyticalEstimator, spec: ModelSpec, device: GpuSpec, plan: TrainingPlan) -> bool:
    """On a GPU keep trials the prior says take at most ~85% of the card (larger ones would OOM)."""
    est = estimator.estimate(spec, device, plan)
    return est.memory.device_total_bytes <= 0.85 * device.memory_bytes


def shape_label(plan: TrainingPlan) -> str:
    """method, sequence, micro-batch and checkpointing of a plan, e.g. ``lora-s512-b1-ckpt``."""
    return f"{plan.method}-s{plan.seq_len}-b{plan.micro_batch}-{'ckpt' if plan.grad_checkpointing else 'nockpt'}"


def _plan_label(plan: TrainingPlan) -> str:
    parts = [shape_label(plan)]
    if plan.method != "full":
        parts.append(f"r{plan.lora_r}-{'+'.join(plan.lora_targets)}")
    if plan.optimizer != "adamw":
        parts.append(plan.optimizer)
    if plan.attention != "sdpa":
        parts.append(plan.attention)
    return "-".join(parts)


def largest_trial(trials: list[TrialSpec]) -> TrialSpec | None:
    """The trial with the most tokens x parameters (for extrapolation checks)."""
    if not trials:
        return None

    def size(t: TrialSpec) -> float:
        c = t.arch
        h = c.get("hidden_size") or c.get("n_embd")
        n = c.get("num_hidden_layers") or c.get("n_layer")
        return float(h) ** 2 * n * t.plan["seq_len"] * t.plan["micro_batch"]

    return max(trials, key=size)


def with_device(trials: list[TrialSpec], device_str: str) -> list[TrialSpec]:
    return [replace(t, device=device_str) for t in trials]
