"""Distillation losses for semantic segmentation: one small, pure, unweighted term per idea.

Every term takes tensors and returns a scalar tensor. No term applies its own loss weight
(lambda_gp, lambda_1, lambda_2, ...): weights are applied in one place, by the caller (the
`Distiller` below), so that docs/PAPER_VS_CODE.md's "paper value vs code default" table maps to one dict.
The specification with every formula, normalisation and default is docs/METHODS.md.

Papers:
  Xie et al., BMVC 2018   "Improving Fast Segmentation With Teacher-student Learning"
  Liu et al., CVPR 2019   "Structured Knowledge Distillation for Semantic Segmentation" (SKD)
  Wang et al., CVPR 2019  "Distilling Object Detectors with Fine-grained Feature Imitation"
                          (FGFI; adapted here to segmentation)
  Zhu et al., 2020        "Improving Semantic Segmentation via Self-Training" (pseudo labels:
                          plain cross-entropy on teacher labels, see `pseudo_label_ce`)
  Qin et al., ECCV 2022   "Multi-Granularity Distillation for Lightweight Semi-supervised
                          Semantic Segmentation" (MGD)
  Shu et al., ICCV 2021   "Channel-wise Knowledge Distillation for Dense Prediction" (CWD)

Index (term -> function):
  resize teacher map to student size          resize_like
  Xie L_p / SKD pixel-wise                    pixel_kd
  Xie L_c (first-order, a reconstruction)     consistency_kd
  SKD pair-wise                               pairwise_kd
  SKD holistic (WGAN-GP)                      Discriminator, gradient_penalty,
                                              discriminator_loss, generator_loss
  FGFI imitation                              connected_components, imitation_mask,
                                              dilated_class_mask, adaptation_layer,
                                              imitation_loss
  MGD image-level / region-level              mgd_image_level, mgd_region_level
  MGD's input resolution                      mgd_upsample
  MGD pixel-level, Xie/Zhu pseudo labels      pseudo_label_ce
  supervised OHEM cross-entropy (MGD/CPS)     ohem_ce
  CWD (logits; features: Distiller cwd_feat)  cwd
  FitNet feature KD (a reference, no paper's) fitnet_loss
  attention transfer (adding a term: example) attention_transfer

Usage (the teacher is frozen and in eval mode):
  with torch.no_grad():
      teacher_logits = teacher(images)["out"]
  student_logits = student(images)["out"]
  teacher_logits = resize_like(teacher_logits, student_logits)
  loss = task_loss + kd_weight * pixel_kd(student_logits, teacher_logits)

Numerics: callers run under AMP, so every term casts its inputs to float32 (`_upcast`) before
softmax / log / KL / temperature / squared-sum math: float16 overflows above 65504 and its
exp/log lose the small probabilities the KL terms depend on.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


# ---------------------------------------------------------------------------------------
# Helpers

def _upcast(x):
    """float16 / bfloat16 -> float32; float32 and float64 unchanged.

    Under AMP the logits arrive in half precision; the loss math must run in float32.
    float64 is kept so that torch.autograd.gradcheck can test the terms.
    """
    return x if x.dtype == torch.float64 else x.float()


def resize_like(x, ref):
    """Bilinearly resize `x` (N, C, h, w) to the spatial size of `ref` (align_corners=False).

    The one place where a teacher map is brought to the student's resolution (docs/METHODS.md,
    general rules); every loss below expects equal spatial sizes. No-op when sizes match.
    """
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------
# Xie et al. 2018 (zero- and first-order knowledge) and SKD pixel-wise

def pixel_kd(student_logits, teacher_logits, tau=1.0):
    """Xie L_p = SKD pixel-wise: tau^2 * (1/|Omega|) sum_i KL(p_t,i || p_s,i), mean over N*H*W.

    p = softmax(z / tau) over classes. Same value as CIRKD's CriterionKD. The official SKD
    code instead sums the soft cross-entropy -sum p_t log p_s over all N*H*W pixels and
    divides by H*W only: N times this mean (plus the constant teacher entropy), so its
    lambda_pi = 10 corresponds to about 10 * N here. The weight is applied by the caller.
    """
    n, _, h, w = student_logits.shape
    # log_softmax for both sides: log(softmax(z)) underflows to -inf for confident pixels
    log_p_s = F.log_softmax(_upcast(student_logits) / tau, dim=1)
    log_p_t = F.log_softmax(_upcast(teacher_logits) / tau, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return tau ** 2 * kl / (n * h * w)


# The 8 offsets (dy, dx) of a 3x3 window without its centre.
_NEIGHBOUR_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _neighbour_differences(probs):
    """D_i,k = ||p_i - p_i+k||_2^2 for the 8 neighbours k: (N, C, H, W) -> (N, 8, H, W)."""
    h, w = probs.shape[-2:]
    # replicate padding: an out-of-image neighbour equals the border pixel, difference 0
    padded = F.pad(probs, (1, 1, 1, 1), mode="replicate")
    diffs = [((probs - padded[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]) ** 2).sum(dim=1)
             for dy, dx in _NEIGHBOUR_OFFSETS]
    return torch.stack(diffs, dim=1)


def consistency_kd(student_logits, teacher_logits, average_neighbours=False):
    """Xie L_c (RECONSTRUCTION): (1/(8|Omega|)) sum_i sum_k (D_s,i,k - D_t,i,k)^2.

    D_m,i,k = ||p_m,i - p_m,i+k||^2 over the 8 neighbours k (replicate padding), m in {s, t}.
    This is the project's reconstruction from secondary descriptions, NOT the paper's own
    formula, which could not be obtained (docs/METHODS.md, section 1). `average_neighbours=True`
    first averages over k (C_m,i = mean_k D_m,i,k) and then takes the mean over |Omega| of
    (C_s,i - C_t,i)^2; it is an option, not the default. Unweighted (weight b applied outside).
    """
    # Reconstruction, not the paper's equation: the centre-surround difference of every
    # 3x3 patch, computed for both networks and aligned with a squared error.
    diff_s = _neighbour_differences(F.softmax(_upcast(student_logits), dim=1))
    diff_t = _neighbour_differences(F.softmax(_upcast(teacher_logits), dim=1))
    if average_neighbours:
        diff_s, diff_t = diff_s.mean(dim=1), diff_t.mean(dim=1)
    return ((diff_s - diff_t) ** 2).mean()


# ---------------------------------------------------------------------------------------
# SKD pair-wise

def _cosine_affinity(nodes, detach_norm):
    """a_ij = g_i . g_j / (||g_i|| ||g_j||) for nodes (N, C, M) -> (N, M, M)."""
    # +1e-8 as in the official code, so an all-zero node (post-ReLU feature) gives 0, not NaN
    norm = nodes.norm(dim=1, keepdim=True) + 1e-8
    if detach_norm:
        norm = norm.detach()
    nodes = nodes / norm
    return nodes.transpose(1, 2) @ nodes


def pairwise_kd(student_feat, teacher_feat, scale=0.5, kernel=None, detach_norm=True):
    """SKD pair-wise: (1/(N M^2)) sum_ij (a_s,ij - a_t,ij)^2, mean over N*M*M node pairs.

    Nodes: max-pool the feature with kernel = stride = K (ceil_mode=True); official K =
    int(scale * size) per spatial dimension (scale 0.5 turns 65x65 into 3x3 nodes); pass
    `kernel` for a fixed K (CIRKD uses 2). a = cosine similarity of node vectors, so teacher
    and student channel counts may differ. The official code detaches the norm (no gradient
    through the normaliser); `detach_norm=False` gives F.normalize's gradient, same value.
    Unweighted (official lambda_pa = 0.5 applied outside).
    """
    h, w = student_feat.shape[-2:]
    if kernel is None:
        # official: patch = int(scale * size), guarded so tiny maps still pool to >= 1 cell
        kernel = (max(1, int(scale * h)), max(1, int(scale * w)))
    nodes_s = F.max_pool2d(_upcast(student_feat), kernel, stride=kernel, ceil_mode=True)
    nodes_t = F.max_pool2d(_upcast(teacher_feat), kernel, stride=kernel, ceil_mode=True)
    affinity_s = _cosine_affinity(nodes_s.flatten(2), detach_norm)
    affinity_t = _cosine_affinity(nodes_t.flatten(2), detach_norm)
    return ((affinity_s - affinity_t) ** 2).mean()


# ---------------------------------------------------------------------------------------
# SKD holistic: a Wasserstein GAN with gradient penalty; the student is the generator.

class SelfAttention(nn.Module):
    """SAGAN self-attention block (Zhang et al. 2019), as used in SKD's discriminator.

    out = gamma * attention(x) + x, with gamma initialised to 0 so the block starts as the
    identity and the discriminator learns how much global context to mix in.
    """

    def __init__(self, channels):
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, 1)
        self.key = nn.Conv2d(channels, channels // 8, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n, c, h, w = x.shape
        query = self.query(x).flatten(2).transpose(1, 2)      # (N, HW, C/8)
        key = self.key(x).flatten(2)                          # (N, C/8, HW)
        attention = F.softmax(query @ key, dim=-1)            # (N, HW, HW), rows sum to 1
        out = self.value(x).flatten(2) @ attention.transpose(1, 2)
        return self.gamma * out.view(n, c, h, w) + x


class Discriminator(nn.Module):
    """SKD holistic discriminator D: a score per segmentation map (higher = "teacher-like").

    Official architecture (networks/sagan_models.py): four 4x4 stride-2 spectral-normalised
    convs (64, 128, 256, 512 channels, LeakyReLU 0.1), self-attention after the 256- and
    512-channel convs, a final 4x4 conv to 1 channel. Each input variant as its source has it:
    conditional (CVPR paper, default; network/discriminator.py on the official cvpr_19 branch)
    = cat(image resized to the logits bilinearly with align_corners=True, softmax(z)), 3 + C
    channels, no input BatchNorm; `conditional=False` (official master) = the raw logits, C
    channels, through a BatchNorm first (its preprocess_GAN_mode 1). `input_bn` overrides.
    Build the input with `discriminator.make_input(image, logits)`. forward returns (N,)
    scores: the final conv's map averaged over space (1x1 for the official 65x65 logits).
    `width` (official 64) scales every conv; the CPU demo uses 16, since on small maps the
    512-channel convs cost several times the student's own step.
    Spectral norm is torch's parametrization: 15 power iterations at construction, then one
    per forward in train mode, u = W v / ||W v|| before v = W^T u / ||W^T u||. The official
    SpectralNorm (networks/spectral.py) starts from random u, v without warm-up, updates v
    before u, and iterates in eval mode too. Both estimate W's largest singular value; the
    Distiller never puts D in eval mode.
    """

    # four stride-2 convs: below 16 pixels the last one would get an empty map
    min_size = 16

    def __init__(self, num_classes, conditional=True, input_bn=None, width=64):
        super().__init__()
        self.conditional = conditional
        in_channels = num_classes + 3 if conditional else num_classes
        if input_bn is None:   # as each variant's source: BatchNorm on master's logits only
            input_bn = not conditional
        self.input_norm = nn.BatchNorm2d(in_channels) if input_bn else nn.Identity()

        def down(cin, cout):
            return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)),
                                 nn.LeakyReLU(0.1))

        self.conv1 = down(in_channels, width)
        self.conv2 = down(width, 2 * width)
        self.conv3 = down(2 * width, 4 * width)
        self.attention1 = SelfAttention(4 * width)
        self.conv4 = down(4 * width, 8 * width)
        self.attention2 = SelfAttention(8 * width)
        self.last = nn.Conv2d(8 * width, 1, 4)   # not spectral-normalised, as in the official code

    def make_input(self, image, logits):
        """D's input for one network's logits (N, C, h, w); `image` (N, 3, H, W) is resized.

        Conditional: cat(resize(image), softmax(z)), the image resized bilinearly with
        align_corners=True as on the official cvpr_19 branch; otherwise the logits. Detach the
        result before the D step; do not detach it for the student's generator term. Logits smaller
        than min_size (the CPU demo's 12x12 maps) are bilinearly upsampled to min_size first.
        """
        h, w = logits.shape[-2:]
        if min(h, w) < self.min_size:
            logits = F.interpolate(_upcast(logits), size=(max(h, self.min_size), max(w, self.min_size)),
                                   mode="bilinear", align_corners=False)
        if not self.conditional:
            return _upcast(logits)
        probs = F.softmax(_upcast(logits), dim=1)  # float32: softmax under AMP
        image = F.interpolate(_upcast(image), size=logits.shape[-2:], mode="bilinear",
                              align_corners=True)
        return torch.cat([image, probs], dim=1)

    def forward(self, x):
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"Discriminator: input maps must be at least {self.min_size}x"
                             f"{self.min_size}, got {tuple(x.shape[-2:])}")
        x = self.input_norm(x)
        x = self.attention1(self.conv3(self.conv2(self.conv1(x))))
        x = self.attention2(self.conv4(x))
        # The official code assumed 65x65 logits (a 4x4 map here). Smaller inputs give a
        # smaller map; zero-pad it to the final conv's 4x4 window instead of failing.
        pad_h, pad_w = max(0, 4 - x.shape[-2]), max(0, 4 - x.shape[-1])
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return self.last(x).mean(dim=(1, 2, 3))


def gradient_penalty(discriminator, real, fake):
    """WGAN-GP penalty (Gulrajani et al. 2017): E[(||grad_x D(x_hat)||_2 - 1)^2], mean over N.

    x_hat = alpha * real + (1 - alpha) * fake, alpha ~ U(0, 1) per sample; real = teacher,
    fake = student D inputs (from `make_input`; a conditional input's image channels are
    equal in both and stay fixed). Unweighted: lambda_gp (official 10) is applied outside.
    """
    # Always float32 with autocast off: the official code produced NaN D losses, and a
    # double backward in float16 overflows easily.
    with torch.autocast(device_type=real.device.type, enabled=False):
        real, fake = _upcast(real.detach()), _upcast(fake.detach())
        alpha = torch.rand(real.shape[0], *[1] * (real.dim() - 1),
                           device=real.device, dtype=real.dtype)
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        scores = discriminator(x_hat)
        # create_graph=True: the penalty itself is differentiated in the D step
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        # +1e-12 keeps the sqrt differentiable when a gradient is exactly zero
        grad_norm = (grad.flatten(1).pow(2).sum(dim=1) + 1e-12).sqrt()
        return ((grad_norm - 1) ** 2).mean()


def discriminator_loss(d_fake, d_real):
    """SKD / WGAN critic loss: E[D(s)] - E[D(t)] (means over the batch; add lambda_gp * GP)."""
    return _upcast(d_fake).mean() - _upcast(d_real).mean()


def generator_loss(d_fake):
    """SKD holistic term for the student: L_ho = -E[D(s)] (official lambda_d = 0.1 outside)."""
    return -_upcast(d_fake).mean()


# ---------------------------------------------------------------------------------------
# FGFI (Wang et al. 2019), adapted to segmentation (docs/METHODS.md, section 3)

def connected_components(mask):
    """8-connected components of a boolean mask (H, W) or (N, H, W), without scipy.

    Returns int64 labels of the same shape: 0 = background, 1..K = components, numbered
    consecutively across the whole batch (a component never spans two images).
    Method: label propagation with pointer jumping (a parallel union-find). Every foreground
    pixel p starts with the label p + 1, read as a pointer to pixel p (itself). Each round,
    (1) hook: a 3x3 max-pool finds the largest label among the 8 neighbours; the pixel and
    the root its label points to both take it; (2) compress: every pixel follows pointers
    (label L -> label of pixel L - 1) until it reaches a root. Labels only grow and only
    ever name pixels of the same component, so when a round changes nothing every component
    carries one label. Rounds grow roughly with the log of an object's length, so even
    snake-shaped objects take well under a second at 512x512 on a CPU.
    """
    single = mask.dim() == 2
    mask = mask.reshape(-1, *mask.shape[-2:]).bool()
    n, h, w = mask.shape
    foreground = mask.view(n, h * w).float()
    # labels are unique within an image only (max-pool never crosses images), so they stay
    # below H*W + 1 and are exact in float32 (exact integers up to 2^24 = 16.7M pixels)
    labels = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32) * foreground

    def pointed_pixel(labels):   # label L names pixel L - 1; background (0) -> pixel 0
        return (labels.long() - 1).clamp(min=0)

    while True:
        previous = labels
        neighbour_max = F.max_pool2d(labels.view(n, 1, h, w), 3, stride=1, padding=1)
        neighbour_max = neighbour_max.view(n, h * w) * foreground
        # hook: the root a pixel points to adopts the largest label next to that pixel,
        # which merges the two trees in one step instead of one pixel per step
        labels = labels.scatter_reduce(1, pointed_pixel(labels), neighbour_max, "amax")
        labels = torch.maximum(labels, neighbour_max)
        while True:   # compress: pointer jumping until every pixel points at a root
            jumped = labels.gather(1, pointed_pixel(labels)) * foreground
            if torch.equal(jumped, labels):
                break
            labels = jumped
        if torch.equal(labels, previous):
            break
    # make the labels unique across the batch, then number them 1..K
    offsets = torch.arange(n, device=mask.device).view(n, 1) * (h * w)
    labels = torch.where(mask.view(n, -1), labels.long() + offsets, 0)
    component_ids = labels[mask.view(n, -1)].unique()
    labels = (torch.searchsorted(component_ids, labels) + 1) * mask.view(n, -1)
    return labels.view(h, w) if single else labels.view(n, h, w)


def _thing_boxes(labels, thing_classes):
    """Bounding boxes of the connected components of every thing class in (N, H, W) labels.

    Returns boxes (B, 4) as float [x0, y0, x1, y1] in pixel-edge coordinates (a pixel (y, x)
    covers [x, x+1) x [y, y+1)) and the index of the image each box belongs to, (B,).
    Pixels labelled 255 (ignore) never belong to a thing class.
    """
    n, h, w = labels.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=labels.device),
                            torch.arange(w, device=labels.device), indexing="ij")
    images = torch.arange(n, device=labels.device).view(n, 1, 1)
    boxes, box_images = [], []
    for thing in thing_classes:
        is_thing = labels == thing
        if not is_thing.any():
            continue
        components = connected_components(is_thing)[is_thing] - 1   # 0-based, per pixel
        count = int(components.max()) + 1

        def per_component(values, how):   # min / max of `values` over each component
            start = torch.zeros(count, dtype=torch.long, device=labels.device)
            values = values.expand(n, h, w)[is_thing]
            return start.scatter_reduce(0, components, values, how, include_self=False)

        boxes.append(torch.stack([per_component(xs, "amin"), per_component(ys, "amin"),
                                  per_component(xs, "amax") + 1,
                                  per_component(ys, "amax") + 1], dim=1))
        box_images.append(per_component(images, "amax"))
    if not boxes:
        return labels.new_zeros((0, 4), dtype=torch.float32), labels.new_zeros(0)
    return torch.cat(boxes).float(), torch.cat(box_images)


def _anchors(feat_h, feat_w, stride, sizes, aspect_ratios, device):
    """Anchors (feat_h * feat_w * K, 4) as [x0, y0, x1, y1], K = len(sizes) * len(ratios).

    Centred on the stride-s feature grid at ((j + 0.5) s, (i + 0.5) s); ratio = height /
    width at constant area size^2. Anchors may cross the image border (kept, as in FGFI).
    """
    shapes = torch.tensor([(size / math.sqrt(ratio), size * math.sqrt(ratio))
                           for size in sizes for ratio in aspect_ratios], device=device)
    cy = (torch.arange(feat_h, device=device, dtype=torch.float32) + 0.5) * stride
    cx = (torch.arange(feat_w, device=device, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    centres = torch.stack([cx, cy], dim=-1).view(-1, 1, 2)             # (hw, 1, 2)
    half = shapes.view(1, -1, 2) / 2                                    # (1, K, 2)
    return torch.cat([centres - half, centres + half], dim=-1).view(-1, 4)


def _box_iou(boxes_a, boxes_b):
    """IoU of every pair: (A, 4) x (B, 4) -> (A, B), boxes as [x0, y0, x1, y1]."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    top_left = torch.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _feature_size(labels, stride, feat_size):
    if feat_size is not None:
        return tuple(feat_size)
    return math.ceil(labels.shape[-2] / stride), math.ceil(labels.shape[-1] / stride)


def imitation_mask(labels, thing_classes, stride, psi=0.5, anchor_sizes=None,
                   aspect_ratios=(0.5, 1.0, 2.0), feat_size=None):
    """FGFI imitation mask I (N, h, w) for segmentation labels (N, H, W) (Wang et al. 2019).

    Boxes: bounding boxes of the 8-connected components of each thing class (the project's
    segmentation adaptation). Anchors: centred on the stride-s grid, side lengths
    `anchor_sizes` given as FRACTIONS of min(H, W) (default 1/16, 1/8, 1/4, 1/2 of the crop
    side) times `aspect_ratios`; border-crossing anchors included. Per box: F_b = psi * max
    IoU over all anchors; a location is positive if any of its anchors has IoU > F_b (strict).
    I = OR over boxes. A one-pixel object (a 1x1 box) gets no positive location, as in the
    official code, whose IoU routine reads a 1x1 box as its padding marker and zeroes its IoU.
    (h, w) = feat_size, or ceil(H / stride), ceil(W / stride).
    On unlabeled images pass the teacher's argmax map as `labels`.
    """
    if anchor_sizes is None:
        # FGFI's detection anchors are 128-512 px on ~600 px images; segmentation "things"
        # are often much smaller in a crop, so the range starts at 1/16 of the crop side.
        anchor_sizes = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
    n, height, width = labels.shape
    feat_h, feat_w = _feature_size(labels, stride, feat_size)
    mask = torch.zeros(n, feat_h * feat_w, device=labels.device)
    boxes, box_images = _thing_boxes(labels, thing_classes)
    # official bbox_overlaps_batch: IoU 0 for a 1x1 box, so F_b = 0 and no IoU exceeds it
    one_pixel = (boxes[:, 2] - boxes[:, 0] == 1) & (boxes[:, 3] - boxes[:, 1] == 1)
    boxes, box_images = boxes[~one_pixel], box_images[~one_pixel]
    if len(boxes) == 0:
        return mask.view(n, feat_h, feat_w)
    sides = [fraction * min(height, width) for fraction in anchor_sizes]
    anchors = _anchors(feat_h, feat_w, stride, sides, aspect_ratios, labels.device)
    # one (B, h*w*K) IoU matrix for the whole batch: every image shares the same anchors
    iou = _box_iou(boxes, anchors)
    threshold = psi * iou.max(dim=1, keepdim=True).values            # F_b per box
    positive = (iou > threshold).view(len(boxes), feat_h * feat_w, -1).any(dim=2)
    mask.index_add_(0, box_images, positive.float())                 # OR over boxes
    return (mask > 0).float().view(n, feat_h, feat_w)


def dilated_class_mask(labels, thing_classes, stride, dilation=1, feat_size=None):
    """Cheap FGFI variant (the project's): feature cells containing a thing pixel, dilated.

    Thing pixels (N, H, W) are max-pooled to the feature grid (adaptive max-pool: equal to a
    stride x stride max-pool when the crop is a multiple of the stride), then dilated by
    `dilation` cells in all 8 directions. Returns a float mask (N, h, w).
    """
    things = torch.isin(labels, torch.as_tensor(list(thing_classes), device=labels.device))
    mask = F.adaptive_max_pool2d(things[:, None].float(), _feature_size(labels, stride, feat_size))
    if dilation > 0:
        mask = F.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation)
    return mask[:, 0]


