"""Checkpoint formats, strict Depth Anything V2 loading, and clean errors for bad files."""

import os
import pickle
import stat

import pytest
import torch
import torch.nn.functional as F

from ois_deploy.errors import UserError
from ois_deploy.io import atomic_write_bytes
from ois_deploy.model.weights import CheckpointMismatch, load_model, read_checkpoint, save_checkpoint

from conftest import dav2_key_shapes, synthetic_dav2_state_dict


@pytest.mark.parametrize(
    "variant,preset,keys", [("vits", "ois-s-1024", 239), ("vitb", "ois-b-1024", 239), ("vitl", "ois-l-1024", 407)]
)
def test_official_dav2_layout_loads_strictly(tmp_path, variant, preset, keys):
    state = synthetic_dav2_state_dict(variant)
    assert len(state) == keys == len(dav2_key_shapes(variant))
    path = tmp_path / f"depth_anything_v2_{variant}.pth"
    torch.save(state, path)
    model, report = load_model(None, path)  # the preset is inferred from the file

    assert model.cfg.name == preset
    assert report.format == f"dav2-{variant}"
    assert (report.loaded_keys, report.missing, report.unexpected, report.wrong_shape) == (keys, [], [], [])
    assert ("CC-BY-NC" in report.licence) == (variant != "vits")
    loaded = model.state_dict()
    for key in ("pretrained.blocks.3.attn.qkv.weight", "depth_head.scratch.refinenet4.resConfUnit1.conv1.weight"):
        assert torch.equal(loaded[key], state[key])
    # the mask head starts from the depth head, except its level-4 input projection
    assert torch.equal(loaded["decoder.mask_head.scratch.layer2_rn.weight"], state["depth_head.scratch.layer2_rn.weight"])
    # pos_embed stays at 37x37; its float32 resize to the preset's grid is cached once
    grid = model.cfg.grid
    pos = state["pretrained.pos_embed"]
    dim = pos.shape[-1]
    expected = F.interpolate(
        pos[:, 1:].reshape(1, 37, 37, dim).permute(0, 3, 1, 2), scale_factor=((grid + 0.1) / 37,) * 2, mode="bicubic"
    ).permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    assert model.pretrained.pos_embed_grid.shape == (1, 1 + grid * grid, dim)
    torch.testing.assert_close(model.pretrained.pos_embed_grid[:, 1:], expected)


def test_dav2_safetensors_file_is_detected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.bin"  # the name says nothing: detection reads the content
    save_file(synthetic_dav2_state_dict("vits"), str(path))
    assert read_checkpoint(path).format == "dav2-vits"


def test_dav2_mismatches_are_listed(tmp_path):
    state = synthetic_dav2_state_dict("vits")
    del state["pretrained.blocks.0.norm1.bias"]
    state["depth_head.extra.weight"] = torch.zeros(3)
    state["pretrained.norm.weight"] = torch.zeros(5)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch) as info:
        load_model(None, path)
    report = info.value.report
    assert report.missing == ["pretrained.blocks.0.norm1.bias"]
    assert report.unexpected == ["depth_head.extra.weight"]
    assert report.wrong_shape == ["pretrained.norm.weight (5,) != (384,)"]
    assert "1 missing" in str(info.value) and "\n" not in str(info.value)


def test_dav2_variant_must_match_the_preset(tmp_path):
    path = tmp_path / "vits.pth"
    torch.save(synthetic_dav2_state_dict("vits"), path)
    with pytest.raises(UserError, match="vits weights but preset 'ois-b-1024' uses vitb"):
        load_model("ois-b-1024", path)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_own_formats_round_trip(tmp, fmt, tiny):
    import copy

    path = tmp / f"ois.{fmt}"
    changed = copy.deepcopy(tiny)  # the session's model stays as it is
    with torch.no_grad():
        for p in changed.decoder.parameters():  # make it differ from the seeded init
            p.add_(0.01)
    if fmt == "safetensors":
        save_checkpoint(changed, path)
    else:
        torch.save({"state_dict": changed.state_dict(), "config": changed.cfg.to_dict()}, path)
    model, report = load_model(None, path)
    assert report.format == f"ois-{fmt}" and report.ok
    assert model.cfg == tiny.cfg
    for key, value in changed.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not torch.equal(model.state_dict()["decoder.order_sigma"], tiny.state_dict()["decoder.order_sigma"])
    with pytest.raises(UserError, match="saved for preset 'ois-tiny'"):
        load_model("ois-s-1024", path)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        read_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_files_are_clean_errors(tmp_path, content):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_model(None, path)
    assert "\n" not in str(info.value)


def test_truncated_safetensors_is_a_clean_error(tmp_path, tiny):
    path = tmp_path / "ok.safetensors"
    save_checkpoint(tiny, path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model(None, path)


def test_foreign_state_dict_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="neither an ois-deploy checkpoint nor"):
        load_model(None, path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_model(None, tmp_path / "nope.pth")


def test_random_init_is_seeded():
    a, report = load_model("ois-tiny", "random")
    b, _ = load_model("ois-tiny", "random")
    assert report.format == "random"
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_usual_permissions(tmp_path, tiny, umask_022):
    """Outputs are written to a temp file and renamed: they must end up 0644 under umask 022,
    as a plain open() would make them, not with the temp file's private 0600."""
    save_checkpoint(tiny, tmp_path / "ckpt.safetensors")
    atomic_write_bytes(tmp_path / "out.json", b"{}")
    for name in ("ckpt.safetensors", "out.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
