"""The DSRL network and its losses, checked against direct definitions."""

from __future__ import annotations

import math

import pytest
import torch

from planetseg.errors import InvalidArgumentError
from planetseg.model import DSRLNet, LossWeights, NetConfig, dsrl_loss, feature_affinity_loss
from planetseg.model.losses import dice_loss

TINY = NetConfig(in_bands=1, num_classes=4, scale=2, width=8, depth=2, head_channels=8)


def reference_fa(seg: torch.Tensor, sr: torch.Tensor, subsample: int) -> float:
    """The paper's FA loss written out pixel pair by pixel pair, image by image."""
    pool = torch.nn.functional.avg_pool2d
    seg, sr = pool(seg, subsample, ceil_mode=True), pool(sr, subsample, ceil_mode=True)
    total = 0.0
    for b in range(seg.shape[0]):
        fs = seg[b].flatten(1)  # (C, N)
        fr = sr[b].flatten(1)
        n = fs.shape[1]
        acc = 0.0
        for i in range(n):
            for j in range(n):
                s_ij = float(fs[:, i] @ fs[:, j]) / (
                    float(fs[:, i].norm()) * float(fs[:, j].norm())
                )
                r_ij = float(fr[:, i] @ fr[:, j]) / (
                    float(fr[:, i].norm()) * float(fr[:, j].norm())
                )
                acc += abs(s_ij - r_ij)
        total += acc / n**2
    return total / seg.shape[0]


@pytest.mark.parametrize("subsample", [1, 2, 4])
def test_fa_loss_matches_the_pairwise_definition(subsample: int) -> None:
    gen = torch.Generator().manual_seed(0)
    seg = torch.randn(3, 5, 8, 8, generator=gen, dtype=torch.float64)
    sr = torch.randn(3, 5, 8, 8, generator=gen, dtype=torch.float64)
    got = float(feature_affinity_loss(seg, sr, subsample=subsample))
    assert got == pytest.approx(reference_fa(seg, sr, subsample), rel=1e-9)


def test_fa_loss_does_not_grow_with_batch_size() -> None:
    gen = torch.Generator().manual_seed(1)
    seg = torch.randn(1, 4, 16, 16, generator=gen)
    sr = torch.randn(1, 4, 16, 16, generator=gen)
    one = feature_affinity_loss(seg, sr, subsample=2)
    eight = feature_affinity_loss(seg.repeat(8, 1, 1, 1), sr.repeat(8, 1, 1, 1), subsample=2)
    assert float(eight) == pytest.approx(float(one), rel=1e-6)
    other_seg, other_sr = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    pair = feature_affinity_loss(
        torch.cat([seg, other_seg]), torch.cat([sr, other_sr]), subsample=2
    )
    alone = feature_affinity_loss(other_seg, other_sr, subsample=2)
    assert float(pair) == pytest.approx((float(one) + float(alone)) / 2, rel=1e-6)


def test_fa_loss_is_zero_for_identical_and_bounded() -> None:
    f = torch.randn(2, 4, 8, 8)
    assert float(feature_affinity_loss(f, f.clone(), subsample=1)) == pytest.approx(0, abs=1e-6)
    assert 0 <= float(feature_affinity_loss(f, -f, subsample=1)) <= 2


@pytest.mark.parametrize("scale", [2, 4])
def test_output_shapes_follow_scale(scale: int) -> None:
    config = NetConfig(in_bands=3, num_classes=5, scale=scale, width=8, depth=3, head_channels=8)
    out = DSRLNet(config)(torch.randn(2, 3, 16, 16))
    assert out.logits.shape == (2, 5, 16 * scale, 16 * scale)
    assert out.sr.shape == (2, 3, 16 * scale, 16 * scale)
    assert out.seg_features.shape == out.sr_features.shape


def test_detached_model_has_no_sr_parameters_and_same_output() -> None:
    torch.manual_seed(0)
    net = DSRLNet(TINY)
    # train a step so BatchNorm statistics and weights are not at their initial values
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 4, (2, 32, 32))
    dsrl_loss(net(x), y, torch.randn(2, 1, 32, 32), LossWeights())["loss"].backward()
    opt.step()
    net.eval()
    seg = net.detach()
    names = set(seg.state_dict())
    assert not any(n.startswith(("sr_", "feature_transform")) for n in names)
    assert len(names) < len(net.state_dict())
    with torch.no_grad():
        assert torch.equal(seg(x), net(x).logits)


def test_loss_components_and_baseline() -> None:
    x, y, hr = (
        torch.randn(2, 1, 16, 16),
        torch.randint(0, 4, (2, 32, 32)),
        torch.randn(2, 1, 32, 32),
    )
    full = dsrl_loss(DSRLNet(TINY)(x), y, hr, LossWeights(sr=0.1, fa=1.0, fa_subsample=4))
    assert set(full) == {"loss", "ce", "mse", "fa"}
    expected = full["ce"] + 0.1 * full["mse"] + 1.0 * full["fa"]
    assert math.isclose(float(full["loss"]), float(expected), rel_tol=1e-6)
    base = dsrl_loss(DSRLNet(TINY, with_sr=False)(x), y, hr, LossWeights())
    assert set(base) == {"loss", "ce"}


