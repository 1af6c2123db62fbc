"""Datasets for kd-seg: readers for the real benchmarks, a synthetic benchmark, joint transforms,
class-uniform "centroid" sampling (Zhu et al. 2020) and CutMix box masks (MGD, Qin et al. 2022).

What is in this file, top to bottom:
  1. class names, palettes and label lookup tables (docs/DATASETS.md)
  2. files: read_image, read_label_png; write_atomic (every file kd-seg writes), save_png,
     save_label_png, save_confidence_png, colorize
  3. paired (image, label) transforms in the torchvision-references style
  4. SegmentationFolder, the one dataset class every layout goes through
  5. the on-disk layouts (voc, cityscapes, pascal_context, camvid, ade20k, synthetic, and folder:
     any tree of images, or your own labelled data with read_class_names) and build_dataset
  6. the synthetic benchmark: make_synthetic; a downscaled CamVid copy: make_camvid_small
  7. Zhu et al. 2020 centroid sampling: compute_centroids, CentroidSampler, ConcatSegmentation
  8. MGD CutMix: sample_cutmix_boxes, cutmix_box_masks

Usage:
    import datasets
    datasets.make_synthetic("data/synthetic")                 # once; about 15 s on 2 CPU cores
    train = datasets.build_dataset("synthetic", "data/synthetic", "train", train=True, crop_size=64)
    image, label = train[0]      # float32 (3, H, W) ImageNet-normalised, int64 (H, W) in [0, C) or 255
    val = datasets.build_dataset("cityscapes", "/data/cityscapes", "val")        # full images
    pseudo = datasets.build_dataset("folder", "data/synthetic/images", "unlabeled",
                                    label_root="runs/pseudo", classes_from="synthetic")
    names, palette = datasets.read_class_names("mydata/classes.txt")   # your own data
    mine = datasets.build_dataset("folder", "mydata", "val", class_names=names, palette=palette)

Every label is read without any colour conversion, remapped with a 256-entry lookup table, and
checked: a colour (RGB) label, a label of another size than its image, or an id that maps outside
[0, C) stops with a ValueError that names the file. 255 means "ignore" everywhere.

The synthetic benchmark
-----------------------
Real benchmarks do not fit a CPU demo, and an easy toy task lets a tiny student match its teacher,
which hides everything distillation is for. The synthetic images (64 x 64 by default) are built so
that colour alone does not give the class: it is a prior, and shape, texture and context settle
the rest. Classes:

  0 background     greyish two-colour cloudy field with finer mottling
  1 disk           a filled disk; half of them as small as the disks of class 7
  2 square         a rotated square with the same area as a disk of that radius
  3 triangle       a rotated equilateral triangle, same area again (size gives nothing away)
  4 ring           an annulus 3-5 px thick (a thin structure: blurred at coarse output strides)
  5 striped_blob   a wobbly blob filled with fine stripes (period 4-8 px)
  6 checkered_blob the same blob filled with a fine checkerboard (the same outline as 5)
  7 disk_in_ring   a small disk inside a ring, the size of the small class-1 disks: the ring
                   around it (context) tells them apart, and their hue windows where they differ

Objects are colourful (saturation 0.5-1), the background greyish (0-0.3), so colour finds
objects. Each object class draws its hue from a window of width 0.17 around a hue of its own
(class_hue_prior=0.83): 19% of hues belong to two classes, so colour is a prior, as in real
data, and shape, texture and context settle the rest: a per-pixel colour classifier reaches
about 54 val mIoU, the demo's teacher about 62 (tests/test_datasets.py, docs/DEMO.md). 3 to 5
objects per image (radius 10-19 px) are painted back to front, so later ones occlude earlier
ones; each gets a brightness ramp; then the image may be blurred, gets a per-image colour jitter
and Gaussian pixel noise.

Calibration: docs/DEMO.md, "the synthetic benchmark" (the measured teacher and student at the demo
schedule, and the knob settings that were tried and rejected). Exploratory runs showed that with
no hue prior at all, students from scratch learn almost nothing in a few hundred steps: shape and
texture are slow to learn, which is why the prior is there.

Splits: train (200, labelled), unlabeled (1600; its labels stay on disk for pseudo-label
diagnostics only), val (200), test (400). SYNTHETIC_KNOBS (hue prior, noise, texture contrast
and period, object size and count, rotation, ring thickness...) set the difficulty;
make_synthetic(root, **knobs) records them in root/DONE, which is written last, so a
half-written tree (or one made with other knobs) is regenerated. Every image is drawn from its
own seed (seed, split, index): the same seed gives byte-identical files. Textures are 4-8 px:
random down-scaling much below 0.75 blurs the finest of them away.
"""
import bisect
import colorsys
import copy
import json
import math
import os
import re
import shutil
import tempfile
import zlib

import numpy as np
import torch
from PIL import Image, ImageEnhance

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------------
# 1. Class names, palettes, lookup tables

def voc_palette(num_classes=256):
    """The standard Pascal VOC colour map: the bits of the class index interleaved into R, G, B."""
    palette = []
    for index in range(num_classes):
        red = green = blue = 0
        for shift in range(7, -1, -1):  # bit 0 of the index goes to the top bit of each channel
            red |= ((index >> 0) & 1) << shift
            green |= ((index >> 1) & 1) << shift
            blue |= ((index >> 2) & 1) << shift
            index >>= 3
        palette.append((red, green, blue))
    return palette


def generated_palette(num_classes, seed=0):
    """A fixed pseudo-random palette, for datasets without an official one (Pascal Context, ADE20K)."""
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes)]


def make_lut(mapping=None, ignore=()):
    """A 256-entry uint8 table raw id -> class index; apply it as `lut[raw_label]`.

    Ids in `mapping` map to their value, ids in `ignore` (and 255) to 255, every other id keeps its
    own value, so an id that was not expected lands outside [0, C) and the reader reports it.
    """
    lut = np.arange(256, dtype=np.uint8)
    for raw_id in ignore:
        lut[raw_id] = IGNORE_INDEX
    for raw_id, class_index in (mapping or {}).items():
        lut[raw_id] = class_index
    return lut


VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle"]
CITYSCAPES_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                      (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                      (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
                      (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
# labelId -> trainId; the other labelIds 0..33 are ignored. Ids above 33 do not exist: reported.
CITYSCAPES_LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                             23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_LUT = make_lut(CITYSCAPES_LABEL_TO_TRAIN,
                          ignore=[i for i in range(34) if i not in CITYSCAPES_LABEL_TO_TRAIN])

PASCAL_CONTEXT_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood"]

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
                  (0, 128, 192)]

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag"]

SYNTHETIC_CLASSES = ["background", "disk", "square", "triangle", "ring", "striped_blob",
                     "checkered_blob", "disk_in_ring"]
SYNTHETIC_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                     (245, 130, 48), (145, 30, 180), (70, 240, 240)]

# "Thing" classes (countable objects), used by FGFI-style imitation masks.
THING_CLASSES = {
    "synthetic": list(range(1, 8)),  # every object class
    "voc": list(range(1, 21)),  # every foreground class
    "cityscapes": list(range(11, 19)),  # person, rider, car, truck, bus, train, motorcycle, bicycle
    # The 20 VOC object categories inside the 59 Context classes ("table" is VOC's diningtable).
    "pascal_context": [PASCAL_CONTEXT_CLASSES.index(name) for name in [
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "table", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
        "tvmonitor"]],
    "camvid": [8, 9, 10],  # Car, Pedestrian, Bicyclist
    # docs/DATASETS.md gives no thing/stuff split for the 150 SceneParsing classes: treat all as things.
    "ade20k": list(range(150)),
}

# Class index -> the id that the dataset's official evaluation and test server read (eval.py
# --submission): Cityscapes labelIds (evalPixelLevelSemanticLabeling, not trainIds), ADE20K
# 1..150 (0, "other", is never predicted), VOC its own ids 0..20.
SUBMISSION_IDS = {
    "cityscapes": sorted(CITYSCAPES_LABEL_TO_TRAIN, key=CITYSCAPES_LABEL_TO_TRAIN.get),
    "ade20k": list(range(1, 151)),
    "voc": list(range(21)),
}


# ----------------------------------------------------------------------------------------------
# 2. Files: images and labels read, every file written atomically

def read_image(path):
    """An RGB PIL image (grayscale and CMYK files are converted; a broken file is a ValueError)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path}: {error}") from None


def read_label_png(path):
    """Raw class ids (H, W) uint8 of a mode P or L label PNG, read WITHOUT colour conversion.

    np.array of a palette ("P") image gives the palette indices, i.e. the class ids; converting it
    to "L" first would turn the palette colours into luminance, which are not class ids.
    """
    try:
        with Image.open(path) as label:
            if label.mode not in ("P", "L"):
                raise ValueError(f"label {path} has mode {label.mode}; expected a single-channel "
                                 f"class-index PNG (mode P or L), not a colour visualisation")
            return np.array(label)
    except FileNotFoundError:
        raise FileNotFoundError(f"label not found: {path}") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"cannot read label {path}: {error}") from None


def write_atomic(path, content):
    """Make `path` hold `content` in full, or leave it as it was: every file kd-seg writes (PNGs,
    text, JSON, checkpoints) goes through here. `content` is the text to write, or a function that
    writes the file whose path it is given:

        write_atomic("a.txt", "text")
        write_atomic("a.png", lambda temporary: image.save(temporary, format="PNG"))
        write_atomic("checkpoint.pt", lambda temporary: torch.save(state, temporary))

    The content goes to a temporary file `.<name>.<random>.tmp` in the same folder (made if
    needed), which then takes `path`'s place with os.replace: an atomic rename, as both lie on one
    file system. A failure (a full or read-only disk, Ctrl-C) removes the temporary file and
    raises; a kill -9 between the write and the rename leaves it behind, hidden by its dot."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        if callable(content):
            content(temporary)
        else:
            with open(temporary, "w") as file:
                file.write(content)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; give it the usual rights
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _as_uint8_label(label):
    label = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label)
    if label.ndim != 2:
        raise ValueError(f"a label map must be (H, W); got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label ids must lie in 0..255; got {label.min()}..{label.max()}")
    return np.ascontiguousarray(label, dtype=np.uint8)


def label_to_pil(label, palette):
    """A palette ("P") PIL image whose pixel values are the class ids; 255 is shown black."""
    label = _as_uint8_label(label)
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    colours = np.zeros((256, 3), np.uint8)
    colours[:len(palette)] = palette
    colours[IGNORE_INDEX] = 0
    image.putpalette(colours.ravel().tolist())
    return image


def save_png(path, image):
    """Write a PIL image as a PNG, atomically (write_atomic)."""
    write_atomic(path, lambda temporary: image.save(temporary, format="PNG"))


def save_label_png(path, label, palette):
    """Write a label map (H, W) as a palette PNG (mode P), atomically."""
    save_png(path, label_to_pil(label, palette))


def save_confidence_png(path, confidence):
    """Write a confidence map (H, W) in [0, 1] as an 8-bit grayscale PNG (0..255)."""
    confidence = confidence.cpu() if isinstance(confidence, torch.Tensor) else confidence
    confidence = np.clip(np.asarray(confidence, dtype=np.float32), 0.0, 1.0)
    save_png(path, Image.fromarray(np.round(confidence * 255).astype(np.uint8)))


def colorize(label, palette):
    """An RGB PIL image of a label map: class c gets palette[c], ignore (255) is black."""
    colours = np.zeros((256, 3), np.uint8)
    colours[:len(palette)] = palette
    colours[IGNORE_INDEX] = 0
    return Image.fromarray(colours[_as_uint8_label(label)])


# ----------------------------------------------------------------------------------------------
# 3. Paired transforms
#
# Every transform takes and returns (image, label, centroid): image and label are PIL images of
# the same size until ToTensor; centroid is None or (y, x, class_index), a pixel that a random
# crop must keep (Zhu et al. 2020 centroid sampling), moved along with every geometric change.
# Random numbers come from torch's global generator, which DataLoader seeds differently in each
# worker (numpy's is not, so numpy would give every worker the same "random" crops).

def _uniform(low, high):
    return low + (high - low) * torch.rand(()).item()


