"""Issue 13, attacked: what the hostile pass on ``method: align`` found, each checked once.

- the run's classes are the pack's, not the largest class among the (thinned) galaxies it draws;
- classes of one's own get symbols from ``model.align.class_symbols``;
- a stage with a symbol tower of its own starts from the image tower's copy even when a resume changed the
  stages so that the step of the copy was already past;
- a resume refusal shows the field of a list-valued setting that changed.
"""

from __future__ import annotations

import pytest
import torch

from sslsky.config import AlignConfig, PretrainConfig, load_config
from sslsky.methods.align import Align, pack_classes, stage_table
from sslsky.models import build_encoder
from sslsky.train.rundir import change_line
from sslsky.vocabulary import MORPH_CLASSES


class FakePack:
    """What :func:`pack_classes` reads of a ShardDataset: its manifest attributes and the label column."""

    def __init__(self, labels, attrs=None):
        import numpy as np

        self.attrs = attrs or {}
        self.index = type("Index", (), {"columns": {"morph_class": np.asarray(labels)}})()


def test_the_classes_are_the_packs_whatever_the_labels_drawn():
    assert pack_classes(FakePack([0, 1, 1])) == list(MORPH_CLASSES)  # the default label column: all seven
    own = {"label_column": "label", "label_names": {"0": "smooth", "1": "featured", "2": "artifact"}}
    assert pack_classes(FakePack([1, -1], own)) == ["smooth", "featured", "artifact"]  # class 2 drawn by none
    with pytest.raises(ValueError, match="no galaxy of the pack has a class label"):
        pack_classes(FakePack([-1, -1], {"label_column": "label"}))


def tiny_align(stages: list[dict], names=("round smooth", "edge-on disk")) -> Align:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 1, "imagenet", image_size=16)
    symbols = torch.rand(len(names), 2, 1, 16, 16)
    return Align(encoder, [[f"a {n} galaxy"] for n in names], symbols, stages, "morph_class", embed_dim=8,
                 context=8, text_width=16, text_depth=1, text_heads=2, class_names_=list(names))


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_symbol_tower_copy_happens_once_and_after_a_resume_past_its_step():
    cfg = AlignConfig(stages=[AlignConfig.Stage(steps=3), AlignConfig.Stage(steps=3, symbol_tower="own")])
    model = tiny_align(stage_table(cfg, 6))
    perturb(model.image_tower)
    model.after_step(2, 6)
    assert not same(model.symbol_tower, model.image_tower) and not bool(model.symbol_copied)
    model.after_step(3, 6)  # the first step of stage 2: the copy
    assert same(model.symbol_tower, model.image_tower) and bool(model.symbol_copied)
    perturb(model.image_tower)
    model.after_step(4, 6)  # never again
    assert not same(model.symbol_tower, model.image_tower)

    # A run made with one stage, resumed at step 4 with two stages (resume.allow_changes): stage 2 has begun
    # without the copy; the first step after the resume makes it.
    one = tiny_align(stage_table(AlignConfig(stages=[AlignConfig.Stage(steps=6)]), 6))
    perturb(one.image_tower)
    one.after_step(4, 6)
    two = tiny_align(stage_table(cfg, 6))
    two.load_state_dict(one.state_dict())
    two.after_step(5, 6)
    assert same(two.symbol_tower, two.image_tower) and same(two.symbol_projection, two.image_projection)


def test_classes_of_ones_own_take_their_symbols_from_config(tmp_path):
    cfg = load_config(PretrainConfig, None, ["method=align", "model.moco={}",
                                             "model.align.class_symbols={elliptical: [round-smooth]}"])
    assert cfg.model.align.class_symbols == {"elliptical": ["round-smooth"]}
    from sslsky.data.symbols import class_symbols

    with pytest.raises(ValueError, match=r"model.align.class_symbols, e.g. \{'elliptical': \[round-smooth\]\}"):
        class_symbols("elliptical")


def test_a_refused_list_change_names_the_field():
    old = [{"steps": 5, "symbol_tower": "image", "image_text": 1.0}, {"steps": 5, "symbol_tower": "own",
                                                                      "image_text": 1.0}]
    new = [old[0], {**old[1], "image_text": 2.0}]
    assert change_line("model.align.stages", old, new) == "  model.align.stages[1].image_text: 1.0 -> 2.0"
    assert change_line("optim.base_lr", 0.1, 0.2) == "  optim.base_lr: 0.1 -> 0.2"
