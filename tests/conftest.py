import os
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def pytest_configure(config):
    # Tests run two to a machine of two cores (pytest -n 2): one thread each avoids oversubscription.
    torch.set_num_threads(1)
    os.environ.setdefault("MOCO_DATA", str(Path(__file__).resolve().parents[1] / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