def _randint(low, high):
    """A random integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, ()).item())


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, label, centroid=None):
        for transform in self.transforms:
            image, label, centroid = transform(image, label, centroid)
        return image, label, centroid


def _snap_to_class(label, y, x, class_index, radius):
    """The pixel of class_index nearest to (y, x) within `radius`, or (y, x) if there is none."""
    if label[y, x] == class_index:
        return y, x
    top, left = max(0, y - radius), max(0, x - radius)
    ys, xs = np.nonzero(label[top:y + radius + 1, left:x + radius + 1] == class_index)
    if ys.size == 0:
        return y, x
    nearest = np.argmin((ys + top - y) ** 2 + (xs + left - x) ** 2)
    return int(ys[nearest] + top), int(xs[nearest] + left)


class RandomScale:
    """Resize by a factor from U(scale_range): the image bilinearly, the label with NEAREST (a
    blend of two class ids is a third, wrong id)."""

    def __init__(self, scale_range=(0.5, 2.0)):
        self.scale_range = scale_range

    def __call__(self, image, label, centroid=None):
        scale = _uniform(*self.scale_range)
        width, height = image.size
        new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
        image = image.resize((new_width, new_height), Image.BILINEAR)
        label = label.resize((new_width, new_height), Image.NEAREST)
        if centroid is not None:
            y, x, class_index = centroid
            # PIL's nearest resize reads source pixel floor((j + 0.5) / s) for output pixel j, so
            # source pixel y is read by j = floor((y + 0.5) * s) when enlarging. When shrinking some
            # source pixels are skipped: then step to the nearest surviving pixel of the class.
            y = min(int((y + 0.5) * new_height / height), new_height - 1)
            x = min(int((x + 0.5) * new_width / width), new_width - 1)
            radius = math.ceil(max(height / new_height, width / new_width)) + 1
            y, x = _snap_to_class(np.asarray(label), y, x, class_index, radius)
            centroid = (y, x, class_index)
        return image, label, centroid


def _pad(image, width, height, fill):
    """Pad at the bottom and right to (width, height)."""
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(image, (0, 0))
    return canvas


class RandomCrop:
    """Pad to at least crop_size (image with the ImageNet mean colour, which normalises to 0, label
    with 255), then cut a random (height, width) window; with a centroid, one that contains it."""

    def __init__(self, crop_size):
        self.height, self.width = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        self.fill = tuple(round(255 * m) for m in IMAGENET_MEAN)

    def __call__(self, image, label, centroid=None):
        width, height = max(image.width, self.width), max(image.height, self.height)
        if (width, height) != image.size:
            image = _pad(image, width, height, self.fill)
            label = _pad(label, width, height, IGNORE_INDEX)
        if centroid is None:
            top, left = _randint(0, height - self.height), _randint(0, width - self.width)
        else:
            y, x, class_index = centroid
            top = _randint(max(0, y - self.height + 1), min(y, height - self.height))
            left = _randint(max(0, x - self.width + 1), min(x, width - self.width))
            centroid = (y - top, x - left, class_index)
        box = (left, top, left + self.width, top + self.height)
        return image.crop(box), label.crop(box), centroid


class RandomHorizontalFlip:
    def __init__(self, probability=0.5):
        self.probability = probability

    def __call__(self, image, label, centroid=None):
        if torch.rand(()).item() < self.probability:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            label = label.transpose(Image.FLIP_LEFT_RIGHT)
            if centroid is not None:
                centroid = (centroid[0], image.width - 1 - centroid[1], centroid[2])
        return image, label, centroid


class ColorJitter:
    """Photometric jitter of the image only: brightness, contrast, saturation factors in U(1 -/+ s)."""

    def __init__(self, brightness=0.2, contrast=0.2, saturation=0.2):
        self.strengths = [(ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                          (ImageEnhance.Color, saturation)]

    def __call__(self, image, label, centroid=None):
        for enhancer, strength in self.strengths:
            if strength > 0:
                image = enhancer(image).enhance(_uniform(1 - strength, 1 + strength))
        return image, label, centroid


class ToTensor:
    """Image -> float32 (3, H, W) in [0, 1]; label -> int64 (H, W)."""

    def __call__(self, image, label, centroid=None):
        image = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        label = torch.from_numpy(np.asarray(label, dtype=np.int64))
        return image.contiguous(), label, centroid


class Normalize:
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image, label, centroid=None):
        return (image - self.mean) / self.std, label, centroid


def build_transforms(train, crop_size=None, scale_range=(0.5, 2.0), jitter=0.2):
    """Training: random scale, crop (padding 255), flip, photometric jitter. Eval: the full image."""
    if not train:
        return Compose([ToTensor(), Normalize()])
    if crop_size is None:
        raise ValueError("train=True needs crop_size: random scaling changes the image size, and a "
                         "batch needs one size")
    transforms = [RandomScale(scale_range), RandomCrop(crop_size), RandomHorizontalFlip()]
    if jitter > 0:
        transforms.append(ColorJitter(jitter, jitter, jitter))
    return Compose(transforms + [ToTensor(), Normalize()])


# ----------------------------------------------------------------------------------------------
# 4. The dataset class every layout goes through

class SegmentationFolder(torch.utils.data.Dataset):
    """Pairs of image and label files -> (image float32 (3, H, W), label int64 (H, W)).

    label_paths may be None (or hold None entries) for unlabeled images: their labels are all 255.
    lut (256 entries, uint8) maps raw label ids to class indices; None means ids are indices.
    An item is an index, or (index, (y, x, class_index)) from CentroidSampler: then the random crop
    keeps that pixel.
    """

    def __init__(self, image_paths, label_paths, class_names, palette=None, lut=None,
                 transforms=None, thing_classes=(), keep_decoded=False):
        self.image_paths = list(image_paths)
        self.label_paths = [None] * len(self.image_paths) if label_paths is None else list(label_paths)
        if len(self.label_paths) != len(self.image_paths):
            raise ValueError(f"{len(self.image_paths)} images but {len(self.label_paths)} labels")
        for image_path, label_path in zip(self.image_paths, self.label_paths):
            if not os.path.isfile(image_path):
                raise FileNotFoundError(f"image not found: {image_path}")
            if label_path is not None and not os.path.isfile(label_path):
                raise FileNotFoundError(f"no label for image {image_path}: expected {label_path}")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.palette = list(palette) if palette is not None else generated_palette(self.num_classes)
        self.lut = make_lut() if lut is None else np.asarray(lut, dtype=np.uint8)
        self.transforms = transforms if transforms is not None else build_transforms(train=False)
        self.thing_classes = list(thing_classes)
        # keep_decoded: each image and label held in memory after its first read (in each loader
        # process), for a dataset that fits there, such as CamVid: decoding a PNG costs more than
        # the whole augmentation of a crop. Keyed by path, so keep_listed's subsets may share it.
        self.decoded = {} if keep_decoded else None

    def __len__(self):
        return len(self.image_paths)

    def read_label(self, index):
        """The label of one image as class indices (H, W) uint8, before any transform."""
        label_path = self.label_paths[index]
        if label_path is None:
            with Image.open(self.image_paths[index]) as image:  # reads the header only
                return np.full((image.height, image.width), IGNORE_INDEX, np.uint8)
        raw = read_label_png(label_path)
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        mapped = self.lut[present]
        bad = present[(mapped >= self.num_classes) & (mapped != IGNORE_INDEX)]
        if bad.size:
            raise ValueError(f"label {label_path} contains ids {bad.tolist()} that map outside "
                             f"[0, {self.num_classes}) and are not the ignore id 255")
        return self.lut[raw]

    def read_pair(self, index):
        """(RGB image, class-index label) of one image as PIL images, before any transform (the
        transforms make new images: a kept pair is never changed)."""
        path = self.image_paths[index]
        if self.decoded is not None and path in self.decoded:
            return self.decoded[path]
        image, label = read_image(path), self.read_label(index)
        if label.shape != (image.height, image.width):
            raise ValueError(f"image {path} is {image.width}x{image.height} but label "
                             f"{self.label_paths[index]} is {label.shape[1]}x{label.shape[0]}")
        pair = image, Image.fromarray(label)
        if self.decoded is not None:
            self.decoded[path] = pair
        return pair

    def __getitem__(self, item):
        index, centroid = item if isinstance(item, tuple) else (item, None)
        image, label, _ = self.transforms(*self.read_pair(index), centroid)
        return image, label


def check_files(dataset):
    """Before a long run, every image opens and every label is a class-index PNG of its image's
    size, from the file headers only (PIL reads the size and mode without decoding the pixels):
    a broken file then fails at once, not hours later in the final evaluation. `dataset`: a
    SegmentationFolder or ConcatSegmentation."""
    for image_path, label_path in zip(dataset.image_paths, dataset.label_paths):
        try:
            with Image.open(image_path) as image:
                size = image.size
        except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"cannot read image {image_path}: {error}") from None
        if label_path is None:
            continue
        try:
            with Image.open(label_path) as label:
                label_mode, label_size = label.mode, label.size
        except (OSError, SyntaxError) as error:
            raise ValueError(f"cannot read label {label_path}: {error}") from None
        if label_mode not in ("P", "L"):
            raise ValueError(f"label {label_path} has mode {label_mode}; expected a single-channel "
                             f"class-index PNG (mode P or L), not a colour visualisation")
        if label_size != size:
            raise ValueError(f"image {image_path} is {size[0]}x{size[1]} but label {label_path} "
                             f"is {label_size[0]}x{label_size[1]}")


# ----------------------------------------------------------------------------------------------
# 5. On-disk layouts (docs/DATASETS.md). Each returns (image_paths, label_paths, lut).

def _find_folder(candidates, what):
    for folder in candidates:
        if os.path.isdir(folder):
            return folder
    raise FileNotFoundError(f"{what} not found: expected {' or '.join(candidates)}")


def _find_file(candidates, what):
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{what} not found: expected {' or '.join(candidates)}")


def _read_lines(path):
    with open(path) as file:
        return [line.strip() for line in file if line.strip()]


def _list_files(folder, suffixes):
    """Every file under folder (recursively) with one of the suffixes, sorted by relative path."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.join(parent, n) for n in names if n.lower().endswith(suffixes)]
    return sorted(found, key=lambda path: os.path.relpath(path, folder))


def _voc_list(voc, list_path, label_folder):
    """Image and label paths of one VOC list file (labels of one-id lines in label_folder)."""
    images, labels = [], []
    for line in _read_lines(list_path):
        fields = line.split()
        if len(fields) == 2:  # "/JPEGImages/x.jpg /SegmentationClassAug/x.png", relative to VOC2012
            images.append(os.path.join(voc, fields[0].lstrip("/")))
            labels.append(os.path.join(voc, fields[1].lstrip("/")))
        else:  # one id per line
            images.append(os.path.join(voc, "JPEGImages", fields[0] + ".jpg"))
            labels.append(os.path.join(voc, label_folder, fields[0] + ".png"))
    return images, labels


