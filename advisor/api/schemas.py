"""The HTTP boundary: the only pydantic models of the service (request bodies and responses).

Requests are validated here completely (types, ranges, enums, lengths) so that every bad field is
named at once in one 422; the core then only sees well-typed values. Bounds are chosen so that no
accepted input can push the arithmetic to inf/NaN. Responses mirror the core's ``to_dict()``
output field for field; a test keeps them in step.

This module imports pydantic only, so ``advisor.client`` can reuse it without FastAPI.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, create_model, model_validator

from advisor.estimators.uncertainty import VERDICTS
from advisor.methods import DEFAULT_SEARCH, METHOD_NAMES
from advisor.plans import ATTENTIONS, FRAMEWORKS, OPTIMIZERS, PLAN_FIELDS, SHARDINGS
from advisor.units import DTYPES

Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]  # the method registry's names
Dtype = Literal[DTYPES]  # type: ignore[valid-type]
Optimizer = Literal[OPTIMIZERS]  # type: ignore[valid-type]
Attention = Literal[ATTENTIONS]  # type: ignore[valid-type]
Sharding = Literal[SHARDINGS]  # type: ignore[valid-type]
Framework = Literal[FRAMEWORKS]  # type: ignore[valid-type]
Objective = Literal["cost", "time", "fit"]
Verdict = Literal[VERDICTS]  # type: ignore[valid-type]
EstimateSource = Literal["auto", "analytical", "simulated"]

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9 ()+,._:@-]*"
#: A catalog name, alias, Hugging Face id (optionally as a huggingface.co URL) or a size like "13B".
#: Every path segment starts with a letter or digit: no absolute paths, no "~", no "..": the HTTP
#: service never reads files named by a client (post a config.json inline instead).
ModelName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=rf"^(https?://)?{_SEGMENT}(/{_SEGMENT})*$"),
]
#: A Hugging Face revision: a branch, tag or commit sha.
Revision = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
GpuName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ()+,._/:-]*$")
]
ProviderName = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
LoraTarget = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class _Strict(BaseModel):
    """Unknown fields are an error (a typo, "gpus" for "gpu", must not be silently ignored), and types
    are strict: `0` is not a boolean and `"8"` is not an integer, exactly as the OpenAPI schema says."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---- errors ----------------------------------------------------------------------------------------
class FieldError(BaseModel):
    field: str = Field(description="dotted JSON path of the bad input, e.g. `workload.seq_len`")
    message: str
    type: str = Field(description="machine-readable error type")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body. `field` names the input at fault; `errors` lists every bad field at once."""

    code: str = Field(examples=["unknown_model"])
    detail: str = Field(examples=["unknown model 'lama-2-7b': not in the catalog ..."])
    field: str | None = Field(None, examples=["model"])
    suggestions: list[str] = Field(default_factory=list, examples=[["llama-2-7b"]])
    errors: list[FieldError] = Field(default_factory=list)
    request_id: str | None = Field(None, description="also in the X-Request-ID response header")


class OpenAIError(BaseModel):
    """OpenAI's error object (`message`, `type`, `param`, `code`), plus our ErrorResponse's lists."""

    message: str = Field(examples=["no fine-tuning job 'ftjob-abc'"])
    type: str = Field(
        examples=["invalid_request_error"], description="invalid_request_error, authentication_error, ..."
    )
    param: str | None = Field(None, examples=["fine_tuning_job_id"], description="the input at fault")
    code: str | None = Field(None, examples=["not_found"])
    errors: list[FieldError] = Field(default_factory=list, description="every bad field at once")
    suggestions: list[str] = Field(default_factory=list)
    request_id: str | None = Field(None, description="also in the X-Request-ID response header")


class OpenAIErrorResponse(BaseModel):
    """Every 4xx/5xx body on OpenAI's routes (/v1/fine_tuning, /v1/files, /v1/models)."""

    error: OpenAIError


