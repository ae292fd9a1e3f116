"""The page's routes without a browser: what / and /docs reference, the package's static files, /web/deployment."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

KEY = "routes-test-key-" + "r" * 20


@pytest.fixture
def client(tmp_path: Path) -> Any:
    from advisor.api.app import create_app
    from advisor.api.settings import Settings

    settings = Settings(data_dir=tmp_path, api_keys=[KEY], job_gpu="cpu", model_roots=[str(tmp_path)], access_log=False)
    with TestClient(create_app(settings)) as c:
        yield c


def refs(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


def test_the_page_and_docs_reference_only_the_apps_own_files(client: Any) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    docs = client.get("/docs")
    assert docs.status_code == 200
    for html in (page.text, docs.text):
        for url in refs(html):
            if url.startswith("#"):  # a link within the page
                continue
            assert url.startswith("/"), f"{url} is not served by the app"
            assert client.get(url).status_code == 200, url
    assert "/web/static/swagger/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    assert client.get("/redoc").status_code == 404  # ReDoc only exists as a CDN script: not served
    # the page's script fetches only relative /v1 and /web paths
    js = client.get("/web/static/app.js").text
    assert not re.search(r"""fetch\(\s*["'`]https?:""", js) and "http://" not in js.replace(
        "http://www.w3.org/2000/svg", ""
    )


def test_static_files_are_package_data(client: Any) -> None:
    """Every file under advisor/web/static is matched by pyproject's package-data globs (so a wheel has it)."""
    import tomllib

    root = Path(__file__).parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["advisor"]
    static = root / "advisor" / "web" / "static"
    for f in static.rglob("*"):
        if f.is_file():
            rel = f.relative_to(root / "advisor")
            assert any(rel.match(g) for g in globs), f"{rel} is not package data"
            assert client.get(f"/web/static/{f.relative_to(static)}").status_code == 200


def test_deployment_needs_the_key_and_names_the_training_device(client: Any) -> None:
    assert client.get("/web/deployment").status_code == 401
    r = client.get("/web/deployment", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["gpu"]["id"] == "cpu" and d["device"] == "cpu" and d["devices"] == 1 and d["launcher"] == "local"
    assert d["gpu"]["memory_gib"] > 0 and len(d["model_roots"]) == 1
    assert "/web/deployment" not in client.get("/openapi.json").json()["paths"]