def _voc_files(root, split):
    voc = _find_folder([os.path.join(root, "VOCdevkit", "VOC2012"), root], "Pascal VOC 2012 folder")
    if not os.path.isdir(os.path.join(voc, "JPEGImages")):
        raise FileNotFoundError(f"Pascal VOC images not found: expected {voc}/JPEGImages")
    lists = [os.path.join(voc, "ImageSets", "Segmentation", split + ".txt"),
             os.path.join(voc, "ImageSets", "SegmentationAug", split + ".txt"),
             os.path.join(voc, split + ".txt"), os.path.join(root, split + ".txt")]
    mmseg_aug = os.path.join(voc, "ImageSets", "Segmentation", "aug.txt")
    if split == "train_aug" and not any(map(os.path.isfile, lists)) and os.path.isfile(mmseg_aug):
        # mmsegmentation's converted layout (tools/dataset_converters/voc_aug.py, configs
        # voc12aug): train_aug is train.txt with its VOC masks in SegmentationClass plus aug.txt,
        # the SBD images outside VOC train and val, with masks in SegmentationClassAug
        # (1,464 + 9,118 = 10,582). Its SegmentationClassAug holds SBD's masks only, so its
        # trainaug.txt (the same 10,582 ids) does not read from that one folder: use train_aug.
        train_list = _find_file([os.path.join(voc, "ImageSets", "Segmentation", "train.txt")],
                                "Pascal VOC split list 'train' (beside aug.txt)")
        images, labels = _voc_list(voc, train_list, "SegmentationClass")
        aug_images, aug_labels = _voc_list(voc, mmseg_aug, "SegmentationClassAug")
        return images + aug_images, labels + aug_labels, make_lut()
    list_path = _find_file(lists, f"Pascal VOC split list '{split}'")
    label_folder = "SegmentationClassAug" if "aug" in split else "SegmentationClass"
    images, labels = _voc_list(voc, list_path, label_folder)
    return images, labels, make_lut()


def _cityscapes_files(root, split):
    image_folder = _find_folder([os.path.join(root, "leftImg8bit", split)],
                                f"Cityscapes split '{split}'")
    images = [p for p in _list_files(image_folder, (".png",)) if p.endswith("_leftImg8bit.png")]
    label_folder = os.path.join(root, "gtFine", split)
    stems = [os.path.relpath(p, image_folder)[:-len("_leftImg8bit.png")] for p in images]
    train_ids = [os.path.join(label_folder, s + "_gtFine_labelTrainIds.png") for s in stems]
    if images and all(os.path.isfile(p) for p in train_ids):  # already mapped by createTrainIdLabelImgs
        return images, train_ids, make_lut()
    label_ids = [os.path.join(label_folder, s + "_gtFine_labelIds.png") for s in stems]
    return images, label_ids, CITYSCAPES_LUT


def _pascal_context_files(root, split):
    voc = _find_folder([os.path.join(root, "VOCdevkit", "VOC2010"), root], "Pascal Context folder")
    list_path = _find_file([os.path.join(voc, "ImageSets", "SegmentationContext", split + ".txt")],
                           f"Pascal Context split list '{split}'")
    ids = [line.split()[0] for line in _read_lines(list_path)]
    images = [os.path.join(voc, "JPEGImages", i + ".jpg") for i in ids]
    labels = [os.path.join(voc, "SegmentationClassContext", i + ".png") for i in ids]
    return images, labels, make_lut({k: k - 1 for k in range(1, 60)}, ignore=[0])  # 0 = background


def _camvid_files(root, split):
    image_folder = _find_folder([os.path.join(root, split)], f"CamVid split '{split}'")
    label_folder = os.path.join(root, split + "annot")
    list_path = os.path.join(root, split + ".txt")
    if os.path.isfile(list_path):  # lines hold absolute paths from another machine: keep basenames
        names = [[os.path.basename(f) for f in line.split()] for line in _read_lines(list_path)]
        pairs = [(n[0], n[-1]) for n in names]
    else:
        pairs = [(n, n) for n in sorted(os.listdir(image_folder)) if n.lower().endswith(".png")]
    images = [os.path.join(image_folder, image) for image, _ in pairs]
    labels = [os.path.join(label_folder, label) for _, label in pairs]
    return images, labels, make_lut(ignore=[11])  # 11 = Unlabelled


def _ade20k_files(root, split):
    split = {"train": "training", "val": "validation"}.get(split, split)
    base = _find_folder([os.path.join(root, "ADEChallengeData2016"), root], "ADE20K folder")
    image_folder = _find_folder([os.path.join(base, "images", split)], f"ADE20K split '{split}'")
    images = _list_files(image_folder, (".jpg",))
    labels = [os.path.join(base, "annotations", split, os.path.relpath(p, image_folder)[:-4] + ".png")
              for p in images]
    return images, labels, make_lut({k: k - 1 for k in range(1, 151)}, ignore=[0])  # 0 = "other"


def _folder_files(root, split, label_root=None):
    """Any folder tree of images; with label_root, image a/b.jpg pairs with label_root/a/b.png."""
    folder = _find_folder([os.path.join(root, split) if split else root], "image folder")
    images = _list_files(folder, IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images found under {folder}")
    if label_root is None:
        return images, None
    labels = [os.path.join(label_root, os.path.splitext(os.path.relpath(p, folder))[0] + ".png")
              for p in images]
    return images, labels


def is_labelled_folder(root):
    """Your own data: ROOT/images/ beside ROOT/labels/ (docs/DATASETS.md, `folder`)."""
    return os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "labels"))


def _stem(name):
    """A file name or list entry without its image suffix ("a.jpg", "a" -> "a"; "v1.2" stays)."""
    return os.path.splitext(name)[0] if name.lower().endswith(IMAGE_SUFFIXES) else name


