"""Tests for mrcnn_edu.backbone: ResNet / ResNeXt bodies, frozen BN, C4 / C5 / FPN set-ups.

References: published parameter counts, hand arithmetic for strides, explicit formulas for
frozen BN and the FPN top-down pathway, and torchvision (when importable) as an independent
oracle for ImageNet-layout loading and ResNet-FPN outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mrcnn_edu.backbone import (BackboneConfig, FPN, FPNBackbone, FrozenBatchNorm2d, ResNet,
                                ResNetConfig, build_backbone, group_norm_groups,
                                load_imagenet_state_dict, load_torchvision_fpn_state_dict,
                                make_norm, make_res5_head, mini_resnet, resnet50, resnet101,
                                resnext101_32x8d, split_imagenet_state_dict,
                                torchvision_fpn_key_map)

ODD_AND_EVEN_SIZES = [(64, 96), (67, 101)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_norm_statistics_(model: nn.Module, seed: int) -> None:
    """Give every BN / frozen BN non-trivial statistics, so loading them is actually tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def ceil_halvings(side: int, times: int) -> int:
    """Side length after ``times`` stride-2 layers with 'same' padding: each rounds up."""
    for _ in range(times):
        side = (side + 1) // 2
    return side


def reference_mini_resnet(seed: int = 0, **overrides) -> ResNet:
    """A live-BN miniature with a classifier: its state dict has torchvision's key layout."""
    torch.manual_seed(seed)
    settings = dict(width=8, blocks=(1, 2, 1, 1), norm="bn", num_classes=10)
    settings.update(overrides)
    model = ResNet(mini_resnet(**settings))
    randomize_norm_statistics_(model, seed + 1)
    return model.eval()


# --- Parameter counts and key layout ---------------------------------------------------------

@pytest.mark.parametrize("preset, published", [
    (resnet50, 25_557_032),  # torchvision's ResNet-50; "25.6 M"
    (resnet101, 44_549_160),  # torchvision's ResNet-101; "44.5 M"
    (resnext101_32x8d, 88_791_336),  # torchvision's ResNeXt-101 32x8d
])
def test_resnet_parameter_counts_equal_the_published_ones(preset, published):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        live_bn = ResNet(preset(norm="bn", num_classes=1000, freeze_at=0))
        frozen_bn = ResNet(preset(num_classes=1000))
    assert count_parameters(live_bn) == published
    # Frozen BN keeps gain / shift as buffers: same total, none of it trainable.
    frozen_affine = sum(b.numel() for name, b in frozen_bn.named_buffers()
                        if name.endswith((".weight", ".bias")))
    assert count_parameters(frozen_bn) + frozen_affine == published
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen_bn.modules())


def test_state_dict_keys_follow_torchvision_resnet_layout():
    with torch.device("meta"):
        keys = set(ResNet(resnet50(norm="bn", num_classes=1000, freeze_at=0)).state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_mean", "layer2.3.bn3.num_batches_tracked",
                "layer3.5.conv2.weight", "layer4.2.conv3.weight", "fc.weight", "fc.bias"):
        assert key in keys


def test_state_dict_keys_equal_torchvision_resnet50_keys():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours = set(ResNet(resnet50(norm="bn", num_classes=1000, freeze_at=0)).state_dict())
        assert ours == set(torchvision.models.resnet50(weights=None).state_dict())


# --- Frozen batch norm -----------------------------------------------------------------------

def test_frozen_batch_norm_is_batch_norm_with_fixed_statistics():
    bn = nn.BatchNorm2d(6)
    randomize_norm_statistics_(bn, seed=3)
    bn.eval()
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is dropped, not missing
    x = torch.randn(2, 6, 5, 7)
    by_formula = ((x - bn.running_mean.view(1, -1, 1, 1))
                  / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5)
                  * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(frozen(x), by_formula, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frozen(x), bn(x).detach(), rtol=1e-6, atol=1e-6)
    assert frozen.eps == 1e-5 and list(frozen.parameters()) == []
    x.requires_grad_(True)
    frozen(x).sum().backward()  # gradient reaches the input through the fixed affine map
    scale = bn.weight / torch.sqrt(bn.running_var + 1e-5)
    torch.testing.assert_close(x.grad, scale.detach().view(1, -1, 1, 1).expand_as(x))


