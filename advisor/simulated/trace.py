"""The trace: one full-size training step under FakeTensorMode, its live bytes counted.

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

The model is built by the one builder (``advisor.stack.build.build_meta``), on the meta device, then
materialised on fake tensors. This module imports torch: the estimator imports it when a trace runs.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from advisor.estimators.base import COMPONENTS
from advisor.methods import get_method
from advisor.plans import TrainingPlan
from advisor.simulated.cache import library_versions
from advisor.simulated.estimator import check_plan, stack_notes
from advisor.simulated.kernels import (
    cuda_kernel_choices,
    moe_kernel_choices,
    prime_bitsandbytes,
    real_run_decisions,
)
from advisor.simulated.meter import BNB_PAGED_MIN_NUMEL, LiveBytesMeter
from advisor.simulated.results import TraceResult
from advisor.stack.build import TORCH_DTYPES, build_meta, make_optimizer, materialize
from advisor.units import GIB

#: One step after priming the optimiser states (see trace_step): what a two-step run's second step sees.
STEPS = 1


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
    check_plan(plan)
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    prime_bitsandbytes()
    built = build_meta(config, plan, targets)
    model, cfg, param_count = built.model, built.config, built.param_count
    notes = built.notes + stack_notes(plan)
    meter = LiveBytesMeter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake:
        fake_mode.cache_enabled = False  # hashing each op's arguments costs more than it saves here
    half = TORCH_DTYPES[plan.dtype]
    autocast = (
        torch.autocast("cpu", dtype=half)
        if not get_method(plan.method).adapter and plan.master_weights and plan.dtype != "fp32"
        else contextlib.nullcontext()
    )
    vocab = {int(cfg.vocab_size)}
    b, s = plan.micro_batch, plan.seq_len
    micro_steps = min(plan.grad_accum, 2)
    gc_was = gc.isenabled()
    gc.disable()  # frees happen when references drop, as in the real run, not when a collection runs
    try:
        with real_run_decisions(), cuda_kernel_choices(), moe_kernel_choices(), fake_mode, meter:
            materialize(model, real_init=not fake)
            params = [p for p in model.parameters() if p.requires_grad]
            # adapters: LoRA / DoRA weights and the trained copies of peft's modules_to_save
            adapter_ids = {id(p) for n, p in model.named_parameters() if "lora_" in n or "modules_to_save." in n}
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
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                meter.track(v, "optimizer.state", "optimizer_states")


def _optimizer(params: list, plan: TrainingPlan, meter: LiveBytesMeter):
    """The optimiser the HF Trainer builds for the plan (``advisor.stack.build.make_optimizer``), with
    bitsandbytes' state buffers placed as on CUDA."""
    if plan.optimizer == "adamw":
        return make_optimizer(plan.optimizer, params, lr=1e-4)
    paged = plan.optimizer.startswith("paged")
    # its quantisation maps are host tensors computed from real values (.tolist()): not device memory
    with unset_fake_temporarily(), meter.paused():
        opt = make_optimizer(plan.optimizer, params, lr=1e-4)

    def get_state_buffer(p, dtype=torch.float32):
        if paged and p.numel() >= BNB_PAGED_MIN_NUMEL:
            with meter.paused():  # cudaMallocManaged: never in the device allocator
                buf = torch.zeros_like(p, dtype=dtype)
            meter.mark_paged(buf)
            return buf
        return torch.zeros_like(p, dtype=dtype)

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
