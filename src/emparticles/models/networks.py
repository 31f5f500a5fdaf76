"""Network architectures (PyTorch), all with one input channel and random initialisation.

``compact-unet`` is written here: a 5-level U-Net of 1.1 M parameters (4.4 MB in fp32) whose forward
pass on a 0.36 MP image takes ~0.24 s on two CPU cores in fp32 with channels_last (bf16 autocast
is slower on CPUs without native bf16, so it is off by default); the others come from
segmentation-models-pytorch and torchvision.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class CompactUNet(nn.Module):
    """U-Net with channel widths ``widths`` (one per level), max-pool down, bilinear up.

    Input (B, 1, H, W) with H, W multiples of 2**(levels-1); output (B, classes, H, W) logits.
    """

    def __init__(self, classes: int = 3, widths: tuple[int, ...] = (12, 24, 48, 96, 192)):
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for w in widths:
            self.down.append(_DoubleConv(cin, w))
            cin = w
        self.up = nn.ModuleList(_DoubleConv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], classes, 1)
        self.multiple = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = _joined(block, x, skip)
        return self.head(x)


class StridedUNet(nn.Module):
    """U-Net whose first level works at half resolution: a stride-2 stem, ``len(widths)`` levels
    from 1/2 to 1/32 of the input, then a bilinear upsample to full resolution refined by one
    3x3 convolution that also sees the input image (so outlines stay pixel-sharp).

    Against :class:`CompactUNet` it trains 1.9x and infers 1.8x faster on two CPU cores (most of
    a U-Net's time is spent at full resolution) with twice the parameters and a 2x larger
    receptive field. Input (B, 1, H, W), H and W multiples of 32; output (B, classes, H, W) logits.
    """

    def __init__(self, classes: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128, 256), full_width: int = 16):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(1, w0, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),
            nn.Conv2d(w0, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),
        )
        self.down = nn.ModuleList(_DoubleConv(widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        self.up = nn.ModuleList(_DoubleConv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.full = nn.Sequential(nn.Conv2d(w0 + 1, full_width, 3, padding=1, bias=False), nn.BatchNorm2d(full_width),
                                  nn.ReLU(inplace=True))
        self.head = nn.Conv2d(full_width, classes, 1)
        self.multiple = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x
        x = self.stem(x)
        skips = [x]
        for block in self.down:
            x = block(F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = _joined(block, x, skip)
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(_joined(self.full, x, image))


class _SplitConv(nn.Module):
    """``conv(cat([a, b], dim=1))`` computed as ``conv_a(a) + conv_b(b)`` (the weights split along
    the input channels): the same function without the concatenation, a copy of both feature maps
    that is slow in channels_last memory on CPU. Takes the pair ``(a, b)``."""

    def __init__(self, conv: nn.Conv2d, channels_a: int):
        super().__init__()
        kw = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding)
        self.a = nn.Conv2d(channels_a, conv.out_channels, bias=conv.bias is not None, **kw)
        self.b = nn.Conv2d(conv.in_channels - channels_a, conv.out_channels, bias=False, **kw)
        with torch.no_grad():
            self.a.weight.copy_(conv.weight[:, :channels_a])
            self.b.weight.copy_(conv.weight[:, channels_a:])
            if conv.bias is not None:
                self.a.bias.copy_(conv.bias)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = pair
        return self.a(a).add_(self.b(b))


def _joined(block: nn.Sequential, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``block(cat([x, skip]))``, or ``block((x, skip))`` once :func:`split_skip_convolutions` ran."""
    if isinstance(block[0], _SplitConv):
        return block((x, skip))
    return block(torch.cat([x, skip], dim=1))


def split_skip_convolutions(net: nn.Module) -> nn.Module:
    """Replace, in place, the first convolution of every decoder block of a :class:`CompactUNet`
    or :class:`StridedUNet` by a :class:`_SplitConv` (inference only; other networks are returned
    unchanged). Measured on two CPU cores: 5-10% of a ``strided-unet`` forward pass."""
    if isinstance(net, WithLocalContrast):
        split_skip_convolutions(net.body)
        return net
    if not isinstance(net, (CompactUNet, StridedUNet)):
        return net
    blocks = list(net.up) + ([net.full] if isinstance(net, StridedUNet) else [])
    for block in blocks:
        conv = block[0]
        if isinstance(conv, nn.Conv2d):
            skip_channels = 1 if block is getattr(net, "full", None) else conv.out_channels
            block[0] = _SplitConv(conv, conv.in_channels - skip_channels)
    return net


def prepare_for_inference(net: nn.Module) -> nn.Module:
    """Eval mode, batch norm folded, decoder concatenations split, channels_last (in place)."""
    return split_skip_convolutions(fold_batchnorm(net.eval())).to(memory_format=torch.channels_last)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into the
    convolution's weights and bias (in place; for inference only: the network must be in eval mode).

    The folded network computes the same function (to float rounding) without the normalisation
    pass over each feature map: 10-15% of a ``strided-unet`` forward pass on two CPU cores."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if net.training:
        raise ValueError("fold_batchnorm is for networks in eval mode")
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    return net


class LocalContrast(nn.Module):
    """Local contrast normalisation of a (B, 1, H, W) input: ``v = x - G*x``, then
    ``v / sqrt(G*v^2 + floor^2)``, with ``G`` a Gaussian of ``sigma_px`` pixels (separable, edges
    replicated). Each pixel is expressed against its own neighbourhood, so that a frame's exposure,
    a charging gradient or a detector's shading no longer changes what the network sees (the
    preprocessing of the DTU CNN for TEM nanoparticles). ``floor`` (in units of the network input,
    whose global SD is about 1) keeps flat, noise-free areas from being amplified. No parameters:
    it is the first stage of a network built with ``local_contrast_px``, applied in training and
    inference alike, after the intensity augmentations."""

    def __init__(self, sigma_px: float, floor: float = 0.5):
        super().__init__()
        self.sigma_px = float(sigma_px)
        self.floor = float(floor)
        # The Gaussian is applied at 1/step of the resolution and brought back bilinearly: the
        # same smooth surface for sigma >= 8 px at a fraction of the cost (a 193-tap blur at full
        # size added 70% to a strided-unet-slim forward pass on two CPU cores).
        self.step = max(1, min(4, int(self.sigma_px // 4)))
        sigma = self.sigma_px / self.step
        radius = max(1, round(3 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        self.register_buffer("kernel", (g / g.sum()), persistent=False)
        self.radius = radius

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        if self.step > 1:
            x = F.avg_pool2d(x, self.step, ceil_mode=True)
        r = self.radius
        k = self.kernel.to(x.dtype)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False) if self.step > 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # the blur runs on one channel: channels_last gains nothing here
        v = x - self._blur(x)
        return v / torch.sqrt(self._blur(v * v) + self.floor ** 2)


class WithLocalContrast(nn.Module):
    """A network whose input first goes through :class:`LocalContrast` (its weights are those of
    ``body``, under the ``body.`` prefix)."""

    def __init__(self, body: nn.Module, sigma_px: float):
        super().__init__()
        self.local_contrast = LocalContrast(sigma_px)
        self.body = body
        self.multiple = int(getattr(body, "multiple", 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.local_contrast(x).contiguous(memory_format=torch.channels_last))


def _conv_bn(cin: int, cout: int, k: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class _MultiResBlock(nn.Module):
    """MultiResUNet's block: three chained 3x3 convolutions (W/6, W/3 and W/2 filters of
    W = alpha x ``unet_filters``) concatenated, approximating 3x3, 5x5 and 7x7 receptive fields at
    one stage, plus a 1x1 shortcut."""

    def __init__(self, cin: int, unet_filters: int, alpha: float = 1.67):
        super().__init__()
        w = alpha * unet_filters
        c1, c2, c3 = int(w * 0.167), int(w * 0.333), int(w * 0.5)
        self.out_channels = c1 + c2 + c3
        self.shortcut = _conv_bn(cin, self.out_channels, 1, relu=False)
        self.c1, self.c2, self.c3 = _conv_bn(cin, c1, 3), _conv_bn(c1, c2, 3), _conv_bn(c2, c3, 3)
        self.bn_cat = nn.BatchNorm2d(self.out_channels)
        self.bn_out = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        b = self.c2(a)
        c = self.c3(b)
        out = self.bn_cat(torch.cat([a, b, c], dim=1)) + self.shortcut(x)
        return self.bn_out(F.relu(out))


class _ResPath(nn.Module):
    """MultiResUNet's residual path on a skip connection: ``length`` units of a 3x3 convolution
    with a 1x1 shortcut (``cin`` -> ``channels`` filters in the first), bridging the semantic gap
    between encoder and decoder features."""

    def __init__(self, cin: int, channels: int, length: int):
        super().__init__()
        self.units = nn.ModuleList(nn.ModuleDict({"conv": _conv_bn(cin if i == 0 else channels, channels, 3),
                                                  "shortcut": _conv_bn(cin if i == 0 else channels, channels, 1, relu=False),
                                                  "bn": nn.BatchNorm2d(channels)}) for i in range(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit["bn"](F.relu(unit["conv"](x) + unit["shortcut"](x)))
        return x


class MultiResUNet(nn.Module):
    """MultiResUNet (Ibtehaz & Rahman, Neural Networks 121, 2020), the architecture BAM used for
    agglomerated particles in SEM: MultiRes blocks instead of double convolutions, residual paths
    of length 4, 3, 2, 1 on the skips, transposed convolutions up. ``unet_filters`` are the
    filters of the U-Net it stands for, level by level (the paper's 32-512 make 7.3 M parameters);
    written here because no maintained package on PyPI provides it. Input (B, 1, H, W), H and W
    multiples of 16; output (B, classes, H, W) logits."""

    def __init__(self, classes: int = 3, unet_filters: tuple[int, ...] = (32, 64, 128, 256, 512), alpha: float = 1.67):
        super().__init__()
        self.encoder = nn.ModuleList()
        cin, outs = 1, []
        for u in unet_filters:
            block = _MultiResBlock(cin, u, alpha)
            self.encoder.append(block)
            cin = block.out_channels
            outs.append(cin)
        levels = len(unet_filters)
        self.paths = nn.ModuleList(_ResPath(outs[i], unet_filters[i], levels - 1 - i) for i in range(levels - 1))
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(levels - 1)):
            self.ups.append(nn.ConvTranspose2d(cin, unet_filters[i], 2, stride=2))
            block = _MultiResBlock(2 * unet_filters[i], unet_filters[i], alpha)
            self.decoder.append(block)
            cin = block.out_channels
        self.head = nn.Conv2d(cin, classes, 1)
        self.multiple = 2 ** (levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, block, path, skip in zip(self.ups, self.decoder, reversed(self.paths), reversed(skips[:-1])):
            x = block(torch.cat([up(x), path(skip)], dim=1))
        return self.head(x)


class _DeepLab(nn.Module):
    """torchvision DeepLabV3-ResNet50 with a 1-channel stem, returning plain logits."""

    def __init__(self, classes: int):
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50

        self.net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=classes, aux_loss=False)
        self.net.backbone.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        self.multiple = 8

    def forward(self, x):
        return self.net(x)["out"]


def _smp_unet(encoder: str, classes: int) -> nn.Module:
    import segmentation_models_pytorch as smp

    net = smp.Unet(encoder, encoder_weights=None, in_channels=1, classes=classes)
    net.multiple = 32
    return net


#: architecture name -> (builder(classes) -> module, description)
ARCHITECTURES = {
    "compact-unet": (lambda classes: CompactUNet(classes), "5-level U-Net, 1.1 M parameters; fast on CPU"),
    "strided-unet": (lambda classes: StridedUNet(classes), "U-Net with a stride-2 stem, 2.0 M parameters; fastest on CPU"),
    "strided-unet-slim": (lambda classes: StridedUNet(classes, widths=(12, 24, 48, 96, 192), full_width=12),
                          "strided-unet with 3/4 of its channels, 1.1 M parameters; faster on CPU"),
    "strided-unet-lite": (lambda classes: StridedUNet(classes, widths=(8, 24, 48, 96, 192), full_width=8),
                          "strided-unet-slim with 8 channels at 1/1 and 1/2 resolution, 1.1 M parameters; fastest on CPU"),
    "unet-resnet18": (lambda classes: _smp_unet("resnet18", classes), "U-Net, ResNet-18 encoder (smp), 14 M parameters"),
    "unet-resnet34": (lambda classes: _smp_unet("resnet34", classes), "U-Net, ResNet-34 encoder (smp), 24 M parameters"),
    "deeplabv3-resnet50": (lambda classes: _DeepLab(classes), "DeepLabV3, ResNet-50 backbone (torchvision), 40 M parameters"),
    "multiresunet": (lambda classes: MultiResUNet(classes), "MultiResUNet as published (BAM's choice for agglomerated SEM particles), 7.3 M parameters"),
    "multiresunet-slim": (lambda classes: MultiResUNet(classes, unet_filters=(12, 24, 48, 96, 192)),
                          "MultiResUNet with 3/8 of the published filters, about 1 M parameters; for CPU training"),
}


def build_network(arch: str, classes: int = 3, local_contrast_px: float = 0.0) -> nn.Module:
    """Build an architecture by name with random weights; KeyError lists the valid names.
    ``local_contrast_px`` > 0 puts :class:`LocalContrast` of that sigma in front of it."""
    try:
        builder = ARCHITECTURES[arch][0]
    except KeyError:
        raise KeyError(f"unknown architecture '{arch}'; valid: {', '.join(ARCHITECTURES)}") from None
    net = builder(classes)
    return WithLocalContrast(net, local_contrast_px) if local_contrast_px and local_contrast_px > 0 else net
