"""Evaluation: mIoU, FPS, GMACs, prediction PNGs, submission files and teacher pseudo labels.

    # mIoU + per-class IoU table of a checkpoint on a split
    python eval.py --checkpoint runs/teacher/checkpoint.pt --data-root data/synthetic --split test
    # the same, plus FPS at 512x512 (protocol of docs/DATASETS.md) and coloured prediction PNGs
    python eval.py --checkpoint runs/student/checkpoint.pt --data-root data/synthetic --split val \
        --fps --fps-size 512 512 --save-pred runs/student/pred
    # offline pseudo labels (Zhu et al. 2020) for any image folder, with flip + multi-scale TTA
    python eval.py --checkpoint runs/teacher/checkpoint.pt --dataset folder \
        --data-root data/synthetic/images/unlabeled --save-pred runs/pseudo --threshold 0.5 \
        --flip --scales 0.75 1 1.25
    # the files the official evaluation / test server reads (here Cityscapes val: labelIds)
    python eval.py --checkpoint runs/city/checkpoint.pt --dataset cityscapes \
        --data-root /data/cityscapes --split val --window 1024 1024 --submission runs/city/val_ids
    # FPS only, of an untrained architecture (no checkpoint, no data)
    python eval.py --model deeplabv2_mobilenetv2 --num-classes 19 --fps --fps-size 512 512

What is in this file, top to bottom: the metrics, inference (whole image, sliding window, TTA),
speed and size, prediction PNGs and submission files, pseudo-label diagnostics, the command line;
then, in a section of their own, the operational helpers that train.py and kd_seg.py share
(option checks, safe checkpoint loading, output-folder locks, one-line errors).

A train.py checkpoint knows its data: without --dataset, eval.py scores its dataset, with its class
names. The per-class table is printed and, for a checkpoint in a train.py run folder (its args.json
beside it), written there as `eval_<split>.md` and `eval_<split>.json` (classes keyed by name;
--json FILE: there instead, the table beside it); a file there that eval.py did not write is never
overwritten. An evaluation longer than 5 s prints progress with an ETA.

mIoU comes from one confusion matrix (one `bincount`) accumulated over the whole split at the
label's own resolution (logits are upsampled, labels never downsampled). Classes that never
occur (neither in the labels nor in the predictions) are left out of the mean instead of
turning it into NaN.

`--save-pred DIR` writes, per image, `DIR/<name>.png` (palette PNG of class ids, 255 where the
confidence is below `--threshold`), `DIR/confidence/<name>.png` (max softmax probability x 255)
and `DIR/color/<name>.png` (a coloured picture). The same files are the pseudo labels that
`train.py --pseudo-labels DIR` reads. Every file is written atomically and a rerun with the
same weights (their SHA-256, not the checkpoint's path) and options skips the images already
done, so an interrupted labelling run resumes without redoing, corrupting or mixing models.
While a folder is written, `DIR.lock` beside it holds the writer's pid (lock_output_dir).

`--submission DIR` writes what the dataset's official evaluation reads as it is: one PNG per
image, `DIR/<image name>.png`, in one flat folder (beside kd-seg's `kd_seg_run.json` marker,
which the official scripts do not read; zip only the PNGs for a test server), holding the
argmax with the same inference as the mIoU: Cityscapes labelIds (mode L,
`<city>_<seq>_<frame>_leftImg8bit.png`, the names cityscapesscripts' evalPixelLevelSemanticLabeling
matches with `<city>_<seq>_<frame>*.png`), ADE20K ids 1..150 (mode L), VOC ids 0..20 (palette
PNGs, as the VOC devkit). Atomic and resumable as `--save-pred`.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import datasets
import models


# ----------------------------------------------------------------------------- metrics
class ConfusionMatrix:
    """Pixel confusion matrix (rows: ground truth, columns: prediction); ignore value 255."""

    def __init__(self, num_classes, device="cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred, target):
        keep = target != 255
        index = target[keep].long() * self.num_classes + pred[keep].long()
        # one bincount per batch; minlength makes the result always C*C long
        self.mat += torch.bincount(index, minlength=self.num_classes ** 2).view_as(self.mat)

    def all_reduce(self):
        """Sum the matrix over DDP processes (every rank gets the total)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def compute(self):
        """{"miou", "iou" (per class, None where the class never occurs), "acc", "class_acc"}."""
        mat = self.mat.double().cpu()
        true_pos = mat.diag()
        gt_count, pred_count = mat.sum(1), mat.sum(0)
        union = gt_count + pred_count - true_pos
        occurs = union > 0  # absent everywhere: undefined IoU, left out of the mean (no NaN)
        iou = torch.where(occurs, true_pos / union.clamp(min=1), torch.zeros_like(union))
        total = mat.sum().item()
        return {
            "miou": iou[occurs].mean().item() if occurs.any() else 0.0,
            "iou": [iou[c].item() if occurs[c] else None for c in range(self.num_classes)],
            "acc": true_pos.sum().item() / total if total else 0.0,
            "class_acc": [(true_pos[c] / gt_count[c]).item() if gt_count[c] else None
                          for c in range(self.num_classes)],
        }


