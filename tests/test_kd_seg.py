"""kd_seg.py: the --quick smoke run of the whole demo pipeline, and its clear errors."""
import json

from conftest import CAMVID, needs_real_data, run_cli


def test_quick_demo_writes_table_report_and_pictures(tmp_path):
    out, data = tmp_path / "quick", tmp_path / "data"
    r = run_cli("kd_seg.py", "--quick", "--out", out, "--data-root", data, "--jobs", 2, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())["rows"]
    names = [row["name"] for row in results]
    assert names[:3] == ["teacher", "wide teacher", "baseline"] and "mgd" in names and "zhu" in names
    assert all(0 <= row["mean"] <= 100 for row in results)
    report = (out / "REPORT.md").read_text()
    assert "| baseline |" in report and "python kd_seg.py --quick" in report
    # the jobs ran with one thread each, and on an x86-64 CPU with AVX2 or more on its AVX2 kernels
    assert "each job: ATen CPU capability " in report and "1 thread(s)" in report
    import platform, torch
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
            "AVX2", "AVX512"):
        assert "each job: ATen CPU capability AVX2" in report and "ONEDNN_MAX_CPU_ISA=AVX2" in report
    # kd_seg.py itself gets its environment back: its FPS run on the machine's own kernels
    assert f"own process (ATen CPU capability {torch.backends.cpu.get_cpu_capability()}," in report
    # each printed command carries what its job ran with
    commands = (out / "commands.sh").read_text().splitlines()
    assert commands and all(" OMP_NUM_THREADS=1 python " in " " + line for line in commands)
    assert (out / "predictions.png").stat().st_size > 0
    # the grid names its columns in the picture and shows the row with the largest mean gain
    assert "Columns: image, ground truth, teacher, baseline, best: " in report
    assert (out / "pseudo_label_diagnostics.png").stat().st_size > 0
    # a second run reuses every finished training instead of redoing it
    again = run_cli("kd_seg.py", "--quick", "--out", out, "--data-root", data, "--rows", "baseline",
                    timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "baseline seed 0 done" in again.stdout
    assert "its numbers test the pipeline, not the methods" in report
    # scored on another split, the finished runs would be reused: refused, the table left alone
    table = (out / "REPORT.md").read_text()
    val = run_cli("kd_seg.py", "--quick", "--out", out, "--data-root", data, "--rows", "baseline", "--split", "val")
    assert val.returncode == 2 and "results of another run" in val.stderr, val.stderr[-2000:]
    assert (out / "REPORT.md").read_text() == table


def test_unknown_row_is_one_line_error(tmp_path):
    r = run_cli("kd_seg.py", "--quick", "--rows", "baseline,telepathy", "--out", tmp_path / "q")
    assert r.returncode == 2 and "telepathy" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------------------------
# the paper recipes: every step of each, with its real models, on a tiny tree in its dataset's layout

import math
import os
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kd_seg
import models

CITYSCAPES_IDS = [7, 8, 11, 21, 23, 24, 26, 0]   # road, sidewalk, building, vegetation, sky, person, car, unlabeled


def _write_image(path, size, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _write_blocks(path, size, ids, seed):
    """A label of 8x8 blocks of the given ids (objects large enough for FGFI's boxes)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    blocks = np.asarray(ids, np.uint8)[rng.integers(0, len(ids), (size[0] // 8, size[1] // 8))]
    Image.fromarray(np.kron(blocks, np.ones((8, 8), np.uint8))).save(path)


def make_cityscapes(root, size=(64, 128)):
    for split, city, count in (("train", "aachen", 6), ("val", "lindau", 2)):
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            _write_image(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", size, i)
            _write_blocks(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", size, CITYSCAPES_IDS, i)
    for i in range(4):   # Zhu's unlabeled images, where Cityscapes keeps them
        _write_image(f"{root}/leftImg8bit/train_extra/bonn/bonn_{i:06d}_000019_leftImg8bit.png", size, 100 + i)


def make_pascal_context(root, size=(64, 64)):
    voc = f"{root}/VOCdevkit/VOC2010"
    for split, names in (("train", [f"2008_{i:06d}" for i in range(4)]), ("val", ["2009_000001", "2009_000002"])):
        for i, name in enumerate(names):
            _write_image(f"{voc}/JPEGImages/{name}.jpg", size, i)
            _write_blocks(f"{voc}/SegmentationClassContext/{name}.png", size, [0, 1, 15, 59], i)
        os.makedirs(f"{voc}/ImageSets/SegmentationContext", exist_ok=True)
        with open(f"{voc}/ImageSets/SegmentationContext/{split}.txt", "w") as f:
            f.write("".join(n + "\n" for n in names))
    for i in range(4):
        _write_image(f"{root}/unlabeled/{i:04d}.jpg", size, 200 + i)


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory):
    """torchvision-format ImageNet files (random weights, torchvision's key names incl. the
    classifier, which loading drops) under torchvision's own file names."""
    folder = tmp_path_factory.mktemp("imagenet")
    backbones = {models_name.partition("_")[2] for recipe in kd_seg.RECIPES.values()
                 for models_name in (recipe["teacher"], recipe["student"], recipe.get("wide_teacher", "x_resnet18"))
                 if models_name not in models.ESPNETS}   # ESPNets train from scratch
    for backbone in sorted(backbones):
        net = models.build_backbone(backbone, 32)
        state = net.state_dict()
        if backbone == "mobilenetv2":
            state["classifier.1.weight"], state["classifier.1.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
        else:
            state["fc.weight"], state["fc.bias"] = torch.zeros(1000, net.out_channels), torch.zeros(1000)
        torch.save(state, folder / kd_seg.IMAGENET_URLS[backbone].rsplit("/", 1)[1])
    return folder


# CamVid's recipes run on the real tree and SKD's published students (conftest.find_real_data)


@pytest.mark.parametrize("recipe", sorted(kd_seg.RECIPES))
def test_every_recipe_runs_end_to_end_at_smoke_scale(recipe, tmp_path, imagenet_dir):
    dataset = kd_seg.RECIPES[recipe]["dataset"]
    data, out = tmp_path / dataset, tmp_path / "out"
    extra = []
    if dataset == "cityscapes":
        make_cityscapes(data)
    elif dataset == "camvid":
        if CAMVID is None:
            pytest.skip(needs_real_data.kwargs["reason"])
        data = CAMVID
    else:
        make_pascal_context(data)
        extra = ["--unlabeled-root", data / "unlabeled"]
    r = run_cli("kd_seg.py", "--recipe", recipe, "--smoke", "--data-root", data, "--weights-dir", imagenet_dir,
                "--out", out, *extra, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    setting = kd_seg.RECIPES[recipe]
    wide = ["wide teacher"] if "mgd" in setting["rows"] else []
    assert [row["name"] for row in rows] == ["teacher"] + wide + setting["rows"]
    assert all(0 <= row["mean"] <= 100 and row["gmacs"] > 0 and row["fps"] > 0 for row in rows)
    report = (out / "REPORT.md").read_text()
    for row in setting["rows"]:
        assert f"| {row} |" in report and f"| {row} |" in r.stdout
    # every training started from the ImageNet files (ESPNets: from scratch), and the report lists
    # each command it ran
    commands = (out / "commands.sh").read_text().splitlines()
    trainings = [c for c in commands if " python train.py " in f" {c} "]   # after the smoke jobs' environment
    assert trainings and all((str(imagenet_dir) in c) == setting["imagenet"] for c in trainings)
    assert all(c in report for c in commands)
    if dataset == "camvid":   # SKD's published teachers; the real tree's first images, downscaled
        assert all("skd_camvid/" in c for c in commands if "--teacher-checkpoint" in c and "seed" in c) \
            or not setting.get("teacher_files")
        assert len(list((out / "camvid_96x128" / "test").glob("*.png"))) == 4
    if recipe == "camvid":   # the semi-supervised rows and their own baseline on a 1/8 partition
        on_partition = [c for c in trainings if "--train-subset" in c]
        assert {Path(re.search(r"--out (\S+)", c).group(1)).parent.name for c in on_partition} == {
            "partition_baseline", "xie_unlabeled", "zhu", "mgd"}
        assert [r["name"] for r in rows if "main" not in r] == ["teacher", "wide teacher", "baseline",
                                                                  "partition_baseline"]
        # one partition per seed, drawn with that seed
        assert (out / "partition" / "labeled_1-8_seed0.txt").is_file()
    if recipe == "mgd2022":   # a 1/16 partition of the 6 train images: 1 labeled, 5 unlabeled
        labeled = (out / "partition" / "labeled_1-16_seed0.txt").read_text().split()
        unlabeled = (out / "partition" / "unlabeled_1-16_seed0.txt").read_text().split()
        assert len(labeled) == 1 and len(unlabeled) == 5 and not set(labeled) & set(unlabeled)
    if recipe == "zhu2020":   # the teacher labelled Cityscapes' train_extra offline
        assert len(list((out / "pseudo_labels").rglob("*_leftImg8bit.png"))) >= 4


def test_dry_run_prints_every_command_and_touches_nothing(tmp_path):
    out = tmp_path / "never"
    r = run_cli("kd_seg.py", "--recipe", "mgd2022", "--dry-run", "--data-root", tmp_path / "cs", "--out", out)
    assert r.returncode == 0, r.stderr
    commands = [line for line in r.stdout.splitlines() if line.startswith("python ")]
    # teacher, wide teacher, 2 rows x 1 seed, and an evaluation of each (both teachers are scored)
    assert sum(c.startswith("python train.py") for c in commands) == 4
    assert sum(c.startswith("python eval.py") for c in commands) == 4
    assert all("--pretrained https://download.pytorch.org/models/" in c for c in commands if "train.py" in c)
    assert "labeled_1-16_seed" in r.stdout and not out.exists()
    demo = run_cli("kd_seg.py", "--dry-run", "--out", out, "--data-root", tmp_path / "syn")
    assert demo.returncode == 0 and "python train.py" in demo.stdout and not out.exists()
    assert not (tmp_path / "syn").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "0"], "--seeds"), (["--iters", "0"], "--iters"), (["--teacher-iters", "0"], "--teacher-iters"),
    (["--jobs", "0"], "--jobs"), (["--recipe", "skd2019", "--weights-dir", "MISSING"], "resnet101-63fe2227.pth"),
    (["--recipe", "xie2018"], "--unlabeled-root"), (["--smoke"], "--recipe"),
])
def test_bad_options_are_one_line_errors_that_write_nothing(argv, message, tmp_path):
    r = run_cli("kd_seg.py", *argv, "--out", tmp_path / "out", "--data-root", tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_recipe_bad_input_is_one_line_before_anything_is_written(tmp_path, imagenet_dir, teacher_checkpoint):
    make_pascal_context(tmp_path / "context")   # a root in another layout than the recipe's
    r = run_cli("kd_seg.py", "--recipe", "skd2019", "--data-root", tmp_path / "context", "--weights-dir",
                imagenet_dir, "--out", tmp_path / "out")
    assert r.returncode == 2 and "Cityscapes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    make_cityscapes(tmp_path / "cs")   # 19 classes; the session's teacher has the synthetic 8
    r = run_cli("kd_seg.py", "--recipe", "skd2019", "--smoke", "--data-root", tmp_path / "cs", "--weights-dir",
                imagenet_dir, "--teacher-checkpoint", teacher_checkpoint, "--out", tmp_path / "out")
    assert r.returncode == 2 and "8 classes, the dataset has 19" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def _t_quantile(df, p=0.975):
    """Student's t quantile from its density (Simpson's rule and bisection): an independent check."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x, steps=2000):
        h = x / steps
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    low, high = 0.0, 20.0
    for _ in range(60):
        low, high = ((low + high) / 2, high) if cdf((low + high) / 2) < p else (low, (low + high) / 2)
    return low


def test_verdicts_are_paired_t_tests_with_holm_over_the_table():
    for df, t in enumerate(kd_seg.T_975, start=1):
        quantile = _t_quantile(df)
        assert t == pytest.approx(quantile, abs=2e-3), df
        # gains whose t statistic is the 95% quantile have p = 0.05 (mean t * sd / sqrt(n), sd 1)
        n = df + 1
        unit = [1.0, -1.0] * (n // 2) + [0.0] * (n % 2)
        sd = statistics.stdev(unit)
        gains = [u / sd + quantile / math.sqrt(n) for u in unit]
        assert kd_seg.t_test_p(gains) == pytest.approx(0.05, abs=1e-6), df
    mean, half = kd_seg.gain_interval([1.0, 2.0, 3.0])   # sd 1: 4.303 / sqrt(3)
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert kd_seg.t_test_p([1.0, 2.0, 3.0]) == pytest.approx(0.0742, abs=1e-4)   # t = 2 sqrt(3), df 2
    assert kd_seg.t_test_p([2.0, 2.0]) == 0.0 and kd_seg.t_test_p([0.0, 0.0]) == 1.0 == kd_seg.t_test_p([3.0])
    # a nearly constant gain: t = 4e6 with 4 degrees of freedom, p about 1e-26, not a panel-width artefact
    assert kd_seg.t_test_p([4.0 + 1e-6 * u for u in (1, -1, 0, 0, 0)]) < 1e-12
    # Holm: sorted p times m, m-1, ...; monotone; capped at 1; in the family's own order
    assert kd_seg.holm([0.04, 0.01, 0.03, 0.5]) == pytest.approx([0.09, 0.04, 0.09, 0.5])
    assert kd_seg.holm([0.3, 0.2]) == pytest.approx([0.4, 0.4]) and kd_seg.holm([0.9, 0.8]) == [1.0, 1.0]
    assert kd_seg.verdict(2.0, 0.049, 5) == "better" and kd_seg.verdict(-2.0, 0.01, 5) == "worse"
    assert kd_seg.verdict(2.0, 0.05, 5) == "inconclusive" and kd_seg.verdict(2.0, 0.0, 1) == "n/a (1 seed)"


def test_table_rows_holm_gap_closed_and_equal_cost(tmp_path, monkeypatch):
    """result_rows on made-up scores: the paired gains against the baseline and against the baseline
    trained for the row's cost, one Holm family over both, the gap closed toward the teacher."""
    def run(name, seed, miou):
        d = tmp_path / name / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"metrics": {"miou": miou / 100}}))
        (d / "train_seconds.txt").write_text("10\n" if name == "baseline" else "25\n")
        return d
    seeds = [0, 1, 2]
    scores = {"baseline": [30, 31, 32], "baseline@x2.5": [33, 34, 35], "cwd": [35, 36.5, 37]}
    run_dirs = {(name, s): run(name, s, v[s]) for name, v in scores.items() for s in seeds}
    run_dirs.update({("hinton", s): run_dirs["cwd", s] for s in seeds})   # a row sharing cwd's runs
    (tmp_path / "teacher_eval.json").write_text(json.dumps({"metrics": {"miou": 0.51}}))
    setting = {"seeds": seeds, "reported": {}, "teacher": "t", "rows": ["baseline", "cwd", "hinton"],
               "costs": {"cwd": 2.5, "hinton": 2.5}}
    monkeypatch.setattr(kd_seg, "cost_of", lambda *a, **k: {"params_m": 1.0, "gmacs": 1.0, "fps": 1.0})
    teachers = {"teacher": tmp_path / "t.pt", "eval": tmp_path / "teacher_eval.json"}
    rows = kd_seg.result_rows(setting, tmp_path, run_dirs, teachers, (8, 8), True, 1)
    cwd, hinton = rows[-2:]
    assert hinton["main"]["p_holm"] == cwd["main"]["p_holm"]   # one comparison, counted once in the family
    assert cwd["main"]["gain"] == pytest.approx(31 / 6) and cwd["eq"]["gain"] == pytest.approx(13 / 6)
    assert cwd["main"]["gap"] == pytest.approx(31 / 6 / (51 - 31))
    assert [cwd["main"]["p_holm"], cwd["eq"]["p_holm"]] == pytest.approx(kd_seg.holm([cwd["main"]["p"], cwd["eq"]["p"]]))
    assert cwd["time_ratio"] == "2.50" and cwd["cost"] == 2.5
    table = kd_seg.format_results(rows, with_reported=False).splitlines()
    cells = dict(zip([c.strip() for c in table[0].split("|")], [c.strip() for c in table[-2].split("|")]))
    half = cwd["main"]["ci"]
    assert cells["detectable"] == f"{half:.1f}" and cells["gap closed"] == "0.26"
    assert cells["gain [95% CI]"] == f"+5.2 [{31 / 6 - half:+.1f}, {31 / 6 + half:+.1f}]"
    assert cells["verdict"] == cwd["main"]["verdict"] and cells["cost (x)"] == "2.5"


