"""Embedding networks: a backbone, LayerNorm, a linear head to ``dim`` and L2 normalisation.

The paper's backbones follow the Recall@k-surrogate code (Patel et al., CVPR 2022; Brown et al., ECCV 2020):

* ``resnet50``  ImageNet ResNet-50, BatchNorm frozen (eval mode, no grad, even under ``.train()``),
  GeM pooling with a learnable exponent p = 3, 2048-d features;
* ``vit_b_16``  torchvision ViT-B/16, the CLS token's 768-d features (the original used timm's
  ImageNet-21k ViT-B/16: pass ``backbone="timm:vit_base_patch16_224.augreg_in21k"`` when timm is
  installed);
* ``small_cnn`` four conv blocks 32-64-128-128 (conv3x3, BN, ReLU, max-pool) and global average
  pooling, 128-d: trains on a CPU in minutes (the offline glyph chapters);
* ``vit_tiny``  a small vision transformer for 32x32 images, from scratch: 4x4 patches (64 tokens +
  CLS), 4 blocks of width 128 with 4 heads and MLP 256 (torchvision's ``VisionTransformer``), the
  CLS token's 128-d features: the second backbone family of the offline chapters;
* ``resnet18``  torchvision ResNet-18 with global average pooling, 512-d; ``small_input=True``
  swaps the stem for a 3x3 stride-1 conv without max-pool so 32x32 images keep their resolution.

``pretrained=True`` loads torchvision's ImageNet weights (the Colab path).  Offline and without
cached weights that fails with a ``RuntimeError`` that says so; use ``pretrained=False`` there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from tcmlib.normalize import l2_normalize

__all__ = ["BACKBONES", "GeM", "SmallCNN", "Embedder", "build_embedder", "freeze_batchnorm"]

BACKBONES = ("resnet50", "vit_b_16", "small_cnn", "resnet18", "vit_tiny")


class GeM(nn.Module):
    """Generalised-mean pooling: ``(mean_hw x^p)^(1/p)`` per channel, p learnable (Radenovic et al.)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class SmallCNN(nn.Module):
    """Four conv blocks (conv3x3 -> BN -> ReLU -> max-pool 2), 32-64-128-128 channels, global average pool."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, 128, H/16, W/16) -> (B, 128)
        return self.features(x).mean(dim=(-2, -1))


def freeze_batchnorm(module: nn.Module) -> int:
    """Put every BatchNorm of ``module`` in eval mode and stop its gradients; return how many were frozen.

    Eval mode alone is undone by the next ``.train()``; :class:`Embedder` calls this again in its
    ``train()`` so frozen BN stays frozen.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
            n += 1
    return n


def _load_imagenet_weights(model: nn.Module, weights: torchvision.models.WeightsEnum, name: str) -> None:
    """Download (or read from the torch hub cache) torchvision ImageNet weights into ``model``."""
    cache = torch.hub.get_dir() + "/checkpoints"
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=False)
    except Exception as e:  # URLError, socket errors, a corrupt partial download ...
        raise RuntimeError(
            f"could not load the ImageNet weights for {name!r} ({weights.url}): {type(e).__name__}: {e}. "
            f"Pretrained weights need internet access or a cached copy in {cache} "
            "(set TORCH_HOME to move that cache). Offline, build the model with pretrained=False "
            "(it then trains from scratch)."
        ) from e
    model.load_state_dict(state)


