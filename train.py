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
    # resume an interrupted run exactly where it stopped
    python train.py --out runs/student --resume
    # several GPUs: torchrun --standalone --nproc_per_node=4 train.py ...

The schedule is counted in iterations (SGD, poly learning rate stepped every iteration). On
CUDA it trains under AMP (bf16 where supported, else fp16 with a GradScaler). Every
`--eval-every` iterations it validates and appends a line to `<out>/metrics.jsonl`; the
checkpoint (`<out>/checkpoint.pt`: model, optimizer, scheduler, scaler, step, RNG states and
args as one plain dict) is written atomically, so an interrupted run resumes exactly: the data
order and every augmentation are a function of (seed, step), not of the process.
"""
import argparse
import json
import os
import random
import sys
import time
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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", help="dataset name (see datasets.py)")
    g.add_argument("--data-root", default="data/synthetic", help="dataset root folder")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val", help="split for periodic validation")
    g.add_argument("--crop-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                   help="training crop (the synthetic images are 64x64)")
    g.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
                   help="random rescaling before the crop")
    g.add_argument("--workers", type=int, default=0,
                   help="data loader processes (0: load in the main process, best for tiny images)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default="deeplabv3plus_mobilenetv2_tiny", help="see models.MODEL_NAMES")
    g.add_argument("--output-stride", type=int, default=8, choices=[8, 16, 32])
    g.add_argument("--pretrained", help="ImageNet backbone checkpoint (file or URL): torchvision's; mmcv's "
                   "resnet*_v1c for *_v1c models; CIRKD's resnet*-imagenet.pth for *_v1s models")
    g.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the auxiliary head's CE (PSPNet uses 0.4); 0: no aux head")
    g.add_argument("--ohem", type=float, default=0.0,
                   help="OHEM CE threshold for the task loss (MGD's Cityscapes code: 0.7); 0: plain CE")
    g.add_argument("--iters", type=int, default=600)
    g.add_argument("--batch-size", type=int, default=16, help="per process")
    g.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="gradient accumulation: K batches per optimiser step (effective batch: "
                        "batch-size x processes x K), for papers' batches that do not fit memory")
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--poly-power", type=float, default=0.9, help="lr = base * (1 - it/iters)^power")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("device")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", default="auto", choices=["off", "auto", "bf16", "fp16"],
                   help="autocast on CUDA (auto: bf16 where supported, else fp16 + GradScaler)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPU)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    g = p.add_argument_group("distillation (see losses.py and METHODS.md)")
    g.add_argument("--teacher-checkpoint", help="frozen teacher: a train.py checkpoint, or a published "
                   "torchvision / mmsegmentation / CIRKD file (README: Published teachers)")
    g.add_argument("--wide-teacher-checkpoint", help="MGD's second, wide teacher")
    g.add_argument("--kd", default="", help="term=weight,... with terms from losses.TERMS")
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
    g.add_argument("--unlabeled-batch-size", type=int, help="default: --batch-size")
    g.add_argument("--pseudo-labels", help="folder of offline pseudo labels for --unlabeled-root "
                                           "(eval.py --save-pred); trained on together with the labels")
    g.add_argument("--centroid-sampling", type=float, default=0.0, metavar="PCT",
                   help="Zhu et al.: fraction of samples drawn uniformly over classes (0: off)")
    g.add_argument("--coarse2fine", type=float, default=0.0, metavar="FRACTION",
                   help="Zhu et al. fast schedule: first FRACTION of iterations at --small-crop")
    g.add_argument("--small-crop", type=int, nargs=2, default=[32, 32], metavar=("H", "W"))
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out", default="runs/train", help="output folder")
    g.add_argument("--resume", action="store_true", help="continue <out>/checkpoint.pt")
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--eval-every", type=int, default=0, help="0: only at the end")
    g.add_argument("--checkpoint-every", type=int, default=200)
    g.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)  # tests: simulate an interruption
    return p


def parse_kd(spec):
    """'pixel=1,consistency=0.5' -> {'pixel': 1.0, 'consistency': 0.5}."""
    weights = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--kd: expected term=weight, got '{item}'") from None
    unknown = set(weights) - set(losses.TERMS)
    if unknown:
        raise ValueError(f"--kd: unknown term(s) {sorted(unknown)}; known: {', '.join(losses.TERMS)}")
    return weights


def check_args(args):
    for name in ("iters", "batch_size", "accumulate", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.sync_bn and not args.device.startswith("cuda"):
        raise ValueError("--sync-bn needs --device cuda (torch's SyncBatchNorm has no CPU kernel)")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.model not in models.MODEL_NAMES:
        raise ValueError(f"--model: unknown model '{args.model}'; known: {', '.join(models.MODEL_NAMES)}")
    weights = parse_kd(args.kd)
    if weights and not args.teacher_checkpoint:
        raise ValueError("--kd needs --teacher-checkpoint")
    needs_unlabeled = {"unlabeled", "mgd_image", "mgd_region"} & set(weights)
    if needs_unlabeled and not args.unlabeled_root:
        raise ValueError(f"--kd {sorted(needs_unlabeled)[0]} needs --unlabeled-root")
    if {"mgd_image", "mgd_region"} & set(weights) and not args.wide_teacher_checkpoint:
        raise ValueError("MGD terms need --wide-teacher-checkpoint (T_W) besides --teacher-checkpoint (T_D)")
    if args.pseudo_labels and not args.unlabeled_root:
        raise ValueError("--pseudo-labels needs --unlabeled-root (the images they label)")
    if not 0 <= args.centroid_sampling <= 1 or not 0 <= args.coarse2fine < 1:
        raise ValueError("--centroid-sampling must be in [0, 1] and --coarse2fine in [0, 1)")
    return weights


# ----------------------------------------------------------------------------- data
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


def build_train_set(args, crop_size):
    """The labeled set, plus pseudo-labelled images (Zhu et al.) when given."""
    common = dict(train=True, crop_size=tuple(crop_size), scale_range=tuple(args.scale_range))
    train_set = datasets.build_dataset(args.dataset, args.data_root, args.train_split, **common)
    if args.pseudo_labels:
        pseudo = datasets.build_dataset("folder", args.unlabeled_root, None, label_root=args.pseudo_labels,
                                        classes_from=args.dataset, **common)
        train_set = datasets.ConcatSegmentation([train_set, pseudo])
    return train_set


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


# ----------------------------------------------------------------------------- losses
def task_loss(output, labels, args):
    """CE (or OHEM CE) with ignore 255 on logits upsampled to the label, plus the aux head's."""
    def ce(logits):
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        if args.ohem > 0:
            return losses.ohem_ce(logits, labels, thresh=args.ohem)
        return F.cross_entropy(logits, labels, ignore_index=255)
    loss = ce(output["out"])
    if "aux" in output:
        loss = loss + args.aux_weight * ce(output["aux"])
    return loss


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


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, state):
    tmp = Path(path).with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interruption leaves the previous checkpoint intact


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_out_dir(args):
    """Refuse to overwrite a run we did not start. Returns the checkpoint to resume, or None."""
    out = Path(args.out)
    ckpt = out / "checkpoint.pt"
    if args.resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: nothing to resume")
        return ckpt
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: folder is not empty; use --resume to continue it or choose "
                         "another --out")
    return None


