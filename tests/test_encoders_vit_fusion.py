"""Encoder registry: ResNets as before, the ViT and the CNN + ViT fusion encoder (shapes, bands, levels, errors).

The ViT and fusion encoders run here with tiny transformer widths and depths (the defaults are the papers');
the fusion CNN branch is the real ResNet-18 stem and stages.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torchvision import models

from sslsky.models import ENCODERS, FusionEncoder, ViT, build_encoder, encoder_options
from sslsky.models.vit import Attention, Block

#: Small options per arch for fast tests, and the feature size they give.
TINY = {
    "resnet18": ({}, 512),
    "resnet34": ({}, 512),
    "resnet50": ({}, 2048),
    "vit": ({"depth": 1, "width": 16, "heads": 2}, 16),
    "fusion": ({"depth": 1, "width": 16, "heads": 2, "vit_dim": 8}, 256 + 8),
}
ARCHS = sorted(TINY)


def tiny(arch: str, bands: int = 5, size: int = 64, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_encoder(arch, bands, image_size=size, **{**TINY[arch][0], **options})


def test_registry_names_and_options():
    assert set(ENCODERS) == {"resnet18", "resnet34", "resnet50", "vit", "fusion"}
    assert encoder_options("resnet18") == {}
    assert encoder_options("vit") == {"patch_size": 8, "depth": 12, "width": 192, "heads": 3, "mlp_ratio": 4.0}
    assert set(encoder_options("fusion")) == {"levels", "stages", "vit_dim", "patch_size", "depth", "width", "heads",
                                              "mlp_ratio"}


# ---- shapes, bands, sizes --------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("bands", [1, 3, 5])
@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_and_feature_dim(arch, bands, size):
    # the stride-1 stem of the big ResNets costs seconds at 96 px on one core: their stems are tested elsewhere
    encoder = (tiny(arch, bands, size, stem="imagenet") if arch in ("resnet34", "resnet50") else
               tiny(arch, bands, size)).eval()
    assert encoder.feature_dim == TINY[arch][1]
    with torch.no_grad():
        assert encoder(torch.randn(2, bands, size, size)).shape == (2, encoder.feature_dim)


def test_default_vit_and_fusion_are_the_papers():
    vit = build_encoder("vit", 5, image_size=64)
    assert (vit.patch_size, len(vit.blocks), vit.feature_dim, vit.blocks[0].attn.heads) == (8, 12, 192, 3)
    assert vit.grid == 8 and vit.pos_embed.shape == (1, 65, 192)
    fusion = build_encoder("fusion", 3, image_size=84)  # Wei et al.: RGB, 84 px, 7x7 patches of 12 px
    assert fusion.feature_dim == 512 and fusion.level_dims == {3: 256} and fusion.stages == (2, 3)
    assert (fusion.vit.patch_size, fusion.vit.grid, len(fusion.vit.blocks), fusion.vit.feature_dim) == (12, 7, 6, 128)
    assert fusion.vit.blocks[0].attn.heads == 4 and fusion.vit_head.out_features == 256
    conv1 = fusion.cnn["conv1"]
    assert conv1.kernel_size == (7, 7) and conv1.stride == (1, 1) and isinstance(fusion.cnn["maxpool"], nn.Identity)
    assert "layer1" not in fusion.cnn and "layer4" not in fusion.cnn


@pytest.mark.parametrize("size, grid, offset", [(64, 5, 2), (96, 8, 0), (42, 3, 3), (72, 6, 0)])
def test_fusion_patch_grid_per_input_size(size, grid, offset):
    encoder = tiny("fusion", 3, size).eval()
    assert (encoder.vit.grid, encoder.vit.offset) == (grid, offset)
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, size, size)).shape == (2, 264)


def test_vit_sees_only_the_centred_patch_grid():
    """12-px patches on 64 px: the central 60x60 (rows and columns 2..61) is seen, the 2-px border is not."""
    vit = tiny("vit", 5, 64, patch_size=12).eval()
    x = torch.randn(1, 5, 64, 64)
    border = x.clone()
    border[..., :2, :] += 10
    border[..., 62:, :] += 10
    border[..., :, :2] += 10
    border[..., :, 62:] += 10
    inside = x.clone()
    inside[..., 2, 2] += 10
    inside[..., 61, 61] += 10
    with torch.no_grad():
        ref = vit(x)
        torch.testing.assert_close(vit(border), ref)
        assert not torch.allclose(vit(inside), ref)


@pytest.mark.parametrize("levels, stages, dims", [
    ([3], (2, 3), {3: 256}),
    ([2, 3], (2, 3), {2: 128, 3: 256}),
    ([1, 2, 3], (1, 2, 3), {1: 64, 2: 128, 3: 256}),
    ([3, 4], (2, 3, 4), {3: 256, 4: 512}),
    ([2], (2,), {2: 128}),
])
def test_fusion_feature_size_per_levels(levels, stages, dims):
    encoder = tiny("fusion", 5, 64, levels=levels, vit_dim=256).eval()
    assert encoder.stages == stages and encoder.level_dims == dims
    assert encoder.feature_dim == sum(dims.values()) + 256
    assert sorted(k for k in encoder.cnn if k.startswith("layer")) == [f"layer{s}" for s in stages]
    with torch.no_grad():
        assert encoder(torch.randn(2, 5, 64, 64)).shape == (2, encoder.feature_dim)


def test_fusion_levels_with_layer1_run_but_not_pooled():
    encoder = tiny("fusion", 5, 64, levels=[2, 3], stages=[1, 2, 3])
    assert encoder.stages == (1, 2, 3) and encoder.feature_dim == 128 + 256 + 8


def test_fusion_output_is_pooled_cnn_levels_then_vit():
    encoder = tiny("fusion", 5, 64, levels=[2, 3]).eval()
    x = torch.randn(2, 5, 64, 64)
    cnn = encoder.cnn
    with torch.no_grad():
        h2 = cnn["layer2"](cnn["relu"](cnn["bn1"](cnn["conv1"](x))))
        h3 = cnn["layer3"](h2)
        expected = torch.cat([h2.mean((2, 3)), h3.mean((2, 3)), encoder.vit_head(encoder.vit(x))], 1)
        torch.testing.assert_close(encoder(x), expected)


# ---- ResNets unchanged -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("stem_name", ["hayat", "imagenet"])
def test_resnet_state_dict_keys_unchanged(arch, stem_name):
    ours = build_encoder(arch, 5, stem_name)  # the positional call of today's callers
    assert isinstance(ours, models.ResNet) and isinstance(ours.fc, nn.Identity)
    reference = getattr(models, arch)(weights=None)
    assert ours.feature_dim == reference.fc.in_features
    reference.conv1 = nn.Conv2d(5, 64, kernel_size=7, stride=1 if stem_name == "hayat" else 2, padding=3, bias=False)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_resnet_call_forms_and_default_stem():
    a = build_encoder("resnet18", 5)
    b = build_encoder(arch="resnet18", in_channels=5, stem="hayat")
    c = build_encoder("resnet18", 5, "imagenet", image_size=64)
    assert a.conv1.stride == b.conv1.stride == (1, 1) and isinstance(a.maxpool, nn.Identity)
    assert c.conv1.stride == (2, 2) and isinstance(c.maxpool, nn.MaxPool2d)
    assert a.build_args == {"arch": "resnet18", "in_channels": 5, "stem": "hayat", "image_size": None}


@pytest.mark.parametrize("arch", ["resnet18", "vit", "fusion"])
def test_build_args_rebuild_the_same_architecture(arch):
    encoder = tiny(arch, 3, 64)
    torch.manual_seed(0)
    again = build_encoder(**encoder.build_args)
    assert again.build_args == encoder.build_args
    for (k1, v1), (k2, v2) in zip(encoder.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


# ---- gradients, determinism, memory format ---------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "vit", "fusion"])
def test_gradients_reach_every_parameter(arch):
    encoder = tiny(arch, 3, 32, levels=[1, 2, 3]) if arch == "fusion" else tiny(arch, 3, 32)
    encoder.train()
    encoder(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("arch", ["resnet18", "vit", "fusion"])
def test_deterministic_under_a_seed(arch):
    x = torch.randn(2, 3, 32, 32)
    first, second, other = tiny(arch, 3, 32, seed=0), tiny(arch, 3, 32, seed=0), tiny(arch, 3, 32, seed=1)
    for (k, v1), v2 in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True))
    with torch.no_grad():
        assert torch.equal(first.eval()(x), second.eval()(x))


@pytest.mark.parametrize("arch", ["resnet18", "vit", "fusion"])
def test_channels_last_matches_contiguous(arch):
    encoder = tiny(arch, 5, 64).eval()
    x = torch.randn(2, 5, 64, 64)
    with torch.no_grad():
        ref = encoder(x)
        out = encoder.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- attention against a plain reference ------------------------------------------------------


def numpy_attention(attn: Attention, x: np.ndarray) -> np.ndarray:
    """softmax(Q K^T / sqrt(d)) V per head, heads concatenated, then the output projection; float64."""
    w_qkv, b_qkv = (t.detach().double().numpy() for t in (attn.qkv.weight, attn.qkv.bias))
    w_out, b_out = (t.detach().double().numpy() for t in (attn.proj.weight, attn.proj.bias))
    b, n, width = x.shape
    d = width // attn.heads
    q, k, v = np.split(x @ w_qkv.T + b_qkv, 3, axis=-1)  # (B, N, width) each
    q, k, v = (t.reshape(b, n, attn.heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, N, d)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)  # (B, heads, N, N)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = (scores / scores.sum(-1, keepdims=True)) @ v  # (B, heads, N, d)
    return out.transpose(0, 2, 1, 3).reshape(b, n, width) @ w_out.T + b_out


def test_attention_matches_numpy_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(width=16, heads=4)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        out = attn(x).double().numpy()
    np.testing.assert_allclose(out, numpy_attention(attn, x.double().numpy()), atol=1e-5, rtol=1e-5)


def test_block_is_pre_norm_residual_attention_then_mlp():
    torch.manual_seed(0)
    block = Block(width=16, heads=4, mlp_ratio=2.0)
    for p in block.parameters():  # non-trivial LayerNorm affine terms too
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        h = F.layer_norm(x, (16,), block.norm1.weight, block.norm1.bias)
        y = x + torch.from_numpy(numpy_attention(block.attn, h.double().numpy())).float()
        h = F.layer_norm(y, (16,), block.norm2.weight, block.norm2.bias)
        fc1, fc2 = block.mlp[0], block.mlp[2]
        expected = y + F.linear(F.gelu(F.linear(h, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert fc1.out_features == 32


def test_vit_cls_feature_is_layer_norm_of_first_token():
    vit = tiny("vit", 3, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 16, width)
        tokens = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], 1) + vit.pos_embed
        torch.testing.assert_close(vit(x), vit.norm(vit.blocks(tokens))[:, 0])


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "vgg16"}, r"unknown encoder architecture 'vgg16'.*fusion.*resnet18.*vit"),
    ({"arch": "vit", "image_size": 64, "patches": 8}, r"unknown option\(s\) \['patches'\].*patch_size"),
    ({"arch": "resnet18", "depth": 3}, r"unknown option\(s\) \['depth'\] for arch='resnet18': it takes none"),
    ({"arch": "fusion", "image_size": 64, "level": [2]}, r"unknown option.*levels"),
    ({"arch": "vit"}, "needs image_size"),
    ({"arch": "fusion"}, "needs image_size"),
    ({"arch": "vit", "stem": "hayat", "image_size": 64}, "vit has no stem"),
    ({"arch": "fusion", "stem": "vit", "image_size": 64}, "unknown stem"),
    ({"arch": "resnet18", "stem": "vit"}, "unknown stem"),
    ({"arch": "vit", "image_size": 0}, "image_size must be a positive integer"),
    ({"arch": "vit", "image_size": 64.0}, "image_size must be a positive integer"),
    ({"arch": "vit", "in_channels": 0, "image_size": 64}, "in_channels"),
    ({"arch": "vit", "image_size": 64, "width": 10, "heads": 4}, "multiple of heads"),
    ({"arch": "vit", "image_size": 64, "depth": 0}, "depth must be a positive integer"),
    ({"arch": "vit", "image_size": 64, "patch_size": 80}, "larger than image_size"),
    ({"arch": "vit", "image_size": 64, "mlp_ratio": 0}, "mlp_ratio"),
    ({"arch": "fusion", "image_size": 64, "levels": []}, "non-empty"),
    ({"arch": "fusion", "image_size": 64, "levels": [5]}, "among 1, 2, 3, 4"),
    ({"arch": "fusion", "image_size": 64, "levels": [3, 2]}, "increasing"),
    ({"arch": "fusion", "image_size": 64, "levels": [3.0]}, "among 1, 2, 3, 4"),
    ({"arch": "fusion", "image_size": 64, "levels": [3], "stages": [2.0, 3.0]}, "consecutive stages"),
    ({"arch": "fusion", "image_size": 64, "levels": "3"}, "non-empty list"),
    ({"arch": "fusion", "image_size": 64, "levels": [2], "stages": [1, 2, 3]}, r"up to max\(levels\)=2"),
    ({"arch": "fusion", "image_size": 64, "levels": [3], "stages": [3]}, "consecutive stages from 1 or 2"),
    ({"arch": "fusion", "image_size": 64, "levels": [1, 2], "stages": [2]}, r"must be among the stages run, \[2\]"),
    ({"arch": "fusion", "image_size": 64, "vit_dim": 0}, "vit_dim"),
])
def test_clear_errors_for_bad_arch_options_and_values(kwargs, match):
    kwargs = {"in_channels": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_encoder(**{**TINY.get(kwargs["arch"], ({}, 0))[0], **kwargs})


@pytest.mark.parametrize("arch", ["vit", "fusion"])
def test_other_input_size_is_refused(arch):
    encoder = tiny(arch, 5, 64).eval()
    with pytest.raises(ValueError, match=r"built for 64x64 inputs.*got \(96, 96\).*image_size=96"), torch.no_grad():
        encoder(torch.randn(1, 5, 96, 96))


def test_fusion_encoder_refuses_a_stem_that_does_not_feed_its_first_stage():
    cnn = models.resnet50(weights=None)  # layer2 of a ResNet-50 takes 256 channels, not the stem's 64
    with pytest.raises(ValueError, match="start the stages at 1"):
        FusionEncoder(cnn, ViT(3, 32, patch_size=8, depth=1, width=16, heads=2), levels=[3])
