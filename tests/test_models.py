"""Encoders and the MoCo v2 method: shapes, momentum update, queue, and 2 gloo processes against 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import gloo_group, spawn_gloo
from torch import nn

from sslsky.config import ConfigError, PretrainConfig, load_config
from sslsky.methods import MoCo
from sslsky.models import build_encoder
from sslsky.models.encoders import stem
from sslsky.train.pretrain import build_method

TINY = {"dim": 16, "queue_size": 32, "momentum": 0.9, "temperature": 0.2}


def views_batch(view1: torch.Tensor, view2: torch.Tensor) -> dict:
    return {"view1": view1, "view2": view2}


# ---- encoders -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch, feature_dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("bands", [5, 3])
def test_encoder_builds_for_bands(arch, feature_dim, bands):
    torch.manual_seed(0)
    encoder = build_encoder(arch, bands, "hayat").eval()
    assert encoder.feature_dim == feature_dim
    assert encoder.conv1.in_channels == bands
    x = torch.randn(2, bands, 16, 16)
    with torch.no_grad():
        assert stem(encoder)(x).shape == (2, 64, 16, 16)  # stride 1, no max-pool: spatial size kept
        assert encoder(x).shape == (2, feature_dim)


def test_imagenet_stem_downsamples_by_four():
    encoder = build_encoder("resnet18", 5, "imagenet").eval()
    with torch.no_grad():
        assert stem(encoder)(torch.randn(1, 5, 32, 32)).shape == (1, 64, 8, 8)
        assert encoder(torch.randn(1, 5, 32, 32)).shape == (1, 512)
    assert isinstance(encoder.fc, nn.Identity)


def test_hayat_stem_layers():
    encoder = build_encoder("resnet18", 5, "hayat")
    assert encoder.conv1.kernel_size == (7, 7) and encoder.conv1.stride == (1, 1) and encoder.conv1.padding == (3, 3)
    assert isinstance(encoder.maxpool, nn.Identity)


def test_encoder_rejects_unknown_names():
    with pytest.raises(ValueError, match="resnet18"):
        build_encoder("resnet1000", 5)
    with pytest.raises(ValueError, match="stem"):
        build_encoder("resnet18", 5, "vit")
    with pytest.raises(ValueError, match="in_channels"):
        build_encoder("resnet18", 0)


def test_encoder_channels_last_matches_contiguous():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 5, "hayat").eval()
    x = torch.randn(2, 5, 16, 16)
    with torch.no_grad():
        ref = encoder(x)
        out = encoder.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- MoCo mechanics ---------------------------------------------------------------------------


def tiny_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    return MoCo(build_encoder("resnet18", 3, "hayat"), **{**TINY, **kwargs})


def test_momentum_update_is_exact_ema():
    model = tiny_moco()
    with torch.no_grad():  # make query and key differ
        for p in model.parameters_to_optimize():
            p.add_(torch.randn_like(p))
    m = model.momentum
    expected = [m * pk + (1 - m) * pq for pk, pq in zip(model.key_parameters(), model.parameters_to_optimize())]
    model.momentum_update()
    for got, want in zip(model.key_parameters(), expected):
        assert torch.equal(got, want)


def test_key_encoder_is_not_optimized_and_gets_no_grad():
    model = tiny_moco()
    optimized = {id(p) for p in model.parameters_to_optimize()}
    keys = list(model.key_parameters())
    assert keys and not any(id(p) in optimized for p in keys)
    assert all(not p.requires_grad for p in keys)
    n_query = sum(p.numel() for p in model.encoder_q.parameters()) + sum(p.numel() for p in model.head_q.parameters())
    assert sum(p.numel() for p in model.parameters_to_optimize()) == n_query
    x = torch.randn(4, 3, 16, 16)
    loss, _ = model(views_batch(x, x + 0.1))
    loss.backward()
    assert all(p.grad is None for p in keys)
    assert all(p.grad is not None for p in model.parameters_to_optimize())


def test_queue_enqueue_and_pointer_wrap():
    model = tiny_moco(queue_size=12)
    start = model.queue.clone()
    assert model.queue.shape == (16, 12) and int(model.queue_ptr) == 0
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(12))
    batches = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(4)]
    model.enqueue(batches[0])
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], batches[0].T) and torch.equal(model.queue[:, 4:], start[:, 4:])
    model.enqueue(batches[1])
    model.enqueue(batches[2])
    assert int(model.queue_ptr) == 0  # wrapped
    model.enqueue(batches[3])  # overwrites the oldest columns
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue, torch.cat([batches[3], batches[1], batches[2]]).T)


def test_forward_uses_the_old_queue_and_after_step_enqueues_then_moves_the_keys():
    model = tiny_moco()
    with torch.no_grad():  # make query and key encoders differ
        for p in model.parameters_to_optimize():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    old_queue = model.queue.clone()
    model.eval()  # eval: BN on running statistics, so the keys can be recomputed exactly
    with torch.no_grad():
        k = F.normalize(model.head_k(model.encoder_k(y)), dim=1)
        q = F.normalize(model.head_q(model.encoder_q(x)), dim=1)
        loss, metrics = model(views_batch(x, y))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ old_queue], dim=1) / model.temperature
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)))
    assert set(metrics) == {"acc"}
    model.after_step(1, 10)  # nothing to enqueue from an eval forward
    assert torch.equal(model.queue, old_queue) and int(model.queue_ptr) == 0
    model.train()
    key_before = [p.clone() for p in model.key_parameters()]
    model(views_batch(x, y))
    assert torch.equal(model.queue, old_queue)  # the forward itself leaves the queue alone
    model.after_step(1, 10)
    assert int(model.queue_ptr) == 4 and not torch.equal(model.queue[:, :4], old_queue[:, :4])
    m = model.momentum
    for got, before, pq in zip(model.key_parameters(), key_before, model.parameters_to_optimize()):
        torch.testing.assert_close(got, m * before + (1 - m) * pq)


def test_queue_size_must_divide_by_global_batch():
    model = tiny_moco(queue_size=30)
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        model(views_batch(x, x))
    with pytest.raises(ValueError, match="multiple"):
        model.enqueue(torch.randn(4, 16))


@pytest.mark.parametrize("kwargs, match", [({"bn": "groupnorm"}, "bn mode"), ({"temperature": 0.0}, "temperature"),
                                           ({"momentum": 1.5}, "momentum"), ({"queue_size": 0}, "queue_size")])
def test_moco_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoCo(build_encoder("resnet18", 3, "hayat"), **{**TINY, **kwargs})


def test_from_config_and_encoder_export():
    cfg = load_config(PretrainConfig, None, ["model.arch=resnet18", "model.stem=imagenet", "model.moco.dim=8",
                                             "model.moco.queue_size=16", "model.moco.bn=syncbn"])
    model = build_method(cfg, n_bands=5, image_size=32, votes=None)
    assert isinstance(model, MoCo) and model.encoder is model.encoder_q
    assert model.encoder_q.conv1.in_channels == 5 and model.dim == 8
    assert any(isinstance(mod, nn.SyncBatchNorm) for mod in model.encoder_k.modules())
    x = torch.randn(4, 5, 32, 32)
    loss, _ = model(views_batch(x, x))  # SyncBN without a process group is plain BN
    assert torch.isfinite(loss)
    encoder = build_encoder("resnet18", 5, "imagenet")
    encoder.load_state_dict(model.encoder.state_dict())  # strict: same keys as a plain encoder
    assert model.embed(x).shape == (4, 512)
    assert model.encoder.build_args == {"arch": "resnet18", "in_channels": 5, "stem": "imagenet", "image_size": 32}
    with pytest.raises(ConfigError, match="n_bands"):
        build_method(load_config(PretrainConfig, None, ["model.n_bands=3"]), n_bands=5, image_size=32, votes=None)


# ---- 2 gloo processes against 1 ------------------------------------------------------------


GLOBAL_BATCH = 8


def freeze_bn(model: nn.Module) -> None:
    """BN on running statistics: the network is then per-sample, so 2 x half batch = 1 x full batch."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def views() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen), torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)


