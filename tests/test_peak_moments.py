"""The moments of a training step the analytical model had wrong, each against the trace of transformers' own class.

Each case is a small Llama (fake tensors: seconds) shaped so that the moment in question is the step's peak, as in
the families referee row it was found on (bench/results/simulated_referee_families.md):

* full fine-tuning with checkpointing: the first block is back-propagated last, with every later block's gradient
  (and the head's) alive and the later blocks' checkpointed inputs freed (row 3: -12.8% while counted at the last
  block, without gradients);
* full fine-tuning of an untied head under AMP with gradient accumulation: the head's backward casts its half weight
  gradient to fp32 beside the accumulated gradients (row 40: -10.6%);
* eager attention under LoRA without o: the attention output is an ordinary matmul's, and the frozen o_proj saves
  its weight, not its input (row 28: +4.1% while the output was counted as saved);
* DoRA on the dropout path with fp32 adapters over half weights: the cast base weight of a layer's weight norm is the
  weight that layer's F.linear saves, counted once (rows 18, 104, 152: +2..+5% while counted twice);
* eager attention with checkpointing: the b x s x s mask is a saved input of every checkpointed layer, alive at the
  loss's moment (row 99: -4.1% without it);
* LoRA with dropout and checkpointing: the recomputed down projection's moment holds its unsaved input, that input's
  fp32 cast, the base output, lora_B's output and its scaled copy, and the later blocks' (and the head's) adapter
  gradients, the later blocks' checkpointed inputs freed (row 148, OLMo-3 r=128: -6.1% with the first two only);
* DoRA on the MLP with dropout, no checkpointing: the first layer's gate and up read an input that needs no gradient,
  so they save neither their dropout masks nor their fp32 base weights; the last layer's down projection weight norm
  comes before its own outputs, the norm after it and the final norm exist, beside the MLP product, its fp32 cast,
  peft's base output and the layer's and model's locals (families referee rows 18, 73, 153: +3.75%, -2.37% before);
* checkpointing: the final norm's saved tensors are freed by its backward, before any block is recomputed; a gated
  MLP's product backward holds three i-wide gradients once the down projection's backward has freed what it saved, and
  no dequantised weight (QLoRA) is alive then (rows 4, 47 and their Llama twins: +4.3%, -4.0%); the recomputation runs
  inside the backward of the block's last saved tensor, with the gradients made so far (random referee rows 177, 190);
  EXAONE-4's post-norm block starts its backward with the norm after the MLP (rows 180, 189);
* EXAONE-4's post-norm layer has freed both norms' saved tensors when eager attention back-propagates its softmax, and
  (checkpointing) q/k/v read the checkpointed input itself (row 198: +3.68%);
* DoRA on the head: its forward's output moment (weight-norm locals, vocab-wide products) or, against few tokens, its
  weight norm beside peft's base output and the input's cast (rows 145, 126: -2.97%, -2.44%);
* the first layer of an adapted model without checkpointing: a frozen k_proj's q/k-norm saves nothing (row 131:
  +2.35%); Phi-3's fused gate_up output without checkpointing (row 48: -2.77%); its fused qkv output is freed where
  eager attention repeats k/v (row 32: +2.08%);
* bitsandbytes' paged optimisers page only tensors of at least 1e5 elements and its 8-bit ones keep fp32 states for
  tensors under 4096: small adapters' states are on the device (rows 121, 124: -2.7%, -4.4% while all were paged).

The pure checks (no torch) pin the terms to their physical counts; the traced ones hold the estimate within 2% of
the trace, where each was 4-13% off.
"""

from dataclasses import replace

import pytest

from advisor.catalog import default_catalog, model_from_config
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import TrainingPlan
from advisor.units import MIB

LLAMA = dict(
    model_type="llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, vocab_size=4000, tie_word_embeddings=False, pad_token_id=None,
    eos_token_id=None, bos_token_id=None,
)  # fmt: skip

EXAONE = dict(
    model_type="exaone4", hidden_size=1024, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, head_dim=128, vocab_size=1500, tie_word_embeddings=True, sliding_window=None,
    layer_types=["full_attention"] * 2, pad_token_id=None, eos_token_id=None, bos_token_id=None,
)  # fmt: skip

