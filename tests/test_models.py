"""Tests for models.py: torchvision-compatible backbones, output shapes, pretrained loading.

Run: python3 -m pytest tests/test_models.py -q   (about half a minute on a 2-core CPU)

Full-size backbones are only built (their parameter names and shapes are checked against
torchvision's); forwards run on the CPU-demo variants and on one small full-size model.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from conftest import SKD_CAMVID, needs_real_data  # noqa: E402

# torchvision_keys.json / torchvision_seg_keys.json: the names and shapes of torchvision's ImageNet
# backbones and COCO segmentation models, as torchvision's state_dicts list them.
KEYS_JSON = Path(__file__).resolve().parent / "torchvision_keys.json"
# Our backbone name -> torchvision's name in torchvision_keys.json.
TORCHVISION_NAMES = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
                     "resnet101": "resnet101", "wide_resnet50": "wide_resnet50_2", "mobilenetv2": "mobilenet_v2"}
TINY_BACKBONES = ["resnet18_tiny", "resnet18_micro", "wide_resnet_tiny", "mobilenetv2_tiny"]
# Deep-stem ResNets of published checkpoints: mmsegmentation's V1c, SKD's / CIRKD's V1s.
DEEP_STEM_BACKBONES = [f"resnet{depth}_{variant}" for variant in ("v1c", "v1s", "v1s_h512") for depth in (18, 50, 101)]


def torchvision_shapes(torchvision_name, keep_imagenet_only=False):
    """Names and shapes of torchvision's ImageNet state_dict, by default without the ImageNet-only
    layers (the classifier, and MobileNetV2's features.18) that the backbones leave out."""
    shapes = json.loads(KEYS_JSON.read_text())[torchvision_name]
    if keep_imagenet_only:
        return shapes
    return {k: v for k, v in shapes.items() if not k.startswith(("fc.", "classifier.", "features.18."))}


@pytest.mark.parametrize("output_stride", [8, 32])
@pytest.mark.parametrize("name", list(TORCHVISION_NAMES))
def test_backbone_matches_torchvision_names_and_shapes(name, output_stride):
    # Dilation changes no parameter, so every output stride must load the same checkpoint.
    backbone = models.build_backbone(name, output_stride)
    ours = {k: list(v.shape) for k, v in backbone.state_dict().items()}
    assert ours == torchvision_shapes(TORCHVISION_NAMES[name])


def test_model_names_cover_every_head_and_backbone():
    assert set(models.BACKBONES) == set(TORCHVISION_NAMES) | set(TINY_BACKBONES) | set(DEEP_STEM_BACKBONES)
    assert models.MODEL_NAMES == sorted(models.MODEL_NAMES)
    assert len(models.MODEL_NAMES) == len(models.HEADS) * len(models.BACKBONES) + len(models.ESPNETS)


def expected_size(name, input_size, output_stride):
    return input_size // 4 if name.startswith("deeplabv3plus_") else input_size // output_stride


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("head", models.HEADS)
def test_forward_shapes_of_demo_models(head, backbone, output_stride):
    name = f"{head}_{backbone}"
    model = models.build_model(name, num_classes=5, output_stride=output_stride, aux=True).train()
    outputs = model(torch.randn(2, 3, 64, 64))
    size = expected_size(name, 64, output_stride)
    assert set(outputs) == {"out", "feat", "aux"}
    assert outputs["out"].shape == (2, 5, size, size)
    assert outputs["feat"].shape == (2, model.feat_channels, size, size)
    aux_size = 64 // min(output_stride, 16)  # layer3 / features[13] stop at stride 16
    assert outputs["aux"].shape == (2, 5, aux_size, aux_size)
    assert (model.num_classes, model.output_stride) == (5, output_stride)


@pytest.mark.parametrize("name", [n for n in models.MODEL_NAMES if n not in models.ESPNETS])
def test_every_model_builds_with_documented_attributes(name):
    with torch.device("meta"):  # shapes only, no memory and no init time: ResNet-101 builds in ms
        model = models.build_model(name, num_classes=3)
    assert model.feat_channels == model.head.feat_channels
    assert model.aux_head is None and (model.num_classes, model.output_stride) == (3, 8)
    if name.startswith("deeplabv2_"):  # no pre-classifier layer: "feat" is the backbone's feature
        assert model.feat_channels == model.backbone.out_channels


@pytest.mark.parametrize("head", models.HEADS)
def test_full_size_forward_resnet18(head):
    # One full-size backbone through every head: the papers' widths (256 / 512 / 48) work too.
    model = models.build_model(f"{head}_resnet18", num_classes=4, output_stride=8).eval()
    with torch.inference_mode():
        outputs = model(torch.randn(1, 3, 32, 32))
    size = expected_size(f"{head}_resnet18", 32, 8)
    assert outputs["out"].shape == (1, 4, size, size)
    assert outputs["feat"].shape[1] == {"deeplabv2": 512, "deeplabv3": 256, "deeplabv3plus": 256,
                                        "pspnet": 512}[head]
    assert "aux" not in outputs


def test_weights_move_between_output_strides():
    # Dilation adds no parameter: a model trained at output stride 8 can be evaluated at 32.
    torch.manual_seed(0)
    model8 = models.build_model("pspnet_resnet18_tiny", 2, output_stride=8).eval()
    model32 = models.build_model("pspnet_resnet18_tiny", 2, output_stride=32).eval()
    model32.load_state_dict(model8.state_dict())
    with torch.inference_mode():
        x = torch.randn(1, 3, 64, 64)
        assert model8(x)["out"].shape[-1] == 4 * model32(x)["out"].shape[-1]


def test_every_parameter_gets_a_gradient():
    # Catches modules that are built but never used (they would silently never train).
    model = models.build_model("deeplabv3plus_mobilenetv2_tiny", 3, aux=True).train()
    outputs = model(torch.randn(2, 3, 32, 32))
    (outputs["out"].sum() + outputs["aux"].sum()).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_pretrained_checkpoint_loads_and_classifier_is_dropped(tmp_path):
    source = models.build_backbone("resnet18_tiny")
    state_dict = source.state_dict()
    state_dict = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in state_dict.items()}
    state_dict["fc.weight"] = torch.zeros(1000, 256)  # torchvision checkpoints carry their classifier
    torch.save(state_dict, tmp_path / "backbone.pth")
    model = models.build_model("deeplabv3_resnet18_tiny", 4, pretrained=str(tmp_path / "backbone.pth"))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_torchvision_shaped_checkpoint_loads(name, tmp_path):
    # A stand-in for torchvision's ImageNet file: every key of torchvision_keys.json, classifier
    # and MobileNetV2's features.18 included; build_model must drop those and load the rest.
    shapes = torchvision_shapes(TORCHVISION_NAMES[name], keep_imagenet_only=True)
    checkpoint = {k: torch.full(shape, 0.5) if shape else torch.tensor(7) for k, shape in shapes.items()}
    torch.save(checkpoint, tmp_path / f"{name}.pth")
    model = models.build_model(f"deeplabv3plus_{name}", 4, pretrained=tmp_path / f"{name}.pth")
    for key, value in model.backbone.state_dict().items():
        assert torch.all(value == (7 if key.endswith("num_batches_tracked") else 0.5)), key


