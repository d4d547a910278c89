"""Text for image–text alignment: captions of classes and of vote paths, and the word-level tokenizer.

Captions come from templates in config (``model.align``: ``class_captions``, ``answer_phrases``,
``vote_caption``; defaults in :mod:`sslsky.config`):

- **a class** has one or more captions ("a smooth, round galaxy", ...); a batch draws one of them per galaxy,
  so the text tower sees the same variety the symbol tower gets from the symbol variants;
- **a galaxy with volunteer votes** gets the caption of its *vote path*: walking the decision tree from the
  top, at every question it was asked (a question whose parent answer is the one chosen, with at least one
  vote) the most-voted answer is chosen (the first on ties), and the phrases of the chosen answers fill the
  ``vote_caption`` template: smooth + round + no merger -> "a galaxy that is smooth and round". The paths of a
  tree are finite; :func:`vote_paths` lists them all, so captions (and symbols) are built once and a batch
  only looks up its galaxies' path (:func:`path_index`, on the device).

**Tokenizer**: a word-level vocabulary over every caption the config can produce (lower-case words and
punctuation; ``<pad>`` 0, ``<sot>``, ``<eot>``, ``<unk>``), stored with the weights. Chosen over open_clip's
BPE: the captions come from a closed set of templates (about a hundred words), so a 49,408-token BPE table
would be almost all untrained weights, and a query with a word the model never saw is reported as such
(:class:`WordTokenizer.encode` with ``strict=True``) instead of being cut into sub-word pieces that mean
nothing to it. Nothing is downloaded; the tokenizer is ~40 lines anyone can read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from sslsky.vocabulary import VoteSchema

SPECIALS = ("<pad>", "<sot>", "<eot>", "<unk>")
PAD, SOT, EOT, UNK = range(len(SPECIALS))
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-case words (hyphenated words kept whole) and punctuation marks of ``text``."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Words -> ids over a fixed vocabulary; ``encode`` gives ``(N, context)`` int64 ``<sot> w... <eot> <pad>...``."""

    def __init__(self, vocabulary: Sequence[str]):
        vocabulary = list(vocabulary)
        if tuple(vocabulary[:len(SPECIALS)]) != SPECIALS or len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"a vocabulary starts with {SPECIALS} and has no repeated word")
        self.vocabulary = vocabulary
        self.ids = {word: i for i, word in enumerate(vocabulary)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordTokenizer:
        """The vocabulary of ``texts`` (sorted, so the same captions give the same ids)."""
        return cls([*SPECIALS, *sorted({w for text in texts for w in words(text)})])

    def __len__(self) -> int:
        return len(self.vocabulary)

    def unknown(self, text: str) -> list[str]:
        """The words of ``text`` that are not in the vocabulary."""
        return [w for w in words(text) if w not in self.ids]

    def encode(self, texts: Sequence[str], context: int, strict: bool = False) -> torch.Tensor:
        """``(len(texts), context)`` int64 ids. ValueError for a text longer than ``context - 2`` words, and with
        ``strict`` for a word outside the vocabulary (the message lists them and some known words)."""
        out = torch.full((len(texts), context), PAD, dtype=torch.int64)
        for i, text in enumerate(texts):
            unknown = self.unknown(text)
            if strict and unknown:
                known = ", ".join(w for w in self.vocabulary[len(SPECIALS):][:40])
                raise ValueError(f"the text {text!r} has word(s) the model was not trained on: {unknown}; its words "
                                 f"are: {known}, ...")
            ids = [SOT, *(self.ids.get(w, UNK) for w in words(text)), EOT]
            if len(ids) > context:
                raise ValueError(f"the text {text!r} has {len(ids) - 2} words, more than the text tower's context "
                                 f"of {context - 2} (model.align.context={context}); shorten it")
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def class_captions(class_names: Sequence[str], templates: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """The captions of each class, in class order; ValueError naming a class with none (and the known ones)."""
    missing = [name for name in class_names if not templates.get(name)]
    if missing:
        raise ValueError(f"no caption for class(es) {missing} in model.align.class_captions (it has "
                         f"{sorted(templates)}); add e.g. '{missing[0]}': ['a galaxy that is {missing[0]}']")
    return [list(templates[name]) for name in class_names]


@dataclass(frozen=True)
class VotePath:
    """One way down the decision tree: the chosen answer column of every question (-1: not asked)."""

    chosen: tuple[int, ...]

    def answers(self, schema: VoteSchema) -> list[tuple[str, str]]:
        """``(question, answer)`` names of every chosen answer, in tree order (without the campaign prefix)."""
        return [(schema.names[q], schema.columns[column][len(schema.questions[q]) + 1:])
                for q, column in enumerate(self.chosen) if column >= 0]


def vote_paths(schema: VoteSchema) -> list[VotePath]:
    """Every path down ``schema``'s tree(s): at each question asked (its parent answer chosen, or no parent)
    one of its answers, or not asked at all when it has votes on none (possible for any question)."""
    paths: list[list[int]] = [[]]
    for q, (start, stop) in enumerate(schema.slices):
        parent = schema.parents[q]
        grown = []
        for path in paths:
            reachable = parent is None or parent in path
            options = [*range(start, stop), -1] if reachable else [-1]
            grown += [[*path, option] for option in options]
        paths = grown
    return [VotePath(tuple(p)) for p in paths]


def vote_caption(path: VotePath, schema: VoteSchema, phrases: Mapping[str, str], template: str) -> str:
    """The caption of a vote path: the phrases of its chosen answers (``question/answer`` keys; an empty phrase
    says nothing, e.g. 'merging/none') joined by commas and a final 'and', in ``template``'s ``{answers}``."""
    said = []
    for question, answer in path.answers(schema):
        key = f"{question}/{answer}"
        if key not in phrases:
            raise ValueError(f"no phrase for the answer {key!r} in model.align.answer_phrases; add it (an empty "
                             f"string says nothing)")
        if phrases[key]:
            said.append(phrases[key])
    if not said:
        return ""
    text = said[0] if len(said) == 1 else f"{', '.join(said[:-1])} and {said[-1]}"
    return template.format(answers=text)


def chosen_answers(votes: torch.Tensor, schema: VoteSchema) -> torch.Tensor:
    """``(B, Q)`` int64 chosen answer column per question (-1: not asked) of ``(B, A)`` vote counts, by the rule of
    the module docstring, on the votes' device."""
    b = votes.shape[0]
    chosen = torch.full((b, len(schema.slices)), -1, dtype=torch.int64, device=votes.device)
    for q, (start, stop) in enumerate(schema.slices):
        part = votes[:, start:stop]
        asked = part.sum(dim=1) > 0
        parent = schema.parents[q]
        if parent is not None:  # asked only where the parent question chose the parent answer
            parent_q = next(i for i, (s, e) in enumerate(schema.slices) if s <= parent < e)
            asked &= chosen[:, parent_q] == parent
        chosen[:, q] = torch.where(asked, start + part.argmax(dim=1), torch.full_like(chosen[:, q], -1))
    return chosen


def path_codes(chosen: torch.Tensor, schema: VoteSchema) -> torch.Tensor:
    """A unique int64 per row of ``(N, Q)`` chosen answers (mixed radix: a question's answers + 'not asked')."""
    code = torch.zeros(chosen.shape[0], dtype=torch.int64, device=chosen.device)
    for q, (start, stop) in enumerate(schema.slices):
        digit = torch.where(chosen[:, q] >= 0, chosen[:, q] - start + 1, torch.zeros_like(chosen[:, q]))
        code = code * (stop - start + 1) + digit
    return code


def path_index(votes: torch.Tensor, schema: VoteSchema, sorted_codes: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index into :func:`vote_paths` (as ``sorted_codes = path_codes(all paths).sort()``'s order) of each
    galaxy's vote path."""
    codes = path_codes(chosen_answers(votes, schema), schema)
    return torch.searchsorted(sorted_codes, codes)


def path_table(schema: VoteSchema) -> tuple[list[VotePath], torch.Tensor]:
    """All vote paths ordered by their code, and the sorted codes (for :func:`path_index`)."""
    paths = vote_paths(schema)
    codes = path_codes(torch.tensor([p.chosen for p in paths], dtype=torch.int64), schema)
    order = torch.argsort(codes)
    return [paths[i] for i in order.tolist()], codes[order]