CASES = {
    # block parameters (4.2M) outweigh a block's input (1024 x 512): the first block's moment is the peak
    "first_block_gradients": (
        dict(LLAMA),
        dict(method="full", dtype="bf16", master_weights=False, micro_batch=1, seq_len=1024, grad_checkpointing=True,
             attention="eager", optimizer="adamw"),
    ),
    # a 32k x 512 head over 64 tokens: its gradient, not the logits, is the step's largest tensor
    "head_gradient_cast": (
        dict(LLAMA, num_hidden_layers=1, vocab_size=32000),
        dict(method="full", dtype="bf16", master_weights=True, micro_batch=1, seq_len=64, grad_checkpointing=False,
             attention="sdpa", optimizer="adamw-8bit", grad_accum=2),
    ),
    "eager_frozen_o": (
        dict(LLAMA, num_hidden_layers=4, hidden_size=256, intermediate_size=768, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, vocab_size=1000),
        dict(method="lora", dtype="fp32", micro_batch=2, seq_len=512, grad_checkpointing=False, attention="eager",
             lora_targets=("gate", "up", "down"), lora_r=16, lora_dropout=0.0),
    ),
    # one layer whose down projection is 8192 wide in: its weight norm (identity 8192^2 fp32) is the peak
    "dora_cast_weight": (
        dict(LLAMA, num_hidden_layers=1, hidden_size=1024, intermediate_size=8192, num_attention_heads=8,
             num_key_value_heads=8, head_dim=128, vocab_size=1000),
        dict(method="dora", dtype="bf16", micro_batch=2, seq_len=128, grad_checkpointing=False, attention="sdpa",
             lora_targets=("all-linear",), lora_r=16, lora_dropout=0.1),
    ),
    # a long sequence over a narrow model: the loss's moment is the peak, with the eager mask checkpointing holds
    "eager_mask_at_the_loss": (
        dict(LLAMA, num_hidden_layers=2, hidden_size=128, intermediate_size=384, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, vocab_size=8000),
        dict(method="lora", dtype="bf16", micro_batch=1, seq_len=2048, grad_checkpointing=True, attention="eager",
             lora_targets=("o", "down"), lora_r=8, lora_dropout=0.05),
    ),
    # a wide rank on every linear and the head, dropout, checkpointing: block 0's recomputed down projection is the peak
    "lora_down_moment": (
        dict(LLAMA, num_hidden_layers=3),
        dict(method="lora", dtype="bf16", micro_batch=8, seq_len=232, grad_checkpointing=True, attention="sdpa",
             lora_targets=("all-linear", "lm_head"), lora_r=128, lora_alpha=256, lora_dropout=0.05),
    ),
    # DoRA on the MLP with dropout, no checkpointing: the last layer's down projection weight norm is the peak
    "dora_mlp_no_checkpointing": (
        dict(LLAMA, num_hidden_layers=3, hidden_size=1024, intermediate_size=2752, num_attention_heads=8,
             num_key_value_heads=8, head_dim=128),
        dict(method="dora", dtype="bf16", micro_batch=4, seq_len=208, grad_checkpointing=False, attention="eager",
             lora_targets=("gate", "up", "down"), lora_r=8, lora_dropout=0.1),
    ),
    # DoRA on q and v only, checkpointed: the gated product's backward (three i-wide gradients) is the block's moment
    "mlp_product_backward": (
        dict(LLAMA, num_hidden_layers=6, hidden_size=256, intermediate_size=1664, num_attention_heads=8,
             num_key_value_heads=1, head_dim=32, vocab_size=2000),
        dict(method="dora", dtype="bf16", micro_batch=8, seq_len=176, grad_checkpointing=True, attention="eager",
             lora_targets=("q", "v"), lora_r=32, lora_dropout=0.0),
    ),
    # QLoRA checkpointed: the product's backward comes between the MLP's linears, no dequantised weight alive
    "qlora_product_backward": (
        dict(LLAMA, num_hidden_layers=5, hidden_size=1024, intermediate_size=2688, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128, vocab_size=2580),
        dict(method="qlora", dtype="bf16", micro_batch=4, seq_len=264, grad_checkpointing=True, attention="eager",
             lora_targets=("all-linear",), lora_r=4, lora_dropout=0.0, grad_accum=4),
    ),
    # EXAONE-4 fp32 full fine-tuning, eager, checkpointed: the softmax backward of a post-norm layer is the peak
    "exaone_eager_post_norm": (
        dict(EXAONE, num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1000, layer_types=["full_attention"] * 2),
        dict(method="full", dtype="fp32", micro_batch=2, seq_len=1024, grad_checkpointing=True, attention="eager",
             optimizer="adamw"),
    ),
    # DoRA on the head of an 8000-entry vocabulary over 256 tokens: the head's own forward, at its output, is the peak
    "dora_head_forward": (
        dict(LLAMA, num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=8000),
        dict(method="dora", dtype="bf16", micro_batch=1, seq_len=256, grad_checkpointing=True, attention="sdpa",
             lora_targets=("all-linear", "lm_head"), lora_r=16, lora_dropout=0.0),
    ),
    # OLMo-2, LoRA on q and v, no checkpointing, a 6000-entry vocabulary: the loss's moment, every layer's saved tensors
    "olmo2_frozen_k_norm": (
        dict(LLAMA, model_type="olmo2", num_hidden_layers=2, hidden_size=512, intermediate_size=1024,
             num_attention_heads=16, num_key_value_heads=16, head_dim=128, vocab_size=6000),
        dict(method="lora", dtype="bf16", micro_batch=1, seq_len=2048, grad_checkpointing=False, attention="sdpa",
             lora_targets=("q", "v"), lora_r=16, lora_dropout=0.1),
    ),
    # Phi-3 (fused gate_up), LoRA fp16 without checkpointing: the last layer's gate_up output is the peak
    "fused_gate_up_output": (
        dict(LLAMA, model_type="phi3", num_hidden_layers=2, hidden_size=512, intermediate_size=2048,
             num_attention_heads=8, num_key_value_heads=8, head_dim=64, vocab_size=1000),
        dict(method="lora", dtype="fp16", micro_batch=1, seq_len=1024, grad_checkpointing=False, attention="sdpa",
             lora_targets=("all-linear",), lora_r=8, lora_dropout=0.0),
    ),
    # Phi-3 eager with 2 kv heads of 8, six layers, no checkpointing: the loss's moment over every layer's saved tensors
    "eager_gqa_fused_qkv": (
        dict(LLAMA, model_type="phi3", num_hidden_layers=6, hidden_size=512, intermediate_size=1024,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=2000),
        dict(method="lora", dtype="fp32", micro_batch=2, seq_len=256, grad_checkpointing=False, attention="eager",
             lora_targets=("all-linear",), lora_r=8, lora_dropout=0.0),
    ),
    # r=8 on 256-wide layers: every adapter tensor is under bitsandbytes' paging limit
    "paged_small_adapters": (
        dict(LLAMA, num_hidden_layers=4, hidden_size=256, intermediate_size=768, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=2000),
        dict(method="qlora", dtype="fp16", micro_batch=1, seq_len=256, grad_checkpointing=True, attention="sdpa",
             optimizer="paged-adamw-32bit", lora_targets=("all-linear",), lora_r=8, lora_dropout=0.05),
    ),
}  # fmt: skip


