"""Projection heads: the v1 linear layer and the v2 two-layer MLP."""

from torch import nn

from ..errors import ConfigError

HEADS = ("linear", "mlp")


def build_head(kind: str, in_dim: int, out_dim: int = 128, hidden_dim: int = 2048) -> nn.Module:
    """v1: Linear(in, out). v2: Linear(in, hidden) -> ReLU -> Linear(hidden, out)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    raise ConfigError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")


class Encoder(nn.Module):
    """backbone + projection head. `backbone` is what evaluation and transfer keep."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        return self.head(self.backbone(x))
