"""Projection heads: the v1 linear layer, the v2 two-layer MLP, and MoCo v3's MLP with batch norm."""

from torch import nn

from ..errors import ConfigError

HEADS = ("linear", "mlp", "v3")


def bn_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: `num_layers` linear layers without bias; BN and ReLU after each hidden one, and after the
    last a BN without affine parameters (`last_bn`), so that the output is normalised but not re-scaled."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def build_head(kind: str, in_dim: int, out_dim: int = 128, hidden_dim: int = 2048, layers: int = 2) -> nn.Module:
    """v1: Linear(in, out). v2: Linear(in, hidden) -> ReLU -> Linear(hidden, out). v3: `bn_mlp` of `layers` layers
    (MoCo v3's projector: 2 for ResNets, 3 for ViTs)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    if kind == "v3":
        return bn_mlp(layers, in_dim, hidden_dim, out_dim)
    raise ConfigError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")


class Encoder(nn.Module):
    """backbone + projection head. `backbone` is what evaluation and transfer keep."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        return self.head(self.backbone(x))