def _case(name: str):
    cfg, fields = CASES[name]
    return model_from_config(dict(cfg)), TrainingPlan(gpu_id="h100-80gb", **fields)


def test_first_block_moment_holds_the_later_blocks_gradients():
    """bf16 full fine-tuning, no AMP: gradients are parameter-sized, in bf16. At block 0's backward: all but block 0's
    own (less its down projection, already back-propagated) and the untied embedding's; freed: 5 later checkpointed
    inputs (bf16); the final norm's fp32 upcast + output are taken off every checkpointed block moment (not here)."""
    model, plan = _case("first_block_gradients")
    ana = AnalyticalEstimator()
    grads = ana.plan_terms(model, plan).terms["gradients"]
    assert grads == 2 * model.param_count
    block = 2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 2048 + 2 * 512  # q, o; k, v; gate, up, down; two norms
    later = model.param_count - (block - 512 * 2048) - 4000 * 512
    freed = 1024 * 512 * 5 * 2  # (the final norm's: taken off every checkpointed block moment, not here)
    assert ana.first_block_moment_gain(model, plan, grads) == pytest.approx(2 * later - freed)
    # eager attention's backward (8 heads x 1024^2 scores) is the block's moment: o and the MLP are done by then
    at_attention = later + 512 * 512 + 2 * 512 * 2048
    assert ana.first_block_moment_gain(model, plan, grads, True) == pytest.approx(2 * at_attention - freed)
    assert ana.plan_terms(model, plan).components["gradients"] == pytest.approx(2 * at_attention - freed, abs=1)
    # with accumulation every gradient is counted already; long sequences: the inputs outweigh the gradients
    assert ana.plan_terms(model, replace(plan, grad_accum=2)).components["gradients"] == grads
    assert ana.first_block_moment_gain(model, replace(plan, seq_len=65536), grads) == 0


def test_head_gradient_moment_is_the_half_gradient_and_its_fp32_cast():
    model, plan = _case("head_gradient_cast")
    ana = AnalyticalEstimator()
    head = 32000 * 512
    assert ana.head_gradient_bytes(model, plan) == head * (2 + 4)
    pure_half = replace(plan, master_weights=False)
    assert ana.head_gradient_bytes(model, pure_half) == head * 2
    lora = replace(plan, method="lora")
    terms = ana.plan_terms(model, lora)
    assert terms.components["gradients"] < head  # adapters: the frozen head writes no weight gradient
    tied = model_from_config(dict(CASES["head_gradient_cast"][0], tie_word_embeddings=True))
    assert ana.head_gradient_bytes(tied, plan) == 0  # (a tied head is left as counted: not checked on a trace)
    pt = ana.plan_terms(model, plan)
    # the peak: accumulated gradients + the head's two copies, the head's half autocast copy freed
    assert pt.components["gradients"] == pytest.approx(pt.terms["gradients"] + head * 6, abs=1)


def test_eager_attention_output_is_saved_only_for_a_trained_o_proj():
    model, plan = _case("eager_frozen_o")
    ana = AnalyticalEstimator()
    with_o = replace(plan, lora_targets=("o", "gate", "up", "down"))
    sdpa = replace(plan, attention="sdpa")
    sdpa_o = replace(with_o, attention="sdpa")
    tokens, q, e = 2 * 512, 16 * 64, 4

    def act(p):
        return ana.plan_terms(model, p).terms["activations"]

    # adding o's adapter adds its own LoRA tensors under both attentions; under eager it also makes o_proj's input
    # (the attention output, q wide) saved, by lora_A, in each layer but the first (whose attention needs no gradient:
    # nothing before it trains); under SDPA the kernel saves that output anyway
    assert (act(with_o) - act(plan)) - (act(sdpa_o) - act(sdpa)) == pytest.approx(3 * tokens * q * e)
    # with dropout lora_A saves the dropped copy (counted with the adapter), not the output itself
    drop, drop_o = replace(plan, lora_dropout=0.1), replace(with_o, lora_dropout=0.1)
    sdpa_drop, sdpa_drop_o = replace(sdpa, lora_dropout=0.1), replace(sdpa_o, lora_dropout=0.1)
    assert (act(drop_o) - act(drop)) - (act(sdpa_drop_o) - act(sdpa_drop)) == pytest.approx(0)