def sgd_step(model: MoCo, net: nn.Module, im_q: torch.Tensor, im_k: torch.Tensor) -> dict:
    optimizer = torch.optim.SGD(model.parameters_to_optimize(), lr=0.5)
    loss, metrics = net(views_batch(im_q, im_k))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.after_step(1, 10)
    return {"loss": loss.detach(), "acc": metrics["acc"], "queue": model.queue.clone(), "ptr": model.queue_ptr.clone(),
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, init_file):
        half = GLOBAL_BATCH // world
        im_q, im_k = (x[rank * half:(rank + 1) * half] for x in views())
        results = {}
        # 1. frozen BN: loss, SGD update, key encoder and queue equal those of one process on the whole batch
        model = tiny_moco()
        freeze_bn(model)
        results["frozen"] = sgd_step(model, DistributedDataParallel(model, broadcast_buffers=False), im_q, im_k)
        # 2. shuffled BN in training mode: the keys come from the shuffled halves (permutation from the seed)
        model = tiny_moco()
        torch.manual_seed(123)
        with torch.no_grad():
            model(views_batch(im_q, im_k))
            model.after_step(1, 10)
        results["shuffle"] = {"queue": model.queue.clone()}
        # 3. SyncBN on CPU with 2 ranks: a clear error, not a hang or torch's message
        try:
            tiny_moco(bn="syncbn")(views_batch(im_q, im_k))
            results["syncbn_error"] = ""
        except RuntimeError as err:
            results["syncbn_error"] = str(err)
        # 4. K not a multiple of the *global* batch (K = 12 divides the rank batch 4 but not 8)
        try:
            tiny_moco(queue_size=12)(views_batch(im_q, im_k))
            results["k_error"] = ""
        except ValueError as err:
            results["k_error"] = str(err)
        torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moco_dist")
    return spawn_gloo(dist_worker, tmp)


