"""Batch augmentation: each geometric and lighting formula on tiny synthetic images, and the wiring."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from petpipe.data.augment import (
    CORNERS,
    adjust_lighting,
    batch_transform,
    crop_matrix,
    draw_batch,
    fastai_augment,
    flip_matrix,
    normalize,
    perspective_matrix,
    resample,
    rotate_matrix,
    sample_grid,
    train_batch,
    transform_points,
    valid_batch,
    warp_coeffs,
    warp_targets,
    zoom_matrix,
)

# Every random step off (geometry and lighting), so train_batch must reduce to valid_batch.
NO_CHANCE = fastai_augment(flip=False, p_affine=0.0, min_scale=1.0, p_lighting=0.0)
NO_MAGNITUDE = fastai_augment(
    flip=False, max_rotate=0.0, min_zoom=1.0, max_zoom=1.0, max_warp=0.0, min_scale=1.0, max_lighting=0.0
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(batch: int = 4, side: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator(seed))


def dot_image(side: int, row: int, col: int) -> torch.Tensor:
    """[1, 3, side, side] black image with one white pixel."""
    image = torch.zeros(1, 3, side, side)
    image[..., row, col] = 255
    return image


def warp_image(image: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    return resample(image, sample_grid(matrix.float(), size=size))


@pytest.mark.parametrize("params", [NO_CHANCE, NO_MAGNITUDE, None], ids=["p=0", "magnitude=0", "off"])
def test_neutral_augmentation_is_the_validation_transform(params):
    images = random_images(side=20)
    expected = valid_batch(images, size=12)
    out = train_batch(images, size=12, params=params, generator=generator())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_valid_batch_keeps_a_same_size_image():
    images = random_images(side=9)
    torch.testing.assert_close(valid_batch(images, size=9), normalize(images.float() / 255), rtol=0, atol=1e-4)


def test_rotate_matrix_follows_the_rotation_formula():
    cos, sin = math.cos(math.pi / 6), math.sin(math.pi / 6)
    torch.testing.assert_close(
        rotate_matrix(torch.tensor([30.0]))[0],
        torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], dtype=torch.float64),
    )
    point = transform_points(torch.tensor([[[1.0, 0.0]]], dtype=torch.float64), rotate_matrix(torch.tensor([30.0])))
    torch.testing.assert_close(point, torch.tensor([[[cos, sin]]], dtype=torch.float64))


def test_rotation_moves_a_pixel_where_the_formula_says():
    # Output point p samples input point R p = (-y, x) at 90 degrees: the input's right-middle
    # pixel (x=1, y=0) is seen at the output's top-middle (x=0, y=-1).
    out = warp_image(dot_image(11, row=5, col=10), rotate_matrix(torch.tensor([90.0])), size=11)
    assert out[0, 0, 0, 5] == pytest.approx(255, abs=1e-3)
    assert out[0, 0].sum() == pytest.approx(255, abs=1e-2)


def test_points_outside_the_image_are_reflected_back_in():
    # Rotated 45 degrees, the output corners fall outside the input; reflection keeps them filled.
    out = warp_image(torch.full((1, 3, 8, 8), 100.0), rotate_matrix(torch.tensor([45.0])), size=8)
    torch.testing.assert_close(out, torch.full_like(out, 100.0))


def test_flip_mirrors_the_width():
    images = random_images(batch=1, side=10).float()
    flipped = warp_image(images, flip_matrix(torch.tensor([True])), size=10)
    torch.testing.assert_close(
        flipped, torch.flip(warp_image(images, torch.eye(3)[None], size=10), dims=[-1]), rtol=0, atol=1e-3
    )
    torch.testing.assert_close(
        warp_image(images, flip_matrix(torch.tensor([False])), size=10), images, rtol=0, atol=1e-3
    )  # 0-255 scale


def test_train_batch_flips_about_half_the_images():
    images = random_images(batch=16, side=10)
    only_flip = fastai_augment(flip=True, p_affine=0.0, min_scale=1.0, max_lighting=0.0)
    out = train_batch(images, size=10, params=only_flip, generator=generator())
    plain = valid_batch(images, size=10)
    flipped = [bool(torch.allclose(o, p.flip(-1), atol=1e-4)) for o, p in zip(out, plain)]
    same = [bool(torch.allclose(o, p, atol=1e-4)) for o, p in zip(out, plain)]
    assert all(f != s for f, s in zip(flipped, same))  # every image is one or the other
    assert 0 < sum(flipped) < 16


def ramp_image(side: int) -> torch.Tensor:
    """Channel 0 = column index, channel 1 = row index: bilinear sampling reproduces coordinates."""
    index = torch.arange(side, dtype=torch.float32)
    return torch.stack([index.expand(side, side), index[:, None].expand(side, side), torch.zeros(side, side)])[None]


def test_centred_half_crop_magnifies_the_centre():
    # Side 0.5, centred: input columns 2..6 of 9 stretched over 9 output columns.
    out = warp_image(ramp_image(9), crop_matrix(torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.5])), size=9)
    expected = 2 + torch.arange(9) / 2
    torch.testing.assert_close(out[0, 0], expected.expand(9, 9), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[0, 1], expected[:, None].expand(9, 9), rtol=0, atol=1e-4)


def test_crop_position_reaches_the_edges_and_stays_inside():
    left_top = warp_image(
        ramp_image(9), crop_matrix(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([0.0])), size=9
    )
    torch.testing.assert_close(left_top[0, 0, 0], torch.arange(9) / 2, rtol=0, atol=1e-4)
    torch.testing.assert_close(left_top[0, 1, :, 0], torch.arange(9) / 2, rtol=0, atol=1e-4)
    right = warp_image(
        ramp_image(9), crop_matrix(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.5])), size=9
    )
    torch.testing.assert_close(right[0, 0, 0], 4 + torch.arange(9) / 2, rtol=0, atol=1e-4)


def test_zoom_is_a_window_of_side_one_over_zoom():
    col, row = torch.tensor([0.2]), torch.tensor([0.9])
    torch.testing.assert_close(zoom_matrix(torch.tensor([1.25]), col, row), crop_matrix(torch.tensor([0.8]), col, row))
    matrix = zoom_matrix(torch.tensor([1.25]), col, row)[0]
    assert matrix[0, 2].item() == pytest.approx((1 - 0.8) * (2 * 0.2 - 1))
    assert matrix[1, 2].item() == pytest.approx((1 - 0.8) * (2 * 0.9 - 1))


def test_warp_sends_the_target_points_to_the_corners():
    warp_x, warp_y = torch.tensor([0.15, 0.0]), torch.tensor([-0.1, 0.0])
    targets = warp_targets(warp_x, warp_y)
    x, y = 0.15, -0.1
    expected = [[-1 - y, -1 - x], [-1 + y, 1 + x], [1 + y, -1 + x], [1 - y, 1 - x]]
    torch.testing.assert_close(targets[0], torch.tensor(expected, dtype=torch.float64))
    matrix = perspective_matrix(warp_coeffs(warp_x, warp_y))
    torch.testing.assert_close(
        transform_points(targets, matrix), torch.tensor(CORNERS, dtype=torch.float64).expand(2, 4, 2)
    )
    torch.testing.assert_close(matrix[1], torch.eye(3, dtype=torch.float64))  # zero magnitude: identity
    assert not torch.allclose(matrix[0], torch.eye(3, dtype=torch.float64))


def test_warped_image_shows_the_input_corner_at_its_target():
    # Magnitudes -0.2 put the top-left target at (-0.8, -0.8): output pixel (1, 1) on an 11-grid.
    warp = perspective_matrix(warp_coeffs(torch.tensor([-0.2]), torch.tensor([-0.2])))
    out = warp_image(dot_image(11, row=0, col=0), warp, size=11)
    assert out[0, 0, 1, 1] == pytest.approx(255, abs=1e-2)
    assert out[0, 0, 0, 0] < 255 / 2


def one_draw(**values: float) -> object:
    """A one-image draw with every step neutral except ``values``."""
    neutral = draw_batch(1, params=NO_CHANCE, generator=generator())
    return dataclasses.replace(neutral, **{k: torch.tensor([v], dtype=torch.float64) for k, v in values.items()})


def test_output_points_go_through_crop_zoom_rotate_flip_warp_in_that_order():
    draw = dataclasses.replace(
        one_draw(
            crop_side=0.8,
            crop_col=0.9,
            crop_row=0.2,
            zoom=1.1,
            zoom_col=0.3,
            zoom_row=0.7,
            degrees=20.0,
            warp_x=0.1,
            warp_y=-0.15,
        ),
        flip=torch.tensor([True]),
    )
    points = torch.tensor([[[0.3, -0.6], [-1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    steps = [
        crop_matrix(draw.crop_side, draw.crop_col, draw.crop_row),
        zoom_matrix(draw.zoom, draw.zoom_col, draw.zoom_row),
        rotate_matrix(draw.degrees),
        flip_matrix(draw.flip),
        perspective_matrix(warp_coeffs(draw.warp_x, draw.warp_y)),
    ]
    expected = points
    for step in steps:
        expected = transform_points(expected, step)
    torch.testing.assert_close(transform_points(points, batch_transform(draw)), expected)


def test_the_crop_is_taken_from_the_rotated_image():
    # Crop of side 0.5 centred at (0.5, 0), then 90 degrees: the output centre samples R(0.5, 0) = (0, 0.5),
    # i.e. input row 6, column 4 of 9 (taking the crop after rotating, as fastai's pipeline does).
    matrix = batch_transform(one_draw(crop_side=0.5, crop_col=1.0, crop_row=0.5, degrees=90.0))
    out = warp_image(dot_image(9, row=6, col=4), matrix, size=9)
    assert out[0, 0, 4, 4] == pytest.approx(255, abs=1e-2)


def test_lighting_neutral_values_change_nothing():
    images = torch.rand(2, 3, 5, 5, generator=generator())
    out = adjust_lighting(images, brightness=torch.full((2,), 0.5), contrast=torch.ones(2))
    torch.testing.assert_close(out, images, rtol=0, atol=1e-6)


def test_lighting_follows_the_logit_formula():
    images = torch.full((1, 3, 4, 4), 0.3)
    out = adjust_lighting(images, brightness=torch.tensor([0.6]), contrast=torch.tensor([1.5]))
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = 1 / (1 + math.exp(-(logit(0.3) + logit(0.6)) * 1.5))
    torch.testing.assert_close(out, torch.full_like(images, expected))


def test_train_batch_applies_the_drawn_lighting_per_image():
    images = torch.full((8, 3, 6, 6), 77, dtype=torch.uint8)
    only_lighting = fastai_augment(flip=False, p_affine=0.0, min_scale=1.0, max_lighting=0.2, p_lighting=1.0)
    out = train_batch(images, size=6, params=only_lighting, generator=generator(3))
    draw = draw_batch(8, params=only_lighting, generator=generator(3))
    logit = torch.logit(torch.tensor(77 / 255, dtype=torch.float64))
    unit = torch.sigmoid((logit + torch.logit(draw.brightness)) * draw.contrast).float()
    torch.testing.assert_close(out, normalize(unit.view(8, 1, 1, 1).expand(8, 3, 6, 6)), rtol=0, atol=1e-5)
    assert len(set(out[:, 0, 0, 0].tolist())) == 8  # each image its own brightness/contrast


def test_draws_respect_ranges_and_probabilities():
    params = fastai_augment()
    draw = draw_batch(4000, params=params, generator=generator())
    rotated, zoomed, warped = draw.degrees != 0, draw.zoom != 1, draw.warp_x != 0
    for applied in (rotated, zoomed, warped, draw.brightness != 0.5, draw.contrast != 1):
        assert applied.double().mean().item() == pytest.approx(0.75, abs=0.03)
    assert draw.flip.double().mean().item() == pytest.approx(0.5, abs=0.03)
    assert draw.degrees.abs().max() <= 10 and draw.degrees.abs().max() > 9
    assert draw.zoom.min() >= 1 and draw.zoom.max() <= 1.1
    assert draw.warp_x.abs().max() <= 0.2 and draw.warp_y.abs().max() <= 0.2
    assert draw.crop_side.min() >= math.sqrt(0.75) - 1e-12 and draw.crop_side.max() <= 1
    assert draw.brightness.min() >= 0.4 and draw.brightness.max() <= 0.6
    assert draw.contrast.min() >= 0.8 - 1e-12 and draw.contrast.max() <= 1.25 + 1e-12
    assert not draw_batch(100, params=fastai_augment(flip=False), generator=generator()).flip.any()


def test_one_resample_per_batch(monkeypatch):
    calls = {"grid_sample": 0, "interpolate": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(F, "grid_sample", counting("grid_sample", F.grid_sample))
    monkeypatch.setattr(F, "interpolate", counting("interpolate", F.interpolate))
    images = random_images(side=16)
    train_batch(images, size=8, params=fastai_augment(), generator=generator())
    assert calls == {"grid_sample": 1, "interpolate": 0}
    valid_batch(images, size=8)
    assert calls == {"grid_sample": 2, "interpolate": 0}


def test_same_seed_same_batch_other_seed_other_batch():
    images = random_images(side=16)
    first = train_batch(images, size=8, params=fastai_augment(), generator=generator(1))
    assert torch.equal(first, train_batch(images, size=8, params=fastai_augment(), generator=generator(1)))
    assert not torch.allclose(first, train_batch(images, size=8, params=fastai_augment(), generator=generator(2)))


def test_output_shape_dtype_and_input_types():
    images = random_images(batch=3, side=21)
    out = train_batch(images, size=13, params=fastai_augment(), generator=generator())
    assert out.shape == (3, 3, 13, 13) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isfinite(out).all()
    as_float = train_batch(images.float(), size=13, params=fastai_augment(), generator=generator())
    torch.testing.assert_close(as_float, out)
    assert valid_batch(images, size=13).shape == (3, 3, 13, 13)


def test_the_settings_are_validated_as_the_params_files_augment_section():
    """One definition (config.AugmentConfig): the library trusts what it validated."""
    with pytest.raises(ValueError, match=r"min_scale\n.*greater than 0"):
        fastai_augment(min_scale=0.0)
    with pytest.raises(ValueError, match=r"p_affine\n.*less than or equal to 1"):
        fastai_augment(p_affine=1.5)
    with pytest.raises(ValueError, match="max_zoom.*must be >= train.augment.min_zoom"):
        fastai_augment(min_zoom=1.2, max_zoom=1.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_seed():
    images = random_images(batch=8, side=40)
    cpu = train_batch(images, size=24, params=fastai_augment(), generator=generator(5))
    cuda = train_batch(images.cuda(), size=24, params=fastai_augment(), generator=generator(5))
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-3)
    torch.testing.assert_close(
        valid_batch(images.cuda(), size=24).cpu(), valid_batch(images, size=24), rtol=0, atol=1e-4
    )