def _labelled_folder_files(root, split):
    """ROOT/images/<stem>.png|jpg with ROOT/labels/<stem>.png; a split is the stems listed in
    ROOT/<split>.txt, or, when the folder has no lists at all, every fifth image (sorted by
    name: the 5th, 10th, ...) for "val" and the others for "train"; split "" is every image."""
    image_folder = os.path.join(root, "images")
    images = _list_files(image_folder, IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images found under {image_folder}")
    stems = [_stem(os.path.relpath(p, image_folder)) for p in images]
    index_of = {}
    for index, stem in enumerate(stems):
        if stem in index_of:  # a.png and a.jpg: which one does labels/a.png label?
            first, second = (os.path.basename(images[i]) for i in (index_of[stem], index))
            raise ValueError(f"two images named {stem} in {image_folder} ({first} and {second}); "
                             "expected one image per label")
        index_of[stem] = index
    lists = [os.path.join(root, name + ".txt") for name in ("train", "val", "test")]
    list_path = os.path.join(root, f"{split}.txt")
    if not split:
        chosen = range(len(images))
    elif os.path.isfile(list_path):
        wanted = [_stem(line.split()[0]) for line in _read_lines(list_path)]
        missing = [stem for stem in wanted if stem not in index_of]
        if missing:
            raise ValueError(f"{list_path}: {len(missing)} listed images are not in {image_folder} "
                             f"(first: {missing[0]})")
        chosen = [index_of[stem] for stem in wanted]
    elif split in ("train", "val") and not any(map(os.path.isfile, lists)):
        # a fixed rule rather than a random draw: the same folder always splits the same way
        chosen = [i for i in range(len(images)) if (i % 5 == 4) == (split == "val")]
    else:
        raise FileNotFoundError(f"split '{split}' not found: expected {list_path} (one image name a "
                                "line; without any list, only 'train' and 'val' exist)")
    labels = [os.path.join(root, "labels", stems[i] + ".png") for i in chosen]
    return [images[i] for i in chosen], labels


def read_class_names(path, num_classes=None):
    """(names, palette) of your own data's classes from `path`: one class a line, in class-id
    order, its name (spaces allowed), then optionally its colour as #rrggbb; or a .json file
    holding a list of such lines. A class without a colour gets the generated palette's.
    num_classes: the count the names must have (--num-classes), when given."""
    try:
        with open(path) as file:
            lines = json.load(file) if path.lower().endswith(".json") else file.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"class names file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"cannot read class names file {path}: {error}") from None
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise ValueError(f"{path}: expected a JSON list of strings, \"name\" or \"name #rrggbb\"")
    names, palette = [], []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        colour = None
        if fields[-1].startswith("#"):
            colour, fields = fields[-1], fields[:-1]
            if not re.fullmatch(r"#[0-9a-fA-F]{6}", colour):
                raise ValueError(f"{path} line {number}: colour {colour} is not #rrggbb (six hex digits)")
            colour = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        if not fields:
            raise ValueError(f"{path} line {number}: {line.strip()!r} has a colour but no class name")
        name = " ".join(fields)
        if name in names:
            raise ValueError(f"{path} line {number}: class {name!r} is named twice")
        names.append(name)
        palette.append(colour)
    if not names:
        raise ValueError(f"{path}: names no class; expected one class name a line")
    if num_classes is not None and num_classes != len(names):
        raise ValueError(f"{path} names {len(names)} classes; expected {num_classes} (--num-classes)")
    generated = generated_palette(len(names))
    return names, [colour or generated[c] for c, colour in enumerate(palette)]


def _synthetic_files(root, split):
    if not os.path.isfile(os.path.join(root, "DONE")) and os.path.isdir(root) and os.listdir(root):
        # another dataset's folder given without its name: never advise writing the benchmark there
        raise FileNotFoundError(f"{root}: not the synthetic benchmark (no DONE file); for another "
                                f"dataset, name it: one of {sorted(DATASETS)}")
    if not os.path.isfile(os.path.join(root, "DONE")):
        raise FileNotFoundError(f"synthetic data not found (or half written) at {root}: expected "
                                f"{os.path.join(root, 'DONE')}; run datasets.make_synthetic({root!r})")
    ids = _read_lines(_find_file([os.path.join(root, split + ".txt")], f"synthetic split '{split}'"))
    images = [os.path.join(root, "images", split, i + ".png") for i in ids]
    labels = [os.path.join(root, "labels", split, i + ".png") for i in ids]
    return images, labels, make_lut()


# name -> (layout reader, class names, palette)
DATASETS = {
    "synthetic": (_synthetic_files, SYNTHETIC_CLASSES, SYNTHETIC_PALETTE),
    "voc": (_voc_files, VOC_CLASSES, voc_palette(21)),
    "cityscapes": (_cityscapes_files, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "pascal_context": (_pascal_context_files, PASCAL_CONTEXT_CLASSES, generated_palette(59)),
    "camvid": (_camvid_files, CAMVID_CLASSES, CAMVID_PALETTE),
    "ade20k": (_ade20k_files, ADE20K_CLASSES, generated_palette(150)),
}


def build_dataset(name, root, split, train=False, crop_size=None, scale_range=(0.5, 2.0),
                  label_root=None, classes_from=None, jitter=0.2, keep_decoded=False,
                  class_names=None, palette=None, ignore_index=IGNORE_INDEX):
    """A SegmentationFolder for one split of a named layout (see docs/DATASETS.md).

    name: synthetic, voc, cityscapes, pascal_context, camvid, ade20k, or folder:
      - your own labelled data, a root holding images/ and labels/: split is the list
        root/<split>.txt, or the fixed train/val rule of _labelled_folder_files; "" is every image;
        its labels are read when classes are given (else it is a set of unlabeled images);
      - any other tree of images: split is a sub-folder ("" or None: root itself); unlabeled (all
        labels 255), or paired with label_root/<relative path without suffix>.png (pseudo labels).
    A folder's classes: those of the dataset classes_from names, or class_names (with palette,
    their colours; None: generated); ignore_index: the raw label id of pixels to ignore.
    train=True: random scale in scale_range, crop_size crop, flip, photometric jitter (0 disables).
    keep_decoded: hold every decoded image and label in memory (SegmentationFolder).
    """
    transforms = build_transforms(train, crop_size, scale_range, jitter)
    if name == "folder":
        if classes_from is not None:
            if classes_from not in DATASETS:
                raise ValueError(f"classes_from={classes_from!r}: expected one of {sorted(DATASETS)}")
            _, class_names, palette = DATASETS[classes_from]
        if label_root is None and is_labelled_folder(root):
            images, labels = _labelled_folder_files(root, split)
            image_root = os.path.join(root, "images")
            if class_names is None:  # read as unlabeled images (e.g. train.py --unlabeled-root)
                labels = None
        else:
            images, labels = _folder_files(root, split, label_root)
            image_root = os.path.join(root, split) if split else root
        if labels is not None and class_names is None:
            raise ValueError(f"build_dataset('folder', {root!r}): its labels need their classes: "
                             f"class_names=[...] or classes_from= one of {sorted(DATASETS)}")
        class_names = class_names or []
        is_class_id = ignore_index != IGNORE_INDEX and ignore_index < len(class_names)
        if is_class_id or not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore index {ignore_index} (--ignore-index): expected 255 or an id above "
                             f"the class ids 0..{len(class_names) - 1}")
        lut = make_lut(ignore=[ignore_index])
        dataset = SegmentationFolder(images, labels, class_names, palette, lut, transforms,
                                     THING_CLASSES.get(classes_from, ()), keep_decoded)
        dataset.image_root = image_root  # the folder images are named from (eval.output_names)
        return dataset
    elif name in DATASETS:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset root not found: {root} (expected the {name} layout "
                                    "described in docs/DATASETS.md)")
        images, labels, lut = DATASETS[name][0](root, split)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS) + ['folder']}")
    _, class_names, palette = DATASETS[name]
    return SegmentationFolder(images, labels, class_names, palette, lut, transforms,
                              THING_CLASSES[name], keep_decoded)


def keep_listed(dataset, list_path):
    """The images of `dataset` named in `list_path`, in the list's order: a label partition such
    as MGD's 1/16 of Cityscapes (CPS's `train_aug_labeled_1-16.txt`, or the one kd_seg.py writes).
    One image per line, as an id or a path whose file name without suffix names the image; further
    columns (the label's path) are ignored. A listed image that is not in the dataset is an error.
    """
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"image list not found: {list_path}")
    wanted = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in _read_lines(list_path)]
    index_of = {os.path.splitext(os.path.basename(p))[0]: i for i, p in enumerate(dataset.image_paths)}
    missing = [name for name in wanted if name not in index_of]
    if missing or not wanted:
        raise ValueError(f"{list_path}: " + (f"{len(missing)} listed images are not in the dataset "
                         f"(first: {missing[0]})" if missing else "lists no image"))
    subset = copy.copy(dataset)
    subset.image_paths = [dataset.image_paths[index_of[name]] for name in wanted]
    subset.label_paths = [dataset.label_paths[index_of[name]] for name in wanted]
    return subset


# ----------------------------------------------------------------------------------------------
# 6. The synthetic benchmark (design in the module docstring)

SYNTHETIC_COUNTS = {"train": 200, "unlabeled": 1600, "val": 200, "test": 400}
SYNTHETIC_OBJECTS = ["disk", "square", "triangle", "ring", "striped_blob", "checkered_blob",
                     "disk_in_ring"]  # drawn with equal probability
