"""The fake trace against a real run of the same step, on tiny models of every family on this CPU.

The real run's peak is measured by a meter written here, independently of the module's: a
TorchDispatchMode entered *outside* the real run, so it sees every op the traced code dispatches to the
real kernels (each storage once, freed by a weakref finaliser on the storage). The simulated peak
(fake tensors, the module's meter) must equal it within 1%.
"""

import weakref
from dataclasses import replace

import pytest

from advisor.catalog import model_from_config
from advisor.plans import TrainingPlan
from advisor.simulated.trace import trace_step
from advisor.stack.targets import lora_target_modules

pytestmark = pytest.mark.needs_torch

TINY = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
    "gemma2": dict(
        model_type="gemma2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
        sliding_window=16,
    ),
    "phi3": dict(
        model_type="phi3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        pad_token_id=None,
    ),
    "phi": dict(
        model_type="phi",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=256, n_positions=128),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
    ),
    "t5": dict(
        model_type="t5",
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        vocab_size=256,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
    ),
}

# (family, plan fields): every method, both checkpointing modes, each optimiser kind, eager attention,
# gradient accumulation and the half-precision paths (QLoRA compute dtype, AMP autocast) at least once.
CASES = [
    ("llama", dict(method="lora", lora_targets=("all-linear",))),
    ("llama", dict(method="qlora", dtype="bf16", lora_targets=("all-linear",))),
    ("llama", dict(method="full", dtype="bf16", grad_checkpointing=False)),  # fp32 master weights + autocast
    ("llama", dict(method="lora", optimizer="adamw-8bit", lora_targets=("q", "v"), grad_accum=2)),
    ("qwen2", dict(method="qlora", grad_checkpointing=False, lora_dropout=0.0)),
    ("gemma2", dict(method="lora", attention="eager")),
    ("phi3", dict(method="full", optimizer="adamw-8bit")),
    ("phi", dict(method="qlora", double_quant=False)),
    ("gpt2", dict(method="lora", grad_checkpointing=False)),
    ("gpt2", dict(method="full", dtype="bf16", grad_checkpointing=False)),  # AMP: CUDA's fp32 ops in gelu_new
    ("gpt_neox", dict(method="full")),
    ("t5", dict(method="lora", lora_targets=("q", "v"))),
    ("llama", dict(method="qlora", framework="litgpt", chunked_loss=True, optimizer="paged-adamw-32bit")),
    ("llama", dict(method="lora", framework="torchtune", chunked_loss=True, dtype="bf16")),
]


class RealLiveBytes:
    """A live-bytes meter for real CPU tensors: each storage counted once at the op that made it."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and not t.is_meta:
                        meter.add(t.untyped_storage())
                return out

        self.mode = Mode()
        self.alive: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def add(self, st) -> None:
        key = id(st)
        if key in self.alive:
            return
        self.alive[key] = st.nbytes()
        self.live += st.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self.drop, key)

    def drop(self, key: int) -> None:
        self.live -= self.alive.pop(key)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize(("family", "fields"), CASES, ids=[f"{f}-{'-'.join(map(str, d.values()))}" for f, d in CASES])
def test_fake_peak_equals_real_peak(family, fields):
    cfg = TINY[family]
    spec = model_from_config(cfg, name=f"tiny-{family}")
    plan = TrainingPlan(gpu_id="cpu", **{"dtype": "fp32", "micro_batch": 2, "seq_len": 32, **fields})
    targets = list(lora_target_modules(spec, plan)) if plan.method != "full" else []

    with RealLiveBytes() as real:
        real_trace = trace_step(cfg, plan, targets, fake=False)
    fake = trace_step(cfg, plan, targets, fake=True)

    assert fake.fake and not real_trace.fake
    assert fake.param_count == spec.param_count  # the config builds the architecture the spec describes
    assert abs(fake.peak_bytes - real.peak) <= 0.01 * real.peak, (fake.peak_bytes, real.peak)
    # the module's own meter on the real run agrees too, phase by phase
    for phase, value in real_trace.phases.items():
        assert abs(fake.phases[phase] - value) <= 0.01 * value, (phase, fake.phases, real_trace.phases)
    assert fake.peak_phase == real_trace.peak_phase


def test_meter_sees_what_the_plan_changes():
    """Checkpointing frees activations and NF4 shrinks weights: the traced numbers move the right way."""
    cfg = TINY["llama"]
    spec = model_from_config(cfg, name="tiny-llama")
    base = TrainingPlan(gpu_id="cpu", method="lora", dtype="fp32", micro_batch=4, seq_len=64, lora_targets=("q", "v"))
    targets = list(lora_target_modules(spec, base))
    ckpt = trace_step(cfg, base, targets)
    no_ckpt = trace_step(cfg, replace(base, grad_checkpointing=False), targets)
    qlora = trace_step(cfg, replace(base, method="qlora"), targets)
    assert no_ckpt.components["activations"] > ckpt.components["activations"]
    assert qlora.phases["after_weights"] < ckpt.phases["after_weights"]
    # NF4: half a byte per linear weight + absmax; the rest stays fp32
    assert qlora.components["weights"] < ckpt.components["weights"]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-8bit", "paged-adamw-8bit"])
def test_primed_single_step_equals_a_two_step_run(optimizer):
    """Priming the optimiser states on zero gradients, then one step, sees what step 2 of 2 sees."""
    cfg = TINY["llama"]
    spec = model_from_config(cfg, name="tiny-llama")
    # wide enough that the 8-bit optimiser quantises (>= 4096 elements) and pages (>= 1e5) some states
    cfg = {**cfg, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8}
    spec = model_from_config(cfg, name="tiny-llama-wide")
    plan = TrainingPlan(gpu_id="cpu", method="full", dtype="fp32", micro_batch=1, seq_len=16, optimizer=optimizer)
    primed = trace_step(cfg, plan, [], steps=1, prime_optimizer=True)
    two = trace_step(cfg, plan, [], steps=2, prime_optimizer=False)
    assert primed.peak_bytes == two.peak_bytes
    assert primed.phases == two.phases
    assert primed.paged_bytes == two.paged_bytes
    assert (primed.paged_bytes > 0) == optimizer.startswith("paged")
    assert spec.param_count == primed.param_count
