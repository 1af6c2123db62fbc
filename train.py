"""Training: supervised, distilled (any mix of the five papers' terms) and semi-supervised.

    # a teacher, then a student alone, on the synthetic benchmark (CPU, minutes)
    python train.py --model deeplabv3plus_resnet18_tiny --out runs/teacher
    python train.py --model deeplabv3plus_mobilenetv2_tiny --out runs/student
    # the same student distilled: weights by term name (the names of losses.TERMS)
    python train.py --model deeplabv3plus_mobilenetv2_tiny --out runs/kd \
        --teacher-checkpoint runs/teacher/checkpoint.pt --kd pixel=1,consistency=1
    # Xie et al.: plus unlabeled images labelled online by the teacher
    python train.py ... --kd pixel=1,consistency=1,unlabeled=1 --unlabeled-root data/synthetic/images/unlabeled
    # Zhu et al.: real + offline pseudo labels (eval.py --save-pred), class-uniform sampling
    python train.py ... --unlabeled-root data/synthetic/images/unlabeled --pseudo-labels runs/pseudo \
        --centroid-sampling 0.5
    # your own data: DATA/images/ and DATA/labels/ (docs/DATASETS.md, `folder`)
    python train.py --dataset folder --data-root DATA --class-names DATA/classes.txt --out runs/mine
    # resume an interrupted run exactly where it stopped
    python train.py --out runs/student --resume
    # several GPUs: torchrun --standalone --nproc_per_node=4 train.py ...

The schedule is counted in iterations (SGD, poly learning rate stepped every iteration). On
CUDA it trains under AMP (bf16 where supported, else fp16 with a GradScaler). Every
`--eval-every` iterations it validates and appends a line to `<out>/metrics.jsonl`; the
checkpoint (`<out>/checkpoint.pt`: model, optimizer, scheduler, scaler, step, RNG states and
args as one plain dict of tensors, numbers and strings, loaded with weights_only=True) is written
atomically, so an interrupted run resumes exactly: the data order and every augmentation are a
function of (seed, step), not of the process. While a run writes `<out>`, `<out>.lock` beside it
holds its pid; a second writer is refused. A run whose losses keep turning non-finite stops
unfinished (exit 2) rather than saving garbage as a result.

What is in this file, top to bottom: the command line; `train` and `run` (build the data, the
networks and the optimisers, resume, then loop: one `train_step` per iteration, then the guards,
a log line, validation and a checkpoint when due); the training step; the guards (the first
batch's teacher check, non-finite steps, divergence); logs, validation and checkpoints; the
builders; torchrun; then, in a section of their own, the operational helpers (the output
folder, --resume's arguments and state, the clean-up after a failed run).
"""
import argparse
import json
import os
import random
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import datasets
import eval as evaluation
import losses
import models


