"""Segmentation networks for the distillation papers: backbones, heads and `build_model`.

What is in this file
- Backbones with exactly torchvision's parameter names and shapes, so torchvision's ImageNet
  checkpoints (`resnet101-63fe2227.pth`, `mobilenet_v2-b0353104.pth`, ...) load with
  `strict=True` once the classifier keys are dropped: ResNet-18/34/50/101, Wide-ResNet-50-2,
  MobileNetV2. Output stride 8, 16 or 32, by trading the last strides for dilation (for
  BasicBlock too, which torchvision refuses). Plus three small CPU-demo backbones.
- Heads, one small module each:
    deeplabv2      DeepLab-v2 ASPP (sum of four dilated 3x3 classifiers). Xie et al., BMVC 2018:
                   ResNet-101 teacher, MobileNet student.
    deeplabv3      DeepLabV3 (ASPP with image pooling, 3x3 conv, classifier).
    deeplabv3plus  DeepLabV3+ (V3's ASPP plus a stride-4 decoder). MGD (Qin et al., ECCV 2022):
                   ResNet-101 and Wide-ResNet-50-2 teachers, ResNet-18 / MobileNetV2 students.
    pspnet         PSPNet (pyramid pooling, bins 1/2/3/6). SKD (Liu et al., CVPR 2019):
                   ResNet-101 teacher, ResNet-18 student.
  plus an optional auxiliary FCN head on ResNet layer3 / MobileNetV2 features[13].
- `build_model(name, num_classes, output_stride=8, pretrained=None, aux=False)`, `MODEL_NAMES`,
  `build_backbone`, `load_backbone_weights`, `count_parameters`.

Usage
    from models import build_model, MODEL_NAMES
    teacher = build_model("pspnet_resnet101", num_classes=19, output_stride=8,
                          pretrained="https://download.pytorch.org/models/resnet101-63fe2227.pth")
    student = build_model("pspnet_resnet18", num_classes=19, aux=True)
    outputs = student(images)  # {"out": logits at 1/8, "feat": (N, 512, h, w), "aux": ...}

The forward pass returns the head's own resolution (1/output_stride, or 1/4 for DeepLabV3+);
upsampling to the label size is the caller's job, so losses see both sides at one size.
"""
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels, out_channels, kernel_size=3, dilation=1):
    """Conv (no bias: BatchNorm has one) + BatchNorm + ReLU, 'same' padding."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# ----------------------------------------------------------------------------------------------
# ResNet (He et al. 2016), torchvision layout: conv1 bn1 relu maxpool layer1..layer4 (no fc).

class BasicBlock(nn.Module):
    """Two 3x3 convs + identity (ResNet-18/34). `width_per_group` is ignored: it is only there so
    that both blocks share one constructor signature."""
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, dilation=1, downsample=None, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: 'ResNet v1.5' as torchvision), 1x1 expand x4."""
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, dilation=1, downsample=None, width_per_group=64):
        super().__init__()
        width = channels * width_per_group // 64  # Wide-ResNet-50-2 doubles only this inner width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet backbone returning {"low_level": layer1 (1/4), "middle": layer3, "out": layer4}.

    Output stride 16 replaces layer4's stride with dilation 2; output stride 8 also replaces
    layer3's (dilations 2 and 4). As in torchvision, the first block of a dilated layer keeps
    the previous dilation: its conv sees the same pixels the strided conv saw.
    """

    def __init__(self, block, layers, output_stride=32, base_channels=64, width_per_group=64):
        super().__init__()
        strides, dilations = [1, 2, 2, 2], [1, 1, 1, 1]
        if output_stride <= 16:
            strides[3], dilations[3] = 1, 2
        if output_stride == 8:
            strides[2], dilations[2], dilations[3] = 1, 2, 4
        self.conv1 = nn.Conv2d(3, base_channels, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels, previous_dilation = base_channels, 1
        for index, num_blocks in enumerate(layers):
            channels = base_channels * 2 ** index
            out_channels = channels * block.expansion
            downsample = None
            if strides[index] != 1 or in_channels != out_channels:
                downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, strides[index], bias=False),
                                           nn.BatchNorm2d(out_channels))
            blocks = [block(in_channels, channels, strides[index], previous_dilation, downsample, width_per_group)]
            blocks += [block(out_channels, channels, 1, dilations[index], None, width_per_group)
                       for _ in range(num_blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels, previous_dilation = out_channels, dilations[index]
        self.low_level_channels = base_channels * block.expansion
        self.middle_channels = base_channels * 4 * block.expansion
        self.out_channels = in_channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low_level = self.layer1(x)
        middle = self.layer3(self.layer2(low_level))
        return {"low_level": low_level, "middle": middle, "out": self.layer4(middle)}


# ----------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018), torchvision layout: features.0..17 (features.18, the last
# 1x1 conv to 1280 channels, and the classifier are ImageNet-only and left out).

def make_divisible(value, divisor=8):
    """torchvision's `_make_divisible`: round to a multiple of 8, never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation for MobileNetV2: keys `0.weight`, `1.*` (BN)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1, groups=1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when expand_ratio is 1), 3x3 depthwise, linear 1x1 project."""

    def __init__(self, in_channels, out_channels, stride, expand_ratio, dilation=1):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = [ConvBNReLU6(in_channels, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, dilation=dilation, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone returning {"low_level": features[:4] (1/4), "middle": features[13],
    "out": features[17]}. Output stride 16 turns features.14's stride into dilation 2; output
    stride 8 also features.7's (dilations 2 and 4). The block whose stride is removed keeps
    the previous dilation, as in the ResNet above."""
    # expand ratio t, output channels c, repeats n, stride s of the first repeat (the paper's Table 2)
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, output_stride=32, width_multiplier=1.0):
        super().__init__()
        in_channels = make_divisible(32 * width_multiplier)
        features = [ConvBNReLU6(3, in_channels, stride=2)]
        current_stride, dilation = 2, 1
        for expand_ratio, channels, repeats, first_stride in self.settings:
            out_channels = make_divisible(channels * width_multiplier)
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                block_dilation = dilation  # the block that loses its stride keeps the old dilation
                if stride > 1 and current_stride >= output_stride:
                    dilation, stride = dilation * stride, 1
                current_stride *= stride
                features.append(InvertedResidual(in_channels, out_channels, stride, expand_ratio, block_dilation))
                in_channels = out_channels
        self.features = nn.Sequential(*features)
        self.low_level_channels = self.features[3].conv[-1].num_features
        self.middle_channels = self.features[13].conv[-1].num_features
        self.out_channels = in_channels

    def forward(self, x):
        low_level = self.features[:4](x)
        middle = self.features[4:14](low_level)
        return {"low_level": low_level, "middle": middle, "out": self.features[14:](middle)}


# Backbone name -> (constructor(output_stride), head width). Full-size backbones keep the
# papers' head width (256; PSPNet's bottleneck is twice that); the CPU-demo ones scale it with
# their channel width (256 * base_channels / 64, or 256 * width multiplier) so the demo stays fast.
BACKBONES = {
    "resnet18": (lambda stride: ResNet(BasicBlock, [2, 2, 2, 2], stride), 256),
    "resnet34": (lambda stride: ResNet(BasicBlock, [3, 4, 6, 3], stride), 256),
    "resnet50": (lambda stride: ResNet(Bottleneck, [3, 4, 6, 3], stride), 256),
    "resnet101": (lambda stride: ResNet(Bottleneck, [3, 4, 23, 3], stride), 256),
    "wide_resnet50": (lambda stride: ResNet(Bottleneck, [3, 4, 6, 3], stride, width_per_group=128), 256),
    "mobilenetv2": (lambda stride: MobileNetV2(stride, 1.0), 256),
    # CPU demo: the ResNet-18 layout at half width (32 base channels); a stand-in for ResNet-18.
    "resnet18_tiny": (lambda stride: ResNet(BasicBlock, [2, 2, 2, 2], stride, base_channels=32), 128),
    # CPU demo student: the ResNet-18 layout at quarter width (16 base channels), as SKD's
    # narrower ResNet-18 students; on a CPU it trains faster than MobileNetV2 (depthwise
    # convolutions are slow to back-propagate there) and learns as fast per image.
    "resnet18_micro": (lambda stride: ResNet(BasicBlock, [2, 2, 2, 2], stride, base_channels=16), 64),
    # CPU demo: one BasicBlock per stage at 48 base channels, shallower but wider; a stand-in for WRN.
    "wide_resnet_tiny": (lambda stride: ResNet(BasicBlock, [1, 1, 1, 1], stride, base_channels=48), 192),
    # CPU demo: MobileNetV2 at width 0.25 (features.17 has 80 channels); a stand-in for MobileNetV2.
    "mobilenetv2_tiny": (lambda stride: MobileNetV2(stride, 0.25), 64),
}


# ----------------------------------------------------------------------------------------------
# Heads. Each takes the backbone's feature dict and returns (logits, feat), where feat is the
# feature right before the final classifier (the one SKD / MGD / CWD distil).

class DeepLabV2Head(nn.Module):
    """DeepLab-v2 ASPP (Chen et al., TPAMI 2018): four 3x3 classifiers with dilation 6/12/18/24
    on the backbone feature, summed. There is no pre-classifier layer, so "feat" is the backbone
    feature itself. The rates are the paper's (set for output stride 8) at every output stride."""

    def __init__(self, in_channels, num_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        self.classifiers = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate)
                                         for rate in rates)
        self.feat_channels = in_channels

    def forward(self, features):
        x = features["out"]
        return sum(classifier(x) for classifier in self.classifiers), x


class ASPP(nn.Module):
    """DeepLabV3 ASPP (Chen et al. 2017): 1x1, three atrous 3x3 and image pooling, concatenated
    and projected to `channels`. Dropout 0.5 after the projection, as torchvision.
    The pooling branch's BatchNorm sees one value per channel and sample, so training needs a
    batch of at least 2 (as torchvision)."""

    def __init__(self, in_channels, channels, rates):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, channels, 1)] +
                                      [conv_bn_relu(in_channels, channels, 3, r) for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels, 1))
        self.project = nn.Sequential(conv_bn_relu(channels * (len(rates) + 2), channels, 1), nn.Dropout(0.5))

    def forward(self, x):
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3: ASPP -> 3x3 conv (feat) -> 1x1 classifier, at the backbone's output stride."""

    def __init__(self, in_channels, num_classes, channels, rates):
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates)
        self.conv = conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feat_channels = channels

    def forward(self, features):
        feat = self.conv(self.aspp(features["out"]))
        return self.classifier(feat), feat


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ (Chen et al., ECCV 2018): ASPP output upsampled to the stride-4 low-level
    feature, concatenated with its 1x1 projection (48 channels at full width), two 3x3 convs
    (feat), 1x1 classifier. Output at stride 4 whatever the output stride."""

    def __init__(self, in_channels, low_level_channels, num_classes, channels, rates):
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates)
        low_level_width = channels * 48 // 256
        self.low_level_project = conv_bn_relu(low_level_channels, low_level_width, 1)
        self.fuse = nn.Sequential(conv_bn_relu(channels + low_level_width, channels, 3),
                                  conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feat_channels = channels

    def forward(self, features):
        low_level = self.low_level_project(features["low_level"])
        context = F.interpolate(self.aspp(features["out"]), size=low_level.shape[-2:], mode="bilinear",
                                align_corners=False)
        feat = self.fuse(torch.cat([context, low_level], dim=1))
        return self.classifier(feat), feat


class PSPHead(nn.Module):
    """PSPNet (Zhao et al., CVPR 2017): average-pool to 1x1, 2x2, 3x3, 6x6 bins, 1x1 conv each to
    in_channels / 4, upsample, concatenate with the input, 3x3 conv to 2 * channels (512 at full
    width), dropout 0.1 (feat: its output, the classifier's input, as SKD's official
    x_feat_after_psp, which in train mode has been through the dropout), 1x1 classifier."""

    def __init__(self, in_channels, num_classes, channels, bins=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(bin_size), conv_bn_relu(in_channels, in_channels // 4, 1))
            for bin_size in bins)
        self.bottleneck = conv_bn_relu(in_channels + len(bins) * (in_channels // 4), 2 * channels, 3)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(2 * channels, num_classes, 1)
        self.feat_channels = 2 * channels

    def forward(self, features):
        x = features["out"]
        pyramid = [F.interpolate(stage(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
                   for stage in self.stages]
        feat = self.dropout(self.bottleneck(torch.cat([x] + pyramid, dim=1)))
        return self.classifier(feat), feat


def fcn_aux_head(in_channels, num_classes):
    """Auxiliary FCN head (PSPNet's deep supervision, torchvision's FCNHead): 3x3 conv to
    in_channels / 4, dropout 0.1, 1x1 classifier. Only trained with; ignore it at test time."""
    return nn.Sequential(OrderedDict(conv=conv_bn_relu(in_channels, in_channels // 4, 3),
                                     dropout=nn.Dropout(0.1),
                                     classifier=nn.Conv2d(in_channels // 4, num_classes, 1)))


HEADS = ("deeplabv2", "deeplabv3", "deeplabv3plus", "pspnet")
MODEL_NAMES = sorted(f"{head}_{backbone}" for head in HEADS for backbone in BACKBONES)


def make_head(head, backbone, num_classes, channels, output_stride):
    # DeepLabV3 doubles its atrous rates at output stride 8, where the feature map is twice as
    # large, so that each branch still covers the same part of the image (as the paper does).
    rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
    if head == "deeplabv2":
        return DeepLabV2Head(backbone.out_channels, num_classes)
    if head == "deeplabv3":
        return DeepLabV3Head(backbone.out_channels, num_classes, channels, rates)
    if head == "deeplabv3plus":
        return DeepLabV3PlusHead(backbone.out_channels, backbone.low_level_channels, num_classes, channels, rates)
    return PSPHead(backbone.out_channels, num_classes, channels)


class SegmentationModel(nn.Module):
    """Backbone + head (+ optional auxiliary head); see `build_model` for the outputs."""

    def __init__(self, backbone, head, num_classes, output_stride, aux_head=None):
        super().__init__()
        self.backbone, self.head, self.aux_head = backbone, head, aux_head
        self.num_classes, self.output_stride = num_classes, output_stride
        self.feat_channels = head.feat_channels

    def forward(self, x):
        features = self.backbone(x)
        out, feat = self.head(features)
        outputs = {"out": out, "feat": feat}
        # The auxiliary head is deep supervision: run in training only (as mmsegmentation), so an
        # eval-mode forward (evaluation, a teacher, FPS and GMACs) is the network as deployed.
        if self.aux_head is not None and self.training:
            outputs["aux"] = self.aux_head(features["middle"])
        return outputs


def init_weights(model):
    """torchvision's init (Kaiming normal, fan-out, for convs; BatchNorm to identity), then
    small classifiers (normal, std 0.01, as DeepLab) so the first logits are near uniform.
    The demo backbones train from scratch, so this matters more than it would after ImageNet."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and "classifier" in name:
            nn.init.normal_(module.weight, std=0.01)


