"""Shapes, parameter counts and the decoder's invariants of the reference model."""

import dataclasses
import math

import pytest
import torch

from ois_deploy.contract import state_shapes
from ois_deploy.model import OIS, count_parameters, get_preset
from ois_deploy.presets import OISConfig
from ois_deploy.model.attention import ATTENTION_IMPLS, Attention, masked_bias
from ois_deploy.model.prompts import click_kinds
from ois_deploy.model.weights import load_model

from conftest import dav2_key_shapes

S = get_preset("ois-tiny").input_size  # ois-tiny's square input side


def build_meta(preset: str) -> OIS:
    with torch.device("meta"):
        return OIS(get_preset(preset)).eval()


@pytest.mark.parametrize("preset", ["ois-tiny", "ois-s-1024"])
def test_module_output_shapes(preset):
    """Every stage for one image and P=2 prompt sets of N=3 clicks (meta tensors: shapes only)."""
    cfg = get_preset(preset)
    model = build_meta(preset)
    s, g, vit, f = cfg.input_size, cfg.grid, cfg.encoder, cfg.depth_head.features
    image = torch.empty(1, 3, s, s, device="meta")
    with torch.no_grad():
        tokens = model.pretrained.intermediate_layers(image)
        assert [t.shape for t in tokens] == [(1, g * g, vit.embed_dim)] * 4
        maps = [t.transpose(1, 2).reshape(1, vit.embed_dim, g, g) for t in tokens]
        assert model.depth_head(maps, s).shape == (1, 1, s, s)
        state = model.encode(image)
        assert state.image_embed.shape == (1, cfg.decoder.width, g, g)
        assert state.pyramid_l1.shape == (1, f, 4 * g, 4 * g)
        assert state.pyramid_l2.shape == (1, f, 2 * g, 2 * g)
        assert state.pyramid_l3.shape == (1, f, g, g)
        assert state.depth.shape == (1, 1, s, s)
        # the export's example inputs and lint's contract use state_shapes: it must not drift
        assert {k: tuple(v.shape) for k, v in state._asdict().items()} == state_shapes(cfg)
        p, n = 2, 3
        coords = torch.empty(p, n, 2, device="meta")
        kinds = click_kinds(torch.empty(p, n, device="meta"))
        prompts = model.decoder.prompts
        assert prompts.sparse(coords, kinds).shape == (p, n, cfg.decoder.width)
        assert prompts.disks(coords, kinds).shape == (p, 2, s, s)
        prev = torch.empty(p, 1, s, s, device="meta")
        assert prompts.dense(coords, kinds, prev).shape == (p, cfg.decoder.width, g, g)
        m = cfg.mask_size
        assert prompts.at_mask_grid(coords, kinds, prev, m).shape == (p, 3, m, m)
        logits = model.decode(state, coords, torch.empty(p, n, device="meta"), prev)
        assert logits.shape == (p, 1, cfg.mask_size, cfg.mask_size)
        assert cfg.mask_size == 4 * g


def test_disks_on_the_mask_grid_match_the_pixel_disks():
    """The mask head's disks (mask_prompts) cover the same place and area as the pixel disks
    the token embedding sees, on the coarser grid; a negative click lights only its own map."""
    cfg = get_preset("ois-tiny")
    prompts = OIS(cfg).decoder.prompts
    coords = torch.tensor([[[100.0, 120.0], [30.0, 200.0]]])
    kinds = click_kinds(torch.tensor([[1, 0]]))
    pixels = prompts.disks(coords, kinds)
    assert torch.equal(prompts.disks(coords, kinds, cfg.input_size), pixels)
    assert pixels[0, 0, 120, 100] == 1 and pixels[0, 1, 200, 30] == 1
    assert pixels[0, 0, 200, 30] == 0 and pixels[0, 1, 120, 100] == 0
    m = cfg.mask_size
    cell = cfg.input_size / m  # pixels per mask cell
    grid = prompts.disks(coords, kinds, m)
    for channel, (x, y) in ((0, (100, 120)), (1, (30, 200))):
        lit = grid[0, channel].nonzero().float()
        # area within one ring of cells, centroid within a cell of the click
        assert abs(len(lit) * cell**2 - pixels[0, channel].sum()) < 2 * math.pi * cfg.disk_radius * cell
        cy, cx = (lit.mean(0) + 0.5) * cell - 0.5
        assert abs(cx - x) < cell and abs(cy - y) < cell


