"""A GenEval-style scorer for ShapesWorld, by classical image analysis (numpy only).

Detection, per image:

1. Background: a quadratic surface per CIELAB channel of the 3 x 3-smoothed image, fitted by
   least squares to the border pixels, then refitted to the pixels it explains (trimmed), so
   plain, gradient and lightly noisy backgrounds are all modelled. An image whose background
   cannot be modelled (under MIN_BACKGROUND_FRACTION of it explained: noise, a mess) has no
   detections.
2. Objects: connected components (4-neighbour; numpy min-label propagation with pointer
   jumping, no scipy) of the pixels farther than FOREGROUND_DELTA_E from the background (or
   3.5 times the residual's median, on noisy images). Each is cut at half its own contrast on
   the unsmoothed sRGB image, where a pixel's distance from the background is proportional to
   how much of it the shape covers: an outline that does not move under blur, and that splits
   shapes the smoothing had joined. Parts under MIN_AREA_FRACTION of the image, or with a box
   side over MAX_BOX_FRACTION of it, are not objects.
3. Colour: the median CIELAB colour of an object's core (its upper half by contrast) goes to
   the nearest palette colour of the World; a core that is not uniform (MAX_CORE_SPREAD) or is
   far from every palette colour (MAX_COLOR_DELTA_E) is not an object.
4. Shape: the object's coverage map (distance / contrast) is compared with each World shape
   drawn anti-aliased with the same area and centroid; the best soft intersection-over-union
   names the shape and is the detection's confidence. Under MIN_SHAPE_IOU it is not an object.

Judgement follows GenEval's ``evaluate`` (evaluate_images.py): for each prompt group take the
``count`` most confident detections of its shape (and colour, when the prompt names one); fail if
fewer are found; for counting also fail if ``count + 1`` are present (GenEval's exclude rule)
or if a foreground part of an object's size could not be read as any shape (touching shapes
fuse into one blob, which would otherwise hide them from the count);
for position, every subject detection must stand in the named relation to every reference
detection by GenEval's ``relative_position`` (:func:`l2p.toy.world.relations`). GenEval takes
only the ``count`` most confident detections of each group for that; here every detection that
matches the group does, so a circle drawn on both sides of the square does not pass "a circle
to the left of a square" by which of the two the detector is surer of. Colour is where
this differs from GenEval too, whose detector cannot see colour and so checks the colour of the most
confident detections of the shape: there a red circle next to a blue circle passes "a red
circle" or fails it by which one the detector happens to be surer of. Here the detections are
matched by colour before the top ``count`` are taken, and a prompt that names a colour for a
shape fails when that shape is also found in another colour: an image showing the shape in
several colours has not bound the named colour to it (an image of every shape in every colour
would otherwise pass every colour and colour-attribution prompt).

The overall score is GenEval's: the mean over categories of the per-category accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from l2p.toy.render import CROSS_ARM, coverage
from l2p.toy.world import CATEGORIES, DEFAULT_WORLD, PALETTE, PLURALS, Scene, World, relations

FOREGROUND_DELTA_E = 22.0
MIN_AREA_FRACTION = 0.006       # 25 px at 64 x 64; the smallest drawn shape covers about 60
MAX_BOX_FRACTION = 0.6          # a detection's box side, as a fraction of the image side
MIN_SHAPE_IOU = 0.6
MAX_COLOR_DELTA_E = 45.0        # from the component's median colour to its palette colour
MAX_CORE_SPREAD = 18.0          # median distance of core pixels from the median colour
MIN_BACKGROUND_FRACTION = 0.4
# Raised with every change that alters a verdict, so that scores judged by two versions are
# never paired as if only the models differed. Scores without it were judged by version 1;
# 2: a shape also found in another colour fails a prompt naming its colour, an unreadable blob
# fails a count; 3: every matching detection, not the most confident, must satisfy a relation.
SCORER_VERSION = 3


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    box: tuple[float, float, float, float]   # normalised (x0, y0, x1, y1)
    confidence: float = 1.0
    area: float = 0.0                        # fraction of the image


@dataclass
class ImageScore:
    category: str
    prompt: str
    correct: bool
    reason: str
    detections: list[Detection] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# inputs and colour space


def to_rgb01(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a PIL image, a uint8 array (H, W, 3), or a float array or
    torch tensor in [-1, 1] laid out (3, H, W), (1, 3, H, W) or (H, W, 3)."""
    if hasattr(image, "convert") and hasattr(image, "size"):       # PIL
        return np.asarray(image.convert("RGB"), np.float64) / 255.0
    if hasattr(image, "detach"):                                   # torch
        image = image.detach().to("cpu").float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected one RGB image, got an array of shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got an array of shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected uint8 or a float image in [-1, 1], got dtype {arr.dtype}")
    return np.clip((arr.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


_SRGB_TO_XYZ = np.array([[0.4124564, 0.2126729, 0.0193339],
                         [0.3575761, 0.7151522, 0.1191920],
                         [0.1804375, 0.0721750, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) to CIELAB (D65)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.einsum("...i,ij->...j", linear, _SRGB_TO_XYZ) / _D65_WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


_PALETTE_LAB = {name: rgb_to_lab(np.asarray(rgb, np.float64) / 255.0)
                for name, rgb in PALETTE.items()}


# ---------------------------------------------------------------------------------------------
# detection


def detect_objects(image, world: World = DEFAULT_WORLD) -> list[Detection]:
    """Every shape of ``world`` found in ``image``, most confident first."""
    return _detect(image, world)[0]


def _detect(image, world: World) -> tuple[list[Detection], int]:
    """(:func:`detect_objects`, how many foreground parts of an object's size no shape or colour
    could be read from: shapes fused into one blob, smudges)."""
    rgb = to_rgb01(image)
    lab = rgb_to_lab(rgb)
    h, w, _ = lab.shape
    # Components are found on a smoothed image, robust to pixel noise; outlines are traced on
    # the sharp one, whose corners the smoothing would cut, and in sRGB, where a pixel's
    # distance from the background is proportional to how much of it the shape covers.
    fitted = _background_distance(box_filter3(lab))
    if fitted is None:
        return [], 0
    smooth_distance, threshold, inliers = fitted
    design = _surface_design(h, w)
    coef = _fit_surface(design[inliers], rgb.reshape(-1, 3)[inliers])
    distance = np.linalg.norm(rgb - _surface(design, coef).reshape(h, w, 3), axis=-1)
    labels = label_components(smooth_distance > threshold)
    min_area = MIN_AREA_FRACTION * h * w
    detections, unreadable = [], 0
    for index in range(1, labels.max() + 1):
        component = labels == index
        if component.sum() < min_area:
            continue
        for mask in _outlines(component, distance, min_area):
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            if max(y1 - y0, x1 - x0) > MAX_BOX_FRACTION * max(h, w):
                continue
            color = _classify_color(lab[mask], distance[mask], world)
            # Coverage of each pixel near the outline, for a sub-pixel comparison with shapes.
            region = _dilate(mask) & component
            coverage_map = np.where(region, np.clip(distance / _contrast(distance[mask]), 0, 1), 0)
            shape, iou = _classify_shape(coverage_map[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2],
                                         world)
            if color is None or shape is None:
                unreadable += 1
                continue
            detections.append(Detection(shape, color, (x0 / w, y0 / h, x1 / w, y1 / h),
                                        round(iou, 4), float(mask.sum()) / (h * w)))
    return sorted(detections, key=lambda d: -d.confidence), unreadable


def _outlines(component: np.ndarray, distance: np.ndarray, min_area: float):
    """Each object's mask within a component: the pixels at or above half its contrast (an
    outline that stays put under blur, whatever the contrast). Smoothing can join two shapes
    a pixel or two apart; the sharp half-contrast mask separates them again, and each part is
    then re-cut at its own contrast."""
    parts = label_components(component & (distance >= 0.5 * _contrast(distance[component])))
    for index in range(1, parts.max() + 1):
        part = parts == index
        if part.sum() < min_area:
            continue
        mask = _dilate(part) & component & (distance >= 0.5 * _contrast(distance[part]))
        if mask.sum() >= min_area:
            yield mask


def _contrast(values: np.ndarray) -> float:
    """An object's distance from the background: the median of its upper half of distances."""
    return float(np.median(values[values >= np.median(values)]))


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return (mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])


def box_filter3(image: np.ndarray) -> np.ndarray:
    """3 x 3 mean (edges replicated): cuts pixel noise threefold before thresholding."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _surface_design(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx + 0.5) / w - 0.5, (yy + 0.5) / h - 0.5
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1).reshape(-1, 6)


def _fit_surface(design: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least squares by the 6 x 6 normal equations (an SVD-based lstsq is far slower here)."""
    gram = np.einsum("nk,nl->kl", design, design) + 1e-9 * np.eye(design.shape[1])
    return np.linalg.solve(gram, np.einsum("nk,nc->kc", design, values))


def _surface(design: np.ndarray, coef: np.ndarray) -> np.ndarray:
    # einsum, not a BLAS matmul: these products are too thin to gain from threads, and on a
    # busy machine the thread start-up dominates.
    return np.einsum("nk,kc->nc", design, coef)


def _background_distance(lab: np.ndarray):
    """(distance of each pixel from the fitted background, foreground threshold, flat mask of
    the background pixels), or None when no smooth background explains enough of the image."""
    h, w, _ = lab.shape
    design = _surface_design(h, w)
    pixels = lab.reshape(-1, 3)
    frame = max(1, round(min(h, w) / 32))
    inliers = np.zeros((h, w), bool)
    inliers[:frame], inliers[-frame:], inliers[:, :frame], inliers[:, -frame:] = (True,) * 4
    inliers = inliers.reshape(-1)
    for _ in range(4):
        coef = _fit_surface(design[inliers], pixels[inliers])
        distance = np.linalg.norm(pixels - _surface(design, coef), axis=-1)
        # For Gaussian noise of sigma per channel the distance's median is about 1.5 sigma.
        threshold = max(FOREGROUND_DELTA_E, 3.5 * float(np.median(distance[inliers])))
        inliers = distance < threshold
        if inliers.mean() < MIN_BACKGROUND_FRACTION:
            return None
    return distance.reshape(h, w), threshold, inliers


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean mask: 0 for background, 1..K for components."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        smallest = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1],
                                      padded[1:-1, :-2], padded[1:-1, 2:]])
        smallest = np.where(mask, smallest, big)
        # Pointer jumping: a pixel may adopt the label its label's pixel has already reached.
        flat = smallest.reshape(-1)
        jumped = np.where(mask.reshape(-1), flat[np.minimum(flat, big - 1) - 1], big)
        jumped = np.minimum(flat, jumped).reshape(h, w)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    dense = np.zeros((h, w), np.int64)
    if mask.any():
        dense[mask] = np.unique(labels[mask], return_inverse=True)[1].reshape(-1) + 1
    return dense


def _classify_color(lab_pixels: np.ndarray, distance: np.ndarray, world: World) -> str | None:
    core = lab_pixels[distance >= np.quantile(distance, 0.5)]
    median = np.median(core, axis=0)
    if np.median(np.linalg.norm(core - median, axis=-1)) > MAX_CORE_SPREAD:
        return None
    name, gap = min(((c, float(np.linalg.norm(median - _PALETTE_LAB[c]))) for c in world.colors),
                    key=lambda item: item[1])
    return name if gap <= MAX_COLOR_DELTA_E else None


# Area of each shape as a fraction of its box, and where its centroid sits down the box.
_AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5,
                  "cross": 2 * CROSS_ARM - CROSS_ARM ** 2}