def build_backbone(name, output_stride=8):
    """A backbone by name (see BACKBONES), with `low_level_channels`, `middle_channels` and
    `out_channels` attributes, randomly initialised (`init_weights`)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    backbone = BACKBONES[name][0](output_stride)
    init_weights(backbone)
    return backbone


def load_backbone_weights(backbone, source):
    """Load an ImageNet checkpoint (file path or URL) into `backbone` with strict=True.

    torchvision's classifier (`fc.*`, `classifier.*`) and MobileNetV2's last 1x1 conv
    (`features.18.*`) are dropped first; anything else that does not fit raises ValueError.
    """
    is_url = str(source).startswith(("http://", "https://"))
    if not is_url and not Path(source).is_file():
        raise FileNotFoundError(f"pretrained checkpoint {source} not found")
    try:
        if is_url:  # cached under ~/.cache/torch/hub/checkpoints, as torchvision does
            state_dict = torch.hub.load_state_dict_from_url(str(source), map_location="cpu", weights_only=True)
        else:
            state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # no internet, a truncated download, not a torch file: name the source
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"pretrained checkpoint {source} cannot be loaded ({type(error).__name__}: "
                         f"{first_line})") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"pretrained checkpoint {source} is not a state_dict (got {type(state_dict).__name__})")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "classifier.", "features.18."))}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    problems = [f"{kind} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for kind, keys in [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)]
                if keys]
    if problems:
        raise ValueError(f"pretrained checkpoint {source} does not fit the {type(backbone).__name__} backbone: "
                         + "; ".join(problems))
    backbone.load_state_dict(state_dict, strict=True)


def build_model(name, num_classes, output_stride=8, pretrained=None, aux=False):
    """Build "<head>_<backbone>" (see MODEL_NAMES), e.g. "deeplabv3plus_resnet101".

    name: head in deeplabv2 / deeplabv3 / deeplabv3plus / pspnet, backbone in BACKBONES.
    num_classes: number of output classes (>= 1).
    output_stride: 8, 16 or 32, the backbone's downsampling factor (the papers use 8).
    pretrained: None, or a torchvision ImageNet checkpoint (file path or URL) for the backbone.
    aux: add the auxiliary FCN head on ResNet layer3 / MobileNetV2 features[13].

    forward(images (N, 3, H, W)) returns a dict:
      "out":  logits (N, num_classes, H/os, W/os), H/4 x W/4 for deeplabv3plus; not upsampled.
      "feat": (N, model.feat_channels, same size as "out"), the head's feature right before the
              final classifier (for deeplabv2, the backbone's last feature).
      "aux":  only when aux=True and in training mode: logits (N, num_classes, H/min(os, 16),
              W/min(os, 16)). In eval mode the auxiliary head does not run (never at test time).
    The model has `.backbone` (torchvision parameter names), `.feat_channels`, `.num_classes`,
    `.output_stride`. Sizes above are for H, W divisible by os; others round up per stride.
    """
    head, _, backbone_name = name.partition("_")
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    backbone = build_backbone(backbone_name, output_stride)
    head_channels = BACKBONES[backbone_name][1]
    model = SegmentationModel(backbone, make_head(head, backbone, num_classes, head_channels, output_stride),
                              num_classes, output_stride,
                              fcn_aux_head(backbone.middle_channels, num_classes) if aux else None)
    init_weights(model.head)
    if aux:
        init_weights(model.aux_head)
    if pretrained is not None:
        load_backbone_weights(model.backbone, pretrained)
    return model


def count_parameters(model):
    """Number of parameters (trainable or not), e.g. for the README's model table."""
    return sum(p.numel() for p in model.parameters())
