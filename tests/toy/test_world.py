"""ShapesWorld's grammar and renderer: exact, balanced, held-out-clean, non-overlapping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from l2p.toy import (
    CATEGORIES, DEFAULT_WORLD, Group, Scene, World, generate_scenes, make_scene, render,
    render_array, sample_scene, scene_for,
)
from l2p.toy.render import shape_coverage
from l2p.toy.world import (
    BACKGROUND_KINDS, MAX_COUNT, RELATIONS, names_heldout, prompt_atoms, relation_strengths, relations, scene_atoms,
)


@pytest.fixture(scope="module")
def train_scenes():
    return generate_scenes(900, seed=3, split="train")


@pytest.fixture(scope="module")
def heldout_scenes():
    return generate_scenes(600, seed=4, split="heldout")


def test_same_seed_same_prompts_and_pixels():
    a, b = generate_scenes(24, seed=9), generate_scenes(24, seed=9)
    assert a == b
    assert [s.prompt for s in a] == [s.prompt for s in b]
    for s, t in zip(a, b):
        assert np.array_equal(render_array(s), render_array(t))
    assert [s.prompt for s in generate_scenes(24, seed=10)] != [s.prompt for s in a]


def test_a_record_does_not_depend_on_how_many_are_drawn():
    assert generate_scenes(6, seed=1) == generate_scenes(30, seed=1)[:6]
    assert scene_for(1, 7, "position") == scene_for(1, 7, "position")


def test_rendering_is_uint8_rgb_at_any_size():
    scene = generate_scenes(5, seed=0)[4]
    for size in (32, 64, 128, 256):
        img = render(scene, size)
        assert img.mode == "RGB" and img.size == (size, size)
    assert render_array(scene).dtype == np.uint8


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_categories_are_balanced_and_well_formed(split, train_scenes, heldout_scenes):
    scenes = train_scenes if split == "train" else heldout_scenes
    per_category = {c: [s for s in scenes if s.category == c] for c in CATEGORIES}
    assert {len(v) for v in per_category.values()} == {len(scenes) // len(CATEGORIES)}
    for s in per_category["single_object"]:
        assert len(s.groups) == 1 and s.groups[0].count == 1 and s.groups[0].color is None
    for s in per_category["two_objects"]:
        assert len(s.groups) == 2 and s.groups[0].shape != s.groups[1].shape
        assert " and " in s.prompt
    for s in per_category["counting"]:
        assert len(s.groups) == 1 and 2 <= s.groups[0].count <= MAX_COUNT
    for s in per_category["colors"]:
        assert len(s.groups) == 1 and s.groups[0].color in DEFAULT_WORLD.colors
        assert s.objects[0].color == s.groups[0].color
    for s in per_category["position"]:
        assert s.relation in RELATIONS and s.groups[0].shape != s.groups[1].shape
    for s in per_category["color_attr"]:
        g = s.groups
        assert g[0].shape != g[1].shape and g[0].color != g[1].color and None not in (g[0].color, g[1].color)
    # The scene draws exactly what the prompt asks for.
    for s in scenes:
        assert len(s.objects) == sum(g.count for g in s.groups)
        for o in s.objects:
            group = s.groups[o.group]
            assert o.shape == group.shape and group.color in (None, o.color)
            assert group.size in (None, o.size)


def test_the_vocabulary_is_covered(train_scenes, heldout_scenes):
    scenes = train_scenes + heldout_scenes
    assert {o.shape for s in scenes for o in s.objects} == set(DEFAULT_WORLD.shapes)
    assert {o.color for s in scenes for o in s.objects} == set(DEFAULT_WORLD.colors)
    assert {g.count for s in scenes for g in s.groups} == set(range(1, MAX_COUNT + 1))
    assert {s.relation for s in scenes} - {None} == set(RELATIONS)
    assert {s.background.kind for s in scenes} == set(BACKGROUND_KINDS)
    assert {o.size for s in scenes for o in s.objects} == {"small", "large"}
    prompts = {s.prompt for s in scenes}
    assert "a circle" in prompts and any(p.startswith("an orange") for p in prompts)
    assert any(p.startswith("two ") and " to the left of " in p for p in prompts)


def test_heldout_combinations_never_reach_training(train_scenes, heldout_scenes):
    heldout = DEFAULT_WORLD.heldout_atoms()
    assert all(not (scene_atoms(s) & heldout) for s in train_scenes)
    assert all(scene_atoms(s) & heldout for s in heldout_scenes)
    # Held-out prompts that name a held-out combination are new text, never a training prompt.
    train_prompts = {s.prompt for s in train_scenes}
    named = [s for s in heldout_scenes if names_heldout(s)]
    assert len(named) > len(heldout_scenes) // 2
    assert not {s.prompt for s in named} & train_prompts
    # The others' prompts are ones training gives too (single objects always: "a circle").
    rest = [s for s in heldout_scenes if not names_heldout(s)]
    assert {s.category for s in rest} >= {"single_object"} and not any(names_heldout(s) for s in rest)
    assert {s.prompt for s in rest} & train_prompts
    for s in heldout_scenes:
        words_only = Scene(s.category, s.groups, (), s.background, s.relation)
        assert prompt_atoms(s) == scene_atoms(words_only)


def test_every_category_has_heldout_prompts(heldout_scenes):
    assert {s.category for s in heldout_scenes} == set(CATEGORIES)
    assert all(s.split == "heldout" for s in heldout_scenes)


def test_shapes_never_overlap(train_scenes):
    for s in train_scenes[:300]:
        boxes = [o.box() for o in s.objects]
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], s.prompt
        assert all(0 < v < 1 for box in boxes for v in box)
        covers = [shape_coverage(o.shape, o.box(), 64) for o in s.objects]
        for a, b in itertools.combinations(covers, 2):
            assert not (a * b).any(), s.prompt


def test_position_scenes_satisfy_their_relation_clearly(train_scenes, heldout_scenes):
    for s in train_scenes + heldout_scenes:
        if s.relation is None:
            continue
        subject = [o.box() for o in s.objects if o.group == 0]
        reference = [o.box() for o in s.objects if o.group == 1]
        for a in subject:
            for b in reference:
                assert s.relation in relations(a, b)
                assert relation_strengths(a, b)[s.relation] > 0.65


def test_prompt_text():
    assert Group("circle").phrase() == "a circle"
    assert Group("circle", 2, "red").phrase() == "two red circles"
    assert Group("cross", 3, None, "small").phrase() == "three small crosses"
    assert Group("square", 1, "orange").phrase() == "an orange square"
    scene = make_scene([Group("circle", 2, "red"), Group("square", 1, "blue")], "left of",
                       category="position", seed=1)
    assert scene.prompt == "two red circles to the left of a blue square"
    assert Scene.from_dict(scene.to_dict()) == scene


@pytest.mark.parametrize("call, message", [
    (lambda: generate_scenes(6, 0, categories=["counting", "shapes"]), "unknown category"),
    (lambda: sample_scene(np.random.default_rng(0), "colour"), "unknown category"),
    (lambda: generate_scenes(6, 0, split="test"), "unknown split"),
    (lambda: generate_scenes(0, 0), "positive integer"),
    (lambda: Group("circle", 0), "count must be an integer from 1 to 4"),
    (lambda: Group("circle", 5), "count must be an integer from 1 to 4"),
    (lambda: Group("circle", 2.0), "count must be an integer"),
    (lambda: Group("hexagon"), "unknown shape"),
    (lambda: Group("circle", 1, "magenta"), "unknown colour"),
    (lambda: World(colors=("red", "teal")), "unknown colour"),
    (lambda: World(heldout_count_shape=((7, "circle"),)), "count must be"),
    (lambda: render(generate_scenes(1, 0)[0], 8), "image size"),
    (lambda: make_scene([Group("square", 4, None, "large"), Group("circle", 4, None, "large")],
                        category="counting"), "cannot lay out"),
    (lambda: Scene("position", (Group("circle"), Group("square")), (), None), "relation"),
])
def test_bad_requests_raise_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_world_that_holds_out_a_whole_category_says_so():
    world = World(shapes=("circle", "square"), heldout_shape_pairs=(("circle", "square"),),
                  heldout_color_shape=(), heldout_count_shape=())
    with pytest.raises(ValueError, match="could not sample a train scene for 'two_objects'"):
        sample_scene(np.random.default_rng(0), "two_objects", "train", world)
    nothing_held = World(heldout_color_shape=(), heldout_count_shape=(), heldout_shape_pairs=())
    with pytest.raises(ValueError, match="holds nothing out"):
        sample_scene(np.random.default_rng(0), "colors", "heldout", nothing_held)