# ---- requests --------------------------------------------------------------------------------------
_INT32 = 2**31 - 1


class InlineModelConfig(BaseModel):
    """A Hugging Face ``config.json`` posted inline. Other keys of a real config are accepted and ignored.

    Either naming scheme works (Llama ``hidden_size``/``num_hidden_layers``, GPT-2 ``n_embd``/``n_layer``,
    T5 ``d_model``/``num_layers``); ``model_type`` picks the architecture family (default llama).
    """

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {
                    "model_type": "llama",
                    "hidden_size": 2048,
                    "intermediate_size": 5632,
                    "num_hidden_layers": 22,
                    "num_attention_heads": 32,
                    "num_key_value_heads": 4,
                    "vocab_size": 32000,
                }
            ]
        },
    )

    model_type: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    name: Annotated[str, StringConstraints(max_length=200)] | None = None
    name_or_path: Annotated[str, StringConstraints(max_length=200)] | None = Field(None, alias="_name_or_path")
    hidden_size: int | None = Field(None, ge=1, le=131_072)
    n_embd: int | None = Field(None, ge=1, le=131_072)
    d_model: int | None = Field(None, ge=1, le=131_072)
    num_hidden_layers: int | None = Field(None, ge=1, le=1024)
    n_layer: int | None = Field(None, ge=1, le=1024)
    num_layers: int | None = Field(None, ge=1, le=1024)
    num_decoder_layers: int | None = Field(None, ge=1, le=1024)
    num_attention_heads: int | None = Field(None, ge=1, le=4096)
    n_head: int | None = Field(None, ge=1, le=4096)
    num_heads: int | None = Field(None, ge=1, le=4096)
    num_key_value_heads: int | None = Field(None, ge=1, le=4096)
    head_dim: int | None = Field(None, ge=1, le=4096)
    d_kv: int | None = Field(None, ge=1, le=4096)
    intermediate_size: int | None = Field(None, ge=1, le=1_048_576)
    n_inner: int | None = Field(None, ge=1, le=1_048_576)
    d_ff: int | None = Field(None, ge=1, le=1_048_576)
    vocab_size: int | None = Field(None, ge=1, le=4_194_304)
    max_position_embeddings: int | None = Field(None, ge=1, le=16_777_216)
    n_positions: int | None = Field(None, ge=1, le=16_777_216)
    n_ctx: int | None = Field(None, ge=1, le=16_777_216)
    relative_attention_num_buckets: int | None = Field(None, ge=1, le=4096)
    tie_word_embeddings: bool | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    feed_forward_proj: Annotated[str, StringConstraints(max_length=64)] | None = None

    def config_dict(self) -> dict[str, Any]:
        """The config as the core reads it: declared keys only (extras are not the core's business)."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude=set(self.model_extra or ()))


def _model_kind(value: Any) -> str:
    return "inline-config" if isinstance(value, (dict, InlineModelConfig)) else "model-name"


def _gpu_kind(value: Any) -> str:
    return "gpu-list" if isinstance(value, (list, tuple)) else "gpu-name"


#: `model`: a name (string) or an inline config (object); the JSON type decides which branch
#: validates, so errors name only the fields of the branch the client meant.
ModelRef = Annotated[
    Annotated[ModelName, Tag("model-name")] | Annotated[InlineModelConfig, Tag("inline-config")],
    Discriminator(_model_kind),
]
GpuRef = Annotated[
    Annotated[GpuName, Tag("gpu-name")] | Annotated[list[GpuName], Field(min_length=1, max_length=64), Tag("gpu-list")],
    Discriminator(_gpu_kind),
]


class WorkloadIn(_Strict):
    """The data to train on: `dataset_tokens`, or `examples` x `avg_example_tokens`. Omitted values are
    assumed (10M tokens, seq_len 2048, 1 epoch) and listed in the response's `assumptions`."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"examples": 50_000, "avg_example_tokens": 600, "epochs": 3}]},
    )

    dataset_tokens: int | None = Field(None, ge=1, le=10**15, description="tokens in the dataset (one epoch)")
    examples: int | None = Field(None, ge=1, le=10**12, description="number of training examples")
    avg_example_tokens: int | None = Field(None, ge=1, le=1_048_576, description="average tokens per example")
    epochs: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)
    seq_len: int | None = Field(None, ge=1, le=1_048_576, description="training sequence length (packed)")

    @model_validator(mode="after")
    def _one_size(self) -> WorkloadIn:
        if self.dataset_tokens is not None and (self.examples is not None or self.avg_example_tokens is not None):
            raise ValueError("give dataset_tokens, or examples and avg_example_tokens, not both")
        if (self.examples is None) != (self.avg_example_tokens is None):
            raise ValueError("examples and avg_example_tokens go together: give both")
        return self


