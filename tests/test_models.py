"""Tests for models.py: torchvision-compatible backbones, output shapes, pretrained loading.

Run: python3 -m pytest tests/test_models.py -q   (about half a minute on a 2-core CPU)

Full-size backbones are only built (their parameter names and shapes are checked against
torchvision's); forwards run on the CPU-demo variants and on one small full-size model.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402

KEYS_JSON = Path(__file__).resolve().parents[1].parent / "shared" / "torchvision_keys.json"
# Our backbone name -> torchvision's name in torchvision_keys.json.
TORCHVISION_NAMES = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
                     "resnet101": "resnet101", "wide_resnet50": "wide_resnet50_2", "mobilenetv2": "mobilenet_v2"}
TINY_BACKBONES = ["resnet18_tiny", "resnet18_micro", "wide_resnet_tiny", "mobilenetv2_tiny"]


def torchvision_shapes(torchvision_name, keep_imagenet_only=False):
    """Names and shapes of torchvision's ImageNet state_dict, by default without the ImageNet-only
    layers (the classifier, and MobileNetV2's features.18) that the backbones leave out."""
    if not KEYS_JSON.is_file():
        pytest.skip(f"{KEYS_JSON} not found (the shared/ folder sits beside the repository)")
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
    assert set(models.BACKBONES) == set(TORCHVISION_NAMES) | set(TINY_BACKBONES)
    assert models.MODEL_NAMES == sorted(models.MODEL_NAMES)
    assert len(models.MODEL_NAMES) == len(models.HEADS) * len(models.BACKBONES)


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


@pytest.mark.parametrize("name", models.MODEL_NAMES)
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