def adaptation_layer(student_channels, teacher_channels, relu=True):
    """FGFI f_adap: 3x3 conv from the student's to the teacher's channels (+ ReLU).

    Use relu=True when the imitated teacher feature is post-ReLU (it cannot be negative).
    Weights from a normal of std 1e-4 truncated to +-2 std (the official init; its code
    approximates the truncation with normal_().fmod_(2)), bias 0: the imitation loss starts
    near its value for a zero prediction and the layer does not disturb early training.
    The official code leaves the bias at PyTorch's default (its truncated branch skips the
    zeroing): uniform up to 1/sqrt(9 C_s), which dwarfs the 1e-4 weights, so the layer would
    start as a per-channel constant, its negative-bias channels mostly cut off by the ReLU.
    kd-seg zeroes it (a deliberate deviation).
    """
    conv = nn.Conv2d(student_channels, teacher_channels, 3, padding=1)
    nn.init.trunc_normal_(conv.weight, std=1e-4, a=-2e-4, b=2e-4)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ReLU()) if relu else conv


def imitation_loss(adapted_student_feat, teacher_feat, mask):
    """FGFI L_im = (1/(2 N_p)) sum_{i,j,c} I_ij (f_adap(s)_ijc - t_ijc)^2, N_p = sum I.

    Summed over channels and divided by 2 * (number of positive locations in the batch), not
    by channels (ports with a mean MSE are C/2 times smaller). mask: (N, h, w). Returns a
    zero that is still connected to the graph when N_p = 0. Official lambda = 0.01 outside.
    """
    mask = _upcast(mask)[:, None]
    squared = (_upcast(adapted_student_feat) - _upcast(teacher_feat)) ** 2
    # With N_p = 0 the numerator is an exact 0 that still depends on the student, so
    # clamping the denominator to 1 skips the term without a branch or a GPU sync.
    positives = mask.sum().clamp(min=1)
    return (mask * squared).sum() / (2 * positives)


