"""The trained ois-tiny weights shipped in the package: found by default, and they segment."""

import json

import numpy as np
import pytest
import torch

from ois_deploy import Predictor
from ois_deploy.cli import main
from ois_deploy.evaluate.metrics import run_object
from ois_deploy.model import get_preset
from ois_deploy.train.scenes import write_davis
from ois_deploy.model.weights import BUNDLED_CHECKPOINTS, load_model, read_checkpoint

BUNDLED = BUNDLED_CHECKPOINTS["ois-tiny"]


def test_bundled_checkpoint_is_small_and_documents_its_training():
    assert BUNDLED.is_file() and BUNDLED.stat().st_size < 10 * 2**20
    from safetensors import safe_open

    with safe_open(str(BUNDLED), framework="pt") as f:
        training = json.loads(f.metadata()["training"])
    assert training["preset"] == "ois-tiny" and training["settings"]["steps"] > 0
    # trained from today's preset, so the documented command retrains exactly this model
    assert read_checkpoint(BUNDLED).config == get_preset("ois-tiny")


def test_info_reports_the_bundled_weights_and_random_is_still_available(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--preset", "ois-tiny", "--json", "-"])
    out, err = capsys.readouterr()
    weights = json.loads(out)["weights"]
    assert e.value.code == 0 and weights["bundled"] is True and weights["format"] == "ois-safetensors"
    assert weights["path"] == str(BUNDLED) and "bundled default" in err
    with pytest.raises(SystemExit):
        main(["info", "--preset", "ois-tiny", "--checkpoint", "random", "--json", "-"])
    out, err = capsys.readouterr()
    assert json.loads(out)["weights"]["format"] == "random" and "random init" in err


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Generated scenes from the held-out stream, never seen in training."""
    folder = tmp_path_factory.mktemp("heldout")
    write_davis(folder, count=4, seed=1234)
    from ois_deploy.evaluate.datasets import load_dataset

    return load_dataset(folder)[1]


def test_trained_weights_segment_unseen_scenes(heldout):
    """Floors with a margin under what the bundled weights reach on these 16 objects (0.74 after
    1 click, 0.897 after 5); random weights reach 0.075 at both, so a broken checkpoint, loader
    or decoder fails."""
    predictor = Predictor.open("ois-tiny")
    results = [run_object(predictor, *sample.load(), sample.name, max_clicks=5) for sample in heldout]
    assert len(results) == 16
    assert np.mean([r.ious[0] for r in results]) > 0.55
    assert np.mean([r.ious[4] for r in results]) > 0.75


def test_order_attention_can_be_switched_off_for_the_ablation(heldout):
    image, gt = heldout[0].load()
    with_order, without = Predictor.open("ois-tiny"), Predictor.open("ois-tiny", order_attention="off")
    assert without.cfg.decoder.order_attention == "off"
    for p in (with_order, without):
        p.set_image(image)
    ys, xs = np.nonzero(gt)
    a = with_order.click(int(xs[len(xs) // 2]), int(ys[len(ys) // 2])).logits
    b = without.click(int(xs[len(xs) // 2]), int(ys[len(ys) // 2])).logits
    assert np.abs(a - b).max() > 1e-3  # the trained order bias matters
    model, _ = load_model("ois-tiny")
    assert model.cfg.decoder.order_attention == "bias"  # the override did not leak into new models
    assert torch.nn.functional.softplus(model.decoder.order_sigma).item() > 0
