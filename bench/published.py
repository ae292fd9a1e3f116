"""Reads the vendored published measurements (reference/README.md) into comparable cases.

Two datasets, scored apart because their sources, units and statistics differ:

* ``published_1``: reference/published_measurements.csv (torchtune, litgpt, peft, vendor tables);
* ``published_2``: reference/published_measurements_2.csv (Phil Schmid notebooks, PEFT FSDP/DeepSpeed docs,
  LLaMA-Factory via Unsloth, NeMo AutoModel, axolotl READMEs, Raschka's lit-gpt article).

A row becomes a `Case`: a model from our catalog, a TrainingPlan in the row's stack, the memory figure in
GiB with the statistic the source printed, and the throughput normalised to tokens/s per GPU. Memory and
throughput are judged apart: each has its own skip reason (``skip`` for memory, ``throughput_skip``), since
many rows state one and not the other. Nothing here is tuned per row: each field maps from the row's own
columns and notes by one rule per source.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, replace
from pathlib import Path

from advisor.catalog import default_catalog
from advisor.errors import AdvisorError
from advisor.plans import METHOD_NAMES, TrainingPlan, resolve_targets
from advisor.specs import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "reference" / "published_measurements.csv"
CSV2 = ROOT / "reference" / "published_measurements_2.csv"
DATASETS: dict[str, Path] = {"published_1": CSV, "published_2": CSV2}

#: the statistics a source can print (what our estimate is compared with):
#: allocated = torch.cuda.max_memory_allocated; active = torchtune's "active" (allocated, same peak);
#: reserved = max_memory_reserved (allocator segments); device = nvidia-smi-like (reserved + CUDA context);
#: unknown = not named by the source.
STATISTICS = ("allocated", "active", "reserved", "device", "unknown")

GPU_MAP = {
    "rtx 4090": "rtx-4090",
    "rtx 4090 24gb (implied)": "rtx-4090",
    "a6000": "rtx-a6000",
    "a100": "a100-80gb",
    "a100 80gb": "a100-80gb",
    "a100-sxm4-40gb": "a100-40gb",
    "a100-sxm4-40gb (per resource-tables.md)": "a100-40gb",
    "a10g": "a10g",
    "a10g 24gb (aws g5.12xlarge)": "a10g",
    "nvidia l40s": "l40s",
    "l4 24gb": "l4",
    "l4 24gb (aws g6.2xlarge)": "l4",
    "h100 80gb": "h100-sxm",
    "h100 80gb (dgx-h100)": "h100-sxm",
}
#: rows whose GPU model is not stated: the memory of a bf16 step does not depend on which GPU runs it, so a
#: catalog GPU of at least the stated size stands in for the memory comparison; throughput is not scored.
GPU_UNSTATED = {
    "a100 (memory size not stated)": "a100-80gb",
    "40gb gpu (model not stated; a100 40gb likely)": "a100-40gb",
    "24gb gpu (model not stated)": "rtx-4090",
    "gpu with >24gb (model not stated)": "a100-80gb",
    "not stated (single gpu)": "a100-80gb",
}


@dataclass
class Case:
    """One published row. ``skip`` is why its memory cannot be scored (None: it can), ``throughput_skip``
    the same for its throughput; ``plan`` is set whenever the set-up is expressible at all."""

    row: int  # 0-based row of its CSV file
    model: ModelSpec | None
    plan: TrainingPlan | None
    measured_gib: float | None  # peak memory per GPU in GiB (converted from GB where the source used 1e9)
    statistic: str  # one of STATISTICS
    kind: str  # measured | measured (OOM) | estimated ...
    source: str
    framework: str  # hf | litgpt | torchtune (whose model code ran)
    skip: str | None  # reason the memory figure cannot be scored
    raw: dict
    dataset: str = "published_1"
    unit: str = "GiB"  # the unit the source printed: GiB or GB
    measured_tokens_per_s: float | None = None  # tokens/s per GPU
    throughput_skip: str | None = "no throughput figure"
    stack_notes: tuple[str, ...] = ()  # set-up the plan does not carry (torch.compile, fused kernels, approximate ...)

    @property
    def key(self) -> str:
        """Unique across datasets: ``published_2:7``."""
        return f"{self.dataset}:{self.row}"


def load_cases(datasets: tuple[str, ...] | None = None) -> list[Case]:
    """Every row of the named datasets (default: all of DATASETS), in file order."""
    cat = default_catalog()
    out: list[Case] = []
    for name in datasets or tuple(DATASETS):
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; one of {sorted(DATASETS)}")
        with DATASETS[name].open() as fh:
            for i, r in enumerate(csv.DictReader(fh)):
                out.append(_case(name, i, r, cat))
    return out


def _num(text: str) -> float | None:
    m = re.search(r"\d+(?:\.\d+)?", text or "")
    return float(m.group()) if m else None


def _framework(r: dict) -> str:
    s = (r["source"] + " " + r.get("framework", "")).lower()
    if "litgpt" in s or "lit-gpt" in s:
        return "litgpt"
    if "torchtune" in s:
        return "torchtune"
    return "hf"  # transformers model code: peft, TRL, axolotl, LLaMA-Factory, NeMo AutoModel


def _targets(text: str) -> tuple[str, ...]:
    """LoRA target roles from the row's wording ("q,v", "Q and V only", "q,k,v,proj,mlp,head", ...)."""
    t = text.lower()
    words = set(re.findall(r"[a-z_]+", t))
    if not words:
        return ("q", "v")  # litgpt 8641822 and torchtune 7B_lora defaults, per the rows' notes
    head = ("lm_head",) if words & {"head", "lm_head"} and "modules_to_save" not in words else ()
    if ("all" in words and words & {"layers", "linear"}) or "all-linear" in t:
        return ("q", "k", "v", "o", "gate", "up", "down", *head)
    roles = []
    for role, names in (
        ("q", {"q", "q_proj"}),
        ("k", {"k", "k_proj"}),
        ("v", {"v", "v_proj"}),
        ("o", {"o", "o_proj", "output_proj", "proj", "projection"}),
        ("gate", {"mlp", "gate_proj"}),
        ("up", {"mlp", "up_proj"}),
        ("down", {"mlp", "down_proj"}),
    ):
        if words & names:
            roles.append(role)
    return (*(roles or ("q", "v")), *head)