def test_bn_eps_reaches_every_batch_norm_of_body_and_res5_head():
    # 0 for weights converted from Detectron (torchvision's COCO_V1 detectors), 1e-5 otherwise
    for norm, kind in (("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d)):
        cfg = mini_resnet(norm=norm, bn_eps=0.0, freeze_at=0)
        modules = [*ResNet(cfg).modules(), *make_res5_head(cfg).modules()]
        eps = {m.eps for m in modules if isinstance(m, kind)}
        assert eps == {0.0}, (norm, eps)
    assert {m.eps for m in ResNet(mini_resnet(norm="frozen_bn", freeze_at=0)).modules()
            if isinstance(m, FrozenBatchNorm2d)} == {1e-5}
    with pytest.raises(ValueError, match="bn_eps must be in"):
        mini_resnet(bn_eps=-1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_frozen_batch_norm_keeps_the_activations_dtype(dtype):
    # under autocast a conv hands it bf16 / fp16: fp32 buffers must not promote what follows
    bn = nn.BatchNorm2d(4)
    randomize_norm_statistics_(bn, seed=5)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 4, 3, 3)
    out = frozen(x.to(dtype))
    assert out.dtype == dtype
    # the same map, to the input dtype's precision (bf16: 8 bits of mantissa)
    tolerance = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(out.double(), bn.eval()(x).detach().double(), rtol=tolerance, atol=tolerance)


def test_group_norm_uses_32_groups_or_the_largest_divisor_for_narrow_layers():
    assert [group_norm_groups(c) for c in (256, 64, 48, 40, 16, 7)] == [32, 32, 24, 20, 16, 7]
    gn = make_norm("gn", 48)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 24
    with pytest.raises(ValueError, match="norm"):
        make_norm("layer_norm", 8)


# --- Strides, shapes and the three feature set-ups -------------------------------------------

@pytest.mark.parametrize("height, width", ODD_AND_EVEN_SIZES)
def test_c2_to_c5_have_strides_4_to_32_rounding_up(height, width):
    torch.manual_seed(0)
    model = ResNet(mini_resnet(width=8))
    features = model(torch.randn(2, 3, height, width))
    assert list(features) == ["c2", "c3", "c4", "c5"]
    for stage, name in enumerate(features, start=2):
        expected = (2, 32 * 2 ** (stage - 2), ceil_halvings(height, stage),
                    ceil_halvings(width, stage))
        assert tuple(features[name].shape) == expected
        assert model.strides[name] == 2 ** stage and model.out_channels[name] == expected[1]


@pytest.mark.parametrize("height, width", ODD_AND_EVEN_SIZES)
@pytest.mark.parametrize("features, names, strides, standard_channels", [
    ("C4", ["c4"], [16], 1024),
    ("C5", ["c5"], [32], 2048),
    ("FPN", ["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64], 256),
])
def test_feature_setups_return_their_levels_at_their_strides(features, names, strides,
                                                             standard_channels, height, width):
    images = torch.randn(1, 3, height, width)
    with torch.device("meta"):  # ResNet-50 shape propagation without arithmetic
        standard = build_backbone(BackboneConfig(resnet=resnet50(), features=features))
        standard_out = standard(images.to("meta"))
    torch.manual_seed(0)
    mini = build_backbone(BackboneConfig(resnet=mini_resnet(width=8), features=features,
                                         fpn_channels=16, fpn_norm="gn"))
    mini_out = mini(images)
    for backbone, out, channels in ((standard, standard_out, standard_channels),
                                    (mini, mini_out, 16 if features == "FPN" else
                                     standard_channels // 8)):
        assert backbone.feature_names == names and list(out) == names
        assert backbone.out_channels == channels
        assert [backbone.strides[n] for n in names] == strides
        for name, stride in zip(names, strides):
            halvings = int(math.log2(stride))
            assert tuple(out[name].shape) == (1, channels, ceil_halvings(height, halvings),
                                              ceil_halvings(width, halvings))


def test_res5_head_maps_14x14_rois_to_7x7_with_2048_channels():
    with torch.device("meta"):
        head = make_res5_head(resnet50())
        assert tuple(head(torch.empty(5, 1024, 14, 14)).shape) == (5, 2048, 7, 7)
        # The Figure 4 caption's variant: 7x7 RoIs, stride 1.
        paper_variant = make_res5_head(resnet50(), first_stride=1)
        assert tuple(paper_variant(torch.empty(5, 1024, 7, 7)).shape) == (5, 2048, 7, 7)
    assert head.out_channels == 2048 and len(head) == 3  # res5 of ResNet-50: 3 blocks, 9 layers


def test_stride_sits_on_the_3x3_conv_unless_stride_in_1x1():
    v15 = ResNet(mini_resnet(width=8))
    msra = ResNet(mini_resnet(width=8, stride_in_1x1=True))
    for stage in ("layer2", "layer3", "layer4"):
        first_v15, first_msra = getattr(v15, stage)[0], getattr(msra, stage)[0]
        assert (first_v15.conv1.stride, first_v15.conv2.stride) == ((1, 1), (2, 2))
        assert (first_msra.conv1.stride, first_msra.conv2.stride) == ((2, 2), (1, 1))
    images = torch.randn(1, 3, 67, 101)
    assert ({k: v.shape for k, v in v15(images).items()}
            == {k: v.shape for k, v in msra(images).items()})


def test_resnext_uses_32_groups_of_width_8_in_its_3x3_convs():
    with torch.device("meta"):
        model = ResNet(resnext101_32x8d())
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    for i, width in zip(range(1, 5), (256, 512, 1024, 2048)):
        conv2 = getattr(model, f"layer{i}")[0].conv2
        assert conv2.groups == 32 and conv2.in_channels == conv2.out_channels == width


# --- Freezing --------------------------------------------------------------------------------

@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at_freezes_stem_then_stages_as_detectron(freeze_at):
    torch.manual_seed(0)
    model = ResNet(mini_resnet(width=8, norm="bn", freeze_at=freeze_at))
    groups = [("conv1", "bn1")] + [(f"layer{i}",) for i in range(1, 5)]
    for index, names in enumerate(groups, start=1):
        modules = [getattr(model, n) for n in names]
        frozen = index <= freeze_at
        assert all(p.requires_grad != frozen for m in modules for p in m.parameters())
        has_live_bn = any(isinstance(s, nn.BatchNorm2d) for m in modules for s in m.modules())
        assert has_live_bn != frozen  # frozen stages' BN become FrozenBatchNorm2d
    # In train mode a frozen stage's statistics stay put; a trainable one's move.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()(torch.randn(2, 3, 32, 32))
    after = model.state_dict()
    assert torch.equal(before["layer1.0.bn1.running_mean"],
                       after["layer1.0.bn1.running_mean"]) == (freeze_at >= 2)


def test_mini_resnet_trains_from_scratch_with_group_norm():
    torch.manual_seed(0)
    model = ResNet(mini_resnet(width=8, blocks=(1, 2, 1, 1), zero_init_residual=True))
    assert model.cfg.freeze_at == 0 and model.layer1[0].bn3.weight.abs().sum() == 0
    assert all(m.num_channels % m.num_groups == 0
               for m in model.modules() if isinstance(m, nn.GroupNorm))
    sum(f.square().mean() for f in model(torch.randn(2, 3, 40, 56)).values()).backward()
    assert all(p.grad is not None for p in model.parameters())


# --- Loading an ImageNet state dict (torchvision key layout), no torchvision needed ----------

def test_loaded_imagenet_state_dict_reproduces_c2_to_c5_and_logits():
    reference = reference_mini_resnet()
    state_dict = {"module." + k: v for k, v in reference.state_dict().items()}  # as saved by DDP
    ours = ResNet(mini_resnet(width=8, blocks=(1, 2, 1, 1), norm="frozen_bn", freeze_at=2,
                              num_classes=10))
    report = load_imagenet_state_dict(ours, state_dict)
    assert report.missing == [] and report.unexpected == []
    assert all(k.endswith("num_batches_tracked") for k in report.ignored)
    images = torch.randn(2, 3, 67, 101)
    with torch.no_grad():
        expected, got = reference(images), ours(images)
        for name in ("c2", "c3", "c4", "c5"):
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.classify(images), reference.classify(images),
                                   rtol=1e-5, atol=1e-5)


def test_c4_body_and_res5_head_split_an_imagenet_state_dict():
    reference = reference_mini_resnet(seed=4)
    body_part, res5_part = split_imagenet_state_dict(reference.state_dict())
    assert all(k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")) for k in body_part)
    assert set(res5_part) == {k[len("layer4."):] for k in reference.state_dict()
                              if k.startswith("layer4.")}
    cfg = mini_resnet(width=8, blocks=(1, 2, 1, 1), norm="frozen_bn")
    body, head = ResNet(cfg, last_stage=4), make_res5_head(cfg)
    report = load_imagenet_state_dict(body, reference.state_dict(), res5_head=head)
    assert report.missing == [] and report.unexpected == []
    assert {"fc.weight", "fc.bias"} <= set(report.ignored)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = reference(images)
        c4 = body(images)["c4"]
        torch.testing.assert_close(c4, expected["c4"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(c4), expected["c5"], rtol=1e-5, atol=1e-5)
    # Without a head, res5 weights are ignored on purpose rather than unexpected.
    report = load_imagenet_state_dict(ResNet(cfg, last_stage=4), reference.state_dict())
    assert report.unexpected == [] and "layer4.0.conv1.weight" in report.ignored
    report = load_imagenet_state_dict(ResNet(cfg, last_stage=3), reference.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert {"layer3.0.conv1.weight", "layer4.0.conv1.weight"} <= set(report.ignored)


def test_state_dict_with_a_wrong_shape_raises_naming_the_key_and_loads_nothing():
    state_dict = dict(reference_mini_resnet().state_dict())
    state_dict["layer2.0.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    ours = ResNet(mini_resnet(width=8, blocks=(1, 2, 1, 1), norm="frozen_bn", num_classes=10))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight: \(3, 3, 3, 3\) in the state dict, "
                                         r"\(16, 16, 3, 3\) in the ResNet body"):
        load_imagenet_state_dict(ours, state_dict)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


def test_strict_loading_names_missing_and_unexpected_keys():
    state_dict = dict(reference_mini_resnet().state_dict())
    del state_dict["layer3.0.bn2.running_var"]
    state_dict["layer3.0.extra.weight"] = torch.zeros(1)
    ours = ResNet(mini_resnet(width=8, blocks=(1, 2, 1, 1), norm="frozen_bn", num_classes=10))
    with pytest.raises(ValueError, match=r"missing keys \[layer3\.0\.bn2\.running_var\].*"
                                         r"unexpected keys \[layer3\.0\.extra\.weight\]"):
        load_imagenet_state_dict(ours, state_dict)
    report = load_imagenet_state_dict(ours, state_dict, strict=False)
    assert report.missing == ["layer3.0.bn2.running_var"]
    assert report.unexpected == ["layer3.0.extra.weight"]
    torch.testing.assert_close(ours.layer3[0].bn2.running_mean,
                               state_dict["layer3.0.bn2.running_mean"])


# --- FPN -------------------------------------------------------------------------------------

def test_fpn_top_down_pathway_adds_nearest_upsampled_coarser_levels():
    d = 3
    fpn = FPN([d] * 4, out_channels=d)
    with torch.no_grad():  # make every conv the identity, leaving only the pathway's sums
        for lateral, output in zip(fpn.lateral_convs, fpn.output_convs):
            lateral[0].weight.copy_(torch.eye(d).view(d, d, 1, 1))
            output[0].weight.zero_()
            output[0].weight[:, :, 1, 1] = torch.eye(d)
    c2, c3, c4, c5 = (torch.randn(1, d, 2 * s, 3 * s) for s in (8, 4, 2, 1))

    def up2(t):
        return t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    t5 = c5
    t4 = c4 + up2(t5)
    t3 = c3 + up2(t4)
    t2 = c2 + up2(t3)
    for got, expected in zip(fpn([c2, c3, c4, c5]), (t2, t3, t4, t5)):
        torch.testing.assert_close(got, expected)


def test_p6_is_stride_two_subsampling_of_p5():
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(resnet=mini_resnet(width=8), fpn_channels=16))
    out = backbone(torch.randn(1, 3, 96, 160))  # P5 is 3x5: odd sides keep their last row/col
    torch.testing.assert_close(out["p6"], out["p5"][:, :, ::2, ::2], rtol=0, atol=0)


def test_fpn_convs_have_bias_no_norm_and_kaiming_uniform_a1_init():
    torch.manual_seed(0)
    fpn = FPN([256, 512, 1024, 2048])
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in fpn.modules())
    for conv in [seq[0] for seq in (*fpn.lateral_convs, *fpn.output_convs)]:
        bound = math.sqrt(3.0 / (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]))
        assert torch.all(conv.bias == 0)
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.99 * bound
    gn_fpn = FPN([32, 64], out_channels=16, norm="gn")
    assert all(seq[0].bias is None and isinstance(seq[1], nn.GroupNorm)
               for seq in (*gn_fpn.lateral_convs, *gn_fpn.output_convs))


def test_torchvision_fpn_key_map_renames_old_and_new_layouts():
    mapping = torchvision_fpn_key_map([
        "backbone.body.layer3.2.bn1.running_mean", "backbone.fpn.inner_blocks.0.0.weight",
        "backbone.fpn.layer_blocks.3.0.bias", "backbone.fpn.inner_blocks.2.weight",
        "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight"])
    assert mapping == {
        "backbone.body.layer3.2.bn1.running_mean": "body.layer3.2.bn1.running_mean",
        "backbone.fpn.inner_blocks.0.0.weight": "fpn.lateral_convs.0.0.weight",
        "backbone.fpn.layer_blocks.3.0.bias": "fpn.output_convs.3.0.bias",
        "backbone.fpn.inner_blocks.2.weight": "fpn.lateral_convs.2.0.weight"}


# --- torchvision as an independent oracle ----------------------------------------------------

def assert_same_c2_to_c5(ours: nn.Module, reference: nn.Module, images: torch.Tensor) -> None:
    """Our body's c2..c5 against a torchvision ResNet's stem and layer1..layer4, stage by stage."""
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        got = ours(images)
        for stage in range(2, 6):
            x = getattr(reference, f"layer{stage - 1}")(x)
            torch.testing.assert_close(got[f"c{stage}"], x, rtol=1e-5, atol=1e-5)


def test_imagenet_resnet50_from_torchvision_gives_the_same_c2_to_c5():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    randomize_norm_statistics_(reference, seed=1)
    reference.eval()
    ours = ResNet(resnet50())  # frozen BN, no classifier: fc.* is ignored
    report = load_imagenet_state_dict(ours, reference.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert set(report.ignored) >= {"fc.weight", "fc.bias"}
    images = torch.randn(1, 3, 67, 101)
    assert_same_c2_to_c5(ours, reference, images)


def test_torchvision_resnet50_fpn_backbone_gives_the_same_p2_to_p6():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    reference = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
    randomize_norm_statistics_(reference, seed=2)
    with torch.no_grad():  # non-zero FPN biases, so a swapped lateral/output key would show
        for name, p in reference.fpn.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    reference.eval()
    ours = build_backbone(BackboneConfig(resnet=resnet50(), features="FPN"))
    full_model_keys = {"backbone." + k: v for k, v in reference.state_dict().items()}
    report = load_torchvision_fpn_state_dict(ours, full_model_keys)  # strict: every key placed
    assert report.missing == [] and report.unexpected == []
    images = torch.randn(1, 3, 67, 101)  # odd sides exercise interpolate(size=...)
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    for theirs, name in zip(("0", "1", "2", "3", "pool"), ("p2", "p3", "p4", "p5", "p6")):
        torch.testing.assert_close(got[name], expected[theirs], rtol=1e-5, atol=1e-5)


# --- Bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("make, argument", [
    (lambda: ResNetConfig(depth=34), "depth"),
    (lambda: ResNetConfig(depth=(3, 4, 6)), "depth"),
    (lambda: ResNetConfig(norm="layer_norm"), "norm"),
    (lambda: ResNetConfig(freeze_at=6), "freeze_at"),
    (lambda: ResNetConfig(zero_init_residual=True), "zero_init_residual"),
    (lambda: mini_resnet(norm="bn", freeze_at=2, zero_init_residual=True), "freeze_at=2"),
    (lambda: ResNet(resnet50(num_classes=1000), last_stage=4), "num_classes"),
    (lambda: BackboneConfig(features="C3"), "features"),
    (lambda: FPN([8, 16], norm="bn"), "norm"),
    (lambda: make_res5_head(resnet50(), first_stride=3), "first_stride"),
    (lambda: ResNet(mini_resnet(width=4))(torch.zeros(1, 1, 32, 32)), "images"),
    (lambda: ResNet(mini_resnet(width=4)).classify(torch.zeros(1, 3, 32, 32)), "num_classes"),
    (lambda: load_torchvision_fpn_state_dict(
        FPNBackbone(mini_resnet(width=4), 8), {"rpn.x": torch.zeros(1)}), "prefix"),
])
def test_bad_arguments_raise_value_error_naming_them(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_resnext_from_torchvision_gives_the_same_features_and_logits():
    """ResNeXt's grouped 3x3 (with the stride on it) against torchvision's, at res2..res5."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

    torch.manual_seed(0)  # 4 groups of width 8 in res2: a miniature 4x8d
    reference = torchvision.models.resnet.ResNet(TorchvisionBottleneck, [1, 2, 1, 1], num_classes=10,
                                                 groups=4, width_per_group=8)
    randomize_norm_statistics_(reference, seed=5)
    reference.eval()
    ours = ResNet(ResNetConfig(depth=(1, 2, 1, 1), groups=4, width_per_group=8, num_classes=10))
    report = load_imagenet_state_dict(ours, reference.state_dict())  # strict
    assert report.missing == [] and report.unexpected == []
    assert ours.layer2[0].conv2.groups == 4 and ours.layer2[0].conv2.stride == (2, 2)
    images = torch.randn(1, 3, 67, 101)
    assert_same_c2_to_c5(ours, reference, images)
    with torch.no_grad():
        torch.testing.assert_close(ours.classify(images), reference(images), rtol=1e-5, atol=1e-5)