def test_pretrained_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(models.build_backbone("mobilenetv2_tiny").state_dict(), tmp_path / "mobilenet.pth")
    with pytest.raises(ValueError, match=r"missing \d+ \(conv1.weight.*unexpected \d+ \(features.0"):
        models.build_model("pspnet_resnet18_tiny", 4, pretrained=tmp_path / "mobilenet.pth")


def test_pretrained_checkpoint_with_wrong_widths_is_refused(tmp_path):
    torch.save(models.build_backbone("resnet18_tiny").state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"wrong shape \d+ \(conv1.weight"):
        models.build_model("pspnet_resnet18", 4, pretrained=tmp_path / "tiny.pth")


def test_missing_pretrained_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        models.build_model("pspnet_resnet18_tiny", 4, pretrained=tmp_path / "nothing.pth")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="pspnet_resnet152", num_classes=4), "unknown model 'pspnet_resnet152'"),
    (dict(name="fcn_resnet18", num_classes=4), "unknown model"),
    (dict(name="pspnet_resnet18_tiny", num_classes=4, output_stride=4), "output_stride must be 8, 16 or 32"),
    (dict(name="pspnet_resnet18_tiny", num_classes=0), "num_classes must be a positive integer"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(**kwargs)


def test_count_parameters_of_mobilenetv2_matches_torchvision():
    # torchvision's mobilenet_v2 has 3,504,872 parameters; without features.18 (409,600 conv +
    # 2,560 BN) and the classifier (1,281,000) that leaves 1,811,712.
    assert models.count_parameters(models.build_backbone("mobilenetv2")) == 1_811_712



# ----------------------------------------------------------------------------------------------
# Published checkpoints (issue 16). No published file is downloaded here: each test builds a
# random state_dict with the source's key names and shapes (kd-seg's model through the inverse
# key table; for torchvision also checked against torchvision_seg_keys.json), so what is tested is
# the layout and the computation, not the published weights.

SEG_KEYS_JSON = Path(__file__).resolve().parent / "torchvision_seg_keys.json"
# kd-seg name -> the source's key table; every published layout kd-seg accepts.
PUBLISHED = {"deeplabv3_resnet50": models.TORCHVISION_DEEPLABV3, "deeplabv3_resnet101": models.TORCHVISION_DEEPLABV3,
             **{f"pspnet_resnet{d}_v1c": models.MMSEG_PSPNET for d in (18, 50, 101)},
             **{f"deeplabv3_resnet{d}_v1c": models.MMSEG_DEEPLABV3 for d in (18, 50, 101)},
             **{f"deeplabv3plus_resnet{d}_v1c": models.MMSEG_DEEPLABV3PLUS for d in (18, 50, 101)},
             **{f"deeplabv3_resnet{d}_v1s{w}": models.CIRKD_DEEPLABV3 for d in (18, 50, 101) for w in ("", "_h512")}}


def random_model(name, num_classes, aux=True, seed=0):
    """kd-seg's model with every float tensor random (BatchNorm statistics too, variances > 0),
    so that no layer is an identity and a wrong key or order cannot go unnoticed."""
    model = models.build_model(name, num_classes, aux=aux).eval()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=generator) * 0.1
            value = value.abs() + 0.5 if key.endswith("running_var") else value
        state[key] = value
    model.load_state_dict(state)
    return model, state


def published_file(name, state, path, meta=None):
    """Save kd-seg's `state` under the source's names and file layout; returns the source state_dict."""
    source = models.rename_keys(state, PUBLISHED[name], inverse=True)
    torch.save({"meta": meta or {"mmseg_version": "0.x"}, "state_dict": source} if "_v1c" in name else source, path)
    return source


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "deeplabv3_resnet101"])
def test_torchvision_deeplabv3_keys_and_shapes_are_torchvision_s(name):
    # torchvision's COCO files: 21 classes and the aux head; the inverse table must give exactly
    # torchvision's keys and shapes, and the forward table must undo it.
    with torch.device("meta"):
        state = models.build_model(name, 21, aux=True).state_dict()
    source = models.rename_keys(state, models.TORCHVISION_DEEPLABV3, inverse=True)
    assert {k: list(v.shape) for k, v in source.items()} == json.loads(SEG_KEYS_JSON.read_text())[name]
    assert list(models.rename_keys(source, models.TORCHVISION_DEEPLABV3)) == list(state)


