"""Counts the activation bytes autograd saves per transformer block in the real transformers code.

Why: the analytical estimator's activation coefficients are not folklore numbers, they are what
this probe counts (saved tensors, each storage once, parameters excluded) for Llama-format blocks,
solved exactly for the per-token coefficients of hidden, intermediate and KV width and the
per-head s^2 term of eager attention. Re-run it when transformers changes its attention code:

    python -m calibration.activation_probe            # prints a JSON table of coefficients
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import torch

TARGET_SETS = {
    "none": (),
    "q,v": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def saved_bytes(h, i, nh, nkv, layers, s, b, dtype, attn, method, targets, checkpointing=False) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=i,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        num_hidden_layers=layers,
        vocab_size=256,
        max_position_embeddings=4096,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=list(targets) or ["lm_head"]))
        if checkpointing:
            model.enable_input_require_grads()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, 256, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


def per_block(**kw) -> float:
    return (saved_bytes(layers=3, **kw) - saved_bytes(layers=1, **kw)) / 2


def fit(dtype, attn, method, targets) -> dict[str, float]:
    rows, ys = [], []
    for (h, nh), i, nkv_div, s, b in itertools.product(
        ((128, 2), (256, 4), (256, 8)), (256, 512), (1, 2), (32, 64), (1, 2)
    ):
        nkv = nh // nkv_div
        kv = nkv * (h // nh)
        t = b * s
        rows.append([t * h, t * i, t * kv, b * nh * s * s, t])
        ys.append(per_block(h=h, i=i, nh=nh, nkv=nkv, s=s, b=b, dtype=dtype, attn=attn, method=method, targets=targets))
    coef, *_ = np.linalg.lstsq(np.array(rows, float), np.array(ys, float), rcond=None)
    pred = np.array(rows, float) @ coef
    err = float(np.max(np.abs(pred - ys) / np.maximum(ys, 1)))
    return {
        "h": round(coef[0], 3),
        "i": round(coef[1], 3),
        "kv": round(coef[2], 3),
        "s2_per_head": round(coef[3], 3),
        "per_token": round(coef[4], 3),
        "max_rel_err": round(err, 4),
    }


def main() -> None:
    torch.manual_seed(0)
    out = {"torch": torch.__version__}
    import transformers

    out["transformers"] = transformers.__version__
    table = {}
    for dname, dtype in (("fp32", torch.float32), ("half", torch.bfloat16)):
        for attn in ("sdpa", "eager"):
            for method, tset in [("full", "none")] + [("lora", k) for k in TARGET_SETS if k != "none"]:
                key = f"{dname}/{attn}/{method}/{tset}"
                table[key] = fit(dtype, attn, method, TARGET_SETS[tset])
                print(key, table[key], file=sys.stderr, flush=True)
    out["coefficients_bytes_per_token_per_block"] = table
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