def test_dice_loss_is_zero_for_a_perfect_and_one_for_a_missed_foreground() -> None:
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    labels[0, 2:5, 2:5] = 1
    labels[1, :, :2] = 3
    perfect = 50.0 * torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    # classes 1 and 3 overlap perfectly; class 2 is absent and predicted nowhere: no cost
    assert float(dice_loss(perfect, labels)) < 0.02
    background = torch.zeros(2, 4, 8, 8)
    background[:, 0] = 50.0
    # every foreground pixel missed: 1 - 1 / (pixels + 1) for classes 1 (9 px) and 3 (16 px),
    # 0 for the absent class 2 (the smoothing term 1 keeps an empty class finite)
    expected = ((1 - 1 / 10) + (1 - 1 / 17) + 0) / 3
    assert math.isclose(float(dice_loss(background, labels)), expected, rel_tol=1e-4)


def test_dice_term_of_the_total_loss() -> None:
    x, y, hr = (
        torch.randn(2, 1, 16, 16),
        torch.randint(0, 4, (2, 32, 32)),
        torch.randn(2, 1, 32, 32),
    )
    out = DSRLNet(TINY)(x)
    losses = dsrl_loss(out, y, hr, LossWeights(sr=0.1, fa=1.0, fa_subsample=4, dice=0.5))
    assert set(losses) == {"loss", "ce", "dice", "mse", "fa"}
    expected = losses["ce"] + 0.5 * losses["dice"] + 0.1 * losses["mse"] + losses["fa"]
    assert math.isclose(float(losses["loss"]), float(expected), rel_tol=1e-6)
    torch.testing.assert_close(losses["dice"], dice_loss(out.logits, y))


def test_bad_config() -> None:
    with pytest.raises(InvalidArgumentError, match="scale"):
        NetConfig(in_bands=1, num_classes=4, scale=3)
    with pytest.raises(InvalidArgumentError, match="two classes"):
        NetConfig(in_bands=1, num_classes=1)


def test_receptive_radius_is_the_halo_that_removes_seams() -> None:
    from planetseg.evaluate import predict_logits
    from planetseg.model import SegmentationNet, receptive_radius

    torch.manual_seed(0)
    net = SegmentationNet(TINY).eval()
    x = torch.randn(1, 1, 96, 96)
    whole = predict_logits(net, x, tile=None)
    radius = receptive_radius(TINY)
    halo = math.ceil(radius / TINY.divisor) * TINY.divisor
    tiled = predict_logits(net, x, tile=32, halo=halo)
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-5)
    short = predict_logits(net, x, tile=32, halo=0)
    assert (short - whole).abs().max() > 1e-3  # without a halo, tile edges show


def test_degradation_at_scale_1_without_psf_is_the_identity() -> None:
    from planetseg.data import Degradation

    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(Degradation(1, 0.0)(x), x)
    assert Degradation(2, 0.5)(x).shape == (2, 3, 8, 8)
    assert NetConfig(in_bands=1, num_classes=2, scale=1).scale == 1  # the HR-input arm


@pytest.mark.parametrize(("scale", "sigma"), [(2, 0.5), (4, 1.0), (2, 0.0), (1, 0.7)])
def test_a_degraded_window_equals_that_window_of_the_degraded_image(
    scale: int, sigma: float
) -> None:
    from planetseg.data import Degradation

    degrade = Degradation(scale, sigma)
    h, w = 24 * scale, 40 * scale
    image = torch.randn(1, 2, h, w, dtype=torch.float64)
    whole = degrade(image)
    reads = []

    def read(rows: slice, cols: slice) -> torch.Tensor:
        reads.append((rows, cols))
        return image[..., rows, cols]

    # Windows inside, on each edge and corner, one LR pixel, and the whole image.
    for rows, cols in [
        (slice(5, 13), slice(9, 30)), (slice(0, 7), slice(0, 11)), (slice(17, 24), slice(30, 40)),
        (slice(0, 24), slice(13, 14)), (slice(11, 12), slice(39, 40)), (slice(0, 24), slice(0, 40)),
    ]:  # fmt: skip
        got = degrade.window(read, (h, w), rows, cols)
        torch.testing.assert_close(got, whole[..., rows, cols], rtol=1e-12, atol=1e-12)
        hr_rows, hr_cols = reads[-1]  # only the window and the blur's context were read
        assert hr_rows.start >= rows.start * scale - degrade.radius
        assert hr_cols.stop <= cols.stop * scale + degrade.radius


def test_median_frequency_class_weights() -> None:
    import numpy as np

    from planetseg.data import median_frequency

    counts = np.array([70, 20, 0, 10])  # class 2 absent
    w = median_frequency(counts)
    freq = counts / 100
    assert w[2] == 0
    present = freq > 0
    np.testing.assert_allclose(w[present] * freq[present], np.median(freq[present]))


