"""Training on generated scenes: losses, click sampling, batches, and the train command."""

import json

import numpy as np
import pytest
import torch

from ois_deploy.cli import main
from ois_deploy.train.loop import (
    TrainSettings,
    _sample_pixel,
    start_training,
    train,
    train_step,
    initial_clicks,
    make_batch,
    mask_loss,
    pack_clicks,
    ssi_depth_loss,
)
from ois_deploy.model.weights import load_model, read_checkpoint


def test_mask_loss_prefers_the_right_mask_and_ignores_padding():
    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:20, 8:20] = 1
    valid = torch.ones_like(target)
    right, wrong = (target * 2 - 1) * 6, (1 - target * 2) * 6
    assert mask_loss(right, target, valid) < 0.1 < mask_loss(wrong, target, valid)
    valid[..., 24:, :] = 0  # errors in the padding (bottom rows) do not count
    noisy = right.clone()
    noisy[..., 24:, :] = 6
    assert mask_loss(noisy, target, valid) == pytest.approx(float(mask_loss(right, target, valid)), abs=1e-4)


def test_depth_loss_is_scale_and_shift_invariant():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 16, 16, generator=g)
    valid = torch.ones_like(target)
    assert ssi_depth_loss(3.0 * target + 0.7, target, valid) < 1e-5
    assert ssi_depth_loss(torch.rand(2, 1, 16, 16, generator=g), target, valid) > 0.1


def test_initial_clicks_fall_inside_and_near_the_object(rng):
    mask = np.zeros((100, 100), bool)
    mask[30:60, 40:80] = True
    valid = np.ones((100, 100), np.float32)
    for _ in range(50):
        clicks = initial_clicks(rng, mask, valid)
        assert 1 <= sum(c[2] for c in clicks) <= 3 and len(clicks) <= 5
        for x, y, label in clicks:
            assert mask[y, x] == bool(label)
            if not label:  # negatives in a band around the object
                assert 30 - 11 <= y < 60 + 11 and 40 - 11 <= x < 80 + 11
    coords, labels = pack_clicks([[(1, 2, 1)], [(3, 4, 1), (5, 6, 0)]])
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1, -1], [1, 0]]


def test_pixels_are_drawn_in_proportion_to_their_weights(rng):
    weights = np.zeros((4, 5))
    weights[1, 2], weights[3, 0] = 1.0, 3.0
    draws = [_sample_pixel(rng, weights) for _ in range(2000)]
    assert set(draws) == {(2, 1), (0, 3)}  # (x, y); zero weights are never drawn
    assert 0.22 < draws.count((2, 1)) / len(draws) < 0.28
    assert _sample_pixel(rng, np.zeros((4, 5))) is None


def test_preparing_the_next_step_ahead_changes_no_weight(tmp_path):
    """`train` prepares step n+1's scenes and clicks on a worker thread while step n trains; the
    weights equal those of the plain loop, step after step on one thread."""
    settings = TrainSettings(steps=2, seed=2, batch_size=1, objects_per_scene=2, max_extra_clicks=1)
    train("ois-tiny", settings, tmp_path / "w.safetensors", tmp_path / "log.jsonl")
    model, optimizer = start_training("ois-tiny", settings)
    for step in range(settings.steps):
        train_step(model, optimizer, settings, step)
    trained = read_checkpoint(tmp_path / "w.safetensors").state_dict
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())


def test_batches_are_seeded_and_padded_like_inference():
    settings = TrainSettings(steps=1, seed=3, batch_size=2, objects_per_scene=3)
    a, b = make_batch(settings, 7, 224), make_batch(settings, 7, 224)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, make_batch(settings, 8, 224).images)
    assert a.images.shape == (2, 3, 224, 224) and a.depth.shape == a.valid.shape == (2, 1, 224, 224)
    assert a.masks.shape == (6, 1, 224, 224)  # 3 objects per scene, scene-major
    for i in range(6):  # the target lies in its scene's image, the padding is black and invalid
        scene = i // 3
        assert a.masks[i].sum() > 0 and (a.masks[i] <= a.valid[scene]).all()
        assert (a.images[scene][:, a.valid[scene, 0] == 0] == 0).all()
    for scene in range(2):  # different objects of one scene (each has more than 3 to pick from)
        first = a.masks[3 * scene : 3 * scene + 3]
        assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_batched_decode_equals_one_image_at_a_time(tiny):
    """Training decodes B images at once (state batch P); deployment shares one image."""
    g, s = torch.Generator().manual_seed(0), tiny.cfg.input_size
    images = torch.rand(2, 3, s, s, generator=g) * 255
    coords = torch.tensor([[[40.0, 50.0], [100.0, 120.0]], [[200.0, 10.0], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    prev = torch.rand(2, 1, s, s, generator=g)
    with torch.no_grad():
        batched = tiny.decode(tiny.encode(images), coords, labels, prev)
        for i in range(2):
            one = tiny.decode(tiny.encode(images[i : i + 1]), coords[i : i + 1], labels[i : i + 1], prev[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], one, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_train_command_is_reproducible_and_writes_a_loadable_checkpoint(tmp_path):
    paths = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.safetensors"
        with pytest.raises(SystemExit) as e:
            main(["train", "--out", str(out), "--steps", "3", "--batch-size", "2", "--seed", "5", "--max-extra-clicks", "1"])
        assert e.value.code == 0
        paths.append(out)
    log = [json.loads(line) for line in open(str(paths[0]) + ".log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    a, b = read_checkpoint(paths[0]).state_dict, read_checkpoint(paths[1]).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    untrained, _ = load_model("ois-tiny", "random")
    assert any(not torch.equal(a[k], v) for k, v in untrained.state_dict().items())
    model, report = load_model(None, paths[0])
    assert report.format == "ois-safetensors" and model.cfg.name == "ois-tiny"
    from safetensors import safe_open

    with safe_open(str(paths[0]), framework="pt") as f:
        training = json.loads(f.metadata()["training"])
    assert training["settings"]["seed"] == 5 and training["settings"]["steps"] == 3
    assert training["settings"]["max_extra_clicks"] == 1


def test_train_command_refuses_bad_arguments(tmp_path, capsys):
    for args, message in (
        (["--out", str(tmp_path / "nope" / "x.safetensors"), "--steps", "1"], "does not exist"),
        (["--out", str(tmp_path / "x.safetensors"), "--steps", "1", "--order-attention", "sideways"], "order-attention"),
        (["--out", str(tmp_path / "x.safetensors"), "--steps", "1", "--preset", "ois-huge"], "unknown preset"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["train", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
