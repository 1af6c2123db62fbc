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
- Deep-stem ResNets of published checkpoints, with their sources' own names and head widths:
  mmsegmentation's ResNetV1c ("resnet*_v1c", with mmseg's PSPHead / ASPPHead /
  DepthwiseSeparableASPPHead) and SKD's / CIRKD's ResNetV1b deep stem ("resnet*_v1s", which
  take BGR minus the Caffe mean, converted inside the model).
- `build_model(name, num_classes, output_stride=8, pretrained=None, aux=False)`, `MODEL_NAMES`,
  `build_backbone`, `load_backbone_weights`, `count_parameters`, and `load_published(file)`:
  a torchvision / mmsegmentation / CIRKD segmentation file as a kd-seg model (docs/PUBLISHED.md).

Usage
    from models import build_model, MODEL_NAMES
    teacher = build_model("pspnet_resnet101", num_classes=19, output_stride=8,
                          pretrained="https://download.pytorch.org/models/resnet101-63fe2227.pth")
    student = build_model("pspnet_resnet18", num_classes=19, aux=True)
    outputs = student(images)  # {"out": logits at 1/8, "feat": (N, 512, h, w), "aux": ...}

The forward pass returns the head's own resolution (1/output_stride, or 1/4 for DeepLabV3+);
upsampling to the label size is the caller's job, so losses see both sides at one size.
"""
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels, out_channels, kernel_size=3, dilation=1, stride=1, groups=1):
    """Conv (no bias: BatchNorm has one) + BatchNorm + ReLU, 'same' padding."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def separable_conv_bn_relu(in_channels, out_channels, dilation=1):
    """Depthwise 3x3 conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU (mmcv's
    DepthwiseSeparableConvModule, as mmsegmentation's DeepLabV3+ uses it)."""
    return nn.Sequential(OrderedDict(depthwise=conv_bn_relu(in_channels, in_channels, 3, dilation, groups=in_channels),
                                     pointwise=conv_bn_relu(in_channels, out_channels, 1)))


# ----------------------------------------------------------------------------------------------
# ResNet (He et al. 2016), torchvision layout: conv1 bn1 relu maxpool layer1..layer4 (no fc).