def test_dora_cast_weight_is_counted_once():
    """fp32 adapters over bf16 weights, dropout on: the down projection's weight norm makes identity, image,
    lora_weight, the fp32 cast of the base weight, the scaled product and the sum; the cast is what its F.linear on
    the dropout path saves, in the block's count already."""
    from advisor.methods import get_method

    model, plan = _case("dora_cast_weight")
    m = get_method("dora")
    down = next(lin for b in model.blocks for lin in b.linears if lin.name.endswith("down_proj"))
    assert m.adapted_layer_saved_constant(down, plan, 2, 4) == 1024 * 8192 * 4
    raw = m.forward_temporaries(model, plan, [down], 2)
    assert raw == 8192 * (8192 + 16) * 4 + 4 * 1024 * 8192 * 4
    ana = AnalyticalEstimator()
    pt = ana.plan_terms(model, plan)
    # (beside the moment's own tensors: the layer's unsaved locals, less what it has not made yet; see below)
    assert pt.components["adapter_temporaries"] <= raw - 1024 * 8192 * 4 + ana.down_weight_norm_moment_bytes(
        model, plan, down
    )


@pytest.mark.needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_moment_matches_the_trace(tmp_path, name):
    pytest.importorskip("transformers")
    from advisor.simulated import SimulatedEstimator

    model, plan = _case(name)
    gpu = default_catalog().gpu(plan.gpu_id)
    ana = AnalyticalEstimator().estimate(model, gpu, plan).memory.allocated_peak_bytes
    sim = SimulatedEstimator(cache_dir=tmp_path).estimate(model, gpu, plan).memory.allocated_peak_bytes
    assert abs(ana - sim) <= 0.02 * sim, (name, ana / MIB, sim / MIB, f"{100 * (ana - sim) / sim:+.2f}%")


def test_checkpointing_holds_the_eager_mask_at_the_loss():
    model, plan = _case("eager_mask_at_the_loss")
    ana = AnalyticalEstimator()
    mask = ana.eager_mask_bytes(model, plan)
    assert mask == 2048 * 2048 * 2  # one (1, 1, s, s) bf16 mask
    pt = ana.plan_terms(model, plan)
    assert pt.components["logits"] > 0  # the loss's moment is the peak
    assert pt.components["activations"] == pytest.approx(pt.terms["activations"] + mask, abs=1)
    # without checkpointing no layer keeps it (the mask add saves nothing): freed with the forward
    no_ckpt = ana.plan_terms(model, replace(plan, grad_checkpointing=False))
    assert no_ckpt.components["activations"] == pytest.approx(no_ckpt.terms["activations"], abs=1)


def test_lora_down_projection_moment_holds_its_output_temporaries():
    """peft's ``result + lora_B(lora_A(dropout(x))) * scaling`` on the down projection (bf16 base, fp32 adapters): the
    MLP product (unsaved), its fp32 cast, the base output and the decoder layer's residual and MLP input; where the
    forward runs on past it, lora_B's output and its scaled copy too. Checkpointing's recomputation of a pre-norm
    layer stops at lora_B's packing of its input (the block's last saved tensor): neither of those two exists."""
    from advisor.methods import get_method

    model, plan = _case("lora_down_moment")
    m = get_method("lora")
    lins = list(model.blocks[0].linears)
    down = next(lin for lin in lins if "down" in lin.roles)
    tokens, h, i = 8 * 232, 512, 2048
    locals_ = 2 * 2 * h  # the residual and the post-attention norm's output (bf16)
    pending = 2 * h + (2 + 4) * h  # the gradients made before the recomputation: block output's, the LoRA branch's
    assert m.input_cast_temporaries(model, plan, [down], 2) == tokens * ((2 + 4) * i + 2 * h + locals_ + pending)
    no_ckpt = replace(plan, grad_checkpointing=False)
    assert m.input_cast_temporaries(model, no_ckpt, [down], 2) == tokens * ((2 + 4) * i + (2 + 2 * 4) * h + locals_)
    # post-norm (OLMo-2/3): the norm after the MLP saves on, and the MLP reads the residual itself
    olmo = model_from_config(dict(CASES["lora_down_moment"][0], model_type="olmo3", sliding_window=None))
    down_o = next(lin for lin in olmo.blocks[0].linears if "down" in lin.roles)
    assert m.input_cast_temporaries(olmo, plan, [down_o], 2) == tokens * ((2 + 4) * i + (2 + 2 * 4) * h + 2 * h)
    up = next(lin for lin in lins if "up" in lin.roles)
    assert m.input_cast_temporaries(model, plan, [up], 2) == tokens * (2 + 4) * h
    assert m.input_cast_temporaries(model, replace(plan, lora_dropout=0.0), [down], 2) == 0  # no cast: lora_A saves x
    # DoRA stops at mag_norm_scale * lora_result: the first product and the weight norm's identity, image, lora_weight
    dora = get_method("dora")
    # (and its pending gradients: the block output's, the branch's in bf16 and fp32, scaled by the magnitude scale)
    expected = tokens * ((2 + 4) * i + (2 + 4) * h + locals_ + 2 * h + (2 + 2 * 4) * h) + 4 * i * (i + 128 + h)
    assert dora.input_cast_temporaries(model, replace(plan, method="dora"), [down], 2) == expected