SYNTHETIC_KNOBS = dict(
    objects_per_image=(3, 5),  # inclusive; more objects = more occlusion and clutter
    size_range=(0.15, 0.3),  # object radius as a fraction of image_size (10-19 px at 64)
    rotation=1.0,  # 1: shapes and textures at any angle; 0: all upright (far easier to learn)
    small_disk_prob=0.5,  # free disks drawn at disk_in_ring's size: context (and hue) separates them
    ring_thickness=(3.0, 5.0),  # pixels; thin structures suffer most at a coarse output stride
    texture_period=(4.0, 8.0),  # pixels; stripes and checkers (same outline) differ at this scale
    texture_contrast=0.8,  # 0: blobs are flat (texture invisible), 1: full two-colour pattern
    shading=0.3,  # brightness ramp across each object, so flat colour is no cue
    background_contrast=0.7,  # strength of the large two-colour cloudy background field
    background_texture=0.15,  # amplitude of the finer (4 px) background mottling
    # Figure and ground: objects are colourful, the background greyish. (0, 1) for both makes
    # finding objects as hard as classifying them.
    object_saturation=(0.5, 1.0),
    background_saturation=(0.0, 0.3),
    # 0: hue says nothing about the class; p: a class's hues are a window of width 1 - p around
    # its own hue. 0.83: windows 0.17 wide, 1/7 apart, so 19% of hues belong to two classes: a
    # prior, as real classes have one (sky is mostly blue), not the answer. With 0 the students
    # of the CPU demo learn almost nothing in a few hundred steps (see the module docstring).
    class_hue_prior=0.83,
    # classes that share one hue window; ((1,), ..., (7,)): every class its own. Sharing one
    # between the textured blobs (5, 6) makes texture their only cue (docs/DEMO.md: slower to learn)
    hue_groups=((1,), (2,), (3,), (4,), (5,), (6,), (7,)),
    min_contrast=0.2,  # RGB distance of an object from the background under its centre
    blur_prob=0.5,  # chance of a [1, 2, 1] blur (optics) before the noise
    noise_std=0.04,  # Gaussian pixel noise (sensor), in 0..1 intensity units
    color_jitter=0.1,  # per-image channel gain and offset
)


def _random_colour(rng, saturation_range, hue_range=(0.0, 1.0), avoid=None, min_distance=0.0):
    """A colour with hue in hue_range, saturation in saturation_range, brightness in 0.3..0.95,
    at least min_distance (RGB) away from `avoid` when possible."""
    for _ in range(20):
        hue = rng.uniform(*hue_range) % 1.0
        saturation, value = rng.uniform(*saturation_range), rng.uniform(0.3, 0.95)
        colour = np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32)  # float32: faster to paint
        if avoid is None or np.linalg.norm(colour - avoid) >= min_distance:
            break
    return colour


def _smooth_noise(rng, size, cells):
    """Smooth random field in about [0, 1]: a cells x cells grid upsampled bicubically."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.asarray(grid.resize((size, size), Image.BICUBIC))


def _synthetic_background(rng, size, knobs):
    first = _random_colour(rng, knobs["background_saturation"])
    second = _random_colour(rng, knobs["background_saturation"])
    clouds = _smooth_noise(rng, size, 4) * knobs["background_contrast"]
    mottling = (_smooth_noise(rng, size, max(1, size // 4)) - 0.5) * knobs["background_texture"]
    return first + (second - first) * clouds[..., None] + mottling[..., None]


def _object_hues(class_index, knobs):
    """The hue range of a class: all hues when class_hue_prior is 0 (colour says nothing about
    the class); with prior p, a window of width 1 - p around the hue of its hue group."""
    groups = knobs["hue_groups"]
    group = next(i for i, members in enumerate(groups) if class_index in members)
    centre, width = group / len(groups), 1.0 - knobs["class_hue_prior"]
    return centre - width / 2, centre + width / 2


def _shaded_fill(rng, dy, dx, radius, under, knobs, class_index):
    """A colour field for one object: a random colour with a linear brightness ramp across it."""
    colour = _random_colour(rng, knobs["object_saturation"], _object_hues(class_index, knobs),
                            under, knobs["min_contrast"])
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip((dx * math.cos(angle) + dy * math.sin(angle)) / radius, -1, 1)
    return colour * (1 + knobs["shading"] * ramp[..., None])


def _small_disk_radius(rng, ring_radius, thickness):
    """The disk of disk_in_ring (and a small free disk): 30-60% of the ring's hole, at least 2 px."""
    return max(2.0, rng.uniform(0.3, 0.6) * (ring_radius - thickness))


def _synthetic_object(rng, kind, dy, dx, radius, under, knobs):
    """[(class_index, mask, colour field)] layers of one object centred where dy = dx = 0."""
    distance = np.hypot(dy, dx)
    angle = rng.uniform(0, 2 * np.pi) * knobs["rotation"]
    u, v = dx * math.cos(angle) + dy * math.sin(angle), dy * math.cos(angle) - dx * math.sin(angle)
    class_index = 4 if kind == "disk_in_ring" else SYNTHETIC_CLASSES.index(kind)
    fill = _shaded_fill(rng, dy, dx, radius, under, knobs, class_index)
    thickness = rng.uniform(*knobs["ring_thickness"])
    radius = max(radius, thickness + 4)  # room for a hole (and a disk inside it)
    if kind == "disk":
        if rng.random() < knobs["small_disk_prob"]:
            radius = _small_disk_radius(rng, radius, thickness)
        return [(1, distance < radius, fill)]
    if kind == "square":  # half side sqrt(pi)/2 r: the area of a disk of radius r
        return [(2, np.maximum(abs(u), abs(v)) < radius * math.sqrt(math.pi) / 2, fill)]
    if kind == "triangle":  # equilateral, inradius chosen for the area of a disk of radius r
        inradius = radius * math.sqrt(math.pi / (3 * math.sqrt(3)))
        sides = [u * math.cos(a) + v * math.sin(a) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        return [(3, np.maximum.reduce(sides) < inradius, fill)]
    if kind in ("ring", "disk_in_ring"):
        layers = [(4, (distance < radius) & (distance >= radius - thickness), fill)]
        if kind == "disk_in_ring":
            inner = _small_disk_radius(rng, radius, thickness)
            inner_fill = _shaded_fill(rng, dy, dx, inner, under, knobs, 7)
            layers.append((7, distance < inner, inner_fill))
        return layers
    # Textured blobs: a disk with a wobbly outline, two colours in stripes or a checkerboard.
    phase_2, phase_3 = rng.uniform(0, 2 * np.pi, 2).tolist()
    wobble_2, wobble_3 = rng.uniform(0, 0.2, 2).tolist()
    polar = np.arctan2(v, u)
    outline = radius * (1 + wobble_2 * np.cos(2 * polar + phase_2)
                        + wobble_3 * np.cos(3 * polar + phase_3))
    period = rng.uniform(*knobs["texture_period"])
    pattern = np.sin(2 * np.pi * u / period)
    if kind == "checkered_blob":
        pattern = pattern * np.sin(2 * np.pi * v / period)
    weight = 0.5 + 0.5 * knobs["texture_contrast"] * np.tanh(3 * pattern)  # nearly a square wave
    second = _random_colour(rng, knobs["object_saturation"], _object_hues(class_index, knobs))
    colour = fill * (1 - weight[..., None]) + second * weight[..., None]
    return [(class_index, distance < outline, colour)]


def _blur(image):
    """Separable [1, 2, 1] / 4 blur with edge padding."""
    for axis in (0, 1):
        padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        length = image.shape[axis]
        before, centre, after = (np.take(padded, range(i, i + length), axis=axis) for i in range(3))
        image = (before + 2 * centre + after) / 4
    return image


def draw_synthetic_sample(rng, image_size=64, **knobs):
    """One synthetic image (H, W, 3) uint8 and its label (H, W) uint8, painted back to front."""
    knobs = {**SYNTHETIC_KNOBS, **knobs}
    pixel_y, pixel_x = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5  # pixel centres
    image = _synthetic_background(rng, image_size, knobs)
    label = np.zeros((image_size, image_size), np.uint8)
    low, high = knobs["objects_per_image"]
    for _ in range(rng.integers(low, high + 1)):
        kind = SYNTHETIC_OBJECTS[rng.integers(len(SYNTHETIC_OBJECTS))]
        centre_y, centre_x = rng.uniform(0, image_size, 2)  # objects may leave the frame
        radius = rng.uniform(*knobs["size_range"]) * image_size
        under = image[int(centre_y), int(centre_x)]
        # Draw inside a window around the object only (cheaper than the whole image): 1.6 radii
        # hold every shape (a triangle's corner lies 1.56 radii out, a blob's wobble 1.4).
        reach = int(1.6 * max(radius, knobs["ring_thickness"][1] + 4)) + 2
        window = (slice(max(0, int(centre_y) - reach), int(centre_y) + reach + 1),
                  slice(max(0, int(centre_x) - reach), int(centre_x) + reach + 1))
        dy, dx = pixel_y[window] - centre_y, pixel_x[window] - centre_x
        for class_index, mask, colour in _synthetic_object(rng, kind, dy, dx, radius, under, knobs):
            image[window][mask] = colour[mask]
            label[window][mask] = class_index
    if rng.random() < knobs["blur_prob"]:
        image = _blur(image)
    jitter = knobs["color_jitter"]
    gain, offset = rng.uniform(1 - jitter, 1 + jitter, 3), rng.uniform(-jitter, jitter, 3)
    image = image * gain.astype(np.float32) + offset.astype(np.float32)
    image += knobs["noise_std"] * rng.standard_normal(image.shape, dtype=np.float32)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), label