class ConstraintsIn(_Strict):
    max_budget_usd: float | None = Field(None, gt=0, le=1e9, allow_inf_nan=False)
    deadline_hours: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    max_gpus: int = Field(8, ge=1, le=1024, description="GPUs per plan at most (searched: 1, 2, 4, 8, 16, 32)")
    gpus_per_node: int = Field(
        8, ge=1, le=1024, description="GPUs per node: plans with more span nodes (collectives over the network)"
    )
    methods: list[Method] = Field(
        default_factory=lambda: list(DEFAULT_SEARCH),
        min_length=1,
        max_length=len(METHOD_NAMES),
        description=f"methods to search (default: {', '.join(DEFAULT_SEARCH)}; also: "
        + ", ".join(m for m in METHOD_NAMES if m not in DEFAULT_SEARCH)
        + ")",
    )


class RecommendRequest(_Strict):
    """What to fine-tune, on what, with which data, optimising what."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"model": "meta-llama/Llama-2-7b-hf", "gpu": "rtx-4090"},
                {
                    "model": "llama-2-13b",
                    "gpu": ["a100-80gb", "l40s"],
                    "workload": {"dataset_tokens": 50_000_000, "epochs": 2, "seq_len": 4096},
                    "objective": "time",
                    "constraints": {"max_budget_usd": 200, "max_gpus": 4, "methods": ["lora", "qlora"]},
                },
            ]
        },
    )

    model: ModelRef = Field(
        description="catalog name, Hugging Face id, size like `13B`, or an inline config.json object"
    )
    gpu: GpuRef | None = Field(None, description="GPU id or alias, a list of them, or omitted for every catalog GPU")
    workload: WorkloadIn = Field(default_factory=WorkloadIn)
    objective: Objective = Field("cost", description="cost: cheapest; time: fastest; fit: fewest of your GPUs")
    constraints: ConstraintsIn = Field(default_factory=ConstraintsIn)
    dtype: Dtype | None = Field(None, description="default: bf16 where the GPU has it, else fp16")
    convergence: dict[Method, Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]] | None = Field(
        None, description="optimiser steps relative to full fine-tuning, per method (default qlora 1.25)"
    )
    limit: int = Field(10, ge=1, le=100, description="ranked plans to return at most")
    simulate_top: int = Field(
        0,
        ge=0,
        le=20,
        description="trace this many of the top plans under FakeTensorMode (train extra; off by default)",
    )
    simulate_budget_s: float = Field(
        120.0, gt=0, le=3600, allow_inf_nan=False, description="wall-clock budget for all traces together"
    )
    model_revision: Revision | None = Field(
        None,
        description="branch, tag or commit sha of a Hugging Face `model` id (also `org/name@revision`); default main",
    )
    providers: list[ProviderName] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="price GPUs at these providers only (aws, gcp, lambda, runpod, vast, ...); omitted: the cheapest "
        "listed provider per GPU. Searching every GPU, only those the providers price are searched",
    )
    price_basis: Literal["on-demand", "spot"] = Field("on-demand", description="which published price to use")


class SimulationOut(BaseModel):
    rank: int
    plan_id: str
    analytical_peak_memory_gib: float
    peak_memory_gib: float | None = None
    allocated_peak_gib: float | None = None
    fits: bool | None = None
    peak_phase: str | None = None
    phases_gib: dict[str, float] | None = None
    skipped: str | None = Field(None, description="why this plan was not traced (budget spent, unsupported plan)")
    model_config = {"extra": "allow"}


def _plan_field(f: Any, for_input: bool) -> tuple[Any, Any]:
    """(annotation, FieldInfo) of one plan field, from the plan field table (advisor.plans)."""
    meta = f.metadata
    doc = meta["doc"] + (f" ({meta['unit']})" if meta["unit"] else "")
    resolved = for_input and bool(meta["resolved"])
    if resolved:
        doc += f"; default: {meta['resolved']}"
    if f.name == "gpu_id":
        ann: Any = GpuName if for_input else str
    elif meta["choices"]:
        ann = Literal[meta["choices"]]  # type: ignore[valid-type]
    elif f.name == "notes":
        ann = list[Annotated[str, StringConstraints(max_length=1000)]] if for_input else list[str]
    elif isinstance(f.default, tuple):  # lora_targets, modules_to_save: a JSON list (of its items, when given)
        item: Any = Literal[meta["items"]] if meta.get("items") else LoraTarget  # type: ignore[valid-type]
        ann = list[item] if for_input else list[str]
    else:
        ann = type(f.default)
    if not for_input:
        return ann, Field(description=doc)
    kw: dict[str, Any] = {"description": doc}
    if meta["bounds"] is not None:
        lo, hi, incl = meta["bounds"]
        kw.update(ge=lo, le=hi) if incl else kw.update(ge=lo, lt=hi)
        if isinstance(f.default, float):
            kw["allow_inf_nan"] = False
    if f.name == "notes":
        kw.update(default_factory=list, max_length=32)
    elif isinstance(f.default, tuple):
        kw.update(default_factory=lambda: list(f.default), min_length=1 if f.default else 0, max_length=64)
    elif resolved:
        return ann | None, Field(None, **kw)
    elif f.name == "method":
        return ann, Field(**kw)
    else:
        kw["default"] = f.default
    return ann, Field(**kw)


#: One concrete plan. A plan from a /v1/recommend response can be posted back as is. Built from the plan
#: field table, so a new plan field reaches the API (and its OpenAPI schema) without editing this module.
PlanIn = create_model(
    "PlanIn",
    __base__=_Strict,
    __doc__="One concrete plan. A plan from a /v1/recommend response can be posted back as is.",
    id=(
        Annotated[str, StringConstraints(max_length=512)] | None,
        Field(None, description="ignored on input except as a check: must match the other fields when given"),
    ),
    **{f.name: _plan_field(f, True) for f in PLAN_FIELDS},
)
PlanIn.model_config["json_schema_extra"] = {
    "examples": [{"method": "qlora", "micro_batch": 4, "seq_len": 2048, "lora_r": 16}]
}
PlanIn.model_rebuild(force=True)


class EstimateRequest(_Strict):
    """One fully specified plan -> its memory breakdown, speed, hours and cost."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"model": "llama-2-7b", "gpu": "rtx-4090", "plan": {"method": "qlora", "micro_batch": 2}},
            ]
        },
    )

    model: ModelRef = Field(
        description="catalog name, Hugging Face id, size like `13B`, or an inline config.json object"
    )
    gpu: GpuName | None = Field(None, description="default: plan.gpu_id")
    plan: PlanIn
    workload: WorkloadIn = Field(default_factory=WorkloadIn, description="for hours and cost")
    convergence: dict[Method, Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]] | None = None
    claimed_memory_gib: float | None = Field(
        None, gt=0, le=1e6, allow_inf_nan=False, description="a published peak-memory claim to check"
    )
    source: EstimateSource = Field(
        "auto",
        description="auto: calibrated where a profile matches, else analytical; simulated: one training step "
        "traced under FakeTensorMode (needs the train extra on the server; seconds to a minute, cached)",
    )
    model_revision: Revision | None = Field(
        None,
        description="branch, tag or commit sha of a Hugging Face `model` id (also `org/name@revision`); default main",
    )