# ---------------------------------------------------------------------------------------
# MGD (Qin et al. 2022) and pseudo-label cross-entropy (Xie, Zhu, MGD)

def mgd_image_level(student_logits, teacher_logits):
    """MGD image-level semantic-sensitive loss: (2/N) sum_{n,c} |avgpool(z_s)_nc - avgpool(z_t)_nc|.

    The official code sums over classes and over each GPU's 2 mixed images, then averages over
    GPUs, so lambda_1 is calibrated per 2 images; (2/N) over the N images given keeps that
    meaning at any batch size and process count (equal to the official value at N = 2).
    lambda_1 (0.001 Cityscapes, 0.002 VOC ResNet-18, 0.0005 VOC MobileNetV2) is applied
    outside. The teacher is the deep one (T_D). The official code pools logits upsampled to
    the input size (see `Distiller.mgd_unlabeled_terms`).
    """
    pooled_s = _upcast(student_logits).mean(dim=(2, 3))
    pooled_t = _upcast(teacher_logits).mean(dim=(2, 3))
    return (pooled_s - pooled_t).abs().sum() * 2 / student_logits.shape[0]


def mgd_upsample(logits, size):
    """Logits (N, C, h, w) to the input size (H, W), bilinear with align_corners=True.

    MGD's official networks upsample their logits inside forward, so its pixel-level CE,
    image-level pooling, CutMix of the teachers' logits and OHEM all run at input resolution.
    kd-seg's MGD terms do the same; its task loss (OHEM included) upsamples to the label as
    eval.py does, with the model's own align_corners (train.scored_corners), so that training
    and test see the same geometry. For the ESPNets (True) the two conventions coincide.
    """
    return F.interpolate(_upcast(logits), size=tuple(size), mode="bilinear", align_corners=True)


