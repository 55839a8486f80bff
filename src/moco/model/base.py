"""The interface every pretraining method implements, and the registry that names them.

A method wraps a query encoder (backbone + head) and turns two augmented views of a batch into
contrastive logits and labels; the trainer computes `loss(logits, labels)`, steps the optimizer on
`trainable_parameters()`, and calls `before_step(progress)` before every step for per-iteration schedules.
Everything else the trainer and evaluation need (is a second view used, how to compile and synchronise BN,
which configs can run, the diagnostics' chance level and recent keys, how ResNets start, which linear protocol
evaluates it) is asked of the method, so nothing branches on a method's name. A new method subclasses `Method` and registers itself:

    @register("my_method")
    class MyMethod(Method):
        @classmethod
        def build(cls, cfg, encoder, num_images): return cls(encoder, ...)
        def forward(self, x_q, x_k, index=None): ...  # -> (logits (B, C), labels (B,))
        def chance(self, batch_size): ...

and `method: my_method` in a config (or `--method my_method`) then trains it.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, PretrainConfig
from ..errors import ConfigError


class Method(nn.Module, ABC):
    """A contrastive pretraining method around a query encoder `encoder_q` (backbone + head).

    Subclasses implement `build`, `forward` and `chance`; the other hooks have defaults that fit a method
    whose only trained module is `encoder_q`.
    """

    name: ClassVar[str] = ""  # set by @register
    needs_key_view: ClassVar[bool] = True  # whether forward uses a second augmented view x_k
    zero_init_residual: ClassVar[bool] = False  # ResNet backbones start each residual block as the identity
    linear_protocol: ClassVar[str] = "v1"  # the linear protocol its paper evaluates it with (moco lincls --protocol)

    def __init__(self, encoder_q: nn.Module) -> None:
        super().__init__()
        self.encoder_q = encoder_q

    @classmethod
    @abstractmethod
    def build(cls, cfg: ModelConfig, encoder: nn.Module, num_images: int) -> "Method":
        """The method `cfg` describes around `encoder`; `num_images` is the training set's size."""

    @classmethod
    def check(cls, cfg: PretrainConfig, world: int) -> None:
        """Raise ConfigError if this method cannot run `cfg` on `world` processes (torchrun)."""
        if cfg.model.symmetric:
            raise ConfigError(f"the symmetric loss is not implemented for method={cls.name}; drop --symmetric")
        if world > 1:
            raise ConfigError(f"method={cls.name} runs on one process; use method=moco with torchrun")

    @abstractmethod
    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor | None,
                index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views (B, C, H, W) of the same images (x_k None if not `needs_key_view`), and the images'
        indices in the data set (None when streamed) -> logits (B', candidates), labels (B',)."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """InfoNCE: cross-entropy of the logits (computed in fp32) against the positives' indices, x `loss_scale`."""
        return F.cross_entropy(logits.float(), labels)

    @property
    def loss_scale(self) -> float:
        """The factor `loss` multiplies the mean cross-entropy by (for the diagnostics' chance level): 1."""
        return 1.0

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer trains: the query encoder's parameters that require gradients."""
        return (p for p in self.encoder_q.parameters() if p.requires_grad)

    def before_step(self, progress: float) -> None:
        """Called before every optimizer step with the fraction of training done (step / total steps), for
        per-iteration schedules of the method's own (e.g. MoCo v3's momentum coefficient). Nothing by default."""

    def convert_sync_bn(self) -> None:
        """torchrun on GPUs with sync_bn: synchronised BN over the global batch where the method allows it; here
        the query encoder only (keys keep their per-group BN: shuffling BN)."""
        self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)

    def compile_encoders(self) -> None:
        """torch.compile the encoders in place (their parameter names, so checkpoints, stay the same)."""
        self.encoder_q.compile()

    @property
    def backbone(self) -> nn.Module:
        """The query encoder's backbone: what the kNN monitor evaluates and checkpoints export."""
        return self.encoder_q.backbone

    @abstractmethod
    def chance(self, batch_size: int) -> tuple[int, int]:
        """(candidates per query, first step whose negatives are all real keys rather than an initial fill):
        the loss of an untrained model is about log(candidates) from that step on."""

    def key_sample(self) -> torch.Tensor:
        """Recent L2-normalised keys (N, D), for the collapse diagnostic; empty when the method keeps none."""
        return torch.zeros(0)

    def queue_size(self) -> int:
        """How many keys of earlier batches the method keeps as negatives (0: none). Once that nears the keys
        of an epoch, a query meets its own image's earlier key among them (a diagnostic warns)."""
        return 0

    def keys_per_image(self) -> int:
        """Keys each image adds to the queue per step (2 with a symmetric loss)."""
        return 1


def check_temperature(T: float) -> None:
    """A softmax temperature must be a finite number > 0."""
    if not 0 < T < math.inf:
        raise ConfigError(f"temperature T must be a finite number > 0, got {T}")


METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a Method subclass available as `method: name` in configs."""

    def add(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({name!r}) decorates a subclass of moco.model.Method, not {cls!r}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def method_class(name: str) -> type[Method]:
    """The registered method called `name`."""
    if name not in METHODS:
        raise ConfigError(f"method={name!r} is unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name]