def test_adapter_gradients_of_the_later_blocks_at_the_first_block():
    model, plan = _case("lora_down_moment")
    ana = AnalyticalEstimator()
    _, groups = ana.adapters(model, plan)
    r, h, v = 128, 512, 4000
    block = r * (2 * (512 + 512) + 2 * (512 + 128) + 3 * (512 + 2048))  # q, o; k, v; gate, up, down
    head = r * (h + v)
    tokens = 8 * 232
    later = 4 * 2 * block - 2 * tokens * h * 2  # two later blocks' fp32 gradients less their bf16 inputs
    assert ana.adapter_first_block_moment_gain(model, plan, groups, 4) == pytest.approx(4 * head + later)
    pt = ana.plan_terms(model, plan)
    assert pt.components["gradients"] == pytest.approx(4 * head + later, abs=1)
    # with accumulation every gradient is counted already
    assert ana.plan_terms(model, replace(plan, grad_accum=2)).components["gradients"] == pt.terms["gradients"]


def test_bitsandbytes_states_by_tensor_size():
    model, plan = _case("paged_small_adapters")
    ana = AnalyticalEstimator()
    pt = ana.plan_terms(model, plan)
    adapters = pt.terms["adapters"] / 4  # fp32 adapter parameters: every tensor under 1e5 elements, none paged
    assert pt.terms["optimizer_states"] == pytest.approx(8 * adapters)
    assert pt.paged == 0
    # 8-bit: tensors of at least 4096 elements (lora_B of the MLP: 768 x 8) get uint8 states and fp32 absmax
    eight = ana.plan_terms(model, replace(plan, optimizer="adamw-8bit")).terms["optimizer_states"]
    assert eight < 8 * adapters
    # a large rank on a wide layer: its tensors are paged, the absmax of the 8-bit ones stays on the device
    wide = model_from_config(dict(CASES["paged_small_adapters"][0], hidden_size=4096, intermediate_size=8192,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128))  # fmt: skip
    big = ana.plan_terms(wide, replace(plan, lora_r=64, optimizer="paged-adamw-8bit"))
    assert big.paged > 0 and 0 < big.terms["optimizer_states"] < big.paged


def test_forward_temporaries_without_checkpointing_come_before_the_final_norm():
    """Without checkpointing a block's weight norm (DoRA) runs in forward, before the final norm has run: the norm's
    saved fp32 upcast and output (tokens x h x (4 + e)) are not alive at that moment (families referee row 153, OLMo-3
    DoRA on the MLP: nothing of the final norm alive at the last block's down projection weight norm)."""
    from advisor.methods import get_method

    model, plan = _case("dora_cast_weight")
    ana = AnalyticalEstimator()
    m = get_method("dora")
    down = next(lin for b in model.blocks for lin in b.linears if lin.name.endswith("down_proj"))
    norm = 2 * 128 * 1024 * (4 + 2)
    assert ana.final_norm_saved_bytes(model, plan) == norm
    moment = m.forward_temporaries(model, plan, [down], 2) - m.adapted_layer_saved_constant(down, plan, 2, 4)
    moment += ana.down_weight_norm_moment_bytes(model, plan, down)
    pt = ana.plan_terms(model, plan)
    assert pt.components["adapter_temporaries"] == pytest.approx(moment - norm, abs=1)
    assert pt.allocated == pytest.approx(pt.static + pt.terms["activations"] + moment - norm, abs=2)


def test_first_layer_adapters_before_any_gradient_save_no_mask_and_no_cast_weight():
    """The first layer's input needs no gradient (adapters, no checkpointing): gate and up read the MLP input, which
    needs one only when an attention linear is adapted. Their dropout masks (1 byte per input feature) and DoRA's fp32
    base weights are not saved; down's input (gate and up are adapted) needs a gradient: both kept."""
    model, plan = _case("dora_mlp_no_checkpointing")
    ana = AnalyticalEstimator()
    lins = list(model.blocks[0].linears)
    mlp = [lin for lin in lins if set(lin.roles) & {"gate", "up", "down"}]
    tokens, h, i = 4 * 208, 1024, 2752
    cast_weight = 4 * h * i
    assert ana.first_block_unsaved_adapter_bytes(model, plan, mlp, tokens, False) == 2 * (cast_weight + tokens * h)
    # CPU: torch's dropout keeps a float noise tensor, not a bool mask
    assert ana.first_block_unsaved_adapter_bytes(model, plan, mlp, tokens, True) == 2 * (cast_weight + 4 * tokens * h)
    # q adapted too: o, gate, up and down read inputs that need a gradient; q itself saves no mask, and LoRA no weight
    q = next(lin for lin in lins if "q" in lin.roles)
    assert ana.first_block_unsaved_adapter_bytes(model, plan, [q, *mlp], tokens, False) == 4 * h * h + tokens * h
    lora = replace(plan, method="lora")
    assert ana.first_block_unsaved_adapter_bytes(model, lora, mlp, tokens, False) == 2 * tokens * h
    # the whole estimate: the first layer's count less these (the other two layers keep theirs)
    parts: dict[str, float] = {}
    per_tok, const = ana._block_bytes(model, model.blocks[0], plan, mlp, 2, 208, False, parts)
    first = tokens * ana.first_block_unsaved_bytes(model, plan, mlp, parts)
    expected = 3 * (per_tok * tokens + const) - first - 2 * (cast_weight + tokens * h)
    assert ana.activation_parts(model, plan)[0] == pytest.approx(expected + ana.final_norm_saved_bytes(model, plan))


