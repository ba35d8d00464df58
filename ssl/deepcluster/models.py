"""Convnets for DeepCluster: a trunk, an MLP whose output is clustered, and the heads on top.

The paper's AlexNet and VGG16 (batch norm) follow Caron et al. 2018: conv trunk, optional fixed Sobel
input layer, a two-layer MLP (ReLU + dropout), and a linear head over the k pseudo-classes that is
re-initialised every epoch. DeepCluster-v2 (Caron et al. 2020) instead L2-normalises a projection
(MLP with batch norm) and scores it against fixed prototype heads, one per clustering, whose
weights are the k-means centroids. `smallconv` is a compact net for 16-64 px images.

The network takes float images in [0, 1] and standardises them itself, with statistics stored in
its state, so whoever loads model.pt (features, serving) feeds it the same way training did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelParams
from .errors import ParamError

# ImageNet statistics: the paper's normalisation, and the starting point before data statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel standardisation with statistics kept in the state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def set(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean).view(1, 3, 1, 1))
        self.std.copy_(torch.as_tensor(std).clamp_min(1e-3).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


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

    def forward(self, x: torch.Tensor, normalize: Normalize) -> torch.Tensor:
        """Gradients of the grey level of `normalize(x)`. The grey level is a weighted sum of the
        channels, so the standardisation folds into its weights: one 1x1 convolution instead of
        four passes over the batch (subtract, divide, weigh, sum)."""
        weight = self.grey / normalize.std
        bias = -(weight * normalize.mean).sum().view(1)
        g = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype))
        return F.conv2d(g, self.kernels.to(g.dtype), padding=1)


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


def _mlp(cin: int, hidden: int, cout: int, dropout: bool) -> nn.Sequential:
    """The paper's classifier MLP (dropout, ReLU) for v1's big nets; batch norm otherwise: the small
    net's few steps per epoch cannot afford dropout's noise, and v2's projection uses it too."""
    if not dropout:
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
    """Trunk -> MLP (the clustered embedding) -> heads over the pseudo-classes.

    v1: one linear head (with bias) on ReLU(embedding), replaced every epoch.
    v2: the embedding is L2-normalised; each head is a bias-free matrix of unit prototypes, set to
    the centroids of its clustering and not trained (as in the reference DeepCluster-v2).
    deepercluster: v1's kind of heads, the super-class head first, then one sub-class head per
    super-class (`methods.deepercluster.head_sizes`); `forward` gives the super-class logits.
    """

    def __init__(self, params: ModelParams, heads: list[int] | int) -> None:
        super().__init__()
        self.params = params
        self.v2 = params.method == "deepcluster-v2"
        self.normalize = Normalize()
        self.sobel = Sobel() if params.sobel else None
        cin = 2 if params.sobel else 3
        builders = {"smallconv": smallconv_trunk, "alexnet": alexnet_trunk, "vgg16": vgg16_trunk}
        if params.arch in builders:
            self.trunk = builders[params.arch](cin)
        else:
            self.trunk = resnet_trunk(params.arch, cin)
        hidden = _MLP_WIDTH[params.arch]
        dropout = not self.v2 and params.arch != "smallconv"
        self.mlp = _mlp(_TRUNK_WIDTH[params.arch], hidden, params.embed_dim, dropout)
        self._init_weights()
        # the heads come last so the body's initial weights do not depend on k
        self.heads = nn.ModuleList()
        self.reset_heads([heads] if isinstance(heads, int) else list(heads))

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

    @property
    def head_sizes(self) -> list[int]:
        return [head.out_features for head in self.heads]

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """The conv trunk's output (flattened) for float images in [0, 1]."""
        x = self.normalize(x) if self.sobel is None else self.sobel(x, self.normalize)
        return self.trunk(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features k-means sees: v1 the MLP output before its final ReLU, v2 its unit vector."""
        return self.embed_trunk(self.trunk_features(x))

    def embed_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        """`embed` from the trunk's output."""
        z = self.mlp(trunk)
        return F.normalize(z, dim=1) if self.v2 else z

    def logits(self, z: torch.Tensor) -> list[torch.Tensor]:
        """One score vector per head for embeddings `z` (v2: cosine similarity to prototypes)."""
        if self.v2:
            return [head(z) for head in self.heads]
        return [self.heads[0](F.relu(z))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.embed(x))[0]

    def reset_heads(self, sizes: list[int]) -> None:
        """Fresh heads: the pseudo-label ids change meaning between clusterings."""
        device = next(self.mlp.parameters()).device
        self.heads = nn.ModuleList(self._new_head(k) for k in sizes).to(device)

    def set_prototypes(self, centroids: list[torch.Tensor]) -> None:
        """v2: each head's weights become its clustering's unit centroids."""
        self.reset_heads([len(c) for c in centroids])
        for head, c in zip(self.heads, centroids, strict=True):
            head.weight.data.copy_(F.normalize(torch.as_tensor(c, dtype=torch.float32), dim=1))

    def _new_head(self, k: int) -> nn.Linear:
        if self.v2:
            head = nn.Linear(self.params.embed_dim, k, bias=False)
            head.weight.requires_grad_(False)
            return head
        head = nn.Linear(self.params.embed_dim, k)
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)
        return head


def build_model(params: ModelParams, heads: list[int] | int) -> DeepClusterNet:
    return DeepClusterNet(params, heads)


def check_resolution(arch: str, resolution: int) -> None:
    """AlexNet's stride-4 stem and three poolings need >= 63 px; the others pool down safely."""
    minimum = {"alexnet": 63, "vgg16": 32}.get(arch, 8)
    if resolution < minimum:
        raise ParamError(
            f"model.arch = {arch!r} needs data.resolution >= {minimum}, got {resolution}"
        )
