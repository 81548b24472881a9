"""The prompt grammar: sample a scene (prompt + the layout that renders it) for a GenEval
category and a split, from a numpy Generator, exactly reproducibly.

What each category asks (mirroring GenEval's prompt templates):

============== ============================================== ================================
category       example                                        scored
============== ============================================== ================================
single_object  ``a circle``                                   one circle present
two_objects    ``a circle and a square``                      both present (distinct shapes)
counting       ``three triangles``                            exactly 3 triangles (2-4)
colors         ``a red circle``                               a circle, and it is red
position       ``two red circles to the left of a blue        every subject left of every
               square`` / ``a triangle above a cross``        reference (GenEval's rule)
color_attr     ``a red circle and a blue square``             each colour on its own shape
============== ============================================== ================================

Size words (``a small circle``) appear in about one phrase in five; they steer the render but,
as in GenEval, are not scored. Shapes whose colour the prompt leaves open get a random colour.

:func:`scene_for` derives record ``index``'s randomness from ``(seed, index)`` alone, so a record
does not change when more records are generated around it.
"""

from __future__ import annotations

import numpy as np

from l2p.toy.world import (
    CATEGORIES, DEFAULT_WORLD, MAX_COUNT, RELATIONS, SIZE_RANGES, SIZES, SPLITS,
    Background, Group, Scene, ShapeInstance, World, _check_choice, relation_strengths,
    scene_atoms,
)

SIZE_WORD_PROB = 0.2
# Position prompts: how often the subject is a pair, and how often the phrases carry colours.
POSITION_PAIR_PROB = 0.25
POSITION_COLOR_PROB = 0.5

# Layout: gaps between shape boxes and to the image border, as fractions of the image side.
MIN_GAP = 0.06
BORDER = 0.03
# Position scenes are drawn with the relation well past GenEval's 0.5 threshold so that a
# slightly displaced reproduction still passes and a near-miss layout is never ground truth.
POSITION_MARGIN = 0.7
MAX_TRIES = 2000


