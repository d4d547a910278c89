"""Schematic symbols of galaxy morphology: the icons a symbol tower aligns with galaxy images (GalaxAlign).

GalaxAlign (Wang, Wang & Luo 2024, arXiv 2411.19475) fine-tunes an image encoder by aligning galaxy images
with *schematic symbols* -- the simple drawings of shapes that Galaxy Zoo shows its volunteers next to each
answer -- and with the answers' text (CLIP-style). This module draws those symbols: white line and filled art
on black, anti-aliased on the pixel grid from signed distances (:func:`_fill`) and soft Gaussian profiles
(:func:`_soft_blob`), with NumPy only. Pillow writes the contact sheet (:func:`write_sheet`).

Every kind is drawn in many *variants* -- orientation, size, line width, mirror (spiral chirality) and its
shape parameters (axis ratio, arm pitch, ...) -- so that the symbol tower sees augmentation and cannot key on
one fixed picture. ``render(kind, size, variant)`` is deterministic: the variant seeds
``np.random.default_rng((crc32(kind), variant))``; variant 0 is the canonical, upright symbol.

Kinds (:data:`SYMBOLS`; x is the major axis in the canonical pose):

    round-smooth, in-between-smooth, cigar-smooth   soft Gaussian ellipses, axis ratio ~0.9 / 0.6 / 0.25
    smooth                                          the same, any axis ratio (the answer "smooth")
    edge-on-disk, edge-on-bulge, edge-on-dust-lane  a thin sharp disk; with a round bulge; thick, with a
                                                    dark lane along the major axis
    face-on-disk, face-on-bar                       a faint disk and bulge; the same with a bar
    featured-disk                                   a faint disk and bulge with bright knots
    barred-spiral                                   disk, bulge, bar and two arms leaving the bar's ends
    unbarred-spiral-2-arms, -many-arms              disk, bulge and two / four logarithmic arms
    ring                                            an elliptical ring around a faint nucleus (no question
                                                    of :data:`~sslsky.vocabulary.VOTE_TREE` asks for one)
    merger, minor-merger, disturbed                 two similar blobs with tidal tails; a big blob and a
                                                    small companion with a bridge; a lopsided blob with
                                                    a plume and a tail
    isolated                                        one lone galaxy (the answer "no merger")
    artifact                                        a star with diffraction spikes

:func:`class_symbols` maps each :data:`~sslsky.vocabulary.MORPH_CLASSES` name to its kinds and
:func:`answer_symbol` each answer of the decision tree to one; a yes/no answer is drawn as the feature
present or absent (``has-bar`` yes: ``face-on-bar``, no: ``face-on-disk``).

Arrays: :func:`render` gives ``(C, S, S)`` float32 in [0, 1], row 0 at the top, the same intensity in every
band (a symbol carries shape, not colour: identical bands give the image tower's band count without
inventing a colour the galaxy images would contradict); :func:`symbol_bank` gives ``(K, V, C, S, S)``.
Sizes from 8 px up work; a 424-px symbol takes 5-90 ms (spirals the most).
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslsky.outputs import atomic_output
from sslsky.vocabulary import MORPH_CLASSES, VOTE_TREE

__all__ = ["SYMBOLS", "CLASS_SYMBOLS", "ANSWER_SYMBOLS", "MIN_SIZE", "class_symbols", "answer_symbol", "render",
           "symbol_bank", "sheet_size", "write_sheet"]

#: Smallest symbol edge [px]; below it the shapes are no longer told apart.
MIN_SIZE = 8
#: Canonical (variant 0) pose: the symbol's extent as a fraction of the half-frame, and its line width in
#: half-frame units (the frame spans [-1, 1]); variants draw from the ranges.
CANONICAL_SCALE, SCALE_RANGE = 0.9, (0.7, 1.0)
CANONICAL_WIDTH, WIDTH_RANGE = 0.06, (0.04, 0.09)
#: Thinnest stroke [px]: thinner lines would vanish between pixel centres.
MIN_STROKE_PX = 1.2


# ---------------------------------------------------------------------------
# Pose and pixel grid
# ---------------------------------------------------------------------------


@dataclass
class Pose:
    """How one variant is drawn: rotation [rad, counter-clockwise], scale, line width [half-frame units],
    mirror (flips chirality) and the generator of its shape parameters (None: the canonical variant 0)."""

    angle: float
    scale: float
    width: float
    mirror: bool
    rng: np.random.Generator | None

    def pick(self, canonical: float, low: float, high: float) -> float:
        """A shape parameter: ``canonical`` for variant 0, else uniform in [low, high)."""
        return canonical if self.rng is None else float(self.rng.uniform(low, high))


def variant_pose(kind: str, variant: int) -> Pose:
    """The pose of ``variant`` of ``kind``, seeded by ``(crc32(kind), variant)`` (stable across runs)."""
    if variant == 0:
        return Pose(0.0, CANONICAL_SCALE, CANONICAL_WIDTH, False, None)
    rng = np.random.default_rng((zlib.crc32(kind.encode()), variant))
    return Pose(angle=float(rng.uniform(0.0, 2 * math.pi)), scale=float(rng.uniform(*SCALE_RANGE)),
                width=float(rng.uniform(*WIDTH_RANGE)), mirror=bool(rng.random() < 0.5), rng=rng)


@dataclass(frozen=True)
class Frame:
    """Pixel-centre coordinates (S, S) in the symbol's own body frame (pose undone: x along the canonical
    major axis, y up, the symbol's extent ~1), the width of one pixel and the stroke width in those units."""

    x: np.ndarray
    y: np.ndarray
    pixel: float
    stroke: float

    def line(self, factor: float = 1.0) -> float:
        """A line ``factor`` times the pose's width, never thinner than :data:`MIN_STROKE_PX` pixels."""
        return max(factor * self.stroke, MIN_STROKE_PX * self.pixel)

    @functools.cached_property
    def polar(self) -> tuple[np.ndarray, np.ndarray]:
        """(S, S) radius and position angle [rad] of each pixel about the centre (computed once)."""
        return _length(self.x, self.y), np.arctan2(self.y, self.x)


