"""kd-seg: the five distillation papers for semantic segmentation, on one bench.

    python kd_seg.py                     # the demo: every paper's ablation on the synthetic
                                         # benchmark, CPU, minutes (README; docs/DEMO.md)
    python kd_seg.py --quick             # a 60-second smoke run of the same pipeline
    python kd_seg.py --rows baseline,xie_lp_lc --seeds 0 1 2 3 4
    python kd_seg.py --list              # the rows and the paper recipes
    python kd_seg.py --recipe camvid --data-root data/camvid
                                         # every paper on real images (CamVid), CPU, < 1 hour
    python kd_seg.py --recipe skd2019 --data-root /data/cityscapes
                                         # a paper's ablation table on real data, one GPU
    python kd_seg.py --recipe skd2019 --data-root /data/cityscapes --dry-run
                                         # every command it would run, touching nothing

One mechanism runs the demo and the recipes. A setting (the demo, or one paper's recipe) names
a dataset, a teacher (MGD: two), a student, a schedule, the rows of the paper's ablation table
and the evaluation protocol. From it come jobs, each one `train.py` or `eval.py` command line:
the teacher(s), offline pseudo labels (Zhu et al.), the baseline student and every row x seed,
and the evaluation of each. A job starts as soon as the jobs it needs have finished; a finished
job is reused and an interrupted training resumed, so rerunning a command continues it. Then one
table in the shape of the papers' ablation tables (params, GMACs, mIoU with spread, gain with
its 95% interval, verdict, FPS, the paper's own numbers) and <out>/REPORT.md with the table,
the commands, a picture grid and (demo) the pseudo-label diagnostics.

The demo is the recipes' rows at CPU scale on synthetic data: one small teacher and student
for all of them, a few hundred iterations, the test split (nothing is chosen on it).
"""
import argparse
import concurrent.futures as futures
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import datasets
import eval as evaluation
import losses
import models
import train

# ----------------------------------------------------------------------------- the rows
# name -> (paper, what the row adds, train.py flags at the papers' official weights;
# docs/PAPER_VS_CODE.md). A setting may replace a row's flags (its "overrides", each with
# its reason). {unlabeled}, {pseudo}, {wide}, {warmup}, {small_crop} are filled in per setting.
# Rows with identical flags in a setting share one run per seed.
ROWS = {
    "baseline":      ("-", "student alone", []),
    # a setting with `partition_rows` trains those rows on a labeled partition of the train split
    # (the rest: their unlabeled images) and measures them against this second baseline
    "partition_baseline": ("-", "student alone, on the labeled partition", []),
    "xie_lp":        ("Xie 2018", "+L_p", ["--kd", "pixel=1"]),
    "xie_lp_lc":     ("Xie 2018", "+L_p+L_c", ["--kd", "pixel=1,consistency=1"]),
    "xie_unlabeled": ("Xie 2018", "+L_p+L_c+unlabeled",
                      ["--kd", "pixel=1,consistency=1,unlabeled=1", "--unlabeled-root", "{unlabeled}"]),
    "skd_pi":        ("Liu 2019 SKD", "+pixel", ["--kd", "pixel=10"]),
    "skd_pi_pa":     ("Liu 2019 SKD", "+pixel+pair-wise", ["--kd", "pixel=10,pairwise=0.5"]),
    "skd_pi_pa_ho":  ("Liu 2019 SKD", "+pixel+pair-wise+holistic", ["--kd", "pixel=10,pairwise=0.5,holistic=0.1"]),
    "fgfi":          ("Wang 2019 FGFI", "+imitation (anchor mask)", ["--kd", "imitation=0.01", "--imitation-warmup", "400"]),
    "zhu":           ("Zhu 2020", "+pseudo labels, centroid sampling",
                      ["--unlabeled-root", "{unlabeled}", "--pseudo-labels", "{pseudo}", "--centroid-sampling", "0.5"]),
    "zhu_c2f":       ("Zhu 2020", "+fast schedule (first half at half-size crops)",
                      ["--unlabeled-root", "{unlabeled}", "--pseudo-labels", "{pseudo}", "--centroid-sampling", "0.5",
                       "--coarse2fine", "0.5", "--small-crop", "{small_crop}"]),
    "mgd":           ("Qin 2022 MGD", "+two teachers, image/region/pixel",
                      ["--kd", "mgd_pixel=1,mgd_image=0.001,mgd_region=100", "--wide-teacher-checkpoint", "{wide}",
                       "--unlabeled-root", "{unlabeled}"]),
    "cwd":           ("Shu 2021 CWD", "+channel-wise KD", ["--kd", "cwd=3"]),
    # the audits' reference rows (Niemann et al. 2023, Ali et al. 2026), beyond the papers as CWD:
    # Hinton's logit KD is kd-seg's pixel term at its temperature (1); FitNet is FGFI's loss
    # without its mask, through a 1x1 regressor, at FGFI's weight
    "hinton":        ("reference: Hinton 2015", "+logit KD", ["--kd", "pixel=1"]),
    "fitnet":        ("reference: FitNet 2015", "+feature KD (1x1 regressor, no mask)", ["--kd", "fitnet=0.01"]),
}

# ----------------------------------------------------------------------------- the settings
TEACHER = "deeplabv3plus_resnet18_tiny"
WIDE_TEACHER = "deeplabv3plus_wide_resnet_tiny"
STUDENT = "deeplabv3plus_resnet18_micro"
# The demo schedule shared by every training (the teachers only train longer), sized so that the
# demo's student runs fit minutes on 2 CPU cores: output stride 16 and 48x48 crops of the 64x64
# images cost much less per image than stride 8 at 64x64; batch 8 for twice the steps of batch 16
# in the same time; lr 0.15 and scales 0.75-1.5 learned fastest on val (docs/DEMO.md, "tuning the demo").
DEMO_FLAGS = ["--output-stride", "16", "--crop-size", "48", "48", "--batch-size", "8", "--lr", "0.15",
              "--scale-range", "0.75", "1.5", "--channels-last", "--device", "cpu",
              "--val-split", ""]   # the test split is evaluated by eval.py; no validation it would not use
# The rows at CPU scale (the demo and the camvid setting; docs/DEMO.md, "tuning the demo"): SKD's
# official pixel weight 10 diverged there, 1 was best on val (so skd_pi is the very run of xie_lp);
# the official D width 64 costs several student steps on a CPU; FGFI's warm-up is the first 10% of
# the iterations (kd-seg's choice: the official 400 of ~40k is 1%, a handful of steps here); 4
# unlabeled images (MGD: 2 x 4 mixed into 4) per step beside the 8 labeled, for the budget.
CPU_OVERRIDES = {
    "skd_pi": ["--kd", "pixel=1"],
    "skd_pi_pa": ["--kd", "pixel=1,pairwise=0.5"],
    "skd_pi_pa_ho": ["--kd", "pixel=1,pairwise=0.5,holistic=0.1", "--d-width", "16"],
    "fgfi": ["--kd", "imitation=0.01", "--imitation-warmup", "{warmup}"],
    "xie_unlabeled": ROWS["xie_unlabeled"][2] + ["--unlabeled-batch-size", "4"],
    "mgd": ROWS["mgd"][2] + ["--unlabeled-batch-size", "4"],
}
DEMO = {
    "name": "demo", "paper": "every paper's rows, at CPU scale", "dataset": "synthetic",
    "teacher": TEACHER, "wide_teacher": WIDE_TEACHER, "student": STUDENT,
    # `--rows zhu,zhu_c2f` compares the two; every row trains on every labeled image
    "rows": [row for row in ROWS if row not in ("zhu_c2f", "partition_baseline")],
    "flags": DEMO_FLAGS, "iters": 200, "teacher_iters": 600, "seeds": [0, 1, 2, 3, 4],
    "eval": ["--split", "test", "--batch-size", "16", "--device", "cpu"], "fps_size": (512, 512),
    "imagenet": False,
    "overrides": {**CPU_OVERRIDES,
                  "zhu_c2f": ROWS["zhu_c2f"][2][:-1] + ["32", "32"]},   # 32x32, not 24x24: the rings survive
    "reported": {},
}
# A recipe: one paper's ablation table on real data with ImageNet-initialised backbones. Schedule
# provenance (docs/RECIPES.md): SKD's run_train_val.sh, CIRKD's train_kd.py defaults, MGD's
# exp.city config; Xie, FGFI and Zhu published no schedule, so theirs is the common setting of
# the others (512x512 crops, batch 8, 40k iterations, SGD lr 0.01 poly). "flags" go to every
# training of the recipe (teachers, baseline, rows); batch x accumulate = the paper's batch.
COMMON = ["--crop-size", "512", "512", "--batch-size", "8", "--lr", "0.01", "--weight-decay", "1e-4",
          "--scale-range", "0.5", "2.0"]
RECIPES = {
    "xie2018": {
        "paper": "Xie et al., BMVC 2018", "dataset": "pascal_context",
        "teacher": "deeplabv2_resnet101", "student": "deeplabv2_mobilenetv2",
        "rows": ["baseline", "xie_lp", "xie_lp_lc", "xie_unlabeled"],
        "flags": COMMON, "iters": 40000, "teacher_iters": 40000, "eval": ["--split", "val"],
        "reported": {"teacher": 48.5, "baseline": 40.9, "xie_lp": 42.3, "xie_lp_lc": 42.8, "xie_unlabeled": 43.8},
    },
    "skd2019": {
        "paper": "Liu et al., CVPR 2019 (SKD)", "dataset": "cityscapes",
        "teacher": "pspnet_resnet101", "student": "pspnet_resnet18",
        "rows": ["baseline", "skd_pi", "skd_pi_pa", "skd_pi_pa_ho"],
        # official: 512x512, batch 8, 40k steps, lr 0.01, wd 5e-4, scale 0.5-2.0, PSP aux loss 0.4;
        # evaluation on the whole 1024x2048 image, one scale, no flip
        "flags": ["--crop-size", "512", "512", "--batch-size", "8", "--lr", "0.01", "--weight-decay", "5e-4",
                  "--scale-range", "0.5", "2.0", "--aux-weight", "0.4"],
        "iters": 40000, "teacher_iters": 40000, "eval": ["--split", "val"],
        "reported": {"baseline": 69.10, "skd_pi": 70.51, "skd_pi_pa": 71.78, "skd_pi_pa_ho": 74.08},
    },
    "fgfi2019": {
        "paper": "Wang et al., CVPR 2019 (FGFI), adapted", "dataset": "cityscapes",
        "teacher": "deeplabv3plus_resnet101", "student": "deeplabv3plus_resnet18",
        "rows": ["baseline", "fgfi"], "flags": COMMON, "iters": 40000, "teacher_iters": 40000,
        "eval": ["--split", "val"], "reported": {},
    },
    "zhu2020": {
        # self-training: the student is the teacher's own architecture (as in the paper)
        "paper": "Zhu et al., 2020 (self-training)", "dataset": "cityscapes",
        "teacher": "deeplabv3plus_resnet101", "student": "deeplabv3plus_resnet101",
        "rows": ["baseline", "zhu", "zhu_c2f"], "flags": COMMON, "iters": 40000, "teacher_iters": 40000,
        "eval": ["--split", "val"], "reported": {"teacher": 78.1, "zhu": 79.0},
    },
    "mgd2022": {
        "paper": "Qin et al., ECCV 2022 (MGD)", "dataset": "cityscapes", "partition": 16,
        "teacher": "deeplabv3plus_resnet101", "wide_teacher": "deeplabv3plus_wide_resnet50",
        "student": "deeplabv3plus_resnet18", "rows": ["baseline", "mgd"],
        # official exp.city: 800x800 crops, 16 images (2 per GPU on 8 GPUs), lr 0.02, wd 1e-4,
        # scales 0.5-2.0, OHEM 0.7; 137 epochs of the unlabeled part (about 24k iterations at
        # 1/16); evaluation: 800x800 sliding window, stride 2/3, one scale, no flip
        "flags": ["--crop-size", "800", "800", "--batch-size", "8", "--accumulate", "2", "--lr", "0.02",
                  "--weight-decay", "1e-4", "--scale-range", "0.5", "2.0", "--ohem", "0.7"],
        "iters": 24000, "teacher_iters": 24000, "eval": ["--split", "val", "--window", "800", "800"],
        "reported": {},   # MGD reports gains: +11.5 (ResNet-18) over the baseline at 1/16
        # official exp.voc (ResNet-18 student): lambda_1 0.002, plain CE
        "by_dataset": {"voc": {"overrides": {"mgd": ["--kd", "mgd_pixel=1,mgd_image=0.002,mgd_region=100",
                                                     "--wide-teacher-checkpoint", "{wide}", "--unlabeled-root",
                                                     "{unlabeled}"]},
                               "drop": ["--ohem"]}},
    },
    "cwd": {
        "paper": "Shu et al., ICCV 2021 (CWD), CIRKD's setting", "dataset": "cityscapes",
        "teacher": "deeplabv3_resnet101", "student": "deeplabv3_resnet18", "rows": ["baseline", "cwd"],
        # CIRKD's train_cwd.sh: CWD on logits (3) and features (50) plus pixel KD (1); its hinge
        # adversarial term (lambda_adv 0.001) is not in kd-seg, whose holistic term is WGAN-GP
        "overrides": {"cwd": ["--kd", "cwd=3,cwd_feat=50,pixel=1"]},
        # CIRKD train_kd.py: 512x1024 crops, batch 16, 40k iterations, lr 0.02, wd 1e-4; whole-image
        # evaluation at 1024x2048
        "flags": ["--crop-size", "512", "1024", "--batch-size", "8", "--accumulate", "2", "--lr", "0.02",
                  "--weight-decay", "1e-4", "--scale-range", "0.5", "2.0"],
        "iters": 40000, "teacher_iters": 40000, "eval": ["--split", "val"],
        "reported": {"teacher": 78.07, "baseline": 74.21, "cwd": 75.55},   # CIRKD's README
    },
}
# CamVid (the 480x360 SegNet layout) with SKD's published CamVid students as teachers, found beside
# the data root (data/camvid beside data/skd_camvid/ESP, data/skd_camvid/esp-c) or given by --teacher-checkpoint /
# --wide-teacher-checkpoint. Their own test mIoU at 360x480: ESPNet 65.13, ESPNet-C 64.13.
SKD_CAMVID_FILES = {"teacher": "skd_camvid/ESP/SD+KD+CITY_65.1.pth",
                    "wide_teacher": "skd_camvid/esp-c/KD+CITY+SD_64.1.pth"}
