import pytest


def pytest_collection_modifyitems(config, items):
    """Tests that need the `train` extra skip cleanly where torch is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="needs the train extra (torch)")
        for item in items:
            if "needs_torch" in item.keywords:
                item.add_marker(skip)
