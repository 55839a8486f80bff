"""Optional dependencies: each feature that needs one names the extra that installs it.

The base install (torch, torchvision, numpy, pyyaml, tqdm, safetensors, pillow) pretrains and evaluates;
the rest come with extras: `report` (matplotlib, scikit-learn), `transfer` (pycocotools), `shards`
(webdataset), `tensorboard`, `timm`, or `all`.
"""

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingExtra

# The extra of pyproject.toml that installs each optional module.
EXTRAS = {"matplotlib": "report", "sklearn": "report", "pycocotools": "transfer", "webdataset": "shards",
          "tensorboard": "tensorboard", "timm": "timm"}


def require(module: str, purpose: str) -> ModuleType:
    """`import module`, or a MissingExtra error naming the extra that installs it and what needed it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(module.split(".")[0], EXTRAS[module.split(".")[0]], purpose) from None


def available(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
