"""Prompt files: ShapesWorld scenes as JSON Lines, the input of ``l2p eval --prompts FILE``.

One JSON object per line::

    {"format": "shapesworld-v1",          # this layout; readers refuse any other
     "index": 0,                          # position in the stream (0, 1, 2, ...)
     "seed": 1234,                        # the stream's seed: scene_for(seed, index, ...) rebuilds it
     "prompt": "two red circles to the left of a blue square",
     "category": "position",              # one of l2p.toy.world.CATEGORIES
     "split": "heldout",                  # "train" or "heldout"
     "scene": {...}}                      # Scene.to_dict(): groups, relation, objects, background

``scene`` is the whole truth: the scorer judges an image against ``scene`` (its groups and
relation), and ``render(Scene.from_dict(record["scene"]), size)`` redraws the ground-truth image
at any size. ``prompt`` repeats the text the scene derives, for readers that only want text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from l2p.atomic import atomic_path
from l2p.toy.grammar import generate_scenes
from l2p.toy.world import CATEGORIES, DEFAULT_WORLD, Scene, World

FORMAT = "shapesworld-v1"


@dataclass(frozen=True)
class PromptRecord:
    index: int
    seed: int
    scene: Scene

    @property
    def prompt(self) -> str:
        return self.scene.prompt

    @property
    def category(self) -> str:
        return self.scene.category

    @property
    def split(self) -> str:
        return self.scene.split

    def to_dict(self) -> dict:
        return {"format": FORMAT, "index": self.index, "seed": self.seed, "prompt": self.prompt,
                "category": self.category, "split": self.split, "scene": self.scene.to_dict()}


def make_records(n: int, seed: int, split: str = "heldout", categories=CATEGORIES,
                 world: World = DEFAULT_WORLD) -> list[PromptRecord]:
    """``n`` records cycling through ``categories`` (so every category gets n / 6 of them)."""
    scenes = generate_scenes(n, seed, split, categories, world)
    return [PromptRecord(i, int(seed), scene) for i, scene in enumerate(scenes)]


def write_prompts(path, n: int, seed: int, split: str = "heldout", categories=CATEGORIES,
                  world: World = DEFAULT_WORLD) -> list[PromptRecord]:
    """Write :func:`make_records` to ``path`` (JSON Lines) and return them."""
    records = make_records(n, seed, split, categories, world)
    save_records(path, records)
    return records


def save_records(path, records) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")


def read_prompts(path) -> list[PromptRecord]:
    """The records of a prompts file, checked: a line that is not a ShapesWorld record, or whose
    prompt text disagrees with its scene, raises ValueError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}; write one with "
                                "l2p.toy.prompts.write_prompts")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"{where}: not a {FORMAT} record (its 'format' field must be "
                                 f"{FORMAT!r})")
            try:
                scene = Scene.from_dict(d["scene"])
                record = PromptRecord(int(d["index"]), int(d["seed"]), scene)
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{where}: malformed record ({exc!r})") from None
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            if d.get("prompt") not in (None, record.prompt):
                raise ValueError(f"{where}: prompt {d['prompt']!r} does not match its scene, "
                                 f"which reads {record.prompt!r}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records
