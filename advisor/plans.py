"""TrainingPlan (one concrete way to run the fine-tune): its field table, defaults, validation, id, and
the enumeration of candidates.

The dataclass below *is* the plan field table: each field carries its type and default, and in its
``metadata`` its unit, allowed values or bounds, CLI flag, whether the API exposes it, whether the
GPU-independent part of an estimate depends on it (``shape``) and its doc. Everything else derives
from it: validation (``__post_init__``), the estimator cache key (``shape_key``), the CLI flags
(``advisor.cli``), the API's ``PlanIn`` schema (``advisor.api.schemas``) and the plan id. Defaults
that depend on the GPU or the method (dtype, sharding, lora_alpha) are resolved in one place,
``make_plan``. The id encodes the plan itself, so a job can be launched from a ``plan_id`` of
``/v1/recommend`` without searching for it again.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from typing import Any

from advisor.errors import InvalidInputError
from advisor.methods import ALL_LINEAR, DEFAULT_SEARCH, METHOD_NAMES, get_method
from advisor.specs import ROLES, GpuSpec, Linear, ModelSpec
from advisor.units import DTYPES

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit")
ATTENTIONS = ("sdpa", "flash", "eager")
SHARDINGS = ("none", "ddp", "fsdp")
#: The training stack the plan runs in. hf = transformers + peft + bitsandbytes (what our jobs run):
#: fp32 adapters (peft's autocast_adapter_dtype), fp32 non-quantised modules under QLoRA
#: (prepare_model_for_kbit_training). litgpt / torchtune keep adapters and non-quantised modules in the
#: model dtype; litgpt's bitsandbytes layers compute in bnb's default fp32 and (bitsandbytes of 2023)
#: keep each quantised layer's fp32 input for backward.
FRAMEWORKS = ("hf", "litgpt", "torchtune")
#: the modules outside the blocks a plan can adapt (LoRA) or train whole (modules_to_save), by their generic
#: names; each family says what transformers calls them (``Family.head_module`` / ``embedding_module``)
OUTER_MODULES = ("lm_head", "embed_tokens")
#: the LoRA target word for a mixture of experts' fused expert parameters (every sparse layer's gate_up_proj and
#: down_proj): peft reaches them only through ``target_parameters`` (lora.ParamWrapper), and its all-linear leaves
#: them out, so they are asked for explicitly (advisor/estimators/moe.py counts what they cost)
EXPERTS = "experts"


def _f(
    default: Any,
    doc: str,
    *,
    unit: str = "",
    choices: tuple = (),
    bounds: tuple | None = None,
    items: tuple = (),
    cli: bool = True,
    api: bool = True,
    shape: bool = True,
    resolved: str = "",
    **kw: Any,
) -> Any:
    """A plan field with its table entry. default MISSING = required; bounds = (low, high, high_inclusive);
    items = the values each element of a tuple field may take; resolved = how make_plan fills it when left
    out (the dataclass default is then only what a bare TrainingPlan(...) gets)."""
    meta = {
        "doc": doc,
        "unit": unit,
        "choices": choices,
        "bounds": bounds,
        "items": items,
        "cli": cli,
        "api": api,
        "shape": shape,
        "resolved": resolved,
    }
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class TrainingPlan:
    method: str = _f(MISSING, "training method (advisor.methods)", choices=METHOD_NAMES)
    gpu_id: str = _f(MISSING, "catalog GPU the plan runs on", cli=False, shape=False, resolved="the request's gpu")
    dtype: str = _f(
        "bf16",
        "compute dtype (and storage dtype of unquantised base weights)",
        choices=DTYPES,
        resolved="bf16 where the GPU has it, else fp16 (fp32 on a CPU)",
    )
    micro_batch: int = _f(1, "sequences per GPU per forward/backward", unit="sequences", bounds=(1, 4096, True))
    seq_len: int = _f(2048, "tokens per sequence", unit="tokens", bounds=(1, 1_048_576, True))
    grad_checkpointing: bool = _f(True, "recompute each block in backward instead of keeping its activations")
    optimizer: str = _f("adamw", "optimiser (8-bit and paged ones are bitsandbytes')", choices=OPTIMIZERS)
    num_gpus: int = _f(1, "GPUs training together", unit="GPUs", bounds=(1, 1024, True))
    sharding: str = _f(
        "none",
        "how several GPUs share the model",
        choices=SHARDINGS,
        resolved="none on 1 GPU; else the method's default (fsdp for full, ddp for adapters)",
    )
    attention: str = _f("sdpa", "attention kernel", choices=ATTENTIONS)
    lora_r: int = _f(16, "adapter rank", bounds=(1, 4096, True))
    lora_alpha: int = _f(
        32, "adapter scaling numerator (scale = alpha / r)", bounds=(1, 65536, True), resolved="2 x lora_r"
    )
    lora_dropout: float = _f(0.05, "dropout on the adapter input", bounds=(0.0, 1.0, False))
    lora_targets: tuple[str, ...] = _f(
        (ALL_LINEAR,),
        "adapted modules: all-linear (the blocks' linears, as peft's), roles (q,k,v,o,gate,up,down), the output "
        "head lm_head, the token embedding embed_tokens, experts (a mixture of experts' fused expert parameters, "
        "peft target_parameters; needs lora_dropout 0), or module names",
    )
    #: full fine-tuning under mixed precision keeps fp32 master weights (AMP, the HF Trainer default);
    #: False = "pure" half-precision training (params, grads and AdamW states in the half dtype).
    master_weights: bool = _f(True, "full: fp32 master weights under mixed precision (False: pure half precision)")
    #: QLoRA: bitsandbytes NF4 with double quantisation (quantised absmax); the unquantised modules
    #: (embeddings, lm_head, norms) are cast to fp32 by peft's prepare_model_for_kbit_training.
    double_quant: bool = _f(True, "qlora: quantise the NF4 absmax constants again")
    kbit_upcast: bool = _f(True, "qlora: prepare_model_for_kbit_training casts the unquantised modules to fp32")
    grad_accum: int = _f(1, "micro-steps per optimiser step", unit="micro-steps", bounds=(1, 65536, True))
    framework: str = _f("hf", "training stack whose memory behaviour is modelled", choices=FRAMEWORKS)
    #: loss over vocabulary chunks (litgpt, torchtune CEWithChunkedOutputLoss): no full fp32 logits copy
    chunked_loss: bool = _f(False, "loss over vocabulary chunks (no full fp32 logits copy)")
    notes: tuple[str, ...] = _f((), "free-text notes carried with the plan", cli=False, shape=False, compare=False)
    #: peft's modules_to_save: a ModulesToSaveWrapper keeps the original module frozen and trains a full copy
    #: of it (the copy in the module's dtype: peft upcasts only adapter weights), with its gradient and
    #: optimiser states. Appended after notes: plan ids index fields by position.
    modules_to_save: tuple[str, ...] = _f(
        (),
        "adapter methods: modules trained whole next to the adapters (peft modules_to_save): lm_head, embed_tokens",
        items=OUTER_MODULES,
    )
    #: GPUs per node: a plan with more GPUs spans ceil(num_gpus / gpus_per_node) nodes, and its collectives cross
    #: the network between nodes (hierarchically: inside a node over NVLink / PCIe, between nodes over the
    #: network). Appended after modules_to_save: plan ids index fields by position.
    gpus_per_node: int = _f(
        8, "GPUs per node (more GPUs than this: several nodes)", unit="GPUs", bounds=(1, 1024, True)
    )

    @property
    def nodes(self) -> int:
        """Nodes the plan's GPUs span."""
        return -(-self.num_gpus // self.gpus_per_node)

    def __post_init__(self) -> None:
        errs = validation_errors(self)
        if errs:
            field_, _msg = errs[0]
            raise InvalidInputError("; ".join(f"{f}: {m}" for f, m in errs), field=field_)

    @property
    def shape_key(self) -> tuple:
        """Every field the GPU-independent part of an estimate depends on (all but gpu_id and notes)."""
        return tuple(getattr(self, name) for name in SHAPE_FIELDS)

    @property
    def id(self) -> str:
        """The plan itself, encoded: the same plan always gets the same id, and decode_plan_id(id) == plan."""
        return encode_plan_id(self)

    @property
    def tokens_per_micro_step(self) -> int:
        return self.micro_batch * self.seq_len

    def to_dict(self) -> dict:
        """Every field (tuples as lists) and the id: what jobs and trials store and the API sends."""
        d: dict[str, Any] = {}
        for name in _FIELD_NAMES:
            v = getattr(self, name)
            d[name] = list(v) if isinstance(v, tuple) else v
        d["id"] = self.id
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainingPlan:
        d = {k: v for k, v in d.items() if k != "id"}
        for name in _TUPLE_FIELDS:
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        return cls(**d)


#: the plan field table, in declaration order
PLAN_FIELDS = fields(TrainingPlan)
_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in PLAN_FIELDS)
_TUPLE_FIELDS: tuple[str, ...] = tuple(f.name for f in PLAN_FIELDS if isinstance(f.default, tuple))
SHAPE_FIELDS: tuple[str, ...] = tuple(f.name for f in PLAN_FIELDS if f.metadata["shape"])
#: (name, allowed values, bounds) of every field the table constrains: what validation_errors checks
_CHECKS = tuple(
    (f.name, f.metadata["choices"], f.metadata["bounds"])
    for f in PLAN_FIELDS
    if f.metadata["choices"] or f.metadata["bounds"] is not None
)
#: (name, allowed elements) of every tuple field whose elements the table constrains
_ITEM_CHECKS = tuple((f.name, f.metadata["items"]) for f in PLAN_FIELDS if f.metadata["items"])