def test_sqrt_class_weights_lie_between_none_and_balanced() -> None:
    import numpy as np

    from planetseg.data import loss_weights

    counts = np.array([90, 10])  # 10 % crater pixels
    balanced = loss_weights("balanced", counts)
    np.testing.assert_allclose(loss_weights("sqrt", counts), np.sqrt(balanced))
    assert loss_weights("none", counts) is None
    assert balanced[1] / balanced[0] == pytest.approx(9.0)  # 90 % / 10 %


def _one_crater_data():  # noqa: ANN202
    import numpy as np

    from planetseg.data import Cube, TrainingData, spatial_split, statistics

    labels = np.zeros((2, 256, 256), np.uint8)
    labels[1, 200:210, 30:40] = 1  # one small crater, in one time step only
    image = np.random.default_rng(0).random((2, 1, 256, 256), dtype=np.float32)
    cube = Cube.from_arrays(image, labels, ["b"], {0: "background", 1: "crater"})
    split = spatial_split(256, 0.25, multiple=64)
    return TrainingData((cube,), (split,), statistics([cube], [split]))


def test_foreground_windows_see_the_rare_crater_and_stay_reproducible() -> None:
    from planetseg.data import WindowSampler

    data = _one_crater_data()
    uniform = WindowSampler(data, crop=32, seed=1)
    focused = WindowSampler(data, crop=32, seed=1, foreground=1.0)
    hits = [(focused.batch(step, 0, 8)[1] > 0).any(axis=(1, 2)).mean() for step in range(10)]
    assert min(hits) == 1.0  # every window holds crater pixels
    seen = [(uniform.batch(step, 0, 8)[1] > 0).any(axis=(1, 2)).mean() for step in range(10)]
    assert sum(seen) / len(seen) < 0.2
    a, b = focused.batch(3, 1, 8), focused.batch(3, 1, 8)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))  # f(seed, step, rank)
    assert not (focused.batch(3, 0, 8)[0] == a[0]).all()


def test_windows_never_enter_the_validation_strips() -> None:
    import numpy as np

    from planetseg.data import Cube, TrainingData, WindowSampler, spatial_split, statistics

    cubes, splits = [], []
    for width in (256, 128):  # two cubes, each with its own split
        split = spatial_split(width, 0.25, multiple=32)
        labels = np.zeros((2, 96, width), np.uint8)
        labels[..., split.val] = 1  # what a window must never see
        labels[:, 40:44, split.train.stop - 4 :] = 2  # foreground at the edge of the strip
        image = np.random.default_rng(width).random((2, 1, 96, width), dtype=np.float32)
        cubes.append(Cube.from_arrays(image, labels, ["b"], {0: "a", 1: "val", 2: "crater"}))
        splits.append(split)
    data = TrainingData(tuple(cubes), tuple(splits), statistics(cubes, splits))
    sampler = WindowSampler(data, crop=32, seed=0, foreground=0.5)
    labels = np.concatenate([sampler.batch(step, 0, 16)[1] for step in range(20)])
    assert not (labels == 1).any()
    assert (labels == 2).any(axis=(1, 2)).mean() > 0.4  # the clipped foreground windows


def test_mostly_nodata_windows_are_drawn_again() -> None:
    import numpy as np

    from planetseg.data import Cube, TrainingData, WindowSampler, spatial_split, statistics

    image = np.random.default_rng(0).random((1, 1, 128, 256), dtype=np.float32)
    image[..., :, 96:] = np.nan  # the scene covers only the first 96 columns
    labels = np.zeros((128, 256), np.uint8)
    cube = Cube.from_arrays(image, labels, ["b"], {0: "background"})
    split = spatial_split(256, 0.25, multiple=32)
    data = TrainingData((cube,), (split,), statistics([cube], [split]))
    assert np.isfinite(data.stats.mean).all()  # nodata is left out of the statistics
    hr, lab = WindowSampler(data, crop=32, seed=0).batch(0, 0, 32)
    assert lab.dtype == np.uint8 and hr.dtype == np.float32
    assert np.isfinite(hr).all()  # the nodata a kept window has holds the band mean
    # every window starts at most 80 columns in: at least half of it has data
    assert (np.isclose(hr, data.stats.mean[0]).mean(axis=(1, 2, 3)) <= 0.5).all()


def test_photometric_jitter_is_reproducible_and_keeps_the_order_of_values() -> None:
    from planetseg.data import Photometric

    hr = torch.randn(4, 1, 16, 16)
    jitter = Photometric()
    a = jitter(hr, torch.Generator().manual_seed(5))
    b = jitter(hr, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert a.shape == hr.shape and not torch.allclose(a, hr)
    for i in range(4):  # gamma, contrast and brightness are monotone: the ranks are kept
        assert torch.equal(hr[i].flatten().argsort(), a[i].flatten().argsort())


def test_fused_network_computes_the_same_function() -> None:
    from planetseg.model import SegmentationNet, fuse_for_inference

    torch.manual_seed(1)
    net = SegmentationNet(TINY)
    net.train()
    net(torch.randn(4, 1, 32, 32))  # give the BatchNorms running statistics of their own
    net.eval()
    fused = fuse_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)
