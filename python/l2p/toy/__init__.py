"""ShapesWorld: a procedural text-to-image world with a GenEval-style scorer, small enough to
measure every claim of L2P on a CPU.

* :mod:`l2p.toy.world`   vocabulary, :class:`World` (what exists, what is held out), scenes
* :mod:`l2p.toy.grammar` seeded prompt grammar: scenes per GenEval category and split
* :mod:`l2p.toy.render`  anti-aliased numpy/PIL rendering at any size
* :mod:`l2p.toy.scorer`  classical detection and GenEval's judgement rules
* :mod:`l2p.toy.prompts` prompt files (JSON Lines) for ``l2p eval --prompts``
"""

from l2p.toy.grammar import generate_scenes, make_scene, sample_scene, scene_for
from l2p.toy.prompts import PromptRecord, make_records, read_prompts, write_prompts
from l2p.toy.render import render, render_array
from l2p.toy.scorer import (
    Detection, ImageScore, detect_objects, evaluate, score_image, score_images, summarize,
)
from l2p.toy.world import (
    CATEGORIES, DEFAULT_WORLD, SPLITS, Background, Group, Scene, ShapeInstance, World,
)

__all__ = [
    "CATEGORIES", "DEFAULT_WORLD", "SPLITS", "Background", "Detection", "Group", "ImageScore",
    "PromptRecord", "Scene", "ShapeInstance", "World", "detect_objects", "evaluate",
    "generate_scenes", "make_records", "make_scene", "read_prompts", "render", "render_array",
    "sample_scene", "scene_for", "score_image", "score_images", "summarize", "write_prompts",
]