def get_args_parser():
    p = argparse.ArgumentParser(description="Train a segmentation model, optionally distilled.",
                                formatter_class=evaluation.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic",
                   help=f"one of {', '.join(sorted(datasets.DATASETS))}, or folder: your own images and "
                        "labels (layouts: docs/DATASETS.md)")
    g.add_argument("--data-root", default="data/synthetic",
                   help="dataset root folder (kd_seg.py makes data/synthetic)")
    g.add_argument("--num-classes", type=int,
                   help="--dataset folder (your own data): label ids 0..N-1 are the classes; the "
                        "named datasets know their own count")
    g.add_argument("--class-names", metavar="FILE",
                   help="--dataset folder: one class a line in id order, its name, optionally its "
                        "colour #rrggbb (or a .json list of such lines); default: names 0..N-1")
    g.add_argument("--ignore-index", type=int, default=255,
                   help="--dataset folder: the label id of pixels to neither train nor score on")
    g.add_argument("--train-split", default="train", help="split to train on")
    g.add_argument("--train-subset", metavar="FILE",
                   help="train on the listed images of the split only: a label partition (MGD's "
                        "1/16; CPS's train_aug_labeled_1-16.txt or the one kd_seg.py writes)")
    g.add_argument("--val-split", default="val",
                   help="split for periodic validation ('': none, e.g. when the test split is "
                        "evaluated afterwards by eval.py, as kd_seg.py does)")
    g.add_argument("--crop-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                   help="training crop (the synthetic images are 64x64)")
    g.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
                   help="random rescaling before the crop")
    g.add_argument("--workers", type=int, default=0,
                   help="data loader processes (0: load in the main process, best for tiny images)")
    g.add_argument("--keep-decoded", action="store_true",
                   help="hold each training image and label in memory once decoded (in every loader "
                        "process): for data that fits, e.g. CamVid, 60 MB at 180x240; not Cityscapes")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default="deeplabv3plus_mobilenetv2_tiny",
                   help=f"{models.MODEL_NAMES_HELP} (the demo's student)")
    g.add_argument("--output-stride", type=int, default=8, choices=[8, 16, 32],
                   help="input size / feature size of the backbone (8: DeepLab's and the papers')")
    g.add_argument("--pretrained", help="ImageNet backbone checkpoint (file or URL): torchvision's; mmcv's "
                   "resnet*_v1c for *_v1c models; CIRKD's resnet*-imagenet.pth for *_v1s models")
    g.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the auxiliary head's CE (PSPNet uses 0.4); 0: no aux head")
    g.add_argument("--ohem", type=float, default=0.0,
                   help="OHEM CE threshold for the task loss (MGD's Cityscapes code: 0.7); 0: plain CE")
    g.add_argument("--iters", type=int, default=600, help="training iterations (the demo's student's)")
    g.add_argument("--batch-size", type=int, default=16, help="images per step, per process")
    g.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="gradient accumulation: K batches per optimiser step (effective batch: "
                        "batch-size x processes x K), for papers' batches that do not fit memory")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                   help="SGD with momentum (the DeepLab / PSPNet papers); Adam (ESPNet's own training, "
                        "and small networks from scratch)")
    g.add_argument("--lr", type=float, default=0.05, help="base learning rate (the demo's, with SGD)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Adam: its default betas)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (DeepLab's)")
    g.add_argument("--poly-power", type=float, default=0.9, help="lr = base * (1 - it/iters)^power")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and augmentation")
    g = p.add_argument_group("device")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (the default: cuda where there is one)")
    g.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's, "
                   "one per core); 1 when several jobs share the cores (README)")
    g.add_argument("--amp", default="auto", choices=["off", "auto", "bf16", "fp16"],
                   help="autocast on CUDA (auto: bf16 where supported, else fp16 + GradScaler)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPU)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    g = p.add_argument_group("distillation (see losses.py and docs/METHODS.md)")
    g.add_argument("--teacher-checkpoint", help="frozen teacher: a train.py checkpoint, or a published "
                   "torchvision / mmsegmentation / CIRKD file (docs/PUBLISHED.md)")
    g.add_argument("--wide-teacher-checkpoint", help="MGD's second, wide teacher")
    g.add_argument("--kd", default="", help=f"TERM=WEIGHT,... with TERM one of {', '.join(losses.TERMS)} "
                   "(docs/METHODS.md); default: none, the student alone")
    g.add_argument("--tau", type=float, default=1.0, help="temperature of pixel_kd (Xie/SKD: 1)")
    g.add_argument("--cwd-tau", type=float, default=4.0, help="temperature of cwd (Shu et al.: 4)")
    g.add_argument("--pairwise-scale", type=float, default=0.5,
                   help="SKD pair-wise pooling kernel as a fraction of the width (official: 0.5)")
    g.add_argument("--pairwise-kernel", type=int, help="fixed pooling kernel instead (CIRKD: 2)")
    g.add_argument("--imitation-mask", default="anchor", choices=["anchor", "dilated"],
                   help="FGFI mask: anchor-IoU rule (official) or dilated thing-class mask")
    g.add_argument("--imitation-warmup", type=int, default=400,
                   help="FGFI: imitation off for the first N iterations (official: 400)")
    g.add_argument("--discriminator", default="conditional", choices=["conditional", "logits"],
                   help="SKD holistic D input: image + softmax (CVPR paper) or logits (official code)")
    g.add_argument("--d-lr", type=float, default=4e-4, help="SKD discriminator SGD lr (official)")
    g.add_argument("--d-width", type=int, default=64,
                   help="SKD discriminator width: channels width..8*width (official 64)")
    g.add_argument("--lambda-gp", type=float, default=10.0, help="WGAN-GP penalty weight (official)")
    g = p.add_argument_group("unlabeled data")
    g.add_argument("--unlabeled-root", help="folder of unlabeled images")
    g.add_argument("--unlabeled-subset", metavar="FILE",
                   help="use only the listed images of --unlabeled-root (the partition's rest)")
    g.add_argument("--unlabeled-batch-size", type=int, help="default: --batch-size")
    g.add_argument("--pseudo-labels", help="folder of offline pseudo labels for --unlabeled-root "
                                           "(eval.py --save-pred); trained on together with the labels")
    g.add_argument("--centroid-sampling", type=float, default=0.0, metavar="PCT",
                   help="Zhu et al.: fraction of samples drawn uniformly over classes (0: off)")
    g.add_argument("--coarse2fine", type=float, default=0.0, metavar="FRACTION",
                   help="Zhu et al. fast schedule: first FRACTION of iterations at --small-crop")
    g.add_argument("--small-crop", type=int, nargs=2, default=[32, 32], metavar=("H", "W"),
                   help="the crop of --coarse2fine's first iterations (half the synthetic images)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out", default="runs/train", help="output folder")
    g.add_argument("--resume", action="store_true", help="continue <out>/checkpoint.pt")
    g.add_argument("--log-every", type=int, default=50, help="iterations per progress line")
    g.add_argument("--eval-every", type=int, default=0, help="iterations per validation (0: only at the end)")
    g.add_argument("--checkpoint-every", type=int, default=200,
                   help="iterations per checkpoint (an interruption loses at most these)")
    g.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)  # tests: simulate an interruption
    return p


def parse_kd(spec):
    """'pixel=1,consistency=0.5' -> {'pixel': 1.0, 'consistency': 0.5}."""
    weights = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--kd: expected term=weight, got '{item}'") from None
        if name in weights:
            raise ValueError(f"--kd: term '{name}' is given twice")
        evaluation.check_number(f"--kd {name}", weight)  # NaN/inf would skip every step
        weights[name] = weight
    unknown = set(weights) - set(losses.TERMS)
    if unknown:
        raise ValueError(f"--kd: unknown term(s) {sorted(unknown)}; known: {', '.join(losses.TERMS)}")
    return weights


