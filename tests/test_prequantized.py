"""Pre-quantized bases (advisor.prequant): a real bitsandbytes 4-bit checkpoint saved on this CPU, read back from
its folder, against the file's tensor bytes and the loaded model's memory; and the refusals of quantisers
nothing trains on."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from advisor import prequant
from advisor.catalog import default_catalog, model_from_config, model_from_config_path
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import make_plan
from advisor.prequant import Prequantized

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
#: what bitsandbytes' save_pretrained writes per quantised 4-bit weight (tests/hub/hub_quantized.py serves the same)
BNB_LAYOUT = {
    "weight": "U8",
    "weight.absmax": "U8",
    "weight.nested_absmax": "F32",
    "weight.nested_quant_map": "F32",
    "weight.quant_map": "F32",
    "weight.quant_state.bitsandbytes__nf4": "U8",
}


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, float]:
    """A tiny Llama quantised by bitsandbytes (NF4, double quant) and saved: a real pre-quantized checkpoint.
    Also: the reloaded model's parameter + buffer bytes, and those plus its quant states' tensors (absmax, codes)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("bnb")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k not in ("architectures", "model_type")})
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "fp")
    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        root / "fp", quantization_config=q, dtype=torch.bfloat16, device_map="cpu"
    )
    model.save_pretrained(root / "q")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(root / "q", dtype=torch.bfloat16, device_map="cpu")
    seen: set[int] = set()

    def nbytes(t) -> int:
        if t is None or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    plain = sum(nbytes(p) for p in loaded.parameters()) + sum(nbytes(b) for b in loaded.buffers())
    states = 0
    for p in loaded.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            states += nbytes(qs.absmax) + nbytes(qs.code)
            if qs.state2 is not None:
                states += nbytes(qs.state2.absmax) + nbytes(qs.state2.code)
    return root / "q", float(plain), float(plain + states)


def test_real_bnb_checkpoint_storage_and_lora_weights(bnb_checkpoint):
    folder, plain, resident = bnb_checkpoint
    cfg = json.loads((folder / "config.json").read_text())
    spec = prequant.with_local_checkpoint(model_from_config_path(folder), cfg, folder)
    pq = spec.prequantized
    header = _header(folder / "model.safetensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    file_bytes = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in tensors.values())
    assert pq is not None and pq.source == "checkpoint" and pq.storage_bytes == file_bytes  # exact
    assert (pq.method, pq.bits, pq.quant_type, pq.double_quant) == ("bitsandbytes", 4, "nf4", True)
    prefix = "model.layers.0.self_attn.q_proj."
    assert {k[len(prefix) :]: v["dtype"] for k, v in tensors.items() if k.startswith(prefix)} == BNB_LAYOUT
    # the architecture's count: embeddings (tied) + 2 layers, unpacked
    n_linear = 2 * (512 * 512 * 2 + 512 * 256 * 2 + 3 * 512 * 1024)
    assert spec.param_count == 1024 * 512 + n_linear + 2 * 2 * 512 + 512
    assert pq.quantized_params == n_linear
    gpu = default_catalog().gpu("h100")
    est = AnalyticalEstimator().estimate(spec, gpu, make_plan("lora", gpu, dtype="bf16", grad_checkpointing=True))
    weights = est.memory.components["weights"]
    print(
        f"bnb tiny: file {file_bytes} B, estimate weights {weights} B, loaded params+buffers {plain:.0f} B "
        f"(+ quant states {resident:.0f} B)"
    )
    assert weights == file_bytes
    # what the loaded model holds: its parameters and buffers plus each weight's quant state (absmax, codes)
    assert abs(weights - resident) / resident < 0.01
    assert weights > plain  # parameters and buffers alone miss the absmax constants


def _spec(quant: dict, repo: str = "acme/model-GPTQ") -> object:
    cfg = {**TINY, "quantization_config": quant}
    return prequant.attach(model_from_config(cfg, name=repo), cfg, repo, None, "not read")


@pytest.mark.parametrize(
    ("quant", "words"),
    [
        ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, "inference only"),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4}}}}, "compressed"),
        ({"quant_method": "hqq", "nbits": 4}, "'hqq' is not modelled"),
    ],
)
def test_quantisers_nothing_trains_on_are_refused_for_every_method(quant: dict, words: str):
    spec = _spec(quant)
    gpu = default_catalog().gpu("h100")
    for method in ("lora", "full"):
        with pytest.raises(InvalidInputError) as exc:
            AnalyticalEstimator().estimate(spec, gpu, make_plan(method, gpu))
        assert exc.value.field == "model" and words in str(exc.value) and "acme/model: guessed" in str(exc.value)


def test_config_only_reading_says_so_and_float_or_mxfp4_checkpoints_are_untouched():
    spec = _spec({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True})
    pq = spec.prequantized
    assert pq.source == "config" and "not read" in pq.basis and "from the config" in spec.note
    n = pq.quantized_params
    # 4-bit + per 128-group F16 scale and packed zero + I32 g_idx per input feature
    lin = [(512, 512), (512, 256), (512, 256), (512, 512), (512, 1024), (512, 1024), (1024, 512)]
    expected = sum(2 * (i * o / 2 + math.ceil(i / 128) * o * 2.5 + 4 * i) for i, o in lin)
    assert pq.quantized_bytes == round(expected) and n == sum(2 * i * o for i, o in lin)
    plain = model_from_config(TINY)
    assert prequant.attach(plain, TINY, "x/y", None, "") is plain
    mx = {**TINY, "quantization_config": {"quant_method": "mxfp4"}}
    assert prequant.attach(model_from_config(mx), mx, "x/y", None, "").prequantized is None
    with pytest.raises(InvalidInputError):
        Prequantized("gptq", 0, 128, 1, 1, 1, "checkpoint", "")
