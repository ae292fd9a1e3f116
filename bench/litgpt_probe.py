"""Analytical litgpt memory counts against litgpt's own code: one LoRA step of tiny real litgpt models on CPU.

    pip install --no-deps litgpt==0.4.13 lightning==2.4.0 lightning-utilities torchmetrics jsonargparse
    python -m bench.litgpt_probe        # writes bench/results/litgpt_probe.{json,md}

litgpt is not a dependency of the project (its install pulls Lightning): without it the bench says so and
exits 2. Each case builds ``litgpt.lora.GPT`` from a small Config (random weights, fp32, CPU), runs the
training step of litgpt 0.4.13's finetune/lora.py (``lm_head_chunk_size=128``, ``chunked_cross_entropy``)
and meters the live tensor bytes (``advisor.stack.meters.LiveTensorMeter``, the meter of the CPU truth
bench) through forward and backward. The analytical figure is the allocated peak of the same plan with
``framework="litgpt"`` on a CPU, less the optimiser states (not created before the first step).
The published litgpt rows (bench/results/accuracy.md) are scored with these counts.
"""

import json
import sys
from pathlib import Path

import torch

try:
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
    from litgpt.utils import chunked_cross_entropy
except ImportError:  # pragma: no cover - optional tool
    GPT = None

from advisor.catalog import model_from_config
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import TrainingPlan
from advisor.stack.meters import LiveTensorMeter

OUT = Path(__file__).resolve().parent / "results"
EST = AnalyticalEstimator()
ROWS: list[dict] = []


