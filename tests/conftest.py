"""Shared test set-up: offline Hub, small thread count, and the folder of optional real data."""
import os

# Must be set before huggingface_hub is imported anywhere: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The real data files (MedMNIST .npz, the LIDC-IDRI annotation SQLite) lie in ../shared/data beside the
# repository unless MLMI_ZOO_DATA already names another folder. The library has no default folder, so
# the choice is exported for the tests and for the processes they start (CLI, torchrun, evaluation).
SHARED_DATA = Path(os.environ.get("MLMI_ZOO_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
os.environ["MLMI_ZOO_DATA"] = str(SHARED_DATA)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip tests marked ``data`` when the data folder is absent."""
    if item.get_closest_marker("data") is not None and not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real data folder {SHARED_DATA}, which is absent; "
                    f"export MLMI_ZOO_DATA=/path/to/data to run it")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (bit-reproducible training runs), restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    """The folder of real data files; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present (set MLMI_ZOO_DATA)")
    return SHARED_DATA