def check_args(args):
    """Every option checked before any work: one line naming the first bad one."""
    check = evaluation.check_number
    for name in ("iters", "batch_size", "accumulate", "log_every", "checkpoint_every", "d_width",
                 "unlabeled_batch_size", "pairwise_kernel", "threads"):
        if getattr(args, name) is not None:
            check(f"--{name.replace('_', '-')}", getattr(args, name), low_open=True)
    for name in ("crop_size", "small_crop"):
        for size in getattr(args, name):
            check(f"--{name.replace('_', '-')}", size, low_open=True)
    for name in ("workers", "eval_every", "imitation_warmup"):
        check(f"--{name.replace('_', '-')}", getattr(args, name))
    check("--seed", args.seed, 0, 2 ** 32 - 1)  # numpy's seed range
    check("--ignore-index", args.ignore_index, 0, 255)  # a label PNG holds 8-bit ids
    for name in ("lr", "d_lr", "tau", "cwd_tau"):
        check(f"--{name.replace('_', '-')}", getattr(args, name), low_open=True)
    for name in ("weight_decay", "poly_power", "aux_weight", "lambda_gp"):
        check(f"--{name.replace('_', '-')}", getattr(args, name))
    check("--momentum", args.momentum, 0, 1)
    check("--ohem", args.ohem, 0, 1)
    check("--pairwise-scale", args.pairwise_scale, 0, 1, low_open=True)
    check("--centroid-sampling", args.centroid_sampling, 0, 1)
    check("--coarse2fine", args.coarse2fine, 0, 1, high_open=True)
    for scale in args.scale_range:
        check("--scale-range", scale, low_open=True)
    if args.scale_range[0] > args.scale_range[1]:
        raise ValueError(f"--scale-range: MIN {args.scale_range[0]} is above MAX {args.scale_range[1]}")
    evaluation.check_device(args.device)
    if args.sync_bn and not args.device.startswith("cuda"):
        raise ValueError("--sync-bn needs --device cuda (torch's SyncBatchNorm has no CPU kernel)")
    if args.model not in models.MODEL_NAMES:
        raise ValueError(f"--model: unknown model '{args.model}'; expected {models.MODEL_NAMES_HELP}")
    weights = parse_kd(args.kd)
    if weights and not args.teacher_checkpoint:
        raise ValueError("--kd needs --teacher-checkpoint")
    # a teacher no term uses would be loaded and run every step for nothing, and the run would
    # look distilled
    if args.teacher_checkpoint and not weights:
        raise ValueError(f"--teacher-checkpoint is used only by --kd terms, and none is given: add "
                         f"--kd TERM=WEIGHT (terms: {', '.join(losses.TERMS)}), or leave the teacher out")
    mgd_terms = sorted({"mgd_pixel", "mgd_image", "mgd_region"} & set(weights))
    if args.wide_teacher_checkpoint and not mgd_terms:
        raise ValueError("--wide-teacher-checkpoint is used only by MGD's terms: add --kd "
                         "mgd_pixel=1,mgd_image=0.001,mgd_region=100 (MGD's weights), or leave it out")
    needs_unlabeled = {"unlabeled", "mgd_image", "mgd_region"} & set(weights)
    if needs_unlabeled and not args.unlabeled_root:
        raise ValueError(f"--kd {sorted(needs_unlabeled)[0]} needs --unlabeled-root")
    if {"mgd_image", "mgd_region"} & set(weights) and not args.wide_teacher_checkpoint:
        raise ValueError("MGD terms need --wide-teacher-checkpoint (T_W) besides --teacher-checkpoint (T_D)")
    if args.pseudo_labels and not args.unlabeled_root:
        raise ValueError("--pseudo-labels needs --unlabeled-root (the images they label)")
    return weights


# ----------------------------------------------------------------------------- the run
def train(args, given=None):
    """Train per `args`; returns the final validation metrics (see eval.ConfusionMatrix).
    `given`: the options named on the command line (given_options), for --resume."""
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes
    with evaluation.lock_output_dir(args.out) if rank0 else nullcontext():
        resume_from = prepare_out_dir(args)
        if resume_from is not None:
            args = resumed_args(args, given)
        weights = check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        rank, world = setup_distributed(args)
        created = not Path(args.out).exists()
        try:
            metrics = run(args, weights, rank, world, resume_from)
        except BaseException:
            if rank == 0 and resume_from is None:
                remove_unfinished_run(Path(args.out), created)
            raise
    if world > 1:  # shut down together: exiting with the group alive lets gloo abort (SIGABRT)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def run(args, weights, rank, world, resume_from):
    """The training proper (see `train`): build, then one `train_step` per iteration with its
    guards, logging, validation and checkpoints."""
    device = torch.device(args.device)
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        datasets.write_atomic(Path(args.out) / "args.json", json.dumps(vars(args), indent=1))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # build: data, networks, optimisers, AMP; then resume (the order of the random draws that
    # initialise the networks is part of a run's identity)
    train_set, val_set = build_data(args)
    args.num_classes = (train_set if val_set is None else val_set).num_classes
    # the names and colours of the classes, for eval.py to take from the checkpoint (your own
    # data's come from --class-names, a file that may be gone by then)
    args.classes, args.palette = train_set.class_names, [list(colour) for colour in train_set.palette]
    student = build_student(args, device)
    distiller = build_distiller(args, weights, student, train_set.thing_classes, device)
    model = student
    if world > 1:
        if args.sync_bn:
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        model = torch.nn.parallel.DistributedDataParallel(student)  # the teacher is never wrapped
    optimizer, scheduler, d_optimizer, d_scheduler = build_optimizers(args, student, distiller)
    autocast, amp_dtype = evaluation.autocast_context(device, args.amp)
    if device.type == "cuda":  # fixed crop sizes: let cuDNN time its algorithms once and keep the fastest
        torch.backends.cudnn.benchmark = True
    # a GradScaler only for fp16: bf16 has float32's range and needs no loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # everything a checkpoint saves and a resume restores, by its name in the checkpoint
    state = {"model": student, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
             "distiller": distiller, "d_optimizer": d_optimizer, "d_scheduler": d_scheduler}
    start_step, skipped = (0, 0) if resume_from is None else resume(resume_from, state, args, rank)
    small_crop_until = int(args.coarse2fine * args.iters)  # Zhu et al.'s coarse-to-fine switch
    batches = labeled_batches(args, train_set, start_step, small_crop_until, rank, world)
    unlabeled_batches = build_unlabeled_batches(args, distiller, start_step, rank, world)
    val_loader = None if val_set is None else torch.utils.data.DataLoader(val_set, batch_size=8,
                                                                        num_workers=args.workers)
    if world > 1:  # decorrelate dropout across ranks (augmentation has per-sample seeds)
        torch.manual_seed(args.seed + 1_000_003 * rank + start_step)

    # the loop: each iteration one training step, then the guards, a log line, validation and a
    # checkpoint when they are due
    metrics, sums, logged, in_a_row, done = {}, {}, 0, 0, start_step
    start_time, step_time = time.perf_counter(), time.perf_counter()
    model.train()
    for step in range(start_step, args.iters):
        if step == small_crop_until and 0 < step:  # coarse-to-fine: the full crop from here on
            batches = labeled_batches(args, train_set, step, small_crop_until, rank, world)
        finite = train_step(step, model, distiller, state, batches, unlabeled_batches, autocast, args,
                            sums, check_teachers=step == start_step)
        done, logged = step + 1, logged + 1
        skipped, in_a_row = (skipped, 0) if finite else (skipped + 1, in_a_row + 1)
        check_divergence(skipped, in_a_row, done, args.iters)
        if rank == 0 and (done % args.log_every == 0 or done == args.iters):
            log_progress(done, sums, logged, step_time, scheduler.get_last_lr()[0], args, world,
                         distiller.weight if distiller else None)
            sums, logged, step_time = {}, 0, time.perf_counter()
        last = done == args.iters
        if val_loader is not None and args.eval_every and done % args.eval_every == 0 and not last:
            metrics = validate(student, model, val_loader, done, args, rank)
        if done % args.checkpoint_every == 0 or last or done == args.stop_at:
            checkpoint(state, done, skipped, args, rank)
        if done == args.stop_at:  # tests: an interruption right after a checkpoint
            break
    if done == args.iters and val_loader is not None:  # after the final checkpoint: a failed
        metrics = validate(student, model, val_loader, done, args, rank)  # evaluation never costs the training
    if rank == 0:
        print(f"done in {evaluation.format_eta(time.perf_counter() - start_time)}"
              + (f" ({skipped} non-finite steps skipped)" if skipped else ""))
    return metrics