def test_pool_workers_end_with_kd_seg_after_kill_9(tmp_path):
    """kill -9 of kd_seg.py leaves no worker behind (Linux: parents from /proc)."""
    import signal
    import subprocess
    import sys
    import time
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")

    def children(pid):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        return found

    process = subprocess.Popen([sys.executable, "kd_seg.py", "--quick", "--out", str(tmp_path / "q"),
                                "--data-root", str(tmp_path / "data"), "--jobs", "2"],
                               cwd=kd_seg.__file__.rsplit("/", 1)[0], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and len(workers) < 2:   # the pool's workers (plus its resource tracker)
        time.sleep(0.5)
        workers = [c for c in children(process.pid)
                   if "multiprocessing" in open(f"/proc/{c}/cmdline").read().replace("\0", " ")]
    assert workers, "kd_seg.py started no worker"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.5)
        for w in workers:   # reap nothing: they are not our children; zombies count as ended
            pass
    alive = [w for w in workers if os.path.exists(f"/proc/{w}")
             and open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"workers {alive} outlived kd_seg.py"


def test_every_link_and_named_document_is_in_the_repository():
    """The README and docs/ link only to files the repository ships (a clone has no ../shared), and
    every docs/*.md that the code, the tests or the documents name exists."""
    repo = Path(kd_seg.__file__).resolve().parent
    pages = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    links = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:|#", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(repo) and path.exists(), f"{page.name} links {target}: not in the repository"
            links += 1
    for source in [*repo.glob("*.py"), *(repo / "tests").glob("*.py"), *pages]:
        for name in re.findall(r"\bdocs/(\w+\.md)", source.read_text()):
            assert (repo / "docs" / name).is_file(), f"{source.name} names docs/{name}, which does not exist"
    assert links >= 10


@needs_real_data
def test_camvid_setting_without_its_teacher_or_in_dry_run_writes_nothing(tmp_path):
    # a data root with no SKD files beside it: one line naming the file and where it comes from
    data = tmp_path / "data" / "CamVid"
    data.mkdir(parents=True)
    r = run_cli("kd_seg.py", "--recipe", "camvid", "--data-root", data, "--out", tmp_path / "out")
    assert r.returncode == 2 and "SD+KD+CITY_65.1.pth" in r.stderr and "irfanICMLL" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    r = run_cli("kd_seg.py", "--recipe", "camvid", "--data-root", CAMVID, "--dry-run",
                "--out", tmp_path / "out")
    assert r.returncode == 0 and "a 180x240 copy of" in r.stdout and "labeled_1-8_seed4.txt" in r.stdout
    commands = [line for line in r.stdout.splitlines() if " python " in line]
    assert sum(" train.py " in c for c in commands) == 5 * 12   # skd_pi and hinton share xie_lp's runs
    assert all("OMP_NUM_THREADS=1" in c for c in commands) and not (tmp_path / "out").exists()


@needs_real_data
def test_camvid_tuning_then_the_tuned_table_at_smoke_scale(tmp_path):
    """`--tune` on the real tree (smoke: 2 values of each grid, one seed, 2 iterations): the
    baseline's lr and the labeled fractions, then every arm's weights at the chosen ones, trained
    without drive 0006R0 and scored on it; then `--tuned` runs the table with those values and a
    compute-matched baseline for each row that costs more than one baseline training."""
    rows = ["--rows", "xie_lp,hinton,mgd,zhu"]   # a shared arm, a partition row, an untuned row
    r = run_cli("kd_seg.py", "--recipe", "camvid", "--tune", "--smoke", *rows, "--data-root",
                CAMVID, "--out", tmp_path / "tune", timeout=600)
    assert r.returncode == 0, r.stderr
    tuned = json.loads((tmp_path / "tune" / "tuned.json").read_text())
    assert tuned["split"] == "heldout_0006R0" and tuned["train_split"] == "train_without_0006R0"
    assert tuned["lr"] in (2.5e-3, 5e-3) and tuned["partition"] in (8, 16)
    assert set(tuned["rows"]) == {"xie_lp", "hinton", "mgd"} and tuned["untuned"] == ["zhu"]
    assert tuned["rows"]["xie_lp"] == tuned["rows"]["hinton"]   # one arm: the same flags
    assert {"baseline@lr0.0025", "partition_baseline@k16", "mgd@w0.1", "xie_lp@w0.3"} <= set(tuned["scores"])
    held_out = {p.name[:6] for p in (tmp_path / "tune" / "camvid_96x128" / "heldout_0006R0").glob("*.png")}
    trained = {p.name[:6] for p in (tmp_path / "tune" / "camvid_96x128" / "train_without_0006R0").glob("*.png")}
    assert held_out == {"0006R0"} and "0006R0" not in trained
    assert "Chosen: lr" in (tmp_path / "tune" / "TUNE.md").read_text()
    tuned["costs"]["mgd"] = 2.5   # a recorded cost: the partition baseline trains 2.5 x as long beside it
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    r = run_cli("kd_seg.py", "--recipe", "camvid", "--smoke", *rows, "--tuned", tmp_path / "tuned.json",
                "--data-root", CAMVID, "--out", tmp_path / "table", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "gain at equal cost" in r.stdout and "| mgd |" in r.stdout
    long_run = json.loads((tmp_path / "table" / "partition_baseline@x2.5" / "seed0" / "args.json").read_text())
    assert long_run["iters"] == 5   # round(2 x 2.5)
    report = (tmp_path / "table" / "REPORT.md").read_text()
    assert f"--lr {tuned['lr']:g}" in report or f"--lr {tuned['lr']}" in report
    # the longer training: scored along the way (smoke: every 2 of 4 steps), with the tuned values
    r = run_cli("kd_seg.py", "--recipe", "camvid", "--curve", "--smoke", "--rows", "hinton", "--tuned",
                tmp_path / "tuned.json", "--data-root", CAMVID, "--out", tmp_path / "curve", timeout=600)
    assert r.returncode == 0, r.stderr
    curves = (tmp_path / "curve" / "CURVES.md").read_text()
    assert "| baseline | 1 |" in curves and "| hinton |" in curves and (tmp_path / "curve" / "curves.png").is_file()
    steps = [json.loads(line)["iter"] for line in
             (tmp_path / "curve" / "hinton" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_tuned_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "tuned.json"
    bad.write_text("{not json")
    for argv, message in ((["--recipe", "camvid", "--tuned", bad], "not a tuned.json"),
                          (["--tune"], "--recipe camvid"), (["--recipe", "camvid", "--tune", "--tuned", bad], "one of")):
        r = run_cli("kd_seg.py", *argv, "--out", tmp_path / "out", "--data-root", tmp_path / "none", "--dry-run")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    bad.write_text(json.dumps({"setting": "demo", "lr": 1, "rows": {}, "partition": 8, "costs": {}}))
    r = run_cli("kd_seg.py", "--recipe", "camvid", "--tuned", bad, "--dry-run", "--out", tmp_path / "out")
    assert r.returncode == 2 and "tuned for setting 'demo'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_tuning_costs_average_the_arm_and_refuse_untimed_runs():
    """A row's cost is the mean of all its arm's runs (a weight does not change a step's cost) over a
    baseline training's, to a quarter and at least 1; a run without train seconds is refused by name."""
    weighted = {"cwd@w0.1": [], "cwd@w1": [], "mgd@w0.1": []}
    seconds = {"cwd@w0.1": 70.0, "cwd@w1": 80.0, "mgd@w0.1": 230.0}
    assert kd_seg.arm_cost("cwd", weighted, seconds, 50.0) == 1.5 and kd_seg.arm_cost("mgd", weighted, seconds, 50.0) == 4.5
    assert kd_seg.arm_cost("cwd", weighted, seconds, 200.0) == 1.0
    with pytest.raises(ValueError, match="cwd@w1"):
        kd_seg.arm_cost("cwd", weighted, {"cwd@w0.1": 70.0}, 50.0)


def test_curve_refuses_partition_rows(tmp_path):
    r = run_cli("kd_seg.py", "--recipe", "camvid", "--curve", "--rows", "baseline, mgd", "--dry-run",
                "--out", tmp_path / "out", "--data-root", tmp_path / "none")
    assert r.returncode == 2 and "partition rows" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