def field_default(name: str) -> Any:
    f = TrainingPlan.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else MISSING


def validation_errors(plan: TrainingPlan) -> list[tuple[str, str]]:
    """(field, message) for every value out of the table's choices/bounds, then the cross-field rules."""
    errs: list[tuple[str, str]] = []
    for name, choices, bounds in _CHECKS:
        v = getattr(plan, name)
        if choices:
            if v not in choices:
                errs.append((name, f"must be one of {', '.join(choices)}"))
        else:
            lo, hi, incl = bounds
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi if incl else lo <= v < hi):
                errs.append((name, f"must be between {lo} and {hi}" if incl else f"must be in [{lo}, {hi})"))
    for name, items in _ITEM_CHECKS:
        v = getattr(plan, name)
        if not isinstance(v, tuple) or any(x not in items for x in v) or len(set(v)) != len(v):
            errs.append((name, f"must be a list of distinct values among {', '.join(items)}"))
    if errs:
        return errs
    if plan.num_gpus == 1 and plan.sharding != "none":
        errs.append(("sharding", "needs num_gpus > 1"))
    if plan.num_gpus > 1 and plan.sharding == "none":
        errs.append(("sharding", "num_gpus > 1 needs ddp or fsdp"))
    both = set(plan.modules_to_save) & {t.strip() for t in plan.lora_targets}
    if both:
        errs.append(("modules_to_save", f"{', '.join(sorted(both))}: either a LoRA target or trained whole, not both"))
    errs.extend(get_method(plan.method).validate(plan))
    errs.extend(_expert_target_errors(plan))
    return errs