# ----------------------------------------------------------------------------- one training step
def train_step(step, model, distiller, state, batches, unlabeled_batches, autocast, args, sums,
               check_teachers=False):
    """One iteration: the student's optimiser step over --accumulate batches (gradient
    accumulation; DDP averages over processes), skipped when a loss is not finite; the learning
    rate's step; then SKD's discriminator step. Adds each term, as its mean over the accumulated
    batches, to `sums` (the logging window's, left on the device: .item() is a GPU sync).
    `check_teachers`: run the first-batch teacher check. Returns whether the step was finite."""
    device = torch.device(args.device)
    state["optimizer"].zero_grad(set_to_none=True)
    finite = True
    for accumulated in range(args.accumulate):
        images, labels = next_batch(batches, device, args.channels_last)
        if check_teachers and accumulated == 0:
            check_teacher_outputs(distiller, args, images, autocast)
        with autocast:
            output = model(images)
        terms = {"ce": task_loss(output, labels, args, scored_corners(model))}
        if distiller is not None:
            unlabeled, mix_mask = next_unlabeled(unlabeled_batches, distiller, device, args.channels_last)
            with autocast:  # the teachers see every batch of the step in one forward each
                teacher_outputs = distiller.teacher_outputs(
                    *distiller.teacher_batches(images, unlabeled, mix_mask))
            terms.update(distiller.terms(model, output, images, labels, step, unlabeled, mix_mask,
                                         autocast, teacher_outputs))
        loss = distiller.weighted_sum(terms) if distiller else terms["ce"]
        finite = finite and bool(torch.isfinite(loss))
        if finite:
            state["scaler"].scale(loss / args.accumulate).backward()
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + value.detach() / args.accumulate
    step_if_finite(finite, loss, step, state["optimizer"], state["scaler"])
    state["scheduler"].step()
    if state["d_optimizer"] is not None:  # SKD order: the student's step first, then D's
        teacher_logits = teacher_outputs[0][0]["out"]   # the teacher's, on the last labeled batch
        finite = discriminator_step(distiller, state["d_optimizer"], state["d_scheduler"], images,
                                    output["out"], teacher_logits, sums) and finite
    return finite


def next_batch(batches, device, channels_last):
    images, labels = (t.to(device, non_blocking=True) for t in next(batches))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def next_unlabeled(unlabeled_batches, distiller, device, channels_last):
    """The step's unlabeled images (None when the run has none) and, for MGD, the CutMix boxes
    (N/2, 1, H, W) that mix their two halves (else None)."""
    if unlabeled_batches is None:
        return None, None
    unlabeled = next(unlabeled_batches)[0].to(device, non_blocking=True)
    if channels_last:
        unlabeled = unlabeled.contiguous(memory_format=torch.channels_last)
    mix_mask = None
    if distiller.mixes_unlabeled:
        mix_mask = datasets.cutmix_box_masks(len(unlabeled) // 2, *unlabeled.shape[-2:])
        mix_mask = mix_mask[:, None].to(device)
    return unlabeled, mix_mask


def task_loss(output, labels, args, align_corners=False):
    """CE (or OHEM CE) with ignore 255 on logits upsampled to the label, plus the aux head's.
    `align_corners`: the model's own upsampling convention (`scored_corners`), so that a student
    trains on the geometry eval.py scores it in (ESPNet: True, as SKD's eval_esp.py)."""
    def ce(logits):
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=align_corners)
        if args.ohem > 0:
            return losses.ohem_ce(logits, labels, thresh=args.ohem)
        return F.cross_entropy(logits, labels, ignore_index=255)
    loss = ce(output["out"])
    if "aux" in output:
        loss = loss + args.aux_weight * ce(output["aux"])
    return loss