# ---- responses -------------------------------------------------------------------------------------
PlanOut = create_model(
    "PlanOut",
    id=(
        str,
        Field(
            description="the plan itself, encoded: decodes back to these fields (post it as plan_id to launch a job)",
            examples=["plan_v2.W1swLCJsb3JhIl0sWzEsInJ0eC00MDkwIl0sWzMsNF0sWzEzLFsicSIsInYiXV1d"],
        ),
    ),
    **{f.name: _plan_field(f, False) for f in PLAN_FIELDS},
)


class TimeSplit(BaseModel):
    compute: float
    memory_bound: float
    communication: float


class PrequantizedOut(BaseModel):
    """A checkpoint published already quantised (config.json quantization_config), as advisor.prequant reads it."""

    method: str = Field(description="quant_method: gptq | awq | fp8 | bitsandbytes | fbgemm_fp8 | compressed-tensors")
    bits: int = Field(description="bits per stored weight")
    group_size: int | None = Field(description="weights per scale along the inputs (null: per row or per block)")
    storage_bytes: int = Field(description="every tensor of the checkpoint, bytes as stored")
    storage_gib: float
    quantized_bytes: int = Field(description="of which the quantised linears' packed weights, scales and zeros")
    quantized_params: int = Field(description="weights those tensors encode (the architecture's count, unpacked)")
    source: str = Field(description="checkpoint: the safetensors metadata; config: bits and group size applied")
    basis: str = Field(description="where the stored bytes come from, in words")
    float_dtype: str = Field(description="stored dtype of the unquantised tensors (embeddings, norms, head)")
    quant_type: str = ""
    double_quant: bool = False
    block_size: list[int] = Field(default_factory=list, description="fine-grained FP8: weights per scale (rows, cols)")
    quant_storage: str = ""
    refusal: str = Field("", description="set: no method trains on this checkpoint (why, and what to do)")
    base_hint: str = Field("", description="the unquantised model to name for full fine-tuning or qlora")
    base_hint_source: str = Field("", description="where base_hint comes from (_name_or_path, or a guess by name)")


