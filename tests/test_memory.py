"""Physics checks of the analytical memory model: each term against a number we can derive or count."""

from dataclasses import replace

import pytest

from advisor.catalog import default_catalog, resolve_model
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import TrainingPlan, resolve_targets
from advisor.units import GIB

CAT = default_catalog()
EST = AnalyticalEstimator()
L7 = resolve_model("llama-2-7b")
A100 = CAT.gpu("a100-80gb")


def plan(**kw) -> TrainingPlan:
    base = dict(method="lora", gpu_id="a100-80gb", micro_batch=1, seq_len=512, lora_r=8, lora_targets=("q", "v"))
    base.update(kw)
    return TrainingPlan(**base)


def mem(p, model=L7, gpu=A100):
    return EST.memory(model, gpu, p)


def test_lora_adapter_count_matches_peft_print():
    # peft prints "trainable params: 4,194,304" for Llama-2-7B, r=8 on q_proj,v_proj
    n, _ = EST.adapters(L7, plan())
    assert n == 4_194_304
    n_all, _ = EST.adapters(L7, plan(lora_r=16, lora_targets=("all-linear",)))
    assert n_all == 39_976_960  # peft: r=16 on all seven projections of Llama-2-7B


def test_nf4_weight_storage():
    m = mem(plan(method="qlora", double_quant=False, kbit_upcast=False, dtype="bf16"))
    n_lin = L7.linear_weight_params
    other = L7.param_count - n_lin
    expected = n_lin * 0.5 + n_lin / 64 * 4 + other * 2  # packed nibbles + fp32 absmax per 64 + bf16 rest
    assert m.components["weights"] == pytest.approx(expected, rel=1e-9)
    dq = mem(plan(method="qlora", double_quant=True, kbit_upcast=False))
    # double quantisation: 8-bit absmax + one fp32 per 256 blocks saves ~0.37 bits per parameter
    saved_bits = (m.components["weights"] - dq.components["weights"]) * 8 / n_lin
    assert 0.36 < saved_bits < 0.38


def test_kbit_upcast_makes_unquantised_modules_fp32():
    up = mem(plan(method="qlora"))
    no = mem(plan(method="qlora", kbit_upcast=False))
    other = L7.param_count - L7.linear_weight_params
    assert up.components["weights"] - no.components["weights"] == pytest.approx(other * 2, rel=1e-9)


def test_65b_4bit_weights_alone_are_over_30_gib():
    w = mem(plan(method="qlora", kbit_upcast=False), model=resolve_model("llama-65b")).components["weights"]
    assert 30 * GIB < w < 34 * GIB


def test_full_fine_tuning_bytes_per_parameter():
    N = L7.param_count
    mixed = mem(plan(method="full", optimizer="adamw", master_weights=True), gpu=CAT.gpu("h200"))
    # fp32 master weights (4) + AdamW (8) + fp32 grads (4) + half copies autocast keeps (2 per linear weight)
    assert mixed.components["optimizer_states"] == pytest.approx(8 * N, rel=1e-6)
    assert mixed.allocated_peak_bytes > 16 * N
    pure = mem(plan(method="full", master_weights=False), gpu=CAT.gpu("h200"))
    assert pure.components["optimizer_states"] == pytest.approx(4 * N, rel=1e-6)  # bf16 states
    eight = mem(plan(method="full", optimizer="adamw-8bit", master_weights=False), gpu=CAT.gpu("h200"))
    # two uint8 states + one fp32 absmax per 256-value block of each (bitsandbytes' blockwise states)
    assert eight.components["optimizer_states"] == pytest.approx(N * (2 + 2 * 4 / 256), rel=1e-6)


def test_paged_states_are_reported_apart():
    m = mem(plan(method="full", optimizer="paged-adamw-8bit", master_weights=False), gpu=CAT.gpu("h200"))
    assert m.components["optimizer_states"] == 0
    assert m.paged_bytes == pytest.approx(L7.param_count * (2 + 2 * 4 / 256), rel=1e-6)


def test_activations_grow_with_tokens_and_checkpointing_cuts_them():
    a1 = EST.activation_bytes(L7, plan(micro_batch=1, grad_checkpointing=False))
    a4 = EST.activation_bytes(L7, plan(micro_batch=4, grad_checkpointing=False))
    assert a4 == pytest.approx(4 * a1, rel=0.01)
    ck = EST.activation_bytes(L7, plan(micro_batch=4, grad_checkpointing=True))
    assert ck < a4 / 5


