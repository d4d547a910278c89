"""``method: align``: image–symbol–text alignment, after GalaxAlign (Wang, Wang & Luo 2024, arXiv 2411.19475).

Three towers map their inputs to one ``model.align.embed_dim`` space (each ends in a linear projection):

- the **image tower**, the encoder being fine-tuned (from ``model.align.init``: any file
  :func:`sslsky.models.loading.load_encoder` reads, or random), on the first augmented view;
- the **text tower** (:class:`sslsky.models.text.TextTransformer`) on the galaxy's caption
  (:mod:`sslsky.data.captions`): a class caption drawn from its templates, or the caption of its vote path;
- the **symbol tower** on the galaxy's schematic symbol (:mod:`sslsky.data.symbols`; a variant drawn per
  galaxy), with the image tower's architecture.

Each pair's loss is :func:`sslsky.losses.clip_loss` with one learnable logit scale (initialised to
``ln(1/0.07)``, clamped at ``ln 100``, as CLIP), features gathered from every rank with the gradient through
each rank's own part; the method's loss is the weighted mean of the pairs (image, text), (image, symbol),
(symbol, text) and, optionally, (image view 1, image view 2). **Stages** (``model.align.stages``, GalaxAlign's
two): a stage with ``symbol_tower: image`` sends the symbols through the image tower and its projection
(their stage 1: images and symbols against text); a stage with ``symbol_tower: own`` uses the symbol tower,
which is initialised from the image tower (and its projection) when such a stage follows an ``image`` one
(their stage 2, three-way loss). The stage is a function of the step (a buffer in the state dict), so a
restart resumes inside the right stage.

**Labels**: ``model.align.labels: morph_class`` (the catalog's classes, names from the pack) or ``votes`` (the
vote path of ``votes.campaigns``: caption from the phrases of the chosen answers, symbols those of the answers,
one per variant). Galaxies without a label take no part in the text and symbol terms; with
``image_image: 0`` (the default, as GalaxAlign) they are not drawn at all (nothing would learn from them),
with ``image_image > 0`` every galaxy is drawn and the unlabelled ones train the image–image term only.

Exported: the image tower as ``encoder.pt`` (linear, finetune, kNN and sweeps work unchanged) with, under
``method_state``, what zero-shot classification and text / symbol queries need (:func:`aligned_towers`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from sslsky.data.captions import EOT, WordTokenizer, class_captions, path_index, path_table, vote_caption
from sslsky.data.symbols import SYMBOLS, answer_symbol, class_symbols, render
from sslsky.errors import ConfigError
from sslsky.losses import clip_loss
from sslsky.methods.base import Method, check_views
from sslsky.models.encoders import build_encoder
from sslsky.models.text import TextTransformer
from sslsky.vocabulary import LABEL_COLUMN, MORPH_CLASSES, class_names

if TYPE_CHECKING:
    from sslsky.config import AlignConfig, PretrainConfig
    from sslsky.vocabulary import VoteSchema

ALIGN_FORMAT = "sslsky-align-v1"
PAIRS = ("image_text", "image_symbol", "symbol_text", "image_image")


def stage_table(cfg: AlignConfig, total_steps: int) -> list[dict]:
    """The stages as ``{"start", "end", "symbol_tower", weights...}``; none configured: one ``image`` stage with
    image_text and symbol_text. ConfigError unless the stages' steps add up to ``optim.total_steps``."""
    stages = cfg.stages or [type(cfg).Stage(steps=total_steps)]
    total = sum(s.steps for s in stages)
    if total != total_steps:
        raise ConfigError(f"model.align.stages add up to {total} steps but optim.total_steps={total_steps}; make "
                          f"them equal (stages: {[s.steps for s in stages]})")
    table, start = [], 0
    for i, s in enumerate(stages):
        weights = {pair: float(getattr(s, pair)) for pair in PAIRS}
        if not any(weights.values()):
            raise ConfigError(f"model.align.stages[{i}]: every pair weight is 0; give at least one of {PAIRS}")
        table.append({"start": start, "end": start + s.steps, "symbol_tower": s.symbol_tower, **weights})
        start += s.steps
    return table