def resumed_args(args):
    """--resume continues with the arguments the run was started with (only --out, --stop-at
    and --iters, to lengthen a finished run, come from the command line)."""
    saved = torch.load(Path(args.out) / "checkpoint.pt", map_location="cpu", weights_only=False)["args"]
    merged = {**saved, "resume": True, "out": args.out, "stop_at": args.stop_at}
    if args.iters != get_args_parser().get_default("iters"):
        merged["iters"] = args.iters
    return argparse.Namespace(**merged)


# ----------------------------------------------------------------------------- the loop
def train(args):
    """Train per `args`; returns the final validation metrics (see eval.ConfusionMatrix)."""
    resume_from = prepare_out_dir(args)
    if resume_from is not None:
        args = resumed_args(args)
    weights = check_args(args)
    rank, world = setup_distributed(args)
    out = Path(args.out)
    created = not out.exists()
    try:
        metrics = run(args, weights, rank, world, resume_from)
    except BaseException:
        # nothing half written: a run that fails before its first checkpoint leaves no folder
        if rank == 0 and created and out.exists() and not (out / "checkpoint.pt").exists():
            for f in out.iterdir():
                f.unlink()
            out.rmdir()
        raise
    if world > 1:  # shut down together: exiting with the group alive lets gloo abort (SIGABRT)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def run(args, weights, rank, world, resume_from):
    """The training loop proper (see `train`)."""
    device = torch.device(args.device)
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "args.json").write_text(json.dumps(vars(args), indent=1))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    val_set = datasets.build_dataset(args.dataset, args.data_root, args.val_split)
    args.num_classes = val_set.num_classes
    train_set = build_train_set(args, args.crop_size)

    student = models.build_model(args.model, args.num_classes, args.output_stride,
                                 args.pretrained, aux=args.aux_weight > 0).to(device)
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
    distiller = None
    if args.teacher_checkpoint:
        teacher, _ = evaluation.load_checkpoint(args.teacher_checkpoint, device,
                                                expect_classes=args.num_classes)
        wide_teacher = None
        if args.wide_teacher_checkpoint:
            wide_teacher, _ = evaluation.load_checkpoint(args.wide_teacher_checkpoint, device,
                                                         expect_classes=args.num_classes)
        if args.channels_last:  # the teachers see the same channels_last images as the student
            teacher = teacher.to(memory_format=torch.channels_last)
            if wide_teacher is not None:
                wide_teacher = wide_teacher.to(memory_format=torch.channels_last)
        distiller = losses.Distiller(
            teacher, weights, student.feat_channels, args.num_classes, wide_teacher=wide_teacher,
            tau=args.tau, cwd_tau=args.cwd_tau, pairwise_scale=args.pairwise_scale,
            pairwise_kernel=args.pairwise_kernel, thing_classes=train_set.thing_classes,
            imitation_mask=args.imitation_mask, imitation_warmup=args.imitation_warmup,
            conditional_discriminator=args.discriminator == "conditional",
            discriminator_width=args.d_width, lambda_gp=args.lambda_gp).to(device)
    model = student
    if world > 1:
        if args.sync_bn:
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        model = torch.nn.parallel.DistributedDataParallel(student)  # the teacher is never wrapped

    params = list(student.parameters()) + (list(distiller.student_side_parameters()) if distiller else [])
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    poly = lambda step: (1 - step / args.iters) ** args.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
    d_optimizer = d_scheduler = None
    if distiller is not None and distiller.discriminator is not None:
        # official SKD: SGD lr 4e-4, momentum 0.9, wd 5e-4, the same poly decay as the student
        d_optimizer = torch.optim.SGD(distiller.discriminator.parameters(), lr=args.d_lr,
                                      momentum=0.9, weight_decay=5e-4)
        d_scheduler = torch.optim.lr_scheduler.LambdaLR(d_optimizer, poly)
    autocast, amp_dtype = evaluation.autocast_context(device, args.amp)
    # a GradScaler only for fp16: bf16 has float32's range and needs no loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_step = 0
    if resume_from is not None:
        ckpt = torch.load(resume_from, map_location="cpu", weights_only=False)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if distiller is not None:
            distiller.load_state_dict(ckpt["distiller"])
        if d_optimizer is not None:
            d_optimizer.load_state_dict(ckpt["d_optimizer"])
            d_scheduler.load_state_dict(ckpt["d_scheduler"])
        set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        if rank == 0:
            print(f"resumed {resume_from} at iteration {start_step}")

    small_crop_until = int(args.coarse2fine * args.iters)

    def batches_from(step):
        crop = args.small_crop if step < small_crop_until else args.crop_size
        data = train_set if crop == args.crop_size else build_train_set(args, crop)
        return make_batches(args, data, args.batch_size, step, rank, world)

    batches = batches_from(start_step)
    unlabeled_batches = None
    if args.unlabeled_root and distiller is not None and distiller.uses_unlabeled:
        unlabeled_set = datasets.build_dataset("folder", args.unlabeled_root, None, train=True,
                                               crop_size=tuple(args.crop_size),
                                               scale_range=tuple(args.scale_range))
        u_batch = (args.unlabeled_batch_size or args.batch_size) * (2 if distiller.mixes_unlabeled else 1)
        unlabeled_batches = make_batches(args, unlabeled_set, u_batch, start_step, rank, world,
                                         seed_offset=1)

    def checkpoint(step):
        if rank != 0:
            return
        save_checkpoint(Path(args.out) / "checkpoint.pt", {
            "model": student.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "distiller": distiller.state_dict() if distiller else None,
            "d_optimizer": d_optimizer.state_dict() if d_optimizer else None,
            "d_scheduler": d_scheduler.state_dict() if d_scheduler else None,
            "rng": rng_state(), "step": step, "args": vars(args)})

    val_loader = torch.utils.data.DataLoader(val_set, batch_size=8, num_workers=args.workers)
    if world > 1:  # decorrelate dropout across ranks (augmentation has per-sample seeds)
        torch.manual_seed(args.seed + 1_000_003 * rank + start_step)
    metrics, sums, logged, skipped = {}, {}, 0, 0
    start_time, step_time = time.perf_counter(), time.perf_counter()
    model.train()
    for step in range(start_step, args.iters):
        if step == small_crop_until and 0 < step:
            batches = batches_from(step)  # coarse-to-fine: switch to the full crop
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for _ in range(args.accumulate):  # gradient accumulation; DDP averages over processes
            images, labels = (t.to(device, non_blocking=True) for t in next(batches))
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                output = model(images)
            terms = {"ce": task_loss(output, labels, args)}
            if distiller is not None:
                unlabeled = mix_mask = None
                if unlabeled_batches is not None:
                    unlabeled = next(unlabeled_batches)[0].to(device, non_blocking=True)
                    if args.channels_last:
                        unlabeled = unlabeled.contiguous(memory_format=torch.channels_last)
                if unlabeled is not None and distiller.mixes_unlabeled:  # MGD: CutMix the two halves
                    mix_mask = datasets.cutmix_box_masks(len(unlabeled) // 2, *unlabeled.shape[-2:])
                    mix_mask = mix_mask[:, None].to(device)
                terms.update(distiller.terms(model, output, images, labels, step, unlabeled, mix_mask,
                                             autocast))
            loss = distiller.weighted_sum(terms) if distiller else terms["ce"]
            finite = finite and bool(torch.isfinite(loss))
            if finite:
                scaler.scale(loss / args.accumulate).backward()
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / args.accumulate
        if finite:
            scaler.step(optimizer)
            scaler.update()
        else:  # never let one bad batch poison the weights: skip the step and say so
            skipped += 1
            print(f"iter {step + 1}: non-finite loss {loss.item()}, step skipped", flush=True)
        scheduler.step()
        if d_optimizer is not None:  # SKD order: student step first, then D on detached maps
            d_loss = distiller.discriminator_loss(images, output["out"].detach())
            d_optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(d_loss):
                d_loss.backward()
                d_optimizer.step()
            else:
                skipped += 1
            d_scheduler.step()
            sums["d"] = sums.get("d", 0.0) + d_loss.detach()
        # the sums stay on the device; .item() (a GPU sync) only when a line is printed
        logged += 1
        done = step + 1
        if rank == 0 and (done % args.log_every == 0 or done == args.iters):
            per_it = (time.perf_counter() - step_time) / logged
            mean = {k: float(v) / logged for k, v in sums.items()}
            with open(Path(args.out) / "log.jsonl", "a") as f:
                f.write(json.dumps({"iter": done, **mean, "lr": scheduler.get_last_lr()[0],
                                    "s_per_it": per_it}) + "\n")
            detail = " ".join(f"{k} {v:.3f}" for k, v in mean.items() if k != "loss")
            print(f"iter {done}/{args.iters} | loss {mean['loss']:.3f} ({detail}) | "
                  f"lr {scheduler.get_last_lr()[0]:.2e} | {per_it:.3f} s/it | "
                  f"eta {evaluation.format_eta(per_it * (args.iters - done))}", flush=True)
            sums, logged, step_time = {}, 0, time.perf_counter()
        last = done == args.iters
        if (args.eval_every and done % args.eval_every == 0) or last:
            metrics = evaluation.evaluate(student, val_loader, device, args.num_classes, args.amp)
            model.train()
            if rank == 0:
                print(f"iter {done}: {args.val_split} mIoU {100 * metrics['miou']:.2f}", flush=True)
                with open(Path(args.out) / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"iter": done, "split": args.val_split, **metrics}) + "\n")
        if done % args.checkpoint_every == 0 or last:
            checkpoint(done)
        if args.stop_at and done == args.stop_at:
            checkpoint(done)
            break
    if rank == 0:
        print(f"done in {evaluation.format_eta(time.perf_counter() - start_time)}"
              + (f" ({skipped} non-finite steps skipped)" if skipped else ""))
    return metrics


def one_line(error):
    """The message of a (possibly DataLoader-worker-wrapped) error as one line."""
    line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return line.split(": ", 1)[1] if line.startswith(("ValueError: ", "FileNotFoundError: ")) else line


if __name__ == "__main__":
    try:
        train(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