def _optimizer(text: str) -> tuple[str | None, str | None]:
    t = text.lower()
    if "offload" in t or "optimizer_in_bwd" in t:
        return None, "optimiser in backward / CPU offload is not modelled"
    if "paged" in t and "8bit" in t:
        return "paged-adamw-8bit", None
    if "paged" in t:
        return "paged-adamw-32bit", None
    if "8bit" in t:
        return "adamw-8bit", None
    return "adamw", None


def _attention(text: str) -> str:
    """The plan's attention kernel: FlashAttention-2 and xformers keep no s x s matrix, as SDPA."""
    t = text.lower()
    if "eager" in t and "sdpa" not in t:
        return "eager"
    if "flash_attention_2" in t or "xformers" in t:
        return "flash"
    return "sdpa"


def _memory_reading(dataset: str, r: dict, fw: str) -> tuple[float | None, str, str]:
    """(value in GiB, unit printed, statistic) of the row's memory figure."""
    value = _num(r["peak_mem_gb"])
    if dataset == "published_1":
        notes = r["notes"].lower()
        stat = "reserved" if "reserved" in notes else ("active" if "active" in notes else "allocated")
        # litgpt divides by 1e9; peft's method_comparison reports bytes
        gb = "1e9" in notes or fw == "litgpt" or re.search(r"\bbytes\b", notes) is not None
    else:
        s = r["mem_statistic"].lower()
        if "max_memory_allocated" in s:
            stat = "allocated"
        elif "device_mem_reserved" in s:
            stat = "reserved"  # axolotl's logged statistic (named by the same repository's gpt-oss README)
        elif "nvidia-smi" in s or "tool not named" in s:
            # PEFT's FSDP/DeepSpeed docs: read off monitoring screenshots or stated in prose; reference/README.md
            # reads the statistic as probably nvidia-smi-like (the device total)
            stat = "device"
        else:
            stat = "unknown"
        gb = "[gib]" not in s  # GiB only where the source wrote GiB
    gib = None if value is None else (value * 1e9 / 1024**3 if gb else value)
    return gib, ("GB" if gb else "GiB"), stat