_CENTROID_DEPTH = {"triangle": 2 / 3}


def _classify_shape(alpha: np.ndarray, world: World) -> tuple[str | None, float]:
    """The world shape that best overlaps ``alpha`` (each pixel's coverage by the object), and
    that overlap (soft intersection over union). Each candidate is drawn anti-aliased with the
    object's area and centroid, to a quarter pixel, so small shapes are compared fairly."""
    height, width = alpha.shape
    area = alpha.sum()
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
    best, best_iou = None, 0.0
    for shape in world.shapes:
        side = float(np.sqrt(area / _AREA_FRACTION[shape]))
        top = cy - _CENTROID_DEPTH.get(shape, 0.5) * side
        template = coverage(shape, (cx - side / 2, top, cx + side / 2, top + side), width, height)
        iou = float(np.minimum(alpha, template).sum() / np.maximum(alpha, template).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_SHAPE_IOU else None), best_iou


# ---------------------------------------------------------------------------------------------
# judgement


def evaluate(detections: list[Detection], scene: Scene, unreadable: int = 0) -> tuple[bool, str]:
    """GenEval's rules for ``scene``'s prompt against ``detections`` (most confident first).
    ``unreadable``: foreground parts no shape was read from; a counting prompt fails on any,
    since two shapes fused into one blob would hide an extra one from the count."""
    reasons = []
    found_groups: list[list[Detection] | None] = []
    matching_groups: list[list[Detection]] = []
    for group in scene.groups:
        candidates = [d for d in detections if d.shape == group.shape
                      and (group.color is None or d.color == group.color)]
        matching_groups.append(candidates)
        found = candidates[:group.count]
        what = " ".join(w for w in (group.color, group.shape) if w)
        if len(found) < group.count:
            reasons.append(f"expected {what} >= {group.count}, found {len(found)}")
        other_colors = sorted({d.color for d in detections if d.shape == group.shape
                               and group.color is not None and d.color != group.color})
        if other_colors:
            reasons.append(f"expected every {group.shape} {group.color}, found {' and '.join(other_colors)} "
                           f"{PLURALS[group.shape]} too")
        found_groups.append(found if len(found) == group.count and not other_colors else None)
    if scene.category == "counting":
        group = scene.groups[0]
        present = [d for d in detections if d.shape == group.shape]
        if len(present) > group.count:
            reasons.append(f"expected {group.shape} < {group.count + 1}, found {len(present)}")
        if unreadable:
            reasons.append(f"{unreadable} foreground part(s) no shape could be read from, which may "
                           f"hide more {PLURALS[group.shape]}")
    if scene.relation is not None and None not in found_groups:
        subject, reference = matching_groups
        misplaced = next(((a, b) for a in subject for b in reference
                          if scene.relation not in relations(a.box, b.box)), None)
        if misplaced is not None:
            seen = sorted(relations(misplaced[0].box, misplaced[1].box)) or "no clear relation"
            reasons.append(f"expected {scene.groups[0].shape} {scene.relation} "
                           f"{scene.groups[1].shape}, found {seen}")
    return not reasons, "; ".join(reasons)


