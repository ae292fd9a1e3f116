"""advisor.client against the real app: sync over a live loopback server, async in-process and live."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from advisor.api.app import create_app
from advisor.api.schemas import PlanOut, RecommendResponse
from advisor.api.settings import Settings
from advisor.api.testing import serve_in_thread
from advisor.client import AdvisorAPIError, AdvisorClient, AsyncAdvisorClient

KEY = "client-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("client-data"), api_keys=[KEY]))
    with serve_in_thread(app) as url:
        yield url


def test_sync_recommend_then_estimate_the_chosen_plan(server: str) -> None:
    with AdvisorClient(server) as client:
        rec = client.recommend("meta-llama/Llama-2-7b-hf", gpu="rtx-4090", workload={"dataset_tokens": 5_000_000})
        assert isinstance(rec, RecommendResponse) and rec.plans
        best = rec.plans[0]
        assert isinstance(best.plan, PlanOut) and best.plan.gpu_id == "rtx-4090"
        assert rec.workload.dataset_tokens == 5_000_000
        assert not any(a.startswith("dataset_tokens") for a in rec.assumptions)
        assert any(a.startswith("seq_len not given") for a in rec.assumptions), "left-out fields stay left out"
        est = client.estimate("meta-llama/Llama-2-7b-hf", best.plan, workload={"dataset_tokens": 5_000_000})
        assert est.plan.id == best.plan.id
        assert est.peak_memory_gib == best.peak_memory_gib and est.cost_usd == best.cost_usd


def test_sync_catalogs_and_operations(server: str) -> None:
    with AdvisorClient(server) as client:
        assert client.gpus().count == len(client.gpus().gpus) > 5
        assert client.gpu("RTX 4090").id == "rtx-4090"
        assert client.model("meta-llama/Llama-2-7b-hf").name == "llama-2-7b"
        assert client.models().count > 10
        assert client.health().status == "ok"
        assert client.ready().status == "ready"
        assert "advisor_http_requests_total" in client.metrics()


def test_errors_raise_with_the_server_fields(server: str) -> None:
    with AdvisorClient(server) as client:
        with pytest.raises(AdvisorAPIError) as exc:
            client.recommend("lama-2-7b", gpu="rtx-4090")
        err = exc.value
        assert err.status == 404 and err.code == "unknown_model" and err.field == "model"
        assert "llama-2-7b" in err.suggestions and err.request_id
        with pytest.raises(AdvisorAPIError) as exc:
            client.gpu("rtx-409")
        assert exc.value.status == 404 and "rtx-4090" in exc.value.suggestions
        with pytest.raises(AdvisorAPIError) as exc:
            client.recommend("llama-2-7b", gpu="t4", dtype="bf16")
        assert exc.value.status == 422 and exc.value.field == "dtype"


def test_bad_input_fails_locally_before_any_request() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request should be sent, got {request.url}")

    http = httpx.Client(base_url="http://127.0.0.1:9", transport=httpx.MockTransport(refuse))
    client = AdvisorClient(http_client=http)
    with pytest.raises(ValidationError):
        client.recommend("llama-2-7b", workload={"seq_len": 0})
    with pytest.raises(ValidationError):
        client.recommend("llama-2-7b", objective="cheapest")
    http.close()


def test_api_key_is_sent_as_bearer(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_keys=[KEY], lock_advice=True))
    with serve_in_thread(app) as url:
        with AdvisorClient(url) as anonymous, pytest.raises(AdvisorAPIError) as exc:
            anonymous.gpus()
        assert exc.value.status == 401
        with AdvisorClient(url, api_key=KEY) as client:
            assert client.gpus().count > 0


def test_async_client_in_process_and_over_loopback(server: str, tmp_path: Path) -> None:
    async def run() -> None:
        app = create_app(Settings(data_dir=tmp_path))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://advisor") as http:
            client = AsyncAdvisorClient(http_client=http)
            rec = await client.recommend("qwen2.5-0.5b", gpu=["t4", "l4"], objective="time", limit=3)
            assert len(rec.plans) == 3 and rec.objective == "time"
            est = await client.estimate("qwen2.5-0.5b", rec.plans[0].plan)
            assert est.plan.id == rec.plans[0].plan.id
            assert (await client.gpu("l4")).id == "l4"
            with pytest.raises(AdvisorAPIError):
                await client.model("no-such-model-anywhere")
        async with AsyncAdvisorClient(server) as live:
            results = await asyncio.gather(*(live.recommend("llama-2-7b", gpu=g) for g in ("t4", "l4", "a10g")))
            assert [r.gpus for r in results] == [["t4"], ["l4"], ["a10g"]]
            assert (await live.ready()).status == "ready"
            assert (await live.health()).status == "ok"

    asyncio.run(run())


def test_both_clients_share_one_request_builder_and_translator() -> None:
    """The same call sends the same request from both clients, and the same answer parses (or raises) alike."""
    import inspect

    seen: list[tuple[str, str, bytes, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(
            (request.method, request.url.raw_path.decode(), request.content, request.headers.get("authorization"))
        )
        if request.url.path == "/metrics":
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(404, json={"code": "unknown_gpu", "detail": "no", "field": "gpu", "request_id": "r1"})

    transport = httpx.MockTransport(answer)
    sync = AdvisorClient(http_client=httpx.Client(base_url="http://x", transport=transport), api_key=KEY)
    aio = AsyncAdvisorClient(http_client=httpx.AsyncClient(base_url="http://x", transport=transport), api_key=KEY)
    errors = []
    for call in (lambda c: c.gpu("rtx 4090"), lambda c: c.metrics()):
        with pytest.raises(AdvisorAPIError) as exc:
            call(sync)
        errors.append(exc.value)

        async def run(call=call) -> None:
            with pytest.raises(AdvisorAPIError) as exc:
                await call(aio)
            errors.append(exc.value)

        asyncio.run(run())
    assert seen[0] == seen[1] == ("GET", "/v1/gpus/rtx%204090", b"", f"Bearer {KEY}")
    assert [(e.status, e.code, e.field, e.request_id) for e in errors[:2]] == [(404, "unknown_gpu", "gpu", "r1")] * 2
    assert [(e.status, e.code, e.detail) for e in errors[2:]] == [(502, "http_error", "bad gateway")] * 2
    for name in ("recommend", "estimate", "gpu", "model", "ready"):
        sync_method, async_method = getattr(AdvisorClient, name), getattr(AsyncAdvisorClient, name)
        assert inspect.signature(sync_method) == inspect.signature(async_method)
        assert inspect.iscoroutinefunction(async_method) and not inspect.iscoroutinefunction(sync_method)
        assert sync_method.__doc__ and sync_method.__doc__ == async_method.__doc__
    assert list(inspect.signature(AdvisorClient.recommend).parameters)[:3] == ["self", "model", "gpu"]


def test_files_jobs_and_models_errors_come_through_the_one_translation(server: str) -> None:
    """OpenAI's routes answer `{"error": {...}}` with 400 where advice answers 422: the client raises the
    same AdvisorAPIError (code, field, request id) for both."""
    with AdvisorClient(server, api_key=KEY) as client:
        line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        f = client.upload_file("t.jsonl", line * 3)
        assert f.id.startswith("file-") and f.examples == 3
        assert [x.id for x in client.files().data] == [f.id]
        with pytest.raises(AdvisorAPIError) as missing:
            client.create_job("meta-llama/Llama-2-7b-hf", "file-doesnotexist")
        assert (missing.value.status, missing.value.code, missing.value.field) == (404, "not_found", "training_file")
        assert missing.value.request_id
        with pytest.raises(AdvisorAPIError) as bad:
            client.create_job("m", f.id, seed=-1)
        assert (bad.value.status, bad.value.code, bad.value.field) == (400, "invalid_input", "seed")
        with pytest.raises(AdvisorAPIError) as mixed:
            client.create_job("m", f.id, method={"type": "supervised", "seq_len": 64, "advisor": {"type": "full"}})
        assert (mixed.value.status, mixed.value.field) == (400, "method.seq_len")
        with pytest.raises(AdvisorAPIError) as gone:
            client.job("ftjob-doesnotexist")
        assert gone.value.status == 404 and gone.value.field == "fine_tuning_job_id"
        assert client.jobs().data == []
        listed = client.openai_models()
        assert listed.object == "list" and "meta-llama/Llama-2-7b-hf" in [m.id for m in listed.data]
        assert client.openai_model("meta-llama/Llama-2-7b-hf").owned_by == "meta-llama"
        assert client.delete_file(f.id).deleted and client.files().data == []
    with AdvisorClient(server) as anonymous, pytest.raises(AdvisorAPIError) as unauthorized:
        anonymous.jobs()
    assert unauthorized.value.status == 401