# A few keys and shapes read off each source's code (mmseg configs: R50/101 channels 512, aux 256;
# R18 channels 128, aux 64; CIRKD: stem 3->64->64->128, heads 256 (R18: 128) in its 2022 code, 512
# in its 2025 code), so that the tables are checked against the sources and not only against
# themselves. 19 classes. mmsegmentation's DeepLabV3+, whose head kd-seg once read wrongly from
# this very kind of belief, is checked whole against mmseg's own classes below (MMSEG_KEYS_JSON).
SOURCE_SHAPES = {
    "pspnet_resnet101_v1c": {"backbone.stem.0.weight": [32, 3, 3, 3], "backbone.stem.3.weight": [32, 32, 3, 3],
                             "backbone.stem.6.weight": [64, 32, 3, 3], "backbone.stem.7.running_var": [64],
                             "backbone.layer1.0.downsample.0.weight": [256, 64, 1, 1],
                             "decode_head.psp_modules.3.1.conv.weight": [512, 2048, 1, 1],
                             "decode_head.bottleneck.conv.weight": [512, 4096, 3, 3],
                             "decode_head.conv_seg.weight": [19, 512, 1, 1],
                             "auxiliary_head.convs.0.conv.weight": [256, 1024, 3, 3],
                             "auxiliary_head.convs.0.bn.weight": [256], "auxiliary_head.conv_seg.bias": [19]},
    "pspnet_resnet18_v1c": {"backbone.layer1.0.conv2.weight": [64, 64, 3, 3],
                            "decode_head.psp_modules.0.1.conv.weight": [128, 512, 1, 1],
                            "decode_head.bottleneck.conv.weight": [128, 1024, 3, 3],
                            "auxiliary_head.convs.0.conv.weight": [64, 256, 3, 3]},
    "deeplabv3_resnet101_v1c": {"decode_head.image_pool.1.conv.weight": [512, 2048, 1, 1],
                                "decode_head.aspp_modules.0.conv.weight": [512, 2048, 1, 1],
                                "decode_head.aspp_modules.3.conv.weight": [512, 2048, 3, 3],
                                "decode_head.bottleneck.conv.weight": [512, 2560, 3, 3],
                                "decode_head.bottleneck.bn.num_batches_tracked": []},
    "deeplabv3_resnet101_v1s": {"head.aspp.b0.0.weight": [256, 2048, 1, 1], "head.aspp.project.0.weight": [256, 1280, 1, 1],
                                "head.block.0.weight": [256, 256, 3, 3], "head.block.4.weight": [19, 256, 1, 1],
                                "auxlayer.block.0.weight": [256, 1024, 3, 3]},
    "deeplabv3_resnet18_v1s": {"pretrained.layer1.0.downsample.0.weight": [64, 128, 1, 1],
                               "head.aspp.b0.0.weight": [128, 512, 1, 1], "head.block.4.weight": [19, 128, 1, 1],
                               "auxlayer.block.0.weight": [64, 256, 3, 3]},
    "deeplabv3_resnet101_v1s_h512": {"pretrained.conv1.weight": [64, 3, 3, 3], "pretrained.conv2.weight": [64, 64, 3, 3],
                                "pretrained.conv3.weight": [128, 64, 3, 3], "pretrained.bn3.running_mean": [128],
                                "pretrained.layer1.0.conv1.weight": [64, 128, 1, 1],
                                "pretrained.layer1.0.downsample.0.weight": [256, 128, 1, 1],
                                "head.aspp.b0.0.weight": [512, 2048, 1, 1], "head.aspp.b1.block.0.weight": [512, 2048, 3, 3],
                                "head.aspp.b4.gap.1.weight": [512, 2048, 1, 1], "head.aspp.b4.gap.2.bias": [512],
                                "head.aspp.project.0.weight": [512, 2560, 1, 1], "head.block.0.weight": [512, 512, 3, 3],
                                "head.block.1.running_var": [512], "head.block.4.weight": [19, 512, 1, 1],
                                "auxlayer.block.0.weight": [256, 1024, 3, 3], "auxlayer.block.4.bias": [19]},
    "deeplabv3_resnet18_v1s_h512": {"head.aspp.b0.0.weight": [512, 512, 1, 1], "auxlayer.block.0.weight": [64, 256, 3, 3]},
}


@pytest.mark.parametrize("name", list(SOURCE_SHAPES))
def test_published_tables_give_the_sources_key_names_and_shapes(name):
    with torch.device("meta"):
        state = models.build_model(name, 19, aux=True).state_dict()
    source = {k: list(v.shape) for k, v in models.rename_keys(state, PUBLISHED[name], inverse=True).items()}
    assert {k: source.get(k) for k in SOURCE_SHAPES[name]} == SOURCE_SHAPES[name]
    assert len(source) == len(state)  # no two keys renamed onto one


# Every key and shape of four mmsegmentation 1.2.2 models as mmseg's own classes build them
# (MODELS.build on its shipped r18-d8 / r50-d8 Cityscapes configs, BN for SyncBN; the "source"
# line of the file), not as anyone believes they are: DeepLabV3+'s `bottleneck` is ASPPHead's plain
# 3x3 ConvModule, only the dilated ASPP branches and `sep_bottleneck` are depthwise-separable.
MMSEG_KEYS_JSON = Path(__file__).resolve().parent / "mmseg_keys.json"