def _throughput(dataset: str, r: dict, n: int, fw: str) -> tuple[float | None, str | None]:
    """(tokens/s per GPU, None) or (None, why the figure is not a per-GPU token rate)."""
    value = _num(r["throughput_value"])
    unit = r["throughput_unit"].lower()
    if value is None:
        return None, "no throughput figure"
    if "min per 1k iterations" in unit:
        return None, "minutes per 1k iterations over variable-length Alpaca samples: tokens per iteration not stated"
    if "min total runtime" in unit:
        return None, "wall time of whole epochs of Alpaca2k: the dataset's token count is not stated"
    if not unit.startswith("tokens/s") and "tgs" not in unit:
        return None, f"throughput unit {r['throughput_unit']!r} is not a token rate"
    if "per gpu" in unit or "per v100 gpu" in unit or "tgs" in unit or n == 1:
        return value, None
    return None, "tokens/s on several GPUs, per-GPU vs aggregate not stated"


_NO_OFFLOAD = re.compile(r"(without|no|disabling) (cpu )?offload(ing)?|liger kernels=off")

# set-up words in a row (framework, notes, attention) -> why a plan cannot express it
_SETUP_SKIPS = (
    ("deepspeed", "DeepSpeed ZeRO-3 is not a sharding we express"),
    ("offload_params", "FSDP CPU offload of parameters is not modelled"),
    ("cpu offload", "CPU offload is not modelled"),
    ("tp=2", "tensor parallelism (TP=2) is not modelled"),
    ("unsloth", "Unsloth's fused kernels and offloaded checkpointing are not modelled"),
)
# set-up words that the plan does not carry but that leave the row comparable (reported with the case)
_STACK_NOTES = (
    ("torch.compile enabled", "torch.compile"),
    ("uses torch compile", "torch.compile"),
    ("liger", "Liger kernels"),
    ("triton", "Triton LoRA kernels"),
    ("te kernels", "Transformer Engine kernels"),
    ("cut cross entropy", "Cut Cross-Entropy (no logits materialised)"),
    ("approximate", "approximate figure"),
    ("secondary quotation", "secondary quotation"),
)


#: litgpt config_hub/finetune/<model>/<method>.yaml train.global_batch_size, for the rows whose gradient
#: accumulation changes the peak (full fine-tuning keeps every gradient through the next micro-steps' backward).
#: Read from Lightning-AI/litgpt config_hub/finetune/tiny-llama/full.yaml (global_batch_size: 32,
#: micro_batch_size: 4, devices: 1).
CONFIG_HUB_GLOBAL_BATCH = {("tiny-llama-1.1b", "full"): 32}


