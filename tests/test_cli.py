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
    hours = [p["hours"] for p in d["plans"]]
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