class ModelSummary(BaseModel):
    name: str
    hf_id: str | None
    family: str
    params: int
    params_b: float
    assumed: bool = Field(description="true when the architecture was guessed (e.g. from a bare size)")
    source: str
    note: str
    checkpoint_params: int | None = Field(
        None, description="Hugging Face models: the exact count the checkpoint's safetensors metadata states"
    )
    checkpoint_dtypes: dict[str, int] = Field(
        default_factory=dict, description="stored dtype -> parameters of that dtype in the checkpoint (e.g. BF16)"
    )
    revision: str | None = Field(None, description="Hugging Face models: the commit the config.json was read at")
    active_params: int | None = Field(
        None,
        description="parameters one token runs through (mixture of experts: its top-k experts, the router, shared "
        "experts, attention, embeddings and head); equals params for a dense model",
    )
    active_params_b: float | None = None
    num_experts: int = Field(0, description="routed experts per sparse layer (0: a dense model)")
    experts_per_token: int = Field(0, description="experts each token is routed to (top-k)")
    prequantized: PrequantizedOut | None = Field(
        None, description="a pre-quantized checkpoint (GPTQ, AWQ, FP8, bitsandbytes): method, bits, stored bytes"
    )


class ErrorBandOut(BaseModel):
    """Where the real value may lie: the estimate x over 1 + p90 to x over 1 - p90, with p90 the 90th
    percentile of |predicted - measured| / measured that the benches saw for this source and kind of plan."""

    low: float
    high: float
    p90_pct: float | None = Field(description="null when no bench measures this kind of plan (low = high = x)")
    n: int = Field(description="bench rows behind p90_pct")
    basis: str = Field(description="the cell of the band table, its bench files, and any fall-back to a coarser cell")


