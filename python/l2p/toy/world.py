"""ShapesWorld's vocabulary and scene description.

A scene has two halves that travel together:

* what the prompt asks for: ``groups`` (shape, count, optional colour and size word) and, for
  the position category, a ``relation`` of group 0 to group 1. The prompt text is derived from
  them, never parsed back.
* what the image shows: ``objects`` (one :class:`ShapeInstance` per drawn shape, in normalised
  image coordinates so one scene renders at any resolution) and a :class:`Background`.

Geometry is resolution-free: x grows to the right, y grows downwards, both in [0, 1]. Shapes are
axis-aligned and drawn inside a square box of half-side ``half_extent`` around ``center``;
triangles point up.

Held-out combinations ("atoms") are listed on :class:`World`: colour x shape pairs, count x shape
pairs and unordered shape pairs. A training scene contains none of them, neither in its prompt nor
in its image; a held-out scene contains at least one (see :func:`scene_atoms`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# GenEval's six categories, in GenEval's order.
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
SPLITS = ("train", "heldout")

# Every shape the renderer and the scorer know. A World uses a subset. The default leaves out
# the diamond: the scorer tells it from the square (1.0 on 300 clean renders with all five
# shapes), but a small generator must get corners right to do so, and squares are already the
# shape a small autoencoder rounds off first.
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "cross": "crosses", "diamond": "diamonds"}

# Saturated or white shape colours; backgrounds are dark and desaturated so that every shape
# colour stands out from every background by a wide margin in CIELAB.
PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 240),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}

SIZES = ("small", "large")
# Half-side of a shape's box as a fraction of the image side: small shapes are 11-15 px wide and
# large ones 19-24 px wide at 64 px.
SIZE_RANGES = {"small": (0.085, 0.115), "large": (0.15, 0.19)}

# GenEval's relation names; the prompt text uses the longer phrases.
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of",
                    "above": "above", "below": "below"}
# GenEval's POSITION_THRESHOLD: offsets smaller than this fraction of the summed box sizes are
# ignored before the direction is taken.
POSITION_THRESHOLD = 0.1

NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4

BACKGROUND_KINDS = ("plain", "gradient", "noise")


def _check_choice(value, allowed, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, allowed))}")


def _check_count(count) -> None:
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be an integer from 1 to {MAX_COUNT}, got {count!r}")


@dataclass(frozen=True)
class World:
    """Which shapes and colours exist, and which combinations are held out of training."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colors: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white")
    heldout_color_shape: tuple[tuple[str, str], ...] = (
        ("blue", "triangle"), ("red", "square"), ("yellow", "circle"), ("purple", "cross"))
    heldout_count_shape: tuple[tuple[int, str], ...] = ((3, "triangle"), (4, "circle"))
    heldout_shape_pairs: tuple[tuple[str, str], ...] = (("circle", "cross"),)

    def __post_init__(self):
        if len(self.shapes) < 2:
            raise ValueError("a World needs at least two shapes (two_objects pairs distinct shapes)")
        if len(self.colors) < 2:
            raise ValueError("a World needs at least two colours (color_attr pairs distinct colours)")
        for shape in self.shapes:
            _check_choice(shape, SHAPES, "shape")
        for color in self.colors:
            _check_choice(color, tuple(PALETTE), "colour")
        for color, shape in self.heldout_color_shape:
            _check_choice(color, self.colors, "held-out colour")
            _check_choice(shape, self.shapes, "held-out shape")
        for count, shape in self.heldout_count_shape:
            _check_count(count)
            _check_choice(shape, self.shapes, "held-out shape")
        for pair in self.heldout_shape_pairs:
            if len(set(pair)) != 2:
                raise ValueError(f"held-out shape pair {pair} must name two different shapes")
            for shape in pair:
                _check_choice(shape, self.shapes, "held-out shape")

    def heldout_atoms(self) -> frozenset:
        return frozenset(
            [("color_shape", c, s) for c, s in self.heldout_color_shape]
            + [("count_shape", n, s) for n, s in self.heldout_count_shape]
            + [("shape_pair",) + tuple(sorted(p)) for p in self.heldout_shape_pairs])


DEFAULT_WORLD = World()


@dataclass(frozen=True)
class Group:
    """One noun phrase of a prompt: ``count`` shapes, with an optional colour and size word."""

    shape: str
    count: int = 1
    color: str | None = None
    size: str | None = None

    def __post_init__(self):
        _check_choice(self.shape, SHAPES, "shape")
        _check_count(self.count)
        if self.color is not None:
            _check_choice(self.color, tuple(PALETTE), "colour")
        if self.size is not None:
            _check_choice(self.size, SIZES, "size")

    def phrase(self) -> str:
        words = [w for w in (self.size, self.color) if w]
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        number = NUMBER_WORDS[self.count]
        if self.count == 1 and (words[0] if words else noun)[0] in "aeiou":
            number = "an"
        return " ".join([number, *words, noun])


