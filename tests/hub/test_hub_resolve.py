"""Hub ids resolve through huggingface_hub against the test hub (a real HTTP server): counts, revisions,
gated repos, errors, offline mode, the in-process cache, bounded network time."""

from __future__ import annotations

import time

import pytest
from hub_checkpoints import parameter_total
from hub_server import GATED_TOKEN, HubHandle

from advisor import hub
from advisor.catalog import resolve_model
from advisor.errors import InvalidInputError, UnknownModelError
from advisor.hub import HubOptions, parse_hub_id, resolve_hub_model


def opts(test_hub: HubHandle, **kw) -> HubOptions:
    return HubOptions(endpoint=test_hub.url, **kw)


def one_line_fix(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "To fix:" in text, text
    return text


def test_hub_id_shapes():
    assert parse_hub_id("Qwen/Qwen3-8B") == ("Qwen/Qwen3-8B", None)
    assert parse_hub_id("Qwen/Qwen3-8B@v1.0") == ("Qwen/Qwen3-8B", "v1.0")
    assert parse_hub_id("https://huggingface.co/Qwen/Qwen3-8B") == ("Qwen/Qwen3-8B", None)
    assert parse_hub_id("hf://meta-llama/Llama-3.2-3B@refs/pr/1") == ("meta-llama/Llama-3.2-3B", "refs/pr/1")
    for not_an_id in ("llama-2-7b", "13B", "/abs/path", "~/models/x", "a/b/c", "../x", "./x/y"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_resolves_by_hub_id_with_the_checkpoint_count(test_hub: HubHandle, hf_cache, no_models):
    repo = test_hub.state.repos["Qwen/Qwen3-8B"]
    main = repo.refs["main"]
    spec = resolve_model("Qwen/Qwen3-8B", no_models, hub=opts(test_hub))
    stored = parameter_total(repo.commits[main].files)  # transformers' own count of the architecture
    assert spec.hf_id == "Qwen/Qwen3-8B" and spec.revision == main
    assert spec.checkpoint_params == stored
    assert spec.checkpoint_dtypes == (("BF16", stored),)
    assert abs(spec.param_count - stored) / stored < 0.005
    assert spec.source == f"{test_hub.url}/Qwen/Qwen3-8B/blob/{main}/config.json"
    assert "checkpoint stores" not in spec.note  # within 0.5%: nothing to say


def test_sharded_headers_when_the_info_has_no_summary(test_hub: HubHandle, hf_cache):
    """A mirror without the model-info summary: the index and each shard's header (range requests) count."""
    repo = test_hub.state.repos["Qwen/Qwen2.5-3B"]
    mark = len(test_hub.state.requests)
    spec = resolve_hub_model("Qwen/Qwen2.5-3B", options=opts(test_hub))
    seen = test_hub.requests_since(mark)
    assert any("model.safetensors.index.json" in r for r in seen)
    assert sum(r.startswith("GET /lfs-cdn/") for r in seen) == 2  # one header read per shard
    stored = parameter_total(repo.commits[repo.refs["main"]].files)
    assert spec.checkpoint_params == stored
    assert abs(spec.param_count - stored) / stored < 0.005


def test_revision_by_name_at_sign_and_sha(test_hub: HubHandle, hf_cache, no_models):
    repo = test_hub.state.repos["Qwen/Qwen2.5-3B"]
    legacy = repo.refs["legacy"]
    by_arg = resolve_model("Qwen/Qwen2.5-3B", no_models, revision="legacy", hub=opts(test_hub))
    by_at = resolve_model("Qwen/Qwen2.5-3B@legacy", no_models, hub=opts(test_hub))
    by_sha = resolve_model("Qwen/Qwen2.5-3B", no_models, revision=legacy, hub=opts(test_hub))
    main = resolve_model("Qwen/Qwen2.5-3B", no_models, hub=opts(test_hub))
    assert by_arg.revision == by_at.revision == by_sha.revision == legacy
    assert by_arg.hidden_size == 3584 and main.hidden_size == 2048  # the legacy branch holds another model
    assert by_arg.checkpoint_params == parameter_total(repo.commits[legacy].files)
    with pytest.raises(InvalidInputError) as exc:
        resolve_model("Qwen/Qwen2.5-3B", no_models, revision="no-such-branch", hub=opts(test_hub))
    assert exc.value.field == "model_revision" and "no-such-branch" in one_line_fix(exc)
    with pytest.raises(InvalidInputError, match="give the revision once"):
        resolve_model("Qwen/Qwen2.5-3B@legacy", no_models, revision="main", hub=opts(test_hub))


def test_a_catalog_model_at_a_revision_goes_to_the_hub_and_t5_stays_supported(test_hub: HubHandle, hf_cache):
    mark = len(test_hub.state.requests)
    plain = resolve_model("google/flan-t5-xl", hub=opts(test_hub))  # the catalog answers, no network
    assert plain.source != "" and plain.revision is None and test_hub.requests_since(mark) == []
    pinned = resolve_model("flan-t5-xl", revision="main", hub=opts(test_hub))
    assert pinned.family == "t5" and pinned.revision == test_hub.state.repos["google/flan-t5-xl"].refs["main"]
    assert pinned.checkpoint_params is not None


def test_gated_repo_needs_the_right_token(test_hub: HubHandle, hf_cache):
    with pytest.raises(InvalidInputError) as exc:
        resolve_hub_model("meta-llama/Llama-3.2-3B", options=opts(test_hub))
    text = one_line_fix(exc)
    assert exc.value.field == "model" and "gated" in text and "no token was sent" in text and "HF_TOKEN" in text
    with pytest.raises(InvalidInputError) as exc:
        resolve_hub_model("meta-llama/Llama-3.2-3B", options=opts(test_hub, token="hf_wrong_token_for_this_repo"))
    assert "has no access" in one_line_fix(exc)
    spec = resolve_hub_model("meta-llama/Llama-3.2-3B", options=opts(test_hub, token=GATED_TOKEN))
    assert spec.num_layers == 28 and spec.checkpoint_params is not None
    assert abs(spec.param_count - 3_212_749_824) / 3_212_749_824 < 0.005  # Meta's published count


def test_unknown_repo_missing_config_and_not_a_causal_lm(test_hub: HubHandle, hf_cache, no_models):
    with pytest.raises(UnknownModelError) as exc:
        resolve_model("acme/no-such-model", no_models, hub=opts(test_hub))
    assert exc.value.field == "model" and "no model repo 'acme/no-such-model'" in one_line_fix(exc)
    with pytest.raises(InvalidInputError) as exc:
        resolve_model("acme/weights-only", no_models, hub=opts(test_hub))
    assert "no config.json" in one_line_fix(exc)
    with pytest.raises(InvalidInputError) as exc:
        resolve_model("google-bert/bert-base-uncased", no_models, hub=opts(test_hub))
    assert "not a causal language model" in one_line_fix(exc) and "BertForMaskedLM" in str(exc.value)


def test_lookups_off_never_touch_the_network(test_hub: HubHandle, hf_cache, no_models):
    mark = len(test_hub.state.requests)
    with pytest.raises(InvalidInputError) as exc:
        resolve_model("Qwen/Qwen3-8B", no_models, hub=opts(test_hub, enabled=False))
    text = one_line_fix(exc)
    assert "look-ups are off" in text and "config.json inline" in text
    assert test_hub.requests_since(mark) == []
    assert resolve_model("qwen2.5-7b", hub=opts(test_hub, enabled=False)).name == "qwen2.5-7b"  # catalog still works


def test_lookups_off_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ADVISOR_HUB_LOOKUPS", "0")
    assert HubOptions.from_env().enabled is False
    with pytest.raises(InvalidInputError, match="look-ups are off"):
        resolve_model("someorg/some-model")
    monkeypatch.setenv("ADVISOR_HUB_LOOKUPS", "maybe")
    with pytest.raises(InvalidInputError, match="not a boolean"):
        HubOptions.from_env()


def test_resolved_specs_are_cached_in_process(test_hub: HubHandle, hf_cache):
    t0 = time.perf_counter()
    first = resolve_hub_model("Qwen/Qwen3-8B", options=opts(test_hub))
    t1 = time.perf_counter()
    mark = len(test_hub.state.requests)
    again = resolve_hub_model("Qwen/Qwen3-8B", options=opts(test_hub))
    t2 = time.perf_counter()
    assert again is first and test_hub.requests_since(mark) == []
    assert t2 - t1 < (t1 - t0) / 10, (t1 - t0, t2 - t1)
    print(f"hub resolve: first {1e3 * (t1 - t0):.1f} ms, cached {1e6 * (t2 - t1):.1f} us")
    by_sha = resolve_hub_model("Qwen/Qwen3-8B", revision=first.revision, options=opts(test_hub))
    assert by_sha is first and test_hub.requests_since(mark) == []


def test_offline_cache_miss_then_hit(test_hub: HubHandle, hf_cache, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    with pytest.raises(InvalidInputError) as exc:
        resolve_hub_model("Qwen/Qwen3-8B", options=opts(test_hub, offline=True))
    assert "not in the local Hugging Face cache" in one_line_fix(exc)
    online = resolve_hub_model("Qwen/Qwen3-8B", options=opts(test_hub))
    hub.clear_cache()  # a new process: only huggingface_hub's disk cache is left
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    mark = len(test_hub.state.requests)
    offline = resolve_hub_model("Qwen/Qwen3-8B", options=opts(test_hub))
    assert test_hub.requests_since(mark) == []
    assert offline.num_layers == online.num_layers and offline.revision == online.revision
    assert offline.checkpoint_params is None and "offline" in offline.note


def test_a_stalled_hub_is_bounded(stalled_hub: str, hf_cache):
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError) as exc:
        resolve_hub_model(
            "Qwen/Qwen3-8B", options=HubOptions(endpoint=stalled_hub, request_timeout_s=0.5, deadline_s=2.0)
        )
    elapsed = time.perf_counter() - t0
    assert elapsed < 4.0, elapsed
    text = one_line_fix(exc)
    assert "did not answer" in text or "timed out" in text


def test_the_total_deadline_bounds_the_librarys_retries(slow_files_hub: str, hf_cache):
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError) as exc:
        resolve_hub_model(
            "Qwen/Qwen3-8B", options=HubOptions(endpoint=slow_files_hub, request_timeout_s=0.5, deadline_s=2.0)
        )
    elapsed = time.perf_counter() - t0
    assert 1.9 < elapsed < 4.0, elapsed
    assert "did not answer for 'Qwen/Qwen3-8B' within 2 s" in one_line_fix(exc)


def test_an_unreachable_hub_falls_back_to_the_disk_cache(test_hub: HubHandle, hf_cache):
    """As huggingface_hub does without HF_HUB_OFFLINE: no answer from the Hub, the cached config answers."""
    import socket

    online = resolve_hub_model("Qwen/Qwen3-8B", options=opts(test_hub))
    hub.clear_cache()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    cached = resolve_hub_model("Qwen/Qwen3-8B", options=HubOptions(endpoint=dead))
    assert cached.revision == online.revision and cached.checkpoint_params is None
    assert "the Hub did not answer" in cached.note
    with pytest.raises(InvalidInputError) as exc:
        resolve_hub_model("Qwen/Qwen2.5-3B", options=HubOptions(endpoint=dead))
    assert "cannot reach the Hugging Face Hub" in one_line_fix(exc)