def test_disks_match_a_disk_drawn_around_each_click_of_its_kind():
    """disks() takes the nearest click of each kind; it must equal drawing every disk on its own
    (the straightforward rendering it replaced) pixel for pixel, padding clicks drawing nothing."""
    cfg = get_preset("ois-tiny")
    prompts = OIS(cfg).decoder.prompts
    g = torch.Generator().manual_seed(0)
    coords = torch.randint(0, cfg.input_size, (3, 6, 2), generator=g).float()
    labels = torch.randint(-1, 2, (3, 6), generator=g)
    kinds = click_kinds(labels)
    for side in (cfg.input_size, cfg.mask_size):
        ramp = (torch.arange(side) + 0.5) * cfg.input_size / side - 0.5
        d2 = (ramp.view(1, 1, 1, -1) - coords[..., 0, None, None]) ** 2 + (ramp.view(1, 1, -1, 1) - coords[..., 1, None, None]) ** 2
        inside = (d2 <= cfg.disk_radius**2).float()
        drawn = [(inside * k[..., None, None]).amax(dim=1) for k in (kinds.pos, kinds.neg)]
        assert torch.equal(prompts.disks(coords, kinds, side), torch.stack(drawn, dim=1))
    assert prompts.disks(coords, click_kinds(torch.full((3, 6), -1))).sum() == 0


def test_fusion_blocks_equal_dav2s_resize_then_out_conv():
    """FeatureFusionBlock applies out_conv (1x1) before the bilinear resize, DAv2 after it: the
    same function up to float rounding."""
    block = OIS(get_preset("ois-tiny")).depth_head.scratch.refinenet2.eval()
    g = torch.Generator().manual_seed(0)
    x, skip = torch.randn(2, 24, 20, 20, generator=g), torch.randn(2, 24, 20, 20, generator=g)
    with torch.no_grad():
        dav2 = block.out_conv(torch.nn.functional.interpolate(block.resConfUnit2(x + skip), size=(40, 40), mode="bilinear", align_corners=True))
        torch.testing.assert_close(block(x, skip, (40, 40)), dav2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block(x, skip, (20, 20)), block.out_conv(block.resConfUnit2(x + skip)))


def test_depth_output_at_the_fusion_grid_is_resized_to_the_input():
    """ois-tiny runs the depth head's last convs at the fusion grid (8x the tokens) and resizes
    the one-channel depth to S; other presets keep DAv2's order (the official weights)."""
    cfg = get_preset("ois-tiny")
    assert cfg.depth_head.output_at_fusion_grid
    assert not any(get_preset(p).depth_head.output_at_fusion_grid for p in ("ois-s-1024", "ois-b-1024", "ois-l-1024"))
    model = OIS(cfg).eval()
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(1, cfg.encoder.embed_dim, cfg.grid, cfg.grid, generator=g) for _ in range(4)]
    full = OIS(dataclasses.replace(cfg, depth_head=dataclasses.replace(cfg.depth_head, output_at_fusion_grid=False))).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        coarse, fine = model.depth_head(maps, cfg.input_size), full.depth_head(maps, cfg.input_size)
    assert coarse.shape == fine.shape == (1, 1, cfg.input_size, cfg.input_size)
    # the same weights give nearly the same map: only where the convs run differs
    assert (coarse - fine).abs().mean() < 0.05 * fine.abs().mean() and not torch.equal(coarse, fine)
    saved = cfg.to_dict()
    del saved["depth_head"]["output_at_fusion_grid"]  # checkpoints from before the field
    assert not OISConfig.from_dict(saved).depth_head.output_at_fusion_grid


def test_checkpoints_from_before_mask_prompts_pixel_stem_and_token_skip_load_without_them():
    """A config saved before the fields existed (ois-tiny v2) means the old decoder."""
    saved = get_preset("ois-tiny").to_dict()
    fields = ("mask_prompts", "pixel_stem", "token_skip")
    for name in fields:
        del saved["decoder"][name]
    model = OIS(OISConfig.from_dict(saved))
    assert not any(getattr(model.cfg.decoder, name) for name in fields)
    assert not any(hasattr(model.decoder, name) for name in ("mask_prompt_embed", "pixel_stem", "token_skip"))


