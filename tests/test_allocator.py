"""The caching-allocator term: reserved - allocated counted from the plan's tensor sizes (CUDA), none on a CPU."""

from dataclasses import replace

import numpy as np
import pytest

from advisor.catalog import default_catalog, resolve_model
from advisor.devices import host_cpu_spec
from advisor.estimators import device as dev
from advisor.estimators.analytical import AnalyticalEstimator, Coefficients
from advisor.plans import TrainingPlan
from advisor.units import MIB

CAT = default_catalog()
EST = AnalyticalEstimator()
L7 = resolve_model("llama-2-7b")
A100 = CAT.gpu("a100-80gb")


def plan(**kw) -> TrainingPlan:
    base = dict(method="lora", gpu_id="a100-80gb", micro_batch=1, seq_len=512, lora_r=8, lora_targets=("q", "v"))
    base.update(kw)
    return TrainingPlan(**base)


def test_no_allocator_slack_on_a_cpu():
    cpu = host_cpu_spec()
    p = plan(gpu_id=cpu.id, dtype="fp32")
    m = EST.memory(L7, cpu, p)
    assert m.reserved_peak_bytes == m.allocated_peak_bytes
    assert EST.plan_terms(L7, p, cpu=True).allocator_slack == 0.0


def test_slack_is_a_named_term_counted_from_tensor_sizes():
    t = EST.plan_terms(L7, plan())
    m = EST.memory(L7, A100, plan())
    assert t.terms["allocator_slack"] == t.allocator_slack
    assert m.reserved_peak_bytes - m.allocated_peak_bytes == pytest.approx(t.allocator_slack, abs=1)
    # at least the segment tails (half a 20 MiB and half a 2 MiB segment) and one block's cached temporaries
    assert t.allocator_slack >= 11 * MIB + t.terms["backward_transient"]
    # the cached temporaries scale with the coefficient; nothing else does
    est2 = AnalyticalEstimator(Coefficients(allocator_cached_blocks=2.0))
    t2 = est2.plan_terms(L7, plan())
    assert t2.allocator_slack - t.allocator_slack == pytest.approx(t.terms["backward_transient"])


def test_segment_rounding_counts_each_large_live_tensor():
    # Llama-2-7B's projections are 32 MiB (q,k,v,o) and 86 MiB (MLP) in bf16: each its own segment, 1 MiB tail.
    # Twice the layers: 32 more blocks of 7 large weights; at 1 x 512 tokens activations are 4 MiB (not large).
    deeper = replace(L7, num_layers=64)
    t1, t2 = EST.plan_terms(L7, plan()), EST.plan_terms(deeper, plan())
    cached = t2.terms["backward_transient"] - t1.terms["backward_transient"]
    assert t2.allocator_slack - t1.allocator_slack - cached == pytest.approx(32 * 7 * MIB)
    # NF4 projections of the same model are 8 and 22 MiB: only the MLP's three are over 10 MiB
    q1, q2 = EST.plan_terms(L7, plan(method="qlora")), EST.plan_terms(deeper, plan(method="qlora"))
    cached = q2.terms["backward_transient"] - q1.terms["backward_transient"]
    assert q2.allocator_slack - q1.allocator_slack - cached == pytest.approx(32 * 3 * MIB)


def test_memory_totals_vectorised_with_and_without_plan_slack():
    d = dev.DeviceColumns.of(A100, "bf16", EST.k.device)
    allocated = np.array([10.0, 10.0, 10.0]) * 2**30
    static = np.array([6.0, 6.0, 6.0]) * 2**30
    slack = np.array([0.5 * 2**30, np.nan, 0.0])
    reserved, total = dev.memory_totals(d, allocated, static, slack)
    share = d.fragmentation * 4 * 2**30  # NaN: the fitted share of the transient part
    assert reserved == pytest.approx(allocated + np.array([0.5 * 2**30, share, 0.0]))
    assert total == pytest.approx(reserved + d.context_bytes)
    # scalars (one plan) alike; no slack given -> the share
    r1, _ = dev.memory_totals(d, 10.0 * 2**30, 6.0 * 2**30)
    assert r1 == pytest.approx(10.0 * 2**30 + share)


def test_search_and_single_estimate_agree_on_reserved():
    from advisor.recommend import build_table

    shapes = [plan(gpu_id=""), plan(gpu_id="", micro_batch=4, seq_len=2048), plan(gpu_id="", method="qlora")]
    table = build_table(EST, L7, [replace(s, gpu_id="a100-80gb") for s in shapes], cpu=False)
    d = EST.device(A100, "bf16")
    reserved, _ = dev.memory_totals(d, table.alloc, table.static, table.slack)
    for i, s in enumerate(shapes):
        single = EST.memory(L7, A100, replace(s, gpu_id="a100-80gb"))
        assert reserved[i] == pytest.approx(single.reserved_peak_bytes, abs=2)


def test_logits_hole_only_for_half_precision_logits_of_an_unchunked_loss():
    tokens, vocab = 4 * 1024, L7.vocab_size
    p = plan(micro_batch=4, seq_len=1024)
    full = EST.plan_terms(L7, p).allocator_slack
    chunked = EST.plan_terms(L7, replace(p, chunked_loss=True)).allocator_slack
    assert full - chunked == pytest.approx(tokens * vocab * 2)  # the bf16 logits' segment, cached through the loss
    # QLoRA's upcast head returns fp32 logits: .float() copies nothing, no hole
    q = replace(p, method="qlora")
    assert EST.plan_terms(L7, q).allocator_slack == pytest.approx(
        EST.plan_terms(L7, replace(q, chunked_loss=True)).allocator_slack
    )


def test_full_fine_tuning_keeps_the_embedding_gradient_hole():
    lora = EST.plan_terms(L7, plan(lora_targets=("all-linear",))).allocator_slack
    full = EST.plan_terms(L7, plan(method="full", master_weights=False)).allocator_slack
    assert full - lora >= L7.vocab_size * L7.hidden_size * 2  # bf16 gradient of the embedding


def test_allocator_replay_follows_the_caching_allocators_rules():
    from bench.allocator_referee import Allocator

    a = Allocator()
    x = a.malloc(3 * MIB)  # 1-10 MiB: a 20 MiB segment, split
    assert a.reserved == 20 * MIB and a.allocated == 3 * MIB
    y = a.malloc(5 * MIB)  # carved from the same segment's rest
    assert a.reserved == 20 * MIB and a.allocated == 8 * MIB
    z = a.malloc(11 * MIB + 1)  # the cached 12 MiB rest holds it; the rest (< 1 MiB) is not split off: all 12 MiB
    assert a.reserved == 20 * MIB and a.allocated == 20 * MIB
    w = a.malloc(11 * MIB + 1)  # over 10 MiB, no cached block: its own segment, rounded up to 2 MiB
    assert a.reserved == 32 * MIB and a.allocated == 32 * MIB
    a.free(x)
    a.free(y)  # merged: one free 8 MiB block at the segment's start
    assert a.allocated == 24 * MIB and a.reserved == 32 * MIB
    a.malloc(7 * MIB)  # fits the merged block: no new segment
    assert a.reserved == 32 * MIB
    a.free(z)
    a.free(w)
    a.malloc(14 * MIB)  # larger than every cached block (12, 12 and 1 MiB): a new segment
    assert a.reserved == 32 * MIB + 14 * MIB
    b = a.malloc(100)  # small pool: 2 MiB segment, 512-byte blocks
    assert a.reserved == 48 * MIB and a.blocks[b][0] == 512