@pytest.mark.parametrize("source, name", [("deeplabv3plus_r18_d8", "deeplabv3plus_resnet18_v1c"),
                                          ("deeplabv3plus_r50_d8", "deeplabv3plus_resnet50_v1c"),
                                          ("pspnet_r18_d8", "pspnet_resnet18_v1c"),
                                          ("deeplabv3_r18_d8", "deeplabv3_resnet18_v1c")])
def test_mmseg_tables_give_mmsegmentations_own_keys_and_shapes(source, name):
    expected = json.loads(MMSEG_KEYS_JSON.read_text())["models"][source]
    with torch.device("meta"):
        state = models.build_model(name, 19, aux=True).state_dict()
    ours = {k: list(v.shape) for k, v in models.rename_keys(state, PUBLISHED[name], inverse=True).items()}
    assert ours == expected
    with torch.device("meta"):   # recognised from mmseg's own keys and shapes
        assert models.published_layout({k: torch.empty(v) for k, v in expected.items()})[0] == name


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_layout_is_recognised_from_keys_and_shapes(name):
    with torch.device("meta"):
        state = models.build_model(name, 7, aux=True).state_dict()
    model_name, table, num_classes, aux = models.published_layout(
        models.rename_keys(state, PUBLISHED[name], inverse=True))
    assert (model_name, table, num_classes, aux) == (name, PUBLISHED[name], 7, True)


# Through a file, end to end: torchvision's two, every ResNet-18 layout, one mmseg Bottleneck and
# CIRKD's ResNet-101 teacher (the other ResNet-50/101 ones differ only in depth, tested above).
@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "deeplabv3_resnet101", "pspnet_resnet18_v1c",
                                  "deeplabv3_resnet18_v1c", "deeplabv3plus_resnet18_v1c", "deeplabv3_resnet18_v1s",
                                  "deeplabv3_resnet18_v1s_h512", "pspnet_resnet50_v1c", "deeplabv3_resnet101_v1s"])
def test_published_file_loads_strictly_and_reproduces_kd_seg_outputs(name, tmp_path):
    # A file with the source's names (and mmseg's {"meta", "state_dict"}) is recognised from its
    # keys and shapes alone, and computes exactly what kd-seg's model with the same weights does.
    model, state = random_model(name, num_classes=5)
    published_file(name, state, tmp_path / "published.pth")
    loaded = models.load_published(tmp_path / "published.pth")
    assert (loaded.name, loaded.num_classes, loaded.aux_head is not None, loaded.training) == (name, 5, True, False)
    images = torch.randn(1, 3, 17, 17)  # 3x3 at output stride 8: small, and still every layer
    with torch.inference_mode():  # the aux head runs in training only: called here directly
        ours, theirs = model(images), loaded(images)
        ours_aux, theirs_aux = (m.aux_head(m.backbone(m.input_transform(images) if m.input_transform is not None
                                                        else images)["middle"]) for m in (model, loaded))
    assert torch.equal(ours["out"], theirs["out"]) and torch.equal(ours_aux, theirs_aux)


def test_published_file_without_aux_head_loads_without_one(tmp_path):
    _, state = random_model("deeplabv3_resnet18_v1s", 3, aux=False)
    published_file("deeplabv3_resnet18_v1s", state, tmp_path / "no_aux.pth")
    assert models.load_published(tmp_path / "no_aux.pth").aux_head is None


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "pspnet_resnet18_v1c", "deeplabv3plus_resnet18_v1c",
                                  "deeplabv3_resnet18_v1s"])
@pytest.mark.parametrize("damage", ["missing", "unexpected", "wrong shape"])
def test_published_file_that_does_not_fit_is_refused_in_one_line(name, damage, tmp_path):
    with torch.device("meta"):
        state = models.build_model(name, 4, aux=True).state_dict()
    source = models.rename_keys({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()},
                                PUBLISHED[name], inverse=True)
    key = [k for k in source if k.endswith(".weight") and source[k].dim() == 4][5]  # a backbone conv
    if damage == "missing":
        del source[key]
    elif damage == "unexpected":
        key = key.replace(".weight", ".extra")
        source[key] = torch.zeros(1)
    else:
        source[key] = torch.zeros(*source[key].shape[:-1], 5)
    torch.save({"state_dict": source} if "_v1c" in name else source, tmp_path / "damaged.pth")
    with pytest.raises(ValueError) as error:
        models.load_published(tmp_path / "damaged.pth")
    message = str(error.value)
    assert "\n" not in message and f"{damage} 1 (" in message and "damaged.pth" in message
    assert key in message and name in message  # named as the file names it


def test_published_file_holding_another_model_than_asked_is_refused(tmp_path):
    _, state = random_model("deeplabv3_resnet18_v1s", 3)
    published_file("deeplabv3_resnet18_v1s", state, tmp_path / "cirkd.pth")
    with pytest.raises(ValueError, match="holds deeplabv3_resnet18_v1s, expected deeplabv3_resnet101_v1s"):
        models.load_published(tmp_path / "cirkd.pth", name="deeplabv3_resnet101_v1s")