SKD_CAMVID_SOURCE = ("github.com/irfanICMLL/structure_knowledge_distillation, branch cvpr_19, "
                     "checkpoint/Camvid")
# The CPU-scale real-data setting: every paper's rows on CamVid in at most an hour on 2 cores (README,
# "CamVid"). Every choice below was made on the val split (docs/CAMVID.md, "how the setting was chosen"):
# a downscaled copy at 180x240 (a quarter of the pixels; SKD's ESPNet still scores 74.3 val there);
# ESPNet-C with p = 1, q = 2 as the student (0.145 M parameters, 2.4x fewer than the teacher, and the
# fastest learner per second of the small networks tried); 96x96 crops, batch 8, Adam lr 5e-3 (poly),
# weight decay 5e-4 (ESPNet's own optimiser; SGD learned slower from scratch); the semi-supervised
# rows on a 1/8 partition (45 labeled images, the other 322 unlabeled). Each job holds the copy's
# decoded images in memory (--keep-decoded: PNG decoding was most of a step's loading time).
CAMVID_FLAGS = ["--crop-size", "96", "96", "--batch-size", "8", "--optimizer", "adam", "--lr", "5e-3",
                "--weight-decay", "5e-4", "--scale-range", "0.75", "1.5", "--channels-last", "--device", "cpu",
                "--val-split", "", "--keep-decoded"]
RECIPES["camvid"] = {
    "paper": "every paper's rows on real images (CamVid), at CPU scale", "dataset": "camvid", "cpu": True,
    "teacher": "espnet", "wide_teacher": "espnet_c", "student": "espnet_c_p1q2", "teacher_files": SKD_CAMVID_FILES,
    "downscale": [180, 240], "partition": 8, "partition_rows": ["xie_unlabeled", "zhu", "mgd"],
    "rows": ["baseline", "xie_lp", "xie_lp_lc", "skd_pi", "skd_pi_pa", "skd_pi_pa_ho", "fgfi", "cwd",
             "hinton", "fitnet", "partition_baseline", "xie_unlabeled", "zhu", "mgd"],
    "flags": CAMVID_FLAGS, "iters": 600, "teacher_iters": 0, "seeds": [0, 1, 2, 3, 4], "imagenet": False,
    "eval": ["--split", "test", "--batch-size", "8", "--device", "cpu"], "fps_size": (180, 240),
    "overrides": CPU_OVERRIDES,   # as the demo's (pixel weight 1 kept on val: docs/CAMVID.md)
    # `--tune`: one budget for every arm (docs/CAMVID.md, "the fair table"): the baseline's learning
    # rate and each row's loss weights (one multiplier over all of them) on 4 values x 2 seeds
    # disjoint from the table's, trained without the drive 0006R0 and scored on it (like the test
    # split's Seq05VD, a drive the training never sees); the labeled fraction of the partition rows:
    # the largest at which the partition baseline is data-limited (DATA_LIMITED points below the
    # baseline trained on every label, at the same steps)
    "tune": {"sequence": "0006R0", "seeds": [100, 101], "lr": [2.5e-3, 5e-3, 1e-2, 2e-2],
             "multipliers": [0.1, 0.3, 1, 3], "partitions": [8, 16, 32]},
    # `--curve`: does a gain grow or vanish as the student trains longer? The baseline, the row that
    # scored best in --tune (CWD; the partition rows aside) and the two references, one training 4x
    # the table's, scored every 600 steps (about half an hour on 2 cores with --tuned)
    "curve": {"rows": ["baseline", "cwd", "hinton", "fitnet"], "iters": 2400, "every": 600, "seeds": [0, 1, 2]},
    # SKD's own CamVid students (ESPNet-C, p = 2, q = 8, 300 epochs at 360x480 from a PSPNet-R101
    # teacher): another student and schedule, shown for the direction of each gain, not its size
    "reported": {"teacher": 65.1, "baseline": 56.7, "skd_pi": 58.7, "skd_pi_pa_ho": 60.3},
}
# SKD's CamVid setting for one GPU (its Table 6: ESPNet-C and ESPNet students). SKD published its
# students, not its CamVid schedule: crop, batch, iterations and learning rate are kd-seg's choice,
# ESPNet's own CamVid training (sacmehta/ESPNet train/main.py: Adam lr 5e-4, weight decay 5e-4,
# 300 epochs) on SKD's data pipeline (CamVidLight: random scale 0.5-2.1, crop, flip) with the whole
# 360x480 image as the crop (SKD evaluates at 360x480) and batch 8: 300 epochs = 13,800 iterations.
# The teacher: SKD's PSPNet-R101 is not published; SKD's ESPNet 65.1 (beside the data) or yours.
SKD_CAMVID_FLAGS = ["--crop-size", "360", "480", "--batch-size", "8", "--optimizer", "adam", "--lr", "5e-4",
                    "--weight-decay", "5e-4", "--scale-range", "0.5", "2.1"]
for _student, _reported in (("espnet_c", {"baseline": 56.7, "skd_pi": 58.7, "skd_pi_pa_ho": 60.3}),
                            ("espnet", {"baseline": 57.8, "skd_pi": 59.8, "skd_pi_pa_ho": 61.4})):
    RECIPES[f"skd2019_camvid_{_student}"] = {
        "paper": "Liu et al., CVPR 2019 (SKD), CamVid", "dataset": "camvid", "teacher": "espnet",
        "teacher_files": {"teacher": SKD_CAMVID_FILES["teacher"]}, "student": _student,
        "rows": ["baseline", "skd_pi", "skd_pi_pa", "skd_pi_pa_ho"], "flags": SKD_CAMVID_FLAGS,
        "iters": 13800, "teacher_iters": 0, "imagenet": False, "eval": ["--split", "test"],
        "fps_size": (360, 480), "reported": {"teacher": 65.1, **_reported}}
# CIRKD's CamVid setting (Yang et al., CVPR 2022, its README and train scripts): crop 360x360, batch
# 16, 40k iterations, SGD lr 0.02 poly, weight decay 1e-4, aux weight 0.4, ImageNet students, a
# DeepLabV3-R101 teacher; the 233 test images whole at 360x480. CIRKD's own loss (cross-image
# relations) is not one of kd-seg's papers: its numbers are in docs/CAMVID.md beside the baseline's.
CIRKD_CAMVID_FLAGS = ["--crop-size", "360", "360", "--batch-size", "8", "--accumulate", "2", "--lr", "0.02",
                      "--weight-decay", "1e-4", "--scale-range", "0.5", "2.0", "--aux-weight", "0.4"]
for _student, _baseline in (("deeplabv3_resnet18", 66.92), ("pspnet_resnet18", 66.73)):
    RECIPES[f"cirkd_camvid_{_student.partition('_')[0]}"] = {
        "paper": "CIRKD's CamVid setting (Yang et al., CVPR 2022)", "dataset": "camvid",
        "teacher": "deeplabv3_resnet101", "student": _student, "rows": ["baseline", "skd_pi_pa_ho", "cwd"],
        "overrides": {"cwd": ["--kd", "cwd=3,cwd_feat=50,pixel=1"]}, "flags": CIRKD_CAMVID_FLAGS,
        "iters": 40000, "teacher_iters": 40000, "eval": ["--split", "test"], "fps_size": (360, 480),
        "reported": {"teacher": 69.84, "baseline": _baseline}}
for _name, _recipe in RECIPES.items():
    _recipe.update(name=_name, overrides=_recipe.get("overrides", {}))
    _recipe.setdefault("seeds", [0])
    _recipe.setdefault("imagenet", True)
# CPU-scale jobs (the demo, smoke runs) run with one thread each and the kernels every x86-64 CPU
# of the last decade has: ATen's vectorised code and oneDNN's convolutions otherwise pick AVX-512
# where present. This narrows what differs between machines; it does not remove it (docs/DEMO.md, "what
# differs between machines": oneDNN also sizes its blocking to the machine, and measured tables still differ).
REPRODUCIBLE_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2"}
# the cost columns' input size: the resolution each dataset is evaluated at (docs/DATASETS.md)
FPS_SIZE = {"cityscapes": (1024, 2048)}
QUICK_COUNTS = {"train": 32, "unlabeled": 64, "val": 16, "test": 32}
# torchvision's ImageNet checkpoints (the V1 weights) by backbone; --weights-dir holds these names
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "wide_resnet50": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    "mobilenetv2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}


def get_args_parser():
    p = argparse.ArgumentParser(
        description="kd-seg: the papers' ablation tables, as a CPU demo on synthetic data (default) "
                    "or a paper's recipe on real data (--recipe).",
        formatter_class=evaluation.HelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), help="a paper's ablation table on real data (see --list)")
    p.add_argument("--dataset", help=f"dataset of the recipe, one of {', '.join(sorted(datasets.DATASETS))} "
                                     "(default: its paper's)")
    p.add_argument("--data-root", help="dataset root (default: data/<dataset>; the demo makes "
                                       "data/synthetic, or data/synthetic_quick with --quick)")
    p.add_argument("--rows", help="comma-separated rows (see --list; default: the setting's)")
    p.add_argument("--seeds", type=int, nargs="+", help="student seeds (default: the setting's: demo and camvid "
                                                        "0-4, recipes 0, --tune 100 101, --curve 0 1 2)")
    p.add_argument("--split", help="evaluation split (default: the setting's, test where it has labels): "
                                   "val to tune a setting without touching its test split")
    p.add_argument("--iters", type=int, help="student iterations (default: the setting's)")
    p.add_argument("--teacher-iters", type=int, help="teacher iterations (default: the setting's)")
    p.add_argument("--out", help="output folder (default: runs/demo, runs/quick, runs/<recipe>, runs/<recipe>_tune, "
                                 "_tuned or _curve, with _smoke after --smoke)")
    p.add_argument("--jobs", type=int, help="trainings run at once (default: at CPU scale one per core with one "
                   "thread each, since tiny models scale better across processes; recipes one at a time)")
    p.add_argument("--dry-run", action="store_true", help="print every command and touch nothing")
    p.add_argument("--quick", action="store_true", help="the demo as a 60 s smoke run")
    p.add_argument("--smoke", action="store_true",
                   help="a recipe with its real models at 2 iterations, 64x64 crops, one seed")
    p.add_argument("--teacher-checkpoint", help="a trained teacher (a train.py checkpoint or a published file): "
                                                "skip the teacher training")
    p.add_argument("--wide-teacher-checkpoint", help="MGD's trained wide teacher")
    p.add_argument("--weights-dir", help="folder of torchvision ImageNet files under their own names "
                   "(resnet101-63fe2227.pth, ...) for an offline machine; default: download and cache")
    p.add_argument("--unlabeled-root", help="unlabeled images for Xie's and Zhu's rows (default: Cityscapes' "
                                            "leftImg8bit/train_extra)")
    p.add_argument("--partition", type=int, metavar="K",
                   help="label partition 1/K of the train split, the rest unlabeled (MGD: 16)")
    p.add_argument("--tune", action="store_true",
                   help="tune the setting (camvid) with one budget for every arm: the baseline's lr, each row's "
                        "loss weights, the partition's labeled fraction, on a held-out drive; writes <out>/tuned.json")
    p.add_argument("--tuned", metavar="FILE", help="run the setting with the values a --tune run chose (its "
                   "tuned.json; the camvid one kd-seg measured: docs/camvid_tuned.json), with compute-matched baselines")
    p.add_argument("--curve", action="store_true",
                   help="train the setting's curve rows (camvid: baseline, best rows, references) for several times "
                        "the table's steps, scored along the way; writes <out>/CURVES.md and curves.png")
    p.add_argument("--list", action="store_true", help="print the rows and recipes and exit")
    p.add_argument("--benchmark", action="store_true",
                   help="print the speed ratios of docs/BENCHMARKS.md (FPS of Xie's pair, cost of the terms, train.py's "
                        "step); with --recipe camvid --data-root CAMVID: the CamVid setting's step and loading")
    return p