def targets_experts(targets: Iterable[str]) -> bool:
    """Whether LoRA targets name a mixture of experts' fused expert parameters (the word or a parameter name)."""
    return any(t.strip() == EXPERTS or t.strip().startswith(EXPERTS + ".") for t in targets)


def _expert_target_errors(plan: TrainingPlan) -> list[tuple[str, str]]:
    """peft's lora.ParamWrapper (LoRA on a bare parameter) refuses dropout (x cannot be factored out of a weight
    update) and DoRA; one LoraConfig serves every target, so the whole plan needs them off."""
    m = get_method(plan.method)
    if not m.adapter or not targets_experts(plan.lora_targets):
        return []
    errs = []
    if plan.lora_dropout != 0:
        errs.append(
            (
                "lora_dropout",
                f"LoRA on the experts (peft target_parameters) cannot use dropout, got {plan.lora_dropout}. "
                "To fix: set lora_dropout to 0, or drop experts from lora_targets",
            )
        )
    if m.dora:
        errs.append(
            (
                "method",
                "DoRA cannot adapt the experts (peft's ParamWrapper refuses use_dora). To fix: use lora or qlora, "
                "or drop experts from lora_targets",
            )
        )
    return errs


def make_plan(method: str, gpu: GpuSpec | str, **given: Any) -> TrainingPlan:
    """A plan from the fields a user gave (None = not given); the one home of the resolved defaults:
    dtype from the GPU, sharding from the method and the GPU count, lora_alpha = 2 x lora_r. `gpu_id`
    among the fields names another GPU than the one whose default dtype is taken."""
    m = get_method(method)
    kw = {k: v for k, v in given.items() if v is not None}
    gpu_id = kw.pop("gpu_id", None) or (gpu if isinstance(gpu, str) else gpu.id)
    unknown = set(kw) - {f.name for f in PLAN_FIELDS}
    if unknown:
        raise InvalidInputError(f"unknown plan field(s): {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    if "dtype" not in kw and not isinstance(gpu, str):
        kw["dtype"] = gpu.default_dtype()
    n = kw.get("num_gpus", 1)
    if "sharding" not in kw:
        kw["sharding"] = "none" if n == 1 else m.default_sharding
    if "lora_alpha" not in kw:
        kw["lora_alpha"] = 2 * kw.get("lora_r", field_default("lora_r"))
    for name in _TUPLE_FIELDS:
        if name in kw:
            kw[name] = (kw[name],) if isinstance(kw[name], str) else tuple(kw[name])
    return TrainingPlan(method=method, gpu_id=gpu_id, **kw)


# ---- plan ids that decode ------------------------------------------------------------------------
#: bump when a field's meaning changes: ids of another version are refused with a clear error
PLAN_ID_VERSION = 2
_ID_RE = re.compile(r"^plan_v(\d+)\.([A-Za-z0-9_-]+)$")
_OLD_ID_RE = re.compile(r"^plan_[0-9a-f]{16}$")


class PlanIdError(InvalidInputError):
    """A plan id that does not decode to a plan of this version (``stale`` for ids of older versions)."""

    def __init__(self, message: str, *, field: str = "plan_id", stale: bool = False):
        super().__init__(message, field=field)
        self.stale = stale


@lru_cache(maxsize=1 << 16)
def encode_plan_id(plan: TrainingPlan) -> str:
    """``plan_v<version>.<base64url(JSON list of [field index, value])>`` for the method, the GPU and every
    field that differs from its default (cached: plans are frozen, and ranked plans are shown again and again). Field indexes are the table's order: a new field is appended;
    reordering fields or changing a field's meaning bumps PLAN_ID_VERSION (a test pins a known id)."""
    pairs: list[list[Any]] = []
    for i, f in enumerate(PLAN_FIELDS):
        v = getattr(plan, f.name)
        if f.name in ("method", "gpu_id") or (f.name != "notes" and v != f.default):
            pairs.append([i, list(v) if isinstance(v, tuple) else v])
    blob = json.dumps(pairs, separators=(",", ":")).encode()
    return f"plan_v{PLAN_ID_VERSION}." + base64.urlsafe_b64encode(blob).decode().rstrip("=")


def decode_plan_id(plan_id: str, field_name: str = "plan_id") -> TrainingPlan:
    """The plan an id was made from. Ids of other versions and malformed ids raise PlanIdError."""
    text = plan_id.strip() if isinstance(plan_id, str) else ""
    if _OLD_ID_RE.match(text):
        raise PlanIdError(
            f"plan id {text!r} comes from an older version of the advisor (a hash, not the plan): ask "
            "/v1/recommend again for a current id, or post the plan object itself",
            field=field_name,
            stale=True,
        )
    m = _ID_RE.match(text)
    if not m:
        raise PlanIdError(f"{text!r} is not a plan id (plan_v{PLAN_ID_VERSION}.…)", field=field_name)
    if int(m.group(1)) != PLAN_ID_VERSION:
        raise PlanIdError(
            f"plan id of version {m.group(1)}; this advisor reads version {PLAN_ID_VERSION}: ask /v1/recommend "
            "again for a current id",
            field=field_name,
            stale=True,
        )
    try:
        payload = m.group(2)
        pairs = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if not all(type(i) is int and 0 <= i < len(PLAN_FIELDS) for i, _ in pairs):
            raise ValueError("field index out of range")
        d = {PLAN_FIELDS[i].name: v for i, v in pairs}
    except (ValueError, TypeError, IndexError) as exc:
        raise PlanIdError(f"plan id {text[:40]!r}… does not decode ({exc})", field=field_name) from None
    try:
        return TrainingPlan.from_dict(d)
    except (InvalidInputError, TypeError) as exc:
        raise PlanIdError(f"plan id decodes to an invalid plan: {exc}", field=field_name) from None


def outer_module_names(model: ModelSpec) -> dict[str, str]:
    """Generic name (lm_head, embed_tokens) -> the module's name in transformers' model of this family."""
    fam = model.family_spec
    return {"lm_head": fam.head_module, "embed_tokens": fam.embedding_module}


def outer_linears(model: ModelSpec) -> dict[str, Linear]:
    """The output head and the token embedding as the matrices peft adapts: the head maps hidden -> vocab; the
    embedding, adapted, is a lookup into an r x vocab matrix then an r -> hidden map, so its adapter has the
    shape of a vocab -> hidden linear (r x (vocab + hidden) parameters either way). Tied or not, each is one
    vocab x hidden matrix (+ the head's bias)."""
    names = outer_module_names(model)
    h, v = model.hidden_size, model.vocab_size
    return {
        "lm_head": Linear(names["lm_head"], ("lm_head",), h, v, model.lm_head_bias),
        "embed_tokens": Linear(names["embed_tokens"], ("embed_tokens",), v, h, False),
    }


def _outer_module(model: ModelSpec, generic: str, field: str) -> str:
    """The real module name of lm_head / embed_tokens, or a clear error where peft cannot train it."""
    if generic == "embed_tokens" and model.is_encoder_decoder:
        # T5's encoder and decoder hold their own references to the shared embedding: peft replaces the
        # module at one name (``shared``) and the stacks keep reading the original, so nothing would train
        raise InvalidInputError(
            f"{model.name}: the shared embedding of an encoder-decoder model cannot be adapted or trained through "
            "peft (the encoder and decoder keep their own reference to the original module)",
            field=field,
        )
    return outer_module_names(model)[generic]


def resolve_targets(model: ModelSpec, targets: Iterable[str]) -> frozenset[str]:
    """LoRA targets as the model's real module names.

    Accepts ``all-linear`` (the blocks' linears: peft's all-linear leaves the output head out), generic
    roles (q, k, v, o, gate, up, down), ``lm_head`` and ``embed_tokens`` (the output head and the token
    embedding, whatever the family calls them) and the model's own peft module names (q_proj, c_attn,
    wi_0, embed_out, wte, ...). A fused module (c_attn, qkv_proj) is targeted when any role it serves is
    asked for, as peft can only wrap the whole module. ``experts`` (or one of the layout's expert parameter names,
    ``experts.gate_up_proj`` / ``experts.down_proj``) adds a mixture of experts' fused expert parameters, which the
    builder hands to peft as ``target_parameters`` (``advisor.stack.targets.lora_target_parameters``).
    """
    names: set[str] = set()
    module_roles: dict[str, set[str]] = {}
    expert_params: set[str] = set()
    for b in model.blocks:
        for lin in b.linears:
            if lin.lora_target:  # MoE experts / routers are bare parameters: peft's target_modules cannot wrap them
                module_roles.setdefault(lin.name, set()).update(lin.roles)
            elif lin.kind == "experts":  # reached through peft's target_parameters instead (the `experts` word)
                expert_params.add(lin.name)
    bare = {n.split(".")[-1] for n in module_roles}
    outer = outer_module_names(model)
    for t in targets:
        t = t.strip()
        if not t:
            continue
        if t == ALL_LINEAR:
            names.update(module_roles)
        elif t in ROLES:
            names.update(n for n, roles in module_roles.items() if t in roles)
        elif t in outer:
            names.add(_outer_module(model, t, "lora_targets"))
        elif t in outer.values():
            names.add(_outer_module(model, next(g for g, n in outer.items() if n == t), "lora_targets"))
        elif t in bare:
            names.update(n for n in module_roles if n.split(".")[-1] == t)
        elif t == EXPERTS or t in expert_params:
            if not expert_params:
                raise InvalidInputError(
                    f"lora_targets: {model.name} has no experts (not a mixture of experts). To fix: drop {t!r} from "
                    "lora_targets (all-linear adapts every linear of its MLP)",
                    field="lora_targets",
                )
            names.update(expert_params if t == EXPERTS else {t})
        else:
            words = f"{', '.join(OUTER_MODULES)}{', ' + EXPERTS if expert_params else ''}"
            raise InvalidInputError(
                f"unknown LoRA target {t!r} for {model.name}: use all-linear, roles "
                f"({', '.join(ROLES)}), {words} or module names ({', '.join(sorted(bare | expert_params))})",
                field="lora_targets",
            )
    if not names and model.is_moe:
        raise InvalidInputError(
            f"lora_targets {', '.join(targets)} reach no module of {model.name}: a mixture of experts' MLP is fused "
            "expert parameters, which peft's target_modules cannot wrap. To fix: target the attention (q, k, v, o), "
            f"all-linear, or the experts themselves with {EXPERTS!r} (peft target_parameters, lora_dropout 0)",
            field="lora_targets",
        )
    if not names:
        raise InvalidInputError("lora_targets is empty", field="lora_targets")
    return frozenset(names)


def resolve_modules_to_save(model: ModelSpec, plan: TrainingPlan) -> tuple[str, ...]:
    """The plan's modules_to_save as the model's real module names (sorted), checked against its targets."""
    saved = tuple(sorted(_outer_module(model, g, "modules_to_save") for g in plan.modules_to_save))
    if saved and get_method(plan.method).adapter:
        both = set(saved) & resolve_targets(model, plan.lora_targets)
        if both:
            raise InvalidInputError(
                f"{', '.join(sorted(both))}: either a LoRA target or in modules_to_save, not both",
                field="modules_to_save",
            )
    return saved


# ---- enumeration -----------------------------------------------------------------------------------
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GPU_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class SearchSpace:
    methods: tuple[str, ...] = DEFAULT_SEARCH
    micro_batches: tuple[int, ...] = MICRO_BATCHES
    gpu_counts: tuple[int, ...] = GPU_COUNTS
    checkpointing: tuple[bool, ...] = (True, False)
    gpus_per_node: int = 8  # more GPUs than this: the plan spans nodes (TrainingPlan.gpus_per_node)


def enumerate_plans(
    gpus: Iterable[GpuSpec], seq_len: int, space: SearchSpace = SearchSpace(), dtype: str | None = None
) -> Iterator[TrainingPlan]:
    """Every candidate plan on each GPU (in the GPU's default dtype unless one is given)."""
    for gpu in gpus:
        yield from enumerate_shapes(seq_len, space, dtype or gpu.default_dtype(), gpu.id)


def enumerate_shapes(seq_len: int, space: SearchSpace, dtype: str, gpu_id: str = "") -> Iterator[TrainingPlan]:
    """Every candidate: method x adapter shape x micro-batch x checkpointing x optimiser x GPU count (each
    method brings its own adapter shapes and optimisers). Without a GPU id: the GPU-independent shapes."""
    for n in space.gpu_counts:
        shardings = ("none",) if n == 1 else ("ddp", "fsdp")
        for method in space.methods:
            m = get_method(method)
            for sharding in shardings:
                for r, targets in m.search_shapes:
                    for opt in m.search_optimizers:
                        if sharding == "fsdp" and opt.startswith("paged"):
                            continue
                        for ckpt in space.checkpointing:
                            for mb in space.micro_batches:
                                yield TrainingPlan(
                                    method=method,
                                    gpu_id=gpu_id,
                                    dtype=dtype,
                                    micro_batch=mb,
                                    seq_len=seq_len,
                                    grad_checkpointing=ckpt,
                                    optimizer=opt,
                                    num_gpus=n,
                                    sharding=sharding,
                                    lora_r=r or 16,
                                    lora_alpha=2 * (r or 16),
                                    lora_targets=targets or (ALL_LINEAR,),
                                    gpus_per_node=space.gpus_per_node,
                                )
