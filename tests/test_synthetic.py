"""The scene generator: determinism, depth order, shape kinds, held-out DAVIS sets."""

import os
import stat

import numpy as np
import pytest

from ois_deploy.cli import main
from ois_deploy.evaluate.datasets import load_dataset
from ois_deploy.train.scenes import SHAPES, _shape_mask, make_scene


def test_same_seed_same_scene_and_streams_differ():
    a, b = make_scene([1, 0, 5], 120, 160, 5), make_scene([1, 0, 5], 120, 160, 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.depth, b.depth)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    c = make_scene([2, 0, 5], 120, 160, 5)  # the held-out stream with the same numbers
    assert not np.array_equal(a.image, c.image)


def test_masks_are_visible_parts_and_depth_follows_the_painting_order():
    for seed in range(20):
        scene = make_scene(seed, 160, 200, 5)
        stack = np.stack(scene.masks)
        assert stack.sum(0).max() <= 1  # each pixel belongs to at most one object
        background = ~stack.any(0)
        assert scene.depth[background].max() <= 0.3 + 1e-6  # the floor ramp is behind every object
        for mask in scene.masks:
            if mask.any():
                assert scene.depth[mask].min() > scene.depth[background].max()
        # objects painted later occlude earlier ones and sit (nearly) in front of them
        levels = [np.median(scene.depth[m]) for m in scene.masks if m.sum() > 50]
        assert all(later > earlier - 0.08 for earlier, later in zip(levels, levels[1:]))


def test_both_cues_are_needed_some_objects_share_depth_others_share_looks():
    scenes = [make_scene(seed, 100, 100, 5) for seed in range(60)]
    close_depth = [b - a < 0.02 for s in scenes for a, b in zip(s.levels, s.levels[1:])]
    shared_look = [s.looks.count(look) > 1 for s in scenes for look in s.looks]
    assert 0.15 < np.mean(close_depth) < 0.6 and 0.15 < np.mean(shared_look) < 0.7
    assert all(s.levels == sorted(s.levels) for s in scenes)
    kinds = {k for s in scenes for k in s.shapes}
    assert kinds == set(SHAPES)


@pytest.mark.parametrize("kind", SHAPES)
def test_every_shape_kind_draws_something(kind):
    rng = np.random.default_rng(3)
    masks = [_shape_mask(rng, kind, 200, 200) for _ in range(5)]
    assert all(m.any() for m in masks)
    if kind in ("ring", "frame", "perforated"):  # holes: pixels enclosed by the shape but not in it
        import cv2

        def has_hole(mask):
            _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            return hierarchy is not None and (hierarchy[0][:, 3] >= 0).any()  # a contour with a parent

        assert sum(map(has_hole, masks)) >= 3  # a shape cut by the image border may lose its hole


def test_scenes_command_writes_a_davis_set(tmp_path, capsys):
    out = tmp_path / "heldout"
    old_umask = os.umask(0o022)
    try:
        with pytest.raises(SystemExit) as e:
            main(["scenes", "--out", str(out), "--count", "4", "--seed", "1"])
    finally:
        os.umask(old_umask)
    assert e.value.code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not the staging folder's private 0700
    layout, samples = load_dataset(out)
    assert layout == "davis" and len(samples) >= 4
    image, mask = samples[0].load()
    assert image.shape[:2] == mask.shape and mask.mean() >= 0.01
    with pytest.raises(SystemExit) as e:  # never overwrites
        main(["scenes", "--out", str(out), "--count", "1"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout"]  # no staging folder left behind