def body_frame(size: int, pose: Pose) -> Frame:
    """The (S, S) grid of a ``size``-px image in the body frame of ``pose`` (the image spans [-1, 1])."""
    pixel = 2.0 / size
    centres = (np.arange(size) - (size - 1) / 2) * pixel
    x, y = np.meshgrid(centres, -centres)  # row 0 is the top: y up
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    u = (cos * x + sin * y) / pose.scale  # rotating the coordinates by -angle turns the drawing by +angle
    v = (-sin * x + cos * y) / pose.scale
    if pose.mirror:
        v = -v
    return Frame(u, v, pixel / pose.scale, pose.width / pose.scale)


def _turned(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame turned by ``angle`` [rad] (a shape drawn there appears turned by +angle)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return cos * x + sin * y, -sin * x + cos * y


# ---------------------------------------------------------------------------
# Primitives: (S, S) intensities in [0, 1] on a Frame
# ---------------------------------------------------------------------------


def _length(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """sqrt(dx^2 + dy^2): ~10x faster than np.hypot, whose overflow guard these small numbers do not need."""
    return np.sqrt(dx * dx + dy * dy)


def _fill(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage of the region ``distance < 0`` (a signed distance): a one-pixel linear edge."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _ellipse_distance(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to the ellipse (x/a)^2 + (y/b)^2 = 1: f / |grad f|, exact on the curve."""
    f = (x / a) ** 2 + (y / b) ** 2 - 1.0
    grad = 2.0 * _length(x / a**2, y / b**2)
    return f / np.maximum(grad, 1e-9)


def _segment_distance(x: np.ndarray, y: np.ndarray, start: tuple[float, float],
                      end: tuple[float, float]) -> np.ndarray:
    """Distance to the segment from ``start`` to ``end``."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    t = np.clip(((x - start[0]) * dx + (y - start[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return _length(x - start[0] - t * dx, y - start[1] - t * dy)


def _spiral_distance(frame: Frame, r_start: float, r_end: float, pitch: float, phase: float) -> np.ndarray:
    """Distance to one logarithmic spiral arm r = r_start exp(theta tan(pitch)), theta from 0 until r = r_end,
    starting at position angle ``phase``. Near the arm the distance is |r - r_arm| cos(pitch), taken over
    every winding that passes the pixel's position angle; the two ends are round caps."""
    k = math.tan(pitch)
    theta_end = math.log(r_end / r_start) / k
    x, y = frame.x, frame.y
    r, angle = frame.polar
    base = np.mod(angle - phase, 2 * math.pi)  # position angle along the arm, first winding
    best = np.minimum(_length(x - r_start * math.cos(phase), y - r_start * math.sin(phase)),
                      _length(x - r_end * math.cos(phase + theta_end), y - r_end * math.sin(phase + theta_end)))
    for winding in range(int(theta_end // (2 * math.pi)) + 1):
        theta = base + 2 * math.pi * winding
        along = np.abs(r - r_start * np.exp(k * theta)) * math.cos(pitch)
        best = np.where(theta <= theta_end, np.minimum(best, along), best)
    return best


def _soft_blob(frame: Frame, a: float, q: float, centre: tuple[float, float] = (0.0, 0.0),
               angle: float = 0.0) -> np.ndarray:
    """A smooth galaxy: a Gaussian ellipse, peak 1, 10 % of the peak at semi-axes ``a`` and ``q a``, turned by
    ``angle``. Each axis is widened by the pixel's box (variance pixel^2 / 12), so that a blob narrower than a
    pixel still shows and does not flicker with its sub-pixel position."""
    u, v = _turned(frame.x - centre[0], frame.y - centre[1], angle)
    widen = 2 * math.log(10) * frame.pixel**2 / 12  # a^2 = 2 ln10 sigma^2
    return np.exp(-math.log(10) * (u**2 / (a**2 + widen) + v**2 / ((q * a) ** 2 + widen)))


def _stroke(distance: np.ndarray, width: float, pixel: float) -> np.ndarray:
    """An anti-aliased line of ``width`` along the zero set of an unsigned ``distance``."""
    return _fill(distance - width / 2, pixel)


def _over(*layers: np.ndarray) -> np.ndarray:
    """Layers drawn over each other (the brightest wins: stays in [0, 1])."""
    return np.maximum.reduce(layers)


# ---------------------------------------------------------------------------
# Building blocks shared by several kinds
# ---------------------------------------------------------------------------


DISK_LEVEL = 0.3  # faint disk under bulges, bars and arms
BULGE_A = 0.28


def _disk_and_bulge(frame: Frame, q: float = 1.0) -> np.ndarray:
    """A faint face-on disk (axis ratio ``q``) with a bright round bulge."""
    return _over(DISK_LEVEL * _soft_blob(frame, 1.0, q), _soft_blob(frame, BULGE_A, 1.0))


def _arms(frame: Frame, pose: Pose, n_arms: int, r_start: float, pitch_deg: tuple[float, float, float],
          phase: float = 0.0) -> np.ndarray:
    """``n_arms`` evenly spaced logarithmic arms from radius ``r_start`` out to ~0.95; the pitch angle
    [deg] is (canonical, low, high)."""
    pitch = math.radians(pose.pick(*pitch_deg))
    r_end = pose.pick(0.95, 0.85, 1.0)
    width = frame.line()
    return _over(*(_stroke(_spiral_distance(frame, r_start, r_end, pitch, phase + 2 * math.pi * i / n_arms), width,
                           frame.pixel)
                   for i in range(n_arms)))


def _bar(frame: Frame, half_length: float) -> np.ndarray:
    """A bar along x through the centre."""
    distance = _segment_distance(frame.x, frame.y, (-half_length, 0.0), (half_length, 0.0))
    return _stroke(distance, frame.line(2.2), frame.pixel)


def _tidal_tail(frame: Frame, pose: Pose, r_start: float, phase: float, level: float) -> np.ndarray:
    """A tidal tail: a loosely wound arc leaving radius ``r_start`` at angle ``phase``."""
    pitch = math.radians(pose.pick(30.0, 22.0, 40.0))
    r_end = pose.pick(1.0, 0.85, 1.1)
    distance = _spiral_distance(frame, r_start, r_end, pitch, phase)
    return level * _stroke(distance, frame.line(1.3), frame.pixel)


# ---------------------------------------------------------------------------
# Kinds: (frame, pose) -> (S, S) intensity
# ---------------------------------------------------------------------------


def round_smooth(frame: Frame, pose: Pose) -> np.ndarray:
    return _soft_blob(frame, 0.7, pose.pick(1.0, 0.85, 1.0))


def in_between_smooth(frame: Frame, pose: Pose) -> np.ndarray:
    return _soft_blob(frame, 0.8, pose.pick(0.6, 0.5, 0.7))


def cigar_smooth(frame: Frame, pose: Pose) -> np.ndarray:
    return _soft_blob(frame, 0.95, pose.pick(0.25, 0.18, 0.32))


def smooth(frame: Frame, pose: Pose) -> np.ndarray:
    """Any smooth galaxy: the answer "smooth", before the roundness is asked."""
    return _soft_blob(frame, 0.8, pose.pick(0.75, 0.25, 1.0))


def edge_on_disk(frame: Frame, pose: Pose) -> np.ndarray:
    """A thin, sharp-edged disk seen edge-on."""
    half_thickness = frame.line(pose.pick(1.0, 0.8, 1.4))
    return _fill(_ellipse_distance(frame.x, frame.y, 1.0, half_thickness), frame.pixel)


def edge_on_bulge(frame: Frame, pose: Pose) -> np.ndarray:
    """An edge-on disk with a round bulge."""
    return _over(edge_on_disk(frame, pose), _soft_blob(frame, pose.pick(0.38, 0.3, 0.45), 0.8))


def edge_on_dust_lane(frame: Frame, pose: Pose) -> np.ndarray:
    """A thicker edge-on disk with a bulge, cut along its major axis by a dark dust lane."""
    half_thickness = max(pose.pick(0.16, 0.13, 0.2), 2 * MIN_STROKE_PX * frame.pixel)  # room for the lane
    disk = _over(0.6 * _fill(_ellipse_distance(frame.x, frame.y, 1.0, half_thickness), frame.pixel),
                 _soft_blob(frame, pose.pick(0.45, 0.38, 0.52), 0.7))
    lane = _stroke(_segment_distance(frame.x, frame.y, (-0.75, 0.0), (0.75, 0.0)),
                   max(0.5 * half_thickness, MIN_STROKE_PX * frame.pixel), frame.pixel)
    return disk * (1.0 - 0.9 * lane)


def face_on_disk(frame: Frame, pose: Pose) -> np.ndarray:
    """A featureless disk: no bar, no arms (the answers "no" to edge-on, bar and arms)."""
    return _disk_and_bulge(frame, pose.pick(1.0, 0.7, 1.0))


def face_on_bar(frame: Frame, pose: Pose) -> np.ndarray:
    """A disk with a bar and no arms (the answer "has a bar")."""
    return _over(_disk_and_bulge(frame, pose.pick(1.0, 0.7, 1.0)), _bar(frame, pose.pick(0.5, 0.4, 0.6)))


def featured_disk(frame: Frame, pose: Pose) -> np.ndarray:
    """A disk with bright knots: "features" of no particular kind (the answer "featured")."""
    n_knots = 5 if pose.rng is None else int(pose.rng.integers(4, 8))
    layers = [_disk_and_bulge(frame)]
    for i in range(n_knots):
        radius = 0.6 if pose.rng is None else float(pose.rng.uniform(0.4, 0.8))
        angle = 2 * math.pi * i / n_knots + (0.0 if pose.rng is None else float(pose.rng.uniform(-0.4, 0.4)))
        centre = (radius * math.cos(angle), radius * math.sin(angle))
        layers.append(_fill(_length(frame.x - centre[0], frame.y - centre[1]) - frame.line(1.2), frame.pixel))
    return _over(*layers)


def barred_spiral(frame: Frame, pose: Pose) -> np.ndarray:
    """A bar whose two ends start the two arms."""
    half_length = pose.pick(0.5, 0.42, 0.58)
    return _over(_disk_and_bulge(frame), _bar(frame, half_length),
                 _arms(frame, pose, 2, half_length, (18.0, 12.0, 24.0)))


def unbarred_spiral_2_arms(frame: Frame, pose: Pose) -> np.ndarray:
    return _over(_disk_and_bulge(frame), _arms(frame, pose, 2, 0.15, (20.0, 15.0, 28.0)))


def unbarred_spiral_many_arms(frame: Frame, pose: Pose) -> np.ndarray:
    return _over(_disk_and_bulge(frame), _arms(frame, pose, 4, 0.15, (26.0, 20.0, 32.0)))


def ring(frame: Frame, pose: Pose) -> np.ndarray:
    """A bright ring around a fainter nucleus, empty in between (a ring galaxy, Hoag-like)."""
    q = pose.pick(1.0, 0.75, 1.0)
    radius = pose.pick(0.75, 0.65, 0.85)
    band = _stroke(np.abs(_ellipse_distance(frame.x, frame.y, radius, q * radius)), frame.line(1.5), frame.pixel)
    return _over(band, 0.5 * _soft_blob(frame, 0.15, 1.0))


def merger(frame: Frame, pose: Pose) -> np.ndarray:
    """A major merger: two similar blobs with tidal tails leaving in opposite directions (the Antennae)."""
    separation = pose.pick(0.35, 0.28, 0.42)
    blobs = [_soft_blob(frame, pose.pick(0.3, 0.25, 0.35), pose.pick(0.8, 0.6, 1.0), (sign * separation, 0.0),
                        pose.pick(0.5, 0.0, math.pi)) for sign in (1, -1)]
    tails = [_tidal_tail(frame, pose, separation, phase, 0.7) for phase in (0.0, math.pi)]
    return _over(*blobs, *tails)


def minor_merger(frame: Frame, pose: Pose) -> np.ndarray:
    """A big galaxy and a small companion joined by a faint bridge."""
    main_centre, companion = (-0.2, 0.0), (pose.pick(0.6, 0.5, 0.7), pose.pick(0.1, -0.15, 0.15))
    bridge = 0.4 * _stroke(_segment_distance(frame.x, frame.y, main_centre, companion), frame.line(1.2),
                           frame.pixel)
    return _over(_soft_blob(frame, pose.pick(0.5, 0.42, 0.58), pose.pick(0.8, 0.6, 1.0), main_centre),
                 0.85 * _soft_blob(frame, pose.pick(0.16, 0.12, 0.2), 1.0, companion), bridge)


def disturbed(frame: Frame, pose: Pose) -> np.ndarray:
    """A lopsided galaxy: a body, an off-centre plume and one tidal tail, no companion."""
    body = _soft_blob(frame, 0.4, pose.pick(0.85, 0.7, 1.0))
    plume = 0.65 * _soft_blob(frame, pose.pick(0.35, 0.28, 0.42), 0.5, (0.28, 0.12), pose.pick(0.6, 0.2, 1.0))
    return _over(body, plume, _tidal_tail(frame, pose, 0.3, math.pi, 0.6))


def isolated(frame: Frame, pose: Pose) -> np.ndarray:
    """One lone, undisturbed galaxy in an empty frame (the answer "no merger")."""
    return _over(0.45 * _soft_blob(frame, 0.8, pose.pick(0.7, 0.4, 1.0)), _soft_blob(frame, 0.28, 1.0))


def artifact(frame: Frame, pose: Pose) -> np.ndarray:
    """A bright star with four diffraction spikes (not a galaxy)."""
    spikes = []
    for start, end in (((-1.0, 0.0), (1.0, 0.0)), ((0.0, -1.0), (0.0, 1.0))):
        line = _stroke(_segment_distance(frame.x, frame.y, start, end), frame.line(0.8), frame.pixel)
        spikes.append(line * np.exp(-_length(frame.x, frame.y) / 0.6))
    return _over(_soft_blob(frame, 0.2, 1.0), *spikes)


#: Every symbol kind, by name.
SYMBOLS: dict[str, Callable[[Frame, Pose], np.ndarray]] = {
    "round-smooth": round_smooth,
    "in-between-smooth": in_between_smooth,
    "cigar-smooth": cigar_smooth,
    "smooth": smooth,
    "edge-on-disk": edge_on_disk,
    "edge-on-bulge": edge_on_bulge,
    "edge-on-dust-lane": edge_on_dust_lane,
    "face-on-disk": face_on_disk,
    "face-on-bar": face_on_bar,
    "featured-disk": featured_disk,
    "barred-spiral": barred_spiral,
    "unbarred-spiral-2-arms": unbarred_spiral_2_arms,
    "unbarred-spiral-many-arms": unbarred_spiral_many_arms,
    "ring": ring,
    "merger": merger,
    "minor-merger": minor_merger,
    "disturbed": disturbed,
    "isolated": isolated,
    "artifact": artifact,
}

#: The kinds drawn for each morphology class (:data:`~sslsky.vocabulary.MORPH_CLASSES`).
CLASS_SYMBOLS: dict[str, tuple[str, ...]] = {
    "round smooth": ("round-smooth",),
    "in-between smooth": ("in-between-smooth",),
    "cigar smooth": ("cigar-smooth",),
    "edge-on disk": ("edge-on-disk", "edge-on-bulge", "edge-on-dust-lane"),
    "barred spiral": ("barred-spiral",),
    "unbarred spiral": ("unbarred-spiral-2-arms", "unbarred-spiral-many-arms"),
    "merger/disturbed": ("merger", "minor-merger", "disturbed"),
}

#: The kind drawn for each answer of :data:`~sslsky.vocabulary.VOTE_TREE`: ``(question, answer) -> kind``.
ANSWER_SYMBOLS: dict[tuple[str, str], str] = {
    ("smooth-or-featured", "smooth"): "smooth",
    ("smooth-or-featured", "featured"): "featured-disk",
    ("smooth-or-featured", "artifact"): "artifact",
    ("how-rounded", "round"): "round-smooth",
    ("how-rounded", "in-between"): "in-between-smooth",
    ("how-rounded", "cigar"): "cigar-smooth",
    ("disk-edge-on", "yes"): "edge-on-disk",
    ("disk-edge-on", "no"): "face-on-disk",
    ("has-bar", "yes"): "face-on-bar",
    ("has-bar", "no"): "face-on-disk",
    ("spiral-arms", "yes"): "unbarred-spiral-2-arms",
    ("spiral-arms", "no"): "face-on-disk",
    ("merging", "none"): "isolated",
    ("merging", "minor"): "minor-merger",
    ("merging", "major"): "merger",
}


def class_symbols(name: str) -> list[str]:
    """The kinds drawn for the morphology class ``name`` (one of MORPH_CLASSES); ValueError otherwise."""
    if name not in CLASS_SYMBOLS:
        raise ValueError(f"no symbols for the class {name!r} (the vocabulary's classes are {list(MORPH_CLASSES)}); "
                         f"name its kinds in model.align.class_symbols, e.g. {{{name!r}: [round-smooth]}} "
                         f"(sslsky symbols --out DIR draws every kind)")
    return list(CLASS_SYMBOLS[name])


def answer_symbol(question: str, answer: str) -> str:
    """The kind drawn for ``answer`` of ``question`` of VOTE_TREE; ValueError naming the known ones otherwise."""
    if (question, answer) in ANSWER_SYMBOLS:
        return ANSWER_SYMBOLS[(question, answer)]
    known = {q.name: list(q.answers) for q in VOTE_TREE}
    if question not in known:
        raise ValueError(f"no symbols for question {question!r}; known questions: {list(known)}")
    raise ValueError(f"question {question!r} has no answer {answer!r} with a symbol; its answers: {known[question]}")


def _check_kind(kind: str) -> None:
    if kind not in SYMBOLS:
        raise ValueError(f"unknown symbol kind {kind!r}; known kinds: {list(SYMBOLS)}")


def render(kind: str, size: int, variant: int = 0, n_bands: int = 1) -> np.ndarray:
    """Variant ``variant`` of the symbol ``kind``: (n_bands, size, size) float32 in [0, 1], the same intensity
    in every band. Deterministic; variant 0 is the canonical upright symbol."""
    _check_kind(kind)
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"symbol size must be an integer >= {MIN_SIZE} px, got {size!r}")
    if int(variant) != variant or variant < 0:
        raise ValueError(f"symbol variant must be an integer >= 0, got {variant!r}")
    if int(n_bands) != n_bands or n_bands < 1:
        raise ValueError(f"symbol band count must be an integer >= 1, got {n_bands!r}")
    pose = variant_pose(kind, int(variant))
    image = np.clip(SYMBOLS[kind](body_frame(int(size), pose), pose), 0.0, 1.0).astype(np.float32)
    return np.repeat(image[None], int(n_bands), axis=0)


def symbol_bank(kinds: Sequence[str], size: int, n_variants: int, n_bands: int = 1) -> np.ndarray:
    """Variants 0..n_variants-1 of each kind: (K, V, C, S, S) float32 in [0, 1]."""
    kinds = list(kinds)
    for kind in kinds:
        _check_kind(kind)
    if n_variants < 1:
        raise ValueError(f"n_variants must be >= 1, got {n_variants!r}")
    bank = np.empty((len(kinds), n_variants, n_bands, size, size), dtype=np.float32)
    for k, kind in enumerate(kinds):
        for v in range(n_variants):
            bank[k, v] = render(kind, size, v, n_bands)
    return bank


# ---------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------

SHEET_PAD = 4  # px between cells
SHEET_LABEL_WIDTH = 170  # px of the name column (the default 10-px font: ~33 characters)
SHEET_BACKGROUND = 60  # grey, so that the black cells show their edges


def sheet_size(n_kinds: int, size: int, n_variants: int) -> tuple[int, int]:
    """(width, height) [px] of the sheet :func:`write_sheet` writes."""
    return (SHEET_LABEL_WIDTH + n_variants * (size + SHEET_PAD) + SHEET_PAD,
            n_kinds * (size + SHEET_PAD) + SHEET_PAD)


def write_sheet(path: str | os.PathLike, kinds: Sequence[str] | None = None, size: int = 96,
                n_variants: int = 4) -> Path:
    """A greyscale PNG of every symbol for a person to look at: a row per kind, headed by its name, and its
    variants 0..n_variants-1 in columns (variant 0 canonical). Written atomically; returns ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    kinds = list(SYMBOLS) if kinds is None else list(kinds)
    bank = symbol_bank(kinds, size, n_variants, 1)  # (K, V, 1, S, S)
    sheet = Image.new("L", sheet_size(len(kinds), size, n_variants), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, kind in enumerate(kinds):
        top = SHEET_PAD + k * (size + SHEET_PAD)
        draw.text((SHEET_PAD, top + size // 2), kind, fill=255, font=font, anchor="lm")
        for v in range(n_variants):
            cell = Image.fromarray(np.round(255 * bank[k, v, 0]).astype(np.uint8))
            sheet.paste(cell, (SHEET_LABEL_WIDTH + SHEET_PAD + v * (size + SHEET_PAD), top))
    path = Path(path)
    with atomic_output(path, "symbol sheet") as tmp:
        sheet.save(tmp, format="PNG")
    return path
