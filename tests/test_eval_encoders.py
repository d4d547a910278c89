"""Loading encoders for evaluation: sslsky exports and checkpoints, MoCo and ssl-sky-surveys layouts, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslsky.models import build_encoder
from sslsky.models.loading import CheckpointError, load_encoder


def features(encoder, x):
    with torch.no_grad():
        return encoder.eval()(x)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(3)
    encoder = build_encoder("resnet18", 5, "hayat").eval()
    return encoder, torch.randn(2, 5, 32, 32)


def test_moco_layout(reference, tmp_path):
    encoder, x = reference
    weights = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    weights["module.encoder_q.fc.0.weight"] = torch.zeros(512, 512)  # MoCo v2 head: dropped
    weights["module.encoder_k.conv1.weight"] = torch.zeros(64, 5, 7, 7)  # key encoder: ignored
    torch.save({"state_dict": weights, "epoch": 200}, tmp_path / "checkpoint_0199.pth.tar")
    loaded = load_encoder(tmp_path / "checkpoint_0199.pth.tar", survey="sdss")
    assert (loaded.source, loaded.arch, loaded.stem, loaded.in_channels) == ("moco", "resnet18", "hayat", 5)
    torch.testing.assert_close(features(loaded.encoder, x), features(encoder, x), rtol=0, atol=0)


def test_ssl_sky_surveys_layout_resnet50(tmp_path):
    torch.manual_seed(4)
    encoder = build_encoder("resnet50", 5, "hayat").eval()
    weights = {f"module.{k}": v for k, v in encoder.state_dict().items()}
    weights["module.fc.weight"], weights["module.fc.bias"] = torch.zeros(180, 2048), torch.zeros(180)
    torch.save({"model_state": weights, "epoch": 7}, tmp_path / "ckpt.tar")
    loaded = load_encoder(tmp_path / "ckpt.tar", survey="sdss")
    assert (loaded.source, loaded.arch, loaded.feature_dim) == ("ssl-sky-surveys", "resnet50", 2048)
    x = torch.randn(2, 5, 64, 64)
    torch.testing.assert_close(features(loaded.encoder, x), features(encoder, x), rtol=0, atol=0)
    # The eval transform of an SDSS file without statistics: centred 64x64 slice, asinh by the sky sigma.
    cut = torch.randn(1, 5, 107, 107)
    sky = torch.tensor([0.038, 0.018, 0.028, 0.043, 0.172])[:, None, None]
    np.testing.assert_allclose(loaded.transform(cut)[0].numpy(), torch.asinh(cut[0, :, 21:85, 21:85] / sky).numpy(),
                               rtol=1e-6)


def test_mismatches_are_errors_naming_the_keys(reference, tmp_path):
    encoder, _ = reference
    weights = {k: v for k, v in encoder.state_dict().items() if not k.startswith("layer4.1.")}
    torch.save({"model_state": weights}, tmp_path / "partial.tar")
    with pytest.raises(CheckpointError, match=r"partial.tar.*(match none|missing)"):
        load_encoder(tmp_path / "partial.tar", survey="sdss")
    weights = dict(encoder.state_dict(), **{"layer1.0.extra.weight": torch.zeros(1)})
    torch.save({"model_state": weights}, tmp_path / "extra.tar")
    with pytest.raises(CheckpointError, match=r"unexpected \['layer1.0.extra.weight'\]"):
        load_encoder(tmp_path / "extra.tar", survey="sdss")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="none of.*top-level keys: \\['something'\\]"):
        load_encoder(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(tmp_path / "missing.pt")