def test_two_ranks_frozen_bn_equal_one_process(two_ranks):
    model = tiny_moco()
    freeze_bn(model)
    im_q, im_k = views()
    ref = sgd_step(model, model, im_q, im_k)
    ranks = [r["frozen"] for r in two_ranks]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, ref["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((ranks[0]["acc"] + ranks[1]["acc"]) / 2, ref["acc"])
    for r in ranks:
        assert int(r["ptr"]) == GLOBAL_BATCH
        torch.testing.assert_close(r["queue"], ref["queue"], atol=1e-5, rtol=1e-5)
        for name, value in ref["state"].items():  # query (after SGD), key encoder, BN buffers, queue
            torch.testing.assert_close(r["state"][name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_two_ranks_shuffle_bn_keys_come_from_the_shuffled_halves(two_ranks):
    model = tiny_moco()
    im_q, im_k = views()
    torch.manual_seed(123)
    perm = torch.randperm(GLOBAL_BATCH)  # the permutation rank 0 drew and broadcast
    shuffled = im_k[perm]
    with torch.no_grad():  # each rank's key-encoder BN (training mode) sees its half of the shuffled batch
        keys = torch.cat([F.normalize(model.head_k(model.encoder_k(part)), dim=1) for part in shuffled.chunk(2)])
    keys = keys[torch.argsort(perm)]  # unshuffled: row i is the key of image i
    q0, q1 = (r["shuffle"]["queue"] for r in two_ranks)
    assert torch.equal(q0, q1)  # every rank holds the same queue
    torch.testing.assert_close(q0[:, :GLOBAL_BATCH], keys.T, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and it differs from unshuffled per-rank BN, i.e. the shuffle did something
        local = torch.cat([F.normalize(model.head_k(model.encoder_k(part)), dim=1) for part in im_k.chunk(2)])
    assert not torch.allclose(q0[:, :GLOBAL_BATCH], local.T, atol=1e-4)


def test_two_ranks_errors(two_ranks):
    for r in two_ranks:
        assert "syncbn" in r["syncbn_error"] and "shuffle" in r["syncbn_error"]
        assert "global batch 8" in r["k_error"]
