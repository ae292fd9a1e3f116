"""The test hub: a real HTTP server on 127.0.0.1 speaking the Hub protocol, serving published config.json
files (reference/hub_configs) with safetensors headers of their real architectures (built by transformers
on the meta device). huggingface_hub is pointed at it through its endpoint; nothing of it is mocked."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# pytest runs with --import-mode=importlib (no sys.path entries per test dir): make the helpers importable
sys.path.insert(0, str(Path(__file__).parent))

from hub_checkpoints import checkpoint_files, reference_config
from hub_server import GATED_TOKEN, HubHandle, HubState, Repo, make_repo, serve_hub

from advisor import hub

DATA = Path(__file__).parent / "data"


def _json(cfg: dict[str, Any]) -> bytes:
    return json.dumps(cfg, indent=2).encode()


def _t5_config() -> dict[str, Any]:
    """flan-t5-xl's config as the catalog records it (the family's own mapping back to config.json)."""
    from advisor.catalog import default_catalog
    from advisor.families import hf_config

    cfg = hf_config(default_catalog().model("flan-t5-xl"))
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "is_encoder_decoder": True,
        "torch_dtype": "float32",
        **cfg,
    }


@pytest.fixture(scope="session")
def hub_repos() -> dict[str, Repo]:
    """The repos of the test hub, built once per session (the meta-device builds take a few seconds)."""
    pytest.importorskip("transformers")
    qwen3 = reference_config("Qwen/Qwen3-8B")
    qwen25 = reference_config("Qwen/Qwen2.5-3B")
    qwen25_7b = reference_config("Qwen/Qwen2.5-7B")
    llama = reference_config("meta-llama/Llama-3.2-3B")
    t5 = _t5_config()
    llama31 = reference_config("meta-llama/Llama-3.1-8B")
    moe = reference_config("Qwen/Qwen3-30B-A3B")
    repos = [
        # a mixture-of-experts model (128 experts, 8 per token)
        make_repo("Qwen/Qwen3-30B-A3B", {"config.json": _json(moe), **checkpoint_files(moe)}),
        # NousResearch's ungated copy of Llama-3.1-8B (the same config.json and weights as Meta's repo): a Hub id
        # the catalog does not list, for the CLI and HTTP tests that name a model only the Hub knows
        make_repo("NousResearch/Meta-Llama-3.1-8B", {"config.json": _json(llama31), **checkpoint_files(llama31)}),
        # public, one safetensors file, the model info reports the safetensors summary (as huggingface.co does)
        make_repo("Qwen/Qwen3-8B", {"config.json": _json(qwen3), **checkpoint_files(qwen3)}),
        # a mirror without the info summary: the counts come from the sharded headers (index + range requests);
        # branch "legacy" holds another published config (Qwen2.5-7B's) so a revision is visibly a different model
        make_repo(
            "Qwen/Qwen2.5-3B",
            {"config.json": _json(qwen25), **checkpoint_files(qwen25, shards=2)},
            branches={"legacy": {"config.json": _json(qwen25_7b), **checkpoint_files(qwen25_7b, shards=3)}},
            api_safetensors=False,
        ),
        # gated, as on huggingface.co: files need a token with access
        make_repo(
            "meta-llama/Llama-3.2-3B",
            {"config.json": _json(llama), **checkpoint_files(llama)},
            gated_token=GATED_TOKEN,
        ),
        # a catalog model asked at a revision goes to the Hub; T5 (encoder-decoder) stays supported
        make_repo("google/flan-t5-xl", {"config.json": _json(t5), **checkpoint_files(t5)}),
        # an encoder-only model: not something the advisor plans causal-LM fine-tuning for
        make_repo(
            "google-bert/bert-base-uncased",
            {"config.json": (DATA / "google-bert/bert-base-uncased/config.json").read_bytes()},
        ),
        # a repo without config.json (e.g. a GGUF-only or dataset-like upload)
        make_repo("acme/weights-only", {"README.md": b"# weights only\n"}),
    ]
    return {r.repo_id: r for r in repos}


@pytest.fixture(scope="session")
def test_hub(hub_repos: dict[str, Repo]) -> Iterator[HubHandle]:
    """The test hub, running for the whole session."""
    state = HubState(repos=dict(hub_repos))
    with serve_hub(state) as url:
        yield HubHandle(url, state)


@pytest.fixture
def stalled_hub() -> Iterator[str]:
    """A hub that accepts connections and answers nothing for 30 s (released at teardown)."""
    state = HubState(stall_s=30.0)
    with serve_hub(state) as url:
        yield url


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh huggingface_hub cache for this test, and no token from the environment.

    In process, huggingface_hub has read HF_HOME at import: the test points the library's own cache setting
    (constants.HF_HUB_CACHE, read at each call) at a temp folder; the subprocess tests set HF_HOME itself."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.clear_cache()
    yield cache
    hub.clear_cache()


@pytest.fixture(scope="session")
def no_models():
    """The default catalog without its models: canonical Hub ids (which the catalog lists) go to the Hub."""
    from dataclasses import replace

    from advisor.catalog import default_catalog

    return replace(default_catalog(), models=())


@pytest.fixture
def slow_files_hub(hub_repos: dict[str, Repo]) -> Iterator[str]:
    """A hub whose model info answers at once but whose file downloads hang for 30 s: huggingface_hub's own
    retry of the config.json HEAD (60 s timeout, back-off) is what only the total deadline bounds."""
    state = HubState(repos=dict(hub_repos), stall_s=30.0, stall_only="/resolve/")
    with serve_hub(state) as url:
        yield url
