"""kd-seg: the five distillation papers for semantic segmentation, on one bench.

    python kd_seg.py                     # the demo: every paper's ablation on the synthetic
                                         # benchmark, CPU, 3 seeds: 4-12 minutes on 2
                                         # cores, depending on the CPU (README)
    python kd_seg.py --quick             # a 60-second smoke run of the same pipeline
    python kd_seg.py --rows baseline,xie_lp_lc --seeds 0 1 2 3 4
    python kd_seg.py --list              # the rows and the paper-scale recipes
    python kd_seg.py --recipe skd2019 --dataset cityscapes --data-root /data/cityscapes
                                         # prints the train.py commands of a paper's recipe

The demo makes the synthetic data if missing (datasets.make_synthetic), trains the teacher
once (and MGD's second, wide teacher), labels the unlabeled split offline for Zhu et al., then
trains the same student once per row and seed with the same schedule, and evaluates every
model on the test split (the last checkpoint: nothing is chosen on test). It prints one table
in the shape of the papers' ablation tables and writes <out>/REPORT.md with the table, a
picture grid, the pseudo-label diagnostics and the exact command and machine. Every run
folder is reused when it finished and resumed when it did not, so an interrupted demo
continues where it stopped.
"""
import argparse
import concurrent.futures as futures
import contextlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import datasets
import eval as evaluation
import losses
import models
import train

TEACHER = "deeplabv3plus_resnet18_tiny"
WIDE_TEACHER = "deeplabv3plus_wide_resnet_tiny"
STUDENT = "deeplabv3plus_resnet18_micro"
# The demo schedule shared by every training (teachers and students; the teachers only train
# longer), sized so that the 30 student runs of the default demo (10 rows x 3 seeds) fit 10
# minutes on 2 CPU cores: output stride 16 and 48x48 crops of the 64x64 images cost much less per
# image than stride 8 at 64x64; batch 8 for twice the steps of batch 16 in the same time, lr 0.15
# and scales 0.75-1.5 learned fastest on val (README, "tuning the demo").
DEMO_OUTPUT_STRIDE = 16
QUICK_COUNTS = {"train": 32, "unlabeled": 64, "val": 16, "test": 32}
DEMO_FLAGS = ["--output-stride", str(DEMO_OUTPUT_STRIDE), "--crop-size", "48", "48", "--batch-size", "8",
              "--lr", "0.15", "--scale-range", "0.75", "1.5", "--channels-last"]
DEMO_ITERS, DEMO_TEACHER_ITERS = 260, 600