def test_down_projection_weight_norm_moment_without_checkpointing():
    """The last layer's down projection (DoRA, dropout, fp32 adapters over bf16): alive beside every block's saved
    tensors, the MLP product (bf16), its fp32 cast (the dropout's input), peft's base output, the residual and the MLP
    input, inputs_embeds and the layer's input; not yet made: its base and LoRA outputs (fp32) and lora_A's."""
    model, plan = _case("dora_mlp_no_checkpointing")
    ana = AnalyticalEstimator()
    down = next(lin for lin in model.blocks[0].linears if "down" in lin.roles)
    tokens, h, i, r = 4 * 208, 1024, 2752, 8
    alive = 2 * i + 4 * i + 2 * h + 2 * 2 * h + 2 * 2 * h
    later = h * (4 + 4) + 4 * r
    assert ana.down_weight_norm_moment_bytes(model, plan, down) == tokens * (alive - later)
    # without dropout lora_A saves the cast input: counted with the block, not here
    no_drop = replace(plan, lora_dropout=0.0)
    later_no_drop = h * (2 + 4) + 4 * r  # the base output DoRA keeps is the base layer's (bf16) without dropout
    assert ana.down_weight_norm_moment_bytes(model, no_drop, down) == tokens * (alive - 4 * i - later_no_drop)
    # a single layer: its input is inputs_embeds itself
    one = model_from_config(dict(CASES["dora_mlp_no_checkpointing"][0], num_hidden_layers=1))
    down1 = next(lin for lin in one.blocks[0].linears if "down" in lin.roles)
    assert ana.down_weight_norm_moment_bytes(one, plan, down1) == tokens * (alive - 2 * h - later)
    # checkpointing recomputes the block in backward, LoRA has no weight norm: not this moment
    assert ana.down_weight_norm_moment_bytes(model, replace(plan, grad_checkpointing=True), down) == 0
    assert ana.down_weight_norm_moment_bytes(model, replace(plan, method="lora"), down) == 0


def test_recomputed_attention_input_moment_holds_the_norm_and_the_layer_outputs():
    """Checkpointing, DoRA with dropout on q (bf16 activations, fp32 adapters): the recomputed block's first adapted
    linear's moment holds, beside its weight norm, the input norm's fp32 upcast and output, peft's base output, the
    fp32 cast of the input and its dropout (output and 1-byte mask); at the output, the weight norm's scaled product
    and sum freed, five out-wide fp32 tensors (the dropout path's base output, the LoRA output, three products)."""
    model, plan = _case("dora_mlp_no_checkpointing")
    plan = replace(plan, grad_checkpointing=True, lora_targets=("q",))
    ana = AnalyticalEstimator()
    q = next(lin for lin in model.blocks[0].linears if "q" in lin.roles)
    tokens, h = 4 * 208, 1024
    per_tok = 4 * h + 2 * h + 2 * h + 4 * h + 4 * h + h
    weight_moment = tokens * per_tok
    output_moment = tokens * (per_tok + 5 * 4 * h) - 2 * 4 * h * h
    assert ana.attention_input_moment_bytes(model, plan, q) == max(weight_moment, output_moment)
    # the moment stands on the checkpointed inputs alone (no recomputed block under it)
    from advisor.methods import get_method

    pt = ana.plan_terms(model, plan)
    fwd = get_method("dora").forward_temporaries(model, plan, [q], 2) + max(weight_moment, output_moment)
    assert pt.terms["forward_temporaries"] == pytest.approx(fwd)
    # LoRA has no weight norm, no checkpointing has no recomputation: not this moment
    assert ana.attention_input_moment_bytes(model, replace(plan, method="lora"), q) == 0
    assert ana.attention_input_moment_bytes(model, replace(plan, grad_checkpointing=False), q) == 0


