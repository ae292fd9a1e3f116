"""The speed model's physics (issue 10): each defect with a test that fails on the model before it.

GeForce fp16 rates, communication per step by sharding and link, the host-bound floor, shape-dependent
matmul efficiency, gradient accumulation, and the CPU device left as it was.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from advisor.catalog import DATA_DIR, default_catalog
from advisor.devices import host_cpu_spec
from advisor.errors import InvalidInputError
from advisor.estimators import device as dev
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.estimators.speed_counts import lora_matmul_traffic
from advisor.plans import TrainingPlan
from advisor.specs import GpuSpec

CAT = default_catalog()
EST = AnalyticalEstimator()


def _plan(method="lora", gpu="a100-80gb", **kw) -> TrainingPlan:
    base = {"micro_batch": 4, "seq_len": 2048, "grad_checkpointing": True}
    base.update(kw)
    return TrainingPlan(method=method, gpu_id=gpu, **base)


def _est(model, plan, gpu=None):
    return EST.estimate(CAT.model(model), gpu or CAT.gpu(plan.gpu_id), plan)


# ---- 1. GeForce fp16: the FP32-accumulate rate PyTorch runs ------------------------------------------
@pytest.mark.parametrize("gid,rate", [("rtx-4090", 165.2), ("rtx-3090", 71.0), ("rtx-3060-12gb", 25.0)])
def test_geforce_fp16_is_the_fp32_accumulate_rate(gid, rate):
    g = CAT.gpu(gid)
    assert g.fp16_tflops == pytest.approx(rate)
    assert g.fp16_tflops == pytest.approx(g.bf16_tflops)  # both accumulate in fp32 at half the fp16-acc rate
    assert "FP32-accumulate" in g.spec_source and "2026-11-30" in g.spec_source


@pytest.mark.parametrize("gid,rate", [("rtx-a6000", 154.8), ("l40s", 362.0), ("l4", 121.0), ("t4", 65.0)])
def test_professional_cards_keep_their_datasheet_dense_rate(gid, rate):
    assert CAT.gpu(gid).fp16_tflops == pytest.approx(rate)


def test_every_consumer_card_fp16_not_above_bf16():
    for g in CAT.gpus:
        if g.gpu_class == "consumer" and g.bf16_tflops:
            assert g.fp16_tflops <= g.bf16_tflops * 1.01, g.id


def test_fp16_step_on_a_4090_uses_165_tflops():
    p = _plan("lora", "rtx-4090", dtype="fp16")
    assert dev.peak_flops(CAT.gpu("rtx-4090"), "fp16") == pytest.approx(165.2e12)
    assert _est("llama-2-7b", p).speed.step_time_s == pytest.approx(
        _est("llama-2-7b", replace(p, dtype="bf16")).speed.step_time_s, rel=0.02
    )


def test_gpu_file_fields_sm_count_and_peer_link():
    doc = json.loads((DATA_DIR / "gpus.json").read_text())
    for g in doc["gpus"]:
        assert g["sm_count"] > 0 and g["peer_link"] in ("nvlink", "pcie", "pcie-host") and g["link_source"], g["id"]
    assert CAT.gpu("rtx-4090").peer_link == "pcie-host" and CAT.gpu("a100-80gb").peer_link == "nvlink"
    with pytest.raises(InvalidInputError, match="peer_link"):
        replace(CAT.gpu("l4"), peer_link="ethernet")
    with pytest.raises(InvalidInputError, match="sm_count"):
        replace(CAT.gpu("l4"), sm_count=0)


# ---- 1b. the achievable matmul rate: measured, not the datasheet peak -----------------------------------
def test_gpu_file_matmul_rate_measured_with_its_source():
    doc = json.loads((DATA_DIR / "gpus.json").read_text())
    measured = {g["id"]: g for g in doc["gpus"] if g.get("matmul_tflops_measured")}
    for gid in ("l4", "a100-80gb", "h100-sxm", "rtx-4090"):
        assert gid in measured and measured[gid]["matmul_source"], gid
    # the 72 W L4 sustains about half its 121 TFLOP/s datasheet rate
    assert CAT.gpu("l4").matmul_tflops_measured < 0.6 * CAT.gpu("l4").bf16_tflops
    with pytest.raises(InvalidInputError, match="matmul_tflops_measured"):
        replace(CAT.gpu("l4"), matmul_tflops_measured=0.0)


def test_gemm_efficiency_is_relative_to_the_measured_matmul_rate():
    """Before: every GPU ran its GEMMs at a class MFU x the datasheet peak, so a power-limited L4 (measured
    ~59 of 121 TFLOP/s) was predicted as fast per datasheet FLOP as an A100."""
    l4, a100 = CAT.gpu("l4"), CAT.gpu("a100-80gb")
    assert dev.matmul_flops(l4, "bf16") == pytest.approx(l4.matmul_tflops_measured * 1e12)
    assert dev.matmul_flops(l4, "fp32") == dev.peak_flops(l4, "fp32")
    p = _plan("qlora", "l4", micro_batch=1, seq_len=2048)
    full = _est("llama-3.1-8b", p).speed
    no_measure = _est("llama-3.1-8b", p, replace(l4, matmul_tflops_measured=None)).speed
    # the measured rate (0.49 of the datasheet) makes the L4's GEMMs slower than the default share (0.80) would
    assert full.compute_s == pytest.approx(no_measure.compute_s * dev.DEFAULT_MATMUL_SHARE * 121.0 / 59.4, rel=1e-6)
    # one MFU prior for every GPU class (relative to the measured rate); the reported MFU stays vs the datasheet
    assert dev.MFU_PRIOR["datacenter"] == dev.MFU_PRIOR["consumer"]
    s = _est("llama-2-7b", _plan("lora", "a100-80gb")).speed
    assert s.mfu < dev.MFU_PRIOR["datacenter"] * a100.matmul_tflops_measured / a100.bf16_tflops


def test_cpu_device_matmul_rate_is_its_measured_peak():
    cpu = host_cpu_spec()
    assert dev.matmul_flops(cpu, "fp32") == dev.peak_flops(cpu, "fp32")
    assert dev.DeviceColumns.of(cpu, "fp32", EST.k.device).matmul_flops == dev.peak_flops(cpu, "fp32")


# ---- 2. communication per step ----------------------------------------------------------------------
def test_fsdp_communication_counts_gathers_per_pass_and_reduce_scatter():
    model = CAT.model("llama-2-7b")
    for ckpt, passes in ((True, 3), (False, 2)):
        p = _plan("full", "h100-sxm", num_gpus=4, sharding="fsdp", grad_checkpointing=ckpt, optimizer="adamw-8bit")
        s = EST.plan_terms(model, p).speed
        assert s.gather_bytes == pytest.approx(passes * 0.75 * model.param_count * 2)
        # reduce-scattered in the compute dtype (FSDP mixed precision), not as the fp32 master gradients
        assert s.grad_comm_bytes == pytest.approx(0.75 * model.param_count * 2 / p.grad_accum)
        assert s.collectives == model.total_layers * (passes + 1)


def test_ddp_all_reduces_trainable_gradients_only():
    model = CAT.model("llama-2-7b")
    p = _plan("lora", "a100-80gb", num_gpus=4, sharding="ddp")
    t = EST.plan_terms(model, p)
    assert t.speed.gather_bytes == 0
    assert t.speed.grad_comm_bytes == pytest.approx(2 * 0.75 * t.terms["trainable_params"] * 4)


def test_host_staged_pcie_is_slower_than_p2p_and_exposed_when_it_exceeds_compute():
    """FSDP LoRA of a 7B on 2 GeForce cards with a short step: the weights' all-gathers (13.5 GB a pass)
    go through host memory (no P2P) and cannot hide under ~0.2 s of compute."""
    p = _plan("lora", "rtx-4090", num_gpus=2, sharding="fsdp", micro_batch=1, seq_len=512, grad_checkpointing=False)
    g = CAT.gpu("rtx-4090")
    host = _est("llama-2-7b", p, g).speed
    p2p = _est("llama-2-7b", p, replace(g, peer_link="pcie")).speed
    assert host.communication_s == pytest.approx(2 * p2p.communication_s, rel=0.05)
    ddp = _est("llama-2-7b", replace(p, sharding="ddp"), g).speed
    # FSDP's gathers dominate: the step is at least the exposed communication, far above DDP's
    assert host.step_time_s >= host.communication_s
    assert host.step_time_s > 3 * ddp.step_time_s


def test_gradient_reduction_hides_only_under_backward():
    g = CAT.gpu("a100-80gb")
    d = EST.device(g, "bf16")
    link = d.link * d.link_efficiency
    # 1 s of forward+backward compute (no checkpointing: passes 2, backward 2/3 s); 0.9 s of all-reduce
    fpt = 1.0 * d.matmul_flops * d.mfu * 8192 / (8192 + d.tokens_half) / 8192
    speed = dev.SpeedCounts(grad_comm_bytes=0.9 * link, gemm_n=0.0)
    ev = dev.evaluate(d, 0.0, 0.0, fpt, 0.0, 0.9 * link, 2, 8192.0, 2, 32, speed)
    busy = float(ev.compute_s)
    assert busy == pytest.approx(1.0)
    last_bucket = dev.DDP_BUCKET_BYTES / link
    # 0.9 s fits in the 1 s step but not in the 2/3 s of backward: 0.9 - 2/3 s exposed (+ the last bucket)
    assert float(ev.step_s) == pytest.approx(busy + (0.9 - busy * 2 / 3) + last_bucket)


def test_fsdp_shards_the_autocast_half_copies():
    model = CAT.model("llama-2-7b")
    p = _plan(
        "full",
        "a100-80gb",
        num_gpus=4,
        sharding="fsdp",
        master_weights=True,
        optimizer="adamw-8bit",
        grad_checkpointing=False,
    )
    t = EST.plan_terms(model, p)
    single = EST.plan_terms(model, replace(p, num_gpus=1, sharding="none")).terms["autocast_copies"]
    assert single >= 2 * model.linear_weight_params  # every linear's half copy (and the head's, when counted)
    assert t.terms["autocast_copies"] == pytest.approx(single / 4)
    # with checkpointing the blocks save no copy: at the peak (the first block's recomputed backward, with the later
    # blocks' gradients alive) only that layer's copies, cast again by the recomputation, are alive
    ckpt = EST.plan_terms(model, replace(p, num_gpus=1, sharding="none", grad_checkpointing=True))
    layer = max(sum(lin.weight_params for lin in b.linears) for b in model.blocks)
    assert ckpt.terms["autocast_copies"] == pytest.approx(2 * layer)


# ---- 3. host-bound floor -------------------------------------------------------------------------------
def test_small_model_short_sequence_is_host_bound():
    p = _plan("lora", "h100-sxm", micro_batch=1, seq_len=128, grad_checkpointing=False)
    t = EST.plan_terms(CAT.model("qwen2.5-0.5b"), p)
    s = _est("qwen2.5-0.5b", p).speed
    host = t.speed.host_ops * dev.HOST_OP_S
    assert s.compute_s + s.memory_bound_s < host
    assert s.step_time_s == pytest.approx(host)


def test_host_ops_by_method():
    model = CAT.model("llama-2-7b")
    ops = {
        m: EST.plan_terms(model, _plan(m, lora_targets=("all-linear",)) if m != "full" else _plan(m)).speed.host_ops
        for m in ("full", "lora", "qlora")
    }
    assert ops["qlora"] > ops["lora"] > ops["full"]  # adapter ops per module; dequantisation kernels
    few = EST.plan_terms(model, _plan("lora", lora_targets=("q", "v"))).speed.host_ops
    assert few < ops["lora"]
    no_ckpt = EST.plan_terms(model, _plan("lora", grad_checkpointing=False)).speed.host_ops
    assert no_ckpt < ops["lora"]  # checkpointing repeats the forward's ops


def test_large_step_is_not_host_bound():
    p = _plan("lora", "a100-80gb")
    s = _est("llama-2-7b", p).speed
    host = EST.plan_terms(CAT.model("llama-2-7b"), p).speed.host_ops * dev.HOST_OP_S
    assert host < 0.2 * s.step_time_s


# ---- 4. shape-dependent matmul efficiency -------------------------------------------------------------
def test_wave_quantisation():
    # 128 rows x 11008 columns = 86 tiles of 128x128 on 108 SMs: one wave, 86/108 of it busy
    assert float(dev.wave_efficiency(128.0, 11008.0, 108.0)) == pytest.approx(86 / 108)
    # 2 x 108 tiles: two full waves
    assert float(dev.wave_efficiency(256.0, 108 * 128.0, 108.0)) == pytest.approx(1.0)
    assert float(dev.wave_efficiency(256.0, 11008.0, 0.0)) == 1.0  # SM count unknown: no quantisation
    v = dev.wave_efficiency(np.array([128.0, 256.0]), np.array([11008.0, 108 * 128.0]), np.array([108.0, 108.0]))
    assert v.shape == (2,)


def test_narrow_lora_matmuls_are_memory_bound_traffic():
    model = CAT.model("llama-2-7b")
    a = EST.plan_terms(model, _plan("lora", lora_targets=("q", "v"), lora_r=8))
    b = EST.plan_terms(model, _plan("lora", lora_targets=("all-linear",), lora_r=8))
    assert b.memory_traffic_bytes > a.memory_traffic_bytes
    one = lora_matmul_traffic(_plan("lora"), [model.blocks[0].linears[0]], 1000, 2)
    lin = model.blocks[0].linears[0]
    assert one == pytest.approx(1000 * 4 * 3 * (lin.in_features + lin.out_features))


def test_attention_is_less_efficient_on_short_sequences():
    g = CAT.gpu("h100-sxm")
    d = EST.device(g, "bf16")

    def attention_s(seq):
        speed = dev.SpeedCounts(attention_flops_per_token=1e9, seq_len=seq)
        ev = dev.evaluate(d, 0.0, 0.0, 1e9, 0.0, 0.0, 2, 8192.0, 1, 1, speed)
        return float(ev.compute_s)

    assert attention_s(256) > 1.3 * attention_s(8192)


# ---- 5. gradient accumulation ------------------------------------------------------------------------
def test_gradient_accumulation_amortises_optimizer_and_ddp_sync():
    model = CAT.model("llama-2-7b")
    p1 = _plan("lora", num_gpus=4, sharding="ddp")
    p4 = replace(p1, grad_accum=4)
    t1, t4 = EST.plan_terms(model, p1), EST.plan_terms(model, p4)
    assert t4.speed.grad_comm_bytes == pytest.approx(t1.speed.grad_comm_bytes / 4)  # no_sync on 3 of 4
    assert t4.terms["optimizer_traffic_bytes"] == pytest.approx(t1.terms["optimizer_traffic_bytes"] / 4)
    assert t4.speed.host_ops < t1.speed.host_ops  # the optimiser step's ops once per 4 micro-steps
    # FSDP outside the HF Trainer (torchtune): reduce-scatter on every micro-step
    f1 = _plan("lora", num_gpus=4, sharding="fsdp", framework="torchtune")
    assert EST.plan_terms(model, replace(f1, grad_accum=4)).speed.grad_comm_bytes == pytest.approx(
        EST.plan_terms(model, f1).speed.grad_comm_bytes
    )


# ---- the CPU device is untouched; the search agrees with single estimates ----------------------------
def test_cpu_device_has_no_gpu_terms():
    cpu = host_cpu_spec()
    d = EST.device(cpu, "fp32")
    assert d.host_op_s == 0 and d.sm_count == 0 and d.attention_half_seq == 0
    assert d.layer_overhead_s == pytest.approx(dev.DeviceCoefficients().layer_overhead_s)


def test_old_gpu_files_load_without_new_fields():
    g = GpuSpec(
        id="x",
        name="x",
        memory_gib=10,
        memory_gb=10,
        bf16_tflops=None,
        fp16_tflops=10,
        fp32_tflops=5,
        memory_bandwidth_gbps=100,
        bf16_supported=False,
        price_usd_per_hour=None,
    )
    assert g.sm_count is None and g.peer_link == "pcie"
    s = EST.estimate(CAT.model("gpt2"), g, _plan("lora", "x", dtype="fp16", seq_len=256)).speed
    assert s.step_time_s > 0


def test_search_rows_agree_with_single_estimates():
    """The vectorised search (SpeedCounts stacked per row, several GPUs side by side) gives each plan the
    speed a single estimate gives it."""
    from advisor.recommend import Constraints
    from advisor.service import AdvisorService, RecommendRequest

    req = RecommendRequest(
        model="llama-2-7b", gpus=("rtx-4090", "a100-80gb", "l4"), objective="time", constraints=Constraints(max_gpus=4)
    )
    plans = AdvisorService().recommend(req).recommendation.plans
    assert plans
    model = CAT.model("llama-2-7b")
    for p in plans:
        c = p.candidate
        single = EST.estimate(model, c.gpu, c.plan).speed
        assert c.estimate.speed.step_time_s == pytest.approx(single.step_time_s, rel=1e-9), c.plan.id
        assert c.estimate.speed.communication_s == pytest.approx(single.communication_s, rel=1e-9)


# ---- the published throughput rows' set-up (bench.throughput) ------------------------------------------------
def test_torchtune_0217d44c_rows_state_no_tokens_per_step():
    """That README table names no sequence length and its alpaca data was truncated at 512 tokens, unpacked:
    before, its rows were scored at the CSV's 2048-token reading."""
    from bench.published import load_cases
    from bench.throughput import throughput_case

    rows = [c for c in load_cases(("published_1",)) if "0217d44c" in c.source and c.measured_tokens_per_s]
    assert rows
    for c in rows:
        assert throughput_case(c, CAT).throughput_skip, c.key
    assert any(throughput_case(c, CAT).throughput_skip.startswith("tokens per step not stated") for c in rows)


def test_implied_share_is_against_the_measured_matmul_rate():
    from bench.published import load_cases
    from bench.throughput import implied_share, throughput_case

    case = next(
        throughput_case(c, CAT) for c in load_cases(("published_1",)) if c.key == "published_1:25"
    )  # torchtune Llama-3.2-3B full fine-tuning on an A100
    fpt = EST.plan_terms(case.model, case.plan).flops_per_token
    a100 = CAT.gpu("a100-80gb")
    assert implied_share(case, CAT) == pytest.approx(case.measured_tokens_per_s * fpt / (271.2e12))
    assert implied_share(case, CAT) > case.measured_tokens_per_s * fpt / dev.peak_flops(a100, "bf16")