def _config_hub_accumulation(r: dict, method: str, micro_batch: int) -> int:
    """Micro-steps per optimiser step of a litgpt config_hub row (1 where the config was not read)."""
    if "config_hub" not in r["source"]:
        return 1
    global_batch = CONFIG_HUB_GLOBAL_BATCH.get((r["model"].strip().lower(), method))
    return max(1, global_batch // micro_batch) if global_batch else 1


def _case(dataset: str, i: int, r: dict, cat) -> Case:
    kind = r["measured_or_estimated"]
    fw = _framework(r)
    notes = r["notes"]
    # the row's own set-up words (not its source: "Unsloth README" quotes LLaMA-Factory's plain HF rows)
    low = " ".join((notes, r.get("framework", ""), r.get("attention", ""))).lower()
    low = _NO_OFFLOAD.sub("", low)
    measured_gib, unit, stat = _memory_reading(dataset, r, fw)
    n = int(_num(r["num_gpus"]) or 1)
    tput, tput_skip = _throughput(dataset, r, n, fw)
    stack = tuple(dict.fromkeys(note for marker, note in _STACK_NOTES if marker in low + " " + kind.lower()))

    def case(plan_skip: str | None, model=None, plan=None, mem_skip: str | None = None, t_skip=None) -> Case:
        """plan_skip rules out both figures; mem_skip / t_skip one of them."""
        m_reason = plan_skip or mem_skip
        t_reason = plan_skip or tput_skip or t_skip
        return Case(
            row=i,
            model=model if plan is not None else None,
            plan=plan,
            measured_gib=measured_gib,
            statistic=stat,
            kind=kind,
            source=r["source"],
            framework=fw,
            skip=m_reason,
            raw=r,
            dataset=dataset,
            unit=unit,
            measured_tokens_per_s=tput,
            throughput_skip=t_reason,
            stack_notes=stack,
        )

    if not kind.startswith("measured"):
        return case(f"not a measurement ({kind})")
    mem_skip = None
    if measured_gib is None and "OOM" not in kind:
        mem_skip = "no peak memory figure"
    elif stat == "unknown":
        mem_skip = f"memory statistic not stated ({r.get('mem_statistic', '')!r})"
    name = r["model"].split(" (")[0]
    try:
        model = cat.model(name)
    except AdvisorError:
        return case(f"model {r['model']!r} not in the catalog (issue 11 adds Hugging Face Hub models)")
    method = r["method"]
    if method not in METHOD_NAMES:
        return case(f"method {method} not modelled")
    if "int8" in r["quant"].lower():
        return case("8-bit (LLM.int8) frozen base weights are not a method we model")
    # peft modules_to_save (trainable full copies of the head / embedding), e.g. "all-linear + modules_to_save lm_head,..."
    mts = re.search(r"modules_to_save\s*=?\s*\[?([a-z_, ]+)", r["lora_targets"].lower())
    modules_to_save = tuple(x.strip() for x in mts.group(1).split(",") if x.strip()) if mts else ()
    lnotes = _NO_OFFLOAD.sub("", notes.lower())
    for marker, why in (
        ("activation offloading", "activation offloading (cumulative step) is not modelled"),
        ("optimizer_in_bwd", "optimiser step fused into backward is not modelled"),
        ("step: baseline", "unpacked variable-length baseline: sequence length not stated"),
        ("cpu offload", "CPU offload is not modelled"),
    ):
        if marker in lnotes and not (
            marker == "activation offloading" and "step: + activation offloading" not in lnotes and method == "full"
        ):
            return case(why)
    for marker, why in _SETUP_SKIPS:
        if marker in low:
            return case(why)
    if "0217d44c" in r["source"]:
        # torchtune's README table of 0217d44c states no sequence length (the CSV's 2048 is not in it); its
        # alpaca_dataset then truncated to max_seq_len 512 unpacked, padded per batch (datasets/_alpaca.py @0432b3a5)
        return case(
            "tokens per step not stated: the table states no sequence length (torchtune alpaca at that commit: "
            "up to 512 tokens, padded per batch)"
        )
    if "method_comparison" in r["source"]:
        mem_skip = mem_skip or "peak includes eval generation (batch 50) and is 'minus init': not a training-step peak"
    seq_text = r["seq_len"]
    seq = _num(seq_text)
    variable = "variable" in seq_text.lower() or "<=" in seq_text
    longest = re.search(r"longest sample (\d+) tokens", notes) or re.search(
        r"longest ~?(\d+(?:\.\d+)?)k tokens", seq_text
    )
    if longest and (seq is None or "longest" in seq_text):
        # litgpt pads each batch to its longest sample: the peak is at the longest
        seq = float(longest.group(1)) * (1000 if "k tokens" in longest.group(0) else 1)
    elif variable and fw != "litgpt":
        return case(f"variable-length samples ({seq_text}): tokens per micro-batch not stated")
    t_skip = "variable-length samples: tokens per micro-step not stated" if variable else None
    mb = _num(r["micro_batch"])
    if seq is None or mb is None:
        return case("sequence length or micro-batch not stated")
    gtext = r["gpu"].strip().lower()
    gpu_id = GPU_MAP.get(gtext)
    if gpu_id is None and gtext in GPU_UNSTATED:
        gpu_id = GPU_UNSTATED[gtext]
        t_skip = t_skip or "GPU model not stated"
    if gpu_id is None:
        return case(f"GPU {r['gpu']!r} not stated or not in the catalog")
    opt_text = r["optimizer"] or "adamw"
    if fw == "litgpt" and method == "qlora" and dataset == "published_2":
        # lit-gpt finetune/lora.py (Oct 2023) switched to bnb PagedAdamW when --quantize was set (as the
        # dataset-1 rows of the same script state)
        opt_text = "paged adamw"
    opt, why = _optimizer(opt_text)
    if opt is None:
        return case(why or "optimiser not modelled")
    ckpt_text = r["grad_checkpointing"].lower()
    if ckpt_text.startswith("yes"):
        ckpt = True
    elif ckpt_text.startswith("no"):
        ckpt = False
    elif fw == "litgpt":
        ckpt = False  # litgpt's single-device LoRA/QLoRA/full scripts do not checkpoint activations
    else:
        return case("gradient checkpointing unknown")
    if fw == "litgpt" and "All runs are single-GPU" in notes and n > 1:
        n = 1
        t_skip = t_skip or "litgpt row labelled multi-GPU but run on one GPU"
    sharding = "none" if n == 1 else "fsdp"
    if fw == "litgpt" and n > 1:
        return case(
            "litgpt multi-GPU run: its FSDP strategy's handling of frozen weights is not a plan we express "
            "(per-GPU peak stays near the single-GPU weights while activations are checkpointed)"
        )
    if dataset == "published_1":
        r_ = int(_num(r["lora_r"]) or 8)
        alpha = 2 * r_
        accum = _config_hub_accumulation(r, method, int(mb))
        dropout = 0.05 if fw != "hf" else 0.0
        attention = "sdpa"
    else:
        r_ = int(_num(r["lora_r"]) or 8)
        alpha = int(_num(r["lora_alpha"]) or 2 * r_)
        accum = int(_num(r["grad_accum"]) or 1)
        dm = re.search(r"dropout (\d+(?:\.\d+)?)", notes.lower())
        dropout = float(dm.group(1)) if dm else 0.05
        attention = _attention(r["attention"])
    try:
        plan = TrainingPlan(
            method=method,
            gpu_id=gpu_id,
            dtype="bf16",
            micro_batch=int(mb),
            seq_len=int(seq),
            grad_checkpointing=ckpt,
            optimizer=opt,
            num_gpus=n,
            sharding=sharding,
            attention=attention,
            lora_r=r_,
            lora_alpha=alpha,
            lora_dropout=dropout,
            lora_targets=_targets(r["lora_targets"]) if method != "full" else ("all-linear",),
            master_weights=False,  # every scored stack trains full models in pure bf16 (bf16-true / dtype=bf16)
            double_quant="double" in r["quant"] or "nested" in r["quant"] or fw == "torchtune",
            # TRL's SFTTrainer leaves the unquantised modules in bf16 under QLoRA + bf16: it casts them back after
            # prepare_model_for_kbit_training (peft_module_casting_to_bf16), and skips that preparation for
            # sharded (FSDP) QLoRA (trl/trainer/sft_trainer.py)
            kbit_upcast=not ("trl" in r.get("framework", "").lower() and method == "qlora"),
            grad_accum=accum,
            modules_to_save=modules_to_save,
            framework=fw,
            chunked_loss=fw == "litgpt" or "chunked cross entropy" in lnotes or "bd2a0fc7" in r["source"],
        )
    except AdvisorError as exc:
        return case(f"plan not expressible: {exc}")
    if "lm_head" in plan.lora_targets:
        try:
            resolve_targets(model, plan.lora_targets)
        except AdvisorError:
            # LoRA on the output head is not yet a target the plans accept: scored without it (its adapter is
            # r x (hidden + vocab) parameters; its saved input is already counted as the final norm's output)
            plan = replace(plan, lora_targets=tuple(t for t in plan.lora_targets if t != "lm_head"))
            stack = (*stack, "LoRA on lm_head not counted (target not yet accepted)")
    if plan.seq_len > model.max_position_embeddings:
        return case(f"seq_len {plan.seq_len} beyond the model's context ({model.max_position_embeddings})")
    return case(None, model, plan, mem_skip=mem_skip, t_skip=t_skip)
