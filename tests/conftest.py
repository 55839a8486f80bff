import os
import tempfile
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def pytest_configure(config):
    # Tests run two to a machine of two cores (pytest -n 2): one thread each avoids oversubscription.
    torch.set_num_threads(1)
    os.environ.setdefault("MOCO_DATA", str(Path(__file__).resolve().parents[1] / "data"))
    os.environ.setdefault("MOCO_CACHE", tempfile.mkdtemp(prefix="moco-test-cache-"))  # folder listings


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def config_fields() -> dict[str, object]:
    """{name: type} of every field of the pretraining config (the flags of `moco pretrain`)."""
    import dataclasses
    import typing

    from moco import config as C

    return {f.name: typing.get_type_hints(cls)[f.name]
            for cls in (C.ModelConfig, C.DataConfig, C.OptimConfig, C.RunConfig) for f in dataclasses.fields(cls)}