@dataclass(frozen=True)
class ShapeInstance:
    """One drawn shape; ``group`` is the index of the prompt group it belongs to."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]
    half_extent: float
    group: int = 0

    def box(self) -> tuple[float, float, float, float]:
        (cx, cy), r = self.center, self.half_extent
        return (cx - r, cy - r, cx + r, cy + r)


@dataclass(frozen=True)
class Background:
    """A plain colour, a linear gradient from ``color`` to ``color2`` along ``angle`` (degrees,
    0 = left to right), or a plain colour with light Gaussian noise of ``noise_std`` (in [0, 1]
    units) drawn from ``noise_seed``."""

    kind: str
    color: tuple[int, int, int]
    color2: tuple[int, int, int] | None = None
    angle: float = 0.0
    noise_std: float = 0.0
    noise_seed: int = 0

    def __post_init__(self):
        _check_choice(self.kind, BACKGROUND_KINDS, "background kind")
        if self.kind == "gradient" and self.color2 is None:
            raise ValueError("a gradient background needs color2")


@dataclass(frozen=True)
class Scene:
    category: str
    groups: tuple[Group, ...]
    objects: tuple[ShapeInstance, ...]
    background: Background
    relation: str | None = None
    split: str = "train"

    def __post_init__(self):
        _check_choice(self.category, CATEGORIES, "category")
        _check_choice(self.split, SPLITS, "split")
        if not self.groups:
            raise ValueError("a scene needs at least one group")
        if (self.category == "position") != (self.relation is not None):
            raise ValueError("position scenes, and only they, carry a relation")
        if self.relation is not None:
            _check_choice(self.relation, RELATIONS, "relation")
            if len(self.groups) != 2:
                raise ValueError("a relation needs exactly two groups (subject, reference)")

    @property
    def prompt(self) -> str:
        return prompt_text(self.groups, self.relation)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        bg = dict(d["background"])
        for key in ("color", "color2"):
            if bg.get(key) is not None:
                bg[key] = tuple(bg[key])
        return cls(
            category=d["category"],
            groups=tuple(Group(**g) for g in d["groups"]),
            objects=tuple(ShapeInstance(**{**o, "center": tuple(o["center"])})
                          for o in d["objects"]),
            background=Background(**bg),
            relation=d.get("relation"),
            split=d.get("split", "train"),
        )


def prompt_text(groups, relation: str | None = None) -> str:
    """``two red circles to the left of a blue square``; ``a circle and a square``."""
    phrases = [g.phrase() for g in groups]
    if relation is not None:
        return f"{phrases[0]} {RELATION_PHRASES[relation]} {phrases[1]}"
    return " and ".join(phrases)


def scene_atoms(scene: Scene) -> set:
    """Every combination a scene shows or names, in the vocabulary of :meth:`World.heldout_atoms`."""
    return prompt_atoms(scene) | {("color_shape", o.color, o.shape) for o in scene.objects}


def prompt_atoms(scene: Scene) -> set:
    """The combinations a scene's prompt names (not those its reference render happens to
    show: an uncoloured "two triangles" names no colour), in the vocabulary of
    :meth:`World.heldout_atoms`. A held-out prompt naming none of the held-out ones is word
    for word a prompt the training split can give ("a circle", "a circle and a square"):
    :func:`names_heldout` tells the two kinds apart."""
    atoms = {("color_shape", g.color, g.shape) for g in scene.groups if g.color}
    atoms |= {("count_shape", g.count, g.shape) for g in scene.groups if g.count > 1}
    shapes = sorted({g.shape for g in scene.groups})
    atoms |= {("shape_pair", a, b) for i, a in enumerate(shapes) for b in shapes[i + 1:]}
    return atoms


def names_heldout(scene: Scene, world: "World | None" = None) -> bool:
    """Whether the scene's prompt names a held-out combination (a prompt training never gives)."""
    return bool(prompt_atoms(scene) & (world or DEFAULT_WORLD).heldout_atoms())


def relations(box_a, box_b) -> set[str]:
    """Where box A lies relative to box B, by GenEval's rule (``relative_position`` in its
    evaluate_images.py): the centre offset, shrunk by POSITION_THRESHOLD times the summed box
    sizes, must point more than 60 degrees' worth (|component| > 0.5 of the offset) along an axis."""
    return {rel for rel, strength in relation_strengths(box_a, box_b).items() if strength > 0.5}


def relation_strengths(box_a, box_b) -> dict[str, float]:
    """The signed direction components GenEval thresholds at 0.5, per relation."""
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    offset = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    dims = ((ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0))
    norm = math.hypot(*offset)
    revised = [max(abs(o) - POSITION_THRESHOLD * d, 0.0) * math.copysign(1.0, o)
               for o, d in zip(offset, dims)]
    if norm == 0 or all(abs(r) < 1e-3 * max(dims) for r in revised):
        return {rel: 0.0 for rel in RELATIONS}
    dx, dy = revised[0] / norm, revised[1] / norm
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}
