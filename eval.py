"""Evaluation: mIoU, FPS, GFLOPs, prediction PNGs and teacher pseudo labels.

    # mIoU + per-class IoU table of a checkpoint on a split
    python eval.py --checkpoint runs/teacher/checkpoint.pt --data-root data/synthetic --split test
    # the same, plus FPS at 512x512 (protocol of DATASETS.md) and coloured prediction PNGs
    python eval.py --checkpoint runs/student/checkpoint.pt --data-root data/synthetic --split val \
        --fps --fps-size 512 512 --save-pred runs/student/pred
    # offline pseudo labels (Zhu et al. 2020) for any image folder, with flip + multi-scale TTA
    python eval.py --checkpoint runs/teacher/checkpoint.pt --dataset folder \
        --data-root data/synthetic/images/unlabeled --save-pred runs/pseudo --threshold 0.5 \
        --flip --scales 0.75 1 1.25
    # FPS only, of an untrained architecture (no checkpoint, no data)
    python eval.py --model deeplabv2_mobilenetv2 --num-classes 19 --fps --fps-size 512 512

mIoU comes from one confusion matrix (one `bincount`) accumulated over the whole split at the
label's own resolution (logits are upsampled, labels never downsampled). Classes that never
occur (neither in the labels nor in the predictions) are left out of the mean instead of
turning it into NaN.

`--save-pred DIR` writes, per image, `DIR/<name>.png` (palette PNG of class ids, 255 where the
confidence is below `--threshold`), `DIR/confidence/<name>.png` (max softmax probability x 255)
and `DIR/color/<name>.png` (a coloured picture). The same files are the pseudo labels that
`train.py --pseudo-labels DIR` reads. Every file is written atomically and a rerun skips the
images already done, so an interrupted labelling run resumes without redoing or corrupting.
"""
import argparse
import json
import os
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
    lines.append(f"{'mIoU':<{width}}  {100 * metrics['miou']:5.1f}")
    lines.append(f"{'pixel acc':<{width}}  {100 * metrics['acc']:5.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers
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


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def load_checkpoint(path, device="cpu", expect_model=None, expect_classes=None):
    """Rebuild the model saved by train.py; clear errors for a wrong file, model or class count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        args = ckpt["args"]
        name, num_classes = args["model"], args["num_classes"]
    except Exception:  # not a train.py checkpoint: a published file, or nothing kd-seg knows
        # Issue 16 hook: torchvision / mmsegmentation / CIRKD files are recognised from their keys
        # and shapes and loaded safely (weights_only=True) and strictly; anything else gets one
        # ValueError line from models.load_published.
        model = models.load_published(path, name=expect_model)
        if expect_classes and expect_classes != model.num_classes:
            raise ValueError(f"{path}: checkpoint has {model.num_classes} classes, the dataset has "
                             f"{expect_classes}") from None
        return model.to(device).eval(), None
    if expect_model and expect_model != name:
        raise ValueError(f"{path}: checkpoint holds model {name}, expected {expect_model}")
    if expect_classes and expect_classes != num_classes:
        raise ValueError(f"{path}: checkpoint has {num_classes} classes, the dataset has "
                         f"{expect_classes}")
    model = models.build_model(name, num_classes, output_stride=args.get("output_stride", 8),
                               aux=args.get("aux_weight", 0) > 0)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # torch's message lists every tensor: keep its first detail line
        detail = (str(e).splitlines() + [""])[1].strip()
        raise ValueError(f"{path}: weights do not fit {name} ({detail})") from None
    return model.to(device).eval(), ckpt


def logits_full(model, x, window=None):
    """Logits of `x` upsampled to its own resolution. With `window` (h, w) smaller than the
    image: windows at a stride of 2/3 of their size (the last one flush with the border), logits
    averaged where they overlap, as full-resolution Cityscapes evaluation does."""
    if window is None or (x.shape[-2] <= window[0] and x.shape[-1] <= window[1]):
        return F.interpolate(model(x)["out"].float(), size=x.shape[-2:], mode="bilinear",
                             align_corners=getattr(model, "align_corners", False))  # CIRKD's: True
    (height, width), (wh, ww) = x.shape[-2:], (min(window[0], x.shape[-2]), min(window[1], x.shape[-1]))
    total = count = 0
    for top in sorted({*range(0, height - wh, wh * 2 // 3), height - wh}):
        for left in sorted({*range(0, width - ww, ww * 2 // 3), width - ww}):
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


def evaluate(model, loader, device, num_classes, amp="off", scales=(1.0,), flip=False, window=None):
    """mIoU etc. of `model` over `loader` (batches of full-resolution (image, label))."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    autocast, _ = autocast_context(device, amp)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast:
            probs = predict(model, images, labels.shape[-2:], scales, flip, window)
        confusion.update(probs.argmax(1), labels)
    confusion.all_reduce()
    return confusion.compute()


# ----------------------------------------------------------------------------- speed & size
@torch.inference_mode()
def measure_fps(model, size, device, amp="off", warmup=10, iters=200, min_seconds=5.0,
                include_upsample=True):
    """FPS protocol of DATASETS.md: batch 1, eval mode, input already on the device, >= 10
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


def count_gflops(model, size):
    """Forward GFLOPs of one image at `size` (torch.utils.flop_counter; 1 multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    param = next(model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype))
    return counter.get_total_flops() / 1e9


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- PNG outputs
def claim_output_dir(out_dir, owner):
    """A run never overwrites results it did not produce: `out_dir` must be new, empty, or
    carry our marker with the same `owner` dict (then we resume)."""
    out_dir = Path(out_dir)
    marker = out_dir / "kd_seg_run.json"
    if out_dir.exists() and any(out_dir.iterdir()):
        if not marker.exists():
            raise ValueError(f"{out_dir}: folder holds files kd-seg did not write; "
                             "choose a new output folder")
        if json.loads(marker.read_text()) != owner:
            raise ValueError(f"{out_dir}: folder holds results of another run ({marker}); "
                             "choose a new output folder")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(owner, indent=1))
    os.replace(tmp, marker)


