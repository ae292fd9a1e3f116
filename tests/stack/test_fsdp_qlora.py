"""FSDP-QLoRA runs: two processes (gloo on this CPU, loopback) launched with the FSDP flags the job runner gives a
real job, each building the plan's QLoRA model with ``advisor.stack.build.build``; FSDP shards the 4-bit weights
(stored in the compute dtype, ``bnb_4bit_quant_storage``), the LoRA adapters train, and rank 0 saves the gathered
adapter with the same keys as a one-process QLoRA adapter.

fp32 here (this CPU has no fast bf16): the storage dtype is the compute dtype either way."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp_qlora_worker.py")


def _worker_constants() -> tuple[int, float, int]:
    """The worker's steps, learning rate and batch seed (the one-process reference repeats them)."""
    spec = importlib.util.spec_from_file_location("fsdp_qlora_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(worker)  # type: ignore[union-attr]
    return worker.STEPS, worker.LR, worker.SEED


def _spec(plan, model_dir: Path):
    from advisor.jobs.spec import JobSpec, ModelSource

    return JobSpec(
        job_id="ftjob-fsdpqlora0001",
        model=str(model_dir),
        source=ModelSource("local", str(model_dir)),
        plan=plan,
        training_file="/unused.jsonl",
        n_epochs=1,
        batch_size=plan.micro_batch * plan.grad_accum * plan.num_gpus,
        learning_rate=1e-2,
        device="cpu",
    )


@pytest.mark.needs_torch
@pytest.mark.slow
def test_fsdp_qlora_shards_the_4bit_weights_trains_and_saves_the_adapter(tmp_path: Path) -> None:
    import os

    import torch
    from safetensors import safe_open

    from advisor.jobs.launchers import accelerate_env, train_argv, train_env
    from advisor.jobs.tiny import save_tiny_model
    from advisor.plans import TrainingPlan
    from advisor.stack.build import build, make_optimizer

    steps, lr, seed = _worker_constants()
    model_dir = save_tiny_model(tmp_path / "model")
    plan = TrainingPlan(
        method="qlora",
        gpu_id="cpu",
        dtype="fp32",
        num_gpus=2,
        sharding="fsdp",
        micro_batch=2,
        seq_len=32,
        lora_r=8,
        lora_dropout=0.0,  # the same forward on every rank and in the one-process reference
    )
    spec = _spec(plan, model_dir)
    # the job's own launch: accelerate's flags from train_argv, this worker in place of advisor.jobs.train
    argv = train_argv(spec, tmp_path, sys.executable)
    assert argv[-4:] == ["-m", "advisor.jobs.train", "--job-dir", str(tmp_path)]
    argv = [*argv[:-4], str(WORKER), str(model_dir), str(tmp_path), json.dumps(plan.to_dict())]
    env = {**os.environ, **train_env(spec, threads=1), **accelerate_env(spec), "MASTER_ADDR": "127.0.0.1"}
    t = time.perf_counter()
    run = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"2-process FSDP-QLoRA run: {took:.1f} s; ranks: {ranks}")

    for r in ranks:
        assert r["world"] == 2
        assert r["storage"] == {"Params4bit": "torch.float32"}  # the packed 4-bit weights in the compute dtype
        assert "FULL_SHARD" in r["sharding_strategy"] and "param_dtype=torch.float32" in r["mixed_precision"]
        # FULL_SHARD: each rank holds half of every flat parameter (padded to a multiple of the world size)
        assert r["full_numel"] / 2 <= r["local_numel"] <= r["full_numel"] / 2 + 64, r
        assert all(math.isfinite(x) for x in r["losses"]), r["losses"]
        assert all(g > 0 for g in r["grad_norms"]), r["grad_norms"]  # each rank's shard of the LoRA gradients

    # one model: the sharded run takes the same steps as one process on the same batches (FSDP averages the
    # ranks' gradients of one batch: the batch's gradient)
    single = build(model_dir, replace(plan, num_gpus=1, sharding="none"), "cpu", seed=0, learning_rate=lr)
    opt = make_optimizer(plan.optimizer, [p for p in single.model.parameters() if p.requires_grad], lr=lr)
    g, reference = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        ids = torch.randint(0, single.spec.vocab_size, (plan.micro_batch, plan.seq_len), generator=g)
        loss = single.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        reference.append(float(loss.detach()))
    print(f"losses: FSDP {ranks[0]['losses']}, one process {reference}")
    for r in ranks:
        assert r["losses"] == pytest.approx(reference, rel=1e-4)
    assert reference[-1] != reference[0]  # the steps changed the adapters (the same batch would not repeat a loss)

    # the gathered adapter: readable, the same tensors (names, shapes, values) as the one-process adapter
    files = list((tmp_path / "adapter").glob("*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        sharded = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    single.model.save_pretrained(str(tmp_path / "single"), safe_serialization=True)
    with safe_open(str(tmp_path / "single" / "adapter_model.safetensors"), "pt") as f:
        one = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert sharded.keys() == one.keys() and any("lora_A" in k for k in sharded)
    for k, v in sharded.items():
        assert v.shape == one[k].shape and torch.allclose(v, one[k], rtol=1e-3, atol=1e-5), k
    assert any(float(v.abs().max()) > 0 for k, v in sharded.items() if "lora_B" in k)  # peft starts B at zero


# ---- what the plan says and what the launchers give (no processes) -------------------------------------------
@pytest.mark.needs_torch
def test_fsdp_plans_store_the_4bit_weights_in_the_compute_dtype_and_the_builder_reads_it() -> None:
    import torch

    from advisor.methods import get_method
    from advisor.plans import make_plan
    from advisor.stack.build import _bnb_config

    qlora = get_method("qlora")
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        fsdp = make_plan("qlora", "a100-80gb", num_gpus=2, sharding="fsdp", dtype=dtype)
        assert qlora.quantization(fsdp)["bnb_4bit_quant_storage"] == dtype
        cfg = _bnb_config(fsdp, torch_dtype)
        assert cfg.bnb_4bit_quant_storage == torch_dtype and cfg.bnb_4bit_compute_dtype == torch_dtype
    # one GPU and DDP keep bitsandbytes' uint8 storage (nothing to flatten)
    for plan in (make_plan("qlora", "a100-80gb"), make_plan("qlora", "a100-80gb", num_gpus=2, sharding="ddp")):
        assert "bnb_4bit_quant_storage" not in qlora.quantization(plan)
        assert _bnb_config(plan, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def est_gpu():
    """The GPU the estimate tests price plans on."""
    from advisor.catalog import default_catalog

    return default_catalog().gpu("a100-80gb")


def test_fsdp_qlora_in_half_precision_is_estimated_as_it_runs_without_the_fp32_upcast() -> None:
    """FSDP cannot flatten fp32 norms with bf16-stored 4-bit weights (``Must flatten tensors with uniform dtype``),
    so the builder skips prepare_model_for_kbit_training's upcast there and the estimate is the no-upcast one;
    DDP and fp32 FSDP keep it (same bytes as before)."""
    from advisor.catalog import resolve_model
    from advisor.estimators.analytical import AnalyticalEstimator
    from advisor.methods.qlora import upcast
    from advisor.plans import make_plan

    model, est = resolve_model("llama-2-7b"), AnalyticalEstimator()
    fsdp = make_plan("qlora", "a100-80gb", num_gpus=2, sharding="fsdp", dtype="bf16", seq_len=512)
    assert fsdp.kbit_upcast and not upcast(fsdp)
    no_upcast = est.memory(model, est_gpu(), replace(fsdp, kbit_upcast=False))
    assert est.memory(model, est_gpu(), fsdp).components == no_upcast.components
    ddp = replace(fsdp, sharding="ddp")
    assert upcast(ddp) and upcast(replace(fsdp, dtype="fp32"))
    upcast_weights = est.memory(model, est_gpu(), ddp).components["weights"]
    assert upcast_weights > est.memory(model, est_gpu(), replace(ddp, kbit_upcast=False)).components["weights"]


def test_a_ray_worker_gets_the_fsdp_settings_accelerate_launch_gives_a_local_process() -> None:
    """One table for both launchers: each ``--fsdp_<key> value`` flag of train_argv is ``FSDP_<KEY>=value`` in
    accelerate_env (what a Ray Train worker's Accelerator reads)."""
    from advisor.jobs.launchers import accelerate_env, train_argv
    from advisor.plans import TrainingPlan

    for device in ("cuda", "cpu"):
        plan = TrainingPlan(method="qlora", gpu_id="h100-sxm", dtype="bf16", num_gpus=4, sharding="fsdp")
        spec = replace(_spec(plan, Path("/m")), device=device)
        argv, env = train_argv(spec, Path("/j"), "py", port=29555), accelerate_env(spec)
        flags = {argv[i][len("--fsdp_") :]: argv[i + 1] for i in range(len(argv)) if argv[i].startswith("--fsdp_")}
        assert flags and "--use_fsdp" in argv and env["ACCELERATE_USE_FSDP"] == "true"
        assert {k: env[f"FSDP_{k.upper()}"] for k in flags} == flags
        assert flags["sharding_strategy"] == "FULL_SHARD" and flags["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # accelerate's FSDP plugin refuses sync_module_states without an accelerator device
        on_gpu = "true" if device == "cuda" else "false"
        assert flags["sync_module_states"] == flags["cpu_ram_efficient_loading"] == on_gpu


@pytest.mark.needs_torch
@pytest.mark.slow
def test_a_bf16_fsdp_qlora_replica_flattens_into_one_dtype_per_unit(tmp_path: Path) -> None:
    """The real dtype (bf16), one rank in this process: FSDP flattens each unit of the replica ``build`` makes for an
    FSDP plan (4-bit weights stored as bf16, no fp32 upcast of the norms; peft's wrap policy gives the fp32 LoRA
    leaves their own units, FSDP mixed precision in the storage dtype: what the Trainer sets) and one forward and
    backward runs under bf16 autocast. With the upcast, or with the LoRA leaves inside the decoder-layer units,
    FSDP refuses: ``Must flatten tensors with uniform dtype`` (both reproduced on this CPU)."""
    import torch
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    from advisor.jobs.launchers import free_port
    from advisor.jobs.tiny import save_tiny_model
    from advisor.plans import TrainingPlan
    from advisor.stack.build import build

    model_dir = save_tiny_model(tmp_path / "model")
    plan = TrainingPlan(
        method="qlora",
        gpu_id="cpu",
        dtype="bf16",
        num_gpus=2,
        sharding="fsdp",
        micro_batch=1,
        seq_len=16,
        lora_r=4,
        # on a CPU, peft asks torch.is_autocast_enabled() (CUDA's autocast) and casts the adapter input to the fp32
        # adapter dtype, so a checkpointed block recomputes in another dtype than its forward ran in: not the case
        # this test is about (the dtypes FSDP flattens)
        grad_checkpointing=False,
    )
    built = build(model_dir, plan, "cpu", group_replica=True)
    layer = built.model.base_model.model.model.layers[0]
    frozen = {p.dtype for p in layer.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # packed 4-bit weights and norms alike
    assert {p.dtype for p in layer.parameters() if p.requires_grad} == {torch.float32}  # peft's fp32 adapters
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = FSDP(
            built.model,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=fsdp_auto_wrap_policy(built.model),
            mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
        units = [m for m in model.modules() if isinstance(m, FSDP)]
        assert len(units) > plan.num_gpus * 2  # root + decoder layers + LoRA leaves, each flattened in one dtype
        ids = torch.randint(0, built.spec.vocab_size, (1, plan.seq_len))
        # the Trainer's bf16 (autocast), as in peft's FSDP-QLoRA recipe: without it peft casts a layer's input to
        # its fp32 adapter dtype before FSDP casts the adapter to bf16 (``expected m1 and m2 to have the same dtype``)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
