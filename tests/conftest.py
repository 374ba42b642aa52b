"""Shared fixtures: the real data sets under ../shared/data (tests skip when it is absent)."""

import shutil
import sys
from pathlib import Path

import pytest

from hub_fixtures import loopback_hub  # noqa: F401  (a loopback model hub for push/load tests)


SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
# The benchmark scripts import their sibling `_report.py`, as running a script from benchmarks/ allows; tests import them
# the same way (tests/test_benchmarks.py). The only path entry the suite adds.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA_DIR} (see the project README: ../shared/data)")
    return SHARED_DATA_DIR


@pytest.fixture
def two_process_launcher(worker_id) -> tuple[str, ...]:
    """`accelerate launch` of two CPU processes on a rendezvous port of this test worker's own (as transformers'
    `get_torch_dist_unique_port` does). Two workers launching at once can both find the default port 29500 free before
    either binds it; the likely cause of a two-process test that hung in CI (2026-12-05)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    worker_index = int(worker_id[2:]) if worker_id.startswith("gw") else 0  # "master" without xdist
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu_2proc.yaml"
    return (accelerate, "launch", "--config_file", str(config), "--main_process_port", str(29510 + worker_index))


def _load_or_skip(path: Path, loader):
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return loader(path)


@pytest.fixture(scope="session")
def ml1m_events(shared_data_dir):
    """ML-1M loaded once per session (about 1 s)."""
    from pinfm_hf.data import load_movielens_atomic

    return _load_or_skip(shared_data_dir / "ml-1m" / "ml-1m.inter", load_movielens_atomic)


@pytest.fixture(scope="session")
def taobao_events(shared_data_dir):
    from pinfm_hf.data import load_taobao

    return _load_or_skip(shared_data_dir / "taobao-sample" / "UserBehavior.csv", load_taobao)