@pytest.mark.parametrize("state, message", [
    ({"fc.weight": torch.zeros(3, 3)}, "neither a kd-seg checkpoint nor a published layout"),
    ({"decode_head.conv_seg.weight": torch.zeros(3, 3), "decode_head.convs.0.conv.weight": torch.zeros(1)},
     "not PSPHead, ASPPHead or DepthwiseSeparableASPPHead"),
    ({"decode_head.conv_seg.weight": torch.zeros(3, 3), "decode_head.psp_modules.0.1.conv.weight": torch.zeros(1),
      "backbone.conv1.weight": torch.zeros(1)}, "not ResNetV1c"),
    ({"head.aspp.b0.0.weight": torch.zeros(1), "pretrained.conv1.weight": torch.zeros(1)}, "'vanilla' ResNet"),
])
def test_unknown_layouts_are_refused_in_one_line(state, message):
    with pytest.raises(ValueError, match=message):
        models.load_published(state)


def test_mmseg_d16_model_is_refused(tmp_path):
    # -D16 files have the same shapes as -D8 ones: only their config tells them apart.
    _, state = random_model("deeplabv3_resnet18_v1c", 3)
    config = "backbone=dict(type='ResNetV1c', dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1), multi_grid=(1, 2, 4))"
    published_file("deeplabv3_resnet18_v1c", state, tmp_path / "d16.pth", meta={"config": config})
    with pytest.raises(ValueError, match="-D16"):
        models.load_published(tmp_path / "d16.pth")


class MessageHub:  # stands in for mmengine's: an object a safe load will not unpickle
    pass


def test_mmseg_file_with_message_hub_is_refused_with_the_fix(tmp_path):
    torch.save({"state_dict": {}, "message_hub": MessageHub()}, tmp_path / "mmseg1x.pth")
    with pytest.raises(ValueError) as error:
        models.load_published(tmp_path / "mmseg1x.pth")
    message = str(error.value)
    assert "\n" not in message and "MessageHub" in message and "weights_only=True" in message
    assert "torch.save({'state_dict': c['state_dict']}" in message
    assert "weights_only=False" not in message   # the fix is itself a safe load
    # the printed command, run as printed, writes a file that a safe load accepts
    command = message.rsplit('python -c "', 1)[1][:-1]
    command = command.replace("IN.pth", str(tmp_path / "mmseg1x.pth")).replace("OUT.pth", str(tmp_path / "w.pth"))
    subprocess.run([sys.executable, "-c", command], cwd=os.path.dirname(__file__), check=True)
    assert set(torch.load(tmp_path / "w.pth", weights_only=True)) == {"state_dict"}


# Independent references: each published head written out with F.conv2d in its source's own
# order and names (torchvision segmentation/deeplabv3.py, mmseg aspp_head.py, sep_aspp_head.py,
# psp_head.py, CIRKD models/deeplabv3.py), compared with kd-seg's head on one backbone feature.

def conv_bn_relu_ref(x, state, conv, bn, dilation=1, groups=1):
    weight = state[f"{conv}.weight"]
    x = F.conv2d(x, weight, state.get(f"{conv}.bias"), padding=dilation * (weight.shape[-1] // 2),
                 dilation=dilation, groups=groups)
    x = F.batch_norm(x, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
                     state[f"{bn}.bias"], training=False, eps=1e-5)
    return F.relu(x)


def conv_module_ref(x, state, prefix, dilation=1, groups=1):  # mmcv ConvModule
    return conv_bn_relu_ref(x, state, f"{prefix}.conv", f"{prefix}.bn", dilation, groups)


def separable_ref(x, state, prefix, dilation=1):  # mmcv DepthwiseSeparableConvModule
    x = conv_module_ref(x, state, f"{prefix}.depthwise_conv", dilation, groups=x.shape[1])
    return conv_module_ref(x, state, f"{prefix}.pointwise_conv")


def pooled_ref(x, branch):
    return branch(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])


def torchvision_deeplabv3_head_ref(x, s):
    a = "classifier.0"
    branches = [conv_bn_relu_ref(x, s, f"{a}.convs.0.0", f"{a}.convs.0.1")]
    branches += [conv_bn_relu_ref(x, s, f"{a}.convs.{i}.0", f"{a}.convs.{i}.1", rate) for i, rate in [(1, 12), (2, 24), (3, 36)]]
    branches += [pooled_ref(x, lambda p: conv_bn_relu_ref(p, s, f"{a}.convs.4.1", f"{a}.convs.4.2"))]  # pooling last
    y = conv_bn_relu_ref(torch.cat(branches, 1), s, f"{a}.project.0", f"{a}.project.1")  # 1x1 projection
    y = conv_bn_relu_ref(y, s, "classifier.1", "classifier.2")  # the head's 3x3 conv
    return F.conv2d(y, s["classifier.4.weight"], s["classifier.4.bias"])


def cirkd_deeplabv3_head_ref(x, s):
    branches = [conv_bn_relu_ref(x, s, "head.aspp.b0.0", "head.aspp.b0.1")]
    branches += [conv_bn_relu_ref(x, s, f"head.aspp.b{i}.block.0", f"head.aspp.b{i}.block.1", rate)
                 for i, rate in [(1, 12), (2, 24), (3, 36)]]
    branches += [pooled_ref(x, lambda p: conv_bn_relu_ref(p, s, "head.aspp.b4.gap.1", "head.aspp.b4.gap.2"))]
    y = conv_bn_relu_ref(torch.cat(branches, 1), s, "head.aspp.project.0", "head.aspp.project.1")
    y = conv_bn_relu_ref(y, s, "head.block.0", "head.block.1")
    return F.conv2d(y, s["head.block.4.weight"], s["head.block.4.bias"])


