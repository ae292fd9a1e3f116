"""The peers bench: the gpu_poor port against values worked by hand from its App.js, the fitcheck and
accelerate adapters against the libraries called directly, and the harness on a tiny dataset."""

from __future__ import annotations

import math

import pytest

from advisor.catalog import default_catalog
from advisor.plans import TrainingPlan
from bench import peers_gpu_poor as gp
from bench.peers_base import GIB, NotExpressible, PeerCase, lora_roles

MIB = 1024 * 1024
#: Llama-2-7B's config.json numbers, as gpu_poor's getParseConfig reads them
LLAMA7 = {"vocab_size": 32000, "hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 11008}
LLAMA7["num_hidden_layers"] = 32
# computeModelSize: 32000*4096*2 + 32*4*4096^2 + 32*3*11008*4096
LLAMA7_PARAMS = 262_144_000 + 2_147_483_648 + 4_328_521_728


def _case(model: str = "llama-2-7b", gpu: str = "a100-80gb", **plan) -> PeerCase:
    cat = default_catalog()
    return PeerCase(cat.model(model), TrainingPlan(gpu_id=gpu, **plan), cat.gpu(gpu))


# ---- gpu_poor port ---------------------------------------------------------------------------------
def test_gpu_poor_parse_config_reads_aliases_and_defaults():
    c = gp.parse_config({"n_embd": 1600, "n_head": 25, "n_layer": 48, "n_inner": None, "vocab_size": 50257})
    assert (c.hidden_dim, c.heads, c.num_layers, c.inter_dim, c.vocab) == (1600, 25, 48, 6400, 50257)
    assert gp.model_size(gp.parse_config(LLAMA7)) == LLAMA7_PARAMS == 6_738_149_376


def test_gpu_poor_full_adam_memory_by_hand():
    # prompt 511 + 1 token to generate = length 512, batch 1, no checkpointing.
    # model 2 B/param; grad+Adam "modelSize * 3 * floatBytes" = 6 B/param;
    # activations per layer (fB = 2): attn 16nh + 8n^2*heads, ffn 4nh + 12ni, norm 8n + 12nh
    n = 512
    per_layer = 32 * n * 4096 + 8 * n * n * 32 + 12 * n * 11008 + 8 * n
    expected = LLAMA7_PARAMS * 2 / MIB + LLAMA7_PARAMS * 6 / MIB + per_layer * 32 / MIB + 650
    assert expected == pytest.approx(58218.125)
    mem = gp.training_memory(LLAMA7, "full_trn", "adam_opt", "no_quant", prompt_len=511, batch=1)
    assert mem.total_mb == 58219 == math.ceil(expected)
    assert mem.activation_mb == pytest.approx(6160.125)


def test_gpu_poor_qlora_memory_by_hand():
    # length 1024, batch 2, checkpointing (activations x 0.15); model: S/4 - S/64 + 6% of S (S = 2 B/param);
    # grad+opt: L*8*h*0.5*4*3 + 0.75*(15h + 6i)*L*50*sqrt(1024/50) per sequence
    s = LLAMA7_PARAMS * 2 / MIB
    extra = 0.75 * (15 * 4096 + 6 * 11008) * 32 * 50 * math.sqrt(1024 / 50)
    n = 1024
    act = (32 * n * 4096 + 8 * n * n * 32 + 12 * n * 11008 + 8 * n) * 32 * 2 / MIB * 0.15
    expected = s / 4 - s / 64 + 0.06 * s + (32 * 8 * 4096 * 0.5 * 4 * 3 + 2 * extra) / MIB + act + 650
    assert expected == pytest.approx(10684.7044, rel=1e-8)
    mem = gp.training_memory(LLAMA7, "qlora", "adam_opt", "no_quant", 1023, batch=2, grad_checkpoint=True)
    assert mem.total_mb == 10685


def test_gpu_poor_lora_states_and_refusals():
    mem = gp.training_memory(LLAMA7, "lora_trn", "adam_opt", "no_quant", 2047)
    assert mem.grad_opt_mb == 48.0  # 32 layers * 8 * 4096 * 2 * 4 * 3 * 2 bytes
    with pytest.raises(ValueError, match="4bit explicit"):
        gp.training_memory(LLAMA7, "qlora", "adam_opt", "bnb_q4", 2047)


def test_gpu_poor_training_time_by_hand():
    # flops = (2*b*len*params + len*h*2*L*b) * 2 (backward) * 1.15 (Adam); / (19.5e12 * 0.85); x1.65 checkpointing
    ms = gp.training_ms_per_iteration(LLAMA7, "A100-80GB", "lora_trn", "adam_opt", "no_quant", 2047, 1, 4, True)
    assert ms == pytest.approx(25277.101, rel=1e-6)
    # full training x3, RTX 4090 "compute" 82.58, no checkpointing
    ms = gp.training_ms_per_iteration(LLAMA7, "rtx-4090", "full_trn", "adam_opt", "no_quant", 511)
    assert ms == pytest.approx(678.2727, rel=1e-6)


def test_gpu_poor_adapter_expressibility():
    assert gp.memory_gib(_case(method="lora", seq_len=512)) > 0
    for plan, why in (
        (dict(method="dora"), "method dora"),
        (dict(method="full", dtype="fp32"), "fp32"),
        (dict(method="lora", optimizer="adamw-8bit"), "optimiser"),
        (dict(method="full", num_gpus=4, sharding="fsdp"), "FSDP"),
    ):
        with pytest.raises(NotExpressible, match=why):
            gp.memory_gib(_case(**plan))
    with pytest.raises(NotExpressible, match="not in gpu_poor's GPU list"):
        gp.tokens_per_s(_case(gpu="l4", method="lora"))
    # tokens/s = micro_batch x seq_len over its ms per iteration (prompt = seq_len, 1 token to generate)
    case = _case(method="lora", micro_batch=4, seq_len=2047, grad_checkpointing=True)
    assert gp.tokens_per_s(case) == pytest.approx(4 * 2047 / 25.277101, rel=1e-3)


def test_lora_roles_drop_head_targets_and_refuse_modules_to_save():
    case = _case(method="lora", lora_targets=("q", "v", "lm_head"))
    assert lora_roles(case.model, case.plan) == ("q", "v")
    phi3 = _case("phi-3-mini", method="lora", lora_targets=("qkv_proj",))
    assert lora_roles(phi3.model, phi3.plan) == ("q", "k", "v")


# ---- fitcheck-llm and accelerate adapters ----------------------------------------------------------
def test_fitcheck_adapter_matches_a_direct_call():
    fitcheck = pytest.importorskip("fitcheck")
    from bench import peers_fitcheck

    case = _case(method="qlora", micro_batch=2, seq_len=1024, lora_r=8, lora_targets=("q", "v"))
    cfg = fitcheck.ModelConfig("llama-2-7b", 6_738_415_616, 4096, 32, 32, 32, 11008, 32000, 128, False)
    direct = fitcheck.estimate(
        cfg,
        fitcheck.TrainingConfig(
            quantization="nf4",
            double_quant=True,
            batch_size=2,
            seq_len=1024,
            lora_rank=8,
            lora_targets=["q_proj", "v_proj"],
            grad_checkpoint=True,
            flash_attn=True,
        ),
        fitcheck.get_gpu("a100-80"),
    )
    assert peers_fitcheck.memory_gib(case) == pytest.approx(direct.total_mib / 1024)
    with pytest.raises(NotExpressible, match="refuses the model"):  # gpt-neox: derived count +29% off
        peers_fitcheck.memory_gib(_case("stablelm-base-alpha-3b", method="lora"))
    with pytest.raises(NotExpressible, match="FSDP"):
        peers_fitcheck.memory_gib(_case(method="full", num_gpus=2, sharding="fsdp"))


def test_accelerate_adapter_uses_estimate_memorys_automodel_sizes():
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from bench import peers_accelerate

    # AutoModel (no lm_head): 6,738,415,616 - 32000*4096 parameters in fp32; mixed precision's largest
    # entry is the Adam states, 2 x the fp32 size = 8 bytes a parameter
    body = 6_738_415_616 - 32000 * 4096
    gib = peers_accelerate.memory_gib(_case(method="full"))
    assert gib == pytest.approx(8 * body / GIB, rel=1e-6)
    assert peers_accelerate.memory_gib(_case(method="full", dtype="fp32")) == pytest.approx(2 * gib, rel=1e-9)
    with pytest.raises(NotExpressible, match="full training with Adam only"):
        peers_accelerate.memory_gib(_case(method="lora"))


# ---- the harness ---------------------------------------------------------------------------------------
def _stub_tools():
    from bench.peers import Tool

    def ours(row):
        return row.memory_gib * 1.05  # +5% everywhere

    def peer(row):
        if row.key == "t:2":
            raise NotExpressible("no input for it")
        return row.memory_gib * (0.98 if row.key == "t:0" else 1.30)  # -2%, +30%

    return [Tool("tuneadvisor", ours, None), Tool("peer", peer, None)]


def _tiny_dataset():
    from bench.peers import Dataset, Row

    case = _case(method="lora")
    rows = [Row("t", f"t:{i}", case, memory_gib=g) for i, g in enumerate((10.0, 20.0, 30.0))]
    return Dataset("t", "tiny", rows)


def test_harness_tables_head_to_head_and_verdict():
    from bench.peers import run

    res = run([_tiny_dataset()], _stub_tools())
    mem = res["datasets"]["t"]["memory"]
    ours, peer = mem["tools"]["tuneadvisor"], mem["tools"]["peer"]
    assert (ours["n"], ours["n_not_expressible"], ours["median_abs_pct"], ours["within_10pct"]) == (3, 0, 5.0, 1.0)
    assert (peer["n"], peer["n_not_expressible"], peer["worst_abs_pct"]) == (2, 1, 30.0)
    assert peer["not_expressible_reasons"] == {"no input for it": 1}
    h = mem["head_to_head"]["peer"]
    assert h["n_shared"] == 2 and h["ours"]["median_abs_pct"] == 5.0 and h["peer"]["median_abs_pct"] == 16.0
    assert [r["key"] for r in h["peer_closer_rows"]] == ["t:0"]
    assert mem["verdict"]["ours_best"] is True
    assert res["datasets"]["t"]["throughput"]["n_rows"] == 0
    assert {r["key"] for r in res["rows"]} == {"t:0", "t:1", "t:2"}


def test_harness_names_the_peer_that_wins_and_reports_missing_datasets():
    from bench.peers import Dataset, Tool, render, run

    tool_list = [Tool("tuneadvisor", lambda r: r.memory_gib * 1.3, None), Tool("peer", lambda r: r.memory_gib, None)]
    gone = Dataset("gone", "a file", available=False, reason="x.json not found")
    res = run([_tiny_dataset(), gone], tool_list)
    v = res["datasets"]["t"]["memory"]["verdict"]
    assert v["ours_best"] is False and v["best"] == "peer"
    assert "peer has the lower median on the 3 rows both answer (0.0% vs our 30.0%" in v["text"]
    res.update(command="c", commit="abc", date="d", tools=[{"name": t.name, "version": ""} for t in tool_list])
    md = render(res)
    assert "dataset not available: x.json not found" in md
    assert "| peer | 3 | 0 | 0.0% | 0.0% | 0.0% | 100% |" in md


def test_real_tools_answer_a_published_like_row():
    pytest.importorskip("fitcheck")
    pytest.importorskip("accelerate")
    from bench.peers import Dataset, Row, run, tools

    ds = Dataset("one", "one row", [Row("one", "one:0", _case(method="full", seq_len=512), memory_gib=60.0)])
    mem = run([ds], tools())["datasets"]["one"]["memory"]
    assert {t for t, s in mem["tools"].items() if s["n"] == 1} == {
        "tuneadvisor",
        "fitcheck-llm",
        "accelerate estimate-memory",
        "gpu_poor (port)",
        "weights x 4",
    }


def test_oom_rows_count_tools_whose_figure_exceeds_the_gpu():
    from bench.peers import Dataset, Row, Tool, oom_agreement

    case = _case(method="lora", gpu="rtx-4090")  # 24 GB card
    ds = Dataset("o", "oom", [Row("o", "o:0", case, oom=True), Row("o", "o:1", case, memory_gib=5.0)])
    tool_list = [Tool("big", lambda r: 30.0, None), Tool("small", lambda r: 10.0, None)]
    res = oom_agreement(ds, tool_list)
    assert res["n_rows"] == 1
    assert res["tools"] == {"big": {"n": 1, "predicts_oom": 1}, "small": {"n": 1, "predicts_oom": 0}}


def test_fitcheck_model_config_equals_its_own_hub_path(tmp_path):
    """peers_fitcheck.model_config runs fetch_model_config's checks on our config.json; served from a
    local server speaking the Hub's endpoints (HF_ENDPOINT), fitcheck's own fetch gives the same answer."""
    pytest.importorskip("fitcheck")
    import hashlib
    import json
    import os
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from advisor.families import hf_config
    from bench import peers_fitcheck

    cat = default_catalog()
    names = ("llama-2-7b", "gemma-7b", "qwen2.5-7b", "stablelm-base-alpha-3b")
    repos = {cat.model(n).hf_id: cat.model(n) for n in names}

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: bytes, head: bool = False, extra: dict | None = None):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _config(self, head: bool):
            repo = self.path.split("/resolve/")[0].strip("/")
            if repo not in repos or not self.path.endswith("/config.json"):
                self.send_response(404)
                self.end_headers()
                return
            body = json.dumps(hf_config(repos[repo])).encode()
            etag = '"' + hashlib.sha1(body).hexdigest() + '"'
            self._send(body, head, {"ETag": etag, "X-Repo-Commit": "0" * 40})

        def do_HEAD(self):
            self._config(True)

        def do_GET(self):
            if self.path.startswith("/api/models/"):
                repo = self.path[len("/api/models/") :].split("?")[0]
                if repo in repos:
                    total = repos[repo].param_count
                    info = {"id": repo, "sha": "0" * 40, "safetensors": {"parameters": {"BF16": total}, "total": total}}
                    return self._send(json.dumps(info).encode())
                self.send_response(404)
                self.end_headers()
                return
            self._config(False)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = (
        "import json, sys, fitcheck\n"
        "out = {}\n"
        "for repo in sys.argv[1:]:\n"
        "    try:\n"
        "        out[repo] = list(vars(fitcheck.fetch_model_config(repo)).values())[1:]\n"
        "    except fitcheck.UnsupportedModelError as exc:\n"
        "        out[repo] = 'refused'\n"
        "print(json.dumps(out))\n"
    )
    env = dict(
        os.environ,
        HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}",
        HF_HOME=str(tmp_path),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.pop("HF_HUB_OFFLINE", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, *repos], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-2000:]
    via_hub = json.loads(proc.stdout.strip().splitlines()[-1])
    for repo, model in repos.items():
        try:
            ours = list(vars(peers_fitcheck.model_config(model)).values())[1:]
        except NotExpressible:
            ours = "refused"
        assert via_hub[repo] == ours, repo
    assert via_hub["stabilityai/stablelm-base-alpha-3b"] == "refused"
