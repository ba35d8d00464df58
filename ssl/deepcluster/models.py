"""Convnets for DeepCluster: a trunk, an MLP whose output is clustered, and a replaceable linear head.

The paper's AlexNet and VGG16 (batch norm) follow Caron et al. 2018: conv trunk, optional fixed Sobel
input layer, a two-layer MLP (ReLU + dropout), and a linear head over the k pseudo-classes that is
re-initialised every epoch. `smallconv` is a compact net for 32-64 px images (the sample's default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelParams
from .errors import ParamError


class Sobel(nn.Module):
    """Fixed input layer: grey level, then horizontal and vertical Sobel gradients (2 channels).

    The paper uses it to keep k-means from latching onto colour, the easiest signal to cluster on.
    """

    def __init__(self) -> None:
        super().__init__()
        grey = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("grey", grey)
        self.register_buffer("kernels", torch.stack([gx, gx.t()]).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = (x * self.grey.to(x.dtype)).sum(dim=1, keepdim=True)
        return F.conv2d(g, self.kernels.to(x.dtype), padding=1)


def _conv_bn(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


SMALLCONV_WIDTHS = (32, 64, 128)


def smallconv_trunk(cin: int) -> nn.Module:
    """Three conv stages (32-64-128), each halving the resolution, then 2x2 average pooling."""
    layers: list[nn.Module] = []
    for cout in SMALLCONV_WIDTHS:
        layers += _conv_bn(cin, cout) + _conv_bn(cout, cout) + [nn.MaxPool2d(2)]
        cin = cout
    # a 2x2 grid rather than one global average: where a stroke is matters for small images
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    return nn.Sequential(*layers)


def alexnet_trunk(cin: int) -> nn.Module:
    """AlexNet conv layers with batch norm, as in the DeepCluster paper (96-256-384-384-256)."""
    cfg = [
        (96, 11, 4, 2),
        "M",
        (256, 5, 1, 2),
        "M",
        (384, 3, 1, 1),
        (384, 3, 1, 1),
        (256, 3, 1, 1),
        "M",
    ]
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(3, 2))
        else:
            cout, k, s, p = item
            layers += _conv_bn(cin, cout, k, s, p)
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(6), nn.Flatten()]
    return nn.Sequential(*layers)


def vgg16_trunk(cin: int) -> nn.Module:
    """VGG16 with batch norm (13 conv layers)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_bn(cin, int(item))
            cin = int(item)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def resnet_trunk(arch: str, cin: int) -> nn.Module:
    """A torchvision ResNet without its classifier (weights random: DeepCluster learns them)."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if cin != 3:
        net.conv1 = nn.Conv2d(cin, 64, 7, 2, 3, bias=False)
    net.fc = nn.Identity()
    return net


_TRUNK_WIDTH = {
    "smallconv": SMALLCONV_WIDTHS[-1] * 4,
    "alexnet": 256 * 6 * 6,
    "vgg16": 512,
    "resnet18": 512,
    "resnet50": 2048,
}
_MLP_WIDTH = {"smallconv": 512, "alexnet": 4096, "vgg16": 4096, "resnet18": 2048, "resnet50": 2048}


def _mlp(cin: int, hidden: int, cout: int, arch: str) -> nn.Sequential:
    """The paper's classifier MLP (dropout, ReLU) for the big nets; batch norm instead of dropout
    for the small one, whose few steps per epoch cannot afford dropout's noise."""
    if arch == "smallconv":
        return nn.Sequential(
            nn.Linear(cin, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, cout),
        )
    return nn.Sequential(
        nn.Dropout(0.5),
        nn.Linear(cin, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, cout),
    )


class DeepClusterNet(nn.Module):
    """Trunk -> MLP (the clustered embedding) -> linear head over k pseudo-classes."""

    def __init__(self, params: ModelParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.sobel = Sobel() if params.sobel else None
        cin = 2 if params.sobel else 3
        builders = {"smallconv": smallconv_trunk, "alexnet": alexnet_trunk, "vgg16": vgg16_trunk}
        if params.arch in builders:
            self.trunk = builders[params.arch](cin)
        else:
            self.trunk = resnet_trunk(params.arch, cin)
        hidden = _MLP_WIDTH[params.arch]
        self.mlp = _mlp(_TRUNK_WIDTH[params.arch], hidden, params.embed_dim, params.arch)
        self._init_weights()
        # the head comes last so the body's initial weights do not depend on k
        self.head = self._new_head(num_classes)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                # PyTorch's default (scaled) init: the paper's N(0, 0.01) starves narrow MLPs
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features k-means sees: the MLP output before its final ReLU."""
        if self.sobel is not None:
            x = self.sobel(x)
        return self.mlp(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.embed(x)))

    def reset_head(self, num_classes: int) -> None:
        """A fresh linear head each epoch: the pseudo-label ids change meaning between clusterings."""
        self.head = self._new_head(num_classes).to(self.head.weight.device)

    def _new_head(self, num_classes: int) -> nn.Linear:
        head = nn.Linear(self.params.embed_dim, num_classes)
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)
        return head


def build_model(params: ModelParams, num_classes: int) -> DeepClusterNet:
    return DeepClusterNet(params, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_resolution(arch: str, resolution: int) -> None:
    """AlexNet's stride-4 stem and three poolings need >= 63 px; the others pool down safely."""
    minimum = {"alexnet": 63, "vgg16": 32}.get(arch, 8)
    if resolution < minimum:
        raise ParamError(
            f"model.arch = {arch!r} needs data.resolution >= {minimum}, got {resolution}"
        )
