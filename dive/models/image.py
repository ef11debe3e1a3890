"""Image encoders: precomputed region features, or grid features of a torchvision ResNet."""
from typing import Optional

import torch
from torch import Tensor, nn

from .common import SetHead, masked_max


class RegionProjection(nn.Module):
    """fc(x) + MLP(fc(x)): a linear projection refined by a two-layer MLP with BatchNorm (the
    reference's 1x1 head for BUTD regions and CNN grid cells), then `dropout`.

    The BatchNorm's statistics come from the real regions only; with `bn_padding` (the
    reference's arithmetic) from every row, padding included."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.0, bn_padding: bool = False):
        super().__init__()
        self.bn_padding = bn_padding
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, dim)
        self.mlp_in = nn.Linear(dim, dim // 2)
        self.bn = nn.BatchNorm1d(dim // 2)
        self.mlp_out = nn.Linear(dim // 2, dim)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        base = self.fc(x)
        hidden = self.mlp_in(base)
        if mask is None or self.bn_padding:
            hidden = self.bn(hidden.flatten(0, 1)).view_as(hidden)
        else:  # padding must not enter the batch statistics
            hidden = hidden.masked_scatter(mask[..., None], self.bn(hidden[mask]))
        return self.dropout(base + self.mlp_out(torch.relu(hidden)))


class RegionEncoder(nn.Module):
    """(B, R, region_dim) region features [+ (B, R) mask] -> (B, K, D) set: slots over the
    projected regions, plus their max-pooled projection (through a linear layer when
    `config.global_fc`) as the global feature."""

    def __init__(self, config):
        super().__init__()
        self.region_dim = config.region_dim
        self.project = RegionProjection(config.region_dim, config.embed_dim,
                                        config.projection_dropout, config.padding == "official")
        self.global_fc = (nn.Linear(config.embed_dim, config.embed_dim) if config.global_fc
                          else nn.Identity())
        self.head = SetHead(config, config.embed_dim, positions=None)

    def forward(self, regions: Tensor, mask: Optional[Tensor] = None, return_attention=False):
        if regions.dim() != 3 or regions.shape[2] != self.region_dim:
            raise ValueError(f"image features must have shape (B, regions, {self.region_dim}), "
                             f"got {tuple(regions.shape)}")
        local = self.project(regions, mask)
        # The reference's residual branch: the projected regions, max-pooled [, a linear].
        glob = self.global_fc(masked_max(local, mask))
        return self.head(local, glob, mask, return_attention)


class ResNetEncoder(nn.Module):
    """(B, 3, H, W) images -> the ResNet's last feature map as grid cells -> (B, K, D) set.

    Weights come only from a local file (`config.resnet_weights`, a torchvision state dict);
    without one the backbone is randomly initialised. Never downloads.
    """

    def __init__(self, config):
        super().__init__()
        try:
            import torchvision
        except ImportError as exc:
            raise ImportError("image_encoder='resnet' needs torchvision (pip install "
                              "torchvision matching your torch)") from exc
        build = getattr(torchvision.models, config.resnet_arch, None)
        if build is None or not config.resnet_arch.startswith(("resnet", "resnext", "wide_res")):
            raise ValueError(f"resnet_arch must name a torchvision ResNet, got "
                             f"{config.resnet_arch!r}")
        backbone = build(weights=None)
        if config.resnet_weights:
            state = torch.load(config.resnet_weights, map_location="cpu", weights_only=True)
            backbone.load_state_dict(state)
        channels = backbone.fc.in_features
        self.backbone = nn.Sequential(*list(backbone.children())[:-2])  # drop avgpool and fc
        self.regions = RegionEncoder(config.replace(region_dim=channels))

    def forward(self, images: Tensor, mask: Optional[Tensor] = None, return_attention=False):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        grid = self.backbone(images).flatten(2).transpose(1, 2)  # (B, h*w, C)
        return self.regions(grid, None, return_attention)