def format_table(metrics, class_names):
    """Per-class IoU table (percent) with class names, then mIoU and pixel accuracy."""
    width = max(len(n) for n in class_names)
    lines = [f"{'class':<{width}}  IoU"]
    for name, iou in zip(class_names, metrics["iou"]):
        lines.append(f"{name:<{width}}  {'-' if iou is None else f'{100 * iou:5.1f}'}")
    lines.append(f"{'mIoU':<{width}}  {100 * metrics['miou']:5.2f}")  # 2 decimals: to compare with papers
    lines.append(f"{'pixel acc':<{width}}  {100 * metrics['acc']:5.1f}")
    return "\n".join(lines)


def markdown_table(metrics, class_names):
    """The same table in markdown: IoU and accuracy per class (percent), then mIoU and pixel accuracy."""
    cell = lambda value: "-" if value is None else f"{100 * value:.1f}"  # a class that never occurs: -
    lines = ["| class | IoU | accuracy |", "|---|---:|---:|"]
    lines += [f"| {name} | {cell(iou)} | {cell(acc)} |"
              for name, iou, acc in zip(class_names, metrics["iou"], metrics["class_acc"])]
    lines.append(f"| **mIoU** | **{100 * metrics['miou']:.2f}** | |")
    lines.append(f"| pixel accuracy | | {cell(metrics['acc'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inference
def autocast_context(device, amp):
    """`amp` in off/auto/bf16/fp16 -> (context manager, dtype or None). AMP is CUDA only here:
    CPU autocast is slower than fp32 for these convolutions, so "auto" means fp32 on CPU."""
    device = torch.device(device)
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext(), None
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.amp.autocast(device.type, dtype=dtype), dtype


def logits_full(model, x, window=None):
    """Logits of `x` upsampled to its own resolution. With `window` (h, w) smaller than the
    image: windows at a stride of 2/3 of their size (the last one flush with the border), logits
    averaged where they overlap, as full-resolution Cityscapes evaluation does."""
    if window is None or (x.shape[-2] <= window[0] and x.shape[-1] <= window[1]):
        return F.interpolate(model(x)["out"].float(), size=x.shape[-2:], mode="bilinear",
                             align_corners=getattr(model, "align_corners", False))  # CIRKD's: True
    (height, width), (wh, ww) = x.shape[-2:], (min(window[0], x.shape[-2]), min(window[1], x.shape[-1]))
    total = count = 0
    for top in sorted({*range(0, height - wh, max(1, wh * 2 // 3)), height - wh}):
        for left in sorted({*range(0, width - ww, max(1, ww * 2 // 3)), width - ww}):
            logits = logits_full(model, x[..., top:top + wh, left:left + ww])
            total = total + F.pad(logits, (left, width - left - ww, top, height - top - wh))
            count = count + F.pad(torch.ones_like(logits[:, :1]), (left, width - left - ww, top, height - top - wh))
    return total / count


@torch.inference_mode()
def predict(model, images, size, scales=(1.0,), flip=False, window=None):
    """Softmax probabilities (N, C, *size), averaged over scales and an optional flip;
    `window`: sliding-window inference at each scale (see logits_full)."""
    probs = 0
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(
            images, scale_factor=scale, mode="bilinear", align_corners=False)
        for flipped in ([False, True] if flip else [False]):
            logits = logits_full(model, x.flip(-1) if flipped else x, window)
            logits = logits.flip(-1) if flipped else logits
            # the softmax over classes runs in float32 even under AMP
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probs = probs + logits.softmax(1)
    return probs / (len(scales) * (2 if flip else 1))


def evaluate(model, loader, device, num_classes, amp="off", scales=(1.0,), flip=False, window=None,
             progress=None, log_seconds=5.0):
    """mIoU etc. of `model` over `loader` (batches of full-resolution (image, label)). With
    `progress` (a label), a line with an ETA every `log_seconds`: a long evaluation is never silent."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    autocast, _ = autocast_context(device, amp)
    start = last_line = time.perf_counter()
    done, total = 0, len(loader.dataset)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast:
            probs = predict(model, images, labels.shape[-2:], scales, flip, window)
        confusion.update(probs.argmax(1), labels)
        done, now = done + len(images), time.perf_counter()
        if progress and now - last_line >= log_seconds:
            last_line, per_image = now, (now - start) / done
            print(f"{progress} {done}/{total} | {per_image:.3f} s/img | "
                  f"eta {format_eta(per_image * (total - done))}", flush=True)
    confusion.all_reduce()
    return confusion.compute()


# ----------------------------------------------------------------------------- speed & size
@torch.inference_mode()
def measure_fps(model, size, device, amp="off", warmup=10, iters=200, min_seconds=5.0,
                include_upsample=True):
    """FPS protocol of docs/DATASETS.md: batch 1, eval mode, input already on the device, >= 10
    warm-up forwards, then time until `iters` iterations or `min_seconds` have passed."""
    model.eval()
    device = torch.device(device)
    x = torch.randn(1, 3, *size, device=device)
    autocast, dtype = autocast_context(device, amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        with autocast:
            out = model(x)["out"]
            if include_upsample:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False).argmax(1)

    for _ in range(warmup):
        forward()
    sync()
    count, start = 0, time.perf_counter()
    while count == 0 or (count < iters and time.perf_counter() - start < min_seconds):
        forward()
        count += 1
    sync()
    elapsed = time.perf_counter() - start
    return {
        "fps": count / elapsed, "latency_ms": 1000 * elapsed / count, "iters": count,
        "size": list(size), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)", "dtype": str(dtype or torch.float32),
        "torch": torch.__version__, "cuda": torch.version.cuda, "upsample_argmax": include_upsample,
    }


def count_gmacs(model, size):
    """Forward GMACs (10^9 multiply-adds) of one image at `size`, as deployed (eval mode: no
    auxiliary head). Multiply-adds are what torchvision's model table ("GFLOPS") and most
    segmentation papers report; torch.utils.flop_counter counts 2 FLOPs per multiply-add of the
    convolutions and matmuls (bias, BatchNorm, activations and resizing are not counted), so
    GMACs = its FLOPs / 2. On the meta device it counts shapes only, with no arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    param = next(model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype))
    return counter.get_total_flops() / 2e9


def count_params(model):
    """Parameters of the network as deployed: the auxiliary head (trained with, never run at
    test time) is left out."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith("aux_head."))


# ----------------------------------------------------------------------------- prediction PNGs and submission files
def weights_digest(model):
    """SHA-256 of a model's tensors (names, dtypes, shapes, values): what ties a folder of
    predictions to the weights that made them, whatever file or path the weights came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # the raw bytes
    return digest.hexdigest()


def predict_missing(model, dataset, done, what, device, amp="off", scales=(1.0,), flip=False,
                    window=None, log_every=50):
    """Yield (index, probabilities (C, H, W)) for every image of `dataset` not `done(index)`,
    with progress and an ETA: the loop of the resumable writers (predictions, submissions)."""
    todo = [i for i in range(len(dataset)) if not done(i)]
    print(f"{what}: {len(dataset) - len(todo)} of {len(dataset)} already done, writing {len(todo)}")
    autocast, _ = autocast_context(device, amp)
    model.eval()
    start = time.perf_counter()
    for count, i in enumerate(todo, 1):
        image, _ = dataset[i]
        with autocast:
            yield i, predict(model, image[None].to(device), image.shape[-2:], scales, flip, window)[0]
        if count % log_every == 0 or count == len(todo):
            elapsed = time.perf_counter() - start
            print(f"{what} {count}/{len(todo)} | {elapsed / count:.3f} s/img | "
                  f"eta {format_eta(elapsed / count * (len(todo) - count))}", flush=True)


def save_predictions(model, dataset, out_dir, device, amp="off", threshold=0.0, scales=(1.0,),
                     flip=False, owner=None, log_every=50):
    """Write palette, confidence and colour PNGs for every image of `dataset` (see module doc).
    Resumable: images whose label PNG exists are skipped (files appear atomically, label last).
    `owner` (a dict, e.g. with `weights_digest(model)`) must match the folder's to resume it;
    the folder is locked while written (lock_output_dir)."""
    out_dir = Path(out_dir)
    with lock_output_dir(out_dir):
        claim_output_dir(out_dir, owner or {})
        for orphan in out_dir.rglob("*.tmp"):  # a kill between a write and its rename
            orphan.unlink()
        names = output_names(dataset)
        for i, probs in predict_missing(model, dataset, lambda i: (out_dir / f"{names[i]}.png").exists(),
                                        f"predictions to {out_dir}", device, amp, scales, flip,
                                        log_every=log_every):
            confidence, label = probs.max(0)
            label[confidence < threshold] = 255
            name = names[i]
            for sub in ("confidence", "color"):
                (out_dir / sub / name).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            label = label.cpu().numpy().astype(np.uint8)
            datasets.save_confidence_png(out_dir / "confidence" / f"{name}.png",
                                         confidence.cpu().numpy())
            datasets.save_png(out_dir / "color" / f"{name}.png", datasets.colorize(label, dataset.palette))
            datasets.save_label_png(out_dir / f"{name}.png", label, dataset.palette)  # last: "done"


def save_submission(model, dataset, dataset_name, out_dir, device, amp="off", scales=(1.0,),
                    flip=False, window=None, owner=None, log_every=50):
    """Write the files the dataset's official evaluation reads as they are (see module doc): one
    PNG per image, named after the image, in one flat folder, holding the argmax in the dataset's
    own ids (datasets.SUBMISSION_IDS). Same inference as `evaluate`; atomic and resumable like
    save_predictions, and a folder holding any other file is refused."""
    if dataset_name not in datasets.SUBMISSION_IDS:
        raise ValueError(f"--submission: no official format for dataset {dataset_name!r}; "
                         f"expected one of {sorted(datasets.SUBMISSION_IDS)}")
    official_ids = np.array(datasets.SUBMISSION_IDS[dataset_name], dtype=np.uint8)
    names = [Path(p).stem + ".png" for p in dataset.image_paths]
    if len(set(names)) < len(names):  # a flat folder needs one name per image
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"--submission: two images would both be written as {duplicate}")
    out_dir = Path(out_dir)
    with lock_output_dir(out_dir):  # one writer at a time (see save_predictions)
        claim_output_dir(out_dir, owner or {})
        allowed = {*names, "kd_seg_run.json"}
        foreign = sorted(f.name for f in out_dir.iterdir() if f.name not in allowed
                         and not (f.name.startswith(".") and f.name.endswith(".tmp")))
        if foreign:  # the official scripts would read it too (cityscapesscripts: multiple predictions)
            raise ValueError(f"{out_dir}: holds {foreign[0]}, which is no file of this submission; "
                             "choose a new output folder")
        for i, probs in predict_missing(model, dataset, lambda i: (out_dir / names[i]).exists(),
                                        f"submission to {out_dir}", device, amp, scales, flip, window,
                                        log_every):
            ids = official_ids[probs.argmax(0).cpu().numpy()]
            # VOC's devkit reads palette PNGs; Cityscapes and ADE20K single-channel (mode L) ids
            picture = (datasets.label_to_pil(ids, datasets.voc_palette(256)) if dataset_name == "voc"
                       else Image.fromarray(ids))
            datasets.save_png(out_dir / names[i], picture)


def output_names(dataset):
    """Output name of each image: its path relative to the dataset's image root (a folder
    dataset's own root, which is how train.py --pseudo-labels pairs them), no suffix."""
    paths = [Path(p) for p in dataset.image_paths]
    root = Path(os.path.commonpath([p.parent for p in paths])) if len(paths) > 1 else paths[0].parent
    if getattr(dataset, "image_root", None):
        root = Path(dataset.image_root)
    return [str(p.relative_to(root).with_suffix("")) for p in paths]


# ----------------------------------------------------------------------------- pseudo-label diagnostics
def pseudo_label_diagnostics(pred_dir, dataset, thresholds=(0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)):
    """Quality of saved pseudo labels against held-back labels, per confidence threshold:
    mIoU of the kept pixels, precision (accuracy of kept pixels) and coverage (kept fraction)."""
    names = output_names(dataset)
    confusions = [ConfusionMatrix(dataset.num_classes) for _ in thresholds]
    labelled = 0  # pixels with a held-back label: the denominator of coverage
    for i, name in enumerate(names):
        target = torch.from_numpy(dataset.read_label(i)).long()
        pred = torch.from_numpy(datasets.read_label_png(Path(pred_dir) / f"{name}.png")).long()
        conf = torch.from_numpy(np.array(Image.open(Path(pred_dir) / "confidence" / f"{name}.png")))
        labelled += int((target != 255).sum())
        for t, confusion in zip(thresholds, confusions):
            # pixels the labelling run already dropped stay dropped at every threshold
            keep = (conf.float() >= 255 * t) & (pred != 255)
            confusion.update(pred[keep], target[keep])
    rows = []
    for t, confusion in zip(thresholds, confusions):
        m = confusion.compute()
        rows.append({"threshold": t, "miou": m["miou"], "precision": m["acc"],
                     "coverage": confusion.mat.sum().item() / max(labelled, 1)})
    return rows


def plot_diagnostics(rows, path, size=(420, 300)):
    """Precision, coverage and mIoU against the threshold, drawn with pillow (no matplotlib)."""
    w, h = size
    left, top, right, bottom = 40, 20, w - 10, h - 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, right, bottom], outline="black")
    xs = [left + (right - left) * r["threshold"] for r in rows]
    for key, color in (("precision", (0, 90, 200)), ("coverage", (220, 80, 0)), ("miou", (0, 150, 0))):
        ys = [bottom - (bottom - top) * r[key] for r in rows]
        draw.line(list(zip(xs, ys)), fill=color, width=2)
        for x, y in zip(xs, ys):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((left + 5 + 90 * ["precision", "coverage", "miou"].index(key), bottom + 20),
                  key, fill=color)
    for v in (0, 0.5, 1):
        draw.text((5, bottom - (bottom - top) * v - 5), f"{v:.1f}", fill="black")
        draw.text((left + (right - left) * v - 8, bottom + 4), f"{v:.1f}", fill="black")
    datasets.save_png(path, image)


# ----------------------------------------------------------------------------- command line
def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a kd-seg checkpoint: mIoU, FPS, PNGs.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint written by train.py, or a published file "
                   "(docs/PUBLISHED.md)")
    p.add_argument("--model", help=f"{models.MODEL_NAMES_HELP} (default: the checkpoint's; "
                   "FPS-only without one)")
    p.add_argument("--num-classes", type=int, help="class count for --model without checkpoint")
    p.add_argument("--dataset",
                   help=f"one of {', '.join(sorted(datasets.DATASETS))} (docs/DATASETS.md), or folder: "
                        "any image folder, predictions only (default: a train.py checkpoint's dataset, "
                        "else synthetic)")
    p.add_argument("--data-root", help="dataset root folder")
    p.add_argument("--split", help="split to evaluate (default: val; with --dataset folder: val of "
                                   "your own labelled data, else the --data-root folder itself)")
    p.add_argument("--class-names", metavar="FILE",
                   help="--dataset folder: the classes' names and colours, as for train.py "
                        "(default: the checkpoint's)")
    p.add_argument("--ignore-index", type=int,
                   help="--dataset folder: the label id not scored (default: the checkpoint's, else 255)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (the default: cuda where there is one)")
    p.add_argument("--amp", default="auto", choices=["off", "auto", "bf16", "fp16"],
                   help="autocast dtype on CUDA (auto: bf16 where supported, else fp16)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale inference")
    p.add_argument("--flip", action="store_true", help="add horizontally flipped inference")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"),
                   help="sliding-window inference with this window (1/3 overlap), e.g. 1024 1024 "
                        "for full-resolution Cityscapes")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward (1: images of different sizes never need padding)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (decoding overlaps inference)")
    p.add_argument("--save-pred", metavar="DIR", help="write palette/confidence/colour PNGs")
    p.add_argument("--submission", metavar="DIR",
                   help="write the official submission files (Cityscapes labelIds, ADE20K ids "
                        "1..150, VOC palette PNGs), one per image in one flat folder")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="with --save-pred: pixels below this confidence become 255 (ignore)")
    p.add_argument("--fps", action="store_true", help="measure FPS (docs/DATASETS.md protocol)")
    p.add_argument("--fps-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                   help="input size of the FPS and GMACs measurement (docs/DATASETS.md's protocol)")
    p.add_argument("--fps-iters", type=int, default=200, help="timed iterations (protocol: 200)")
    p.add_argument("--fps-seconds", type=float, default=5.0, help="or at least this long")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's, "
                   "one per core); 1 when several jobs share the cores (README)")
    p.add_argument("--json", metavar="FILE",
                   help="write the results here as JSON, and the per-class table beside it as .md "
                        "(default: eval_<split>.json and .md in the train.py run folder that holds "
                        "--checkpoint; none for another file)")
    return p


def check_args(args):
    check_number("--batch-size", args.batch_size, low_open=True)
    check_number("--threshold", args.threshold, 0, 1)
    check_number("--workers", args.workers)
    for scale in args.scales:
        check_number("--scales", scale, low_open=True)
    for size in args.fps_size:
        check_number("--fps-size", size, low_open=True)
    for size in args.window or []:
        check_number("--window", size, low_open=True)
    check_number("--fps-iters", args.fps_iters, low_open=True)
    check_number("--fps-seconds", args.fps_seconds)
    if args.threads is not None:
        check_number("--threads", args.threads, low_open=True)
    if args.json and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json}: is a folder; expected a file name")
    check_device(args.device)
    if args.checkpoint is None and args.model is None:
        raise ValueError("give --checkpoint (or --model with --num-classes for FPS only)")
    if args.checkpoint is None and (args.num_classes is None or args.num_classes < 1):
        raise ValueError("--model without --checkpoint needs a positive --num-classes")
    if (args.save_pred or not args.fps) and args.data_root is None and args.checkpoint:
        raise ValueError("--data-root is required to evaluate or save predictions")
    if args.dataset not in (None, "folder") and (args.class_names or args.ignore_index is not None):
        raise ValueError(f"--class-names and --ignore-index are for --dataset folder (your own data); "
                         f"{args.dataset} has its own classes and ignored ids")
    if args.ignore_index is not None:
        check_number("--ignore-index", args.ignore_index, 0, 255)
    if args.submission and (args.data_root is None or args.dataset not in (None, *datasets.SUBMISSION_IDS)):
        raise ValueError(f"--submission needs --data-root and --dataset one of "
                         f"{sorted(datasets.SUBMISSION_IDS)}")


def main(args):
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    dataset = None
    if args.checkpoint:
        model, ckpt = load_checkpoint(args.checkpoint, args.device, args.model)
    else:
        model, ckpt = models.build_model(args.model, args.num_classes).to(args.device).eval(), None
    # a train.py checkpoint knows its data: its dataset, so its class count and names (a published
    # file names none)
    args.dataset = args.dataset or (ckpt["args"].get("dataset", "synthetic") if ckpt else "synthetic")
    run_dir = run_folder(args.checkpoint, ckpt)
    if args.split is None:  # a tree of images is read whole; labelled data is scored on val
        image_tree = args.dataset == "folder" and not datasets.is_labelled_folder(args.data_root or "")
        args.split = "" if image_tree else "val"
    if args.data_root and args.dataset != "folder":
        dataset = datasets.build_dataset(args.dataset, args.data_root, args.split)
        if dataset.num_classes != model.num_classes:
            source = f"{args.checkpoint}: checkpoint" if args.checkpoint else f"--model {args.model}"
            raise ValueError(f"{source} has {model.num_classes} classes, the dataset has {dataset.num_classes}")
    if args.data_root and args.dataset == "folder":
        classes = folder_classes(args, ckpt, model)
        dataset = datasets.build_dataset("folder", args.data_root, args.split, **classes)
        if dataset.num_classes != model.num_classes:
            raise ValueError(f"{args.checkpoint or '--model ' + args.model}: has {model.num_classes} classes, "
                             f"but {dataset.num_classes} were given for --dataset folder (--num-classes, "
                             "--class-names)")
        if None in dataset.label_paths:   # any image folder (pseudo labels): predictions only
            if not args.save_pred and run_dir is None:
                raise ValueError(f"--dataset folder: {args.data_root} holds images without labels, so there "
                                 "is no mIoU, only predictions to write: give --save-pred DIR")
            args.save_pred = args.save_pred or str(run_dir / f"pred_{Path(args.data_root, args.split).name}")
            print(f"{args.data_root}: {len(dataset)} images without labels: predictions only (no mIoU), "
                  f"written to {args.save_pred}")
    scored = dataset is not None and None not in dataset.label_paths
    json_path = args.json or (run_dir / f"eval_{args.split}.json" if run_dir and scored else None)
    for path in [Path(json_path), Path(json_path).with_suffix(".md")] if json_path else []:
        refuse_foreign_results(path)  # before the work, not after it
    if args.window and min(args.window) < 2 * model.output_stride:
        # a window the network's coarsest feature map would cover with a single cell: it runs,
        # and its scores are garbage
        raise ValueError(f"--window {args.window[0]} {args.window[1]}: smaller than the network takes; its "
                         f"output stride is {model.output_stride}, so each side must be at least "
                         f"{2 * model.output_stride}")
    if dataset is not None:  # before any work: an empty split, a broken file, NaN weights
        if len(dataset) == 0:
            raise ValueError(f"--split '{args.split}' of {args.data_root} holds no images")
        datasets.check_files(dataset)
        check_finite_outputs(model, dataset[0][0][None].to(args.device),
                             args.checkpoint or f"--model {args.model}")
    if dataset is not None and args.save_pred:
        # tied to the weights, not to the checkpoint's path: another model's labels never mix in
        owner = {"weights": weights_digest(model), "threshold": args.threshold, "scales": args.scales,
                 "flip": args.flip, "images": str(Path(args.data_root).resolve()), "split": args.split}
        save_predictions(model, dataset, args.save_pred, args.device, args.amp, args.threshold,
                         args.scales, args.flip, owner)
    if dataset is not None and args.submission:
        owner = {"submission": args.dataset, "weights": weights_digest(model), "scales": args.scales, "flip": args.flip,
                 "window": args.window, "images": str(Path(args.data_root).resolve()),
                 "split": args.split}
        save_submission(model, dataset, args.dataset, args.submission, args.device, args.amp,
                        args.scales, args.flip, args.window, owner)
    if scored:
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                             num_workers=args.workers)
        metrics = evaluate(model, loader, args.device, dataset.num_classes, args.amp,
                           args.scales, args.flip, args.window, progress=f"evaluating {args.split}")
        print(format_table(metrics, dataset.class_names))
        results["metrics"] = metrics
        results["classes"] = {name: {"iou": iou, "acc": acc} for name, iou, acc in
                              zip(dataset.class_names, metrics["iou"], metrics["class_acc"])}
    if args.fps:
        size = tuple(args.fps_size)
        # costs of the network as deployed: no auxiliary head (models.py: it runs in training only)
        results["params_m"] = count_params(model) / 1e6
        results["gmacs"] = count_gmacs(model, size)
        results["fps"] = measure_fps(model, size, args.device, args.amp if args.device != "cpu"
                                     else "off", iters=args.fps_iters, min_seconds=args.fps_seconds)
        f = results["fps"]
        print(f"params {results['params_m']:.2f} M | {results['gmacs']:.2f} GMACs "
              f"({2 * results['gmacs']:.2f} GFLOPs) at "
              f"{size[0]}x{size[1]} | {f['fps']:.1f} FPS ({f['latency_ms']:.2f} ms, {f['iters']} "
              f"iters) | {f['device']} | {f['dtype']} | torch {f['torch']} | upsample+argmax "
              f"included")
    if json_path:
        table = markdown_table(results["metrics"], dataset.class_names) if "metrics" in results else None
        write_results(json_path, results, table, args)
    return results


def folder_classes(args, ckpt, model):
    """build_dataset's class arguments for --dataset folder: --class-names or --num-classes and
    --ignore-index where given; else what the checkpoint's training recorded: the named dataset
    it trained on, or your own data's names, colours and ignored id; a published file names no
    dataset: class ids as names."""
    trained = ckpt["args"] if ckpt else {}
    ignore_index = args.ignore_index
    if ignore_index is None:
        ignore_index = trained.get("ignore_index", datasets.IGNORE_INDEX)
    if args.class_names:
        names, palette = datasets.read_class_names(args.class_names, args.num_classes)
    elif args.num_classes is not None:
        names, palette = [str(c) for c in range(args.num_classes)], None
    elif trained.get("dataset") in datasets.DATASETS:
        return dict(classes_from=trained["dataset"], ignore_index=ignore_index)
    elif "classes" in trained:
        names, palette = trained["classes"], trained["palette"]
    else:
        names, palette = [str(c) for c in range(model.num_classes)], None
    return dict(class_names=names, palette=palette, ignore_index=ignore_index)


def run_folder(checkpoint, ckpt):
    """The train.py run folder holding `checkpoint` (its args.json beside it), where eval.py keeps
    its results by default; None for any other file (a published one, a copy elsewhere): eval.py
    never writes into a folder it cannot tell is a kd-seg run's."""
    folder = Path(checkpoint).parent if ckpt is not None else None
    return folder if folder is not None and (folder / "args.json").is_file() else None


WRITTEN_BY = "written by eval.py"


def refuse_foreign_results(path):
    """Refuse in one line to write over `path` when it holds a file eval.py did not write (eval.py's
    say so at their top): never overwrite results this command did not produce."""
    if Path(path).exists() and WRITTEN_BY not in Path(path).read_text(errors="replace")[:200]:
        raise ValueError(f"{path}: holds a file eval.py did not write; give --json another file name")


def write_results(json_path, results, table, args):
    """`results` as JSON at `json_path` and, given, the per-class `table` (markdown) beside it as
    .md, each atomically; a file there that eval.py did not write (it says so at its top) is
    refused, never overwritten."""
    json_path = Path(json_path)
    note = f"{WRITTEN_BY}: {args.checkpoint or args.model} on {args.dataset} {args.split} ({args.data_root})"
    files = {json_path: json.dumps({"note": note, **results}, indent=1)}
    if table:
        files[json_path.with_suffix(".md")] = f"<!-- {note} -->\n\n{table}\n"
    for path, text in files.items():
        refuse_foreign_results(path)
        datasets.write_atomic(path, text)
    print(f"results: {', '.join(map(str, files))}")


# =============================================================================================
# Operational helpers: option checks, safe checkpoint loading, output-folder locks, one-line
# errors. Nothing here is about segmentation or distillation; train.py and kd_seg.py use them
# too: eval.py is the lowest file that all three import and that may import models.py. Skip this
# part on a first reading.


# --- help and option checks
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default said once: argparse's "(default: X)" is added unless the help
    already says "default: ..." or the option has none (None, or False for a flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def check_number(option, value, low=0, high=math.inf, low_open=False, high_open=False):
    """Refuse in one line naming `option` a value that is NaN, infinite or outside [low, high]
    (open ends where asked). `value <= 0` alone would let NaN through: every comparison with NaN
    is False, and --lr nan trains NaN weights."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not math.isfinite(value):
        raise ValueError(f"{option} must be a finite number, got {value}")
    if not (above and below):
        if high == math.inf:
            expected = ("positive" if low == 0 else f"> {low}") if low_open else \
                ("non-negative" if low == 0 else f">= {low}")
        else:
            expected = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{option} must be {expected}, got {value}")


def check_device(name):
    """`name` as a torch.device, refused in one line when it is no device or not on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: unknown device '{name}'; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                         "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# --- safe checkpoint loading
def load_checkpoint_dict(path):
    """The plain dict of a train.py checkpoint, read with `weights_only=True`: tensors, containers,
    numbers and strings only. A pickle can hold any object, and unpickling an object runs its
    `__reduce__`, so a downloaded file could otherwise run code; anything else (such an object, a
    truncated or random file, a bare state_dict) is refused in one line naming the file and
    saying which of these it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message: "... unsupported GLOBAL posix.system ..."
        if "GLOBAL" in str(e):
            raise ValueError(f"{path}: refused: it holds Python objects besides tensors, containers, "
                             "numbers and strings, and loading them could run code") from None
        raise ValueError(f"{path}: truncated or corrupt checkpoint (torch.load cannot read it)") from None
    except Exception:  # a truncated zip ("failed finding central directory"), random bytes, ...
        raise ValueError(f"{path}: truncated or corrupt checkpoint (torch.load cannot read it)") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("args"), dict) and {"model", "num_classes"} <= set(ckpt["args"])):
        raise ValueError(f"{path}: not a kd-seg checkpoint (expected train.py's dict with 'model' "
                         "and 'args', e.g. not a bare state_dict)")
    return ckpt


def load_checkpoint(path, device="cpu", expect_model=None, expect_classes=None):
    """Rebuild the model saved by train.py; clear errors for a wrong file, model or class count."""
    try:
        ckpt = load_checkpoint_dict(path)
    except ValueError as error:
        if "refused" in str(error):  # objects a safe load refuses: no published file holds them
            raise
        try:  # is it a plain weights file? (truncated, random: the line above says what it is not)
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise error from None
        # a published teacher (torchvision / mmsegmentation / CIRKD, docs/PUBLISHED.md),
        # recognised from its keys and shapes and loaded strictly and safely, or one line
        model = models.load_published(path, name=expect_model)
        if expect_classes and expect_classes != model.num_classes:
            raise ValueError(f"{path}: checkpoint has {model.num_classes} classes, the dataset has "
                             f"{expect_classes}") from None
        return model.to(device).eval(), None
    args = ckpt["args"]
    name, num_classes = args["model"], args["num_classes"]
    if expect_model and expect_model != name:
        raise ValueError(f"{path}: checkpoint holds model {name}, expected {expect_model}")
    if expect_classes and expect_classes != num_classes:
        raise ValueError(f"{path}: checkpoint has {num_classes} classes, the dataset has "
                         f"{expect_classes}")
    if name not in models.MODEL_NAMES:
        raise ValueError(f"{path}: checkpoint holds unknown model {name!r}")
    model = models.build_model(name, num_classes, output_stride=args.get("output_stride", 8),
                               aux=args.get("aux_weight", 0) > 0)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # torch's message lists every tensor: keep its first detail line
        detail = (str(e).splitlines() + [""])[1].strip()
        raise ValueError(f"{path}: weights do not fit {name} ({detail})") from None
    return model.to(device).eval(), ckpt


@torch.inference_mode()
def check_finite_outputs(model, images, source, autocast=nullcontext()):
    """Stop before any work when `model` (from `source`, a checkpoint path) outputs NaN or inf on
    `images`: weights holding NaN/inf make every distillation step non-finite and every pseudo
    label class 0, without another sign."""
    with autocast:
        logits = model(images)["out"]
    if not torch.isfinite(logits).all():
        raise ValueError(f"{source}: the model's outputs on the first batch are not finite "
                         "(NaN or inf in its weights?)")


# --- output folders: one writer at a time, never over another run's files
_HELD_LOCKS = set()  # the locks this process holds: its own pid in a lock it does not hold is stale


@contextlib.contextmanager
def lock_output_dir(out_dir):
    """Hold the lock of the folder `out_dir` while writing it: `<out_dir>.lock`, beside the folder
    (so that its "empty or ours" checks never see the lock), holds the writer's pid. A second
    writer is refused in one line naming the folder and that pid; a lock whose process no longer
    runs (kill -9 leaves it behind) is taken over. Released on every exit, error or Ctrl-C.

        with evaluation.lock_output_dir(args.out):
            ...  # check the folder, then write into it

    Two processes taking over the same stale lock in the very same instant could both win: it
    guards against a second command, not against a race of microseconds."""
    out_dir = Path(out_dir).resolve()
    lock = out_dir.with_name(out_dir.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one creator wins
            break
        except FileExistsError:
            pid = live_lock_owner(lock)
            if pid is not None:
                raise ValueError(f"{out_dir}: folder is being written by process {pid}; wait for it "
                                 f"to end (or delete {lock} if that process is not kd-seg)") from None
            lock.unlink(missing_ok=True)  # stale: its writer was killed
    with os.fdopen(handle, "w") as f:
        f.write(f"{os.getpid()}\n")
    _HELD_LOCKS.add(lock)
    try:
        yield out_dir
    finally:
        _HELD_LOCKS.discard(lock)
        lock.unlink(missing_ok=True)


def live_lock_owner(lock):
    """The pid written in `lock` if that process still runs, else None (a stale lock)."""
    for _ in range(20):  # a new lock is empty for the instant between its creation and its write
        try:
            text = Path(lock).read_text().strip()
        except FileNotFoundError:
            return None
        if text:
            break
        time.sleep(0.05)
    try:
        pid = int(text)
    except ValueError:
        return None
    if pid == os.getpid():  # ours only if we hold it (pids are reused, e.g. in a new container)
        return pid if Path(lock) in _HELD_LOCKS else None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, as another user
    return pid


def claim_output_dir(out_dir, owner):
    """A run never overwrites results it did not produce: `out_dir` must be new, empty, or
    carry our marker with the same `owner` dict (then we resume)."""
    out_dir = Path(out_dir)
    marker = out_dir / "kd_seg_run.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not marker.exists():
            raise ValueError(f"{out_dir}: folder holds files kd-seg did not write; "
                             "choose a new output folder")
        if json.loads(marker.read_text()) != owner:
            raise ValueError(f"{out_dir}: folder holds results of another run ({marker}); "
                             "choose a new output folder")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets.write_atomic(marker, json.dumps(owner, indent=1))


# --- one-line errors and progress lines
def one_line(error):
    """The message of an error as one line: a DataLoader worker's error arrives with the worker's
    whole traceback in its message (its last line is the error); an OSError is path: reason."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    text = str(error).strip()
    line = text.splitlines()[-1] if text else type(error).__name__
    return line.split(": ", 1)[1] if line.startswith(("ValueError: ", "FileNotFoundError: ")) else line


def report_errors(function, *args, **kwargs):
    """Run `function(*args, **kwargs)` as a command: returns the exit code, 0, or 2 after one
    line `error: ...` on stderr, never a traceback, for bad input (ValueError,
    FileNotFoundError), a full or read-only disk (OSError) and too little memory.

        sys.exit(evaluation.report_errors(main, args))
    """
    try:
        function(*args, **kwargs)
        return 0
    except (MemoryError, torch.OutOfMemoryError):  # CUDA's is a RuntimeError: caught first
        message = ("out of memory: try a smaller --batch-size (train.py: with --accumulate K to keep "
                   "the effective batch)")
    except (ValueError, OSError) as e:
        message = one_line(e)
    print(f"error: {message}", file=sys.stderr)
    return 2


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    sys.exit(report_errors(main, get_args_parser().parse_args()))