def make_synthetic(root, seed=0, image_size=64, counts=None, **knobs):
    """Write the synthetic benchmark under root, once; returns root.

    Layout: root/images/<split>/<id>.png (RGB), root/labels/<split>/<id>.png (palette PNG),
    root/<split>.txt (ids), root/DONE (the settings, written last). If DONE holds the same
    settings nothing is done; otherwise (missing: a half-written tree, or other settings) every
    file is written again. knobs override SYNTHETIC_KNOBS (the difficulty settings).
    """
    unknown = sorted(set(knobs) - set(SYNTHETIC_KNOBS))
    if unknown:
        raise ValueError(f"unknown synthetic knobs {unknown}; "
                         f"expected some of {sorted(SYNTHETIC_KNOBS)}")
    counts = dict(SYNTHETIC_COUNTS if counts is None else counts)
    # Bump "version" whenever the drawing code changes, so that older trees are regenerated.
    settings = {"version": 1, "seed": seed, "image_size": image_size, "counts": counts,
                "knobs": {**SYNTHETIC_KNOBS, **knobs}}
    settings = json.loads(json.dumps(settings))  # tuples become lists, as they are in the file
    done_path = os.path.join(root, "DONE")
    try:
        with open(done_path) as file:
            if json.load(file) == settings:
                return root
    except (OSError, ValueError):  # no DONE (or an unreadable one): generate
        pass
    os.makedirs(root, exist_ok=True)
    if os.path.exists(done_path):
        os.remove(done_path)
    for split, count in counts.items():
        for folder in ("images", "labels"):
            os.makedirs(os.path.join(root, folder, split), exist_ok=True)
        ids = [f"{split}_{index:05d}" for index in range(count)]
        for index, sample_id in enumerate(ids):
            # One seed per image: a split's images do not change when another split's count does.
            rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
            image, label = draw_synthetic_sample(rng, image_size, **settings["knobs"])
            Image.fromarray(image).save(os.path.join(root, "images", split, sample_id + ".png"))
            # Plain saves, not atomic ones: the DONE file written last already marks completion.
            label_path = os.path.join(root, "labels", split, sample_id + ".png")
            label_to_pil(label, SYNTHETIC_PALETTE).save(label_path)
        write_atomic(os.path.join(root, split + ".txt"), "".join(i + "\n" for i in ids))
    write_atomic(done_path, json.dumps(settings, indent=2) + "\n")
    return root