class EstimateFields(BaseModel):
    """Memory (per GPU, GiB) and speed of one plan, and which estimator produced them."""

    plan: PlanOut
    source: str = Field(description="analytical | calibrated:<profile> | simulated", examples=["analytical"])
    peak_memory_gib: float = Field(description="device total per GPU (what nvidia-smi shows): decides the fit")
    allocated_peak_gib: float
    reserved_peak_gib: float
    device_memory_gib: float
    headroom_gib: float
    fits: bool = Field(description="the estimate is within the device's memory (also when its band crosses it)")
    verdict: Verdict = Field(
        description="fits: the whole memory band is under the device's memory; band_crosses_limit: the estimate "
        "fits but the band's upper end does not (may run out of memory); does_not_fit: the estimate is over"
    )
    verdict_reason: str
    peak_memory_band_gib: ErrorBandOut = Field(description="band of peak_memory_gib")
    peak_phase: str
    paged_optimizer_gib: float
    breakdown_gib: dict[str, float] = Field(description="named components summing to peak_memory_gib")
    step_time_s: float
    step_time_band_s: ErrorBandOut = Field(description="band of step_time_s")
    tokens_per_s: float
    flops_per_token: float
    time_split_s: TimeSplit
    mfu: float
    notes: list[str]
    phases_gib: dict[str, float] | None = Field(
        None, description="source simulated: traced live memory at the end of each phase of the step"
    )
    simulation: dict[str, Any] | None = Field(
        None, description="source simulated: traced peak, its phase, op count, trace time, library versions"
    )


class CostFields(BaseModel):
    hours: float = Field(description="wall-clock hours, including the method's convergence factor")
    gpu_hours: float
    cost_usd: float | None = Field(description="null when the GPU has no price")
    convergence_factor: float


class PlanGpu(BaseModel):
    id: str
    name: str
    price_usd_per_hour: float | None
    price_provider: str = Field("", description="the provider whose price this is ('user': a price file's override)")
    price_region: str = ""
    price_basis: str = Field("", description="on-demand | spot | user")
    price_source: str = Field("", description="where the price was read, and when (price_date)")
    price_date: str = ""
    platform: str = Field("cuda", description="cuda | rocm | cpu")
    caveat: str = Field("", description="what differs on a non-CUDA card (ROCm); also in the plan's notes")


class RankedPlan(EstimateFields, CostFields):
    rank: int
    gpu: PlanGpu
    why: str
    launchable: bool = Field(True, description="this service's job runner can run the plan (POST /v1/fine_tuning/jobs)")
    not_launchable_reason: str | None = Field(
        None, description="why it cannot, and what to change (advisor.launchable)"
    )


class Rejection(BaseModel):
    group: str = Field(examples=["full on 1x rtx-4090"])
    reason: str
    to_fix: str
    candidates: int
    closest_plan: PlanOut | None = None
    closest_peak_memory_gib: float | None = None


class WorkloadOut(BaseModel):
    dataset_tokens: int
    seq_len: int
    epochs: float
    total_tokens: float


class RecommendResponse(BaseModel):
    model: ModelSummary
    gpus: list[str]
    objective: Objective
    workload: WorkloadOut
    plans: list[RankedPlan] = Field(description="feasible plans, best first; one per method x shape x GPU group")
    rejected: list[Rejection] = Field(
        description="plan groups that do not fit or miss a constraint, and what to change"
    )
    candidates_evaluated: int
    candidates_feasible: int
    candidates_risky: int = Field(description="feasible candidates whose memory band crosses the GPU's memory")
    assumptions: list[str] = Field(description="defaults assumed for what the request left out")
    notes: list[str]
    simulations: list[SimulationOut] | None = Field(None, description="only when simulate_top > 0")


