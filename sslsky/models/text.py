"""The text tower of image–text alignment: a small causal transformer over word ids, as CLIP's (Radford et al. 2021).

``(B, L)`` int64 token ids (``<sot> words <eot> <pad>...``, :class:`sslsky.data.captions.WordTokenizer`) ->
token + learned positional embeddings -> ``depth`` pre-norm blocks with causal self-attention (a token sees
itself and the tokens before it, so padding after ``<eot>`` never reaches it) -> LayerNorm -> the feature of
the ``<eot>`` token, ``(B, width)``. Randomly initialised (nothing is downloaded); the blocks are those of
the ViT (:class:`sslsky.models.vit.Block`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslsky.models.vit import Block


class TextTransformer(nn.Module):
    """``(B, context)`` token ids -> ``(B, width)`` features at each row's ``eot_id`` token."""

    def __init__(self, vocab_size: int, context: int, eot_id: int, width: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context", context), ("width", width), ("depth", depth),
                            ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.context, self.eot_id, self.feature_dim = context, eot_id, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialisation
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.context:
            raise ValueError(f"tokens must be (B, {self.context}), got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, width)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        eot = (tokens == self.eot_id).int().argmax(dim=1)  # the first <eot> of each row
        return x[torch.arange(len(x), device=x.device), eot]