def ground_truth_detections(scene: Scene) -> list[Detection]:
    """The scene's own objects as detections: what a perfect detector would report."""
    return [Detection(o.shape, o.color, o.box(), 1.0, (2 * o.half_extent) ** 2)
            for o in scene.objects]


def score_image(image, scene: Scene, world: World = DEFAULT_WORLD) -> ImageScore:
    """Judge one image (see :func:`to_rgb01` for the layouts accepted) against its scene."""
    detections, unreadable = _detect(image, world)
    correct, reason = evaluate(detections, scene, unreadable)
    return ImageScore(scene.category, scene.prompt, correct, reason, detections)


def score_images(images, scenes, world: World = DEFAULT_WORLD) -> tuple[list[ImageScore], dict]:
    """Per-image results and :func:`summarize` of them."""
    images, scenes = list(images), list(scenes)
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; pass one per scene")
    results = [score_image(image, scene, world) for image, scene in zip(images, scenes)]
    return results, summarize(results)


def summarize(results) -> dict:
    """{"overall", "per_category", "counts", "n"}: overall is the mean over the categories present
    of the per-category accuracy, as GenEval reports it."""
    per_category, counts = {}, {}
    for category in CATEGORIES:
        hits = [r.correct for r in results if r.category == category]
        if hits:
            per_category[category] = float(np.mean(hits))
            counts[category] = len(hits)
    if not per_category:
        raise ValueError("no results to summarise")
    return {"overall": float(np.mean(list(per_category.values()))),
            "per_category": per_category, "counts": counts, "n": len(results)}
