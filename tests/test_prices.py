"""Prices per provider: the committed offers carry source and date; a request picks providers and the basis,
every plan names its provider, region, basis and source; a price file brings offers (or old flat prices)."""

import json

import pytest

from advisor.catalog import build_catalog, default_catalog
from advisor.catalog import prices as P
from advisor.errors import InvalidInputError, UnknownGpuError
from advisor.recommend import Constraints
from advisor.service import AdvisorService, RecommendRequest
from advisor.specs import Workload

CAT = default_catalog()


def test_every_offer_has_source_date_and_a_catalog_gpu():
    doc = json.loads((__import__("advisor.catalog").catalog.DATA_DIR / "prices.json").read_text())
    ids = {g.id for g in CAT.gpus}
    assert len(doc["offers"]) >= 20
    for o in doc["offers"]:
        assert o["gpu"] in ids and o["provider"] and o["source"] and o["date"].startswith("2026-"), o
        assert o["on_demand_usd_per_gpu_hour"] is not None or o["spot_usd_per_gpu_hour"] is not None


def test_default_is_the_cheapest_on_demand_offer_named():
    a100 = CAT.gpu("a100-40gb")
    offers = [o for o in CAT.offers if o.gpu == "a100-40gb" and o.on_demand is not None]
    assert len({o.provider for o in offers}) >= 2  # a real choice between providers
    assert a100.price_usd_per_hour == min(o.on_demand for o in offers)
    assert a100.price_basis == "on-demand" and a100.price_provider == "lambda" and a100.price_region
    assert "skypilot-catalog" in a100.price_source and a100.price_date


def test_providers_and_basis():
    aws = CAT.priced(["aws"], "on-demand")
    assert aws.gpu("a100-40gb").price_provider == "aws"
    # catalogs/v9 lists AWS's post-June-2025 p4d price (21.957642), not the pre-cut 32.7726 of catalogs/v7
    assert aws.gpu("a100-40gb").price_usd_per_hour == pytest.approx(21.957642 / 8)
    assert aws.gpu("rtx-4090").price_usd_per_hour is None  # AWS does not offer it: no price, not another's
    spot = CAT.priced(["runpod"], "spot")
    assert spot.gpu("rtx-4090").price_usd_per_hour == 0.34 and spot.gpu("rtx-4090").price_basis == "spot"
    with pytest.raises(InvalidInputError, match="unknown provider"):
        CAT.priced(["nosuchcloud"], "on-demand")
    with pytest.raises(InvalidInputError, match="price_basis"):
        CAT.priced(None, "reserved")


def test_price_file_offers_and_the_old_format(tmp_path):
    new = tmp_path / "offers.json"
    new.write_text(
        json.dumps(
            {
                "offers": [
                    {
                        "gpu": "h100-sxm",
                        "provider": "mycloud",
                        "region": "eu-1",
                        "on_demand_usd_per_gpu_hour": 1.1,
                        "spot_usd_per_gpu_hour": 0.7,
                        "source": "our contract",
                        "date": "2026-11-30",
                    }
                ]
            }
        )
    )
    cat = build_catalog(price_file=new)
    h = cat.gpu("H100")
    assert (h.price_usd_per_hour, h.price_provider, h.price_region) == (1.1, "mycloud", "eu-1")
    assert cat.priced(["mycloud"], "spot").gpu("H100").price_usd_per_hour == 0.7
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"prices": {"a100-80gb": {"price_usd_per_hour": 1.5, "price_source": "mine"}}}))
    a = build_catalog(price_file=old).gpu("A100-80GB")
    assert (a.price_usd_per_hour, a.price_basis, a.price_source) == (1.5, "user", "mine")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"offers": [{"gpu": "h100-sxm", "provider": "x"}]}))
    with pytest.raises(InvalidInputError, match="no price"):
        build_catalog(price_file=bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"offers": [{"gpu": "h900", "provider": "x", "on_demand_usd_per_gpu_hour": 1}]}))
    with pytest.raises(UnknownGpuError):
        build_catalog(price_file=unknown)


def test_every_plan_names_provider_basis_and_source():
    svc = AdvisorService(CAT)
    res = svc.recommend(
        RecommendRequest(model="llama-3-8b", workload=Workload(dataset_tokens=20_000_000), limit=5, providers=("aws",))
    )
    assert res.recommendation.plans
    for r in res.recommendation.plans:
        g = r.candidate.gpu
        assert g.price_provider == "aws" and g.price_basis == "on-demand" and "aws" in g.price_source
        assert "on-demand at aws" in r.why
    assert all(g.price_usd_per_hour is not None for g in res.gpus)  # only the GPUs AWS prices were searched