class ClaimCheck(BaseModel):
    claimed_gib: float
    possible: bool
    weights_floor_gib: float
    reason: str


class EstimateGpu(BaseModel):
    id: str
    name: str
    memory_gib: float


class EstimateResponse(EstimateFields, CostFields):
    model: ModelSummary
    gpu: EstimateGpu
    workload: WorkloadOut
    claim_check: ClaimCheck | None = None
    assumptions: list[str]


class GpuOut(BaseModel):
    id: str = Field(examples=["rtx-4090"])
    name: str
    vendor: str
    gpu_class: str
    aliases: list[str]
    memory_gib: float
    memory_gb: float
    bf16_tflops: float | None
    fp16_tflops: float
    fp32_tflops: float
    memory_bandwidth_gbps: float
    bf16_supported: bool
    interconnect_gbps: float
    price_usd_per_hour: float | None
    price_date: str
    price_source: str
    spec_source: str
    note: str
    sm_count: int | None = Field(None, description="streaming multiprocessors (wave quantisation of matmuls)")
    peer_link: str = Field("pcie", description="GPU-to-GPU link: nvlink | pcie | pcie-host (no peer-to-peer)")
    link_source: str = Field("", description="where sm_count and peer_link come from")
    matmul_tflops_measured: float | None = Field(
        None, description="sustained dense half-precision matmul TFLOP/s measured on the card (null: none published)"
    )
    matmul_source: str = Field("", description="where matmul_tflops_measured comes from")
    platform: str = Field("cuda", description="cuda | rocm | cpu: the software platform PyTorch runs on")
    caveat: str = Field("", description="what differs on a non-CUDA card, with its source; shown on every plan")
    price_provider: str = Field("", description="provider of price_usd_per_hour (cheapest listed on-demand)")
    price_region: str = ""
    price_basis: str = Field("", description="on-demand | spot | user")
    node_network_gbit_s: float = Field(
        0.0, description="network between nodes, Gbit/s per node (0: the default for the board, advisor.specs)"
    )
    node_network_source: str = Field("", description="where node_network_gbit_s comes from")


class GpuList(BaseModel):
    count: int
    gpus: list[GpuOut]