# ----------------------------------------------------------------------------- planning
def choose_setting(args):
    """The setting to run (the demo or a recipe) with the command line's changes applied."""
    for name in ("iters", "teacher_iters", "jobs", "partition"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: each seed once, got {args.seeds} (a repeated seed would train "
                         "one run twice into one folder)")
    if args.recipe is None and (args.smoke or args.dataset):
        raise ValueError("--smoke and --dataset go with --recipe (the demo's data is synthetic)")
    if args.recipe is not None and args.quick:
        raise ValueError("--quick is the demo's smoke run; a recipe's is --smoke")
    if (args.tune or args.tuned or args.curve) and "tune" not in RECIPES.get(args.recipe or "", {}):
        raise ValueError(f"--tune, --tuned and --curve go with a setting that declares its tuning: --recipe "
                         f"{', '.join(n for n, r in RECIPES.items() if 'tune' in r)}")
    if args.tune and args.tuned:
        raise ValueError("--tune writes the values that --tuned reads: give one of them")
    setting = json.loads(json.dumps(RECIPES[args.recipe] if args.recipe else DEMO))  # a deep copy
    if args.tuned:
        apply_tuned(setting, args.tuned)
    if args.dataset:
        setting["dataset"] = args.dataset
    for_dataset = setting.get("by_dataset", {}).get(setting["dataset"], {})   # a paper's other dataset
    setting["overrides"].update(for_dataset.get("overrides", {}))
    for flag in for_dataset.get("drop", []):
        setting["flags"] = set_flag(setting["flags"], flag, [])
    if args.partition:
        setting["partition"] = args.partition
    if args.quick:   # the demo's pipeline in a minute: a small copy of the data, 10/20 iterations
        setting.update(iters=10, teacher_iters=20, seeds=[0], fps_size=(128, 128))
    if args.smoke:   # every step with the recipe's real models, as small as they run
        setting.update(iters=2, teacher_iters=2, seeds=[0], fps_size=(64, 64))
        for flag, values in (("--crop-size", ["64", "64"]), ("--batch-size", ["2"]), ("--accumulate", ["1"])):
            setting["flags"] = set_flag(setting["flags"], flag, values)
        setting["eval"] = set_flag(setting["eval"], "--window", [])
        if setting["dataset"] == "camvid":   # the real tree's first 4 images of each split, at 96x128
            setting.update(downscale=[96, 128], downscale_count=4)
    if args.split:
        setting["eval"] = set_flag(setting["eval"], "--split", [args.split])
    for name in ("iters", "teacher_iters", "seeds"):
        if getattr(args, name) is not None:
            setting[name] = getattr(args, name)
    if args.rows:
        setting["rows"] = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in setting["rows"] if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    if "baseline" not in setting["rows"]:
        setting["rows"].insert(0, "baseline")  # every gain is measured against it
    if "partition_baseline" in setting["rows"] and not setting.get("partition_rows"):
        raise ValueError(f"row partition_baseline belongs to a setting with a partition of some rows "
                         f"(camvid); {setting['name']} has none")
    if set(setting["rows"]) & set(setting.get("partition_rows", [])) and "partition_baseline" not in setting["rows"]:
        setting["rows"].append("partition_baseline")   # the partition rows' gains are measured against it
    if any("{wide}" in ROWS[r][2] for r in setting["rows"]) and "wide_teacher" not in setting:
        raise ValueError(f"row mgd needs a wide teacher, which recipe {setting['name']} does not have")
    return setting


def apply_tuned(setting, path):
    """The setting with the values of a --tune run (its tuned.json at `path`): the learning rate,
    every tuned row's train.py flags, the partition's labeled fraction and each row's recorded cost
    (the compute-matched baselines train for it)."""
    try:
        tuned = json.loads(Path(path).read_text())
        lr, rows, partition, costs = tuned["lr"], tuned["rows"], tuned["partition"], tuned["costs"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--tuned {path}: not a tuned.json of kd_seg.py --tune ({type(error).__name__}: "
                         f"{error})") from None
    if tuned.get("setting") != setting["name"]:
        raise ValueError(f"--tuned {path}: tuned for setting {tuned.get('setting')!r}, not {setting['name']!r}")
    setting["flags"] = set_flag(setting["flags"], "--lr", [str(lr)])
    setting["overrides"].update(rows)
    setting.update(partition=partition, costs=costs, tuned=str(path))


def scaled_kd(flags, factor):
    """A row's flags with every --kd weight times `factor`, but Xie's "unlabeled" lambda (a
    relative weight inside the unlabeled loss): the one knob --tune turns per row."""
    terms = [term.split("=") for term in flag_values(flags, "--kd")[0].split(",")]
    weights = ",".join(f"{name}={float(w) * (1 if name == 'unlabeled' else factor):g}" for name, w in terms)
    at = flags.index("--kd")
    return [*flags[:at + 1], weights, *flags[at + 2:]]


def flag_values(flags, flag):
    """The values that follow `flag` in an argv list (up to the next --option); [] if absent."""
    if flag not in flags:
        return []
    start = end = flags.index(flag) + 1
    while end < len(flags) and not flags[end].startswith("--"):
        end += 1
    return flags[start:end]


def set_flag(flags, flag, values):
    """`flags` with `flag` given `values` (replacing its old values; [] removes the flag)."""
    flags = list(flags)
    if flag in flags:
        start = flags.index(flag)
        del flags[start:start + 1 + len(flag_values(flags, flag))]
    return flags + ([flag, *values] if values else [])


def imagenet_weights(model, weights_dir, check):
    """The torchvision ImageNet file of `model`'s backbone: a path in weights_dir, or its URL
    (downloaded once into torch's cache when `check`, so that a machine without internet fails
    here, in one line, before any training starts)."""
    backbone = model.partition("_")[2]
    url = IMAGENET_URLS.get(backbone)
    if url is None:
        raise ValueError(f"no ImageNet checkpoint for backbone {backbone} (known: {', '.join(IMAGENET_URLS)})")
    file_name = url.rsplit("/", 1)[1]
    if weights_dir:
        path = Path(weights_dir) / file_name
        if check and not path.is_file():
            raise FileNotFoundError(f"--weights-dir: {path} not found; download {url} and place it there")
        return str(path)
    if check:
        try:
            torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot download {url} ({type(error).__name__}); offline, place "
                             f"{file_name} in a folder and pass --weights-dir DIR") from None
    return url


def plan(setting, args, out, data_root, check=True):
    """The jobs of a setting: (name, script, argv, needs) in priority order, plus the run folder
    of each (row, seed), the teacher checkpoints, and the in-process steps before them.

    `check` (False for --dry-run) lets the plan read the dataset and fetch ImageNet weights."""
    dataset = setting["dataset"]
    flags = list(setting["flags"])
    if setting["name"] != "demo":
        flags = ["--dataset", dataset] + flags
        if not args.smoke and not setting.get("cpu"):   # on a GPU: decode images in parallel to the step
            flags += ["--workers", str(min(8, os.cpu_count() or 1)), "--channels-last"]
    pre_steps = []            # (description, function, args): done in this process before the jobs
    source_root, data_root = data_root, copy_root(setting, out) or data_root   # the jobs read data_root
    if data_root != source_root:
        height, width = setting["downscale"]
        pre_steps.append((f"a {height}x{width} copy of {source_root}: {data_root}", datasets.make_camvid_small,
                          (str(source_root), str(data_root), (height, width), setting.get("downscale_count"))))
    if setting.get("hold_out"):   # tuning: a drive of the train split held out (datasets.hold_out_sequence)
        pre_steps.append((f"hold out drive {setting['hold_out']} of {data_root}'s train split",
                          datasets.hold_out_sequence, (str(data_root), setting["hold_out"])))
    unlabeled, partition_flags = unlabeled_images(setting, args, out, data_root, source_root, check, pre_steps)
    if partition_flags and not setting.get("partition_rows"):   # every training on the partition, teachers too
        flags += partition_flags
    crop = flag_values(flags, "--crop-size")
    fill = {"{warmup}": [str(max(1, setting["iters"] // 10))],
            "{small_crop}": [str(int(c) // 2) for c in crop],
            "{pseudo}": [str(out / "pseudo_labels")],
            "{wide}": [args.wide_teacher_checkpoint or str(out / "wide_teacher" / "checkpoint.pt")],
            "{unlabeled}": unlabeled}

    def row_flags(row):
        row_flags = setting["overrides"].get(row, setting["overrides"].get(base_row(row), ROWS[base_row(row)][2]))
        if "{unlabeled}" in row_flags and unlabeled is None:
            raise ValueError(f"row {row} needs unlabeled images: give --unlabeled-root DIR (or leave "
                             "the row out with --rows)")
        if base_row(row) in partition_rows(setting):   # a semi-supervised row (or its baseline) on the partition
            row_flags = row_flags + partition_flags
        return [value for flag in row_flags for value in fill.get(flag, [flag])]

    rows = {row: row_flags(row) for row in setting["rows"]}   # every row's inputs exist before anything runs
    iters = {row: setting["iters"] for row in rows}
    for row in setting["rows"] if setting.get("costs") else []:   # the compute-matched baselines
        name = equal_cost_baseline(setting, row)
        rows.setdefault(name, rows[own_baseline(setting, row)])
        iters.setdefault(name, round(setting["iters"] * cost_ratio(setting, row)))

    def training(out_dir, model, iters, seed, extra=()):
        argv = ["--model", model, "--iters", str(iters), "--seed", str(seed), "--data-root", str(data_root),
                "--out", str(out_dir), "--log-every", "50", *flags, *extra]
        argv = [value.replace("{seed}", str(seed)) for value in argv]   # the seed's own partition
        if setting["imagenet"]:
            argv += ["--pretrained", imagenet_weights(model, args.weights_dir, check)]
        return argv

    def evaluation_job(name, checkpoint, json_path, needs):
        argv = ["--checkpoint", str(checkpoint), "--dataset", dataset, "--data-root", str(data_root),
                *setting["eval"], "--workers", "0", "--json", str(json_path)]
        return (f"{name} eval", "eval.py", argv, needs)

    teacher_jobs, teachers = plan_teachers(setting, args, out, fill, training, evaluation_job)
    jobs, run_dirs = plan_students(setting, args, out, rows, iters, teachers["teacher"], training, evaluation_job)
    if check and dataset != "synthetic":   # the root is in the dataset's layout, a given teacher fits it
        classes = datasets.build_dataset(dataset, str(source_root), "train").num_classes
        for given in (args.teacher_checkpoint, args.wide_teacher_checkpoint):
            if given:
                evaluation.load_checkpoint(given, expect_classes=classes)
    return teacher_jobs + jobs, run_dirs, teachers, pre_steps


def unlabeled_images(setting, args, out, data_root, source_root, check, pre_steps):
    """The unlabeled images of a setting, as train.py flags (the folder first): the demo's unlabeled
    split; the rest of a seeded label partition (its writing appended to `pre_steps`); a given
    folder; or None. Also the flags that restrict a training to the partition ([] without one)."""
    dataset = setting["dataset"]
    if setting.get("partition"):
        k, split = setting["partition"], setting.get("train_split", "train")
        lists = out / "partition"
        # one partition per student seed ({seed}: filled in per run), so that the draw's variance is
        # inside the seeds' spread; a teacher trained on the partition uses seed 0's
        labeled_list, unlabeled_list = lists / f"labeled_1-{k}_seed{{seed}}.txt", lists / f"unlabeled_1-{k}_seed{{seed}}.txt"
        if data_root != source_root:   # the copy's layout: its train images in train/
            image_folder = data_root / split
        elif check:
            train_set = datasets.build_dataset(dataset, str(data_root), split)
            image_folder = os.path.commonpath([os.path.dirname(p) for p in train_set.image_paths])
        else:
            image_folder = f"<folder of the {dataset} {split} images>"
        seeds = sorted({0, *setting["seeds"]})
        pre_steps.append((f"write a 1/{k} label partition of the {split} split per seed {seeds}: {labeled_list}, "
                          f"{unlabeled_list}", write_partitions, (dataset, data_root, split, k, lists, seeds)))
        return [str(image_folder), "--unlabeled-subset", str(unlabeled_list)], ["--train-subset", str(labeled_list)]
    if dataset == "synthetic":
        return [str(data_root / "images" / "unlabeled")], []
    if args.unlabeled_root or dataset == "cityscapes":
        return [args.unlabeled_root or str(data_root / "leftImg8bit" / "train_extra")], []
    return None, []


def plan_teachers(setting, args, out, fill, training, evaluation_job):
    """The teacher's jobs (trained unless given), MGD's wide teacher's where a row needs it, each
    one's evaluation, and Zhu et al.'s offline pseudo labels (confidence 0.5) where a row needs them.
    Returns the jobs and {"teacher", "eval", and "wide_teacher", "wide_eval" where needed}: paths."""
    rows = setting["rows"]
    jobs, teachers = [], {}
    teacher = Path(args.teacher_checkpoint) if args.teacher_checkpoint else out / "teacher" / "checkpoint.pt"
    teachers["teacher"] = teacher
    if not args.teacher_checkpoint:
        jobs.append(("teacher", "train.py", training(out / "teacher", setting["teacher"], setting["teacher_iters"], 0), []))
    # a given teacher's folder is not ours: its evaluation is written here
    teachers["eval"] = out / "teacher_eval.json" if args.teacher_checkpoint else out / "teacher" / "eval.json"
    jobs.append(evaluation_job("teacher", teacher, teachers["eval"], [] if args.teacher_checkpoint else ["teacher"]))
    if any("{wide}" in ROWS[base_row(r)][2] for r in rows):   # MGD's second teacher, scored too
        if not args.wide_teacher_checkpoint:
            jobs.append(("wide teacher", "train.py", training(out / "wide_teacher", setting["wide_teacher"],
                                                               setting["teacher_iters"], 0), []))
        teachers["wide_teacher"] = Path(fill["{wide}"][0])
        teachers["wide_eval"] = (out / "wide_teacher_eval.json" if args.wide_teacher_checkpoint
                                 else out / "wide_teacher" / "eval.json")
        jobs.append(evaluation_job("wide teacher", teachers["wide_teacher"], teachers["wide_eval"],
                                   [] if args.wide_teacher_checkpoint else ["wide teacher"]))
    if any("{pseudo}" in ROWS[base_row(r)][2] for r in rows):
        argv = ["--checkpoint", str(teacher), "--dataset", "folder", "--data-root", fill["{unlabeled}"][0],
                "--save-pred", str(out / "pseudo_labels"), "--threshold", "0.5", "--workers", "0",
                "--json", str(out / "pseudo_labels.json")]
        jobs.append(("pseudo labels", "eval.py", argv, [] if args.teacher_checkpoint else ["teacher"]))
    return jobs, teachers


def plan_students(setting, args, out, rows, iters, teacher, training, evaluation_job):
    """The student's training and evaluation per row ({row: its filled train.py flags}, {row: its
    iterations}) and seed; rows with identical flags and iterations share one run. Returns the jobs,
    slowest rows first, and {(row, seed): run folder}."""
    jobs, run_dirs, first_with = [], {}, {}
    for row, extra in rows.items():
        needs = [] if args.teacher_checkpoint else ["teacher"] if "--kd" in extra else []
        if "--kd" in extra:   # online distillation; Zhu's rows use the offline pseudo labels
            extra = extra + ["--teacher-checkpoint", str(teacher)]
        if "{wide}" in ROWS[base_row(row)][2] and not args.wide_teacher_checkpoint:
            needs.append("wide teacher")
        if "--pseudo-labels" in extra:
            needs.append("pseudo labels")
        key = (iters[row], *extra)
        for seed in setting["seeds"]:
            if key in first_with:   # the identical run already exists under an earlier row
                run_dirs[row, seed] = run_dirs[first_with[key], seed]
                continue
            run = out / row / f"seed{seed}"
            run_dirs[row, seed] = run
            jobs.append((f"{row} seed {seed}", "train.py", training(run, setting["student"], iters[row], seed, extra), needs))
            jobs.append(evaluation_job(f"{row} seed {seed}", run / "checkpoint.pt", run / "eval.json",
                                       [f"{row} seed {seed}"]))
        first_with.setdefault(key, row)
    # the slowest rows first (their measured train times), so that no worker idles at the end
    # waiting for one of them; the baselines, which need no teacher, fill the gaps
    slow = ["mgd", "xie_unlabeled", "skd_pi_pa_ho", "fgfi"]
    jobs.sort(key=lambda job: (job[0].startswith("baseline "),
                               slow.index(base_row(job[0].split()[0])) if base_row(job[0].split()[0]) in slow
                               else len(slow)))
    return jobs, run_dirs


def copy_root(setting, out):
    """Where a setting with `downscale` keeps its downscaled copy of the data (inside its --out),
    else None."""
    if not setting.get("downscale"):
        return None
    height, width = setting["downscale"]
    return out / f"{setting['dataset']}_{height}x{width}"


def partition_rows(setting):
    """The rows trained on the labeled partition when only some are (`partition_rows`), with the
    baseline they are measured against; empty otherwise."""
    return set(setting.get("partition_rows", [])) | ({"partition_baseline"} if setting.get("partition_rows") else set())


def write_partitions(dataset, data_root, split, k, folder, seeds):
    """Seeded 1/k label partitions of a split, one per seed, as two image lists each
    (datasets.keep_listed): the first len/k images of a permutation drawn with that seed.
    The official MGD code uses CPS's fixed lists; those can be given to train.py instead."""
    train_set = None
    for seed in seeds:
        if (folder / f"labeled_1-{k}_seed{seed}.txt").is_file():
            continue
        train_set = train_set or datasets.build_dataset(dataset, str(data_root), split)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
        count = max(1, len(order) // k)
        folder.mkdir(parents=True, exist_ok=True)
        for name, indices in ((f"unlabeled_1-{k}_seed{seed}.txt", order[count:]),
                              (f"labeled_1-{k}_seed{seed}.txt", order[:count])):
            lines = [os.path.relpath(train_set.image_paths[i], data_root) for i in sorted(indices)]
            # the labeled list last: "done"
            datasets.write_atomic(folder / name, "".join(line + "\n" for line in lines))


def command_line(script, argv, env=None):
    """The shell command of a job; `env` (job_environment) in front, so that a rerun from a shell
    runs as the job did."""
    return " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), "python", script, *map(shlex.quote, argv)])


def job_environment(cpu_scale):
    """What a CPU-scale job runs with beyond its command line (worker_pool sets it for the
    workers): one thread and, on x86-64, REPRODUCIBLE_CPU. Empty otherwise."""
    if not cpu_scale:
        return {}
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return {**(REPRODUCIBLE_CPU if x86 else {}), "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- running jobs
def end_with_parent(parent):
    """Pool workers exit when kd_seg.py (pid `parent`) does, even after a kill -9 of it: a thread
    watches for its death (the worker is then adopted by another process) and ends the worker."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def kernels():
    """What this process runs on, for the report."""
    return (f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
            f"thread(s), ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")


@contextlib.contextmanager
def worker_pool(workers, reproducible):
    """A pool of fresh interpreters (spawn: no forked torch state) that end with kd_seg.py; at
    CPU scale with job_environment's variables, which the workers' torch reads when it starts
    (this process gets its own environment back afterwards: its FPS runs on the machine's own
    kernels and threads)."""
    saved = dict(os.environ)
    os.environ.update(job_environment(reproducible))
    try:
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
            yield pool
    finally:
        os.environ.clear()
        os.environ.update(saved)


def job_done(script, argv):
    """A finished job: a training whose checkpoint reached its iterations, an evaluation whose
    --json exists."""
    if script == "eval.py":
        return Path(flag_values(argv, "--json")[0]).is_file()
    checkpoint = Path(flag_values(argv, "--out")[0]) / "checkpoint.pt"
    return checkpoint.exists() and finished_step(checkpoint.parent) >= int(flag_values(argv, "--iters")[0])


def run_job(script, argv, log_path):
    """One train.py / eval.py command line, run in this worker process with its output in
    `log_path`. A finished job (`job_done`) is reused; an interrupted training resumes. Returns
    the job's result."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        if script == "eval.py":
            args = evaluation.get_args_parser().parse_args(argv)
            if not job_done(script, argv):
                evaluation.main(args)
            return json.loads(Path(args.json).read_text())
        args = train.get_args_parser().parse_args(argv)
        out = Path(args.out)
        if job_done(script, argv):
            return str(out)
        if (out / "checkpoint.pt").exists():
            args.resume = True
        elif out.exists():   # started but never checkpointed: ours, start again
            for f in out.iterdir():
                f.unlink()
        start = time.perf_counter()
        train.train(args)
        if not args.resume:   # a whole training: its wall time is a result (Zhu's fast schedule)
            (out / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
        return str(out)


def finished_step(run_dir):
    return evaluation.load_checkpoint_dict(Path(run_dir) / "checkpoint.pt")["step"]   # weights_only


def run_all(jobs, workers, out, reproducible=False):
    """Run jobs in a process pool, each as soon as the jobs it needs have finished, printing
    progress with an ETA. Returns {name: result}; a failed job stops the run with its message."""
    results, running, todo = {}, {}, list(jobs)
    # the ETA: a training's expected cost is its iterations (a job already done: 0), an evaluation's
    # one unit; each kind's seconds per unit come from its own finished jobs (not from the other kind:
    # the teachers' evaluations run first and would make 600 iterations look like 600 evaluations)
    work = {name: 0 if job_done(script, argv) else int(flag_values(argv, "--iters")[0]) if script == "train.py"
            else 1 for name, script, argv, _ in jobs}
    script_of = {name: script for name, script, _, _ in jobs}
    spent = {"train.py": [0.0, 0], "eval.py": [0.0, 0]}   # seconds and units of finished, run jobs
    start = time.perf_counter()
    with worker_pool(workers, reproducible) as pool:
        job_kernels = pool.submit(kernels).result()
        while todo or running:
            for job in [job for job in todo if set(job[3]) <= results.keys()][:workers - len(running)]:
                todo.remove(job)
                name, script, argv, _ = job
                log = out / (name.replace(" ", "_").replace("/", "_") + ".log")
                running[pool.submit(run_job, script, argv, log)] = (name, log, time.perf_counter())
            if not running:
                raise ValueError(f"jobs {[job[0] for job in todo]} need jobs that are not in the list")
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                name, log, began = running.pop(future)
                try:
                    results[name] = future.result()
                except Exception as error:
                    for other in running:
                        other.cancel()
                    raise ValueError(f"job '{name}' failed: {evaluation.one_line(error)} (log: {log})") from None
                if work[name]:
                    spent[script_of[name]][0] += time.perf_counter() - began
                    spent[script_of[name]][1] += work[name]
                print(f"{len(results)}/{len(jobs)} | {name} done | elapsed "
                      f"{evaluation.format_eta(time.perf_counter() - start)} | eta "
                      f"{expected_rest(work, script_of, results, spent, workers)}", flush=True)
    results["kernels"] = job_kernels
    return results


def expected_rest(work, script_of, results, spent, workers):
    """The ETA of the jobs not yet finished: their units at their kind's measured seconds per unit,
    shared by the workers; '?' until a job of each kind that is left has finished."""
    rest = {}
    for name, units in work.items():
        if name not in results:
            rest[script_of[name]] = rest.get(script_of[name], 0) + units
    if any(units and not spent[script][1] for script, units in rest.items()):
        return "?"
    seconds = sum(units * spent[script][0] / spent[script][1] for script, units in rest.items() if units)
    return evaluation.format_eta(seconds / workers)


# ----------------------------------------------------------------------------- results
def machine_line():
    return f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}"


# Two-sided 95% quantiles of Student's t distribution for 1..30 degrees of freedom (beyond 30
# the normal quantile 1.96 is within 4%): the paired t test of the verdicts.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def gain_interval(gains):
    """Mean paired gain over the baseline and the half-width of its 95% confidence interval
    (paired t test, n - 1 degrees of freedom); None for the width with a single seed."""
    mean = statistics.mean(gains)
    if len(gains) < 2:
        return mean, None
    t = T_975[len(gains) - 2] if len(gains) - 1 <= len(T_975) else 1.96
    return mean, t * statistics.stdev(gains) / math.sqrt(len(gains))


def t_test_p(gains):
    """Two-sided p of the paired t test of `gains` (H0: mean 0; n - 1 degrees of freedom): one
    minus twice the integral of Student's t density from 0 to |t|. Substituting u = sqrt(df) tan(a)
    turns the density into sqrt(df) * scale * cos(a)^(df - 1) on [0, atan(|t| / sqrt(df))], smooth
    for any t (tested: p = 0.05 at every tabulated 95% quantile to 1e-6, p < 1e-12 at t = 4e6).
    1.0 with a single seed."""
    n = len(gains)
    if n < 2:
        return 1.0
    mean, sd = statistics.mean(gains), statistics.stdev(gains)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t, df = abs(mean) / (sd / math.sqrt(n)), n - 1
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    panels, end = 2000, math.atan(t / math.sqrt(df))
    h = end / panels
    density = [math.sqrt(df) * scale * math.cos(i * h) ** (df - 1) for i in range(panels + 1)]
    area = h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2]))
    return max(0.0, 1 - 2 * area)


def holm(p_values):
    """Holm's step-down adjustment of a family of p values (same order): the k-th smallest times
    (m - k + 1), kept monotone, capped at 1. A comparison is called at 95% family-wise when its
    adjusted p is below 0.05: the chance of any false call in the whole table is then at most 5%."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(mean_gain, adjusted_p, n):
    """'better' / 'worse' when the family-wise adjusted p is below 0.05, else 'inconclusive' (not
    'no effect': a test that fails to reject shows no equivalence)."""
    if n < 2:
        return "n/a (1 seed)"
    if adjusted_p >= 0.05 or mean_gain == 0:
        return "inconclusive"
    return "better" if mean_gain > 0 else "worse"


def format_results(rows, with_reported):
    """The table: iteration-matched gains (and, where the setting has recorded costs, gains against
    the student trained alone for the row's cost), each with its 95% interval, its own p and the
    verdict from the family-wise (Holm) p; gap closed; costs as deployed; train seconds."""
    equal_cost = any(r.get("eq") for r in rows)
    head = ("| row | paper | adds | params (M) | GMACs | mIoU | gain [95% CI] | p (Holm) | verdict | gap closed "
            "| detectable |")
    rule = "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"
    if equal_cost:
        head += " cost (x) | time (x) | gain at equal cost [95% CI] | p (Holm) | verdict at equal cost |"
        rule += "---:|---:|---:|---:|---|"
    head, rule = head + " FPS | train (s) |", rule + "---:|---:|"
    if with_reported:
        head, rule = head + " paper's mIoU |", rule + "---:|"

    def gain_cells(comparison):
        if comparison is None:
            return ["", "", ""]
        gain, ci = comparison["gain"], comparison["ci"]
        text = f"{gain:+.1f}" + (f" [{gain - ci:+.1f}, {gain + ci:+.1f}]" if ci is not None else "")
        return [text, f"{comparison['p']:.3f} ({comparison['p_holm']:.3f})", comparison["verdict"]]
    lines = [head, rule]
    for r in rows:
        miou = f"{r['mean']:.1f} ± {r['std']:.1f}" if r["n"] > 1 else f"{r['mean']:.1f}"
        main = r.get("main")
        cells = [r["name"], r["paper"], r["adds"], f"{r['params_m']:.2f}", f"{r['gmacs']:.3f}", miou,
                 *gain_cells(main), f"{main['gap']:.2f}" if main and main.get("gap") is not None else "",
                 f"{main['ci']:.1f}" if main and main["ci"] is not None else ""]
        if equal_cost:
            cells += [f"{r['cost']:g}" if "cost" in r else "", r.get("time_ratio", ""), *gain_cells(r.get("eq"))]
        cells += [f"{r['fps']:.1f}", str(r["train_s"])]
        if with_reported:
            cells.append(str(r["reported"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison(values, base, teacher=None, runs=()):
    """A row's seeds against its baseline's (same seeds): mean paired gain, its 95% half-width, p,
    and the gap closed toward `teacher`'s mIoU, (S_row - S_base) / (S_teacher - S_base); `runs`
    names the runs compared (one comparison of the table's family however many rows share them)."""
    gains = [v - b for v, b in zip(values, base)]
    gain, ci = gain_interval(gains)
    gap = gain / (teacher - statistics.mean(base)) if teacher is not None and teacher != statistics.mean(base) else None
    return {"gain": gain, "ci": ci, "p": t_test_p(gains), "n": len(gains), "gap": gap, "runs": runs}


def result_rows(setting, out, run_dirs, teachers, fps_size, quick, cost_threads):
    """The table's rows: the evaluation split's mIoU of every run (mean, spread), the paired gain over
    its baseline and, with recorded costs, over the baseline trained for the row's cost, each with
    its 95% interval, p and the verdict from Holm's adjustment over every comparison of the table;
    the teachers' and the student's costs as deployed, train seconds, the paper's number."""
    def miou(json_path):
        return 100 * json.loads(Path(json_path).read_text())["metrics"]["miou"]

    def scores(row):
        return [miou(run_dirs[row, s] / "eval.json") for s in seeds]

    def runs_of(row, baseline):   # what a comparison compares: the runs of both sides
        return tuple(str(run_dirs[name, s]) for name in (row, baseline) for s in seeds)

    seeds, reported = setting["seeds"], setting["reported"]
    teacher_cost = cost_of(teachers["teacher"], fps_size, quick, cost_threads, out / "teacher_cost.json")
    student_cost = cost_of(run_dirs["baseline", seeds[0]] / "checkpoint.pt", fps_size, quick, cost_threads,
                           out / "student_cost.json")
    teacher_miou = miou(teachers["eval"])
    rows = [{"name": "teacher", "paper": "-", "adds": setting["teacher"], "mean": teacher_miou,
             "std": 0.0, "n": 1, **teacher_cost,
             "train_s": train_seconds([teachers["teacher"].parent]), "reported": reported.get("teacher", "")}]
    if "wide_eval" in teachers:   # MGD's second, structurally different teacher
        wide_cost = cost_of(teachers["wide_teacher"], fps_size, quick, cost_threads, out / "wide_teacher_cost.json")
        rows.append({"name": "wide teacher", "paper": "-", "adds": setting["wide_teacher"],
                     "mean": miou(teachers["wide_eval"]), "std": 0.0, "n": 1, **wide_cost,
                     "train_s": train_seconds([teachers["wide_teacher"].parent]), "reported": ""})
    base_seconds = {}
    for row in setting["rows"]:
        baseline = own_baseline(setting, row)
        values = scores(row)
        entry = {"name": row, "paper": ROWS[base_row(row)][0], "adds": ROWS[base_row(row)][1], "values": values,
                 "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                 "n": len(values), **student_cost, "train_s": train_seconds([run_dirs[row, s] for s in seeds]),
                 "reported": reported.get(row, "")}
        seconds = mean_train_seconds([run_dirs[row, s] for s in seeds])
        if row == baseline:
            base_seconds[row] = seconds
        else:
            entry["main"] = comparison(values, scores(baseline), teacher_miou, runs_of(row, baseline))
            if setting.get("costs"):   # the measured wall-time ratio beside the recorded cost
                entry["cost"] = cost_ratio(setting, row)
                matched = equal_cost_baseline(setting, row)
                entry["eq"] = comparison(values, scores(matched), runs=runs_of(row, matched))
                if seconds and base_seconds.get(baseline):
                    entry["time_ratio"] = f"{seconds / base_seconds[baseline]:.2f}"
        rows.append(entry)
    # the family: every distinct comparison of the table (rows that share their runs, such as
    # xie_lp, skd_pi and hinton at CPU scale, are one comparison, counted once)
    family = {}
    for r in rows:
        for key in ("main", "eq"):
            if r.get(key):
                family.setdefault(r[key]["runs"], []).append(r[key])
    for same, adjusted in zip(family.values(), holm([same[0]["p"] for same in family.values()])):
        for c in same:
            c["p_holm"], c["verdict"] = adjusted, verdict(c["gain"], adjusted, c["n"])
    return rows


def base_row(name):
    """The ROWS entry of a run name: 'baseline@x2.5' (a baseline trained for 2.5 times the steps)
    and the tuning runs' 'cwd@w0.3' are variants of 'baseline' and 'cwd'."""
    return name.split("@")[0]


def own_baseline(setting, row):
    """The baseline a row is measured against: on the labeled partition for the partition rows."""
    return "partition_baseline" if base_row(row) in partition_rows(setting) else "baseline"


def cost_ratio(setting, row):
    """The row's training cost in baseline trainings, as recorded in the setting (1 if none)."""
    return setting.get("costs", {}).get(base_row(row), 1.0)


def equal_cost_baseline(setting, row):
    """The run of the student trained alone for as long as `row` costs: its baseline with the steps
    multiplied by the recorded cost ratio (the same learning-rate schedule, stretched)."""
    ratio = cost_ratio(setting, row)
    return own_baseline(setting, row) if ratio == 1 else f"{own_baseline(setting, row)}@x{ratio:g}"


def mean_train_seconds(run_dirs):
    """Mean wall time of the runs' trainings, one process each (None if any was resumed)."""
    files = [Path(d) / "train_seconds.txt" for d in run_dirs]
    if not all(f.exists() for f in files):
        return None
    return statistics.mean(float(f.read_text()) for f in files)


def train_seconds(run_dirs):
    """mean_train_seconds for the table: whole seconds, "" if unknown."""
    seconds = mean_train_seconds(run_dirs)
    return "" if seconds is None else f"{seconds:.0f}"


def cost_of(checkpoint, fps_size, quick, threads, json_path):
    """Params, GMACs and FPS of a trained model as deployed (eval.py --fps, docs/DATASETS.md protocol),
    measured here after every training so that nothing else runs beside it. Cached in json_path."""
    argv = ["--checkpoint", str(checkpoint), "--fps", "--fps-size", *map(str, fps_size),
            "--json", str(json_path)] + (["--fps-iters", "5", "--fps-seconds", "0.5"] if quick else [])
    if threads:
        argv += ["--threads", str(threads)]
    if not Path(json_path).is_file():
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            evaluation.main(evaluation.get_args_parser().parse_args(argv))
    result = json.loads(Path(json_path).read_text())
    return {"params_m": result["params_m"], "gmacs": result["gmacs"], "fps": result["fps"]["fps"]}


def picture_grid(checkpoints, dataset, path, count=6, width=160, header=16):
    """Rows of evaluation images: image, ground truth, then each model's prediction (seed 0), under
    a header that names every column in the picture itself. Returns the column names."""
    nets = [(name, evaluation.load_checkpoint(c)[0]) for name, c in checkpoints]
    names = ["image", "ground truth"] + [name for name, _ in nets]
    count = min(count, len(dataset))
    image0 = Image.open(dataset.image_paths[0])
    size = (width, max(1, round(width * image0.height / image0.width)))
    grid = Image.new("RGB", (len(names) * (size[0] + 4), header + count * (size[1] + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(names):
        draw.text((col * (size[0] + 4) + 2, 2), name, fill="black")
    for row in range(count):
        image, label = dataset[row]
        pictures = [Image.open(dataset.image_paths[row]).convert("RGB").resize(size, Image.BILINEAR),
                    datasets.colorize(label.numpy(), dataset.palette)]
        for _, net in nets:
            with torch.inference_mode():
                pred = evaluation.predict(net, image[None], label.shape)[0].argmax(0)
            pictures.append(datasets.colorize(pred.numpy(), dataset.palette))
        for col, pic in enumerate(pictures):
            grid.paste(pic.resize(size, Image.NEAREST), (col * (size[0] + 4), header + row * (size[1] + 4)))
    datasets.save_png(path, grid)
    return names


# ----------------------------------------------------------------------------- the run
def prepare(args):
    """The setting of the command line, its output folder and data root, whether its jobs run at
    CPU scale, how many at once; published teachers found beside the data."""
    setting = choose_setting(args)
    name = setting["name"]
    kind = "_tune" if args.tune else "_curve" if args.curve else "_tuned" if args.tuned else ""
    default_out = "runs/quick" if args.quick else f"runs/{name}{kind}_smoke" if args.smoke else f"runs/{name}{kind}"
    out = Path(args.out or default_out)
    dataset = setting["dataset"]
    data_root = Path(args.data_root or ("data/synthetic_quick" if args.quick else f"data/{dataset}"))
    # at CPU scale (the demo, the camvid setting, a smoke run) one job per core with one thread
    # each: small models scale better across processes than across threads; on a GPU one at a time
    cpu_scale = name == "demo" or args.smoke or setting.get("cpu", False)
    jobs_at_once = args.jobs or ((os.cpu_count() or 1) if cpu_scale else 1)
    for role, relative in setting.get("teacher_files", {}).items():   # published teachers beside the data
        option = f"{role}_checkpoint"
        if getattr(args, option) is None:
            setattr(args, option, str(data_root.parent / relative))
            if not args.dry_run and not Path(getattr(args, option)).is_file():
                raise FileNotFoundError(
                    f"{getattr(args, option)}: the {role.replace('_', ' ')} of recipe {name} not found; it is SKD's "
                    f"published {Path(relative).name} ({SKD_CAMVID_SOURCE}), expected beside --data-root "
                    f"(data/skd_camvid for data/camvid), or give --{option.replace('_', '-')} FILE")
    if name != "demo" and not args.dry_run and not Path(data_root).is_dir():
        raise FileNotFoundError(f"--data-root: {data_root} not found (expected the {dataset} layout of docs/DATASETS.md)")
    return setting, out, data_root, cpu_scale, jobs_at_once


def run(args):
    """The demo (no --recipe) or a paper's recipe: plan, run every job, print and write the table."""
    setting, out, data_root, cpu_scale, jobs_at_once = prepare(args)
    demo = setting["name"] == "demo"
    if args.dry_run:
        if demo:
            print(f"# make the synthetic data if missing: python -c \"import datasets; "
                  f"datasets.make_synthetic('{data_root}'{', counts=kd_seg.QUICK_COUNTS' if args.quick else ''})\"")
        print_plan(setting, args, out, data_root, cpu_scale)
        print(f"# then: params, GMACs and FPS of the teacher and student (eval.py --fps), the table "
              f"and {out / 'REPORT.md'}")
        return None
    jobs, run_dirs, teachers, pre_steps = plan(setting, args, out, data_root)   # may fail: before any write
    with evaluation.lock_output_dir(out):   # one kd_seg.py per output folder
        return execute(setting, args, out, data_root, jobs, run_dirs, teachers, pre_steps,
                       cpu_scale, jobs_at_once)


def print_plan(setting, args, out, data_root, cpu_scale):
    """--dry-run: the steps and every job's command line, touching nothing."""
    jobs, _, _, pre_steps = plan(setting, args, out, data_root, check=False)
    for description, _, _ in pre_steps:
        print(f"# {description}")
    for job_name, script, argv, needs in jobs:
        print(f"# {job_name}" + (f" (after: {', '.join(needs)})" if needs else ""))
        print(command_line(script, argv, job_environment(cpu_scale)))


def execute(setting, args, out, data_root, jobs, run_dirs, teachers, pre_steps, cpu_scale, jobs_at_once):
    """Run a planned setting (see `run`) and write its table and report."""
    name, dataset, demo = setting["name"], setting["dataset"], setting["name"] == "demo"
    start = time.perf_counter()
    command = " ".join(["python", "kd_seg.py", *sys.argv[1:]])
    # a rerun reuses finished trainings, so it must be the same schedule on the same data
    # and scored on the same split: a val run never passes its numbers off as the test table
    evaluation.claim_output_dir(out, {"setting": name, "dataset": dataset, "data_root": str(data_root),
                                      "iters": setting["iters"], "teacher_iters": setting["teacher_iters"],
                                      "split": flag_values(setting["eval"], "--split")[0],
                                      "tuned": setting.get("tuned", "")})
    if demo:   # no-op when already complete; --quick makes a small copy that fits its minute
        datasets.make_synthetic(data_root, counts=QUICK_COUNTS if args.quick else None)
    for _, function, function_args in pre_steps:
        function(*function_args)
    env = job_environment(cpu_scale)
    (out / "commands.sh").write_text("".join(command_line(script, argv, env) + "\n" for _, script, argv, _ in jobs))
    for row, seed in run_dirs:
        run_dirs[row, seed].parent.mkdir(parents=True, exist_ok=True)
    results = run_all(jobs, jobs_at_once, out, reproducible=cpu_scale)
    data_root = copy_root(setting, out) or data_root   # what the jobs read and were scored on

    fps_size = setting.get("fps_size") or FPS_SIZE.get(dataset, (512, 512))
    table_rows = result_rows(setting, out, run_dirs, teachers, fps_size, quick=args.quick or args.smoke,
                             cost_threads=os.cpu_count() if cpu_scale else None)
    seeds = setting["seeds"]
    table = format_results(table_rows, bool(setting["reported"]))
    smoke_note = (["A smoke run (--quick / --smoke): its numbers test the pipeline, not the methods."]
                  if args.quick or args.smoke else [])
    print("\n".join([table, *smoke_note]))

    split = flag_values(setting["eval"], "--split")[0]
    eval_set = datasets.build_dataset(dataset, str(data_root), split)
    # image, ground truth, teacher, baseline and the student of the row with the largest mean gain
    best = max((r for r in table_rows if r.get("main")), key=lambda r: r["main"]["gain"], default=None)
    shown = [("teacher", teachers["teacher"]), ("baseline", run_dirs["baseline", seeds[0]] / "checkpoint.pt")]
    if best is not None:
        shown.append((f"best: {best['name']}", run_dirs[best["name"], seeds[0]] / "checkpoint.pt"))
    columns = picture_grid(shown, eval_set, out / "predictions.png", count=2 if args.smoke else 6)
    elapsed = time.perf_counter() - start
    machine = f"{machine_line()}, {jobs_at_once} parallel job(s); each job: {results['kernels']}"
    report = [f"# kd-seg {name} report", "", f"Command: `{command}`  ", f"Machine: {machine}  ",
              f"Date: {time.strftime('%Y-%m-%d %H:%M')}; wall time {evaluation.format_eta(elapsed)}  ",
              f"Setting: {setting['paper']}; dataset {dataset}; teacher {setting['teacher']} "
              f"{setting['teacher_iters']} iterations; student {setting['student']} {setting['iters']} "
              f"iterations; seeds {seeds}; {split} split, last checkpoint.", "",
              *[f"**{note}**\n" for note in smoke_note], table, "",
              "Gain: mean paired difference to the baseline over the same seeds, with its 95% "
              "confidence interval (paired t test) and p; p (Holm): adjusted over every comparison of "
              "the table (both gain columns where there are two); 'better' or 'worse' when the adjusted "
              "p is below 0.05 (at most a 5% chance of any false call in the table), 'inconclusive' "
              "otherwise; gap closed: the gain over (teacher - baseline); detectable: the interval's "
              "half-width. With recorded costs (--tuned): cost, the row's training in baseline trainings "
              "(tuned.json), time, the measured wall-time ratio, and the gain against the baseline "
              f"trained that long. Params, GMACs and FPS at {fps_size[0]}x{fps_size[1]}: the "
              f"models as deployed (no auxiliary head), batch 1; FPS in kd_seg.py's own process "
              f"({kernels()}).", "",
              "![predictions](predictions.png)  ", f"Columns: {', '.join(columns)}.", ""]
    diagnostics = None
    if demo and "pseudo labels" in results:   # the unlabeled split's labels are held back on disk
        diagnostics = evaluation.pseudo_label_diagnostics(
            out / "pseudo_labels", datasets.build_dataset("synthetic", data_root, "unlabeled"))
        evaluation.plot_diagnostics(diagnostics, out / "pseudo_label_diagnostics.png")
        report += ["## Pseudo labels (teacher, unlabeled split, held-back labels)", "",
                   "| threshold | mIoU | precision | coverage |", "|---:|---:|---:|---:|"]
        report += [f"| {d['threshold']:.2f} | {100 * d['miou']:.1f} | {100 * d['precision']:.1f} | "
                   f"{100 * d['coverage']:.1f} |" for d in diagnostics]
        report += ["", "![pseudo-label diagnostics](pseudo_label_diagnostics.png)", ""]
    report += ["## Commands", "", "```", *[command_line(s, a, env) for _, s, a, _ in jobs], "```", ""]
    datasets.write_atomic(out / "REPORT.md", "\n".join(report))
    datasets.write_atomic(out / "results.json", json.dumps({"rows": table_rows, "diagnostics": diagnostics}, indent=1))
    print(f"wrote {out / 'REPORT.md'} | total {evaluation.format_eta(elapsed)}")
    return table_rows


# ----------------------------------------------------------------------------- tuning
DATA_LIMITED = 3.0   # mIoU points below the full-data baseline that make a partition "data-limited"


def tune(args):
    """`--tune`: one declared budget for every arm (setting["tune"]), on a drive held out of the
    train split. Stage 1: the baseline's learning rate, and the partition baselines of each labeled
    fraction; stage 2, at the chosen rate and fraction: each row's loss weights (one multiplier).
    Writes <out>/tuned.json (what `--tuned` reads: the values, every score, each row's cost as the
    mean train seconds of its chosen runs over the chosen baseline's) and <out>/TUNE.md."""
    setting, out, data_root, cpu_scale, jobs_at_once = prepare(args)
    spec, name = setting["tune"], setting["name"]
    grids = {key: spec[key][:2] if args.smoke else spec[key] for key in ("lr", "multipliers", "partitions")}
    seeds = args.seeds or spec["seeds"][:1 if args.smoke else None]
    train_split, split = f"train_without_{spec['sequence']}", f"heldout_{spec['sequence']}"
    base = {**setting, "seeds": seeds, "train_split": train_split, "hold_out": spec["sequence"],
            "flags": set_flag(setting["flags"], "--train-split", [train_split]),
            "eval": set_flag(setting["eval"], "--split", [split])}
    default_lr = float(flag_values(setting["flags"], "--lr")[0])
    lr_rows = {f"baseline@lr{v:g}": ["--lr", f"{v:g}"] for v in sorted({default_lr, *grids["lr"]})}
    stage1 = [{**base, "rows": list(lr_rows), "overrides": {**setting["overrides"], **lr_rows}}]
    stage1 += [{**base, "partition": k, "rows": [f"partition_baseline@k{k}"]} for k in grids["partitions"]]
    arms, untuned = {}, []   # rows with the same flags are one arm (xie_lp, skd_pi and hinton at CPU scale)
    for row in setting["rows"]:
        flags = setting["overrides"].get(row, ROWS[row][2])
        if row in ("baseline", "partition_baseline"):
            continue
        if "--kd" not in flags:
            untuned.append(row)   # Zhu's rows: no loss weight
            continue
        arms.setdefault(tuple(flags), []).append(row)
    if args.dry_run:
        for stage in stage1:
            print_plan(stage, args, out, data_root, cpu_scale)
        print(f"# then, at the chosen lr and fraction, each arm at its weights x {grids['multipliers']}: "
              f"{', '.join('/'.join(rows) for rows in arms.values())}; untuned: {', '.join(untuned) or 'none'}")
        return None
    with evaluation.lock_output_dir(out):
        evaluation.claim_output_dir(out, {"tune": name, "data_root": str(data_root), "iters": setting["iters"],
                                          "split": split, "seeds": seeds})
        start = time.perf_counter()
        scores, seconds = {}, {}
        run_stage(stage1, args, out, data_root, cpu_scale, jobs_at_once, scores, seconds)
        lr = max(lr_rows, key=lambda r: statistics.mean(scores[r]))
        full = statistics.mean(scores[f"baseline@lr{default_lr:g}"])
        limited = [k for k in sorted(grids["partitions"])
                   if statistics.mean(scores[f"partition_baseline@k{k}"]) <= full - DATA_LIMITED]
        partition = limited[0] if limited else max(grids["partitions"])
        weighted = {f"{rows[0]}@w{m:g}": scaled_kd(list(flags), m) for flags, rows in arms.items()
                    for m in grids["multipliers"]}
        stage2 = {**base, "partition": partition, "rows": list(weighted),
                  "overrides": {**setting["overrides"], **weighted},
                  "flags": set_flag(base["flags"], "--lr", lr_rows[lr][1:])}
        run_stage([stage2], args, out, data_root, cpu_scale, jobs_at_once, scores, seconds)
        chosen = {rows[0]: max((r for r in weighted if base_row(r) == rows[0]), key=lambda r: statistics.mean(scores[r]))
                  for rows in arms.values()}
        # a baseline training's cost: the mean over every learning rate's runs (the rate does not
        # change a step's cost; the first runs also paid for the pool's start beside the teachers' scoring)
        timed = [seconds[row] for row in lr_rows if row in seconds]
        base_s = statistics.mean(timed) if timed else None
        tuned = {"setting": name, "command": " ".join(["python", "kd_seg.py", *sys.argv[1:]]),
                 "date": time.strftime("%Y-%m-%d"), "machine": machine_line(), "split": split,
                 "train_split": train_split, "seeds": seeds, "iters": setting["iters"], "lr": float(lr_rows[lr][1]),
                 "partition": partition, "data_limited": DATA_LIMITED, "data_limited_found": bool(limited),
                 "rows": {row: weighted[chosen[rows[0]]] for rows in arms.values() for row in rows},
                 "multipliers": {row: float(chosen[rows[0]].split("@w")[1]) for rows in arms.values() for row in rows},
                 # the cost in baseline trainings, to a quarter; a row not measured (Zhu's: the same
                 # steps on the same student, its pseudo labels made once) costs 1
                 "costs": {row: cost for rows in arms.values() for row, cost in
                           [(row, arm_cost(rows[0], weighted, seconds, base_s)) for row in rows]},
                 "untuned": untuned, "scores": scores, "seconds": seconds,
                 "wall_seconds": round(time.perf_counter() - start)}
        datasets.write_atomic(out / "tuned.json", json.dumps(tuned, indent=1) + "\n")
        datasets.write_atomic(out / "TUNE.md", tune_report(tuned, lr_rows, weighted))
    print(tune_report(tuned, lr_rows, weighted))
    print(f"wrote {out / 'tuned.json'}: run the table with --tuned {out / 'tuned.json'}")
    return tuned


def arm_cost(arm, weighted, seconds, base_s):
    """An arm's training cost in baseline trainings, to a quarter (at least 1): the mean train
    seconds of all its runs (a loss weight does not change a step's cost) over a baseline training's
    (`base_s`). A partition row is a step of the same student on the same batch as the baseline's."""
    runs = [r for r in weighted if base_row(r) == arm]
    missing = [r for r in runs if r not in seconds] + ([] if base_s else ["the baseline's runs"])
    if missing:
        raise ValueError(f"no train seconds for {', '.join(missing)} (resumed runs are not timed): remove "
                         "those run folders and rerun --tune to time them")
    return max(1.0, round(4 * statistics.mean(seconds[r] for r in runs) / base_s) / 4)


def run_stage(stages, args, out, data_root, cpu_scale, jobs_at_once, scores, seconds):
    """Plan and run the jobs of several settings as one (shared jobs once); add each run's
    per-seed scores and mean train seconds to `scores` and `seconds`. Returns {(row, seed): run folder}."""
    jobs, steps, run_dirs = {}, {}, {}
    for stage in stages:
        stage_jobs, stage_dirs, _, pre_steps = plan(stage, args, out, data_root)
        jobs.update({job[0]: job for job in stage_jobs})
        steps.update({description: (function, function_args) for description, function, function_args in pre_steps})
        run_dirs.update({key: (stage, d) for key, d in stage_dirs.items()})
    for function, function_args in steps.values():
        function(*function_args)
    run_all(list(jobs.values()), jobs_at_once, out, reproducible=cpu_scale)
    for (row, seed), (stage, run_dir) in run_dirs.items():
        scores.setdefault(row, []).append(100 * json.loads((run_dir / "eval.json").read_text())["metrics"]["miou"])
    for row in {row for row, _ in run_dirs}:
        mean_s = mean_train_seconds([d for (r, _), (_, d) in run_dirs.items() if r == row])
        if mean_s:
            seconds[row] = round(mean_s, 1)
    return {key: run_dir for key, (_, run_dir) in run_dirs.items()}


def tune_report(tuned, lr_rows, weighted):
    """TUNE.md: every value tried with its mean score over the tuning seeds, and what was chosen."""
    lines = [f"# kd-seg {tuned['setting']} tuning", "", f"Command: `{tuned['command']}`  ",
             f"Machine: {tuned['machine']}; date {tuned['date']}; wall time "
             f"{evaluation.format_eta(tuned['wall_seconds'])}  ",
             f"Trained on {tuned['train_split']}, scored on {tuned['split']} (mIoU, mean over seeds "
             f"{tuned['seeds']}); {tuned['iters']} iterations.", "",
             "| run | mIoU per seed | mean | train (s) |", "|---|---|---:|---:|"]
    for row, values in tuned["scores"].items():
        lines.append(f"| {row} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.mean(values):.1f} | "
                     f"{tuned['seconds'].get(row, '')} |")
    why = (f"the largest whose partition baseline is {tuned['data_limited']:g} points below the full-data "
           "baseline" if tuned["data_limited_found"] else f"no fraction tried was {tuned['data_limited']:g} "
           "points below the full-data baseline (not data-limited at these steps): the smallest tried")
    lines += ["", f"Chosen: lr {tuned['lr']:g}; labeled fraction 1/{tuned['partition']} ({why})."]
    lines += [f"- {row}: x{tuned['multipliers'][row]:g} (`{' '.join(tuned['rows'][row])}`), cost "
              f"{tuned['costs'][row]:g}x the baseline's training (the mean train seconds of its arm's runs over "
              "the mean of every baseline run's, to a quarter)" for row in tuned["rows"]]
    lines += [f"- {row}: not tuned (no loss weight), cost 1" for row in tuned["untuned"]]
    return "\n".join(lines) + "\n"


def curve(args):
    """`--curve`: the setting's curve rows (setting["curve"]; with --tuned at the tuned values) trained
    for `iters` steps, each scored on the evaluation split every `every` steps (train.py
    --eval-every), at least three seeds. Writes <out>/CURVES.md (mIoU per row and step, mean and
    spread; the gain over the baseline at the same steps and at the same cost) and curves.png."""
    setting, out, data_root, cpu_scale, jobs_at_once = prepare(args)
    spec = setting["curve"]
    iters, every = (4, 2) if args.smoke else (spec["iters"], spec["every"])
    seeds = args.seeds or spec["seeds"][:1 if args.smoke else None]
    split = flag_values(setting["eval"], "--split")[0]
    rows = setting["rows"] if args.rows else ["baseline", *[r for r in spec["rows"] if r != "baseline"]]
    if set(rows) & partition_rows(setting):
        raise ValueError(f"--curve: the partition rows ({', '.join(sorted(set(rows) & partition_rows(setting)))}) "
                         "train on another labeled set than the baseline; leave them out of --rows")
    stage = {**setting, "rows": rows, "seeds": seeds, "iters": iters, "costs": {},
             "flags": set_flag(set_flag(setting["flags"], "--val-split", [split]), "--eval-every", [str(every)])}
    if args.dry_run:
        return print_plan(stage, args, out, data_root, cpu_scale)
    with evaluation.lock_output_dir(out):
        evaluation.claim_output_dir(out, {"curve": setting["name"], "data_root": str(data_root), "iters": iters,
                                          "split": split, "tuned": setting.get("tuned", "")})
        start = time.perf_counter()
        run_dirs = run_stage([stage], args, out, data_root, cpu_scale, jobs_at_once, {}, {})
        curves = {row: {} for row in rows}   # row -> step -> [mIoU per seed]
        for (row, _), run_dir in sorted(run_dirs.items()):
            for line in (run_dir / "metrics.jsonl").read_text().splitlines():
                entry = json.loads(line)
                curves[row].setdefault(entry["iter"], []).append(100 * entry["miou"])
        report = curve_report(setting, curves, split, seeds, time.perf_counter() - start)
        curve_picture(setting, curves, out / "curves.png")
        datasets.write_atomic(out / "CURVES.md", report)
    print(report)
    print(f"wrote {out / 'CURVES.md'} and {out / 'curves.png'}")
    return curves


def curve_report(setting, curves, split, seeds, seconds):
    """CURVES.md: each row's mean mIoU (± sd over seeds) at every scored step; its paired gain over
    the baseline at the same steps, and at the same cost (the baseline's score at the step nearest to
    the row's steps times its cost ratio, when the baseline reached it)."""
    steps = sorted(curves["baseline"])
    lines = [f"# kd-seg {setting['name']}: longer training", "",
             f"Command: `{' '.join(['python', 'kd_seg.py', *sys.argv[1:]])}`  ",
             f"Machine: {machine_line()}; date {time.strftime('%Y-%m-%d')}; wall time {evaluation.format_eta(seconds)}  ",
             f"{split} mIoU, mean ± sd over seeds {seeds}; one training per row and seed, scored every "
             f"{steps[0]} steps; gain: paired over seeds [95% interval]; cost: the row's training cost in baseline "
             "trainings (tuned.json; 1 without --tuned).", "",
             "| row | cost (x) | " + " | ".join(f"{s}" for s in steps) + " |",
             "|---|---:|" + "---:|" * len(steps)]
    for row, by_step in curves.items():
        cells = []
        for step in steps:
            values = by_step.get(step, [])
            text = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else \
                f"{values[0]:.1f}" if values else ""
            if row != "baseline" and len(values) > 1:
                gain, ci = gain_interval([v - b for v, b in zip(values, curves["baseline"][step])])
                text += f" ({gain:+.1f} [{gain - ci:+.1f}, {gain + ci:+.1f}])"
            cells.append(text)
        lines.append(f"| {row} | {cost_ratio(setting, row):g} | " + " | ".join(cells) + " |")
    lines += ["", "At equal cost (the baseline's first score at or past the row's cost, where it got that far; "
              "both sides are checkpoints part way through the same-length poly schedule):", "",
              "| row | steps | cost (baseline steps) | row mIoU | baseline at that cost | gain [95% CI] |",
              "|---|---:|---:|---:|---:|---:|"]
    for row, by_step in curves.items():
        if row == "baseline":
            continue
        for step in steps:
            matched = step * cost_ratio(setting, row)
            reached = [s for s in steps if s >= matched - 1e-6]   # the baseline gets at least the row's cost
            if not reached or len(by_step.get(step, [])) < 2:
                continue
            nearest = reached[0]
            values, base = by_step[step], curves["baseline"][nearest]
            gain, ci = gain_interval([v - b for v, b in zip(values, base)])
            lines.append(f"| {row} | {step} | {matched:g} (baseline at {nearest}) | {statistics.mean(values):.1f} | "
                         f"{statistics.mean(base):.1f} | {gain:+.1f} [{gain - ci:+.1f}, {gain + ci:+.1f}] |")
    return "\n".join(lines) + "\n![mIoU against steps and against cost](curves.png)\n"


def curve_picture(setting, curves, path, size=(360, 260)):
    """Two panels, drawn with pillow: mean mIoU against steps, and against cost (steps x the row's
    cost ratio), one line per row, each row's name in its colour."""
    colours = [(0, 0, 0), (0, 90, 200), (220, 80, 0), (0, 150, 0), (150, 0, 150), (120, 120, 0), (0, 150, 150)]
    means = {row: {s: statistics.mean(v) for s, v in by_step.items()} for row, by_step in curves.items()}
    low = min(min(m.values()) for m in means.values())
    high = max(max(m.values()) for m in means.values())
    picture = Image.new("RGB", (2 * size[0], size[1] + 16 * len(curves)), "white")
    draw = ImageDraw.Draw(picture)
    for panel, (title, scale) in enumerate((("mIoU vs steps", lambda row: 1.0),
                                            ("mIoU vs cost (baseline steps)", lambda row: cost_ratio(setting, row)))):
        x0, (w, h) = panel * size[0], size
        left, top, right, bottom = x0 + 40, 20, x0 + w - 10, h - 30
        x_max = max(s * scale(row) for row, m in means.items() for s in m)
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 4), title, fill="black")
        for v in (low, high):
            draw.text((x0 + 4, bottom - (bottom - top) * (v - low) / max(high - low, 1e-9) - 5), f"{v:.0f}", fill="black")
        draw.text((left, bottom + 4), "0", fill="black")
        draw.text((right - 30, bottom + 4), f"{x_max:g}", fill="black")
        for colour, (row, m) in zip(colours * 2, means.items()):
            points = [(left + (right - left) * s * scale(row) / x_max,
                       bottom - (bottom - top) * (v - low) / max(high - low, 1e-9)) for s, v in sorted(m.items())]
            draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for i, (colour, row) in enumerate(zip(colours * 2, curves)):
        draw.text((10, size[1] + 16 * i), f"{row} (cost {cost_ratio(setting, row):g}x)", fill=colour)
    datasets.save_png(path, picture)


# ----------------------------------------------------------------------------- benchmarks
def interleaved_times(variants, repeats=15, calls=3, warmup=5):
    """Seconds per call of each variant {name: fn}: every variant warmed up first (one-time
    allocations, oneDNN's kernel choice), then `repeats` rounds that time `calls` calls of each
    variant in turn, so that a drift of the machine (another process, the clock) hits all
    variants alike. Returns {name: [seconds per call, one per round]}."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def median_and_spread(values):
    """'median (min-max)' of a list of per-round values."""
    return statistics.median(values), min(values), max(values)


def benchmark(args):
    """The speed numbers of docs/BENCHMARKS.md, each the median over interleaved rounds with its range:
    (1) CPU FPS of Xie et al.'s pair at 512x512 (docs/DATASETS.md protocol); (2) what the distillation
    terms cost: a demo step with every labeled term against a plain student step plus a teacher
    forward; (3) train.py's own step against the same step on a fixed batch, in interleaved
    rounds. (2) and (3) run in one process set up as the demo's jobs (one thread, REPRODUCIBLE_CPU)."""
    threads = torch.get_num_threads()
    print(f"machine: {machine_line()}, {threads} threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    x = torch.randn(1, 3, 512, 512)
    pair = {name: models.build_model(name, 19, output_stride=8).eval()   # Xie et al.'s student, teacher
            for name in ("deeplabv2_mobilenetv2", "deeplabv2_resnet101")}

    def forward(model):
        def call():
            with torch.inference_mode():
                logits = model(x)["out"]
                F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        return call
    times = interleaved_times({name: forward(model) for name, model in pair.items()}, repeats=15, calls=1, warmup=3)
    for name, seconds in times.items():
        fps, low, high = median_and_spread([1 / t for t in seconds])
        print(f"{name}: {fps:.2f} FPS (range {low:.2f}-{high:.2f} over {len(seconds)} rounds) at 512x512, "
              f"OS 8, fp32, batch 1, upsample+argmax included")
    ratio = median_and_spread([t / s for s, t in zip(*times.values())])
    print(f"student/teacher FPS ratio: {ratio[0]:.2f}x (range {ratio[1]:.2f}-{ratio[2]:.2f}; Xie et al.: "
          f"46.5 / 16.7 FPS = 2.8x on a GPU)")

    data_root = Path(args.data_root or "data/synthetic")
    datasets.make_synthetic(data_root)  # real label maps: FGFI's boxes come from their objects
    with worker_pool(1, reproducible=True) as pool:   # the demo's steps as the demo's workers run them
        pool.submit(demo_step_benchmark, data_root).result()


def demo_step_benchmark(data_root):
    """(2) and (3) of `benchmark`, in a process set up as the demo's workers."""
    print(f"demo steps, in a process set up as the demo's jobs: {kernels()}", flush=True)
    torch.manual_seed(0)
    num_classes = 8
    output_stride = int(flag_values(DEMO_FLAGS, "--output-stride")[0])
    # as the demo trains: channels_last models and images, batch 8
    teacher = models.build_model(TEACHER, num_classes, output_stride).eval()
    student = models.build_model(STUDENT, num_classes, output_stride).train()
    teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    data = datasets.build_dataset("synthetic", data_root, "train", train=True, crop_size=(48, 48))
    images, labels = (torch.stack(t) for t in zip(*[data[i] for i in range(8)]))
    images = images.contiguous(memory_format=torch.channels_last)
    task = argparse.Namespace(ohem=0.0, aux_weight=0.0)
    labeled_terms = dict(pixel=1, consistency=1, pairwise=0.5, holistic=0.1, imitation=0.01,
                         cwd=3, mgd_pixel=1)

    def step_with(weights):
        distiller = losses.Distiller(teacher, weights, student.feat_channels, num_classes,
                                     thing_classes=data.thing_classes, imitation_warmup=0,
                                     discriminator_width=16) if weights else None
        params = list(student.parameters()) + list(distiller.student_side_parameters() if weights else [])
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
        d_optimizer = torch.optim.SGD(distiller.discriminator.parameters(), lr=1e-4) \
            if weights and distiller.discriminator is not None else None

        def step():
            output = student(images)
            terms = {"ce": train.task_loss(output, labels, task, train.scored_corners(student))}
            if distiller is not None:
                teacher_outputs = distiller.teacher_outputs(images)
                terms.update(distiller.terms(student, output, images, labels, step=0, teacher_outputs=teacher_outputs))
            loss = distiller.weighted_sum(terms) if distiller else terms["ce"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if d_optimizer is not None:
                d_optimizer.zero_grad()
                teacher_logits = teacher_outputs[0][0]["out"]
                distiller.discriminator_loss(images, output["out"].detach(), teacher_logits).backward()
                d_optimizer.step()
        return step

    def teacher_forward():
        with torch.no_grad():
            teacher(images)
    times = interleaved_times({
        "plain": step_with({}), "teacher": teacher_forward,
        "all terms": step_with(labeled_terms),
        "no holistic": step_with({k: v for k, v in labeled_terms.items() if k != "holistic"})})
    plain, teacher_s = (statistics.median(times[k]) for k in ("plain", "teacher"))
    print(f"demo step, batch 8 of 48x48 synthetic crops, {STUDENT} <- {TEACHER} (discriminator width "
          f"16, as the demo): plain student step {1000 * plain:.1f} ms + teacher forward "
          f"{1000 * teacher_s:.1f} ms; step with every labeled term {1000 * statistics.median(times['all terms']):.1f} ms "
          f"({', '.join(labeled_terms)})")
    for variant in ("all terms", "no holistic"):
        ratio = median_and_spread([d / (p + t) for d, p, t in zip(times[variant], times["plain"], times["teacher"])])
        print(f"distilled step ({variant}) / (student step + teacher forward): {ratio[0]:.2f} "
              f"(range {ratio[1]:.2f}-{ratio[2]:.2f}; target <= 1.15)", flush=True)
    for workers in (0, 1):
        where = "in the training process" if workers == 0 else "by 1 loader process beside it"
        train_loop_ratio(["--model", STUDENT, "--data-root", str(data_root), *DEMO_FLAGS, "--workers", str(workers)],
                         step_with({}), f"{STUDENT}, demo flags, --workers {workers}: data drawn {where}; "
                         "target <= 1.1")


def train_loop_ratio(train_argv, fixed_step, what, rounds=9, iters=60, log_every=20):
    """train.py's logged seconds per iteration (the data drawn, augmented and moved every step, the
    log, the scheduler) for `train_argv` against `fixed_step`, the same forward, backward and update
    on a fixed batch. Interleaved: each round one short train.py run (its first logged window, the
    warm-up, left out) and then the fixed step as many times, so that both see the same state of
    the machine; the ratio per round, median and range."""
    import tempfile
    ratios, loops = [], []
    for round_ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            argv = [*train_argv, "--iters", str(iters), "--out", f"{tmp}/run", "--log-every", str(log_every),
                    "--seed", str(round_)]
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                train.train(train.get_args_parser().parse_args(argv))
            logged = [json.loads(line)["s_per_it"] for line in open(f"{tmp}/run/log.jsonl")][1:]
        start = time.perf_counter()
        for _ in range(iters - log_every):
            fixed_step()
        fixed = (time.perf_counter() - start) / (iters - log_every)
        loops.append(statistics.median(logged))
        ratios.append(loops[-1] / fixed)
    ratio = median_and_spread(ratios)
    print(f"train.py step ({what}): {1000 * statistics.median(loops):.1f} ms = {ratio[0]:.2f}x the fixed-batch "
          f"step (range {ratio[1]:.2f}-{ratio[2]:.2f} over {rounds} interleaved rounds)", flush=True)


def camvid_benchmark(args):
    """`--benchmark --recipe camvid`: real images cost real loading (PNG decoding, rescaling,
    cropping). train.py's step in the camvid setting (its student and flags, on its downscaled copy)
    against the same model's forward, backward and Adam step on a fixed batch, in one process set
    up as the setting's jobs; and what loading one batch costs on its own."""
    import tempfile
    setting = RECIPES["camvid"]
    source = Path(args.data_root or "data/camvid")
    print(f"machine: {machine_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "camvid"
        datasets.make_camvid_small(source, copy, tuple(setting["downscale"]))
        with worker_pool(1, reproducible=True) as pool:   # as the setting's jobs: one thread, AVX2
            pool.submit(camvid_step_benchmark, str(copy)).result()


def camvid_step_benchmark(copy):
    print(f"camvid steps, in a process set up as the setting's jobs: {kernels()}", flush=True)
    setting = RECIPES["camvid"]
    flags = ["--dataset", "camvid", "--data-root", copy, "--model", setting["student"], *setting["flags"]]
    args = train.get_args_parser().parse_args(flags)
    torch.manual_seed(0)
    student = models.build_model(args.model, 11).train().to(memory_format=torch.channels_last)

    def draw_all(data):   # ms per sample to draw every train image once, as train.py draws a sample
        start = time.perf_counter()
        batch = [train.Seeded(data)[(i, i)] for i in range(len(data))]
        return 1000 * (time.perf_counter() - start) / len(data), batch

    common = dict(train=True, crop_size=tuple(args.crop_size), scale_range=tuple(args.scale_range))
    cold, _ = draw_all(datasets.build_dataset("camvid", copy, "train", **common))
    from_files, _ = draw_all(datasets.build_dataset("camvid", copy, "train", **common))   # files in the OS cache
    kept = datasets.build_dataset("camvid", copy, "train", keep_decoded=True, **common)
    draw_all(kept)   # the first epoch decodes and keeps
    from_memory, batch = draw_all(kept)
    images, labels = (torch.stack(t) for t in zip(*batch[:args.batch_size]))
    images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4, weight_decay=args.weight_decay)

    def fixed_step():
        loss = train.task_loss(student(images), labels, args, train.scored_corners(student))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"one training sample ({args.crop_size[0]}x{args.crop_size[1]} crop of the {setting['downscale'][0]}x"
          f"{setting['downscale'][1]} copy: read, decode, scale, crop, flip, jitter; mean over its {len(kept)} train "
          f"images): {cold:.2f} ms first read, {from_files:.2f} ms from the files, {from_memory:.2f} ms from memory "
          f"(--keep-decoded)", flush=True)
    for workers in (0, 1):   # the first 60 steps (1.3 epochs: every image decoded and kept) left out
        train_loop_ratio([*flags, "--workers", str(workers)], fixed_step,
                         f"{setting['student']}, camvid flags, --workers {workers}; target <= 1.2",
                         iters=120, log_every=60)


def print_list():
    for name, (paper, adds, flags) in ROWS.items():
        print(f"{name:<15} {paper:<16} {adds:<46} {' '.join(flags)}")
    print()
    for name, recipe in sorted(RECIPES.items()):
        print(f"recipe {name:<9} {recipe['paper']}: {recipe['dataset']}, {recipe['teacher']}"
              + (f" + {recipe['wide_teacher']}" if "wide_teacher" in recipe else "")
              + f" -> {recipe['student']}; rows {', '.join(recipe['rows'])}")


def main():
    args = get_args_parser().parse_args()
    if args.list:
        return print_list()
    if args.benchmark:
        return camvid_benchmark(args) if args.recipe == "camvid" else benchmark(args)
    return tune(args) if args.tune else curve(args) if args.curve else run(args)


if __name__ == "__main__":
    sys.exit(evaluation.report_errors(main))
