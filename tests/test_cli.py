import json

import pytest

from advisor.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_estimate_table_and_json(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "meta-llama/Llama-2-7b-hf", "--gpu", "4090", "--method", "qlora")
    assert code == 0 and "FITS" in out and "weights" in out
    code, out, _ = run(
        capsys,
        "estimate",
        "--model",
        "llama-2-7b",
        "--gpu",
        "4090",
        "--method",
        "lora",
        "--json",
        "--lora-targets",
        "q,v",
        "--micro-batch",
        "2",
    )
    d = json.loads(out)
    for key in ("peak_memory_gib", "step_time_s", "tokens_per_s", "breakdown_gib", "fits", "source"):
        assert key in d
    assert d["source"] == "analytical"


def test_recommend_json_plans_first_to_last(capsys):
    code, out, _ = run(
        capsys,
        "recommend",
        "--model",
        "llama-2-7b",
        "--gpu",
        "a100-80gb",
        "--dataset-tokens",
        "20M",
        "--objective",
        "time",
        "--json",
    )
    d = json.loads(out)
    assert code == 0 and d["plans"][0]["rank"] == 1
    hours = [(p["verdict"] != "fits", p["hours"]) for p in d["plans"]]
    assert hours == sorted(hours)
    assert "cost_usd" in d["plans"][0] and "peak_memory_gib" in d["plans"][0]