def test_token_skip_lands_at_its_token_in_the_mask_head():
    """A map added at the token grid (token_skip) changes the mask head's output only around that
    token's place on the mask grid: it is not shifted, transposed or spread over the image."""
    cfg = get_preset("ois-tiny")
    torch.manual_seed(0)
    head = OIS(cfg).eval().decoder.mask_head
    g, f, m = cfg.grid, cfg.depth_head.features, cfg.mask_size
    skips = [torch.randn(1, f, 4 * g, 4 * g), torch.randn(1, f, 2 * g, 2 * g), torch.randn(1, f, g, g)]
    level4 = torch.randn(1, cfg.decoder.width, g, g)
    at_grid = torch.zeros(1, f, g, g)
    y, x = 4, 13
    bumped = at_grid.clone()
    bumped[0, :, y, x] = 5.0
    with torch.no_grad():
        fuse = lambda extra: head.fuse(level4, skips, out_scale=1, at_grid=extra)  # noqa: E731
        diff = (fuse(bumped) - fuse(at_grid)).abs().sum(1)[0]
        assert torch.equal(fuse(at_grid), fuse(None))  # a zero map is no map
    cell = g / m  # tokens per mask cell
    lit = (diff > 1e-6).nonzero().float()
    assert len(lit) > 0
    centre = (lit.mean(0) + 0.5) * cell
    assert (centre - torch.tensor([y + 0.5, x + 0.5])).abs().max() < 1
    assert ((lit + 0.5) * cell - torch.tensor([y + 0.5, x + 0.5])).abs().max() < 6  # a few tokens


def test_pixel_stem_adds_local_pixel_detail_to_the_finest_skip():
    """One changed pixel moves the stem's features only within a few mask cells of that pixel
    (the resize to the mask grid keeps places), and the stem changes no other encoder output."""
    cfg = get_preset("ois-tiny")
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, pixel_stem=8))
    torch.manual_seed(0)
    model = OIS(cfg).eval()
    image = torch.rand(1, 3, S, S) * 255
    x, y = 150, 61
    changed = image.clone()
    changed[0, :, y, x] = 255 - changed[0, :, y, x]
    stem = lambda im: model.decoder.pixel_stem((im - model.pixel_mean) / model.pixel_std, cfg.mask_size)  # noqa: E731
    with torch.no_grad():
        diff = (stem(changed) - stem(image)).abs().sum(1)[0]
        with_stem = model.encode(image)
        model.cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, pixel_stem=0))
        plain = model.encode(image)  # same weights; the cfg is read at every encode
    cell = S / cfg.mask_size
    lit = (diff > 1e-6).nonzero().float()
    assert 0 < len(lit) <= 25
    assert ((lit + 0.5) * cell - 0.5 - torch.tensor([y, x])).abs().max() < 3 * cell
    for name in ("image_embed", "pyramid_l2", "pyramid_l3", "depth"):
        assert torch.equal(getattr(with_stem, name), getattr(plain, name))
    assert not torch.allclose(with_stem.pyramid_l1, plain.pyramid_l1)


def test_depth_anything_v2_parameter_counts_match_official_files():
    """The DAv2 part of a B preset is exactly 97,470,785 parameters; S and L match the fixture lists."""
    for preset in ("ois-b-1024", "ois-b-2048"):
        counts = count_parameters(build_meta(preset))
        assert counts["encoder"] == 86_580_480
        assert counts["depth_head"] == 10_890_305
        assert counts["encoder"] + counts["depth_head"] == 97_470_785
        assert counts["total"] == counts["encoder"] + counts["depth_head"] + counts["decoder"]
    for preset, variant in (("ois-s-1024", "vits"), ("ois-b-1024", "vitb"), ("ois-l-1024", "vitl")):
        counts = count_parameters(build_meta(preset))
        official = sum(math.prod(s) for s in dav2_key_shapes(variant).values())
        assert counts["encoder"] + counts["depth_head"] == official


def test_b_preset_total_is_reported_beside_the_paper():
    counts = count_parameters(build_meta("ois-b-1024"))
    # OIS adds roughly 10M to DAv2-B in the paper (107.88M in all); ours must be of that order.
    assert 5_000_000 < counts["decoder"] < 20_000_000


def test_input_sizes_snap_to_patch():
    assert get_preset("ois-s-1024").input_size == 1022
    assert get_preset("ois-b-1024").grid == 73
    assert get_preset("ois-b-2048").input_size == 2044
    assert get_preset("ois-b-2048").grid == 146