class Align(Method):
    """Image–symbol–text alignment; ``forward(batch) -> (loss, metrics)`` (see the module docstring)."""

    section = "align"
    shape_keys = ("model.align.embed_dim", "model.align.context", "model.align.text_width",
                  "model.align.text_depth", "model.align.text_heads", "model.align.labels",
                  "model.align.class_captions", "model.align.answer_phrases", "model.align.vote_caption")
    find_unused_parameters = True  # a stage that sends symbols through the image tower leaves the symbol tower idle

    def __init__(self, encoder: nn.Module, captions: list[list[str]], symbols: Tensor, stages: list[dict],
                 label: str, embed_dim: int = 128, context: int = 32, text_width: int = 128, text_depth: int = 4,
                 text_heads: int = 4, logit_scale: float = math.log(1 / 0.07), logit_scale_max: float = math.log(100),
                 class_names_: list[str] | None = None, votes: VoteSchema | None = None,
                 same_label_positive: bool = True, path_label: list[int] | None = None):
        super().__init__()
        self.label, self.stages, self.logit_scale_max = label, stages, logit_scale_max
        self.batch_keys = (label,)  # the loader column of the labels
        self.same_label_positive = same_label_positive
        self.class_names = list(class_names_ or [])
        self.image_tower = encoder
        self.feature_dim: int = encoder.feature_dim
        self.symbol_tower = build_encoder(**encoder.build_args)  # a copy until a stage of its own starts
        self.symbol_tower.load_state_dict(encoder.state_dict())
        self.tokenizer = WordTokenizer.from_texts(t for texts in captions for t in texts)
        self.captions = captions
        self.text_tower = TextTransformer(len(self.tokenizer), context, EOT, width=text_width, depth=text_depth,
                                          heads=text_heads)
        self.image_projection = nn.Linear(self.feature_dim, embed_dim, bias=False)
        self.symbol_projection = copy.deepcopy(self.image_projection)
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        # per label: its captions (padded by repetition to the longest list) and its symbol variants
        most = max(len(c) for c in captions)
        tokens = [self.tokenizer.encode([c[i % len(c)] for i in range(most)], context) for c in captions]
        self.register_buffer("caption_tokens", torch.stack(tokens), persistent=False)  # (K, T, L)
        self.register_buffer("caption_counts", torch.tensor([len(c) for c in captions]), persistent=False)
        self.register_buffer("symbols", symbols, persistent=False)  # (K, V, C, S, S)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))  # the stage is a function of it
        # whether the symbol tower became the image tower's copy when its own stage came (once, resumes included)
        self.register_buffer("symbol_copied", torch.zeros((), dtype=torch.bool))
        # Python mirrors of the two buffers: reading a buffer on a GPU every step would wait for the device
        self._done, self._copied = 0, False
        self.register_load_state_dict_post_hook(lambda module, _keys: module._mirror_buffers())
        self.vote_schema = votes
        if label == "votes":  # a galaxy's vote path (by its code) -> its label (the index of the path's caption)
            _, codes = path_table(votes)
            self.register_buffer("path_codes", codes, persistent=False)
            self.register_buffer("path_label", torch.tensor(path_label, dtype=torch.int64), persistent=False)

    # ---- built from config ---------------------------------------------------------------------

    @classmethod
    def batch_keys_for(cls, cfg: PretrainConfig) -> tuple[str, ...]:
        return (cfg.model.align.labels,)

    @classmethod
    def draws(cls, cfg: PretrainConfig) -> str | None:
        """Only labelled galaxies, unless an image–image term can use the others."""
        uses_all = any(s.image_image > 0 for s in cfg.model.align.stages)
        return None if uses_all else cfg.model.align.labels

    @classmethod
    def make_encoder(cls, cfg: PretrainConfig, n_bands: int, image_size: int) -> nn.Module:
        """The image tower: the encoder of ``model.align.init`` (its architecture and weights), else
        ``model.arch`` randomly initialised."""
        init = cfg.model.align.init
        if not init:
            return super().make_encoder(cfg, n_bands, image_size)
        from sslsky.models.loading import FIXED_SIZE, CheckpointError, load_encoder

        try:
            loaded = load_encoder(init)
        except CheckpointError as err:
            raise ConfigError(f"model.align.init: {err}") from None
        if loaded.in_channels != n_bands:
            raise ConfigError(f"model.align.init={init} takes {loaded.in_channels} bands but the data have {n_bands}")
        size = loaded.build_args.get("image_size")
        if size not in (None, image_size) and loaded.arch in FIXED_SIZE:
            raise ConfigError(f"model.align.init={init} was trained on {size}-pixel crops, this run's are "
                              f"{image_size}: set augment.geometry.crop_size={size}")
        encoder = loaded.encoder.train()
        encoder.build_args = {**loaded.build_args, "image_size": image_size}
        if loaded.info.get("method") == "align":
            print(f"pretrain: model.align.init={init} is an align export: its image tower is the start; its text "
                  f"and symbol towers start afresh", flush=True)
        return encoder

    @classmethod
    def from_config(cls, cfg: PretrainConfig, encoder: nn.Module, votes: VoteSchema | None = None,
                    data=None) -> Align:
        a = cfg.model.align
        size, bands = int(encoder.build_args["image_size"]), int(encoder.build_args["in_channels"])
        try:
            if a.labels == "votes":  # a label per distinct caption: paths that read the same are one label
                paths, _ = path_table(votes)
                texts = [vote_caption(p, votes, a.answer_phrases, a.vote_caption) or "a galaxy" for p in paths]
                names = list(dict.fromkeys(texts))  # a vote path's label is named by its caption
                path_label = [names.index(t) for t in texts]
                captions = [[name] for name in names]
                kinds = []
                for label in range(len(names)):  # the symbols of the first path with that caption
                    path = paths[path_label.index(label)]
                    kinds.append([answer_symbol(q, ans) for q, ans in path.answers(votes)] or ["artifact"])
            else:
                names = pack_classes(data)
                captions = class_captions(names, a.class_captions)
                kinds = [list(a.class_symbols[name]) if name in a.class_symbols else class_symbols(name)
                         for name in names]
                bad = sorted({k for ks in kinds for k in ks} - set(SYMBOLS))
                if bad:
                    raise ValueError(f"model.align.class_symbols names unknown symbol kind(s) {bad}; the kinds are "
                                     f"{', '.join(SYMBOLS)} (sslsky symbols --out DIR draws them)")
        except ValueError as err:
            raise ConfigError(f"model.align: {err}") from None
        symbols = symbol_table(kinds, size, a.symbol_variants, bands)
        return cls(encoder, captions, symbols, stage_table(a, cfg.optim.total_steps), a.labels,
                   embed_dim=a.embed_dim, context=a.context, text_width=a.text_width, text_depth=a.text_depth,
                   text_heads=a.text_heads, logit_scale=a.logit_scale, logit_scale_max=a.logit_scale_max,
                   class_names_=names, votes=votes, same_label_positive=a.same_label_positive,
                   path_label=path_label if a.labels == "votes" else None)

    @property
    def encoder(self) -> nn.Module:
        return self.image_tower

    # ---- the loss ---------------------------------------------------------------------------------

    def _mirror_buffers(self) -> None:
        """After a state dict was loaded (a resume): the Python mirrors of ``steps_done`` and ``symbol_copied``."""
        self._done, self._copied = int(self.steps_done), bool(self.symbol_copied)

    def stage(self) -> dict:
        return next((s for s in self.stages if s["start"] <= self._done < s["end"]), self.stages[-1])

    def label_rows(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(index, labelled)``: each galaxy's label index (0 where it has none) and whether it has one."""
        if self.label == "votes":
            votes = batch["votes"]
            labelled = votes.sum(dim=1) > 0
            index = self.path_label[path_index(votes, self.vote_schema, self.path_codes)]
        else:
            index = batch["morph_class"].long()
            labelled = (index >= 0) & (index < len(self.captions))
        return torch.where(labelled, index, torch.zeros_like(index)), labelled

    def draw(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """A caption ``(B, L)`` and a symbol ``(B, C, S, S)`` per label index (a random template and variant)."""
        b = len(index)
        template = (torch.rand(b, device=index.device) * self.caption_counts[index]).long()
        variant = torch.randint(0, self.symbols.shape[1], (b,), device=index.device)
        return self.caption_tokens[index, template], self.symbols[index, variant]

    def embed_text(self, tokens: Tensor) -> Tensor:
        return self.text_projection(self.text_tower(tokens))

    def embed_image(self, images: Tensor) -> Tensor:
        return self.image_projection(self.image_tower(images))

    def embed_symbol(self, symbols: Tensor, own: bool | None = None) -> Tensor:
        own = self.stage()["symbol_tower"] == "own" if own is None else own
        if own:
            return self.symbol_projection(self.symbol_tower(symbols))
        return self.embed_image(symbols)

    def scale(self) -> Tensor:
        """The logit scale's log, clamped to [0, ln 100]: a scale below 1 only blurs the softmax (and an SGD step
        can drive it there when the towers are still random)."""
        return self.logit_scale.clamp(min=0.0, max=self.logit_scale_max)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        view1, view2 = check_views(batch)
        stage = self.stage()
        index, labelled = self.label_rows(batch)
        tokens, symbols = self.draw(index)
        scale = self.scale()
        image = self.embed_image(view1)
        wanted = {pair: stage[pair] for pair in PAIRS if stage[pair] > 0}
        text = self.embed_text(tokens) if {"image_text", "symbol_text"} & set(wanted) else None
        symbol = self.embed_symbol(symbols.to(view1.dtype)) if {"image_symbol", "symbol_text"} & set(wanted) else None
        terms = {}
        for pair in wanted:
            if pair == "image_image":
                terms[pair] = clip_loss(image, self.embed_image(view2), scale)
                continue
            first, second = pair.split("_")
            terms[pair] = clip_loss({"image": image, "symbol": symbol}[first], {"symbol": symbol, "text": text}[second],
                                    scale, mask=labelled, labels=index if self.same_label_positive else None)
        weight = sum(wanted.values())
        loss = sum(w * terms[p] for p, w in wanted.items()) / weight
        metrics = {"acc": self.batch_accuracy(image, text, index, labelled) if text is not None else
                   torch.zeros((), device=view1.device)}
        metrics.update({f"loss_{pair}": value.detach() for pair, value in terms.items()})
        metrics.update({"logit_scale": scale.detach(), "labelled": labelled.sum().float()})
        return loss, metrics

    @torch.no_grad()
    def batch_accuracy(self, image: Tensor, text: Tensor, index: Tensor, labelled: Tensor) -> Tensor:
        """Of this rank's labelled galaxies, how many have as nearest caption of the batch one of their label (masks,
        not boolean indexing: no wait for the device in a training step)."""
        sim = F.normalize(image.float(), dim=1) @ F.normalize(text.float(), dim=1).T  # (B, B)
        sim = sim.masked_fill(~labelled[None, :], float("-inf"))  # only labelled captions are candidates
        hits = (index[sim.argmax(dim=1)] == index) & labelled
        return hits.sum().float() / labelled.sum().clamp(min=1).float()

    def parameters_to_optimize(self) -> Iterator[dict]:
        """Two groups, as open_clip: weight decay on the weight matrices and convolutions; none on the gains,
        biases and the logit scale (decaying them only pulls the scale and the norms towards zero)."""
        params = list(self.named_parameters())
        yield {"params": [p for name, p in params if p.ndim >= 2 and "logit_scale" not in name]}
        yield {"params": [p for name, p in params if p.ndim < 2 or "logit_scale" in name], "weight_decay": 0.0}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """The logit scale clamped; at the first step of a stage with its own symbol tower that follows a stage
        without, the symbol tower (and projection) become copies of the image tower's (GalaxAlign's stage 2)."""
        self.logit_scale.clamp_(min=0.0, max=self.logit_scale_max)
        self.steps_done.fill_(step)
        self._done = step
        stage = self.stage()
        if stage["symbol_tower"] == "own" and not self._copied:
            if any(s["symbol_tower"] == "image" for s in self.stages if s["start"] < stage["start"]):
                self.symbol_tower.load_state_dict(self.image_tower.state_dict())
                self.symbol_projection.load_state_dict(self.image_projection.state_dict())
            self.symbol_copied.fill_(True)  # a first stage of its own starts from the copy made at construction
            self._copied = True

    # ---- validation and export ---------------------------------------------------------------------

    @torch.no_grad()
    def prototypes(self) -> dict[str, Tensor]:
        """``{"text", "symbol"}``: ``(K, D)`` normalised mean embedding of each label's captions / symbol variants."""
        k, t, length = self.caption_tokens.shape
        text = F.normalize(self.embed_text(self.caption_tokens.reshape(k * t, length)).float(), dim=1)
        mask = torch.arange(t, device=text.device)[None, :] < self.caption_counts[:, None]  # (K, T)
        text = (text.reshape(k, t, -1) * mask[..., None]).sum(dim=1)
        v = self.symbols.shape[1]
        symbol = F.normalize(self.embed_symbol(self.symbols.flatten(0, 1)).float(), dim=1).reshape(k, v, -1).mean(1)
        return {"text": F.normalize(text, dim=1), "symbol": F.normalize(symbol, dim=1)}

    @torch.no_grad()
    def held_out(self, batches, eval_view) -> dict[str, float]:
        """Zero-shot accuracy of the labelled val galaxies (centred view) against the text prototypes."""
        proto = self.prototypes()["text"]
        hits, count = 0, 0
        for batch in batches:
            index, labelled = self.label_rows(batch)
            if not labelled.any():
                continue
            image = F.normalize(self.embed_image(eval_view(batch["image"][labelled])).float(), dim=1)
            hits += int(((image @ proto.T).argmax(dim=1) == index[labelled]).sum())
            count += int(labelled.sum())
        if not count:
            return {"val_labelled": 0}
        return {"val_zeroshot_acc": hits / count, "val_labelled": count}

    @staticmethod
    def describe(record: dict[str, float]) -> str:
        if "val_zeroshot_acc" not in record:
            return "no labelled validation galaxy: no zero-shot accuracy"
        return f"val zero-shot accuracy {record['val_zeroshot_acc']:.3f} ({record['val_labelled']} galaxies)"

    def export_state(self) -> dict:
        """What zero-shot classification and text / symbol queries need besides the image tower."""
        return {
            "format": ALIGN_FORMAT,
            "label": self.label,
            "names": self.class_names,
            "captions": self.captions,
            "vocabulary": self.tokenizer.vocabulary,
            "text_args": {"vocab_size": len(self.tokenizer), "context": self.text_tower.context, "eot_id": EOT,
                          "width": self.text_tower.feature_dim, "depth": len(self.text_tower.blocks),
                          "heads": self.text_tower.blocks[0].attn.heads},
            "symbol_own": self.stage()["symbol_tower"] == "own",
            "embed_dim": self.image_projection.out_features,
            "logit_scale_max": self.logit_scale_max,
            "weights": {name: t.detach().clone() for name, t in self.state_dict().items()
                        if not name.startswith("image_tower.") and name != "steps_done"},
            "symbols": self.symbols.detach().cpu().clone(),
        }


def pack_classes(data) -> list[str]:
    """The class names of the pack (its ``label_names``; the vocabulary's for the default label column), numbered
    up to the largest class in any split, so a thinned subset of labels keeps every class of the data."""
    if data is None:
        return list(MORPH_CLASSES)
    attrs = data.attrs
    labels = data.index.columns["morph_class"]
    top = int(labels.max()) if len(labels) else -1
    named = len(attrs.get("label_names") or {}) or (len(MORPH_CLASSES) if attrs.get("label_column", LABEL_COLUMN)
                                                    == LABEL_COLUMN else 0)
    if max(top + 1, named) == 0:
        raise ValueError("no galaxy of the pack has a class label (morph_class): align needs labelled galaxies")
    return class_names(max(top, named - 1), attrs)


def load_aligned(path, device: str | torch.device = "cpu") -> tuple[Align, object]:
    """The towers of an ``encoder.pt`` written by ``method: align`` (eval mode on ``device``) and its
    :class:`~sslsky.models.loading.LoadedEncoder` (the image tower and its input transform). A CheckpointError
    for a file without them (another method's export)."""
    from sslsky.models.loading import CheckpointError, load_encoder, read_checkpoint

    loaded = load_encoder(path, device="cpu")
    state = read_checkpoint(path).get("method_state") or {}
    if state.get("format") != ALIGN_FORMAT:
        raise CheckpointError(f"checkpoint {path} holds no aligned text and symbol towers (method "
                              f"{loaded.info.get('method')!r}): zero-shot classification and text or symbol "
                              f"queries need the encoder.pt of a method=align run")
    text = state["text_args"]
    stage = {"start": 0, "end": 1, "symbol_tower": "own" if state["symbol_own"] else "image",
             **dict.fromkeys(PAIRS, 1.0)}
    model = Align(loaded.encoder, state["captions"], state["symbols"], [stage], "morph_class",
                  embed_dim=int(state["embed_dim"]), context=int(text["context"]), text_width=int(text["width"]),
                  text_depth=int(text["depth"]), text_heads=int(text["heads"]),
                  logit_scale_max=float(state["logit_scale_max"]), class_names_=state["names"])
    model.label = state["label"]
    if model.tokenizer.vocabulary != list(state["vocabulary"]):
        raise CheckpointError(f"checkpoint {path}: its captions do not give back its vocabulary; is it whole?")
    result = model.load_state_dict(state["weights"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("image_tower.") and k != "steps_done"]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path}: its aligned towers do not match (missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
    loaded.encoder = model.image_tower
    loaded.transform = loaded.transform.to(device)
    return model.eval().to(device), loaded


def symbol_table(kinds: list[list[str]], size: int, variants: int, n_bands: int) -> Tensor:
    """``(K, V, C, S, S)`` float32: for each label ``variants`` symbols, cycling through its kinds (a class's
    alternatives, a vote path's answers) with each kind's own variants."""
    out = np.zeros((len(kinds), variants, n_bands, size, size), dtype=np.float32)
    for k, names in enumerate(kinds):
        for v in range(variants):
            out[k, v] = render(names[v % len(names)], size, v // len(names), n_bands)
    return torch.from_numpy(out)