def test_recommend_table(capsys):
    code, out, _ = run(capsys, "recommend", "--model", "llama-65b", "--gpu", "A100 80GB", "--max-gpus", "1")
    assert code == 0 and "qlora" in out and "physically impossible" in out


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["estimate", "--model", "llama-2-7bb", "--gpu", "4090", "--method", "lora"], "--model"),
        (["estimate", "--model", "llama-2-7b", "--gpu", "4091", "--method", "lora"], "--gpu"),
        (["estimate", "--model", "gpt-4", "--gpu", "4090", "--method", "lora"], "--model"),
        (
            ["estimate", "--model", "llama-2-7b", "--gpu", "4090", "--method", "lora", "--lora-targets", "xyz"],
            "--lora-targets",
        ),
        (["estimate", "--model", "llama-2-7b", "--gpu", "t4", "--method", "lora", "--dtype", "bf16"], "--dtype"),
        (["recommend", "--model", "llama-2-7b", "--objective", "fit"], "--gpu"),
        (["recommend", "--model", "llama-2-7b", "--methods", "adalora"], "--methods"),
        # GPT-2's learned position table ends at 1024: such a step cannot run (a job died with an IndexError)
        (["estimate", "--model", "gpt2", "--gpu", "t4", "--method", "lora", "--seq-len", "2048"], "--seq-len"),
        (["recommend", "--model", "gpt2", "--gpu", "t4", "--seq-len", "4096"], "--seq-len"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(capsys, argv, flag):
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0]


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["estimate", "--model", "llama-2-7b", "--gpu", "4090", "--method", "lora", "--micro-batch", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--micro-batch" in err[0]


def test_suggestions_for_unknown_names(capsys):
    _, _, err = run(capsys, "estimate", "--model", "mistral-7", "--gpu", "a100", "--method", "lora")
    assert "Did you mean" in err and "mistral-7b" in err


def test_models_and_gpus(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "llama-2-70b" in out
    code, out, _ = run(capsys, "gpus", "--json")
    assert any(g["id"] == "rtx-4090" for g in json.loads(out))


# ---- exit codes carry the verdict (0 fits, 1 does not fit or the band crosses, 2 bad input) -----------
from advisor.estimators import uncertainty as unc  # noqa: E402

QLORA_4090 = ["estimate", "--model", "llama-2-7b", "--gpu", "4090", "--method", "qlora", "--micro-batch", "4"]


def wide_band(monkeypatch, p90_pct: float) -> None:
    """Every estimate gets a band of `p90_pct` (the committed table's numbers change as the benches do)."""
    band = unc.ErrorBand(p90_pct, 99, "test band")
    monkeypatch.setattr(unc, "band_for", lambda *a, **k: band)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_estimate_exit_code_is_the_verdict(capsys, monkeypatch, json_flag):
    wide_band(monkeypatch, 10.0)
    code, out, _ = run(capsys, *QLORA_4090, *json_flag)  # ~14 GiB of 24: the whole band fits
    assert code == 0 and ("FITS" in out or json.loads(out)["verdict"] == "fits")
    # full fine-tuning of 7B on a 24 GB card does not fit: exit 1 (it exited 0 before), with --json too
    code, out, _ = run(capsys, "estimate", "--model", "llama-2-7b", "--gpu", "4090", "--method", "full", *json_flag)
    assert code == 1 and ("DOES NOT FIT" in out or json.loads(out)["verdict"] == "does_not_fit")
    # the estimate fits but its band's upper end (14 / (1 - 0.5) = 29 GiB) does not: exit 1
    wide_band(monkeypatch, 50.0)
    code, out, _ = run(capsys, *QLORA_4090, *json_flag)
    if json_flag:
        d = json.loads(out)
        assert d["fits"] is True and d["verdict"] == "band_crosses_limit"
        assert d["peak_memory_band_gib"]["high"] > d["device_memory_gib"] > d["peak_memory_gib"]
    else:
        assert "MAY NOT FIT" in out and "crosses" in out
    assert code == 1
    # bad input: 2
    code, _, err = run(capsys, "estimate", "--model", "llama-2-7bb", "--gpu", "4090", "--method", "lora", *json_flag)
    assert code == 2 and "--model" in err


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_recommend_exit_code_is_1_when_no_plan_fits(capsys, json_flag):
    argv = ["recommend", "--model", "llama-65b", "--gpu", "4090", "--max-gpus", "1", "--methods", "full"]
    code, out, _ = run(capsys, *argv, *json_flag)
    assert code == 1  # "no plan fits" exited 0 before
    assert "no plan fits" in out if not json_flag else json.loads(out)["plans"] == []
    code, _, _ = run(capsys, "recommend", "--model", "llama-2-7b", "--gpu", "a100-80gb", *json_flag)
    assert code == 0


def test_recommend_exit_code_is_1_when_every_plan_may_run_out_of_memory(capsys, monkeypatch):
    wide_band(monkeypatch, 89.0)  # every upper end is 9x its estimate: no plan on one 4090 is safe
    code, out, _ = run(capsys, "recommend", "--model", "llama-2-7b", "--gpu", "4090", "--max-gpus", "1")
    assert code == 1 and "!" in out and "may run out of memory" in out


def test_help_documents_the_exit_codes(capsys):
    for cmd in ("estimate", "recommend"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "exit status: 0" in capsys.readouterr().out


def test_gpu_names_counts_and_ambiguity(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "llama-3-8b", "--gpu", "A100:8", "--method", "lora", "--json")
    d = json.loads(out)
    assert code in (0, 1) and d["gpu"]["id"] == "a100-40gb" and d["plan"]["num_gpus"] == 8
    code, _, err = run(capsys, "estimate", "--model", "llama-3-8b", "--gpu", "RTX 6000", "--method", "lora")
    assert code == 2 and "--gpu" in err and "rtx-6000-ada" in err and "rtx-a6000" in err
    code, _, err = run(
        capsys, "estimate", "--model", "llama-3-8b", "--gpu", "A100:8", "--num-gpus", "2", "--method", "lora"
    )
    assert code == 2 and "To fix" in err
    code, _, err = run(capsys, "estimate", "--model", "llama-3-8b", "--gpu", "80GB+", "--method", "lora")
    assert code == 2 and "h100-sxm" in err


def test_recommend_providers_and_rocm_caveat(capsys):
    code, out, _ = run(
        capsys, "recommend", "--model", "llama-3-8b", "--gpu", "A100", "--provider", "aws", "--dataset-tokens", "20M"
    )
    assert code == 0 and "price a100-40gb: $2.745/GPU-h on-demand at aws (us-east-1)" in out
    code, out, _ = run(capsys, "recommend", "--model", "llama-3-8b", "--gpu", "MI300X", "--dataset-tokens", "20M")
    assert "caveat mi300x: ROCm, not CUDA" in out
    code, out, _ = run(
        capsys,
        "estimate",
        "--model",
        "llama-3-8b",
        "--gpu",
        "mi300x",
        "--method",
        "qlora",
        "--optimizer",
        "paged-adamw-8bit",
    )
    assert "ROCm, not CUDA" in out and "CUDA unified" not in out
    code, _, err = run(capsys, "recommend", "--model", "llama-3-8b", "--provider", "nosuch")
    assert code == 2 and "--provider" in err