def random_state(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.input_size
    return model.encode(torch.rand(1, 3, s, s, generator=g) * 255)


def test_padding_clicks_change_nothing(tiny):
    with torch.no_grad():
        state = random_state(tiny)
        coords = torch.tensor([[[100.0, 120.0], [30.0, 40.0]]])
        labels = torch.tensor([[1, 0]])
        prev = torch.rand(1, 1, S, S)
        base = tiny.decode(state, coords, labels, prev)
        padded = tiny.decode(
            state,
            torch.cat([coords, torch.tensor([[[5.0, 200.0], [150.0, 7.0]]])], dim=1),
            torch.tensor([[1, 0, -1, -1]]),
            prev,
        )
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=1e-5)


def test_prompt_sets_share_one_image_state(tiny):
    """P prompt sets decoded together equal each decoded alone (broadcast image state)."""
    with torch.no_grad():
        state = random_state(tiny)
        coords = torch.tensor([[[100.0, 120.0], [30.0, 40.0]], [[10.0, 12.0], [200.0, 40.0]], [[60.0, 60.0], [0, 0]]])
        labels = torch.tensor([[1, 0], [1, 1], [1, -1]])
        prev = torch.rand(3, 1, S, S)
        together = tiny.decode(state, coords, labels, prev)
        alone = torch.cat([tiny.decode(state, coords[i : i + 1], labels[i : i + 1], prev[i : i + 1]) for i in range(3)])
    assert state.image_embed.shape[0] == 1
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_clicks_and_previous_mask_change_the_output(tiny):
    with torch.no_grad():
        state = random_state(tiny)
        coords = torch.tensor([[[100.0, 120.0]]])
        a = tiny.decode(state, coords, torch.tensor([[1]]), torch.zeros(1, 1, S, S))
        b = tiny.decode(state, coords, torch.tensor([[0]]), torch.zeros(1, 1, S, S))
        c = tiny.decode(state, coords, torch.tensor([[1]]), torch.ones(1, 1, S, S))
        d = tiny.decode(state, torch.tensor([[[10.0, 20.0]]]), torch.tensor([[1]]), torch.zeros(1, 1, S, S))
    for other in (b, c, d):
        assert (a - other).abs().max() > 1e-4


def test_masked_bias_falls_back_to_plain_attention_on_empty_rows():
    allowed = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    bias = masked_bias(allowed, -1e4)
    assert bias.tolist() == [[[0.0, -1e4, 0.0], [0.0, 0.0, 0.0]]]


@pytest.mark.parametrize("absorb", [None, "keys", "queries"])
@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_never_give_nan(impl, dtype, absorb):
    torch.manual_seed(0)
    attn = Attention(32, 2, absorb).to(dtype)
    attn.impl = impl
    q, kv = torch.randn(2, 3, 32, dtype=dtype), torch.randn(1, 50, 32, dtype=dtype)
    nothing_allowed = masked_bias(torch.zeros(2, 3, 50), -1e4)
    with torch.no_grad():
        out = attn(q, kv, kv, nothing_allowed)
        plain = attn(q, kv, kv, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, plain)  # an empty row is plain attention