def test_gated_product_backward_and_the_final_norm_under_checkpointing():
    """The gated product ``act(gate) * up`` back-propagates between the MLP's linears: its gradient and the two it makes
    (three i wide), less what the down projection saved (freed by its backward): nothing for a frozen down projection
    under adapters, its input under full fine-tuning. No dequantised weight then; the final norm's saved tensors are
    freed before any recomputed block's moment."""
    model, plan = _case("mlp_product_backward")
    ana = AnalyticalEstimator()
    _, groups = ana.adapters(model, plan)
    h, i, tokens = 256, 1664, 8 * 176
    assert ana.mlp_backward_transient_bytes(model, plan, groups) == 3 * 2 * i
    full = replace(plan, method="full", master_weights=False)
    assert ana.mlp_backward_transient_bytes(model, full, ana.adapters(model, full)[1]) == 3 * 2 * i - 2 * i
    # LoRA on down without dropout, fp32 adapters: lora_A's fp32 input cast and output freed
    down = replace(plan, method="lora", lora_targets=("down",))
    expected = max(2 * (2 * h + i), 3 * 2 * i - (4 * 32 + 4 * i))
    assert ana.mlp_backward_transient_bytes(model, down, ana.adapters(model, down)[1]) == expected
    # the block's moment: every block input but the recomputed one's, the block, the product backward, the mask
    pt = ana.plan_terms(model, plan)
    assert ana.frees_final_norm_first(model, plan)
    kept, block = ana.activation_parts(model, plan, groups)
    norm = ana.final_norm_saved_bytes(model, plan)
    assert norm == tokens * h * (4 + 2)
    mask = ana.eager_mask_bytes(model, plan)
    assert pt.components["activations"] == pytest.approx(kept - norm + block + tokens * 3 * 2 * i + mask, abs=2)
    # QLoRA: the dequantised down weight joins the in-linear moment only
    q_model, q_plan = _case("qlora_product_backward")
    tokens_q, h_q, i_q = 4 * 264, 1024, 2688
    in_linear = tokens_q * 4 * (2 * h_q + i_q)  # fp32 activations (k-bit upcast)
    q = ana.plan_terms(q_model, q_plan)
    assert q.terms["quant_temporaries"] == h_q * i_q * 2
    assert q.terms["backward_transient"] > in_linear  # the product's moment is larger, but less the dequantised weight
    assert q.components["quant_temporaries"] == h_q * i_q * 2
    frozen_down = ana.plan_terms(q_model, replace(q_plan, lora_targets=("q", "v")))
    assert frozen_down.terms["backward_transient"] == tokens_q * 3 * 4 * i_q > in_linear + h_q * i_q * 2
    assert frozen_down.components["quant_temporaries"] == 0


def test_exaone_post_norm_backward_starts_at_the_norm_after_the_mlp():
    """EXAONE-4 (post-norm, half input to the norm weight): the block's backward begins with the norm after the MLP,
    every saved tensor alive: the block output's gradient (bf16) and five fp32 h-wide temporaries of RMSNorm's
    backward (families referee rows 180, 189)."""
    cfg = dict(model_type="exaone4", hidden_size=1024, intermediate_size=1024, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=1500, tie_word_embeddings=True,
               sliding_window=None, layer_types=["full_attention"] * 2, pad_token_id=None, eos_token_id=None,
               bos_token_id=None)  # fmt: skip
    model = model_from_config(cfg)
    plan = TrainingPlan(gpu_id="h100-80gb", method="lora", dtype="bf16", micro_batch=2, seq_len=512,
                        grad_checkpointing=True, lora_targets=("all-linear",), lora_r=8)  # fmt: skip
    ana = AnalyticalEstimator()
    groups = ana.adapters(model, plan)[1]
    assert ana.mlp_backward_transient_bytes(model, plan, groups) == (2 + 5 * 4) * 1024
    # a Llama layout of the same widths: no norm after its MLP
    llama = model_from_config(dict(cfg, model_type="llama"))
    assert ana.mlp_backward_transient_bytes(llama, plan, ana.adapters(llama, plan)[1]) == 2 * (2 * 1024 + 1024)