def _region_affinity(feat, grid):
    """Cosine self-similarity of grid x grid average-pooled regions: (N, G*G, G*G)."""
    regions = F.adaptive_avg_pool2d(_upcast(feat), grid).flatten(2)   # (N, C, G*G)
    # the official code divides by the plain norm (gradient through it, unlike SKD); the
    # clamp only guards all-zero regions
    regions = regions / regions.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return regions.transpose(1, 2) @ regions


def mgd_region_level(student_feat, teacher_feat, grid=7):
    """MGD region-level content-aware loss: MSE(A_s, A_t), mean over N * 49 * 49.

    A = cosine self-similarity of the 7x7 adaptive-average-pooled decoder feature's 49
    region vectors, per image. Channel counts may differ. The teacher is the wide one (T_W).
    lambda_2 = 100 is applied outside.
    """
    return F.mse_loss(_region_affinity(student_feat, grid), _region_affinity(teacher_feat, grid))


def pseudo_label_ce(student_logits, teacher_logits, ignore_index=255, threshold=0.0):
    """Cross-entropy of the student on the teacher's hard labels: CE(z_s, argmax z_t).

    Xie's unlabeled term, MGD's pixel-level consistency, Zhu's pseudo labels computed on the
    fly. Mean over pixels that are not ignored. Both maps must have the same size: resize the
    teacher with `resize_like`, or upsample both logits to the label size first where the
    recipe computes CE at input resolution. `threshold` > 0 sets pixels whose teacher
    confidence max softmax is below it to `ignore_index` (Zhu; 0 disables, as in MGD).
    """
    student_logits = _upcast(student_logits)
    with torch.no_grad():
        confidence, pseudo_labels = F.softmax(_upcast(teacher_logits), dim=1).max(dim=1)
        if threshold > 0:
            pseudo_labels[confidence < threshold] = ignore_index
    if not (pseudo_labels != ignore_index).any():
        return student_logits.sum() * 0   # every pixel ignored: CE would be NaN (0 / 0)
    return F.cross_entropy(student_logits, pseudo_labels, ignore_index=ignore_index)


