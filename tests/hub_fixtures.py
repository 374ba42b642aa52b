"""Pytest fixture for the loopback Hub test double (`tests/hub_server.py`).

Registered suite-wide by `tests/conftest.py` (`from hub_fixtures import loopback_hub  # noqa: F401`).
"""

import pytest
from huggingface_hub import constants

from hub_server import LoopbackHub


@pytest.fixture
def loopback_hub(tmp_path, monkeypatch):
    """A running `LoopbackHub` with empty storage under `tmp_path`; use `hub.endpoint` and `hub.token`.

    In-process calls need `HfApi(endpoint=hub.endpoint, token=...)` / `hf_hub_download(..., endpoint=hub.endpoint)`;
    child processes get `env=hub.child_env(tmp_path / "hf_home")`.
    """
    # Building request headers otherwise fetches an agent registry from huggingface.co (telemetry), once a day.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # The test suite runs with HF_HUB_OFFLINE=1 (no internet); the loopback hub is on this machine.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with LoopbackHub(tmp_path / "loopback-hub") as hub:
        yield hub
