"""A small vision transformer (Dosovitskiy et al. 2021) for N-band galaxy cutouts.

``(B, C, H, W)`` images with ``H = W = image_size`` -> ``(B, width)`` features:

1. **centred crop to the patch grid**: the grid is ``g = image_size // patch_size`` patches per side; when
   ``patch_size`` does not divide ``image_size`` the input is centre-cropped to ``g * patch_size`` pixels
   (at most ``patch_size - 1`` border pixels, split as evenly as possible between the two sides, are not
   seen). Cutouts are centred on the galaxy, so what is dropped is sky: 64 px with 12-px patches is a 5x5
   grid on the central 60x60 (2 px dropped per side), 42 px a 3x3 grid on the central 36x36; 72 and 96
   are exact (6x6, 8x8). Padding instead would add patches that are mostly made up;
2. **patch embedding** ``Conv2d(C, width, patch_size, stride=patch_size)``: ``(B, width, g, g)`` ->
   tokens ``(B, g*g, width)`` (any number of bands C);
3. a learned **CLS token** in front and a learned **positional embedding** ``(1, 1 + g*g, width)``;
4. ``depth`` **pre-norm blocks**: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``, multi-head self-attention
   on :func:`torch.nn.functional.scaled_dot_product_attention`, MLP ``width -> mlp_ratio*width -> width``
   with GELU; no dropout;
5. a final **LayerNorm**; the CLS token is the feature ``(B, width)``.

Input size: the positional embedding is learned for one grid, so the model is built for one
``image_size`` and **refuses any other input size** with a :class:`ValueError` (no silent interpolation
of the positional embedding: an encoder evaluated on other crops than it was trained on would see
galaxies at another scale). Training and evaluation in sslsky use the same centred crop size.

Initialisation as timm / DINO: truncated-normal (std 0.02) CLS token, positional embedding and linear
weights, zero biases, unit LayerNorms; the patch convolution keeps PyTorch's default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Attention(nn.Module):
    """Multi-head self-attention ``(B, N, width) -> (B, N, width)``.

    Per head ``softmax(Q K^T / sqrt(d)) V`` with ``d = width / heads``; Q, K, V from one ``Linear(width, 3 width)``
    (the layout ``[q | k | v]``, each split into ``heads`` consecutive chunks of ``d``), heads concatenated
    and mixed by ``proj``.
    """

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal  # causal: a token attends to itself and the tokens before it
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        # (B, N, 3 width) -> (3, B, heads, N, d)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, width))


class Block(nn.Module):
    """Pre-norm transformer block ``(B, N, width) -> (B, N, width)``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool = False):
        super().__init__()
        hidden = max(1, round(width * mlp_ratio))
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer ``(B, in_channels, image_size, image_size) -> (B, width)`` (CLS token after LayerNorm).

    Args:
        in_channels: number of bands C.
        image_size: side H = W of the square inputs, in pixels (the crop size); other sizes are refused.
        patch_size: side of the square patches; ``image_size // patch_size`` patches per side (centred crop).
        depth: number of transformer blocks.
        width: token dimension (also ``feature_dim``); a multiple of ``heads``.
        heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of ``width``.

    Attributes:
        feature_dim: ``width``.
        grid: patches per side ``g``; ``num_tokens = 1 + g*g``.
        offset: pixels cropped from the top and the left (``image_size - g * patch_size`` is the total).
    """

    def __init__(self, in_channels: int, image_size: int, patch_size: int = 8, depth: int = 12, width: int = 192,
                 heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("patch_size", patch_size),
                            ("depth", depth), ("width", width), ("heads", heads)):
            _positive_int(name, value)
        if width % heads:
            raise ValueError(f"width={width} must be a multiple of heads={heads} (each head has width/heads dims)")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        if patch_size > image_size:
            raise ValueError(f"patch_size={patch_size} is larger than image_size={image_size}: no patch fits")
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.offset = (image_size - self.grid * patch_size) // 2
        self.num_tokens = 1 + self.grid**2
        self.feature_dim = width

        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, image_size, image_size)`` -> ``(B, width)``."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"this ViT was built for {self.image_size}x{self.image_size} inputs (its positional "
                             f"embedding has a {self.grid}x{self.grid} patch grid), got {tuple(x.shape[-2:])}: "
                             f"build it with image_size={x.shape[-1]} or crop the input to {self.image_size}")
        lo, hi = self.offset, self.offset + self.grid * self.patch_size
        x = self.patch_embed(x[:, :, lo:hi, lo:hi])  # (B, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+g*g, width)
        x = self.blocks(x)
        return self.norm(x[:, 0])  # CLS token (B, width)