def _make_backbone(
    name: str, pretrained: bool, in_channels: int, small_input: bool, image_size: int
) -> tuple[nn.Module, int]:
    """Return ``(backbone, feature_dim)``; the backbone maps (B, C, H, W) images to (B, feature_dim)."""
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ValueError(f"backbone {name!r} needs timm (pip install timm)") from e
        net = timm.create_model(name[5:], pretrained=pretrained, num_classes=0, in_chans=in_channels)
        return net, int(net.num_features)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)} or 'timm:<model name>'")
    if name == "small_cnn":
        if pretrained:
            raise ValueError("small_cnn has no pretrained weights; use pretrained=False")
        net = SmallCNN(in_channels)
        return net, net.out_dim
    if name == "vit_tiny":
        if pretrained:
            raise ValueError("vit_tiny has no pretrained weights; use pretrained=False")
        return _vit_tiny(in_channels, image_size), 128
    if name in ("resnet50", "resnet18"):
        fn, weights = {
            "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
            "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
        }[name]
        net = fn(weights=None)
        if pretrained:
            _load_imagenet_weights(net, weights, name)
        feat_dim = net.fc.in_features
        if small_input:  # CIFAR-style stem: 32x32 -> 32x32 after the stem instead of 8x8
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:  # keep pretrained filters: sum them over RGB for grey input
            w = net.conv1.weight.detach()  # (64, 3, 7, 7)
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                net.conv1.weight.copy_(w.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
        # drop avgpool + fc: the trunk maps (B, C, H, W) -> (B, F, H/32, W/32); pooling follows
        trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        pool: nn.Module = GeM(3.0) if name == "resnet50" else nn.AdaptiveAvgPool2d(1)
        return nn.Sequential(trunk, pool, nn.Flatten(1)), feat_dim
    # vit_b_16: torchvision's model with an identity head returns the CLS token's features
    if in_channels != 3:
        raise ValueError("vit_b_16 takes 3-channel images; repeat grey images to 3 channels")
    if pretrained:
        net = torchvision.models.vit_b_16(weights=None)
        _load_imagenet_weights(net, torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1, name)
        if image_size != 224:
            raise ValueError("pretrained vit_b_16 takes 224x224 images")
    else:
        net = torchvision.models.vit_b_16(weights=None, image_size=image_size)
    net.heads = nn.Identity()
    return net, 768


def _vit_tiny(in_channels: int, image_size: int) -> nn.Module:
    """torchvision's ``VisionTransformer`` sized for 32x32 glyphs; (B, C, H, W) -> (B, 128) CLS features."""
    if image_size % 4:
        raise ValueError(f"vit_tiny needs an image size divisible by its 4-pixel patches, got {image_size}")
    net = torchvision.models.VisionTransformer(image_size=image_size, patch_size=4, num_layers=4, num_heads=4,
                                               hidden_dim=128, mlp_dim=256)
    net.conv_proj = nn.Conv2d(in_channels, 128, kernel_size=4, stride=4)  # grey or RGB patches -> tokens
    net.heads = nn.Identity()
    return net


class Embedder(nn.Module):
    """``backbone -> LayerNorm -> Linear(dim) -> L2 normalise``: images (B, C, H, W) to unit vectors (B, dim)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int = 512, frozen_bn: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.norm = nn.LayerNorm(feature_dim)
        self.head = nn.Linear(feature_dim, dim)
        self.dim = dim
        self.frozen_bn = frozen_bn
        if frozen_bn:
            freeze_batchnorm(self.backbone)

    def train(self, mode: bool = True) -> "Embedder":
        """Like ``nn.Module.train`` but frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm(self.backbone)
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of LayerNorm + linear head (for a separate head learning rate)."""
        return list(self.norm.parameters()) + list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trainable backbone parameters (frozen BN excluded)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # (B, F)
        z = self.head(self.norm(f))  # (B, dim)
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # normalise and hand to the loss in float32, even under autocast
        return l2_normalize(z, dim=-1)  # (B, dim), unit norm


def build_embedder(
    backbone: str = "resnet50",
    dim: int = 512,
    pretrained: bool = False,
    in_channels: int = 3,
    *,
    small_input: bool = False,
    image_size: int = 224,
    frozen_bn: bool | None = None,
) -> Embedder:
    """Build an :class:`Embedder`.

    Args:
        backbone: one of ``BACKBONES`` or ``"timm:<model name>"``.
        dim: embedding dimension.
        pretrained: load ImageNet weights (internet or the torch hub cache needed).
        in_channels: 1 (grey) or 3 (RGB) input channels.
        small_input: resnet18/50 only: a 3x3 stride-1 stem without max-pool for 32x32 images.
        image_size: vit_b_16 / vit_tiny only: input side (224 when pretrained; must divide by the patch size).
        frozen_bn: freeze all BatchNorm layers; default True for resnet50 (the recipe, which
            fine-tunes ImageNet statistics), False otherwise (from-scratch nets need live BN).
    """
    net, feat_dim = _make_backbone(backbone, pretrained, in_channels, small_input, image_size)
    if frozen_bn is None:
        frozen_bn = backbone == "resnet50"
    return Embedder(net, feat_dim, dim, frozen_bn=frozen_bn)