def save_predictions(model, dataset, out_dir, device, amp="off", threshold=0.0, scales=(1.0,),
                     flip=False, owner=None, log_every=50):
    """Write palette, confidence and colour PNGs for every image of `dataset` (see module doc).
    Resumable: images whose label PNG exists are skipped (files appear atomically, label last)."""
    out_dir = Path(out_dir)
    claim_output_dir(out_dir, owner or {})
    names = output_names(dataset)
    todo = [i for i, name in enumerate(names) if not (out_dir / f"{name}.png").exists()]
    print(f"predictions: {len(names) - len(todo)} of {len(names)} already done, writing {len(todo)}"
          f" to {out_dir}")
    autocast, _ = autocast_context(device, amp)
    model.eval()
    start = time.perf_counter()
    for count, i in enumerate(todo, 1):
        image, _ = dataset[i]
        with autocast:
            probs = predict(model, image[None].to(device), image.shape[-2:], scales, flip)[0]
        confidence, label = probs.max(0)
        label[confidence < threshold] = 255
        name = names[i]
        for sub in ("confidence", "color"):
            (out_dir / sub / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        label = label.cpu().numpy().astype(np.uint8)
        datasets.save_confidence_png(out_dir / "confidence" / f"{name}.png",
                                     confidence.cpu().numpy())
        save_image_atomic(datasets.colorize(label, dataset.palette), out_dir / "color" / f"{name}.png")
        datasets.save_label_png(out_dir / f"{name}.png", label, dataset.palette)  # last: "done"
        if count % log_every == 0 or count == len(todo):
            elapsed = time.perf_counter() - start
            print(f"predict {count}/{len(todo)} | {elapsed / count:.3f} s/img | "
                  f"eta {format_eta(elapsed / count * (len(todo) - count))}", flush=True)


def output_names(dataset):
    """Output name of each image: its path relative to the dataset's image root, no suffix."""
    paths = [Path(p) for p in dataset.image_paths]
    root = Path(os.path.commonpath([p.parent for p in paths])) if len(paths) > 1 else paths[0].parent
    return [str(p.relative_to(root).with_suffix("")) for p in paths]


def save_image_atomic(image, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- diagnostics
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
    save_image_atomic(image, path)


# ----------------------------------------------------------------------------- CLI
def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a kd-seg checkpoint: mIoU, FPS, PNGs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint written by train.py")
    p.add_argument("--model", help="model name (default: the checkpoint's; FPS-only without one)")
    p.add_argument("--num-classes", type=int, help="class count for --model without checkpoint")
    p.add_argument("--dataset", default="synthetic", help="dataset name (see datasets.py)")
    p.add_argument("--data-root", help="dataset root folder")
    p.add_argument("--split", default="val", help="split to evaluate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["off", "auto", "bf16", "fp16"],
                   help="autocast dtype on CUDA (auto: bf16 where supported, else fp16)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale inference")
    p.add_argument("--flip", action="store_true", help="add horizontally flipped inference")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"),
                   help="sliding-window inference with this window (1/3 overlap), e.g. 1024 1024 "
                        "for full-resolution Cityscapes")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save-pred", metavar="DIR", help="write palette/confidence/colour PNGs")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="with --save-pred: pixels below this confidence become 255 (ignore)")
    p.add_argument("--fps", action="store_true", help="measure FPS (DATASETS.md protocol)")
    p.add_argument("--fps-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--fps-iters", type=int, default=200, help="timed iterations (protocol: 200)")
    p.add_argument("--fps-seconds", type=float, default=5.0, help="or at least this long")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def check_args(args):
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.checkpoint is None and args.model is None:
        raise ValueError("give --checkpoint (or --model with --num-classes for FPS only)")
    if args.checkpoint is None and (args.num_classes is None or args.num_classes < 1):
        raise ValueError("--model without --checkpoint needs a positive --num-classes")
    if (args.save_pred or not args.fps) and args.data_root is None and args.checkpoint:
        raise ValueError("--data-root is required to evaluate or save predictions")


def main(args):
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    dataset = None
    if args.data_root and args.dataset != "folder":
        dataset = datasets.build_dataset(args.dataset, args.data_root, args.split)
    if args.checkpoint:
        model, ckpt = load_checkpoint(args.checkpoint, args.device, args.model,
                                      dataset.num_classes if dataset else None)
    else:
        model, ckpt = models.build_model(args.model, args.num_classes).to(args.device).eval(), None
    if args.data_root and args.dataset == "folder":
        # any image folder (pseudo labels): class names and palette of the checkpoint's dataset
        dataset = datasets.build_dataset("folder", args.data_root, args.split,
                                         classes_from=ckpt["args"]["dataset"] if ckpt else None)
        if ckpt and dataset.num_classes != model.num_classes:
            raise ValueError(f"{args.checkpoint}: checkpoint has {model.num_classes} classes, its "
                             f"dataset {ckpt['args']['dataset']} has {dataset.num_classes}")
    if dataset is not None and args.save_pred:
        owner = {"checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                 "threshold": args.threshold, "scales": args.scales, "flip": args.flip,
                 "images": str(Path(args.data_root).resolve()), "split": args.split}
        save_predictions(model, dataset, args.save_pred, args.device, args.amp, args.threshold,
                         args.scales, args.flip, owner)
    if dataset is not None and args.dataset != "folder":
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                             num_workers=args.workers)
        metrics = evaluate(model, loader, args.device, dataset.num_classes, args.amp,
                           args.scales, args.flip, args.window)
        print(format_table(metrics, dataset.class_names))
        results["metrics"] = metrics
    if args.fps:
        size = tuple(args.fps_size)
        results["params_m"] = count_params(model) / 1e6
        results["gflops"] = count_gflops(model, size)
        results["fps"] = measure_fps(model, size, args.device, args.amp if args.device != "cpu"
                                     else "off", iters=args.fps_iters, min_seconds=args.fps_seconds)
        f = results["fps"]
        print(f"params {results['params_m']:.2f} M | {results['gflops']:.2f} GFLOPs at "
              f"{size[0]}x{size[1]} | {f['fps']:.1f} FPS ({f['latency_ms']:.2f} ms, {f['iters']} "
              f"iters) | {f['device']} | {f['dtype']} | torch {f['torch']} | upsample+argmax "
              f"included")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.json)
    return results


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
