"""Draw a ShapesWorld scene: a background, then each shape as an anti-aliased coverage mask
(drawn at SUPERSAMPLE times the resolution and box-filtered down) blended over it.

Rendering is a pure function of (scene, size): the same scene gives the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from l2p.toy.world import PALETTE, Background, Scene

SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 16, 1024
# Thickness of a cross's arms as a fraction of its width.
CROSS_ARM = 0.36


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB PIL image of ``size`` x ``size`` pixels."""
    return Image.fromarray(render_array(scene, size))


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array."""
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"image size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
    canvas = background_array(scene.background, size)
    for obj in scene.objects:
        alpha = shape_coverage(obj.shape, obj.box(), size)[..., None]
        color = np.asarray(PALETTE[obj.color], np.float64) / 255.0
        canvas = canvas * (1.0 - alpha) + color * alpha
    return np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)


def background_array(bg: Background, size: int) -> np.ndarray:
    """(size, size, 3) float64 in [0, 1]."""
    base = np.asarray(bg.color, np.float64) / 255.0
    if bg.kind == "gradient":
        theta = math.radians(bg.angle)
        coords = (np.arange(size) + 0.5) / size - 0.5
        # Position along the gradient direction, rescaled to [0, 1] across the image.
        t = coords[None, :] * math.cos(theta) + coords[:, None] * math.sin(theta)
        span = 0.5 * (abs(math.cos(theta)) + abs(math.sin(theta)))
        t = (t / span + 1.0) / 2.0
        end = np.asarray(bg.color2, np.float64) / 255.0
        canvas = base * (1.0 - t[..., None]) + end * t[..., None]
    else:
        canvas = np.broadcast_to(base, (size, size, 3)).copy()
    if bg.noise_std > 0:
        rng = np.random.default_rng(bg.noise_seed)
        canvas = canvas + rng.normal(0.0, bg.noise_std, canvas.shape)
    return np.clip(canvas, 0.0, 1.0)


def shape_polygon(shape: str, box) -> list[tuple[float, float]] | None:
    """The outline of ``shape`` inside ``box`` = (x0, y0, x1, y1); None for the circle."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        aw, ah = CROSS_ARM * (x1 - x0) / 2, CROSS_ARM * (y1 - y0) / 2
        return [(cx - aw, y0), (cx + aw, y0), (cx + aw, cy - ah), (x1, cy - ah), (x1, cy + ah),
                (cx + aw, cy + ah), (cx + aw, y1), (cx - aw, y1), (cx - aw, cy + ah),
                (x0, cy + ah), (x0, cy - ah), (cx - aw, cy - ah)]
    raise ValueError(f"unknown shape {shape!r}")


def shape_coverage(shape: str, box, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape: (size, size) float64 in [0, 1].
    ``box`` is in normalised coordinates."""
    return coverage(shape, [v * size for v in box], size, size)


def coverage(shape: str, pixel_box, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel of a width x height canvas covered by ``shape`` drawn in
    ``pixel_box`` = (x0, y0, x1, y1) in pixels: (height, width) float64 in [0, 1]."""
    scaled = [v * SUPERSAMPLE for v in pixel_box]
    mask = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    polygon = shape_polygon(shape, scaled)
    if polygon is None:
        # PIL's ellipse includes its far edge pixel; pull it in by one so it matches the box.
        x0, y0, x1, y1 = scaled
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:
        # PIL fills pixels whose centres fall inside; shift by half a pixel to match.
        draw.polygon([(x - 0.5, y - 0.5) for x, y in polygon], fill=255)
    small = mask.resize((width, height), Image.BOX)
    return np.asarray(small, np.float64) / 255.0