# Demo rows: name -> (paper, what the row adds, train.py flags). Weights are the official
# defaults (README, "paper value vs code default") unless the README's section "tuning the demo"
# says otherwise. {unlabeled}, {pseudo}, {wide}, {warmup} are filled in. Rows with identical
# flags share one run per seed.
ROWS = {
    "baseline":      ("-", "student alone", []),
    "xie_lp":        ("Xie 2018", "+L_p", ["--kd", "pixel=1"]),
    "xie_lp_lc":     ("Xie 2018", "+L_p+L_c", ["--kd", "pixel=1,consistency=1"]),
    "xie_unlabeled": ("Xie 2018", "+L_p+L_c+unlabeled",
                      ["--kd", "pixel=1,consistency=1,unlabeled=1", "--unlabeled-root", "{unlabeled}",
                       "--unlabeled-batch-size", "4"]),  # 4 unlabeled images per step beside the 8 labeled
    # SKD's pixel-wise term is Xie's L_p; its official weight 10 diverged here, 1 was best on
    # val (README, "tuning the demo"), so skd_pi is the very run of xie_lp (run once, shared)
    "skd_pi":        ("Liu 2019 SKD", "+pixel", ["--kd", "pixel=1"]),
    "skd_pi_pa":     ("Liu 2019 SKD", "+pixel+pair-wise", ["--kd", "pixel=1,pairwise=0.5"]),
    "skd_pi_pa_ho":  ("Liu 2019 SKD", "+pixel+pair-wise+holistic",
                      ["--kd", "pixel=1,pairwise=0.5,holistic=0.1", "--d-width", "16"]),
    "fgfi":          ("Wang 2019 FGFI", "+imitation (anchor mask)",
                      ["--kd", "imitation=0.01", "--imitation-warmup", "{warmup}"]),
    "zhu":           ("Zhu 2020", "+pseudo labels, centroid sampling",
                      ["--unlabeled-root", "{unlabeled}", "--pseudo-labels", "{pseudo}",
                       "--centroid-sampling", "0.5"]),
    "zhu_c2f":       ("Zhu 2020", "+fast schedule (first half at 32x32 crops)",
                      ["--unlabeled-root", "{unlabeled}", "--pseudo-labels", "{pseudo}",
                       "--centroid-sampling", "0.5", "--coarse2fine", "0.5", "--small-crop", "32", "32"]),
    "mgd":           ("Qin 2022 MGD", "+two teachers, image/region/pixel",
                      ["--kd", "mgd_pixel=1,mgd_image=0.001,mgd_region=100",
                       "--wide-teacher-checkpoint", "{wide}", "--unlabeled-root", "{unlabeled}",
                       "--unlabeled-batch-size", "4"]),  # 2 x 4 unlabeled images mixed into 4 per step
    "cwd":           ("Shu 2021 CWD", "+channel-wise KD", ["--kd", "cwd=3"]),
}
DEFAULT_ROWS = [row for row in ROWS if row != "zhu_c2f"]

# Paper-scale recipes for real datasets on one GPU (issue: README "recipes" table). Values:
# (teacher, student, crop, batch, iters, lr, flags); provenance in the README.
RECIPES = {
    "xie2018": ("deeplabv2_resnet101", "deeplabv2_mobilenetv2", 512, 8, 40000, 0.01,
                ["--kd", "pixel=1,consistency=1"]),
    "skd2019": ("pspnet_resnet101", "pspnet_resnet18", 512, 8, 40000, 0.01,
                ["--kd", "pixel=10,pairwise=0.5,holistic=0.1", "--aux-weight", "0.4"]),
    "fgfi2019": ("deeplabv3plus_resnet101", "deeplabv3plus_resnet18", 512, 8, 40000, 0.01,
                 ["--kd", "imitation=0.01", "--imitation-warmup", "400"]),
    "zhu2020": ("deeplabv3plus_resnet101", "deeplabv3plus_resnet18", 512, 8, 40000, 0.01,
                ["--centroid-sampling", "0.5", "--coarse2fine", "0.5", "--small-crop", "256", "256"]),
    "mgd2022": ("deeplabv3plus_resnet101", "deeplabv3plus_resnet18", 512, 8, 40000, 0.01,
                ["--kd", "mgd_pixel=1,mgd_image=0.001,mgd_region=100", "--ohem", "0.7"]),
    "cwd": ("deeplabv3plus_resnet101", "deeplabv3plus_resnet18", 512, 8, 40000, 0.01,
            ["--kd", "cwd=3"]),
}