def mmseg_aspp_head_ref(x, s, low_level=None):
    d = "decode_head"
    separable = low_level is not None
    branches = [pooled_ref(x, lambda p: conv_module_ref(p, s, f"{d}.image_pool.1"))]  # image pooling FIRST
    branches += [conv_module_ref(x, s, f"{d}.aspp_modules.0")]
    for i, rate in [(1, 12), (2, 24), (3, 36)]:
        branches += [(separable_ref if separable else conv_module_ref)(x, s, f"{d}.aspp_modules.{i}", rate)]
    y = conv_module_ref(torch.cat(branches, 1), s, f"{d}.bottleneck")  # plain 3x3, no projection
    if separable:
        c1 = conv_module_ref(low_level, s, f"{d}.c1_bottleneck")
        y = F.interpolate(y, size=c1.shape[-2:], mode="bilinear", align_corners=False)
        y = separable_ref(separable_ref(torch.cat([y, c1], 1), s, f"{d}.sep_bottleneck.0"), s, f"{d}.sep_bottleneck.1")
    return F.conv2d(y, s[f"{d}.conv_seg.weight"], s[f"{d}.conv_seg.bias"])


def mmseg_psp_head_ref(x, s):
    d = "decode_head"
    pyramid = [F.interpolate(conv_module_ref(F.adaptive_avg_pool2d(x, bins), s, f"{d}.psp_modules.{i}.1"),
                             size=x.shape[-2:], mode="bilinear", align_corners=False)
               for i, bins in enumerate((1, 2, 3, 6))]
    y = conv_module_ref(torch.cat([x] + pyramid, 1), s, f"{d}.bottleneck")
    return F.conv2d(y, s[f"{d}.conv_seg.weight"], s[f"{d}.conv_seg.bias"])


def aux_head_ref(x, s, name):
    conv, bn, classifier = {"torchvision": ("aux_classifier.0", "aux_classifier.1", "aux_classifier.4"),
                            "mmseg": ("auxiliary_head.convs.0.conv", "auxiliary_head.convs.0.bn", "auxiliary_head.conv_seg"),
                            "cirkd": ("auxlayer.block.0", "auxlayer.block.1", "auxlayer.block.4")}[name]
    y = conv_bn_relu_ref(x, s, conv, bn)
    return F.conv2d(y, s[f"{classifier}.weight"], s[f"{classifier}.bias"])