class BasicBlock(nn.Module):
    """Two 3x3 convs + identity (ResNet-18/34). `width_per_group` is ignored: it is only there so
    that both blocks share one constructor signature. `second_dilation` is conv2's dilation
    (default: conv1's); the published dilated ResNet-18s disagree on it, see `ResNet`."""
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, dilation=1, downsample=None, width_per_group=64,
                 second_dilation=None):
        super().__init__()
        second_dilation = dilation if second_dilation is None else second_dilation
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=second_dilation, dilation=second_dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: 'ResNet v1.5' as torchvision), 1x1 expand x4.
    It has one 3x3 conv, so `second_dilation` is ignored (it keeps one signature for both)."""
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, dilation=1, downsample=None, width_per_group=64,
                 second_dilation=None):
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

    `variant` picks the stem, and the second 3x3 conv of a dilated BasicBlock, of three families
    of published checkpoints (each with its own parameter names, so its files load as they are):
      "torchvision"  7x7 conv1 + bn1 (64). BasicBlock: conv2 dilated as conv1.
      "v1c"          mmsegmentation's ResNetV1c: `stem` = three 3x3 conv-BN-ReLU, 3->32 (stride 2)
                     ->32->64. BasicBlock: conv2 never dilated (mmseg's BasicBlock pads it by 1).
      "v1s"          SKD's / CIRKD's deep-stem ResNetV1b: conv1/bn1 3->64 (stride 2), conv2/bn2
                     64->64, conv3/bn3 64->128, so layer1 takes 128 channels (and a ResNet-18
                     gets a downsample there). BasicBlock: conv2 has the layer's dilation, also
                     in the first block (CIRKD's BasicBlockV1b `previous_dilation`).
    Bottlenecks agree in all three (mmseg's `contract_dilation` halves the first block's
    dilation, which is the previous dilation at output stride 8 and 16).
    """

    def __init__(self, block, layers, output_stride=32, base_channels=64, width_per_group=64, variant="torchvision"):
        super().__init__()
        strides, dilations = [1, 2, 2, 2], [1, 1, 1, 1]
        if output_stride <= 16:
            strides[3], dilations[3] = 1, 2
        if output_stride == 8:
            strides[2], dilations[2], dilations[3] = 1, 2, 4
        self.variant = variant
        if variant == "v1c":
            self.stem = nn.Sequential(*conv_bn_relu(3, base_channels // 2, stride=2),
                                      *conv_bn_relu(base_channels // 2, base_channels // 2),
                                      *conv_bn_relu(base_channels // 2, base_channels))
            stem_channels = base_channels
        elif variant == "v1s":
            self.conv1 = nn.Conv2d(3, base_channels, 3, 2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(base_channels)
            self.conv2 = nn.Conv2d(base_channels, base_channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(base_channels)
            self.conv3 = nn.Conv2d(base_channels, 2 * base_channels, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(2 * base_channels)
            stem_channels = 2 * base_channels
        elif variant == "torchvision":
            self.conv1 = nn.Conv2d(3, base_channels, 7, 2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(base_channels)
            stem_channels = base_channels
        else:
            raise ValueError(f"unknown ResNet variant {variant!r}; expected torchvision, v1c or v1s")
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels, previous_dilation = stem_channels, 1
        for index, num_blocks in enumerate(layers):
            channels = base_channels * 2 ** index
            out_channels = channels * block.expansion
            downsample = None
            if strides[index] != 1 or in_channels != out_channels:
                downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, strides[index], bias=False),
                                           nn.BatchNorm2d(out_channels))
            second = {"torchvision": None, "v1c": 1, "v1s": dilations[index]}[variant]  # BasicBlock's conv2
            blocks = [block(in_channels, channels, strides[index], previous_dilation, downsample, width_per_group,
                            second)]
            blocks += [block(out_channels, channels, 1, dilations[index], None, width_per_group, second)
                       for _ in range(num_blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels, previous_dilation = out_channels, dilations[index]
        self.low_level_channels = base_channels * block.expansion
        self.middle_channels = base_channels * 4 * block.expansion
        self.out_channels = in_channels

    def forward(self, x):
        if self.variant == "v1c":
            x = self.stem(x)
        elif self.variant == "v1s":
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
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
    # mmsegmentation's ResNetV1c ("-D8" models), with mmseg's head width `channels`: 512, and 128
    # for ResNet-18 (its r18 configs). Their heads are mmseg's too (see make_head).
    "resnet18_v1c": (lambda stride: ResNet(BasicBlock, [2, 2, 2, 2], stride, variant="v1c"), 128),
    "resnet50_v1c": (lambda stride: ResNet(Bottleneck, [3, 4, 6, 3], stride, variant="v1c"), 512),
    "resnet101_v1c": (lambda stride: ResNet(Bottleneck, [3, 4, 23, 3], stride, variant="v1c"), 512),
    # SKD's / CIRKD's deep-stem ResNetV1b ("resnet*_v1s" in CIRKD's code), with the DeepLabV3 widths
    # of CIRKD's 2022 code (its paper's table and its 78.07 teacher): 128 for ResNet-18, 256 else;
    # "_h512": the 512 of its 2025 code (CIRKDV2). These take BGR minus the Caffe mean (build_model).
    "resnet18_v1s": (lambda stride: ResNet(BasicBlock, [2, 2, 2, 2], stride, variant="v1s"), 128),
    "resnet50_v1s": (lambda stride: ResNet(Bottleneck, [3, 4, 6, 3], stride, variant="v1s"), 256),
    "resnet101_v1s": (lambda stride: ResNet(Bottleneck, [3, 4, 23, 3], stride, variant="v1s"), 256),
    "resnet18_v1s_h512": (lambda stride: ResNet(BasicBlock, [2, 2, 2, 2], stride, variant="v1s"), 512),
    "resnet50_v1s_h512": (lambda stride: ResNet(Bottleneck, [3, 4, 6, 3], stride, variant="v1s"), 512),
    "resnet101_v1s_h512": (lambda stride: ResNet(Bottleneck, [3, 4, 23, 3], stride, variant="v1s"), 512),
}


# ----------------------------------------------------------------------------------------------
# Heads. Each takes the backbone's feature dict and returns (logits, feat), where feat is the
# feature right before the final classifier (the one SKD / MGD / CWD distil).

class DeepLabV2Head(nn.Module):
    """DeepLab-v2 ASPP (Chen et al., TPAMI 2018): four 3x3 classifiers with dilation 6/12/18/24
    on the backbone feature, summed. There is no pre-classifier layer, so "feat" is the backbone
    feature itself. The rates are the paper's (set for output stride 8) at every output stride."""

    def __init__(self, in_channels, num_classes, rates=(6, 12, 18, 24), feat_nonnegative=True):
        super().__init__()
        self.classifiers = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate)
                                         for rate in rates)
        self.feat_channels = in_channels
        self.feat_nonnegative = feat_nonnegative   # a ResNet's last feature is post-ReLU

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
    `branch_channels`, upsample, concatenate with the input, 3x3 conv to `channels`, dropout 0.1
    (feat: its output, the classifier's input, as SKD's official x_feat_after_psp, which in train
    mode has been through the dropout), 1x1 classifier. kd-seg's widths: branches in_channels / 4,
    bottleneck 512 at full width; mmsegmentation's PSPHead: both `channels` (512; 128 for R18)."""

    def __init__(self, in_channels, num_classes, channels, branch_channels, bins=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(bin_size), conv_bn_relu(in_channels, branch_channels, 1))
            for bin_size in bins)
        self.bottleneck = conv_bn_relu(in_channels + len(bins) * branch_channels, channels, 3)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feat_channels = channels

    def forward(self, features):
        x = features["out"]
        pyramid = [F.interpolate(stage(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
                   for stage in self.stages]
        feat = self.dropout(self.bottleneck(torch.cat([x] + pyramid, dim=1)))
        return self.classifier(feat), feat


class MMSegASPPHead(nn.Module):
    """mmsegmentation's ASPPHead (DeepLabV3) and, with a low-level branch, its
    DepthwiseSeparableASPPHead (DeepLabV3+), for its published checkpoints. Unlike `ASPP` above:
    the image-pooling branch comes FIRST in the concatenation, and the concatenation goes straight
    into a 3x3 `bottleneck` to `channels` (no 1x1 projection, no dropout 0.5).
    DeepLabV3+ (low_level_width > 0): the atrous branches are depthwise-separable, the bottleneck
    stays ASPPHead's plain 3x3 conv (mmseg's DepthwiseSeparableASPPHead replaces only
    `aspp_modules` and adds `c1_bottleneck` and `sep_bottleneck`); the bottleneck output is
    upsampled to the stride-4 low-level feature, concatenated with its 1x1 projection to
    low_level_width (48; 12 for R18), two separable 3x3 convs.
    feat: the last conv's output; then dropout 0.1 (mmseg: Dropout2d) and the 1x1 classifier."""

    def __init__(self, in_channels, num_classes, channels, rates, low_level_channels=0, low_level_width=0):
        super().__init__()
        separable = low_level_width > 0
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels, 1))
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)] +
            [separable_conv_bn_relu(in_channels, channels, r) if separable else conv_bn_relu(in_channels, channels, 3, r)
             for r in rates])
        self.bottleneck = conv_bn_relu(channels * (len(rates) + 2), channels, 3)
        if separable:
            self.low_level_project = conv_bn_relu(low_level_channels, low_level_width, 1)
            self.fuse = nn.Sequential(separable_conv_bn_relu(channels + low_level_width, channels),
                                      separable_conv_bn_relu(channels, channels))
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feat_channels = channels

    def forward(self, features):
        x = features["out"]
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.bottleneck(torch.cat([pooled] + [branch(x) for branch in self.branches], dim=1))
        if hasattr(self, "fuse"):
            low_level = self.low_level_project(features["low_level"])
            feat = F.interpolate(feat, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
            feat = self.fuse(torch.cat([feat, low_level], dim=1))
        return self.classifier(self.dropout(feat)), feat


def fcn_aux_head(in_channels, num_classes):
    """Auxiliary FCN head (PSPNet's deep supervision, torchvision's FCNHead): 3x3 conv to
    in_channels / 4, dropout 0.1, 1x1 classifier. Only trained with; ignore it at test time."""
    return nn.Sequential(OrderedDict(conv=conv_bn_relu(in_channels, in_channels // 4, 3),
                                     dropout=nn.Dropout(0.1),
                                     classifier=nn.Conv2d(in_channels // 4, num_classes, 1)))


HEADS = ("deeplabv2", "deeplabv3", "deeplabv3plus", "pspnet")
# The whole networks ESPNet and ESPNet-C (class ESPNet, below): name -> (with the decoder, p, q).
# SKD's students have p = 2, q = 8; "espnet_c_p1q2", an ESPNet-C with p = 1 and q = 2 (0.145 M
# parameters, 2.4x fewer than ESPNet), is the student of kd_seg.py's CPU-scale CamVid setting
ESPNETS = {"espnet_c": (False, 2, 8), "espnet": (True, 2, 8), "espnet_c_p1q2": (False, 1, 2)}
MODEL_NAMES = sorted([f"{head}_{backbone}" for head in HEADS for backbone in BACKBONES] + list(ESPNETS))
# the same names in one line, for --help and errors (the list itself is ~2,000 characters)
MODEL_NAMES_HELP = (f"HEAD_BACKBONE with HEAD one of {', '.join(HEADS)} and BACKBONE one of "
                    f"{', '.join(BACKBONES)}; or {', '.join(ESPNETS)}")


def make_head(head, backbone, num_classes, channels, output_stride):
    # DeepLabV3 doubles its atrous rates at output stride 8, where the feature map is twice as
    # large, so that each branch still covers the same part of the image (as the paper does).
    rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
    mmseg = getattr(backbone, "variant", None) == "v1c"  # mmsegmentation's heads on its ResNetV1c
    if head == "deeplabv2":
        # MobileNetV2's last feature is its linear bottleneck: it can be negative
        return DeepLabV2Head(backbone.out_channels, num_classes, feat_nonnegative=isinstance(backbone, ResNet))
    if head == "deeplabv3" and mmseg:
        return MMSegASPPHead(backbone.out_channels, num_classes, channels, rates)
    if head == "deeplabv3":
        return DeepLabV3Head(backbone.out_channels, num_classes, channels, rates)
    if head == "deeplabv3plus" and mmseg:  # c1_channels: 48, and 12 for R18 (channels 128)
        return MMSegASPPHead(backbone.out_channels, num_classes, channels, rates,
                             backbone.low_level_channels, channels * 48 // 512)
    if head == "deeplabv3plus":
        return DeepLabV3PlusHead(backbone.out_channels, backbone.low_level_channels, num_classes, channels, rates)
    if mmseg:
        return PSPHead(backbone.out_channels, num_classes, channels, branch_channels=channels)
    return PSPHead(backbone.out_channels, num_classes, 2 * channels, branch_channels=backbone.out_channels // 4)


# kd-seg's input: RGB in 0-1, minus this mean, over this std (datasets.Normalize; a test checks
# that both files agree: models.py may not import datasets.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)  # SKD's and CIRKD's datasets (B, G, R)
# SKD's CamVid ESPNets (dataset/cityscapes.py, CamVidLight): OpenCV's BGR image minus this mean,
# over this std, both in B, G, R order and 0-255 units
CAMVID_BGR_MEAN = (73.18188461, 82.93553322, 72.41519599)
CAMVID_BGR_STD = (45.3199, 46.1528, 44.9148)


class BGRInput(nn.Module):
    """Turn kd-seg's input (ImageNet-normalised RGB in 0-1 units) into the input a published
    family trained on: BGR in 0-255 units (as OpenCV reads an image) minus `mean`, over `std`
    (B, G, R). CIRKD and SKD's ResNets: the Caffe mean, no std; SKD's CamVid ESPNets: CamVid's
    own mean and std. No state_dict entries (non-persistent buffers), so the models keep their
    sources' keys."""

    def __init__(self, mean, std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bgr_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bgr_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        rgb_255 = (x * self.std + self.mean) * 255
        return (rgb_255.flip(1) - self.bgr_mean) / self.bgr_std


class SegmentationModel(nn.Module):
    """Backbone + head (+ optional auxiliary head); see `build_model` for the outputs.
    `input_transform` (None: identity) converts kd-seg's input into the one the model's family
    was trained on, so a student, eval.py and the Distiller all feed every model the same images."""

    def __init__(self, backbone, head, num_classes, output_stride, aux_head=None, input_transform=None):
        super().__init__()
        self.backbone, self.head, self.aux_head = backbone, head, aux_head
        self.input_transform = input_transform
        self.num_classes, self.output_stride = num_classes, output_stride
        self.feat_channels = head.feat_channels
        # whether "feat" is post-ReLU (FGFI's adaptation layer then ends in a ReLU); every head's is
        # but DeepLab-v2's on MobileNetV2
        self.feat_nonnegative = getattr(head, "feat_nonnegative", True)
        # CIRKD upsamples its logits with align_corners=True; eval.logits_full reads this.
        self.align_corners = False

    def forward(self, x):
        if self.input_transform is not None:
            x = self.input_transform(x)
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


# ----------------------------------------------------------------------------------------------
# ESPNet (Mehta et al., ECCV 2018), with p = 2, q = 8: the compact students of SKD's CamVid and
# Cityscapes tables. A whole network, not a backbone + head: its decoder reuses the encoder's
# inputs at 1/2 and 1/4. Module names, BatchNorm eps 1e-3 and PReLU are those of the official code
# (SKD's network/ESPnet.py, branch cvpr_19), so SKD's published files load as they are.

def _named(**modules):
    """nn.Sequential with named children: state_dict keys `conv.weight`, `bn.weight`, ..."""
    return nn.Sequential(OrderedDict(modules))


def esp_conv(in_channels, out_channels, kernel_size, stride=1, dilation=1):
    """A bias-free conv, 'same' padding (official C / CDilated: the conv sits in `.conv`)."""
    padding = (kernel_size - 1) // 2 * dilation
    return _named(conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False))


def bn_prelu(channels):
    """BatchNorm (eps 1e-3) + PReLU (official BR)."""
    return _named(bn=nn.BatchNorm2d(channels, eps=1e-3), act=nn.PReLU(channels))


def conv_bn_prelu(in_channels, out_channels, kernel_size, stride=1):
    """Conv + BatchNorm (eps 1e-3) + PReLU (official CBR)."""
    return _named(conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False),
                  bn=nn.BatchNorm2d(out_channels, eps=1e-3), act=nn.PReLU(out_channels))


class ESPModule(nn.Module):
    """The efficient spatial pyramid module (paper, Fig. 1): reduce, split, transform, merge.

    Reduce: a 1x1 conv to n = out/5 channels (the downsampling module: a 3x3 stride-2 conv).
    Split and transform: five parallel 3x3 convs dilated 1, 2, 4, 8, 16 (dilation 1 takes the
    remainder, out - 4n channels). Merge: hierarchical feature fusion (HFF): each dilated output is
    summed with those of every smaller dilation before the concatenation, which removes the
    gridding that large dilations leave; then the input is added (residual) where the shapes allow,
    and BatchNorm + PReLU. Official names: `c1`, `d1` ... `d16`; the block's `bn` is a BR, the
    downsampler's `bn` and `act` sit directly in it (DownSamplerB)."""

    def __init__(self, in_channels, out_channels, downsample=False, residual=True):
        super().__init__()
        n = out_channels // 5
        if n < 1:
            raise ValueError(f"an ESP module splits its {out_channels} output channels five ways; it needs at least 5")
        self.c1 = esp_conv(in_channels, n, 3, stride=2) if downsample else esp_conv(in_channels, n, 1)
        self.d1 = esp_conv(n, out_channels - 4 * n, 3)
        self.d2, self.d4, self.d8, self.d16 = (esp_conv(n, n, 3, dilation=d) for d in (2, 4, 8, 16))
        self.residual = residual and not downsample and in_channels == out_channels
        if downsample:
            self.bn, self.act = nn.BatchNorm2d(out_channels, eps=1e-3), nn.PReLU(out_channels)
        else:
            self.bn, self.act = bn_prelu(out_channels), nn.Identity()

    def forward(self, x):
        reduced = self.c1(x)
        fused = [self.d2(reduced)]   # HFF: running sums over the dilations 2, 4, 8, 16
        for branch in (self.d4, self.d8, self.d16):
            fused.append(fused[-1] + branch(reduced))
        merged = torch.cat([self.d1(reduced)] + fused, dim=1)
        return self.act(self.bn(merged + x if self.residual else merged))


class ESPNet(nn.Module):
    """ESPNet-C (decoder=False) and ESPNet (decoder=True), the paper's Fig. 4 (c) and (d).

    Encoder (ESPNet-C): a 3x3 stride-2 conv (16 channels) beside the image at 1/2, then an ESP
    downsampler to 64 channels and p ESP blocks at 1/4 (with the image at 1/4 in the concat), an
    ESP downsampler to 128 and q blocks at 1/8; `feat` is their 256-channel concatenation at 1/8.
    ESPNet-C classifies `feat` with a 1x1 conv (logits at 1/8). ESPNet's light decoder: those 1/8
    logits, upsampled by a 2x2 transposed conv and joined with a 1x1 projection of the 1/4 features
    (an ESP module merges them), up to 1/2, joined with the 1/2 features, a 3x3 conv and a last 2x2
    transposed conv: logits at full resolution. The official code names the 1x1 classifier
    `classifier_1` in ESPNet and `classifier` in ESPNet-C, where ESPNet's `classifier` is the
    last transposed conv; kept, so the files load.

    forward returns {"out": logits (1/8 for ESPNet-C, full size for ESPNet), "feat": the 256-channel
    1/8 feature}. "feat" is what the pair-wise, FGFI, CWD-feature and MGD region terms distil, in
    both: SKD's authors (their repository's issue #32) used the 1/8 feature, "in the middle" of
    ESPNet, and it is the last feature both networks have in common, so either can teach the other.

    Input: SKD's CamVid normalisation (CAMVID_BGR_MEAN / _STD), converted inside the model from
    kd-seg's own, so SKD's files score as published. Kept for the ESPNets kd-seg trains itself
    (one architecture, one input; a fixed affine change of the input costs a model trained from
    scratch nothing). The decoder's transposed convs need sides that are multiples of 8: other
    images are padded at the bottom and right (with 0, the ImageNet mean colour, as kd-seg's crops
    are padded) and the logits cropped back,
    a kd-seg addition (the official code takes only such sizes; SKD's 360x480 needs no padding).
    Initialisation: PyTorch's defaults, as the official code. Inference upsamples with
    align_corners=True, as SKD's eval_esp.py.
    """

    def __init__(self, num_classes, p=2, q=8, decoder=False):
        super().__init__()
        self.input_transform = BGRInput(CAMVID_BGR_MEAN, CAMVID_BGR_STD)
        self.level1 = conv_bn_prelu(3, 16, 3, stride=2)
        self.b1 = bn_prelu(16 + 3)
        self.level2_0 = ESPModule(16 + 3, 64, downsample=True)
        self.level2 = nn.ModuleList(ESPModule(64, 64) for _ in range(p))
        self.b2 = bn_prelu(128 + 3)
        self.level3_0 = ESPModule(128 + 3, 128, downsample=True)
        self.level3 = nn.ModuleList(ESPModule(128, 128) for _ in range(q))
        self.b3 = bn_prelu(256)
        if decoder:
            c = num_classes
            self.classifier_1 = esp_conv(256, c, 1)
            self.br = nn.BatchNorm2d(c, eps=1e-3)
            self.up_l3 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2, bias=False))
            self.level3_C = esp_conv(128 + 3, c, 1)
            self.combine_l2_l3 = nn.Sequential(bn_prelu(2 * c), ESPModule(2 * c, c, residual=False))
            self.up_l2 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2, bias=False), bn_prelu(c))
            self.conv = conv_bn_prelu(16 + 3 + c, c, 3)
            self.classifier = nn.ConvTranspose2d(c, c, 2, stride=2, bias=False)
        else:
            self.classifier = esp_conv(256, num_classes, 1)
        self.decoder = decoder
        self.num_classes, self.output_stride, self.feat_channels = num_classes, 8, 256
        self.feat_nonnegative = False   # "feat" comes out of a PReLU
        self.align_corners = True

    def forward(self, x):
        height, width = x.shape[-2:]
        if self.decoder and (height % 8 or width % 8):   # see the class docstring
            x = F.pad(x, (0, -width % 8, 0, -height % 8))
        x = self.input_transform(x)
        image_2 = F.avg_pool2d(x, 3, stride=2, padding=1)   # the image at 1/2 and 1/4 (official
        image_4 = F.avg_pool2d(image_2, 3, stride=2, padding=1)   # InputProjectionA)
        level1 = self.b1(torch.cat([self.level1(x), image_2], dim=1))                 # 1/2, 19
        down2 = blocks2 = self.level2_0(level1)
        for block in self.level2:
            blocks2 = block(blocks2)
        level2 = self.b2(torch.cat([blocks2, down2, image_4], dim=1))                 # 1/4, 131
        down3 = blocks3 = self.level3_0(level2)
        for block in self.level3:
            blocks3 = block(blocks3)
        feat = self.b3(torch.cat([down3, blocks3], dim=1))                             # 1/8, 256
        if not self.decoder:
            return {"out": self.classifier(feat), "feat": feat}
        up = self.up_l3(self.br(self.classifier_1(feat)))                              # 1/4
        up = self.up_l2(self.combine_l2_l3(torch.cat([self.level3_C(level2), up], dim=1)))   # 1/2
        out = self.classifier(self.conv(torch.cat([up, level1], dim=1)))               # 1/1
        return {"out": out[..., :height, :width], "feat": feat}


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


def read_weights(source, what="checkpoint"):
    """torch.load a file path or URL safely (weights_only=True: no code runs), or raise one line."""
    is_url = str(source).startswith(("http://", "https://"))
    if not is_url and not Path(source).is_file():
        raise FileNotFoundError(f"{what} {source} not found")
    try:
        if is_url:  # cached under ~/.cache/torch/hub/checkpoints, as torchvision does
            return torch.hub.load_state_dict_from_url(str(source), map_location="cpu", weights_only=True)
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # no internet, a truncated download, not a torch file: name the source
        first_line = (str(error).strip().splitlines() or [""])[0].split(". ")[0]  # torch's advice to
        # retry with an unsafe load (code execution) is left out on purpose
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        if unsafe:  # e.g. mmsegmentation 1.x training files: `message_hub` pickles mmengine objects
            module, name = unsafe.group(1).rsplit(".", 1)
            raise ValueError(
                f"{what} {source} holds Python objects ({unsafe.group(1)}) that a safe load (weights_only=True) "
                f"refuses; if it is an mmsegmentation file with `message_hub`, keep only its weights, allowing "
                f"the class the load names (with mmengine installed; repeat for each class it names next): "
                f"python -c \"import torch; from {module} import {name}; torch.serialization.add_safe_globals("
                f"[{name}]); c = torch.load('IN.pth', weights_only=True); "
                f"torch.save({{'state_dict': c['state_dict']}}, 'OUT.pth')\"") from None
        raise ValueError(f"{what} {source} cannot be loaded ({type(error).__name__}: {first_line})") from None


def check_state_dict(state_dict, expected, what, rename=None):
    """Raise one ValueError line naming the missing, unexpected and wrong-shape keys (the first
    three of each) of `state_dict` against `expected`; `rename` maps a key to the name to show."""
    rename = rename or (lambda key: key)
    missing = [rename(k) for k in expected if k not in state_dict]
    unexpected = [rename(k) for k in state_dict if k not in expected]
    wrong_shape = [f"{rename(k)} {list(state_dict[k].shape)} vs {list(expected[k].shape)}" for k in expected
                   if k in state_dict and state_dict[k].shape != expected[k].shape]
    problems = [f"{kind} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for kind, keys in [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)]
                if keys]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def with_num_batches_tracked(state_dict, expected):
    """`state_dict` plus any BatchNorm `num_batches_tracked` buffer of `expected` it lacks (taken
    from `expected`, the model's own): files saved by torch before 0.4.1 have none (CIRKD's
    resnet101-imagenet.pth and many ImageNet files), and torch's load_state_dict accepts them.
    Only those keys may be missing; the strict check still names any other."""
    missing = {k: v for k, v in expected.items() if k.endswith(".num_batches_tracked") and k not in state_dict}
    return {**state_dict, **missing}


def load_backbone_weights(backbone, source):
    """Load an ImageNet checkpoint (file path or URL) into `backbone` with strict=True.

    torchvision's classifier (`fc.*`, `classifier.*`) and MobileNetV2's last 1x1 conv
    (`features.18.*`) are dropped first; anything else that does not fit raises ValueError.
    The deep-stem backbones take their own sources' files as they are: mmsegmentation's
    ResNetV1c (`stem.*`, possibly inside {"state_dict": ...}) and CIRKD's `resnet*-imagenet.pth`.
    """
    state_dict = read_weights(source, "pretrained checkpoint")
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]  # mmcv / mmengine files wrap the weights
    if not isinstance(state_dict, dict):
        raise ValueError(f"pretrained checkpoint {source} is not a state_dict (got {type(state_dict).__name__})")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "classifier.", "features.18."))}
    state_dict = with_num_batches_tracked(state_dict, backbone.state_dict())
    check_state_dict(state_dict, backbone.state_dict(),
                     f"pretrained checkpoint {source} does not fit the {type(backbone).__name__} backbone")
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
        raise ValueError(f"unknown model {name!r}; expected {MODEL_NAMES_HELP}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name in ESPNETS:
        return build_espnet(name, num_classes, output_stride, pretrained, aux)
    backbone = build_backbone(backbone_name, output_stride)
    head_channels = BACKBONES[backbone_name][1]
    caffe_input = getattr(backbone, "variant", None) == "v1s"  # SKD / CIRKD: BGR minus the Caffe mean
    model = SegmentationModel(backbone, make_head(head, backbone, num_classes, head_channels, output_stride),
                              num_classes, output_stride,
                              fcn_aux_head(backbone.middle_channels, num_classes) if aux else None,
                              BGRInput(CAFFE_BGR_MEAN) if caffe_input else None)
    model.align_corners = caffe_input
    model.name = name
    init_weights(model.head)
    if aux:
        init_weights(model.aux_head)
    if pretrained is not None:
        load_backbone_weights(model.backbone, pretrained)
    return model


def build_espnet(name, num_classes, output_stride=8, pretrained=None, aux=False):
    """ESPNet ("espnet") or ESPNet-C ("espnet_c") with p = 2, q = 8, as SKD's students; options
    the architecture does not have are refused in one line."""
    if output_stride != 8:
        raise ValueError(f"{name}: its encoder has output stride 8 (got --output-stride {output_stride})")
    if pretrained is not None:
        raise ValueError(f"{name}: there are no ImageNet weights for ESPNet's encoder; it trains from scratch")
    if aux:
        raise ValueError(f"{name}: ESPNet has no auxiliary head (use --aux-weight 0)")
    decoder, p, q = ESPNETS[name]
    if decoder and num_classes < 5:
        raise ValueError(f"{name}: its decoder splits the class channels five ways (an ESP module), so it needs "
                         f"at least 5 classes, got {num_classes}; espnet_c takes any class count")
    model = ESPNet(num_classes, p, q, decoder)
    model.name = name
    return model


def count_parameters(model):
    """Number of parameters (trainable or not), e.g. for kd_seg.py's tables."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Published checkpoints: torchvision, mmsegmentation and CIRKD files, recognised from their keys
# and shapes, renamed to kd-seg's keys and loaded strictly. Each layout is a table of (source key
# prefix, kd-seg key prefix) rows: the same architecture, other names. docs/PUBLISHED.md lists the files.

def _conv_module(source, ours):
    """mmcv's ConvModule (`conv`, `bn`) <-> conv_bn_relu (`0`, `1`)."""
    return [(f"{source}.conv.", f"{ours}.0."), (f"{source}.bn.", f"{ours}.1.")]


def _separable_module(source, ours):
    """mmcv's DepthwiseSeparableConvModule <-> separable_conv_bn_relu."""
    return (_conv_module(f"{source}.depthwise_conv", f"{ours}.depthwise") +
            _conv_module(f"{source}.pointwise_conv", f"{ours}.pointwise"))


# torchvision's deeplabv3_resnet50/101: DeepLabHead = Sequential(ASPP, 3x3 conv, BN, ReLU, 1x1
# classifier); ASPP.convs = [1x1, three atrous 3x3, pooling (AdaptiveAvgPool2d, conv, BN, ReLU)],
# concatenated in that order and projected (1x1, BN, ReLU, Dropout 0.5): kd-seg's DeepLabV3Head.
TORCHVISION_DEEPLABV3 = (
    [("backbone.", "backbone.")] +
    [(f"classifier.0.convs.{i}.", f"head.aspp.branches.{i}.") for i in range(4)] +
    [("classifier.0.convs.4.1.", "head.aspp.image_pool.1.0."), ("classifier.0.convs.4.2.", "head.aspp.image_pool.1.1."),
     ("classifier.0.project.0.", "head.aspp.project.0.0."), ("classifier.0.project.1.", "head.aspp.project.0.1."),
     ("classifier.1.", "head.conv.0."), ("classifier.2.", "head.conv.1."), ("classifier.4.", "head.classifier."),
     ("aux_classifier.0.", "aux_head.conv.0."), ("aux_classifier.1.", "aux_head.conv.1."),
     ("aux_classifier.4.", "aux_head.classifier.")])

# mmsegmentation: `backbone.*` (ResNetV1c, same names as ours), `decode_head.*`, and the FCNHead
# `auxiliary_head.*` (num_convs=1, no concat_input: kd-seg's fcn_aux_head).
_MMSEG_AUX = _conv_module("auxiliary_head.convs.0", "aux_head.conv") + [("auxiliary_head.conv_seg.", "aux_head.classifier.")]
MMSEG_PSPNET = (
    [("backbone.", "backbone.")] +
    sum((_conv_module(f"decode_head.psp_modules.{i}.1", f"head.stages.{i}.1") for i in range(4)), []) +
    _conv_module("decode_head.bottleneck", "head.bottleneck") + [("decode_head.conv_seg.", "head.classifier.")] + _MMSEG_AUX)
MMSEG_DEEPLABV3 = (
    [("backbone.", "backbone.")] + _conv_module("decode_head.image_pool.1", "head.image_pool.1") +
    sum((_conv_module(f"decode_head.aspp_modules.{i}", f"head.branches.{i}") for i in range(4)), []) +
    _conv_module("decode_head.bottleneck", "head.bottleneck") + [("decode_head.conv_seg.", "head.classifier.")] + _MMSEG_AUX)
MMSEG_DEEPLABV3PLUS = (
    [("backbone.", "backbone.")] + _conv_module("decode_head.image_pool.1", "head.image_pool.1") +
    _conv_module("decode_head.aspp_modules.0", "head.branches.0") +  # the 1x1 branch stays a ConvModule
    sum((_separable_module(f"decode_head.aspp_modules.{i}", f"head.branches.{i}") for i in range(1, 4)), []) +
    _conv_module("decode_head.bottleneck", "head.bottleneck") +   # ASPPHead's plain 3x3 ConvModule
    _conv_module("decode_head.c1_bottleneck", "head.low_level_project") +
    _separable_module("decode_head.sep_bottleneck.0", "head.fuse.0") +
    _separable_module("decode_head.sep_bottleneck.1", "head.fuse.1") +
    [("decode_head.conv_seg.", "head.classifier.")] + _MMSEG_AUX)

# CIRKD's DeepLabV3 (models/deeplabv3.py): `pretrained.*` (ResNetV1b deep stem, same names as our
# "v1s"), _ASPP b0 (1x1), b1-b3 (atrous, `.block`), b4 (pooling, `.gap`) in that order, project
# (1x1, BN, ReLU, Dropout 0.5), head.block (3x3, BN, ReLU, Dropout 0.1, 1x1) and auxlayer.block
# (_FCNHead: 3x3 to in/4, BN, ReLU, Dropout 0.1, 1x1): kd-seg's DeepLabV3Head and fcn_aux_head.
CIRKD_DEEPLABV3 = (
    [("pretrained.", "backbone."), ("head.aspp.b0.", "head.aspp.branches.0.")] +
    [(f"head.aspp.b{i}.block.", f"head.aspp.branches.{i}.") for i in range(1, 4)] +
    [("head.aspp.b4.gap.1.", "head.aspp.image_pool.1.0."), ("head.aspp.b4.gap.2.", "head.aspp.image_pool.1.1."),
     ("head.aspp.project.0.", "head.aspp.project.0.0."), ("head.aspp.project.1.", "head.aspp.project.0.1."),
     ("head.block.0.", "head.conv.0."), ("head.block.1.", "head.conv.1."), ("head.block.4.", "head.classifier."),
     ("auxlayer.block.0.", "aux_head.conv.0."), ("auxlayer.block.1.", "aux_head.conv.1."),
     ("auxlayer.block.4.", "aux_head.classifier.")])

PUBLISHED_LAYOUTS = ("torchvision deeplabv3_resnet50/101; mmsegmentation PSPNet / DeepLabV3 / DeepLabV3+ on "
                     "ResNetV1c-18/50/101 -D8; CIRKD DeepLabV3 on deep-stem ResNet-18/50/101; SKD's ESPNet / "
                     "ESPNet-C")


def rename_key(key, table, inverse=False):
    """Rename by the first row whose prefix matches (source -> kd-seg; inverse: back). A key no
    row matches is kept as it is, and so comes out as 'unexpected' in the check."""
    for source, ours in table:
        old, new = (ours, source) if inverse else (source, ours)
        if key.startswith(old):
            return new + key[len(old):]
    return key


def rename_keys(state_dict, table, inverse=False):
    return {rename_key(key, table, inverse): value for key, value in state_dict.items()}


def _resnet_depth(state_dict, prefix):
    """18, 50 or 101 from the number of layer3 blocks and the block type, else None."""
    blocks = {key[len(prefix) + 7:].split(".")[0] for key in state_dict if key.startswith(prefix + "layer3.")}
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
    return {(2, False): 18, (6, True): 50, (23, True): 101}.get((len(blocks), bottleneck))


def published_layout(state_dict, meta=None):
    """(kd-seg model name, source -> kd-seg key table, class count, has aux head) of a published
    state_dict, recognised from its keys and shapes; ValueError (one line) when it is none of them."""
    def classes(key):
        return state_dict[key].shape[0]
    if "classifier.0.convs.0.0.weight" in state_dict and "classifier.4.weight" in state_dict:
        depth = _resnet_depth(state_dict, "backbone.")
        if depth not in (50, 101):
            raise ValueError("a torchvision DeepLabV3 whose backbone is not ResNet-50/101")
        return (f"deeplabv3_resnet{depth}", TORCHVISION_DEEPLABV3, classes("classifier.4.weight"),
                "aux_classifier.4.weight" in state_dict)
    if "decode_head.conv_seg.weight" in state_dict:
        heads = [("decode_head.psp_modules.", "pspnet", MMSEG_PSPNET),
                 ("decode_head.c1_bottleneck.", "deeplabv3plus", MMSEG_DEEPLABV3PLUS),
                 ("decode_head.aspp_modules.", "deeplabv3", MMSEG_DEEPLABV3)]
        found = [(head, table) for prefix, head, table in heads if any(k.startswith(prefix) for k in state_dict)]
        if not found:
            raise ValueError("an mmsegmentation model whose decode head is not PSPHead, ASPPHead or "
                             "DepthwiseSeparableASPPHead")
        if "backbone.stem.0.weight" not in state_dict:
            raise ValueError("an mmsegmentation model whose backbone is not ResNetV1c (no deep stem `backbone.stem`)")
        depth = _resnet_depth(state_dict, "backbone.")
        if depth is None:
            raise ValueError("an mmsegmentation model whose backbone is not ResNetV1c-18/50/101")
        # -D16 models (strides (1, 2, 2, 1), multi-grid) have the same shapes: only the config says
        config = " ".join(str(v) for k, v in (meta or {}).items() if k in ("config", "cfg"))
        if re.search(r"dilations\s*=\s*[(\[]\s*1,\s*1,\s*1,\s*2", config) or "multi_grid=(" in config:
            raise ValueError("an mmsegmentation -D16 model (its config dilates only the last stage); kd-seg "
                             "takes the -D8 ones")
        head, table = found[0]
        return (f"{head}_resnet{depth}_v1c", table, classes("decode_head.conv_seg.weight"),
                "auxiliary_head.conv_seg.weight" in state_dict)
    if "head.aspp.b0.0.weight" in state_dict and "pretrained.conv1.weight" in state_dict:
        if "pretrained.conv3.weight" not in state_dict:
            raise ValueError("a CIRKD DeepLabV3 on a 'vanilla' ResNet (7x7 stem); kd-seg takes the deep-stem ones")
        depth = _resnet_depth(state_dict, "pretrained.")
        if depth is None:
            raise ValueError("a CIRKD DeepLabV3 whose backbone is not ResNet-18/50/101")
        wide = classes("head.aspp.b0.0.weight") == 512  # CIRKDV2's heads (2025); 2022's: 128 / 256
        return (f"deeplabv3_resnet{depth}_v1s{'_h512' if wide else ''}", CIRKD_DEEPLABV3, classes("head.block.4.weight"),
                "auxlayer.block.4.weight" in state_dict)
    if "level3_0.c1.conv.weight" in state_dict and "b3.bn.weight" in state_dict:   # SKD's ESPNets: our own names
        name, classifier = (("espnet", "classifier_1.conv.weight") if "classifier_1.conv.weight" in state_dict
                            else ("espnet_c", "classifier.conv.weight"))
        blocks = [len({key.split(".")[1] for key in state_dict if key.startswith(level + ".")})
                  for level in ("level2", "level3")]
        if blocks != [2, 8]:
            raise ValueError(f"an ESPNet with p = {blocks[0]}, q = {blocks[1]}; kd-seg builds SKD's p = 2, q = 8")
        if classifier not in state_dict:
            raise ValueError(f"an ESPNet without its classifier ({classifier})")
        return name, [], classes(classifier), False
    raise ValueError(f"neither a kd-seg checkpoint nor a published layout kd-seg knows ({PUBLISHED_LAYOUTS})")


def load_published(source, name=None):
    """A published segmentation checkpoint as a kd-seg model (CPU, eval mode), or ValueError.

    source: a file path (read with weights_only=True), or what torch.load returned for one: a plain
      state_dict (torchvision, CIRKD) or a dict with "state_dict" and "meta" (mmsegmentation).
    name: optional `build_model` name the file must hold (no layout needs it to be recognised).
    The model has the source's architecture (`model.name`), class count, auxiliary head when the
    file has one, and input convention: every model takes kd-seg's ImageNet-normalised RGB images
    and converts them itself where its source trained on others (CIRKD: BGR minus the Caffe mean;
    SKD's ESPNets: BGR minus CamVid's mean, over its std).
    Every tensor must fit: missing, unexpected and wrong-shape keys are named (source names).
    """
    what = f"checkpoint {source}" if isinstance(source, (str, Path)) else "published state_dict"
    checkpoint = source
    if isinstance(source, (str, Path)):
        try:
            checkpoint = read_weights(source, "checkpoint")
        except ValueError as error:
            if "weights_only=True" in str(error):  # objects a safe load refuses: the line says what to do
                raise
            raise ValueError(f"{error}: not a kd-seg checkpoint, nor a published one") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{what}: not a state_dict (got {type(checkpoint).__name__})")
    state_dict, meta = checkpoint, None
    if isinstance(checkpoint.get("state_dict"), dict):  # mmsegmentation: {"meta": ..., "state_dict": ...}
        state_dict, meta = checkpoint["state_dict"], checkpoint.get("meta")
    if state_dict and all(key.startswith("module.") for key in state_dict):  # saved from inside DDP
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    try:
        model_name, table, num_classes, aux = published_layout(state_dict, meta if isinstance(meta, dict) else None)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
    if name is not None and name != model_name:
        raise ValueError(f"{what}: holds {model_name}, expected {name}")
    model = build_model(model_name, num_classes, output_stride=8, aux=aux)
    ours = with_num_batches_tracked(rename_keys(state_dict, table), model.state_dict())
    source_name = {rename_key(key, table): key for key in state_dict}  # report the file's own names
    check_state_dict(ours, model.state_dict(), f"{what} does not fit {model_name}",
                     rename=lambda key: source_name.get(key, rename_key(key, table, inverse=True)))
    model.load_state_dict(ours, strict=True)
    return model.eval()