def get_args_parser():
    p = argparse.ArgumentParser(description="kd-seg demo: the papers' ablations on synthetic data.")
    p.add_argument("--quick", action="store_true", help="60 s smoke run (tiny schedule, 1 seed)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help="comma-separated rows (see --list; default: all but zhu_c2f, which "
                        "`--rows zhu,zhu_c2f` compares with Zhu's plain schedule)")
    p.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0 1 2; quick: 0)")
    p.add_argument("--iters", type=int, help=f"student iterations (default {DEMO_ITERS}; quick: 10)")
    p.add_argument("--teacher-iters", type=int,
                   help=f"teacher iterations (default {DEMO_TEACHER_ITERS}; quick: 20)")
    p.add_argument("--data-root", help="synthetic data folder, made if missing (default "
                   "data/synthetic; quick: data/synthetic_quick, a small copy)")
    p.add_argument("--out", help="output folder (default runs/demo; quick: runs/quick)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="trainings run in parallel, one thread each (tiny models scale better "
                        "across processes than across threads; default: all cores)")
    p.add_argument("--list", action="store_true", help="print the rows and recipes and exit")
    p.add_argument("--benchmark", action="store_true",
                   help="print the README's speed ratios (FPS of Xie's pair, cost of the terms)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="print a paper recipe's commands")
    p.add_argument("--dataset", default="cityscapes", help="with --recipe: dataset name")
    return p


# ----------------------------------------------------------------------------- jobs
def run_training(argv, log_path):
    """One train.py run in this (worker) process, its output in `log_path`; returns the out dir."""
    torch.set_num_threads(1)
    args = train.get_args_parser().parse_args(argv)
    ckpt = Path(args.out) / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["step"] >= args.iters:
            return args.out  # finished earlier: reuse
        args.resume = True
    elif Path(args.out).exists():  # started but never checkpointed: ours, start again
        for f in Path(args.out).iterdir():
            f.unlink()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        train.train(args)
    if not args.resume:  # a whole training: its wall time is a result (Zhu's fast schedule)
        (Path(args.out) / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    test_metrics(args.out, args.data_root)  # here, in parallel, rather than one by one at the end
    return args.out


def pseudo_label_job(teacher_ckpt, unlabeled, pseudo, data_root):
    """Zhu et al.: the teacher labels the unlabeled split offline (confidence threshold 0.5);
    returns the labels' quality against the split's held-back labels."""
    torch.set_num_threads(1)
    teacher, _ = evaluation.load_checkpoint(teacher_ckpt)
    unlabeled_set = datasets.build_dataset("folder", unlabeled, None, classes_from="synthetic")
    with open(Path(pseudo).parent / "pseudo_labels.log", "a") as log, contextlib.redirect_stdout(log):
        evaluation.save_predictions(teacher, unlabeled_set, pseudo, "cpu", threshold=0.5,
                                    owner={"checkpoint": str(Path(teacher_ckpt).resolve()), "threshold": 0.5},
                                    log_every=500)
    labelled_unlabeled = datasets.build_dataset("synthetic", data_root, "unlabeled")
    return evaluation.pseudo_label_diagnostics(pseudo, labelled_unlabeled)


def run_all(jobs, workers):
    """Run jobs in a process pool, each as soon as the jobs it needs have finished, printing
    progress with an ETA. jobs: (name, function, args, needs) in priority order (the slowest
    first, so that no core idles at the end waiting for one of them). Returns {name: result}."""
    results, running, todo = {}, {}, list(jobs)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch state
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        while todo or running:
            for job in [job for job in todo if set(job[3]) <= results.keys()][:workers - len(running)]:
                todo.remove(job)
                running[pool.submit(job[1], *job[2])] = job[0]
            if not running:
                raise ValueError(f"jobs {[job[0] for job in todo]} need jobs that are not in the list")
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                results[name] = future.result()  # re-raise a failed job here
                elapsed = time.perf_counter() - start
                eta = elapsed / len(results) * (len(jobs) - len(results))
                print(f"{len(results)}/{len(jobs)} | {name} done | elapsed {evaluation.format_eta(elapsed)} "
                      f"| eta {evaluation.format_eta(eta)}", flush=True)
    return results


def train_argv(out, model, iters, seed, data_root, extra=()):
    return ["--model", model, "--iters", str(iters), "--seed", str(seed), "--data-root",
            str(data_root), "--out", str(out), "--device", "cpu", "--log-every", "50",
            *DEMO_FLAGS, *extra]


# ----------------------------------------------------------------------------- results
def machine_line():
    return f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}"


def test_metrics(run_dir, data_root):
    """Test-split metrics of a finished run (cached in <run>/test.json)."""
    cache = Path(run_dir) / "test.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, _ = evaluation.load_checkpoint(Path(run_dir) / "checkpoint.pt")
    test_set = datasets.build_dataset("synthetic", data_root, "test")
    loader = torch.utils.data.DataLoader(test_set, batch_size=16)
    metrics = evaluation.evaluate(model, loader, "cpu", test_set.num_classes)
    cache.with_suffix(".tmp").write_text(json.dumps(metrics))
    os.replace(cache.with_suffix(".tmp"), cache)
    return metrics


def train_seconds(run_dirs):
    """Mean wall time of the runs' trainings, one process each ("" if any was resumed)."""
    files = [Path(d) / "train_seconds.txt" for d in run_dirs]
    if not all(f.exists() for f in files):
        return ""
    return f"{statistics.mean(float(f.read_text()) for f in files):.0f}"


def verdict(gains):
    """Paired gains over the baseline (one per seed) -> better / worse / indistinguishable:
    'better' when the mean gain exceeds two standard errors of the paired differences."""
    if len(gains) < 2:
        return "n/a (1 seed)"
    mean, se = statistics.mean(gains), statistics.stdev(gains) / math.sqrt(len(gains))
    if abs(mean) <= 2 * se or mean == 0:
        return "indistinguishable"
    return "better" if mean > 0 else "worse"


def cost_of(model_name, num_classes, size, quick=False):
    """Params, GMACs and CPU FPS of the network as deployed (no auxiliary head; DATASETS.md FPS
    protocol; quick: a rough 10-iteration figure)."""
    model = models.build_model(model_name, num_classes, output_stride=DEMO_OUTPUT_STRIDE)
    fps = evaluation.measure_fps(model, size, "cpu", iters=10 if quick else 200,
                                 min_seconds=1.0 if quick else 3.0)
    return {"params_m": evaluation.count_params(model) / 1e6,
            "gmacs": evaluation.count_gmacs(model, size), "fps": fps["fps"]}


def format_results(rows, costs, fps_size):
    head = (f"| row | paper | adds | params (M) | GMACs | test mIoU | gain | verdict | "
            f"FPS @{fps_size[0]}x{fps_size[1]} | train (s) |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        c = costs[r["model"]]
        miou = f"{r['mean']:.1f} ± {r['std']:.1f}" if r["n"] > 1 else f"{r['mean']:.1f}"
        gain = "" if r["gain"] is None else f"{r['gain']:+.1f}"
        lines.append(f"| {r['name']} | {r['paper']} | {r['adds']} | {c['params_m']:.2f} | "
                     f"{c['gmacs']:.3f} | {miou} | {gain} | {r['verdict']} | {c['fps']:.0f} | "
                     f"{r['train_s']} |")
    return "\n".join(lines)


def picture_grid(run_dirs, data_root, path, count=6):
    """Rows of test images: image, ground truth, then each model's prediction."""
    test_set = datasets.build_dataset("synthetic", data_root, "test")
    nets = [(name, evaluation.load_checkpoint(Path(d) / "checkpoint.pt")[0]) for name, d in run_dirs]
    size = 64
    columns = 2 + len(nets)
    grid = Image.new("RGB", (columns * (size + 4), count * (size + 4)), "white")
    for row in range(count):
        image, label = test_set[row]
        pictures = [Image.open(test_set.image_paths[row]).convert("RGB"),
                    datasets.colorize(label.numpy(), test_set.palette)]
        for _, net in nets:
            with torch.inference_mode():
                pred = evaluation.predict(net, image[None], label.shape)[0].argmax(0)
            pictures.append(datasets.colorize(pred.numpy(), test_set.palette))
        for col, pic in enumerate(pictures):
            grid.paste(pic.resize((size, size), Image.NEAREST), (col * (size + 4), row * (size + 4)))
    evaluation.save_image_atomic(grid, path)
    return ["image", "ground truth"] + [name for name, _ in nets]


# ----------------------------------------------------------------------------- the demo
def demo(args):
    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    iters = args.iters or (10 if quick else DEMO_ITERS)
    teacher_iters = args.teacher_iters or (20 if quick else DEMO_TEACHER_ITERS)
    out = Path(args.out or ("runs/quick" if quick else "runs/demo"))
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    if "baseline" not in rows:
        rows.insert(0, "baseline")  # every gain is measured against it
    start = time.perf_counter()
    command = " ".join(["python", "kd_seg.py", *sys.argv[1:]])
    data_root = Path(args.data_root or ("data/synthetic_quick" if quick else "data/synthetic"))
    # a rerun reuses finished trainings, so it must be the same schedule on the same data
    evaluation.claim_output_dir(out, {"demo": str(out), "data_root": str(data_root), "iters": iters,
                                      "teacher_iters": teacher_iters})
    # no-op when already complete; --quick makes a small copy so that it fits its 60 seconds
    datasets.make_synthetic(data_root, counts=QUICK_COUNTS if quick else None)
    unlabeled = data_root / "images" / "unlabeled"
    num_classes = datasets.build_dataset("synthetic", data_root, "val").num_classes

    teacher_ckpt, pseudo = out / "teacher" / "checkpoint.pt", out / "pseudo_labels"
    fill = {"{unlabeled}": str(unlabeled), "{pseudo}": str(pseudo),
            "{wide}": str(out / "wide_teacher" / "checkpoint.pt"),
            "{warmup}": str(iters // 10)}  # FGFI: 400 of ~40k official iterations -> the first 10%

    # 1. the jobs: teachers (trained once, seed 0; MGD's wide teacher only when its row is asked
    #    for), Zhu's offline pseudo labels, every row x seed; each starts once what it needs is done
    teacher_jobs = [("teacher", run_training, (train_argv(out / "teacher", TEACHER, teacher_iters, 0, data_root),
                                               out / "teacher.log"), [])]
    if any("{wide}" in ROWS[row][2] for row in rows):
        teacher_jobs.append(("wide teacher", run_training, (train_argv(
            out / "wide_teacher", WIDE_TEACHER, teacher_iters, 0, data_root), out / "wide_teacher.log"), []))
    if any("{pseudo}" in ROWS[row][2] for row in rows):
        teacher_jobs.append(("pseudo labels", pseudo_label_job, (teacher_ckpt, unlabeled, pseudo, data_root),
                             ["teacher"]))
    needs_of = {"--teacher-checkpoint": "teacher", "{wide}": "wide teacher", "{pseudo}": "pseudo labels"}
    jobs, run_dirs = [], {}
    for row in rows:
        paper, adds, flags = ROWS[row]
        if "--kd" in flags:  # online distillation; Zhu's rows use the offline pseudo labels
            flags = flags + ["--teacher-checkpoint", str(teacher_ckpt)]
        needs = [job for flag, job in needs_of.items() if flag in flags]
        flags = [fill.get(f, f) for f in flags]
        same = next((r for r in rows[:rows.index(row)] if ROWS[r][2] == ROWS[row][2]), None)
        for seed in seeds:
            if same is not None:  # the identical run already exists under the earlier row
                run_dirs[row, seed] = run_dirs[same, seed]
                continue
            run = out / row / f"seed{seed}"
            run_dirs[row, seed] = run
            jobs.append((f"{row} seed {seed}", run_training, (
                train_argv(run, STUDENT, iters, seed, data_root, flags), out / row / f"seed{seed}.log"), needs))
            (out / row).mkdir(parents=True, exist_ok=True)
    # the slowest rows first (by their measured train times), so that no core idles at the end
    # waiting for one of them; the baselines, which need no teacher, fill the gaps
    slow = ["mgd", "xie_unlabeled", "skd_pi_pa_ho", "fgfi"]
    jobs.sort(key=lambda job: (job[0].startswith("baseline "),
                               slow.index(job[0].split()[0]) if job[0].split()[0] in slow else len(slow)))
    results = run_all(teacher_jobs + jobs, args.jobs)
    diagnostics = results.get("pseudo labels")
    if diagnostics:
        evaluation.plot_diagnostics(diagnostics, out / "pseudo_label_diagnostics.png")

    # 2. test-split evaluation, costs, table
    teacher_miou = 100 * test_metrics(out / "teacher", data_root)["miou"]
    scores = {key: 100 * test_metrics(d, data_root)["miou"] for key, d in run_dirs.items()}
    fps_size = (128, 128) if quick else (512, 512)
    costs = {m: cost_of(m, num_classes, fps_size, quick) for m in (TEACHER, STUDENT)}
    results = [{"name": "teacher", "paper": "-", "adds": TEACHER, "model": TEACHER,
                "mean": teacher_miou, "std": 0.0, "n": 1, "gain": None, "verdict": "",
                "train_s": train_seconds([out / "teacher"])}]
    base = [scores["baseline", s] for s in seeds]
    for row in rows:
        values = [scores[row, s] for s in seeds]
        gains = [v - b for v, b in zip(values, base)]
        results.append({
            "name": row, "paper": ROWS[row][0], "adds": ROWS[row][1], "model": STUDENT,
            "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "gain": None if row == "baseline" else statistics.mean(gains),
            "verdict": "" if row == "baseline" else verdict(gains), "values": values,
            "train_s": train_seconds([run_dirs[row, s] for s in seeds])})
    table = format_results(results, costs, fps_size)
    print(table)

    # 3. REPORT.md
    shown = [("teacher", out / "teacher"), ("baseline", run_dirs["baseline", seeds[0]])] + \
            [(r, run_dirs[r, seeds[0]]) for r in rows if r != "baseline"][:4]
    columns = picture_grid(shown, data_root, out / "predictions.png")
    elapsed = time.perf_counter() - start
    machine = f"{machine_line()}, {args.jobs} parallel jobs x 1 thread"
    report = ["# kd-seg demo report", "", f"Command: `{command}`  ", f"Machine: {machine}  ",
              f"Date: {time.strftime('%Y-%m-%d %H:%M')}; wall time {evaluation.format_eta(elapsed)}  ",
              f"Schedule: teacher {TEACHER} {teacher_iters} iterations; student {STUDENT} "
              f"{iters} iterations; seeds {seeds}; test split, last checkpoint.", "", table, "",
              "Gain: mean paired difference to the baseline (same seeds); verdict 'better' or "
              "'worse' when it exceeds two standard errors of the paired differences.", "",
              "![predictions](predictions.png)  ", f"Columns: {', '.join(columns)}.", ""]
    if diagnostics:
        report += ["## Pseudo labels (teacher, unlabeled split, held-back labels)", "",
                   "| threshold | mIoU | precision | coverage |", "|---:|---:|---:|---:|"]
        report += [f"| {d['threshold']:.2f} | {100 * d['miou']:.1f} | {100 * d['precision']:.1f} | "
                   f"{100 * d['coverage']:.1f} |" for d in diagnostics]
        report += ["", "![pseudo-label diagnostics](pseudo_label_diagnostics.png)", ""]
    tmp = out / "REPORT.tmp"
    tmp.write_text("\n".join(report))
    os.replace(tmp, out / "REPORT.md")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'REPORT.md'} | total {evaluation.format_eta(elapsed)}")
    return results


# ----------------------------------------------------------------------------- benchmarks
def seconds_per_call(fn, warmup=3, repeats=10):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def benchmark(args):
    """The README's speed numbers, printed as ratios: (1) CPU FPS of Xie et al.'s pair at
    512x512 (DATASETS.md protocol); (2) what the distillation terms cost: one demo training step
    with every labeled term on against a plain student step plus a teacher forward."""
    threads = torch.get_num_threads()
    print(f"machine: {machine_line()}, {threads} threads")
    fps = {}
    for name in ("deeplabv2_mobilenetv2", "deeplabv2_resnet101"):  # Xie et al.'s student, teacher
        model = models.build_model(name, 19, output_stride=8)
        fps[name] = evaluation.measure_fps(model, (512, 512), "cpu", iters=200, min_seconds=5.0)
        print(f"{name}: {fps[name]['fps']:.2f} FPS ({fps[name]['latency_ms']:.0f} ms, "
              f"{fps[name]['iters']} iterations) at 512x512, OS 8, fp32, upsample+argmax included")
    ratio = fps["deeplabv2_mobilenetv2"]["fps"] / fps["deeplabv2_resnet101"]["fps"]
    print(f"student/teacher FPS ratio: {ratio:.2f}x (Xie et al.: 46.5 / 16.7 FPS = 2.8x on a GPU)")

    torch.manual_seed(0)
    num_classes = 8
    # as the demo trains: channels_last models and images, batch 8
    teacher = models.build_model(TEACHER, num_classes, DEMO_OUTPUT_STRIDE).eval()
    student = models.build_model(STUDENT, num_classes, DEMO_OUTPUT_STRIDE).train()
    teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    data_root = Path(args.data_root or "data/synthetic")
    datasets.make_synthetic(data_root)  # real label maps: FGFI's boxes come from their objects
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
        optimizer = torch.optim.SGD(params, lr=1e-4)
        d_optimizer = torch.optim.SGD(distiller.discriminator.parameters(), lr=1e-4) \
            if weights and distiller.discriminator is not None else None

        def step():
            output = student(images)
            terms = {"ce": train.task_loss(output, labels, task)}
            if distiller is not None:
                terms.update(distiller.terms(student, output, images, labels, step=0))
            loss = distiller.weighted_sum(terms) if distiller else terms["ce"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if d_optimizer is not None:
                d_optimizer.zero_grad()
                distiller.discriminator_loss(images, output["out"].detach()).backward()
                d_optimizer.step()
        return step

    with torch.no_grad():
        teacher_forward = seconds_per_call(lambda: teacher(images))
    plain = seconds_per_call(step_with({}))
    without_holistic = seconds_per_call(step_with({k: v for k, v in labeled_terms.items() if k != "holistic"}))
    distilled = seconds_per_call(step_with(labeled_terms))
    print(f"demo step, batch 8 of 48x48 synthetic crops, {STUDENT} <- {TEACHER} (discriminator "
          f"width 16, as the demo): plain student step "
          f"{1000 * plain:.0f} ms + teacher forward {1000 * teacher_forward:.0f} ms; step with "
          f"every labeled term {1000 * distilled:.0f} ms ({', '.join(labeled_terms)})")
    print(f"distilled step / (student step + teacher forward): "
          f"{distilled / (plain + teacher_forward):.2f} (target <= 1.15); without the holistic "
          f"term (its discriminator step): {without_holistic / (plain + teacher_forward):.2f}")


def print_recipe(args):
    teacher, student, crop, batch, iters, lr, flags = RECIPES[args.recipe]
    root = args.data_root or f"data/{args.dataset}"
    common = ["--dataset", args.dataset, "--data-root", root, "--crop-size", str(crop), str(crop),
              "--batch-size", str(batch), "--iters", str(iters), "--lr", str(lr)]
    print(" ".join(["python train.py --model", teacher, *common, "--out runs/" + args.recipe + "_teacher"]))
    print(" ".join(["python train.py --model", student, *common, *flags,
                    "--teacher-checkpoint", f"runs/{args.recipe}_teacher/checkpoint.pt",
                    "--out", f"runs/{args.recipe}_student"]))


def main():
    args = get_args_parser().parse_args()
    if args.list:
        for name, (paper, adds, flags) in ROWS.items():
            print(f"{name:<15} {paper:<16} {adds:<36} {' '.join(flags)}")
        print("\nrecipes:", ", ".join(sorted(RECIPES)))
        return
    if args.recipe:
        return print_recipe(args)
    if args.benchmark:
        return benchmark(args)
    demo(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