@pytest.mark.parametrize("name, head_ref, source", [
    ("deeplabv3_resnet50", torchvision_deeplabv3_head_ref, "torchvision"),
    ("deeplabv3_resnet18_v1s", cirkd_deeplabv3_head_ref, "cirkd"),
    ("deeplabv3_resnet18_v1c", mmseg_aspp_head_ref, "mmseg"),
    ("deeplabv3plus_resnet18_v1c", lambda x, s, low: mmseg_aspp_head_ref(x, s, low), "mmseg"),
    ("pspnet_resnet18_v1c", mmseg_psp_head_ref, "mmseg"),
])
def test_heads_compute_what_their_sources_compute(name, head_ref, source):
    model, state = random_model(name, num_classes=3)
    s = models.rename_keys(state, PUBLISHED[name], inverse=True)
    features = {"out": torch.randn(1, model.backbone.out_channels, 7, 7),
                "low_level": torch.randn(1, model.backbone.low_level_channels, 13, 13),
                "middle": torch.randn(1, model.backbone.middle_channels, 7, 7)}
    with torch.inference_mode():
        expected = (head_ref(features["out"], s, features["low_level"]) if "plus" in name
                    else head_ref(features["out"], s))
        torch.testing.assert_close(model.head(features)[0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.aux_head(features["middle"]), aux_head_ref(features["middle"], s, source),
                                   rtol=1e-5, atol=1e-5)


def dilations(block):
    return block.conv1.dilation[0], block.conv2.dilation[0]


@pytest.mark.parametrize("backbone, expected", [
    # (conv1, conv2) dilations of layer3's and layer4's first two blocks, at output stride 8.
    ("resnet18", [(1, 1), (2, 2), (2, 2), (4, 4)]),     # kd-seg / torchvision style
    ("resnet18_v1c", [(1, 1), (2, 1), (2, 1), (4, 1)]),  # mmseg: contract_dilation, conv2 padding 1
    ("resnet18_v1s", [(1, 2), (2, 2), (2, 4), (4, 4)]),  # CIRKD BasicBlockV1b: conv2 = the layer's
])
def test_dilated_basic_block_conventions_of_each_source(backbone, expected):
    net = models.build_backbone(backbone, output_stride=8)
    assert [dilations(b) for b in (net.layer3[0], net.layer3[1], net.layer4[0], net.layer4[1])] == expected
    assert all(conv.padding == conv.dilation for conv in net.modules() if isinstance(conv, torch.nn.Conv2d)
               and conv.kernel_size == (3, 3))
    assert net.layer3[0].conv1.stride == net.layer4[0].conv1.stride == (1, 1)


def test_cirkd_models_take_bgr_minus_caffe_mean_and_others_kd_seg_input():
    # kd-seg's images arrive ImageNet-normalised RGB in 0-1; CIRKD's net sees BGR 0-255 minus the
    # Caffe mean (its dataset code), computed here from the raw pixels.
    import datasets
    assert (models.IMAGENET_MEAN, models.IMAGENET_STD) == (datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)
    pixels = torch.randint(0, 256, (1, 3, 4, 5)).float()  # RGB, 0-255
    normalised = (pixels / 255 - torch.tensor(datasets.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        datasets.IMAGENET_STD).view(1, 3, 1, 1)
    cirkd = models.build_model("deeplabv3_resnet18_v1s", 3)
    expected = pixels[:, [2, 1, 0]] - torch.tensor([104.00698793, 116.66876762, 122.67891434]).view(1, 3, 1, 1)
    torch.testing.assert_close(cirkd.input_transform(normalised), expected, rtol=0, atol=1e-3)
    assert cirkd.align_corners and not any(k.startswith("input_transform") for k in cirkd.state_dict())
    for name in ("deeplabv3_resnet50", "pspnet_resnet18_v1c"):  # torchvision and mmseg: kd-seg's own input
        model = models.build_model(name, 3)
        assert model.input_transform is None and not model.align_corners


@pytest.mark.parametrize("backbone, wrap", [("resnet18_v1s", False), ("resnet18_v1c", True)])
def test_deep_stem_imagenet_checkpoints_load_strictly_via_pretrained(backbone, wrap, tmp_path):
    # CIRKD's resnet18-imagenet.pth: the backbone's own keys plus fc.*; mmcv's resnet*_v1c files
    # may wrap theirs in {"state_dict": ...}. A missing key is refused.
    state = {k: torch.rand(v.shape) if v.is_floating_point() else v
             for k, v in models.build_backbone(backbone).state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save({"state_dict": state} if wrap else state, tmp_path / "imagenet.pth")
    model = models.build_model(f"deeplabv3_{backbone}", 4, pretrained=tmp_path / "imagenet.pth")
    assert all(torch.equal(v, state[k]) for k, v in model.backbone.state_dict().items())
    del state["layer2.0.conv1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing 1 \(layer2.0.conv1.weight\)"):
        models.build_model(f"deeplabv3_{backbone}", 4, pretrained=tmp_path / "broken.pth")


def test_torchvision_deeplabv3_matches_torchvision_itself():
    # Only where torchvision is installed (it is no dependency): its own model, same weights.
    try:
        from torchvision.models.segmentation import deeplabv3_resnet50
    except Exception:  # not installed, or built for another torch
        pytest.skip("torchvision not importable")
    reference = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).eval()
    _, state = random_model("deeplabv3_resnet50", 21)
    reference.load_state_dict(models.rename_keys(state, models.TORCHVISION_DEEPLABV3, inverse=True))
    ours = models.load_published(reference.state_dict())
    images = torch.randn(1, 3, 17, 17)
    with torch.inference_mode():
        expected, outputs = reference(images), ours(images)
    for key in ("out", "aux"):
        upsampled = F.interpolate(outputs[key], size=(17, 17), mode="bilinear", align_corners=False)
        assert torch.equal(upsampled, expected[key])


# ----------------------------------------------------------------------------------------------
# ESPNet and ESPNet-C (Mehta et al. 2018), SKD's CamVid students.
SKD_FILES = sorted(str(p.relative_to(SKD_CAMVID)) for p in SKD_CAMVID.glob("*/*.pth")) if SKD_CAMVID else []


@pytest.mark.parametrize("name, classes, size, out_size", [
    ("espnet_c", 3, (64, 64), (8, 8)), ("espnet_c", 11, (60, 70), (8, 9)),   # 1/8, rounded up
    ("espnet", 5, (64, 64), (64, 64)), ("espnet", 11, (60, 70), (60, 70))])  # full size, any size
def test_espnet_outputs_and_attributes(name, classes, size, out_size):
    model = models.build_model(name, classes).train()
    outputs = model(torch.randn(2, 3, *size))
    assert set(outputs) == {"out", "feat"}
    assert outputs["out"].shape == (2, classes, *out_size)
    assert outputs["feat"].shape == (2, 256, -(-size[0] // 8), -(-size[1] // 8))   # 1/8 in both
    assert (model.num_classes, model.output_stride, model.feat_channels, model.align_corners) == (classes, 8, 256, True)
    assert model.name == name and not any(k.startswith("input_transform") for k in model.state_dict())
    outputs["out"].mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="espnet", num_classes=4), "at least 5 classes"),
    (dict(name="espnet_c", num_classes=11, output_stride=16), "output stride 8"),
    (dict(name="espnet_c", num_classes=11, pretrained="x.pth"), "no ImageNet weights"),
    (dict(name="espnet", num_classes=11, aux=True), "no auxiliary head")])
def test_espnet_options_it_does_not_have_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(**kwargs)