def generate_scenes(n: int, seed: int, split: str = "train", categories=CATEGORIES,
                    world: World = DEFAULT_WORLD) -> list[Scene]:
    """``n`` scenes cycling through ``categories`` in order (balanced to within one)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of scenes must be a positive integer, got {n!r}")
    categories = tuple(categories)
    if not categories:
        raise ValueError("give at least one category")
    for category in categories:
        _check_choice(category, CATEGORIES, "category")
    return [scene_for(seed, i, categories[i % len(categories)], split, world) for i in range(n)]


def scene_for(seed: int, index: int, category: str, split: str = "train",
              world: World = DEFAULT_WORLD) -> Scene:
    """Record ``index`` of the stream seeded by ``seed``."""
    rng = np.random.default_rng([int(seed), int(index)])
    return sample_scene(rng, category, split, world)


def sample_scene(rng: np.random.Generator, category: str, split: str = "train",
                 world: World = DEFAULT_WORLD) -> Scene:
    """One scene of ``category`` drawn from ``rng``. Training scenes avoid every held-out atom of
    ``world``; held-out scenes contain at least one (rejection sampling)."""
    _check_choice(category, CATEGORIES, "category")
    _check_choice(split, SPLITS, "split")
    heldout = world.heldout_atoms()
    if split == "heldout" and not heldout:
        raise ValueError("this World holds nothing out; a 'heldout' split would be empty")
    for _ in range(MAX_TRIES):
        groups, relation = _sample_groups(rng, category, world)
        colors = _sample_colors(rng, groups, world)
        scene_try = Scene(category, groups, _placeholder_objects(groups, colors),
                          _sample_background(rng), relation, split)
        hits = scene_atoms(scene_try) & heldout
        if (split == "train") == (not hits):
            objects = _place(rng, groups, colors, relation)
            if objects is not None:
                return Scene(category, groups, objects, scene_try.background, relation, split)
    raise ValueError(f"could not sample a {split} scene for {category!r} in this World; "
                     "its held-out atoms may rule the category out")


def make_scene(groups, relation: str | None = None, *, category: str, seed: int = 0,
               split: str = "train", world: World = DEFAULT_WORLD) -> Scene:
    """A scene for groups chosen by hand; colours the groups leave open come from ``world``.
    The held-out rules of ``world`` are not applied."""
    groups = tuple(groups)
    rng = np.random.default_rng(seed)
    colors = _sample_colors(rng, groups, world)
    for _ in range(5):
        objects = _place(rng, groups, colors, relation)
        if objects is not None:
            return Scene(category, groups, objects, _sample_background(rng), relation, split)
    raise ValueError(f"cannot lay out {len(colors)} shapes without overlap"
                     + (f" with the subject {relation} the reference" if relation else "")
                     + "; use fewer or smaller shapes")


def _sample_groups(rng, category: str, world: World):
    shapes = world.shapes

    def size_word():
        return str(rng.choice(SIZES)) if rng.random() < SIZE_WORD_PROB else None

    def two_shapes():
        a, b = rng.choice(len(shapes), 2, replace=False)
        return shapes[a], shapes[b]

    if category == "single_object":
        return (Group(str(rng.choice(shapes)), 1, None, size_word()),), None
    if category == "two_objects":
        a, b = two_shapes()
        return (Group(a, 1, None, size_word()), Group(b, 1, None, size_word())), None
    if category == "counting":
        count = int(rng.integers(2, MAX_COUNT + 1))
        return (Group(str(rng.choice(shapes)), count, None, size_word()),), None
    if category == "colors":
        return (Group(str(rng.choice(shapes)), 1, str(rng.choice(world.colors)), size_word()),), None
    if category == "position":
        a, b = two_shapes()
        count = 2 if rng.random() < POSITION_PAIR_PROB else 1
        ca = cb = None
        if rng.random() < POSITION_COLOR_PROB:
            ca, cb = (str(c) for c in rng.choice(world.colors, 2, replace=False))
        relation = str(rng.choice(RELATIONS))
        return (Group(a, count, ca, size_word()), Group(b, 1, cb, size_word())), relation
    # color_attr
    a, b = two_shapes()
    ca, cb = (str(c) for c in rng.choice(world.colors, 2, replace=False))
    return (Group(a, 1, ca, size_word()), Group(b, 1, cb, size_word())), None


def _sample_colors(rng, groups, world: World) -> list[tuple[int, str]]:
    """(group index, colour) per drawn shape."""
    return [(gi, g.color or str(rng.choice(world.colors)))
            for gi, g in enumerate(groups) for _ in range(g.count)]


def _placeholder_objects(groups, colors):
    return tuple(ShapeInstance(groups[gi].shape, color, "small", (0.5, 0.5), 0.1, gi)
                 for gi, color in colors)


def _sample_background(rng) -> Background:
    kind = str(rng.choice(("plain", "gradient", "noise")))
    color = _background_color(rng)
    if kind == "gradient":
        return Background(kind, color, _background_color(rng), float(rng.integers(0, 8) * 45))
    if kind == "noise":
        return Background(kind, color, noise_std=float(rng.uniform(0.01, 0.03)),
                          noise_seed=int(rng.integers(0, 2**31)))
    return Background(kind, color)


def _background_color(rng) -> tuple[int, int, int]:
    """Dark, desaturated: HSV with saturation <= 0.3 and value in [0.1, 0.4]."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.1, 0.4)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(round(c * 255)) for c in rgb)


def _place(rng, groups, colors, relation) -> tuple[ShapeInstance, ...] | None:
    """Non-overlapping boxes (at least MIN_GAP apart) for every shape; for a relation, every
    subject box clearly in that relation to every reference box. None when a try fails."""
    sizes = []
    for gi, _ in colors:
        word = groups[gi].size or str(rng.choice(SIZES))
        lo, hi = SIZE_RANGES[word]
        # Four large shapes barely fit; draw crowded scenes from the lower half of the range.
        if len(colors) >= 4:
            hi = (lo + hi) / 2
        sizes.append((word, float(rng.uniform(lo, hi))))
    for _ in range(50):
        boxes: list[tuple[float, float, float, float]] = []
        for (word, r) in sizes:
            for _ in range(100):
                cx, cy = rng.uniform(BORDER + r, 1 - BORDER - r, size=2)
                box = (cx - r, cy - r, cx + r, cy + r)
                if all(_apart(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) < len(sizes):
            continue
        if relation is not None:
            subject = [b for b, (gi, _) in zip(boxes, colors) if gi == 0]
            reference = [b for b, (gi, _) in zip(boxes, colors) if gi == 1]
            if not all(relation_strengths(a, b)[relation] > POSITION_MARGIN
                       for a in subject for b in reference):
                continue
        return tuple(
            ShapeInstance(groups[gi].shape, color, word,
                          ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), r, gi)
            for (gi, color), (word, r), box in zip(colors, sizes, boxes))
    return None


def _apart(a, b) -> bool:
    return (a[0] >= b[2] + MIN_GAP or b[0] >= a[2] + MIN_GAP
            or a[1] >= b[3] + MIN_GAP or b[1] >= a[3] + MIN_GAP)
