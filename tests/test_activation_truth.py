"""The structural activation count against the bytes autograd really saves in transformers' Llama.

A tiny random-initialised Llama, float32 (this CPU has no fast bf16): the difference between a 3-block
and a 1-block model isolates the per-block saved bytes, which must match the analytical count.
"""

import weakref

import pytest

from advisor.catalog import model_from_config
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import TrainingPlan

pytestmark = pytest.mark.needs_torch

CASES = [
    dict(method="lora", lora_targets=("q", "v"), lora_dropout=0.0),
    dict(method="lora", lora_targets=("all-linear",), lora_dropout=0.0),
    dict(method="lora", lora_targets=("q", "v"), lora_dropout=0.1),
    dict(method="full"),
    dict(method="lora", lora_targets=("q", "k", "v", "o"), lora_dropout=0.0, attention="eager"),
    # DoRA (peft use_dora): the scaled base and LoRA outputs kept for the magnitude's gradient; with
    # dropout the second base matmul's input is the dropout output LoRA already keeps
    dict(method="dora", lora_targets=("q", "v"), lora_dropout=0.0),
    dict(method="dora", lora_targets=("all-linear",), lora_dropout=0.1),
]


def _saved_bytes(cfg_kw: dict, layers: int, plan: TrainingPlan, b: int, s: int) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**cfg_kw, num_hidden_layers=layers, attn_implementation=plan.attention)
    model = LlamaForCausalLM(cfg)
    if plan.method in ("lora", "dora"):
        from advisor.plans import resolve_targets

        spec = model_from_config(cfg.to_dict())
        targets = sorted(resolve_targets(spec, plan.lora_targets))
        config = LoraConfig(
            r=plan.lora_r, target_modules=targets, lora_dropout=plan.lora_dropout, use_dora=plan.method == "dora"
        )
        model = get_peft_model(model, config)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: list = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen.append(weakref.ref(t))
        return t

    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    # what is still saved once forward is over (a graph forward built and dropped, as DoRA's
    # lora_weight from the identity, is not alive at the backward peak)
    alive = {}
    for ref in seen:
        t = ref()
        if t is not None:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    return sum(alive.values())


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_block_activation_bytes_match_transformers(kw):
    cfg_kw = dict(
        hidden_size=128,
        intermediate_size=352,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
    )
    b, s = 2, 64
    plan = TrainingPlan(gpu_id="cpu", dtype="fp32", micro_batch=b, seq_len=s, grad_checkpointing=False, lora_r=8, **kw)
    measured = (_saved_bytes(cfg_kw, 3, plan, b, s) - _saved_bytes(cfg_kw, 1, plan, b, s)) / 2
    est = AnalyticalEstimator()
    spec3 = model_from_config({"model_type": "llama", **cfg_kw, "num_hidden_layers": 3})
    spec1 = model_from_config({"model_type": "llama", **cfg_kw, "num_hidden_layers": 1})
    predicted = (est.activation_bytes(spec3, plan, cpu=True) - est.activation_bytes(spec1, plan, cpu=True)) / 2
    assert predicted == pytest.approx(measured, rel=0.03), (predicted, measured)
