"""Profiles are pure data: JSON round trip, store, device matching, fitted range, the scaled rule (no torch)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from advisor.catalog import default_catalog
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.estimators.calibrated import CalibratedEstimator, nearest_profile
from advisor.estimators.device import matmul_flops, wave_efficiency
from advisor.plans import TrainingPlan
from advisor.profiles import FittedRange, HeldOut, Profile, ProfileStore
from advisor.service import AdvisorService

CAT = default_catalog()
A100 = CAT.gpu("a100-80gb")
H100 = CAT.gpu("h100-sxm")
LLAMA = CAT.model("llama-3.2-1b")


def coefficients(compute: float = 2.0, traffic: float = 1.5, host_s: float = 1e-5) -> dict:
    return {
        "memory": {"activation_scale": {"llama": 1.1}, "logits_scale": 1.0, "fixed_bytes": 1e6},
        "speed": {
            "gemm": compute,
            "narrow": 0.0,
            "attention": compute,
            "eager_attention": compute,
            "traffic": traffic,
            "optimizer_traffic": traffic,
            "dequant_traffic": 2.0,
            "adapter_weight_traffic": 1.5,
            "logits": 1.0,
            "logits_fresh": 0.0,
            "host_ops": host_s,
            "step_s": 0.0,
        },
        "runtime": {"allocator_fragmentation": 0.1, "cuda_context_bytes": 600 * 2**20},
    }


def profile(gpu=A100, pid: str = "a100-80gb-20260101-000000", created: str = "2026-01-01T00:00:00+0000") -> Profile:
    return Profile(
        id=pid,
        created_at=created,
        device=gpu.to_dict(),
        software={"torch": "2.13.0", "cuda": "12.8"},
        coefficients=coefficients(),
        fitted_range=FittedRange(
            families=("llama",),
            methods=("lora", "qlora"),
            dtypes=("bf16",),
            optimizers=("adamw",),
            attention=("sdpa",),
            numeric={"seq_len": (256.0, 2048.0), "params": (1e8, 3e9)},
        ),
        held_out=HeldOut(3.0, 9.0, 8.0, 20.0, 40, 38, 6, {"memory_median_abs_pct_error": 12.0}),
        meters={"peak_memory": "cuda:max_memory_allocated"},
        provenance={"command": "test"},
    )


def plan(gpu, **kw) -> TrainingPlan:
    base = dict(method="lora", gpu_id=gpu.id, dtype="bf16", micro_batch=2, seq_len=1024)
    return TrainingPlan(**(base | kw))


def test_profile_json_round_trip_and_validation(tmp_path):
    p = profile()
    doc = json.loads(json.dumps(p.to_dict()))
    assert Profile.from_dict(doc) == p
    assert doc["format"] == "tuneadvisor.calibration-profile/1"
    with pytest.raises(InvalidInputError) as err:
        Profile.from_dict({k: v for k, v in doc.items() if k != "coefficients"})
    assert err.value.field == "profile"
    with pytest.raises(InvalidInputError):
        replace(p, id="Not A Slug!")


def test_store_lists_newest_first_skips_bad_files_and_matches_by_name_and_memory(tmp_path):
    store = ProfileStore(tmp_path)
    assert store.profiles() == [] and store.match(A100) is None
    old = profile(pid="a100-old", created="2026-01-01T00:00:00+0000")
    new = profile(pid="a100-new", created="2026-02-01T00:00:00+0000")
    store.save(old)
    store.save(new)
    (tmp_path / "broken.json").write_text("{not json")
    assert [p.id for p in store.profiles()] == ["a100-new", "a100-old"]
    assert "broken.json" in store.problems
    assert store.match(A100).id == "a100-new"
    assert store.get("a100-old") == old
    with pytest.raises(InvalidInputError):
        store.get("nope")
    # same name, memory 10% off: another device
    assert store.match(replace(A100, id="custom", memory_gib=A100.memory_gib * 0.9)) is None
    # an alias-free copy with the same name and memory matches (name + memory, not only id)
    assert store.match(replace(A100, id="my-a100")).id == "a100-new"


def test_fitted_range_names_what_is_outside():
    p = profile()
    inside = p.fitted_range.outside(LLAMA, plan(A100))
    assert inside == []
    out = p.fitted_range.outside(CAT.model("gpt2"), plan(A100, seq_len=4096, method="full"))
    assert any(s.startswith("family gpt2") for s in out)
    assert any(s.startswith("method full") for s in out)
    assert any("seq_len 4096 above the fitted 256..2048" in s for s in out)


def test_calibrated_estimator_on_its_device():
    est = CalibratedEstimator(profile())
    e = est.estimate(LLAMA, A100, plan(A100))
    assert e.source == "calibrated:a100-80gb-20260101-000000"
    m = e.memory
    # runtime coefficients: slack on the transient part, the fitted CUDA context outside the allocator
    assert m.device_total_bytes - m.reserved_peak_bytes == 600 * 2**20
    assert m.reserved_peak_bytes >= m.allocated_peak_bytes
    assert sum(m.components.values()) == m.device_total_bytes
    assert any(n.startswith("calibrated on NVIDIA A100") for n in e.notes)
    # compute: every FLOP at mfu 1/2 of the card's achievable matmul rate, in the device layer's waves of tiles
    a = AnalyticalEstimator()
    terms = a.terms(LLAMA, plan(A100))
    tokens = 2 * 1024
    speed = a.plan_terms(LLAMA, plan(A100)).speed
    wave = float(wave_efficiency(tokens, speed.gemm_n, A100.sm_count))
    compute = 2.0 * tokens * terms["flops_per_token"] / matmul_flops(A100, "bf16") / wave
    assert e.speed.compute_s == pytest.approx(compute, rel=1e-9)


def test_scaled_rule_keeps_efficiencies_and_applies_the_targets_peak_and_bandwidth(tmp_path):
    store = ProfileStore(tmp_path)
    store.save(profile())
    svc = AdvisorService(profiles=store)
    assert svc.estimator_for(A100).source == "calibrated:a100-80gb-20260101-000000"
    scaled = svc.estimator_for(H100)
    assert scaled.source == "scaled:a100-80gb-20260101-000000"
    src = svc.estimator_for(A100).estimate(LLAMA, A100, plan(A100))
    dst = scaled.estimate(LLAMA, H100, plan(H100))
    # compute scales with the peak ratio (and the device layer's wave quantisation on each card's SMs)
    speed = AnalyticalEstimator().plan_terms(LLAMA, plan(A100)).speed
    waves = [float(wave_efficiency(2 * 1024, speed.gemm_n, g.sm_count)) for g in (A100, H100)]
    ratio = matmul_flops(A100, "bf16") / matmul_flops(H100, "bf16") * waves[0] / waves[1]
    assert dst.speed.compute_s / src.speed.compute_s == pytest.approx(ratio, rel=1e-9)
    bw = A100.memory_bandwidth_gbps / H100.memory_bandwidth_gbps
    assert dst.speed.memory_bound_s / src.speed.memory_bound_s == pytest.approx(bw, rel=1e-9)
    # the memory coefficients carry over: same allocated peak
    assert dst.memory.allocated_peak_bytes == src.memory.allocated_peak_bytes
    assert any("no profile for NVIDIA H100" in n for n in dst.notes)
    # a GPU profile never stands in for a CPU, nor a CPU profile for a GPU
    cpu = replace(A100, id="cpu-x-2t", name="CPU x", gpu_class="cpu", vendor="cpu")
    assert nearest_profile(store.profiles(), cpu) is None
    assert svc.estimator_for(cpu) is svc.analytical


def test_nearest_profile_is_nearest_in_flops_and_bandwidth():
    l4 = CAT.gpu("l4")
    profiles = [profile(A100, pid="a100"), profile(CAT.gpu("rtx-4090"), pid="rtx4090")]
    assert nearest_profile(profiles, H100).id == "a100"
    assert nearest_profile(profiles, l4).id == "rtx4090"


def test_service_without_profiles_is_analytical(tmp_path):
    svc = AdvisorService(profiles=ProfileStore(tmp_path / "none"))
    assert svc.estimator_for(A100) is svc.analytical
    assert svc.estimate(LLAMA, A100, plan(A100)).estimate.source == "analytical"


def test_profiles_load_and_estimate_without_torch_or_sklearn(tmp_path):
    """The service reads profiles as data: no scikit-learn, no torch in the process that serves them."""
    import subprocess
    import sys

    ProfileStore(tmp_path).save(profile())
    code = (
        "import sys\n"
        "from advisor.profiles import ProfileStore\n"
        "from advisor.service import AdvisorService\n"
        "from advisor.plans import TrainingPlan\n"
        f"svc = AdvisorService(profiles=ProfileStore({str(tmp_path)!r}))\n"
        "gpu = svc.gpu('a100-80gb')\n"
        "out = svc.estimate(svc.model('llama-3.2-1b'), gpu, TrainingPlan(method='lora', gpu_id=gpu.id))\n"
        "assert out.estimate.source.startswith('calibrated:'), out.estimate.source\n"
        "print(','.join(m for m in ('torch', 'sklearn', 'transformers') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


def test_a_profile_fitted_on_other_terms_is_refused_loudly(tmp_path):
    """A profile records the terms version it was fitted on; another version is an error, not a rescale."""
    from advisor.api.deps import profiles_check
    from advisor.estimators.calibrated import StaleProfileError
    from advisor.estimators.terms import TERMS_VERSION

    store = ProfileStore(tmp_path)
    store.save(profile())
    doc = json.loads((tmp_path / "a100-80gb-20260101-000000.json").read_text())
    assert doc["terms_version"] == TERMS_VERSION
    # written before the field existed: fitted on version 1
    del doc["terms_version"]
    assert Profile.from_dict(doc).terms_version == 1
    doc["terms_version"] = TERMS_VERSION + 1
    (tmp_path / "a100-80gb-20260101-000000.json").write_text(json.dumps(doc))
    store = ProfileStore(tmp_path)
    assert store.profiles() == [] and [p.id for p in store.stale_profiles()] == ["a100-80gb-20260101-000000"]
    svc = AdvisorService(profiles=store)
    with pytest.raises(StaleProfileError, match="advisor calibrate --fit") as e:
        svc.estimate(LLAMA, A100, plan(A100))
    assert e.value.field == "gpu"
    with pytest.raises(StaleProfileError):
        CalibratedEstimator(store.stale_profiles()[0])
    ok, detail = profiles_check(svc)()
    assert not ok and "a100-80gb-20260101-000000" in detail
    # other devices are not affected (the stale profile is not used for the scaled rule either)
    assert svc.estimate(LLAMA, H100, plan(H100)).estimate.source == "analytical"


def test_a_profile_of_an_older_calibrated_form_is_refused():
    """Profiles fitted before the calibrated model became corrections of the analytical terms (free per-phase
    memory regressions, compute/layer_passes_s speed terms) are refused by name, not read with silent defaults."""
    from advisor.estimators.calibrated import StaleProfileError

    old = coefficients()
    old["speed"] = {"compute": 2.0, "compute_per_step": 0.0, "memory_traffic": 1.5, "layer_passes_s": 1e-4}
    with pytest.raises(StaleProfileError, match="gemm"):
        CalibratedEstimator(replace(profile(), coefficients=old))
    old = coefficients()
    old["memory"] = {"no_checkpointing": {"blocks": {"llama": 1.0}}, "checkpointing": {}}
    with pytest.raises(StaleProfileError, match="activation_scale"):
        CalibratedEstimator(replace(profile(), coefficients=old))
