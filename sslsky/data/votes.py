"""Galaxy-Zoo-style volunteer votes for the mock: a small GZ2-like decision tree.

The tree is declared once, as data (:data:`VOTE_TREE`): each question lists its
answers and the (question, answer) a volunteer must have chosen to be asked it
(``None``: asked of everyone). Following Willett et al. 2013 (GZ2) and Walmsley
et al. 2022 (GZ DECaLS), the catalog holds raw counts ``votes_<question>_<answer>``;
a question is asked only of the volunteers who chose its parent answer, so the
answers of a child question add up to at most the parent answer's count, and a
question nobody was led to has zero votes.

Vote model: every volunteer answers the true answer with probability 1 - eps and
otherwise picks from the question's confusion distribution; eps grows with the
image difficulty (faint, small compared with the PSF). Questions whose answer
the truth does not fix (is a smooth galaxy barred?) are answered from the
confusion distribution alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from sslsky.data.schema import LABEL_COLUMN, VOTES_PREFIX

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

#: True answer of each question for each morphology class (None: the truth does not fix it).
#: Mergers (class 6) take their primary's answers, set per galaxy in :func:`true_answers`.
CLASS_ANSWERS = {
    0: {"smooth-or-featured": "smooth", "how-rounded": "round", "merging": "none"},
    1: {"smooth-or-featured": "smooth", "how-rounded": "in-between", "merging": "none"},
    2: {"smooth-or-featured": "smooth", "how-rounded": "cigar", "merging": "none"},
    3: {"smooth-or-featured": "featured", "disk-edge-on": "yes", "merging": "none"},
    4: {"smooth-or-featured": "featured", "disk-edge-on": "no", "has-bar": "yes", "spiral-arms": "yes",
        "merging": "none"},
    5: {"smooth-or-featured": "featured", "disk-edge-on": "no", "has-bar": "no", "spiral-arms": "yes",
        "merging": "none"},
}

#: Confusion probability of the easiest and the hardest images.
EPS_EASY = 0.08
EPS_HARD = 0.75
#: Fewest volunteers who see a labelled galaxy.
MIN_VOLUNTEERS = 5


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


def _question(name: str) -> Question:
    return next(q for q in VOTE_TREE if q.name == name)


def true_answers(morph_class: np.ndarray, primary_smooth: np.ndarray, axis_ratio: np.ndarray,
                 companion_ratio: np.ndarray) -> dict[str, np.ndarray]:
    """Index of the true answer of every question per galaxy (-1 where the truth does not fix it).

    Args:
        morph_class: (N,) int classes.
        primary_smooth, axis_ratio, companion_ratio: (N,) for mergers: is the primary smooth, its
            projected axis ratio, companion / primary flux (> 1/3 is a major merger).
    Returns:
        question name -> (N,) int answer index.
    """
    n = len(morph_class)
    out = {q.name: np.full(n, -1, dtype=np.int64) for q in VOTE_TREE}
    for cls, answers in CLASS_ANSWERS.items():
        rows = morph_class == cls
        for name, answer in answers.items():
            out[name][rows] = _question(name).answers.index(answer)
    merger = morph_class == 6
    out["merging"][merger] = np.where(companion_ratio[merger] > 1.0 / 3.0, 2, 1)
    smooth = merger & primary_smooth
    out["smooth-or-featured"][smooth] = 0
    out["how-rounded"][smooth] = 2 - np.digitize(axis_ratio[smooth], [0.5, 0.8])
    featured = merger & ~primary_smooth
    out["smooth-or-featured"][featured] = 1
    out["disk-edge-on"][featured] = 1
    return out


def image_difficulty(mag_r: np.ndarray, r50: np.ndarray, psf_fwhm: np.ndarray) -> np.ndarray:
    """0 (bright, well resolved) .. 1 (faint, unresolved): half from brightness, half from size / PSF."""
    faint = 1.0 / (1.0 + np.exp(-(mag_r - 16.8) / 0.4))
    small = np.exp(-r50 / psf_fwhm)
    return np.clip(0.5 * faint + 0.5 * small, 0.0, 1.0)


def draw_votes(rng: np.random.Generator, truth: dict[str, np.ndarray], difficulty: np.ndarray,
               n_volunteers: np.ndarray) -> dict[str, np.ndarray]:
    """Vote counts walking down the tree.

    Args:
        truth: from :func:`true_answers`.
        difficulty: (N,) in [0, 1].
        n_volunteers: (N,) int, 0 for unlabelled galaxies.
    Returns:
        column name -> (N,) int32 counts, in :func:`vote_columns` order.
    """
    eps = (EPS_EASY + (EPS_HARD - EPS_EASY) * difficulty)[:, None]
    counts: dict[str, np.ndarray] = {}  # question -> (N, A)
    for q in VOTE_TREE:
        asked = n_volunteers if q.parent is None else counts[q.parent[0]][:, _question(q.parent[0]).answers.index(
            q.parent[1])]
        confusion = np.broadcast_to(np.asarray(q.confusion), (len(asked), len(q.answers)))
        onehot = np.zeros_like(confusion)
        known = truth[q.name] >= 0
        onehot[np.flatnonzero(known), truth[q.name][known]] = 1.0
        p = np.where(known[:, None], (1.0 - eps) * onehot + eps * confusion, confusion)
        counts[q.name] = rng.multinomial(asked, p / p.sum(axis=1, keepdims=True))
    return {f"{VOTES_PREFIX}{q.name}_{a}": counts[q.name][:, j].astype(np.int32)
            for q in VOTE_TREE for j, a in enumerate(q.answers)}


def class_from_votes(votes: dict[str, np.ndarray]) -> np.ndarray:
    """Majority-vote morphology class (-1 with no votes), walking the tree like Galaxy10 DECaLS.

    Args:
        votes: column name -> (N,) counts.
    Returns:
        (N,) int classes.
    """
    def answer(q: str) -> np.ndarray:
        return np.stack([votes[f"{VOTES_PREFIX}{q}_{a}"] for a in _question(q).answers], axis=1)

    sof, rounded, edge, bar, merging = (answer(q) for q in
                                        ("smooth-or-featured", "how-rounded", "disk-edge-on", "has-bar", "merging"))
    cls = np.where(sof[:, 0] >= sof[:, 1], rounded.argmax(axis=1),
                   np.where(edge[:, 0] > edge[:, 1], 3, np.where(bar[:, 0] > bar[:, 1], 4, 5)))
    cls = np.where(merging[:, 1:].sum(axis=1) > merging[:, 0], 6, cls)
    return np.where(sof.sum(axis=1) == 0, -1, cls)


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
    """

    columns: tuple[str, ...]
    questions: tuple[str, ...]
    slices: tuple[tuple[int, int], ...]
    parents: tuple[int | None, ...]

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
        repeated = sorted({col for col in columns if columns.count(col) > 1})
        if repeated:
            raise ValueError(f"vote columns {repeated} appear in more than one campaign; give the campaigns "
                             f"different prefixes")
        return cls(tuple(columns), tuple(questions), tuple(slices), tuple(parents))


def default_vote_schema() -> VoteSchema:
    """The schema of :data:`VOTE_TREE` with the catalog prefix: the columns of :func:`vote_columns`."""
    @dataclass
    class _Campaign:
        prefix: str
        questions: tuple[Question, ...]

    return VoteSchema.from_campaigns([_Campaign(VOTES_PREFIX, VOTE_TREE)])