def test_espnet_takes_skd_camvid_input_converted_from_kd_seg_s():
    # SKD's CamVidLight: OpenCV's BGR image in 0-255, minus CamVid's mean, over its std (B, G, R)
    import datasets
    pixels = torch.randint(0, 256, (1, 3, 4, 5)).float()  # RGB, 0-255
    normalised = (pixels / 255 - torch.tensor(datasets.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        datasets.IMAGENET_STD).view(1, 3, 1, 1)
    expected = (pixels[:, [2, 1, 0]] - torch.tensor([73.18188461, 82.93553322, 72.41519599]).view(1, 3, 1, 1)) \
        / torch.tensor([45.3199, 46.1528, 44.9148]).view(1, 3, 1, 1)
    for name in models.ESPNETS:
        torch.testing.assert_close(models.build_model(name, 11).input_transform(normalised), expected,
                                   rtol=0, atol=1e-4)


def espnet_reference(x, s, decoder):
    """SKD's official ESPNet / ESPNet-C forward (network/ESPnet.py, cvpr_19), restated as plain
    functions of the state_dict: the check that kd-seg's modules compute the same thing."""
    def conv(y, key, stride=1, dilation=1):
        w = s[key + ".weight"]
        return F.conv2d(y, w, stride=stride, padding=(w.shape[-1] - 1) // 2 * dilation, dilation=dilation)

    def br(y, key):   # BatchNorm eps 1e-3, then PReLU
        y = F.batch_norm(y, s[key + ".running_mean"], s[key + ".running_var"], s[key + ".weight"],
                         s[key + ".bias"], eps=1e-3)
        return F.prelu(y, s[key.rsplit(".", 1)[0] + ".act.weight"]) if key.endswith(".bn") else y

    def esp(y, key, down=False, add=True):
        out1 = conv(y, key + ".c1.conv", stride=2 if down else 1)
        d = [conv(out1, f"{key}.d{r}.conv", dilation=r) for r in (1, 2, 4, 8, 16)]
        combine = torch.cat([d[0], d[1], d[1] + d[2], d[1] + d[2] + d[3], d[1] + d[2] + d[3] + d[4]], 1)
        if down:
            return br(combine, key + ".bn")
        return br(y + combine if add else combine, key + ".bn.bn")

    inp1 = F.avg_pool2d(x, 3, 2, 1)
    inp2 = F.avg_pool2d(inp1, 3, 2, 1)
    output0_cat = br(torch.cat([br(conv(x, "level1.conv", stride=2), "level1.bn"), inp1], 1), "b1.bn")
    output1_0 = output1 = esp(output0_cat, "level2_0", down=True)
    for i in range(2):
        output1 = esp(output1, f"level2.{i}")
    output1_cat = br(torch.cat([output1, output1_0, inp2], 1), "b2.bn")
    output2_0 = output2 = esp(output1_cat, "level3_0", down=True)
    for i in range(8):
        output2 = esp(output2, f"level3.{i}")
    output2_cat = br(torch.cat([output2_0, output2], 1), "b3.bn")
    if not decoder:
        return conv(output2_cat, "classifier.conv")
    out = conv(output2_cat, "classifier_1.conv")
    output2_c = F.conv_transpose2d(br(out, "br"), s["up_l3.0.weight"], stride=2)
    comb = esp(br(torch.cat([conv(output1_cat, "level3_C.conv"), output2_c], 1), "combine_l2_l3.0.bn"),
               "combine_l2_l3.1", add=False)
    comb = br(F.conv_transpose2d(comb, s["up_l2.0.weight"], stride=2), "up_l2.1.bn")
    concat = br(conv(torch.cat([comb, output0_cat], 1), "conv.conv"), "conv.bn")
    return F.conv_transpose2d(concat, s["classifier.weight"], stride=2)


@needs_real_data
@pytest.mark.parametrize("path", SKD_FILES)
def test_skd_published_espnets_load_and_compute_the_official_forward(path):
    # Each of SKD's ten CamVid students (with or without DataParallel's `module.` prefix) is
    # recognised from its keys and loaded strictly; on an image it gives the official forward's logits.
    import datasets
    model = models.load_published(SKD_CAMVID / path)
    assert (model.name, model.num_classes) == ("espnet" if path.startswith("ESP/") else "espnet_c", 11)
    state = {k.removeprefix("module."): v for k, v in
             torch.load(SKD_CAMVID / path, map_location="cpu", weights_only=True).items()}
    pixels = torch.randint(0, 256, (1, 3, 48, 64), generator=torch.Generator().manual_seed(0)).float()
    kd_seg_input = (pixels / 255 - torch.tensor(datasets.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        datasets.IMAGENET_STD).view(1, 3, 1, 1)
    official_input = (pixels[:, [2, 1, 0]] - torch.tensor(models.CAMVID_BGR_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(models.CAMVID_BGR_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = espnet_reference(official_input, state, decoder=model.name == "espnet")
        torch.testing.assert_close(model(kd_seg_input)["out"], expected, rtol=1e-4, atol=1e-4)


@needs_real_data
def test_espnet_file_with_other_depths_or_without_classifier_is_refused(tmp_path):
    state = torch.load(SKD_CAMVID / "esp-c/BASE56.7.pth", map_location="cpu", weights_only=True)
    fewer = {k: v for k, v in state.items() if not k.startswith("level3.7.")}
    with pytest.raises(ValueError, match="p = 2, q = 7"):
        models.load_published(fewer)
    broken = {k: v for k, v in state.items() if k != "b2.act.weight"}
    with pytest.raises(ValueError, match=r"missing 1 \(b2.act.weight\)"):
        models.load_published(broken)


def test_espnet_costs_as_the_paper_reports():
    # ESPNet (p = 2, q = 8): 0.35 M parameters, 1.31 GMACs at 360x480 (the CamVid issue's figures)
    import eval as evaluation
    with torch.device("meta"):
        espnet = models.build_model("espnet", 11)
    assert round(evaluation.count_params(espnet) / 1e6, 2) == 0.35
    assert round(evaluation.count_gmacs(espnet, (360, 480)), 2) == 1.31


def test_checkpoints_without_num_batches_tracked_load(tmp_path):
    # Files saved by torch before 0.4.1 have no BatchNorm num_batches_tracked (CIRKD's
    # resnet101-imagenet.pth among them): torch accepts them, and so does kd-seg; any other missing
    # key is still refused.
    backbone_state = {k: v for k, v in models.build_backbone("resnet18_v1s").state_dict().items()
                      if not k.endswith("num_batches_tracked")}
    torch.save(backbone_state, tmp_path / "old_imagenet.pth")
    models.build_model("deeplabv3_resnet18_v1s", 4, pretrained=tmp_path / "old_imagenet.pth")
    _, state = random_model("deeplabv3_resnet18_v1s", 4)
    source = {k: v for k, v in models.rename_keys(state, PUBLISHED["deeplabv3_resnet18_v1s"], inverse=True).items()
              if not k.endswith("num_batches_tracked")}
    models.load_published(source)
    del source["head.block.0.weight"]
    with pytest.raises(ValueError, match=r"missing 1 \(head.block.0.weight\)"):
        models.load_published(source)
