"""Transforms keep boxes, masks and keypoints consistent (pixel i covers [i, i+1))."""

import math

import numpy as np
import pytest
import torch

from mrcnn_edu.data.shapes import KEYPOINT_FLIP_MAP, KEYPOINT_NAMES
from mrcnn_edu.data.transforms import (Compose, RandomHorizontalFlip, RandomResize, batch_images,
                                       hflip, normalize, resize)


def _mask_box(mask: torch.Tensor) -> list[float]:
    """Tight box of a mask's pixels under [i, i+1): brute force over rows and columns."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _example(h=40, w=60):
    torch.manual_seed(0)
    masks = torch.zeros((2, h, w), dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:38, 41:44] = 1  # a thin bar
    kps = torch.zeros((2, 17, 3))
    kps[0, :, 0] = torch.linspace(11, 29, 17)
    kps[0, :, 1] = torch.linspace(6, 14, 17)
    kps[0, :, 2] = 2
    kps[0, 3] = 0  # an unlabelled keypoint
    target = {"boxes": torch.tensor([_mask_box(m) for m in masks], dtype=torch.float32),
              "masks": masks, "keypoints": kps, "labels": torch.tensor([1, 2]),
              "area": masks.flatten(1).sum(1).float()}
    return torch.rand(3, h, w), target


def test_flipping_twice_is_the_identity():
    image, target = _example()
    image2, target2 = hflip(*hflip(image, target, KEYPOINT_FLIP_MAP), KEYPOINT_FLIP_MAP)
    assert torch.equal(image2, image)
    for key in ("boxes", "masks", "keypoints", "labels", "area"):
        assert torch.equal(target2[key], target[key])


def test_flip_maps_box_edges_and_keypoints_by_w_minus_x():
    image, target = _example()
    _, flipped = hflip(image, target, KEYPOINT_FLIP_MAP)
    assert flipped["boxes"][0].tolist() == [60 - 30, 5, 60 - 10, 15]  # x1' = W - x2
    for mask, box in zip(flipped["masks"], flipped["boxes"]):
        assert _mask_box(mask) == box.tolist()  # the flipped box is the flipped mask's box
    right_eye, left_eye = KEYPOINT_NAMES.index("right_eye"), KEYPOINT_NAMES.index("left_eye")
    assert flipped["keypoints"][0, right_eye].tolist() == [60 - target["keypoints"][0, left_eye, 0].item(),
                                                           target["keypoints"][0, left_eye, 1].item(), 2]
    # the unlabelled left ear (v = 0) stays (0, 0, 0) and becomes the right ear
    assert flipped["keypoints"][0, KEYPOINT_NAMES.index("right_ear")].tolist() == [0, 0, 0]


def test_keypoint_flip_swaps_left_and_right_names():
    for i, j in enumerate(KEYPOINT_FLIP_MAP):
        a, b = KEYPOINT_NAMES[i], KEYPOINT_NAMES[j]
        assert a.replace("left", "LR").replace("right", "LR") == b.replace("left", "LR").replace("right", "LR")
        assert (a == b) == ("left" not in a and "right" not in a)
    pairs = [(i, j) for i, j in enumerate(KEYPOINT_FLIP_MAP) if i < j]
    image, target = _example()
    assert torch.equal(hflip(image, target, pairs)[1]["keypoints"],
                       hflip(image, target, KEYPOINT_FLIP_MAP)[1]["keypoints"])
    numpy_pairs = [tuple(np.array(pair)) for pair in pairs]  # np.int64 entries, as a map read from an array
    assert torch.equal(hflip(image, target, numpy_pairs)[1]["keypoints"],
                       hflip(image, target, KEYPOINT_FLIP_MAP)[1]["keypoints"])


def test_flipping_keypoints_without_a_flip_map_is_an_error_not_a_silent_identity():
    image, target = _example()
    with pytest.raises(ValueError, match="flip_map"):
        hflip(image, target)
    with pytest.raises(ValueError, match="permutation"):
        hflip(image, target, [])
    no_keypoints = {k: v for k, v in target.items() if k != "keypoints"}
    assert torch.equal(hflip(image, no_keypoints)[1]["boxes"], hflip(image, target, KEYPOINT_FLIP_MAP)[1]["boxes"])
    identity = hflip(image, target, list(range(17)))[1]["keypoints"]  # an explicit identity is allowed
    assert torch.equal(identity[..., 1], target["keypoints"][..., 1])


@pytest.mark.parametrize("flip_map", [[(1, 2), (2, 3)],  # type 2 in two pairs: would duplicate type 3
                                      [(1, 17)], [(1,)],  # out of range; not a pair
                                      [1, 2, 0] + list(range(3, 17))])  # a cycle: flipping twice is no identity
def test_a_flip_map_that_does_not_undo_itself_is_refused(flip_map):
    image, target = _example()
    with pytest.raises(ValueError, match="flip_map"):
        hflip(image, target, flip_map)


def test_flip_agrees_with_torchvision_on_boxes():
    F = pytest.importorskip("torchvision.transforms.v2.functional")
    tv_tensors = pytest.importorskip("torchvision.tv_tensors")
    image, target = _example()
    theirs = F.horizontal_flip(tv_tensors.BoundingBoxes(target["boxes"], format="XYXY",
                                                        canvas_size=(40, 60)))
    assert torch.equal(hflip(image, target, KEYPOINT_FLIP_MAP)[1]["boxes"], theirs.as_subclass(torch.Tensor))


def test_resize_is_a_similarity_on_pixel_centres():
    # a ramp whose pixel i holds its centre coordinate i + 0.5; after resizing by s, pixel j
    # must hold (j + 0.5) / s: the point x maps to s * x, which is how boxes/keypoints move
    h, w = 30, 50
    ramp = (torch.arange(w, dtype=torch.float64) + 0.5).expand(3, h, w)
    out, _, s = resize(ramp, None, min_size=48, max_size=1000)
    assert out.shape[-2:] == (48, math.floor(50 * s)) and s == pytest.approx(48 / 30, rel=1e-6)
    interior = slice(2, out.shape[-1] - 2)  # bilinear clamps at the borders
    expected = (torch.arange(out.shape[-1], dtype=torch.float64) + 0.5) / s
    torch.testing.assert_close(out[0, 0, interior], expected[interior], rtol=0, atol=1e-9)


def test_resize_scales_the_shorter_side_and_caps_the_longer():
    image, target = _example(40, 60)
    out, target2, s = resize(image, target, min_size=80, max_size=1000)
    assert out.shape == (3, 80, 120)
    out, _, s2 = resize(image, None, min_size=80, max_size=90)  # 60 * 2 > 90: the cap wins
    assert out.shape == (3, 60, 90) and s2 == pytest.approx(1.5, rel=1e-6)
    torch.testing.assert_close(target2["boxes"], target["boxes"] * s)
    torch.testing.assert_close(target2["keypoints"][..., :2], target["keypoints"][..., :2] * s)
    assert target2["keypoints"][0, 3].tolist() == [0, 0, 0]
    torch.testing.assert_close(target2["area"], target["area"] * s**2)


@pytest.mark.parametrize("min_size", [23, 57, 80, 101])
def test_resized_masks_stay_within_half_a_pixel_of_the_resized_boxes(min_size):
    # nearest-exact: output pixel j takes input floor((j + 0.5) / s), so a mask edge at x lands
    # at ceil(s * x - 0.5): within half an output pixel of the box edge s * x
    image, target = _example(40, 60)
    _, out, s = resize(image, target, min_size=min_size, max_size=10_000)
    assert out["masks"].dtype == torch.uint8 and out["masks"].shape[-2:] == (min_size, math.floor(60 * s))
    for mask, box in zip(out["masks"], out["boxes"]):
        assert (torch.tensor(_mask_box(mask)) - box).abs().max() <= 0.5 + 1e-4
    # bool masks (a caller's own targets; torch has no nearest kernel for bool): the same pixels
    _, as_bool, _ = resize(image, {**target, "masks": target["masks"].bool()}, min_size=min_size, max_size=10_000)
    assert as_bool["masks"].dtype == torch.bool and torch.equal(as_bool["masks"], out["masks"].bool())


def test_batch_pads_to_a_multiple_of_32_with_zeros():
    images = [torch.rand(3, 40, 70), torch.rand(3, 65, 33)]
    batch, sizes = batch_images(images)
    assert batch.shape == (2, 3, 96, 96) and sizes == [(40, 70), (65, 33)]
    for im, out in zip(images, batch):
        assert torch.equal(out[:, :im.shape[1], :im.shape[2]], im)
        assert out.sum() == im.sum()  # everything else is zero padding
    with pytest.raises(ValueError, match="images"):
        batch_images([])


def test_normalize_per_channel():
    image = torch.full((3, 2, 2), 0.5)
    out = normalize(image, mean=(0.5, 0.25, 0.0), std=(1.0, 0.5, 0.25))
    assert out[:, 0, 0].tolist() == [0.0, 0.5, 2.0]


def test_random_transforms_compose_and_respect_their_choices():
    image, target = _example()
    torch.manual_seed(0)
    always = Compose([RandomHorizontalFlip(1.0, KEYPOINT_FLIP_MAP), RandomResize((20, 30), 1000)])
    heights = set()
    for _ in range(20):
        out, t = always(image, target)
        heights.add(out.shape[1])
        s = out.shape[1] / 40
        flipped = hflip(image, target, KEYPOINT_FLIP_MAP)[1]
        torch.testing.assert_close(t["boxes"], flipped["boxes"] * s, rtol=1e-5, atol=1e-4)
    assert heights == {20, 30}
    out, t = RandomHorizontalFlip(0.0)(image, target)
    assert out is image and t is target


def _images_and_targets():
    """Six images in two sizes, one without objects: groups of equal size in preprocess."""
    out = []
    for i, (h, w) in enumerate([(40, 60), (50, 50), (40, 60), (40, 60), (50, 50), (40, 60)]):
        image, target = _example(h, w)
        image = image + i  # tell the images apart
        if i == 3:  # no objects
            target = {"boxes": torch.zeros((0, 4)), "masks": torch.zeros((0, h, w), dtype=torch.uint8),
                      "keypoints": torch.zeros((0, 17, 3)), "labels": torch.zeros(0, dtype=torch.int64),
                      "area": torch.zeros(0)}
        out.append((image, target))
    return [im for im, _ in out], [t for _, t in out]


@pytest.mark.parametrize("resize_mode", ["exact", "torchvision"])
@pytest.mark.parametrize("training", [True, False])
def test_preprocess_on_the_batch_equals_image_by_image(resize_mode, training):
    """MaskRCNN.preprocess resizes same-sized images together; each comes out as alone."""
    from mrcnn_edu.config import mini_c4
    from mrcnn_edu.data.transforms import resize_like_torchvision
    from mrcnn_edu.model import MaskRCNN

    cfg = mini_c4(num_classes=3, image_size=64)
    cfg.transform.min_size_train = (48, 64, 80)  # several scales: groups split by the draw too
    cfg.transform.resize_mode = resize_mode
    model = MaskRCNN(cfg).train(training)
    images, targets = _images_and_targets()

    torch.manual_seed(3)
    batch, sizes, out_targets, scales = model.preprocess(images, targets)

    torch.manual_seed(3)  # the same draws, one image at a time: the pre-batching code
    t = cfg.transform
    resize_fn = resize_like_torchvision if resize_mode == "torchvision" else resize
    expected_images, expected_targets, expected_scales = [], [], []
    for image, target in zip(images, targets):
        min_size = t.min_size_train[int(torch.randint(len(t.min_size_train), ()))] if training else t.min_size_test
        image, target, scale = resize_fn(normalize(image, t.pixel_mean, t.pixel_std), target, min_size, t.max_size)
        expected_images.append(image)
        expected_targets.append(target)
        expected_scales.append(scale)
    expected_batch, expected_sizes = batch_images(expected_images, t.size_divisible)

    assert len(set(expected_scales)) > 1 or not training
    assert sizes == expected_sizes and scales == expected_scales
    assert torch.equal(batch, expected_batch)
    for got, want in zip(out_targets, expected_targets):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_jitter_draws_from_each_images_seed_or_else_from_the_global_generator_as_before():
    from mrcnn_edu.data.transforms import draw_min_sizes

    choices = (48, 64, 80, 96)
    # no seeds (a caller's own model(images, targets)): the global generator, one draw per image,
    # exactly the draws of the code before per-sample seeds, which leaves it in the same state
    torch.manual_seed(3)
    expected = [choices[c] for c in torch.randint(len(choices), (6,)).tolist()]
    after = torch.rand(1)
    torch.manual_seed(3)
    assert draw_min_sizes(choices, [None] * 6) == expected and torch.equal(torch.rand(1), after)
    # a single size: no choice, but the same global draws still happen (results trained
    # before per-sample seeds depend on the RoI sampling that comes after them)
    torch.manual_seed(3)
    assert draw_min_sizes((64,), [11, None, 12]) == [64] * 3
    state_after_draw = torch.get_rng_state()
    torch.manual_seed(3)
    torch.randint(1, (3,))  # the old code's draw
    assert torch.equal(state_after_draw, torch.get_rng_state())
    # seeded images: their own draw, whatever the global state, batch or position
    seeds = list(range(100, 140))
    torch.manual_seed(0)
    together = draw_min_sizes(choices, seeds)
    torch.manual_seed(1)
    alone = [draw_min_sizes(choices, [seed])[0] for seed in reversed(seeds)][::-1]
    assert together == alone and len(set(together)) > 1
    mixed = draw_min_sizes(choices, [seeds[0], None, seeds[1]])
    assert (mixed[0], mixed[2]) == (together[0], together[1])


def test_resize_images_raises_on_a_target_missing_a_key_the_others_have():
    from mrcnn_edu.data.transforms import resize_images

    (image, target), (_, other) = _example(), _example()
    del other["masks"]
    with pytest.raises(ValueError, match=r"targets \[1\] have no 'masks'"):
        resize_images(torch.stack([image, image]), [target, other], 80, 1000)


def test_batch_images_stacks_without_padding_when_sizes_divide():
    images = [torch.rand(3, 64, 96) for _ in range(3)]
    batch, sizes = batch_images(images, 32)
    assert batch.shape == (3, 3, 64, 96) and sizes == [(64, 96)] * 3
    assert all(torch.equal(b, im) for b, im in zip(batch, images))