def test_post_norm_eager_attention_backward_has_freed_both_norms():
    """A post-norm layer (EXAONE-4) runs both norms after its attention: at the softmax backward their saved tensors are
    freed, and (full fine-tuning, checkpointed) the one normalised output the block counts for a norm weight and q/k/v's
    input, the checkpointed layer input itself, are not beside it (families referee row 198: +3.68% with them)."""
    model, plan = _case("exaone_eager_post_norm")
    ana = AnalyticalEstimator()
    h, tokens = 256, 2 * 1024
    # the norm after the MLP's fp32 input, one normalised output, q/k/v's input: three fp32 h-wide tensors per token
    assert ana._post_norm_freed(model, plan) == 3 * 4 * h
    llama = model_from_config(dict(LLAMA, **{k: CASES["exaone_eager_post_norm"][0][k] for k in (
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size")}))  # fmt: skip
    assert ana._post_norm_freed(llama, plan) == 0.0
    after = ana.after_attention_saved_bytes(model, plan, [])
    pre_norm = ana.eager_attention_backward_bytes(llama, plan, after)
    assert pre_norm - ana.eager_attention_backward_bytes(model, plan, after) == tokens * 3 * 4 * h
    # without checkpointing q/k/v's input is the previous layer's output, saved by this layer only: still counted
    assert ana._post_norm_freed(model, replace(plan, grad_checkpointing=False)) == 2 * 4 * h


def test_dora_head_forward_holds_its_weight_norm_locals_and_vocab_wide_products():
    """DoRA on the head: at its output's last product the weight norm's locals (identity, image, lora_weight, the cast
    base weight) are alive beside peft's base output and, per token and vocab entry, the LoRA output and three products
    (the dropout path: a second base matmul too); the loss has not run (families referee row 145: -2.97% while only
    the weight norm was counted; row 126: -2.44% without the tensors made before the norm)."""
    from advisor.methods import get_method

    model, plan = _case("dora_head_forward")
    groups = AnalyticalEstimator().adapters(model, plan)[1]
    head = next(lin for _, lins in groups for lin in lins if "lm_head" in lin.roles)
    m = get_method("dora")
    h, v, r, t = 256, 8000, 16, 256
    const = h * (h + r) * 4 + 2 * v * h * 4 + 3 * v * 4
    assert m.adapted_head_forward_bytes(head, plan, 2, 4, t) == const + t * (v * (2 + 4 * 4) + r * 4 + h * 4)
    dropped = replace(plan, lora_dropout=0.05)
    assert m.adapted_head_forward_bytes(head, dropped, 2, 4, t) == const + t * (v * (2 + 5 * 4) + r * 4 + h * 9)
    # one token against a vocabulary: the weight norm's sum is the moment, after peft's base output and the input cast
    # (row 126: 269 MiB of them beside the norm)
    assert m.adapted_head_forward_bytes(head, plan, 2, 4, 1) == h * (h + r) * 4 + 4 * v * h * 4 + v * 2 + h * 4
    assert get_method("lora").adapted_head_forward_bytes(head, plan, 2, 4, t) == 0.0
    pt = AnalyticalEstimator().plan_terms(model, plan)
    assert pt.components["adapter_temporaries"] >= m.adapted_head_forward_bytes(head, plan, 2, 4, t)


def test_first_layer_frozen_k_projection_norm_saves_nothing():
    """The first layer's input needs no gradient (adapters, no checkpointing): k_norm reads a frozen k_proj's output,
    so it saves neither its fp32 upcast nor its reciprocal RMS; q_norm, reading an adapted q, saves both (families
    referee row 131, OLMo-2 LoRA on q and v: +2.35% while counted)."""
    model, plan = _case("olmo2_frozen_k_norm")
    ana = AnalyticalEstimator()
    lins = ana.adapters(model, plan)[1][0][1]
    parts: dict[str, float] = {}
    ana._block_bytes(model, model.blocks[0], plan, lins, 2, plan.seq_len, False, parts)
    # post-norm: no norm before the attention; OLMo normalises the whole projection (one RMS per token)
    assert ana.first_block_unsaved_bytes(model, plan, lins, parts) == 4 * (2048 + 1)
    adapted_k = [lin for lin in ana.adapters(model, replace(plan, lora_targets=("k", "v")))[1][0][1]]
    assert ana.first_block_unsaved_bytes(model, plan, adapted_k, parts) == 4 * (2048 + 1)  # q frozen now
    qkv = ana.adapters(model, replace(plan, lora_targets=("q", "k", "v")))[1][0][1]
    assert ana.first_block_unsaved_bytes(model, plan, qkv, parts) == 0.0


def test_fused_gate_up_output_moment_without_checkpointing():
    """Phi-3's fused gate_up under LoRA (fp32 adapters over fp16), no checkpointing: at the last layer's gate_up output
    peft's base output, lora_B's output and its scaled copy (2 i wide) and three h-wide locals are alive, the MLP's
    saved tensors and the down projection's adapter input not made yet (families referee row 48: -2.77% while no
    forward moment was counted)."""
    model, plan = _case("fused_gate_up_output")
    ana = AnalyticalEstimator()
    groups = ana.adapters(model, plan)[1]
    h, i, r, t = 512, 2048, 8, 1024
    alive = 2 * i * (2 + 2 * 4) + 3 * 2 * h
    unmade = 3 * 2 * i + 4 * i + 4 * r  # gate_up's output and the activation's; down's fp32 input cast, lora_A output
    assert ana.fused_mlp_output_moment_bytes(model, plan, groups) == t * (alive - unmade)
    assert ana.fused_mlp_output_moment_bytes(model, replace(plan, grad_checkpointing=True), groups) == 0.0
    pt = ana.plan_terms(model, plan)
    assert pt.components["adapter_temporaries"] == int(t * (alive - unmade) - ana.final_norm_saved_bytes(model, plan))


def test_fused_qkv_output_is_kept_only_where_v_is_a_view_of_it():
    """Phi-3's fused qkv_proj: SDPA saves v, a view of the fused output, so all of it stays alive; eager attention
    under GQA saves repeat_kv's copy of v instead, and the fused output is freed (families referee row 32, Phi-4 QLoRA
    eager: +2.08% while counted in every layer)."""
    model, plan = _case("eager_gqa_fused_qkv")
    ana = AnalyticalEstimator()
    lins = ana.adapters(model, plan)[1][0][1]
    blk = model.blocks[0]

    def attn(p: TrainingPlan) -> float:
        parts: dict[str, float] = {}
        ana._block_bytes(model, blk, p, lins, 4, p.seq_len, False, parts)
        return parts["attn"]

    h, kv, nh, s = 512, 128, 8, 256
    # eager under GQA: q after RoPE, the output, k and v repeated to every head, fp32 softmax: no fused output
    assert attn(plan) == 4 * (2 * h + 2 * h) + 4 * nh * s
    # SDPA: q, k, v (not repeated) and the output, plus the rest of the fused output v is a view of
    assert attn(replace(plan, attention="sdpa")) == 4 * (2 * h + 2 * kv) + 4 * (h + kv)