def test_price_label():
    assert P.price_label(CAT.gpu("a100-40gb")) == "$1.29/GPU-h on-demand at lambda (us-east-1)"


def test_constraints_still_validate():
    with pytest.raises(InvalidInputError):
        Constraints(max_budget_usd=-1)


def test_every_catalog_gpu_but_the_unsourced_has_an_offer():
    """The cards added with the catalog refresh are priced; the ones with no offer in any read catalog file are named
    here, so a new unpriced card fails this test instead of silently showing no cost."""
    priced = {o.gpu for o in CAT.offers}
    unpriced = {g.id for g in CAT.gpus} - priced
    assert unpriced == {"mi325x"}, unpriced  # no MI325X row in catalogs/v7-v9 of skypilot-catalog


def test_gcp_and_azure_offers_name_instance_region_and_file():
    doc = json.loads((__import__("advisor.catalog").catalog.DATA_DIR / "prices.json").read_text())
    by = {(o["gpu"], o["provider"]): o for o in doc["offers"]}
    g = by[("a100-40gb", "gcp")]  # host VM + GPU rows of catalogs/v9/gcp, divided by the 8 GPUs
    assert g["on_demand_usd_per_gpu_hour"] == pytest.approx((5.91582 + 23.47126) / 8)
    assert g["spot_usd_per_gpu_hour"] == pytest.approx((3.10496 + 12.3192) / 8)
    assert "v9/gcp/vms.csv" in g["source"] and g["instance"] == "a2-highgpu-8g" and g["region"] == "us-east1"
    a = by[("a100-80gb-pcie", "azure")]
    assert (a["on_demand_usd_per_gpu_hour"], a["instance"]) == (3.673, "Standard_NC24ads_A100_v4")
    assert "v6/azure/vms.csv" in a["source"] and "A100 80GB PCIe" in a["source"]
    # a spot price the file lists at or above on-demand is not passed on as a spot offer
    assert by[("h100-sxm", "azure")]["spot_usd_per_gpu_hour"] is None
    assert by[("h100-sxm", "gcp")]["spot_usd_per_gpu_hour"] is None


def test_post_cut_aws_rows_replace_the_pre_cut_ones():
    aws = [o for o in CAT.offers if o.provider == "aws" and o.gpu in ("a100-40gb", "a100-80gb", "h100-sxm", "h200")]
    assert len(aws) == 4 and all("v9/aws/vms.csv" in o.source and "post-June-2025" in o.source for o in aws)
    h100 = CAT.priced(["aws"], "spot").gpu("h100-sxm")
    assert h100.price_usd_per_hour == pytest.approx(16.9508 / 8) and h100.price_basis == "spot"
    b200 = CAT.priced(["aws", "lambda"], "on-demand").gpu("b200")
    assert (b200.price_provider, b200.price_usd_per_hour) == ("lambda", pytest.approx(53.52 / 8))


def test_rtx4080_and_mi300x_offers_name_the_catalog_file_they_were_read_from():
    """The two cards priced on 2026-12-01: one offer each, the per-GPU price of a 1-GPU instance, the file and its
    commit in the source, and no spot (vast lists SpotPrice 0.00; runpod's v8 SpotPrice repeats Price)."""
    by = {o.gpu: o for o in CAT.offers if o.gpu in ("rtx-4080", "mi300x")}
    r, m = by["rtx-4080"], by["mi300x"]
    assert (r.provider, r.instance, r.gpus_per_instance, r.on_demand, r.spot) == (
        "vast",
        "1x-RTX_4080S-32-65536",
        1,
        0.24,
        None,
    )
    assert "catalogs/v7/vast/vms.csv @ 00690e7666c7 (Price column)" in r.source and r.date == "2026-12-01"
    assert (m.provider, m.instance, m.gpus_per_instance, m.on_demand, m.spot) == (
        "runpod",
        "1x_MI300X_SECURE",
        1,
        2.39,
        None,
    )
    assert "catalogs/v8/runpod/vms.csv @ 01acdfd419ce (Price column)" in m.source and m.date == "2026-12-01"
    mi = CAT.gpu("mi300x")
    assert (mi.price_usd_per_hour, mi.price_provider, mi.platform) == (2.39, "runpod", "rocm") and mi.caveat