@pytest.mark.parametrize("impl", ["matmul", "sdpa"])
@pytest.mark.parametrize("absorb", ["keys", "queries"])
def test_absorbed_cross_attention_is_the_projected_one(absorb, impl):
    """Folding the image side's projections into the click tokens is the same function: with
    and without a bias, with keys shared by the batch (batch 1), in float32 and float16."""
    g = torch.Generator().manual_seed(0)
    attn = Attention(64, 4, absorb).eval()
    for param in attn.parameters():
        param.data = torch.randn(param.shape, generator=g) * 0.2  # nonzero biases: their folding counts
    clicks, tokens = torch.randn(3, 5, 64, generator=g), torch.randn(3, 300, 64, generator=g)
    if absorb == "keys":  # clicks read the image tokens, steered per click and token
        cases = [(clicks, tokens, tokens, torch.randn(3, 5, 300, generator=g)), (clicks, tokens[:1], tokens[:1], None)]
    else:  # the image tokens read the clicks, padding keys hidden
        cases = [(tokens, clicks, clicks, masked_bias(torch.tensor([[1.0, 1, 1, 0, 0]]).expand(3, 1, 5), -1e4)),
                 (tokens, clicks, clicks, None)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
        attn = attn.to(dtype)
        attn.impl = impl
        for q, k, v, bias in cases:
            args = [t.to(dtype) for t in (q, k, v)] + [bias]
            with torch.no_grad():
                absorbed = attn(*args)
                attn.absorb = None
                projected = attn(*args)
                attn.absorb = absorb
            assert absorbed.shape == projected.shape == q.shape
            torch.testing.assert_close(absorbed.float(), projected.float(), atol=tol, rtol=tol)


def test_cross_attention_absorbs_where_it_is_no_dearer_at_max_clicks():
    """(heads - 1) x max_clicks <= width: the 256-wide 8-head decoders fold the projections,
    ois-tiny (64 wide, 4 heads, 24 clicks) projects; a whole decode is the same either way."""
    from ois_deploy.model.blocks import decoder_absorbs

    assert all(decoder_absorbs(get_preset(p).decoder) for p in ("ois-s-1024", "ois-b-1024", "ois-l-1024"))
    assert not decoder_absorbs(get_preset("ois-tiny").decoder)
    tiny = get_preset("ois-tiny")
    cfg = dataclasses.replace(tiny, decoder=dataclasses.replace(tiny.decoder, max_clicks=8))
    assert decoder_absorbs(cfg.decoder)
    torch.manual_seed(0)
    absorbing = OIS(cfg).eval()
    projecting = OIS(tiny).eval()
    projecting.load_state_dict(absorbing.state_dict())
    coords = torch.tensor([[[100.0, 120.0], [30.0, 40.0], [0.0, 0.0]], [[10.0, 12.0], [200.0, 40.0], [60.0, 61.0]]])
    labels = torch.tensor([[1, 0, -1], [1, 1, 0]])
    prev = torch.rand(2, 1, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        state = random_state(absorbing)
        torch.testing.assert_close(absorbing.decode(state, coords, labels, prev),
                                   projecting.decode(state, coords, labels, prev), atol=1e-4, rtol=1e-4)


def test_level4_projection_folded_into_its_stride_2_conv():
    """Level 4's 1x1 projection runs folded into the 3x3 stride-2 conv after it; its bias, which
    that conv's zero padding never sees, stays exact at the borders."""
    from ois_deploy.model.dpt import conv_of_projection

    g = torch.Generator().manual_seed(0)
    project, conv = torch.nn.Conv2d(32, 48, 1), torch.nn.Conv2d(48, 48, 3, stride=2, padding=1)
    for param in (*project.parameters(), *conv.parameters()):
        param.data = torch.randn(param.shape, generator=g) * 0.3
    for side in (20, 21):
        x = torch.randn(2, 32, side, side, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(conv_of_projection(conv, project, x), conv(project(x)), atol=1e-4, rtol=1e-5)


def test_object_aware_first_click_is_plain_attention(tiny):
    """First click, empty previous mask: the positive row has nothing inside, so it falls back."""
    from ois_deploy.model.order import object_bias

    kinds = click_kinds(torch.tensor([[1, 0]]))
    empty = object_bias(torch.zeros(1, 1, 224, 224), kinds, 14, 0.5, -1e4)
    assert (empty[0, 0] == 0).all()  # positive: fallback to everything
    assert (empty[0, 1] == 0).all()  # negative: all tokens are outside
    half = torch.zeros(1, 1, 224, 224)
    half[..., :112, :] = 1.0
    guided = object_bias(half, kinds, 14, 0.5, -1e4).reshape(1, 2, 16, 16)
    assert (guided[0, 0, :8] == 0).all() and (guided[0, 0, 8:] == -1e4).all()
    assert (guided[0, 1, :8] == -1e4).all() and (guided[0, 1, 8:] == 0).all()


def test_fp16_decode_is_finite(tiny):
    """Half precision with the FP32 islands, first click (every masked row falls back)."""
    model, _ = load_model("ois-tiny")
    model = model.half()
    with torch.no_grad():
        state = model.encode(torch.rand(1, 3, S, S) * 255)
        out = model.decode(state, torch.tensor([[[50.0, 60.0], [0.0, 0.0]]]), torch.tensor([[1, -1]]), torch.zeros(1, 1, S, S))
        ref = tiny.decode(random_state(tiny), torch.tensor([[[50.0, 60.0]]]), torch.tensor([[1]]), torch.zeros(1, 1, S, S))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.shape == ref.shape


def test_fp16_copy_keeps_the_fp32_islands(tiny):
    from ois_deploy.model.precision import islands_dtype_report, to_fp16

    report = islands_dtype_report(to_fp16(tiny))
    assert report.pop("body") == torch.float16
    assert set(report.values()) == {torch.float32}, report
    assert tiny.dtype == torch.float32  # the source model is untouched