def run(name, cfg_kw, hf, B=2, T=256, targets=("q", "v"), dropout=0.05, mlp=False, head=False, proj=False):
    """One case: litgpt Config kwargs `cfg_kw` and the same architecture as a Hugging Face config dict `hf`."""
    cfg = Config(
        lora_r=8,
        lora_alpha=16,
        lora_dropout=dropout,
        lora_query="q" in targets,
        lora_key="k" in targets,
        lora_value="v" in targets,
        lora_projection=proj,
        lora_mlp=mlp,
        lora_head=head,
        **cfg_kw,
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    model.max_seq_length = T
    mark_only_lora_as_trainable(model)
    x = torch.randint(0, cfg.padded_vocab_size, (B, T))
    y = torch.randint(0, cfg.padded_vocab_size, (B, T))
    meter = LiveTensorMeter()
    meter.track_module(model)
    meter.reset_peak()
    with meter:
        logits = model(x, lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        loss = chunked_cross_entropy(logits, y[..., 1:])
        loss.backward()
    params = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    measured = meter.peak_bytes
    spec = model_from_config(hf, name)
    lt = []
    if mlp:
        lt += ["gate", "up", "down"]
    if proj:
        lt += ["o"]
    plan = TrainingPlan(
        method="lora",
        gpu_id="cpu",
        dtype="fp32",
        micro_batch=B,
        seq_len=T,
        grad_checkpointing=False,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=dropout,
        lora_targets=tuple(targets) + tuple(lt) + (("lm_head",) if head else ()),
        framework="litgpt",
        chunked_loss=True,
    )
    t = EST.plan_terms(spec, plan, cpu=True)
    ours = t.allocated - t.terms["optimizer_states"]
    tok = B * T
    L = cfg.n_layer
    ROWS.append(
        {
            "case": name,
            "micro_batch": B,
            "seq_len": T,
            "lora_targets": list(plan.lora_targets),
            "lora_dropout": dropout,
            "measured_bytes": measured,
            "analytical_bytes": ours,
            "error_pct": round(100 * (ours - measured) / measured, 2),
        }
    )
    print(
        f"{name:10s} measured {measured / 2**20:8.2f} MiB  params+buf {params / 2**20:7.2f}  ours {ours / 2**20:8.2f}"
        f"  diff/tok/L/h {(measured - ours) / tok / L / cfg.n_embd:6.2f}  (logits {t.terms['logits'] / 2**20:.1f}, "
        f"act {t.terms['activations'] / 2**20:.1f}, weights {t.terms['weights'] / 2**20:.1f})",
        flush=True,
    )


def main() -> int:
    if GPT is None:
        print("litgpt is not installed: pip install --no-deps litgpt==0.4.13 lightning==2.4.0 (see the docstring)")
        return 2
    torch.set_num_threads(1)
    h, L, V = 256, 4, 1024
    llama = dict(
        n_embd=h,
        n_layer=L,
        n_head=8,
        n_query_groups=8,
        intermediate_size=688,
        vocab_size=V,
        padded_vocab_size=V,
        block_size=1024,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        parallel_residual=False,
        rotary_percentage=1.0,
    )
    hf_llama = dict(
        model_type="llama",
        hidden_size=h,
        num_hidden_layers=L,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=688,
        vocab_size=V,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    run("llama-mha", llama, hf_llama)
    run("llama-mha0", llama, hf_llama, dropout=0.0)
    run("llama-gqa", {**llama, "n_query_groups": 2}, {**hf_llama, "num_key_value_heads": 2})
    run("llama-all", llama, hf_llama, targets=("q", "k", "v"), mlp=True, proj=True)
    run("llama-B4", llama, hf_llama, B=4)
    run("bigvocab", {**llama, "vocab_size": 8192, "padded_vocab_size": 8192}, {**hf_llama, "vocab_size": 8192})
    phi = dict(
        n_embd=h,
        n_layer=L,
        n_head=8,
        n_query_groups=8,
        intermediate_size=4 * h,
        vocab_size=V,
        padded_vocab_size=V,
        block_size=1024,
        bias=True,
        lm_head_bias=True,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        gelu_approximate="tanh",
        parallel_residual=True,
        shared_attention_norm=True,
        rotary_percentage=0.5,
    )
    hf_phi = dict(
        model_type="phi",
        hidden_size=h,
        num_hidden_layers=L,
        num_attention_heads=8,
        intermediate_size=4 * h,
        vocab_size=V,
        max_position_embeddings=1024,
        partial_rotary_factor=0.5,
        hidden_act="gelu_new",
        tie_word_embeddings=False,
    )
    run("phi", phi, hf_phi)
    gem = dict(
        n_embd=h,
        n_layer=L,
        n_head=4,
        head_size=64,
        n_query_groups=1,
        intermediate_size=4 * h,
        vocab_size=V,
        padded_vocab_size=V,
        block_size=1024,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=1e-6,
        mlp_class_name="GemmaMLP",
        gelu_approximate="tanh",
        parallel_residual=False,
        rotary_percentage=1.0,
        scale_embeddings=True,
        name="Gemma-probe",
    )
    hf_gem = dict(
        model_type="gemma",
        hidden_size=h,
        num_hidden_layers=L,
        num_attention_heads=4,
        head_dim=64,
        num_key_value_heads=1,
        intermediate_size=4 * h,
        vocab_size=V,
        max_position_embeddings=1024,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    )
    run("gemma", gem, hf_gem)
    run("gemma-all", gem, hf_gem, targets=("q", "k", "v"), mlp=True, proj=True)
    errs = sorted(abs(r["error_pct"]) for r in ROWS)
    res = {
        "command": "python -m bench.litgpt_probe",
        "litgpt": _version(),
        "median_abs_pct": errs[len(errs) // 2],
        "worst_abs_pct": errs[-1],
        "rows": ROWS,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "litgpt_probe.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        "# Analytical litgpt counts vs litgpt's own code (one LoRA step, fp32, CPU)",
        "",
        f"`python -m bench.litgpt_probe` (litgpt {res['litgpt']}): median |error| {res['median_abs_pct']}%, "
        f"worst {res['worst_abs_pct']}% over {len(ROWS)} cases (4-layer models: the first block, whose input "
        "does not require grad, saves less; that is 1/4 of the layers here, 1/24 or less at real depth).",
        "",
        "| case | mb x seq | targets | measured MiB | analytical MiB | error % |",
        "|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        lines.append(
            f"| {r['case']} | {r['micro_batch']}x{r['seq_len']} | {','.join(r['lora_targets'])} | "
            f"{r['measured_bytes'] / 2**20:.2f} | {r['analytical_bytes'] / 2**20:.2f} | {r['error_pct']:+} |"
        )
    (OUT / "litgpt_probe.md").write_text("\n".join(lines) + "\n")
    return 0


def _version() -> str:
    from importlib.metadata import version

    return version("litgpt")


if __name__ == "__main__":
    sys.exit(main())