def make_camvid_small(source_root, root, size=(180, 240), count=None):
    """A downscaled copy of the CamVid tree at `source_root` under `root`, once; returns root.

    The same layout (root/<split>/<name>.png, root/<split>annot/<name>.png, every split of the
    source), each image resized to `size` (height, width) bilinearly (PIL: antialiased when
    shrinking) and each label with NEAREST, its raw ids kept (11 stays void). kd_seg.py's CPU-scale
    CamVid setting trains and evaluates on it: a quarter of the pixels to decode, push through the
    networks and score. `count`: only that many images of each split, evenly spaced over it so that
    every drive is in (smoke runs; the tuning's held-out drive). root/DONE
    (source, size, count) is written last, as for make_synthetic.
    """
    settings = {"version": 2, "source": os.path.abspath(source_root), "size": list(size), "count": count}
    done_path = os.path.join(root, "DONE")
    try:
        with open(done_path) as file:
            if json.load(file) == settings:
                return root
    except (OSError, ValueError):  # no DONE (or an unreadable one): write it all
        pass
    splits = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(source_root, s))]
    if not splits:
        raise FileNotFoundError(f"CamVid not found at {source_root}: expected train/, val/ and test/ with "
                                "trainannot/, valannot/ and testannot/ (docs/DATASETS.md)")
    height, width = size
    for split in splits:
        images, labels, _ = _camvid_files(source_root, split)
        if count is not None and count < len(images):   # evenly spaced: every drive of the split
            picks = [round(i * (len(images) - 1) / max(1, count - 1)) for i in range(count)]
            images, labels = [images[i] for i in picks], [labels[i] for i in picks]
        for folder in (split, split + "annot"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        for image_path, label_path in zip(images, labels):
            name = os.path.basename(image_path)
            read_image(image_path).resize((width, height), Image.BILINEAR).save(os.path.join(root, split, name))
            raw = Image.fromarray(read_label_png(label_path))
            raw.resize((width, height), Image.NEAREST).save(os.path.join(root, split + "annot", name))
    write_atomic(done_path, json.dumps(settings, indent=2) + "\n")
    return root


def hold_out_sequence(root, sequence):
    """In a CamVid tree at `root` (e.g. make_camvid_small's copy): the split `train_without_<sequence>`
    (every train image whose name does not start with `sequence`) and the split `heldout_<sequence>`
    (those that do), as hard links beside the others; returns the two split names. kd_seg.py tunes
    on a held-out drive: like the test split's Seq05VD, one the training never sees (docs/CAMVID.md)."""
    images, labels, _ = _camvid_files(root, "train")
    held = [i for i, path in enumerate(images) if os.path.basename(path).startswith(sequence)]
    if not held:
        raise ValueError(f"no train image of {root} starts with {sequence!r} (CamVid's: 0001TP, 0006R0, 0016E5)")
    splits = (f"train_without_{sequence}", f"heldout_{sequence}")
    if os.path.isfile(os.path.join(root, splits[1], "DONE")):
        return splits
    for split, keep in zip(splits, (lambda i: i not in held, lambda i: i in held)):
        for folder in (split, split + "annot"):
            shutil.rmtree(os.path.join(root, folder), ignore_errors=True)   # a half-made one
            os.makedirs(os.path.join(root, folder))
        for i in filter(keep, range(len(images))):
            for path, folder in ((images[i], split), (labels[i], split + "annot")):
                os.link(path, os.path.join(root, folder, os.path.basename(path)))
    write_atomic(os.path.join(root, splits[1], "DONE"), sequence + "\n")   # last: both complete
    return splits


# ----------------------------------------------------------------------------------------------
# 7. Zhu et al. 2020: class-uniform "centroid" sampling (after NVIDIA semantic-segmentation's
#    uniform sampling: centroids once per dataset, a fresh class-balanced list every epoch)

def _class_centroids(label, num_classes):
    """For every class in `label`: the pixel of that class nearest to its centre of mass.

    The centre of mass itself can lie off the class (a ring's lies in its hole); the nearest pixel
    of the class keeps the promise that a crop around the point shows the class.
    """
    points = []
    for class_index in np.flatnonzero(np.bincount(label.ravel(), minlength=256)[:num_classes]):
        ys, xs = np.nonzero(label == class_index)
        nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        points.append((int(class_index), int(ys[nearest]), int(xs[nearest])))
    return points


def compute_centroids(dataset, tile=None, cache_path=None):
    """{class_index: [(image_index, y, x), ...]}: one point per image (per tile x tile tile if
    tile is given) and class present, in label pixel coordinates.

    dataset needs read_label(index), num_classes and label_paths (SegmentationFolder,
    ConcatSegmentation). With cache_path, the result is stored as json and reused while the label
    files, class count and tile are the same.
    """
    key = {"label_paths": [str(p) for p in dataset.label_paths], "num_classes": dataset.num_classes,
           "tile": tile}
    if cache_path is not None and os.path.isfile(cache_path):
        with open(cache_path) as file:
            cached = json.load(file)
        if cached["key"] == key:
            return {int(c): [tuple(p) for p in points] for c, points in cached["centroids"].items()}
    centroids = {class_index: [] for class_index in range(dataset.num_classes)}
    for index in range(len(dataset)):
        label = dataset.read_label(index)
        step_y, step_x = (tile, tile) if tile else label.shape
        for top in range(0, label.shape[0], step_y):
            for left in range(0, label.shape[1], step_x):
                tile_label = label[top:top + step_y, left:left + step_x]
                for class_index, y, x in _class_centroids(tile_label, dataset.num_classes):
                    centroids[class_index].append((index, top + y, left + x))
    if cache_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        write_atomic(cache_path, json.dumps({"key": key, "centroids": centroids}))
    return centroids


class CentroidSampler(torch.utils.data.Sampler):
    """Zhu et al. 2020 class-uniform sampling: each epoch, a fraction pct of the samples is drawn
    uniformly over classes (the same number for every class that occurs, each a random (image,
    centroid) pair), the rest uniformly over images (a random subset, as NVIDIA's code).

    Centroids come from compute_centroids(dataset, tile, cache_path) once. Yields image indices and
    (image_index, (y, x, class_index)) items, which SegmentationFolder and ConcatSegmentation take
    as indices (the crop then keeps that pixel). Call set_epoch(epoch) before each epoch, as with
    DistributedSampler; the list depends only on (seed, epoch), so under DDP every rank can take
    epoch_indices(epoch)[rank::world_size].
    """

    def __init__(self, dataset, pct=0.5, tile=None, cache_path=None, num_samples=None, seed=0):
        centroids = compute_centroids(dataset, tile, cache_path)
        self.centroids = {c: points for c, points in centroids.items() if points}
        self.num_images, self.pct, self.seed, self.epoch = len(dataset), pct, seed, 0
        self.num_samples = num_samples if num_samples is not None else len(dataset)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def epoch_indices(self, epoch):
        """The epoch's shuffled list of items."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        per_class = int(self.num_samples * self.pct / len(self.centroids)) if self.centroids else 0
        items = []
        for class_index in sorted(self.centroids):
            points = self.centroids[class_index]
            for pick in torch.randint(len(points), (per_class,), generator=generator).tolist():
                image_index, y, x = points[pick]
                items.append((image_index, (y, x, class_index)))
        num_uniform = self.num_samples - len(items)
        passes = math.ceil(num_uniform / self.num_images) if num_uniform > 0 else 0
        uniform = [torch.randperm(self.num_images, generator=generator) for _ in range(passes)]
        items += torch.cat(uniform).tolist()[:num_uniform] if uniform else []
        return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        return iter(self.epoch_indices(self.epoch))


class ConcatSegmentation(torch.utils.data.Dataset):
    """Several datasets with the same classes as one (Zhu et al. 2020 mix real and pseudo labels by
    sampling from one combined set). Unlike torch's ConcatDataset it accepts CentroidSampler's
    (index, centroid) items and offers read_label for compute_centroids."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        first = self.datasets[0]
        for dataset in self.datasets[1:]:
            if dataset.class_names != first.class_names:
                raise ValueError("ConcatSegmentation needs datasets with the same class names")
        self.class_names, self.num_classes = first.class_names, first.num_classes
        self.palette, self.thing_classes = first.palette, first.thing_classes
        self.image_paths = [p for d in self.datasets for p in d.image_paths]
        self.label_paths = [p for d in self.datasets for p in d.label_paths]
        self.starts = np.cumsum([0] + [len(d) for d in self.datasets]).tolist()

    def __len__(self):
        return self.starts[-1]

    def _locate(self, index):
        part = bisect.bisect_right(self.starts, index) - 1
        return self.datasets[part], index - self.starts[part]

    def read_label(self, index):
        dataset, local_index = self._locate(index)
        return dataset.read_label(local_index)

    def __getitem__(self, item):
        index, centroid = item if isinstance(item, tuple) else (item, None)
        dataset, local_index = self._locate(index)
        return dataset[(local_index, centroid) if centroid is not None else local_index]


# ----------------------------------------------------------------------------------------------
# 8. MGD (Qin et al. 2022) CutMix box masks, as the official code (JayQine/MGD-SSSS config:
#    cutmix_mask_prop_range (0.25, 0.5), 3 boxes, random aspect ratio, boxes within the image,
#    inverted masks), which inherits BoxMaskGenerator from CutMix-Seg (French et al. 2020) / CPS.

def sample_cutmix_boxes(n, height, width, num_boxes=3, area_range=(0.25, 0.5), generator=None):
    """Boxes (n, num_boxes, 4) int64 as (top, left, bottom, right), exclusive bottom/right.

    As in the official code, a proportion a ~ U(area_range) is drawn for each box and the box
    covers a / num_boxes of the image, so the boxes of one mask cover about a in total (25-50% by
    default) when they do not overlap. Aspect ratio: height fraction a^t (t ~ U(0, 1)), width
    fraction a / a^t, both times sqrt(1 / num_boxes); boxes lie inside the image.
    """
    def uniform():
        return torch.rand(n, num_boxes, generator=generator, dtype=torch.float64)

    low, high = area_range
    area = low + (high - low) * uniform()
    height_fraction = area ** uniform()
    width_fraction = area / height_fraction
    shrink = math.sqrt(1.0 / num_boxes)
    box_height = torch.round(height_fraction * shrink * height)
    box_width = torch.round(width_fraction * shrink * width)
    top = torch.round((height - box_height) * uniform())
    left = torch.round((width - box_width) * uniform())
    return torch.stack([top, left, top + box_height, left + box_width], dim=-1).long()


def cutmix_box_masks(n, height, width, num_boxes=3, area_range=(0.25, 0.5), generator=None):
    """Float masks (n, H, W) of 0/1 for u_mix = u0 * (1 - M) + u1 * M (MGD, Sec. 3 / CPS).

    Each box flips the mask inside it, as the official code does: where two boxes overlap the mask
    is 0 again. See sample_cutmix_boxes for the box sizes.
    """
    masks = torch.zeros(n, height, width)
    boxes = sample_cutmix_boxes(n, height, width, num_boxes, area_range, generator)
    for index in range(n):
        for top, left, bottom, right in boxes[index].tolist():
            masks[index, top:bottom, left:right] = 1 - masks[index, top:bottom, left:right]
    return masks
