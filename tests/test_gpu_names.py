"""GPU names as SkyPilot writes them: A100 = 40 GB, A100-80GB, A10 != A10G, counts, memory filters,
ambiguous names as errors listing the choices."""

import pytest

from advisor.catalog import default_catalog
from advisor.catalog import gpu_names as gn
from advisor.errors import InvalidInputError, UnknownGpuError

CAT = default_catalog()


@pytest.mark.parametrize(
    "name, gid",
    [
        ("A100", "a100-40gb"),
        ("a100", "a100-40gb"),
        ("A100-80GB", "a100-80gb"),
        ("H100", "h100-sxm"),
        ("H100-PCIE", "h100-pcie"),
        ("L4", "l4"),
        ("A10", "a10"),
        ("A10G", "a10g"),
        ("V100", "v100-16gb"),
        ("V100-32GB", "v100-32gb"),
        ("B200", "b200"),
        ("GH200", "gh200"),
        ("MI325X", "mi325x"),
        ("RTX6000-Ada", "rtx-6000-ada"),
        # catalog ids and driver-style names keep working
        ("a100-80gb", "a100-80gb"),
        ("NVIDIA A100 80GB", "a100-80gb"),
        ("rtx-4090", "rtx-4090"),
        ("RTX 5090", "rtx-5090"),
    ],
)
def test_skypilot_names(name, gid):
    assert CAT.gpu(name).id == gid


def test_a100_is_the_40gb_card_and_a10_is_not_a10g():
    assert CAT.gpu("A100").memory_gb == 40
    assert CAT.gpu("A10").name == "NVIDIA A10" and CAT.gpu("A10").bf16_tflops == 125.0
    assert CAT.gpu("A10G").bf16_tflops == 70.0


@pytest.mark.parametrize("name", ["RTX 6000", "MI300", "A100-PCIE", "rtx"])
def test_ambiguous_name_lists_the_choices(name):
    with pytest.raises(InvalidInputError, match="ambiguous") as exc:
        CAT.gpu(name)
    assert exc.value.field == "gpu" and "To fix" in str(exc.value)
    assert str(exc.value).count(" GB)") >= 2  # at least two cards listed with their memory


def test_counts():
    gpus, count = CAT.gpus_for("A100:8")
    assert [g.id for g in gpus] == ["a100-40gb"] and count == 8
    gpus, count = CAT.gpus_for("L4:4")
    assert [g.id for g in gpus] == ["l4"] and count == 4
    for bad in ("A100:0", "A100:x", "A100:2000"):
        with pytest.raises(InvalidInputError, match="To fix"):
            gn.parse(bad)


def test_memory_filter():
    gpus, count = CAT.gpus_for("80GB+")
    ids = {g.id for g in gpus}
    assert ids == {g.id for g in CAT.gpus if g.gpu_class != "cpu" and g.memory_gb >= 80}
    assert {"a100-80gb", "h100-sxm", "h200", "b200", "mi300x"} <= ids and "a100-40gb" not in ids and count is None
    gpus, count = CAT.gpus_for("141GB+:8")
    assert {g.id for g in gpus} >= {"h200", "b200"} and count == 8 and all(g.memory_gb >= 141 for g in gpus)
    with pytest.raises(InvalidInputError, match="no catalog GPU has 4000 GB"):
        CAT.gpus_for("4000GB+")


def test_unknown_name_suggests_and_a_skypilot_name_never_falls_to_a_look_alike():
    with pytest.raises(UnknownGpuError) as exc:
        CAT.gpu("A1000")
    assert exc.value.suggestions
    # a catalog without the A10: 'A10' is an error, not the A10G
    from dataclasses import replace

    without = replace(CAT, gpus=tuple(g for g in CAT.gpus if g.id != "a10"))
    with pytest.raises(UnknownGpuError, match="SkyPilot's name for 'a10'"):
        without.gpu("A10")


def test_every_skypilot_name_resolves_to_a_catalog_gpu():
    ids = {g.id for g in CAT.gpus}
    assert set(gn.SKYPILOT_NAMES.values()) <= ids
    for name in gn.SKYPILOT_NAMES:
        assert CAT.gpu(name).id == gn.SKYPILOT_NAMES[name]


def test_catalog_refresh_has_todays_gpus_with_sources():
    want = {
        "b200", "h200", "gh200", "h100-sxm", "h100-pcie", "h100-nvl", "a100-40gb", "a100-80gb", "a100-40gb-pcie",
        "a100-80gb-pcie", "l40s", "l40", "l4", "a10", "a10g", "rtx-5090", "rtx-4090", "rtx-4080", "rtx-6000-ada",
        "rtx-a6000", "a40", "v100-16gb", "t4", "mi300x", "mi325x",
    }  # fmt: skip
    assert want <= {g.id for g in CAT.gpus}
    for g in CAT.gpus:
        assert g.spec_source and g.link_source and "recorded" in g.link_source, g.id


def test_rocm_cards_carry_a_caveat_with_its_source():
    for g in CAT.gpus:
        if g.vendor == "amd":
            assert g.platform == "rocm" and "bitsandbytes" in g.caveat and "read 2026-11-30" in g.caveat
        else:
            assert g.platform == "cuda" and not g.caveat