def ohem_ce(logits, labels, thresh=0.7, min_kept_per_image=50000, ignore_index=255):
    """Online hard example mining cross-entropy (ProbOhemCrossEntropy2d of the CPS/MGD code).

    Keep the valid pixels whose softmax probability of the true class is <= thresh; if that
    is fewer than min_kept, raise the threshold to the min_kept-th smallest probability; if
    the batch has fewer than min_kept valid pixels, keep them all. CE is the mean over the
    kept pixels. min_kept = min_kept_per_image * N: the official MGD code keeps 50,000 per
    image of a GPU's batch (100,000 for its 2 images). logits (N, C, H, W) at label
    resolution (upsample them first), labels (N, H, W).
    """
    logits = _upcast(logits)
    min_kept = min_kept_per_image * logits.shape[0]
    with torch.no_grad():
        valid = labels != ignore_index
        num_valid = int(valid.sum())
        keep = valid
        if 0 < num_valid and min_kept <= num_valid:
            probs = F.softmax(logits, dim=1)
            true_prob = probs.gather(1, labels.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
            true_prob = true_prob.masked_fill(~valid, 1.0)  # ignored pixels sort last
            threshold = torch.tensor(thresh, device=logits.device)
            if min_kept > 0:
                kth = true_prob.flatten().kthvalue(min_kept).values
                threshold = torch.maximum(threshold, kth)
            keep = valid & (true_prob <= threshold)
    if num_valid == 0:
        return logits.sum() * 0   # nothing labelled: CE would be NaN (0 / 0)
    return F.cross_entropy(logits, labels.masked_fill(~keep, ignore_index),
                           ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------
# CWD (Shu et al. 2021)

def cwd(student_logits, teacher_logits, tau=4.0):
    """CWD: tau^2 * (1/(N C)) sum_{n,c} KL(softmax_HW(z_t,nc / tau) || softmax_HW(z_s,nc / tau)).

    Each channel's map is a distribution over the H*W positions; KL summed over positions,
    mean over N*C channels (CIRKD CriterionCWD, norm_type='channel', divergence='kl').
    Official weight 3 on logits is applied outside.
    """
    n, c = student_logits.shape[:2]
    log_p_s = F.log_softmax(_upcast(student_logits).flatten(2) / tau, dim=2)
    log_p_t = F.log_softmax(_upcast(teacher_logits).flatten(2) / tau, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return tau ** 2 * kl / (n * c)


def attention_transfer(student_feat, teacher_feat):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017; kd-seg's worked example of adding a
    term, docs/ADDING_A_TERM.md): mean over N * h * w of (a_s - a_t)^2, a = the channel mean of the
    squared feature, flattened and L2-normalised over the positions (the official code's
    `(at(x) - at(y)).pow(2).mean()`; its beta / 2 = 500 is the weight, applied outside). Channel
    counts may differ; the teacher's map is resized to the student's."""
    def attention(feat):
        return F.normalize(_upcast(feat).pow(2).mean(1).flatten(1), dim=1)
    return (attention(student_feat) - attention(resize_like(teacher_feat, student_feat))).pow(2).mean()


def fitnet_loss(adapted_student_feat, teacher_feat):
    """FitNet-style feature KD (Romero et al. 2015; the audits' reference row, beyond the five
    papers): FGFI's L_im with the mask everywhere, (1/(2 N h w)) sum (r(s) - t)^2, where r is a
    1x1 conv regressor to the teacher's channels (`Distiller.fitnet_adapter`). kd-seg's choice of
    normalisation (FGFI's, so that the two rows differ only in the mask); weight applied outside."""
    everywhere = torch.ones_like(adapted_student_feat[:, 0])
    return imitation_loss(adapted_student_feat, teacher_feat, everywhere)


# ============================================================================= the distiller
# Term names accepted in a weights dict (train.py --kd name=weight,...). "unlabeled" is Xie et
# al.'s lambda: the weight of the whole unlabeled-batch loss [CE(argmax T) + a L_p + b L_c].
TERMS = ("pixel", "consistency", "pairwise", "holistic", "imitation", "cwd", "cwd_feat",
         "unlabeled", "mgd_pixel", "mgd_image", "mgd_region", "fitnet", "at")


class Distiller(nn.Module):
    """L = L_task + sum_k lambda_k * r_k(S, T): the one place where loss weights are applied.

    Holds the frozen teacher(s) and the small trainable pieces that distillation adds (FGFI's
    adaptation layer, CWD's feature alignment, SKD's discriminator). The teachers are kept in
    a plain list so they are neither trained, nor moved by `.train()`, nor saved in the
    student's checkpoints. One training step, as train.py runs it:

        batches = distiller.teacher_batches(images, unlabeled, mix_mask)
        teacher_outputs = distiller.teacher_outputs(*batches)      # one forward per teacher
        terms = {"ce": task_loss, **distiller.terms(student, output, images, labels, step,
                                                    unlabeled, mix_mask, autocast, teacher_outputs)}
        loss = distiller.weighted_sum(terms)                       # student step on `loss`
        d_loss = distiller.discriminator_loss(images, output["out"].detach(),
                                              teacher_outputs[0][0]["out"])   # SKD's D step

    `terms` returns every unweighted term as a float32 scalar, by name, paper by paper: on the
    labeled batch (`labeled_terms`), then on the unlabeled batch (`xie_unlabeled_terms` or
    `mgd_unlabeled_terms`). The weights (`weights`, train.py --kd; `weight` says which applies):

        labeled batch    ce + sum_k lambda_k r_k             pixel, consistency, cwd, cwd_feat,
                                                             pairwise, holistic, imitation, mgd_pixel,
                                                             fitnet, at
        Xie, unlabeled   lambda * [CE(argmax T) + a L_p + b L_c]      u_ce, u_pixel, u_consistency
                         (lambda: "unlabeled"; a, b: "pixel", "consistency")
        MGD, unlabeled   mgd_pixel * CE(argmax T_D, T_W) + lambda_1 L_image + lambda_2 L_region
                                                             u_mgd_pixel, mgd_image, mgd_region
    """

    def __init__(self, teacher, weights, student_channels, num_classes, *, wide_teacher=None,
                 tau=1.0, cwd_tau=4.0, pairwise_scale=0.5, pairwise_kernel=None, thing_classes=(),
                 imitation_mask="anchor", imitation_warmup=400, conditional_discriminator=True,
                 discriminator_width=64, lambda_gp=10.0):
        super().__init__()
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown distillation term(s) {sorted(unknown)}; known: {TERMS}")
        self.weights = {k: float(v) for k, v in weights.items() if v}
        self.teachers = [t.eval().requires_grad_(False) for t in (teacher, wide_teacher) if t is not None]
        self.tau, self.cwd_tau, self.lambda_gp = tau, cwd_tau, lambda_gp
        self.pairwise_scale, self.pairwise_kernel = pairwise_scale, pairwise_kernel
        self.thing_classes, self.imitation_warmup = list(thing_classes), imitation_warmup
        self.imitation_mask_kind = imitation_mask
        self.adaptation = None
        if "imitation" in self.weights:
            if not self.thing_classes:
                raise ValueError("imitation needs the dataset's thing classes (none given)")
            # FGFI ends f_adap in a ReLU because its teacher features are post-ReLU; a teacher
            # whose feature can be negative (ESPNet's PReLU, MobileNetV2's linear bottleneck) gets none
            self.adaptation = adaptation_layer(student_channels, teacher.feat_channels,
                                               relu=getattr(teacher, "feat_nonnegative", True))
        self.cwd_align = None
        if "cwd_feat" in self.weights:
            # CIRKD's CriterionCWD: a bias-free 1x1 conv (default init, trained with the
            # student) to the teacher's channels, only when the channel counts differ
            self.cwd_align = (nn.Conv2d(student_channels, teacher.feat_channels, 1, bias=False)
                              if student_channels != teacher.feat_channels else nn.Identity())
        self.fitnet_adapter = None
        if "fitnet" in self.weights:   # FitNet's regressor, as the audits run it: a 1x1 conv
            self.fitnet_adapter = nn.Conv2d(student_channels, teacher.feat_channels, 1)
        self.discriminator = None
        if "holistic" in self.weights:
            self.discriminator = Discriminator(num_classes, conditional=conditional_discriminator,
                                               width=discriminator_width)
        self.mixes_unlabeled = wide_teacher is not None and bool(
            {"mgd_pixel", "mgd_image", "mgd_region"} & set(self.weights))  # MGD: CutMix pairs
        self.uses_unlabeled = self.mixes_unlabeled or "unlabeled" in self.weights

    def student_side_parameters(self):
        """Parameters trained with the student (FGFI's adaptation layer, CWD's feature
        alignment, FitNet's regressor); D has its own optimiser."""
        return [p for layer in (self.adaptation, self.cwd_align, self.fitnet_adapter) if layer is not None
                for p in layer.parameters()]

    # ------------------------------------------------------------------ the teachers' forward
    def teacher_batches(self, images, unlabeled=None, mix_mask=None):
        """Every batch the teachers see in one step, the labeled `images` first; then MGD's
        CutMix of the two halves of `unlabeled` and each half (`mix_mask`: its boxes, see
        `terms`), or Xie's unlabeled batch, or nothing."""
        if unlabeled is not None and self.mixes_unlabeled:
            halves = unlabeled.chunk(2)
            return [images, halves[0] * (1 - mix_mask) + halves[1] * mix_mask, *halves]
        if unlabeled is not None and "unlabeled" in self.weights:
            return [images, unlabeled]
        return [images]

    @torch.no_grad()
    def teacher_outputs(self, *batches):
        """outputs[b][k]: teacher k's output dict on batch b, not yet resized (see `resize_like`
        at each use). On a CPU, one forward per teacher over the batches put together when their
        image sizes match: a frozen teacher is in eval mode, so every image's output is its own
        (batch norm uses its running statistics), and on a CPU the fixed cost of each call is
        large beside that of a few small images. On a GPU (large batches already fill it, and one
        forward over all of them would multiply the teacher's peak memory) and for batches of
        other sizes (the small crops of --coarse2fine), one forward per batch."""
        if batches[0].device.type != "cpu" or len({b.shape[1:] for b in batches}) > 1:
            return [[t(b) for t in self.teachers] for b in batches]
        sizes = [len(b) for b in batches]
        together = torch.cat(batches) if len(batches) > 1 else batches[0]
        per_teacher = [{name: value.split(sizes) for name, value in t(together).items()}
                       for t in self.teachers]
        return [[{name: parts[b] for name, parts in out.items()} for out in per_teacher]
                for b in range(len(batches))]

    # ------------------------------------------------------------------ the terms, paper by paper
    def terms(self, student, output, images, labels, step, unlabeled=None, mix_mask=None,
              autocast=None, teacher_outputs=None):
        """Every active unweighted term for one step (float32 scalars), by name.

        student: the (possibly DDP-wrapped) student, called again for unlabeled batches;
        output: its output dict on `images`; unlabeled: a batch of unlabeled images or None;
        mix_mask: MGD's CutMix boxes (N/2, 1, H, W) of 0/1 mixing the two halves of `unlabeled`;
        teacher_outputs: `teacher_outputs(*teacher_batches(images, unlabeled, mix_mask))` where
        the caller needs them too (train.py: SKD's D step), else None: computed here.
        """
        autocast = autocast or contextlib.nullcontext()
        batches = self.teacher_batches(images, unlabeled, mix_mask)
        if teacher_outputs is None:
            with autocast:
                teacher_outputs = self.teacher_outputs(*batches)
        terms = self.labeled_terms(images, labels, step, output, teacher_outputs[0])
        if unlabeled is not None and self.mixes_unlabeled:
            mixed = batches[1]
            terms.update(self.mgd_unlabeled_terms(student, mixed, mix_mask, *teacher_outputs[1:], autocast))
        elif unlabeled is not None and "unlabeled" in self.weights:
            terms.update(self.xie_unlabeled_terms(student, unlabeled, teacher_outputs[1][0], autocast))
        return terms

    def labeled_terms(self, images, labels, step, output, teacher_outs):
        """The terms on the labeled batch: the student's `output` against `teacher_outs` (each
        teacher's output dict on `images`, the deep teacher first)."""
        w, terms = self.weights, {}
        s_logits, s_feat = output["out"], output["feat"]
        t_out = teacher_outs[0]
        t_logits = resize_like(t_out["out"], s_logits)
        # Xie et al.: L_p (also SKD's pixel-wise term) and L_c
        if "pixel" in w:
            terms["pixel"] = pixel_kd(s_logits, t_logits, self.tau)
        if "consistency" in w:
            terms["consistency"] = consistency_kd(s_logits, t_logits)
        # CWD (Shu et al.): on the logits, and on the last feature as CIRKD (same tau)
        if "cwd" in w:
            terms["cwd"] = cwd(s_logits, t_logits, self.cwd_tau)
        if "cwd_feat" in w:
            aligned = self.cwd_align(s_feat)
            # CIRKD divides by N * the student's channels, counted before the alignment: equal
            # to cwd's mean over channels when the counts match, C_t / C_s times it otherwise
            terms["cwd_feat"] = (cwd(aligned, resize_like(t_out["feat"], s_feat), self.cwd_tau)
                                 * aligned.shape[1] / s_feat.shape[1])
        # SKD (Liu et al.): pair-wise and holistic (the student as the generator)
        if "pairwise" in w:
            terms["pairwise"] = pairwise_kd(s_feat, resize_like(t_out["feat"], s_feat),
                                            self.pairwise_scale, self.pairwise_kernel)
        if "holistic" in w:
            terms["holistic"] = generator_loss(self.discriminator(
                self.discriminator.make_input(images, s_logits)))
        # FGFI (Wang et al.)
        if "imitation" in w:
            terms["imitation"] = self.imitation(images, labels, s_feat, t_out["feat"], step)
        # FitNet (the audits' feature-KD reference): FGFI's loss without its mask
        if "fitnet" in w:
            terms["fitnet"] = fitnet_loss(self.fitnet_adapter(s_feat), resize_like(t_out["feat"], s_feat))
        # attention transfer (docs/ADDING_A_TERM.md's worked example)
        if "at" in w:
            terms["at"] = attention_transfer(s_feat, t_out["feat"])
        # MGD (Qin et al.): pixel level on the labeled batch, CE to each teacher's argmax
        if "mgd_pixel" in w:
            size = images.shape[-2:]
            terms["mgd_pixel"] = sum(pseudo_label_ce(mgd_upsample(s_logits, size),
                                                     mgd_upsample(t["out"], size))
                                     for t in teacher_outs)
        return terms

    def imitation(self, images, labels, s_feat, t_feat, step):
        """FGFI: imitate the teacher's feature near things; off during the warm-up steps."""
        if step < self.imitation_warmup:
            return s_feat.sum() * 0  # keeps the graph (DDP needs every parameter used)
        t_feat = resize_like(t_feat, s_feat)
        stride = images.shape[-1] / s_feat.shape[-1]
        size = s_feat.shape[-2:]
        if self.imitation_mask_kind == "anchor":
            mask = imitation_mask(labels, self.thing_classes, stride, feat_size=size)
        else:
            mask = dilated_class_mask(labels, self.thing_classes, stride, feat_size=size)
        return imitation_loss(self.adaptation(s_feat), t_feat, mask)

    def xie_unlabeled_terms(self, student, images, teacher_out, autocast):
        """Xie et al.: on unlabeled images, CE to the teacher's argmax plus L_p and L_c.
        teacher_out: the teacher's output dict on `images`."""
        with autocast:
            s_logits = student(images)["out"]
        t_logits = resize_like(teacher_out["out"], s_logits)
        terms = {"u_ce": pseudo_label_ce(s_logits, t_logits)}
        if "pixel" in self.weights:
            terms["u_pixel"] = pixel_kd(s_logits, t_logits, self.tau)
        if "consistency" in self.weights:
            terms["u_consistency"] = consistency_kd(s_logits, t_logits)
        return terms

    def mgd_unlabeled_terms(self, student, mixed, mask, teacher_on_mix, teacher_on_u0, teacher_on_u1,
                            autocast):
        """MGD on a CutMix `mixed` = u0 * (1 - mask) + u1 * mask of two unlabeled halves: pixel
        level to both teachers' mixed argmax, image level to the deep teacher T_D, region level
        to the wide teacher T_W (as the official code, the teachers see the mixed image for the
        image and region terms). teacher_on_*: each teacher's output dict on the mixed image and
        on each half. As the official code, every logit map is first upsampled to the input
        size (`mgd_upsample`): the CE, the pooling and the CutMix of the teachers' logits run there."""
        size = mixed.shape[-2:]
        pseudo_logits = []   # mixing the halves' logits = mixing their predictions (0/1 mask)
        for on_u0, on_u1 in zip(teacher_on_u0, teacher_on_u1):
            z0, z1 = mgd_upsample(on_u0["out"], size), mgd_upsample(on_u1["out"], size)
            pseudo_logits.append(z0 * (1 - mask) + z1 * mask)
        with autocast:
            s_out = student(mixed)
        s_logits = mgd_upsample(s_out["out"], size)
        w, terms = self.weights, {}
        if "mgd_pixel" in w:
            terms["u_mgd_pixel"] = sum(pseudo_label_ce(s_logits, z) for z in pseudo_logits)
        if "mgd_image" in w:
            terms["mgd_image"] = mgd_image_level(s_logits, mgd_upsample(teacher_on_mix[0]["out"], size))
        if "mgd_region" in w:
            terms["mgd_region"] = mgd_region_level(s_out["feat"], teacher_on_mix[1]["feat"])
        return terms

    # ------------------------------------------------------------------ the weights
    def weight(self, name):
        """lambda of the term `terms` names `name`. A term on the labeled batch: its own weight
        (the task loss "ce": 1). A term on the unlabeled batch, u_<term>: <term>'s weight times
        Xie's lambda (the "unlabeled" weight; 1 when not given), so that u_ce, u_pixel and
        u_consistency make lambda * [CE(argmax T) + a L_p + b L_c]. MGD's image and region
        levels exist on the unlabeled batch only: their own lambda_1, lambda_2."""
        on_unlabeled = name.startswith("u_")
        base = name[2:] if on_unlabeled else name
        weight = 1.0 if base == "ce" else self.weights.get(base, 0.0)
        if on_unlabeled and "unlabeled" in self.weights:
            weight *= self.weights["unlabeled"]
        return weight

    def weighted_sum(self, terms):
        """L = sum over the terms of weight(name) * term, in the order `terms` gave them."""
        total = 0
        for name, value in terms.items():
            total = total + self.weight(name) * value
        return total

    # ------------------------------------------------------------------ SKD's discriminator step
    def discriminator_loss(self, images, student_logits, teacher_logits):
        """SKD holistic, D side: lambda_d * (E[D(s)] - E[D(t)]) + lambda_d * lambda_gp * GP,
        lambda_d = the "holistic" weight (official 0.1 on both sides, networks/kd_model.py
        discriminator_backward). `teacher_logits`: the teacher's on `images` (resized here to the
        student's). In float32 on detached maps, after the student's step, on this step's maps,
        as in the official code."""
        lambda_d = self.weights["holistic"]
        teacher_logits = resize_like(teacher_logits, student_logits)
        with torch.autocast(images.device.type, enabled=False):
            d = self.discriminator
            fake = d.make_input(images.float(), student_logits.detach().float())
            real = d.make_input(images.float(), teacher_logits.detach().float())
            # the holistic weight scales the D step too: without it the critic's gradient
            # would be 1/lambda_d (10x) the official one beside the same weight decay
            return lambda_d * (discriminator_loss(d(fake), d(real))
                               + self.lambda_gp * gradient_penalty(d, real, fake))
