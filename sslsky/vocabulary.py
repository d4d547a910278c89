"""The label vocabulary: morphology classes, the volunteer decision tree and vote-count schemas.

A leaf module (NumPy-free, imports nothing of sslsky), so that the config schemas, the data layer and the
evaluation all read the same names from one place: :data:`MORPH_CLASSES` (``morph_class`` indexes it),
:data:`VOTE_TREE` (a small GZ2-like tree, the mock's votes; Willett et al. 2013, Walmsley et al. 2022) and
:class:`VoteSchema` (the count columns of one or more campaigns, grouped per question). How the mock draws
votes from this tree lives in :mod:`sslsky.data.votes`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: Prefix of volunteer vote-count columns in a catalog: ``votes_<question>_<answer>``.
VOTES_PREFIX = "votes_"
#: The catalog's default label column (an int indexing :data:`MORPH_CLASSES`; -1 unknown).
LABEL_COLUMN = "morph_class"

#: Galaxy10-DECaLS-style morphology classes; ``morph_class`` indexes this tuple.
MORPH_CLASSES = (
    "round smooth",
    "in-between smooth",
    "cigar smooth",
    "edge-on disk",
    "barred spiral",
    "unbarred spiral",
    "merger/disturbed",
)


@dataclass(frozen=True)
class Question:
    name: str
    answers: tuple[str, ...]
    parent: tuple[str, str] | None  # (question, answer) leading here; None: asked of everyone
    confusion: tuple[float, ...]  # what an unsure volunteer answers (sums to 1)


#: The decision tree, in catalog column order.
VOTE_TREE = (
    Question("smooth-or-featured", ("smooth", "featured", "artifact"), None, (0.45, 0.45, 0.10)),
    Question("how-rounded", ("round", "in-between", "cigar"), ("smooth-or-featured", "smooth"), (0.4, 0.4, 0.2)),
    Question("disk-edge-on", ("yes", "no"), ("smooth-or-featured", "featured"), (0.3, 0.7)),
    Question("has-bar", ("yes", "no"), ("disk-edge-on", "no"), (0.3, 0.7)),
    Question("spiral-arms", ("yes", "no"), ("disk-edge-on", "no"), (0.5, 0.5)),
    Question("merging", ("none", "minor", "major"), None, (0.7, 0.2, 0.1)),
)


def class_names(max_class: int, attrs: dict | None = None) -> list[str]:
    """Names of classes 0..max_class: the pack's (``label_names`` of the catalog's label column), else
    MORPH_CLASSES for ``morph_class``, else the bare numbers; numbers beyond the known names are added."""
    attrs = attrs or {}
    packed = attrs.get("label_names") or {}
    if isinstance(packed, str):  # JSON in HDF5 attributes
        packed = json.loads(packed)
    if packed:
        return [str(packed.get(str(k), k)) for k in range(max_class + 1)]
    names = list(MORPH_CLASSES) if attrs.get("label_column", LABEL_COLUMN) == LABEL_COLUMN else []
    return names + [str(k) for k in range(len(names), max_class + 1)]


def vote_columns() -> list[str]:
    """Catalog column names ``votes_<question>_<answer>``, in tree order."""
    return [f"{VOTES_PREFIX}{q.name}_{a}" for q in VOTE_TREE for a in q.answers]



# ---------------------------------------------------------------------------
# Vote schemas for training: one or more campaigns' trees as grouped count columns.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VoteSchema:
    """Vote-count columns of one or more campaigns (decision trees), grouped per question.

    Each campaign's counts are the columns ``<prefix><question>_<answer>``; campaigns with different
    prefixes (``votes_gz2_``, ``votes_dr5_``) are separate questions even when their trees share names.

    Attributes:
        columns: the A count columns, question after question, answers in order.
        questions: the Q questions as ``<prefix><question>``.
        slices: Q ``(start, stop)`` column ranges, one per question.
        parents: Q column index of the answer leading to each question (None: asked of everyone).
        names: the Q question names without the campaign prefix (``smooth-or-featured``).
    """

    columns: tuple[str, ...]
    questions: tuple[str, ...]
    slices: tuple[tuple[int, int], ...]
    parents: tuple[int | None, ...]
    names: tuple[str, ...] = ()

    @property
    def n_answers(self) -> int:
        return len(self.columns)

    @classmethod
    def from_campaigns(cls, campaigns) -> VoteSchema:
        """From objects with ``prefix`` and ``questions`` (each with ``name``, ``answers``, ``parent``).

        ``parent`` is ``None``/empty or ``(question, answer)`` naming an earlier question of the same
        campaign. ValueError (naming the campaign and question) on anything malformed.
        """
        if not campaigns:
            raise ValueError("no vote campaigns: give at least one (votes.campaigns)")
        columns: list[str] = []
        questions: list[str] = []
        slices: list[tuple[int, int]] = []
        parents: list[int | None] = []
        names: list[str] = []
        for c, campaign in enumerate(campaigns):
            prefix = campaign.prefix
            where = f"votes.campaigns[{c}] (prefix {prefix!r})"
            if not prefix.startswith(VOTES_PREFIX):
                raise ValueError(f"{where}: the prefix must start with {VOTES_PREFIX!r} (only such catalog columns are "
                                 f"packed), e.g. {VOTES_PREFIX}gz2_")
            if not campaign.questions:
                raise ValueError(f"{where}: no questions")
            answer_column: dict[tuple[str, str], int] = {}
            for question in campaign.questions:
                name, answers = question.name, list(question.answers)
                if not name or any(name == n for n, _ in answer_column):
                    raise ValueError(f"{where}: question name {name!r} is empty or repeated")
                if len(answers) < 2 or len(set(answers)) != len(answers):
                    raise ValueError(f"{where}: question {name!r} needs two or more distinct answers, got {answers}")
                parent = tuple(question.parent) if question.parent else None
                if parent is not None and (len(parent) != 2 or parent not in answer_column):
                    raise ValueError(f"{where}: question {name!r} has parent {list(parent)}, which is not "
                                     f"[question, answer] of an earlier question of this campaign")
                parents.append(None if parent is None else answer_column[parent])
                start = len(columns)
                for answer in answers:
                    answer_column[(name, answer)] = len(columns)
                    columns.append(f"{prefix}{name}_{answer}")
                slices.append((start, len(columns)))
                questions.append(f"{prefix}{name}")
                names.append(name)
        repeated = sorted({col for col in columns if columns.count(col) > 1})
        if repeated:
            raise ValueError(f"vote columns {repeated} appear in more than one campaign; give the campaigns "
                             f"different prefixes")
        return cls(tuple(columns), tuple(questions), tuple(slices), tuple(parents), tuple(names))


def default_vote_schema() -> VoteSchema:
    """The schema of :data:`VOTE_TREE` with the catalog prefix: the columns of :func:`vote_columns`."""
    @dataclass
    class _Campaign:
        prefix: str
        questions: tuple[Question, ...]

    return VoteSchema.from_campaigns([_Campaign(VOTES_PREFIX, VOTE_TREE)])