def test_eager_attention_adds_the_s_squared_term_only():
    sdpa = EST.activation_bytes(L7, plan(seq_len=4096, grad_checkpointing=False))
    eager = EST.activation_bytes(L7, plan(seq_len=4096, grad_checkpointing=False, attention="eager"))
    per_layer_s2 = 6 * L7.num_attention_heads * 4096 * 4096  # fp32 softmax + bf16 probabilities
    assert eager - sdpa == pytest.approx(L7.num_layers * per_layer_s2, rel=0.01)
    s2k = EST.activation_bytes(L7, plan(seq_len=2048, grad_checkpointing=False))
    assert sdpa == pytest.approx(2 * s2k, rel=0.01)  # linear in s without eager


def test_logits_peak_with_fp32_upcast():
    # the loss backward holds the fp32 log-softmax output, its gradient and the logits' gradient
    p = plan(micro_batch=2, seq_len=1024)
    assert EST.logits_bytes(L7, p) == 2 * 1024 * 32000 * 12
    big_vocab = EST.logits_bytes(resolve_model("llama-3-8b"), p)
    assert big_vocab / EST.logits_bytes(L7, p) == pytest.approx(128256 / 32000)


def test_fsdp_shards_and_ddp_replicates():
    one = mem(plan(method="full", master_weights=False), gpu=CAT.gpu("h200"))
    fsdp = mem(plan(method="full", master_weights=False, num_gpus=4, sharding="fsdp"), gpu=CAT.gpu("h200"))
    ddp = mem(plan(method="full", master_weights=False, num_gpus=4, sharding="ddp"), gpu=CAT.gpu("h200"))
    assert fsdp.components["optimizer_states"] == pytest.approx(one.components["optimizer_states"] / 4, rel=1e-6)
    assert fsdp.allocated_peak_bytes < one.allocated_peak_bytes / 2
    assert ddp.components["optimizer_states"] == one.components["optimizer_states"]


def test_totals_and_fit():
    m = mem(plan())
    assert m.allocated_peak_bytes < m.reserved_peak_bytes < m.device_total_bytes
    assert sum(m.components.values()) == m.device_total_bytes
    assert m.fits and m.headroom_bytes == A100.memory_bytes - m.device_total_bytes
    assert not mem(plan(method="full"), gpu=CAT.gpu("rtx-4090")).fits


def test_dtype_is_an_input():
    fp32 = mem(plan(dtype="fp32"))
    bf16 = mem(plan(dtype="bf16"))
    assert fp32.components["weights"] == pytest.approx(2 * bf16.components["weights"], rel=1e-9)


def test_t5_is_supported():
    t5 = resolve_model("t5-xl")
    m = mem(plan(lora_targets=("q", "v")), model=t5)
    assert m.fits and m.components["activations"] > 0
    names = resolve_targets(t5, ("q", "v"))
    assert names == {"q", "v", "cross.q", "cross.v"}


def test_bad_targets_and_plans_name_the_field():
    with pytest.raises(InvalidInputError) as exc:
        resolve_targets(L7, ("c_attn",))
    assert exc.value.field == "lora_targets"
    with pytest.raises(InvalidInputError) as exc:
        replace(plan(), micro_batch=0)
    assert exc.value.field == "micro_batch"
    with pytest.raises(InvalidInputError) as exc:
        plan(num_gpus=2)
    assert exc.value.field == "sharding"


def test_speed_orders_methods_like_physics():
    lora = EST.speed(L7, A100, plan(micro_batch=4, seq_len=2048))
    qlora = EST.speed(L7, A100, plan(method="qlora", micro_batch=4, seq_len=2048))
    full = EST.speed(L7, A100, plan(method="full", micro_batch=4, seq_len=2048))
    assert qlora.step_time_s > lora.step_time_s  # dequantisation traffic
    assert full.flops_per_token / lora.flops_per_token == pytest.approx(8 / 6, rel=0.05)  # 6N+2N vs 4N+2N (ckpt)
    slow = EST.speed(L7, CAT.gpu("t4"), replace(plan(micro_batch=4, seq_len=2048), dtype="fp16"))
    assert slow.tokens_per_s < lora.tokens_per_s / 3


def test_no_cuda_workspace_or_context_on_a_cpu_device():
    """The 64 MiB of CUDA workspaces and the CUDA context are CUDA's: a CPU device has neither."""
    from dataclasses import replace as _replace

    cpu = _replace(A100, id="cpu-test", name="CPU test", gpu_class="cpu", vendor="cpu")
    p = plan(dtype="fp32", gpu_id="cpu-test", lora_dropout=0.0)  # (CPU dropout masks are float: not the point here)
    on_cpu, on_gpu = EST.estimate(L7, cpu, p).memory, EST.estimate(L7, A100, replace(p, gpu_id=A100.id)).memory
    assert on_gpu.allocated_peak_bytes - on_cpu.allocated_peak_bytes == 64 * 2**20
    assert on_cpu.device_total_bytes == on_cpu.reserved_peak_bytes  # no CUDA context
    assert on_gpu.device_total_bytes - on_gpu.reserved_peak_bytes == 512 * 2**20