def scored_corners(model):
    """The align_corners with which eval.logits_full upsamples `model`'s logits (DDP unwrapped)."""
    return getattr(getattr(model, "module", model), "align_corners", False)


def discriminator_step(distiller, d_optimizer, d_scheduler, images, student_logits, teacher_logits, sums):
    """SKD's D step on the last batch's detached maps (losses.Distiller.discriminator_loss),
    skipped when its loss is not finite; returns whether it was."""
    d_loss = distiller.discriminator_loss(images, student_logits.detach(), teacher_logits)
    d_optimizer.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(d_loss))
    if finite:
        d_loss.backward()
        d_optimizer.step()
    d_scheduler.step()
    sums["d"] = sums.get("d", 0.0) + d_loss.detach()
    return finite


# ----------------------------------------------------------------------------- guards
def check_teacher_outputs(distiller, args, images, autocast):
    """The first-batch check: stop, naming the file, when a teacher's outputs are not finite.
    NaN/inf weights would make every distillation step non-finite, and every step skipped."""
    if distiller is None:
        return
    for teacher, source in zip(distiller.teachers, [args.teacher_checkpoint, args.wide_teacher_checkpoint]):
        evaluation.check_finite_outputs(teacher, images, source, autocast)


def step_if_finite(finite, loss, step, optimizer, scaler):
    """The optimiser's step, or, when a loss of the step was not finite, no step and a line
    saying so: one bad batch never poisons the weights (check_divergence stops a run where this
    is more than an occasional event)."""
    if finite:
        scaler.step(optimizer)
        scaler.update()
    else:
        print(f"iter {step + 1}: non-finite loss {loss.item()}, step skipped", flush=True)


# a run stops, unfinished, when its non-finite steps are more than an occasional event
MAX_NONFINITE_IN_A_ROW, MAX_NONFINITE_FRACTION, MIN_STEPS_FOR_FRACTION = 20, 0.05, 50


def check_divergence(skipped, in_a_row, done, iters):
    """Raise when 20 steps in a row, or more than 5% of the steps (judged from step 50 on, and at
    the last step of a shorter run), had a non-finite loss: the run never reports or saves
    garbage as finished (its last checkpoint stays at an earlier step)."""
    too_many = skipped > MAX_NONFINITE_FRACTION * done and (done >= MIN_STEPS_FOR_FRACTION or done == iters)
    if in_a_row >= MAX_NONFINITE_IN_A_ROW or too_many:
        raise ValueError(f"stopped at iteration {done}: {skipped} of {done} steps had a non-finite loss "
                         f"({in_a_row} in a row); lower --lr, or check the --kd weights and the teacher")


# ----------------------------------------------------------------------------- logs, validation, checkpoints
def log_progress(done, sums, logged, window_start, lr, args, world, weight=None):
    """The progress line of the last `logged` iterations (`sums`: their terms, summed), printed
    and appended to <out>/log.jsonl (the terms unweighted). The printed terms are weighted
    (`weight`: losses.Distiller.weight), so they add up to the loss, with 3 significant digits,
    so that a term at weight 0.001 still shows; "D" is SKD's discriminator loss, its own step's."""
    device = torch.device(args.device)
    per_it = (time.perf_counter() - window_start) / logged
    mean = {k: float(v) / logged for k, v in sums.items()}
    # throughput with the peak GPU memory so far: what a recipe needs to fit a GPU
    peak_gb = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    images_per_s = args.batch_size * args.accumulate * world / per_it
    with open(Path(args.out) / "log.jsonl", "a") as f:
        f.write(json.dumps({"iter": done, **mean, "lr": lr, "s_per_it": per_it, "images_per_s": images_per_s,
                            **({} if peak_gb is None else {"peak_gpu_gb": peak_gb})}) + "\n")
    weight = weight or (lambda name: 1.0)  # no distiller: the task loss alone
    terms = " + ".join(f"{k} {weight(k) * v:#.3g}" for k, v in mean.items() if k not in ("loss", "d"))
    discriminator = f" | D {mean['d']:#.3g}" if "d" in mean else ""
    peak = f", peak {peak_gb:.1f} GiB" if peak_gb is not None else ""
    print(f"iter {done}/{args.iters} | loss {mean['loss']:#.3g} = {terms}{discriminator} | lr {lr:.2e} | "
          f"{per_it:.3f} s/it, {images_per_s:.1f} img/s{peak} | "
          f"eta {evaluation.format_eta(per_it * (args.iters - done))}", flush=True)


