"""Schemathesis against a live server, from the committed openapi/openapi.json, every operation:
zero 5xx, zero schema violations, invalid input rejected. Bounded so CI keeps it true in ~1 minute.

Twice: anonymously (simulation off), and with a valid API key and simulation on (bounded: one trace
process, a 1 s deadline), so the protected operations run past their 401 and simulation requests reach
the pool (only the operations a key changes, a few examples each). POST /v1/calibrations is left out of
the keyed run: a valid one starts real training trials.

More examples locally: ADVISOR_FUZZ_EXAMPLES=500 ADVISOR_FUZZ_KEYED_EXAMPLES=100 pytest tests/api/test_fuzz.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import negative_data_rejection, positive_data_acceptance  # noqa: E402

OPENAPI = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
EXAMPLES = int(os.environ.get("ADVISOR_FUZZ_EXAMPLES", "40"))
KEYED_EXAMPLES = int(os.environ.get("ADVISOR_FUZZ_KEYED_EXAMPLES", "4"))
KEY = "fuzz-key-" + "0" * 16

schema = schemathesis.openapi.from_path(OPENAPI)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("ADVISOR_FUZZ_EXAMPLES") is None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_openapi(case, live_url: str) -> None:
    # positive_data_acceptance is left out on purpose: a schema-valid body can still name an unknown
    # model (404) or ask for something impossible (bf16 on a T4: 422) -- those answers are correct.
    case.call_and_validate(base_url=live_url, excluded_checks=[positive_data_acceptance])


@pytest.fixture(scope="module")
def keyed_live_url(tmp_path_factory: pytest.TempPathFactory):
    """A live server with an API key and simulation on, bounded so fuzzed traces cannot pile up."""
    from advisor.api.app import create_app
    from advisor.api.settings import Settings
    from advisor.api.testing import serve_in_thread

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("keyed-live-data"),
        api_keys=[KEY],
        allow_simulation=True,
        simulation_workers=1,
        simulation_queue=1,
        simulation_queue_wait_s=1,
        simulation_deadline_s=1,
        hub_lookups=False,
        job_gpu="cpu",
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url


#: the operations a key changes: the protected ones, and the advice routes (simulation needs a key)
KEYED = schema.include(path_regex=r"^/v1/(files|fine_tuning|calibrations|recommend|estimate)").exclude(
    method="POST", path="/v1/calibrations"
)


@KEYED.parametrize()
@settings(
    max_examples=KEYED_EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("ADVISOR_FUZZ_KEYED_EXAMPLES") is None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_with_a_key_and_simulation_on(case, keyed_live_url: str) -> None:
    case.call_and_validate(
        base_url=keyed_live_url,
        headers={"Authorization": f"Bearer {KEY}"},
        # negative cases are the anonymous run's: here the key is always sent, so "missing Authorization"
        # cases cannot be rejected
        excluded_checks=[positive_data_acceptance, negative_data_rejection],
    )
