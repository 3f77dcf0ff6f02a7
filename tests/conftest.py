"""Settings every test shares."""

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """ldm's cache (model hashes) in a folder of the test session, not the user's ~/.cache."""
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ldm-cache"))