class ModelOut(BaseModel):
    name: str = Field(examples=["llama-2-7b"])
    hf_id: str | None
    family: str
    aliases: list[str]
    params: int
    params_b: float
    published_params: int | None
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int | None
    head_dim: int | None
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    gated_mlp: bool
    attention_bias: bool
    mlp_bias: bool
    norm: str
    norms_per_layer: int
    learned_positions: bool
    lm_head_bias: bool
    num_decoder_layers: int | None
    relative_attention_num_buckets: int
    hidden_act: str = Field(description="activation as transformers runs it (gelu_new saves four tensors)")
    sdpa: bool = Field(description="false where transformers has no SDPA path (Gemma-2): eager attention")
    dropout: float = Field(description="dropout transformers keeps on in training (GPT-2, T5)")
    keep_fp32_modules: list[str] = Field(description="modules bitsandbytes leaves unquantised (T5's wo)")
    softcapping: bool = Field(description="Gemma-2's tanh soft-capping of attention scores and final logits")
    lora_module_names: list[str] = Field(description="peft target module names of this architecture")
    source: str
    assumed: bool
    note: str
    checkpoint_params: int | None = Field(
        None, description="Hugging Face models: the exact count the checkpoint's safetensors metadata states"
    )
    checkpoint_dtypes: dict[str, int] = Field(
        default_factory=dict, description="stored dtype -> parameters of that dtype in the checkpoint (e.g. BF16)"
    )
    revision: str | None = Field(None, description="Hugging Face models: the commit the config.json was read at")
    model_type: str = Field("", description="the Hugging Face model_type the spec was read from ('': the family's)")
    qk_norm: bool = Field(False, description="RMSNorm on queries and keys before RoPE (Qwen3, Gemma-3, OLMo-2)")
    sliding_window: int | None = Field(None, description="tokens a local-attention layer sees (None: all global)")
    sliding_window_pattern: int = Field(
        0, description="0: every layer local when sliding_window is set; N: every N-th layer is global"
    )
    active_params: int | None = Field(None, description="parameters one token runs through (MoE: top-k experts)")
    active_params_b: float | None = None
    num_experts: int = Field(0, description="routed experts per sparse layer (0: a dense model)")
    experts_per_token: int = Field(0, description="experts each token is routed to (top-k)")
    moe_intermediate_size: int = Field(0, description="width of one routed expert's MLP")
    shared_expert_intermediate_size: int = Field(0, description="width of the always-on shared expert MLP")
    prequantized: PrequantizedOut | None = Field(
        None, description="a pre-quantized checkpoint (GPTQ, AWQ, FP8, bitsandbytes): method, bits, stored bytes"
    )
    shared_expert_gate: bool = False
    first_dense_layers: int = 0
    moe_layer_step: int = 1
    router_bias: bool = False
    expert_bias: bool = False
    attention_sinks: bool = False
    norm_topk_prob: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


class ModelList(BaseModel):
    count: int
    models: list[ModelOut]


class OpenAIModel(BaseModel):
    """OpenAI's model object: a base model a job can start from, or a job's fine-tuned model."""

    id: str = Field(examples=["ft:tiny-llama:demo:ftjob-0123456789abcdef01234567"])
    object: Literal["model"] = "model"
    created: int = Field(description="unix seconds (0: a catalog entry, whose release date is not recorded)")
    owned_by: str = Field(examples=["org-local", "meta-llama"])


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


# ---- OpenAI's objects: files and fine-tuning jobs (the routes answer them; the client parses them) ----------
def openai_list(name: str, item: type[BaseModel]) -> type[BaseModel]:
    """OpenAI's list envelope of `item`s ({object: list, data, has_more, first_id, last_id}), named `name`."""
    return create_model(
        name,
        object=(Literal["list"], ...),
        data=(list[item], ...),  # type: ignore[valid-type]
        has_more=(bool, ...),
        first_id=(str | None, None),
        last_id=(str | None, None),
    )


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None
    expires_at: int | None
    examples: int | None = None
    format: str | None = None


FileList = openai_list("FileList", FileObject)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class SupervisedOut(BaseModel):
    hyperparameters: dict[str, Any]


class MethodOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedOut | None = None
    advisor: dict[str, Any] | None = Field(
        None,
        description="what ran: type (full | lora | qlora ...), lora, quantization, optimizer, micro_batch_size, "
        "num_gpus, sharding, seq_len, dtype, packing, learning_rate",
    )


class FineTuningJob(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "cancelling", "paused", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    metadata: dict[str, str] | None
    method: MethodOut | None = Field(description="OpenAI's method; `advisor` has what ran (full | lora | qlora ...)")
    plan_id: str | None
    plan: dict[str, Any] | None
    estimate: dict[str, Any] | None = Field(description="what the estimator predicted at launch")
    measured: dict[str, Any] | None = Field(description="what the run measured, with `vs_estimate` ratios")
    progress: dict[str, Any] | None


JobList = openai_list("JobList", FineTuningJob)


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: Literal["message", "metrics"]


EventList = openai_list("EventList", JobEvent)


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


CheckpointList = openai_list("CheckpointList", Checkpoint)


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class CheckResult(BaseModel):
    name: str = Field(examples=["catalogs"])
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: list[CheckResult]
