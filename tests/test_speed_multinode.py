"""Plans across nodes: GPUs per node, the network between nodes in the speed model (hierarchical collectives:
(g-1)/g of the payload inside a node over its GPU link, (N-1)/N between nodes over the node's network)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from advisor.catalog import default_catalog
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import make_plan
from advisor.recommend import Constraints, _group
from advisor.service import AdvisorService
from advisor.service import RecommendRequest as CoreRequest
from advisor.specs import NODE_NETWORK

CAT = default_catalog()
EST = AnalyticalEstimator()
MODEL = CAT.model("llama-2-7b")
H100 = CAT.gpu("h100-sxm")


def _speed(plan, gpu=H100):
    return EST.plan_terms(MODEL, plan).speed, EST.estimate(MODEL, gpu, plan).speed


@pytest.mark.parametrize("method,sharding", [("lora", "ddp"), ("full", "fsdp")])
def test_one_node_is_unchanged_and_two_nodes_split_the_payload(method: str, sharding: str) -> None:
    one = make_plan(method, H100, num_gpus=16, sharding=sharding, gpus_per_node=16)
    two = replace(one, gpus_per_node=8)
    assert (one.nodes, two.nodes) == (1, 2)
    c1, s1 = _speed(one)
    c2, s2 = _speed(two)
    assert c1.internode_gather_bytes == c1.internode_grad_bytes == 0.0
    # hierarchical: inside the node (g-1)/g = 7/8 of what one node moves at (n-1)/n = 15/16; between nodes 1/2
    if sharding == "ddp":
        assert c2.grad_comm_bytes == pytest.approx(c1.grad_comm_bytes * (7 / 8) / (15 / 16))
        assert c2.internode_grad_bytes == pytest.approx(c1.grad_comm_bytes * (1 / 2) / (15 / 16))
    else:
        assert c2.gather_bytes == pytest.approx(c1.gather_bytes * (7 / 8) / (15 / 16))
        assert c2.internode_gather_bytes == pytest.approx(c1.gather_bytes * (1 / 2) / (15 / 16))
    # the network (3.2 Tb/s per node on an NVLink board) is slower than NVLink: more communication time
    assert s2.communication_s > s1.communication_s
    assert s2.step_time_s >= s1.step_time_s
    # up to one node's worth of GPUs, gpus_per_node changes nothing
    eight = make_plan(method, H100, num_gpus=8, sharding=sharding)
    assert _speed(eight)[1] == _speed(replace(eight, gpus_per_node=64))[1]


def test_a_slower_network_costs_more_time_and_the_default_has_a_source() -> None:
    plan = make_plan("full", H100, num_gpus=16, sharding="fsdp", gpus_per_node=8)
    gbit, source = H100.node_network
    assert (gbit, source) == NODE_NETWORK["nvlink"] and "InfiniBand" in source
    pcie = CAT.gpu("l40s")
    assert pcie.node_network == NODE_NETWORK["pcie"] and "Ethernet" in pcie.node_network[1]
    fast = _speed(plan)[1]
    slow = _speed(plan, replace(H100, node_network_gbit_s=100.0, node_network_source="test: 100 GbE"))[1]
    faster = _speed(plan, replace(H100, node_network_gbit_s=25600.0))[1]
    assert slow.communication_s > fast.communication_s > faster.communication_s
    assert slow.tokens_per_s < fast.tokens_per_s
    # the inter-node time is the network's: bytes per node over (Gbit/s / 8) at its efficiency
    counts = EST.plan_terms(MODEL, plan).speed
    net_bytes = counts.internode_gather_bytes + counts.internode_grad_bytes
    from advisor.estimators.device import NETWORK_EFFICIENCY

    expected = net_bytes / (100.0 / 8 * 1e9 * NETWORK_EFFICIENCY) - net_bytes / (gbit / 8 * 1e9 * NETWORK_EFFICIENCY)
    assert slow.communication_s - fast.communication_s == pytest.approx(expected, rel=0.05)


def test_recommend_past_one_node_offers_multi_node_plans() -> None:
    req = CoreRequest(
        model="llama-2-70b",
        gpus=("h100-sxm",),
        constraints=Constraints(max_gpus=16, methods=("full",), gpus_per_node=8),
        limit=20,
    )
    rec = AdvisorService(CAT).recommend(req).recommendation
    plans = [r.candidate.plan for r in rec.plans] + [r.closest.plan for r in rec.rejected if r.closest]
    multi = [p for p in plans if p.num_gpus == 16]
    assert multi and all(p.nodes == 2 and p.gpus_per_node == 8 for p in multi)
    assert "16x h100-sxm over 2 nodes" in _group(multi[0])


def test_gpus_per_node_round_trips_through_plan_ids() -> None:
    from advisor.plans import decode_plan_id

    plan = make_plan("lora", H100, num_gpus=16, gpus_per_node=4)
    assert decode_plan_id(plan.id) == plan and plan.nodes == 4
    assert make_plan("lora", H100).id == replace(make_plan("lora", H100), gpus_per_node=8).id  # default: not encoded
