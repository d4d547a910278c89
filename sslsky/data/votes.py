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

import numpy as np

from sslsky.vocabulary import VOTE_TREE, VOTES_PREFIX, Question

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