def validate(student, model, val_loader, done, args, rank):
    """mIoU on the validation split, printed and appended to <out>/metrics.jsonl (rank 0)."""
    metrics = evaluation.evaluate(student, val_loader, torch.device(args.device), args.num_classes, args.amp)
    model.train()
    if rank == 0:
        print(f"iter {done}: {args.val_split} mIoU {100 * metrics['miou']:.2f}", flush=True)
        with open(Path(args.out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iter": done, "split": args.val_split, **metrics}) + "\n")
    return metrics


def checkpoint(state, step, skipped, args, rank):
    """<out>/checkpoint.pt (rank 0): every object of `state`, the random generators, the step and
    the args, as one plain dict."""
    if rank != 0:
        return
    save_checkpoint(Path(args.out) / "checkpoint.pt", {
        **{name: None if part is None else part.state_dict() for name, part in state.items()},
        "rng": rng_state(), "step": step, "skipped_steps": skipped, "args": dict(vars(args))})


def save_checkpoint(path, state):
    """Write `state` atomically (datasets.write_atomic): an interruption leaves the previous
    checkpoint intact, and a failed write (a full or read-only disk) leaves no temporary file."""
    try:
        datasets.write_atomic(path, lambda temporary: torch.save(state, temporary))
    except (OSError, RuntimeError) as e:  # a full disk: "unexpected pos 704 vs 598"
        raise OSError(f"{path}: cannot write the checkpoint ({str(e).splitlines()[0]}); "
                      "is the disk full or read-only?") from None


def rng_state():
    """Every random generator's state as tensors, lists and numbers only, so that the checkpoint
    loads with weights_only=True (numpy's state holds an ndarray, python's a tuple)."""
    numpy_state = np.random.get_state(legacy=False)  # a new dict: {"state": {"key", "pos"}, ...}
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "numpy": numpy_state,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    key = state["numpy"]["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**state["numpy"], "state": {**state["numpy"]["state"], "key": key}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- building
def build_data(args):
    """(training set, validation set or None with --val-split ''), checked: what can fail later
    fails now: an empty split (the sampler would wait for a first sample forever, the final mIoU
    would be 0), a broken file (file headers only: no decoding)."""
    val_set = None
    if args.val_split:
        val_set = datasets.build_dataset(args.dataset, args.data_root, args.val_split, **class_arguments(args))
    train_set = build_train_set(args, args.crop_size)
    for option, split, dataset in (("--train-split", args.train_split, train_set),
                                   ("--val-split", args.val_split, val_set)):
        if dataset is None:   # --val-split '': no validation
            continue
        if len(dataset) == 0:
            raise ValueError(f"{option} '{split}' of {args.data_root} holds no images")
        datasets.check_files(dataset)
    return train_set, val_set


def class_arguments(args):
    """build_dataset's class arguments. Your own data (--dataset folder) names its classes with
    --class-names FILE or --num-classes N and may ignore a label id of its own (--ignore-index);
    the named datasets know theirs."""
    if args.dataset != "folder":
        known = datasets.DATASETS.get(args.dataset, (None, None))[1]
        if known and args.num_classes not in (None, len(known)):
            raise ValueError(f"--num-classes {args.num_classes}: {args.dataset} has {len(known)} classes")
        if args.class_names or args.ignore_index != datasets.IGNORE_INDEX:
            raise ValueError(f"--class-names and --ignore-index are for --dataset folder (your own data); "
                             f"{args.dataset} has its own classes and ignored ids")
        return {}
    if not datasets.is_labelled_folder(args.data_root):
        raise FileNotFoundError(f"--dataset folder --data-root {args.data_root}: training needs labels: "
                                f"expected {os.path.join(args.data_root, 'images')} and "
                                f"{os.path.join(args.data_root, 'labels')} (docs/DATASETS.md)")
    if args.class_names:
        names, palette = datasets.read_class_names(args.class_names, args.num_classes)
    elif args.num_classes is not None:
        evaluation.check_number("--num-classes", args.num_classes, low_open=True)
        names, palette = [str(c) for c in range(args.num_classes)], None
    else:
        raise ValueError("--dataset folder needs --num-classes N or --class-names FILE (docs/DATASETS.md)")
    return dict(class_names=names, palette=palette, ignore_index=args.ignore_index)


def build_train_set(args, crop_size):
    """The labeled set, plus pseudo-labelled images (Zhu et al.) when given."""
    common = dict(train=True, crop_size=tuple(crop_size), scale_range=tuple(args.scale_range),
                  keep_decoded=args.keep_decoded)
    train_set = datasets.build_dataset(args.dataset, args.data_root, args.train_split, **common,
                                       **class_arguments(args))
    if args.train_subset:
        train_set = datasets.keep_listed(train_set, args.train_subset)
    if args.pseudo_labels:
        # eval.py --save-pred writes class indices (255: ignore) with the classes of the run
        pseudo = datasets.build_dataset("folder", args.unlabeled_root, None, label_root=args.pseudo_labels,
                                        class_names=train_set.class_names, palette=train_set.palette,
                                        **common)
        train_set = datasets.ConcatSegmentation([train_set, unlabeled_subset(pseudo, args)])
    return train_set


def unlabeled_subset(dataset, args):
    return datasets.keep_listed(dataset, args.unlabeled_subset) if args.unlabeled_subset else dataset


def build_student(args, device):
    student = models.build_model(args.model, args.num_classes, args.output_stride,
                                 args.pretrained, aux=args.aux_weight > 0).to(device)
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
    return student


def build_distiller(args, weights, student, thing_classes, device):
    """The losses.Distiller holding the frozen teacher(s) of --teacher-checkpoint (and MGD's
    --wide-teacher-checkpoint) and the terms of --kd; None without a teacher."""
    if not args.teacher_checkpoint:
        return None
    teacher, _ = evaluation.load_checkpoint(args.teacher_checkpoint, device, expect_classes=args.num_classes)
    wide_teacher = None
    if args.wide_teacher_checkpoint:
        wide_teacher, _ = evaluation.load_checkpoint(args.wide_teacher_checkpoint, device,
                                                     expect_classes=args.num_classes)
    if args.channels_last:  # the teachers see the same channels_last images as the student
        teacher = teacher.to(memory_format=torch.channels_last)
        if wide_teacher is not None:
            wide_teacher = wide_teacher.to(memory_format=torch.channels_last)
    return losses.Distiller(
        teacher, weights, student.feat_channels, args.num_classes, wide_teacher=wide_teacher,
        tau=args.tau, cwd_tau=args.cwd_tau, pairwise_scale=args.pairwise_scale,
        pairwise_kernel=args.pairwise_kernel, thing_classes=thing_classes,
        imitation_mask=args.imitation_mask, imitation_warmup=args.imitation_warmup,
        conditional_discriminator=args.discriminator == "conditional",
        discriminator_width=args.d_width, lambda_gp=args.lambda_gp).to(device)


def build_optimizers(args, student, distiller):
    """(optimizer, scheduler, d_optimizer, d_scheduler): the student's (with the distiller's
    student-side layers), and SKD's discriminator's (None without the holistic term); both
    with the poly learning rate stepped every iteration."""
    params = list(student.parameters()) + (list(distiller.student_side_parameters()) if distiller else [])
    if args.optimizer == "adam":  # ESPNet's train/main.py: Adam, betas (0.9, 0.999), L2 weight decay
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    poly = lambda step: (1 - step / args.iters) ** args.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
    d_optimizer = d_scheduler = None
    if distiller is not None and distiller.discriminator is not None:
        # official SKD: SGD lr 4e-4, momentum 0.9, wd 5e-4, the same poly decay as the student
        d_optimizer = torch.optim.SGD(distiller.discriminator.parameters(), lr=args.d_lr,
                                      momentum=0.9, weight_decay=5e-4)
        d_scheduler = torch.optim.lr_scheduler.LambdaLR(d_optimizer, poly)
    return optimizer, scheduler, d_optimizer, d_scheduler


def labeled_batches(args, train_set, step, small_crop_until, rank, world):
    """The labeled batches from `step` on: at --small-crop before `small_crop_until` (Zhu et
    al.'s coarse-to-fine schedule), else at --crop-size."""
    crop = args.small_crop if step < small_crop_until else args.crop_size
    data = train_set if crop == args.crop_size else build_train_set(args, crop)
    return make_batches(args, data, args.batch_size, step, rank, world)


def build_unlabeled_batches(args, distiller, start_step, rank, world):
    """The unlabeled batches of --unlabeled-root from `start_step` on, for the terms that use
    them (Xie's unlabeled term: a batch; MGD: two batches' worth, CutMixed in pairs); else None."""
    if not (args.unlabeled_root and distiller is not None and distiller.uses_unlabeled):
        return None
    unlabeled_set = datasets.build_dataset("folder", args.unlabeled_root, None, train=True,
                                           crop_size=tuple(args.crop_size),
                                           scale_range=tuple(args.scale_range),
                                           keep_decoded=args.keep_decoded)
    unlabeled_set = unlabeled_subset(unlabeled_set, args)
    datasets.check_files(unlabeled_set)
    batch_size = (args.unlabeled_batch_size or args.batch_size) * (2 if distiller.mixes_unlabeled else 1)
    return make_batches(args, unlabeled_set, batch_size, start_step, rank, world, seed_offset=1)


def make_batches(args, dataset, batch_size, start_step, rank, world, seed_offset=0):
    """Infinite iterator of training batches from `start_step` on."""
    seed = args.seed + seed_offset
    if args.centroid_sampling > 0 and seed_offset == 0:
        # Zhu et al.: centroids once per dataset (cached), a class-balanced list every epoch
        indices_for_epoch = datasets.CentroidSampler(dataset, args.centroid_sampling, seed=seed,
                                                     cache_path=Path(args.out) / "centroids.json").epoch_indices
    else:
        def indices_for_epoch(epoch):
            return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(
                seed * 10_007 + epoch)).tolist()
    # one optimiser step takes batch_size * accumulate samples on each process
    sampler = SeededSampler(indices_for_epoch, batch_size * args.accumulate * world, seed, start_step,
                            rank, world)
    loader = torch.utils.data.DataLoader(Seeded(dataset), batch_size=batch_size, sampler=sampler,
                                         num_workers=args.workers, drop_last=True,
                                         pin_memory=args.device.startswith("cuda"),
                                         persistent_workers=args.workers > 0,
                                         # its own generator: creating the iterator must not draw
                                         # from the global one, or a resumed run would diverge
                                         generator=torch.Generator().manual_seed(seed))
    return iter(loader)


class SeededSampler(torch.utils.data.Sampler):
    """Infinite stream of (index, seed) from `start_step` on. The epoch's permutation and each
    sample's augmentation seed are functions of (seed, position), so a resumed run sees exactly
    the data of an uninterrupted one. Under DDP each rank takes its slice of the global batch."""

    def __init__(self, indices_for_epoch, global_batch, seed, start_step=0, rank=0, world=1):
        self.indices_for_epoch, self.global_batch = indices_for_epoch, global_batch
        self.seed, self.start, self.rank, self.world = seed, start_step * global_batch, rank, world

    def __iter__(self):
        position = self.start
        epoch, offset = 0, position
        while True:
            order = self.indices_for_epoch(epoch)
            if not order:  # else this loop would look for a first sample forever
                raise ValueError("SeededSampler: the dataset is empty")
            if offset >= len(order):
                offset -= len(order)
                epoch += 1
                continue
            for i in range(offset, len(order)):
                if (position // (self.global_batch // self.world)) % self.world == self.rank:
                    yield order[i], self.seed * 1_000_003 + position
                position += 1
            epoch, offset = epoch + 1, 0


class Seeded(torch.utils.data.Dataset):
    """Runs the wrapped dataset's random augmentation from a per-sample seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item_and_seed):
        item, seed = item_and_seed
        # the transforms draw from torch's global CPU generator: run them from the sample's own
        # seed, on a forked generator so the training loop's random stream is left untouched.
        # Only the CPU generator: torch.manual_seed would also seed every accelerator, per sample.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[item]


# ----------------------------------------------------------------------------- distributed
def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ:
        return 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return rank, world


# =============================================================================================
# Operational helpers: the output folder, --resume's arguments and state, the clean-up after a
# failed run. Skip them on a first reading.


def prepare_out_dir(args):
    """Refuse to overwrite a run we did not start. Returns the checkpoint to resume, or None."""
    out = Path(args.out)
    ckpt = out / "checkpoint.pt"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    if args.resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: nothing to resume")
        return ckpt
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: folder is not empty; use --resume to continue it or choose "
                         "another --out")
    return None


def given_options(argv):
    """The options named on the command line `argv` (argparse fills in every default, so a
    given `--iters 600` looks like the default 600 after parsing): dests, e.g. {'iters', 'out'}."""
    parser, not_given = get_args_parser(), object()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), not_given))
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not not_given}


# where the run is computed, not what: a resumed run may move to another device or loader
RESUME_MAY_CHANGE = {"out", "resume", "stop_at", "iters", "device", "threads", "workers", "keep_decoded"}


def resumed_args(args, given=None):
    """--resume continues with the arguments the run was started with. From the command line come
    --out, --iters (an unfinished run's new length; a finished run is not lengthened: its
    learning rate has decayed to 0), --device, --workers and --keep-decoded; any other
    option given with a value other than the saved one is refused in one line naming it. `given`:
    the options on the command line (given_options); None (a call from Python): those that differ
    from the defaults."""
    path = Path(args.out) / "checkpoint.pt"
    ckpt = evaluation.load_checkpoint_dict(path)
    saved = ckpt["args"]
    if given is None:
        defaults = vars(get_args_parser().parse_args([]))
        given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    if "iters" in given and args.iters > saved["iters"] and ckpt.get("step") == saved["iters"]:
        # its poly learning rate has reached 0: continuing would raise it again part-way, a
        # schedule neither run would have had (an unfinished run's --iters changes its decay instead)
        raise ValueError(f"--iters {args.iters}: {path} finished its {saved['iters']} iterations and its "
                         f"learning rate decayed to 0; a {args.iters}-iteration schedule is a new run: "
                         + command_line(saved, iters=args.iters, out=f"{args.out}_{args.iters}"))
    differ = sorted(k for k in given - RESUME_MAY_CHANGE if saved.get(k) != getattr(args, k))
    if differ:
        raise ValueError("--resume continues the saved run; these options differ from it: "
                         + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (saved {saved.get(k)})"
                                     for k in differ) + "; start a new --out to change them")
    # options added since the run started take their defaults (a run keeps the schedule it had)
    merged = {**vars(get_args_parser().parse_args([])), **saved, "resume": True, "out": args.out,
              "stop_at": args.stop_at}
    merged.update({k: getattr(args, k) for k in given & (RESUME_MAY_CHANGE - {"out", "resume", "stop_at"})})
    return argparse.Namespace(**merged)


def command_line(saved, **changes):
    """The train.py command that starts a run with the options `saved` (a run's args) changed by
    `changes`; options at their default are left out."""
    defaults = vars(get_args_parser().parse_args([]))
    words = ["python train.py"]
    for name, value in {**saved, **changes}.items():
        if name in ("resume", "stop_at") or name not in defaults or value is None or value is False \
                or value == defaults[name]:
            continue
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words += [shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value])]
    return " ".join(words)


def resume(path, state, args, rank):
    """Restore every object of `state` and the random generators from the checkpoint `path`;
    returns (its step, its count of skipped steps)."""
    ckpt = evaluation.load_checkpoint_dict(path)
    missing = {"optimizer", "scheduler", "scaler", "rng", "step"} - set(ckpt)
    if missing:
        raise ValueError(f"{path}: cannot resume: the checkpoint has no {sorted(missing)}")
    for name, part in state.items():
        if part is not None:
            part.load_state_dict(ckpt[name])
    set_rng_state(ckpt["rng"])
    start_step, skipped = ckpt["step"], ckpt.get("skipped_steps", 0)
    if start_step > args.iters:
        raise ValueError(f"--iters {args.iters}: {path} is already at iteration {start_step}")
    if rank == 0:  # no iteration twice in the logs; a finished run evaluates again (its final
        # evaluation may have failed), so its final line goes too
        keep_entries_until(Path(args.out) / "log.jsonl", start_step)
        keep_entries_until(Path(args.out) / "metrics.jsonl",
                           start_step - 1 if start_step == args.iters else start_step)
        print(f"resumed {path} at iteration {start_step}")
    return start_step, skipped


def keep_entries_until(path, step):
    """After a resume from `step`: drop the lines of a .jsonl log past it (written after the
    checkpoint, by the interrupted process) and a line torn by the interruption."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iter"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    datasets.write_atomic(path, "".join(line + "\n" for line in kept))


def remove_unfinished_run(out, created):
    """After a new run failed: remove what it wrote. A run that failed before its first
    checkpoint leaves no folder (or the empty folder the user made); a checkpoint is kept to
    resume from, and a finished one whatever came after it."""
    if not out.is_dir() or (out / "checkpoint.pt").exists():
        return
    for path in out.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if created:
        out.rmdir()


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    """The command line: exit code 0, or 2 after one line `error: ...` (eval.report_errors)."""
    args = get_args_parser().parse_args(argv)
    return evaluation.report_errors(train, args, given_options(argv))


if __name__ == "__main__":
    sys.exit(main())
