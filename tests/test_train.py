"""train.py: exact resume, every distillation recipe for 20 steps, and clear errors."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import CAMVID, SKD_CAMVID, needs_real_data, run_cli, train_args


def test_interrupted_and_resumed_run_equals_uninterrupted(data_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train(train_args(data_root, straight, iters=6))
    train.train(train_args(data_root, resumed, "--stop-at", 3, iters=6))  # "killed" after 3
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["step"] == 3
    # every other argument comes from the checkpoint; --keep-decoded may change (it draws the same data)
    args = train.get_args_parser().parse_args(["--out", str(resumed), "--resume", "--keep-decoded"])
    train.train(args)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


RECIPES = {  # name -> (train.py flags, the distillation term that must go down)
    "xie2018": (["--kd", "pixel=1,consistency=1"], "pixel"),
    "xie2018_unlabeled": (["--kd", "pixel=1,consistency=1,unlabeled=1", "--unlabeled-root", "{u}"], "u_pixel"),
    "skd2019": (["--kd", "pixel=10,pairwise=0.5,holistic=0.1"], "pixel"),
    # FGFI: over 20 steps of batch 4 the term swings +-30% with the batch's teacher feature norm,
    # which hides its descent; test_term_goes_down_on_a_fixed_batch checks that instead
    "fgfi2019": (["--kd", "imitation=0.01", "--imitation-warmup", "0"], None),
    "fgfi2019_dilated": (["--kd", "imitation=0.01", "--imitation-warmup", "0",
                          "--imitation-mask", "dilated"], None),
    "mgd2022": (["--kd", "mgd_pixel=1,mgd_image=0.001,mgd_region=100", "--unlabeled-root", "{u}",
                 "--wide-teacher-checkpoint", "{w}"], "mgd_pixel"),
    # CWD: with the fixtures' near-chance teacher the term rises and falls with the batch over
    # 20 steps; test_term_goes_down_on_a_fixed_batch checks its descent instead
    "cwd": (["--kd", "cwd=3"], None),
    # CWD on logits and, through the 1x1 alignment conv trained with the student, on features
    "cwd_feat": (["--kd", "cwd=3,cwd_feat=50"], None),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_20_distillation_steps_finite_and_term_decreases(recipe, data_root, teacher_checkpoint,
                                                         wide_teacher_checkpoint, tmp_path):
    flags, term = RECIPES[recipe]
    fill = {"{u}": str(data_root / "images" / "unlabeled"), "{w}": str(wide_teacher_checkpoint)}
    flags = [fill.get(f, f) for f in flags]
    out = tmp_path / recipe
    train.train(train_args(data_root, out, "--teacher-checkpoint", teacher_checkpoint, "--lr", 0.02,
                           "--log-every", 5, *flags, iters=20))
    log = read_log(out)
    assert all(math.isfinite(v) for row in log for k, v in row.items() if k != "iter")
    if term is not None:
        assert log[-1][term] < log[0][term], [row[term] for row in log]


# CWD at 30 (official 3): at 3 the term falls only 15% in 20 steps, the CE leading
@pytest.mark.parametrize("term,weight,mask", [("imitation", 0.01, "anchor"), ("imitation", 0.01, "dilated"),
                                              ("cwd", 30, "anchor"), ("cwd_feat", 50, "anchor")])
def test_term_goes_down_on_a_fixed_batch(term, weight, mask, data_root, teacher_checkpoint):
    """Optimising the distillation terms whose 20-step logs are too noisy to show descent."""
    import datasets
    import eval as evaluation
    import losses
    import models
    torch.manual_seed(0)
    teacher, _ = evaluation.load_checkpoint(teacher_checkpoint)
    student = models.build_model("deeplabv3plus_mobilenetv2_tiny", 8)
    data = datasets.build_dataset("synthetic", data_root, "train")
    images, labels = (torch.stack(t) for t in zip(*[data[i] for i in range(4)]))
    distiller = losses.Distiller(teacher, {term: weight}, student.feat_channels, 8,
                                 thing_classes=data.thing_classes, imitation_warmup=0,
                                 imitation_mask=mask)
    optimizer = torch.optim.SGD([*student.parameters(), *distiller.student_side_parameters()],
                                lr=0.02, momentum=0.9)
    values = []
    for step in range(20):
        terms = distiller.terms(student, student(images), images, labels, step)
        values.append(terms[term].item())
        optimizer.zero_grad()
        distiller.weighted_sum(terms).backward()
        optimizer.step()
    assert all(math.isfinite(v) for v in values) and values[-1] < 0.7 * values[0], values


def test_zhu_pseudo_labels_centroid_sampling_and_coarse2fine(data_root, teacher_checkpoint, tmp_path):
    import datasets
    import eval as evaluation
    teacher, _ = evaluation.load_checkpoint(teacher_checkpoint)
    images = datasets.build_dataset("folder", data_root / "images" / "unlabeled", None, classes_from="synthetic")
    evaluation.save_predictions(teacher, images, tmp_path / "pseudo", "cpu", threshold=0.5)
    out = tmp_path / "zhu"
    train.train(train_args(data_root, out, "--unlabeled-root", data_root / "images" / "unlabeled",
                           "--pseudo-labels", tmp_path / "pseudo", "--centroid-sampling", 0.5,
                           "--coarse2fine", 0.5, "--small-crop", 32, 32, iters=8))
    assert (out / "centroids.json").exists()
    assert all(math.isfinite(row["loss"]) for row in read_log(out))


def corrupt_copy(data_root, tmp_path, how):
    """A copy of the synthetic data with one broken train file."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    label = root / "labels" / "train" / "train_00000.png"
    image = root / "images" / "train" / "train_00000.png"
    if how == "rgb label":
        Image.open(label).convert("RGB").save(label)
    elif how == "size mismatch":
        Image.open(label).resize((32, 32)).save(label)
    elif how == "out-of-range ids":
        array = np.array(Image.open(label))
        array[0, 0] = 40
        Image.fromarray(array, mode="L").save(label)
    elif how == "corrupt image":
        image.write_bytes(b"not a png at all")
    return root, label if how != "corrupt image" else image


@pytest.mark.parametrize("how", ["rgb label", "size mismatch", "out-of-range ids", "corrupt image"])
def test_bad_data_one_line_error_and_nothing_written(how, data_root, tmp_path):
    root, culprit = corrupt_copy(data_root, tmp_path, how)
    out = tmp_path / "run"
    r = run_cli("train.py", "--data-root", root, "--out", out, "--iters", 2, "--batch-size", 32,
                "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and culprit.name in r.stderr, r.stderr
    assert not out.exists()  # nothing half written


@pytest.mark.parametrize("argv, message", [
    (["--model", "nonet"], "unknown model"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--iters", "-1"], "--iters must be positive"),
    (["--kd", "pixel=1"], "--teacher-checkpoint"),
    (["--kd", "telepathy=1", "--teacher-checkpoint", "x.pt"], "unknown term"),
    (["--data-root", "/nonexistent/kd-seg"], "/nonexistent/kd-seg"),
])
def test_bad_options_one_line_error(argv, message, data_root, tmp_path):
    base = ["--data-root", data_root, "--iters", 2, "--out", tmp_path / "run"]
    r = run_cli("train.py", *base, *argv)  # argparse: a later flag overrides an earlier one
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_teacher_with_other_class_count_is_refused(data_root, tmp_path):
    import models
    bad = tmp_path / "teacher19.pt"
    args = vars(train_args(data_root, tmp_path / "x"))
    torch.save({"model": models.build_model("deeplabv3plus_resnet18_tiny", 19).state_dict(),
                "args": {**args, "model": "deeplabv3plus_resnet18_tiny", "num_classes": 19}}, bad)
    r = run_cli("train.py", "--data-root", data_root, "--out", tmp_path / "run", "--iters", 2,
                "--teacher-checkpoint", bad, "--kd", "pixel=1")
    assert r.returncode == 2 and "19 classes" in r.stderr


def test_existing_results_are_not_overwritten(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    r = run_cli("train.py", "--data-root", data_root, "--out", out, "--iters", 2)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (out / "precious.txt").read_text() == "mine"


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(data_root, tmp_path, monkeypatch):
    # torchrun, 2 CPU processes with gloo, batch 2 each, against 1 process with batch 2 and 2
    # accumulated batches: the same samples and augmentations, BatchNorm over the same 2 images
    # (SyncBatchNorm has no CPU kernel), the same mean of per-batch losses. The weights must agree
    # to float rounding, far closer than one optimiser step moves them. One thread everywhere, as
    # torchrun sets for its workers: other thread counts pick other kernels, other roundings.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["--data-root", data_root, "--lr", 0.01, "--device", "cpu", "--batch-size", 2,
              "--model", "deeplabv2_resnet18_micro"]  # no dropout: its masks are drawn per process
    runs = {"ddp": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "train.py",
                    *common, "--iters", 3],
            "one": ["train.py", *common, "--iters", 3, "--accumulate", 2],
            "shorter": ["train.py", *common, "--iters", 2, "--accumulate", 2]}
    weights = {}
    for name, argv in runs.items():
        r = run_cli(*argv, "--out", tmp_path / name, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        state = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
        # BatchNorm running statistics differ by design (rank 0 keeps only its own batches)
        weights[name] = {k: v for k, v in state.items() if "running" not in k and v.is_floating_point()}
    ddp_gap = max((weights["one"][k] - weights["ddp"][k]).abs().max().item() for k in weights["one"])
    one_step = max((weights["one"][k] - weights["shorter"][k]).abs().max().item() for k in weights["one"])
    assert one_step > 0 and ddp_gap < 1e-3 * one_step, (ddp_gap, one_step)
    # validation runs on every rank and the confusion matrix is all-reduced
    miou = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["miou"]
            for name in ("ddp", "one")]
    assert miou[0] == pytest.approx(miou[1], abs=0.02)


def test_bad_unlabeled_and_pseudo_label_folders(data_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--data-root", data_root, "--iters", 2, "--batch-size", 4]
    r = run_cli("train.py", *base, "--unlabeled-root", empty, "--pseudo-labels", empty,
                "--out", tmp_path / "a")
    assert r.returncode == 2 and "no .jpg/.jpeg/.png images" in r.stderr, r.stderr
    pseudo = tmp_path / "pseudo"  # labels for one image of the folder only
    pseudo.mkdir()
    shutil.copy(data_root / "labels" / "unlabeled" / "unlabeled_00000.png", pseudo)
    r = run_cli("train.py", *base, "--unlabeled-root", data_root / "images" / "unlabeled",
                "--pseudo-labels", pseudo, "--out", tmp_path / "b")
    assert r.returncode == 2 and "unlabeled_00001" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- faults (issue 14)
def main(capsys, *argv):
    """train.py's command line, in this process (fast): (exit code, stderr)."""
    code = train.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def tiny(data_root, out, *extra, iters=2):
    return ["--data-root", data_root, "--out", out, "--iters", iters, "--batch-size", 2,
            "--crop-size", 32, 32, "--device", "cpu", "--model", "deeplabv3plus_mobilenetv2_tiny", *extra]


class Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.mkdir, (str(self.marker),)


def test_checkpoint_is_plain_data_and_loads_with_weights_only(teacher_checkpoint):
    ckpt = torch.load(teacher_checkpoint, weights_only=True)  # no numpy array, tuple or Namespace
    assert isinstance(ckpt["args"], dict) and isinstance(ckpt["rng"]["python"][1], list)
    assert ckpt["rng"]["numpy"]["state"]["key"].dtype == torch.int64


def test_malicious_checkpoint_runs_nothing_on_any_path(data_root, teacher_checkpoint, tmp_path, capsys):
    import eval as evaluation
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "args": {"model": "x", "num_classes": 8}, "step": 1}, evil)
    resume = tmp_path / "resume"
    resume.mkdir()
    shutil.copy(evil, resume / "checkpoint.pt")
    unlabeled = data_root / "images" / "unlabeled"
    attempts = {
        "eval.py --checkpoint": lambda: evaluation.report_errors(evaluation.main, evaluation.get_args_parser().parse_args(
            ["--checkpoint", str(evil), "--data-root", str(data_root), "--device", "cpu"])),
        "--teacher-checkpoint": lambda: train.main(list(map(str, tiny(
            data_root, tmp_path / "a", "--teacher-checkpoint", evil, "--kd", "pixel=1")))),
        "--wide-teacher-checkpoint": lambda: train.main(list(map(str, tiny(
            data_root, tmp_path / "b", "--teacher-checkpoint", teacher_checkpoint, "--wide-teacher-checkpoint",
            evil, "--kd", "mgd_pixel=1,mgd_image=1", "--unlabeled-root", unlabeled)))),
        "--resume": lambda: train.main(["--out", str(resume), "--resume"]),
    }
    for path, attempt in attempts.items():
        assert attempt() == 2, path
        err = capsys.readouterr().err
        assert "refused" in err and str(evil.name if path != "--resume" else "checkpoint.pt") in err, (path, err)
        assert len(err.strip().splitlines()) == 1 and not marker.exists(), path


@pytest.mark.parametrize("content", ["truncated", "random", "bare state_dict"])
def test_resume_from_a_broken_checkpoint_is_one_line(content, data_root, teacher_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    data = teacher_checkpoint.read_bytes()
    if content == "truncated":
        (out / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    elif content == "random":
        (out / "checkpoint.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save(torch.load(teacher_checkpoint, weights_only=True)["model"], out / "checkpoint.pt")
    code, err = main(capsys, "--out", out, "--resume")
    expected = "not a kd-seg checkpoint" if content == "bare state_dict" else "truncated or corrupt checkpoint"
    assert code == 2 and "checkpoint.pt" in err and expected in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, option", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--d-lr", "nan"], "--d-lr"),
    (["--kd", "pixel=nan"], "--kd pixel"), (["--kd", "pixel=inf"], "--kd pixel"),
    (["--kd", "pixel=-1"], "--kd pixel"), (["--kd", "pixel=1,pixel=0"], "twice"),
    (["--tau", "0"], "--tau"), (["--cwd-tau", "nan"], "--cwd-tau"), (["--poly-power", "-1"], "--poly-power"),
    (["--scale-range", "nan", "2"], "--scale-range"), (["--scale-range", "2", "1"], "--scale-range"),
    (["--workers", "-1"], "--workers"), (["--ohem", "1.5"], "--ohem"), (["--crop-size", "0", "0"], "--crop-size"),
    (["--small-crop", "0", "8"], "--small-crop"), (["--d-width", "0"], "--d-width"),
    (["--lambda-gp", "-1"], "--lambda-gp"), (["--momentum", "nan"], "--momentum"),
    (["--centroid-sampling", "nan"], "--centroid-sampling"), (["--device", "nonsense"], "--device"),
    (["--seed", "-1"], "--seed"), (["--threads", "0"], "--threads"),
] + ([(["--device", "cuda"], "--device cuda")] if not torch.cuda.is_available() else []))
def test_bad_option_values_one_line_naming_the_option(argv, option, data_root, teacher_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    teacher = ["--teacher-checkpoint", teacher_checkpoint] if any("--kd" in a for a in argv) else []
    code, err = main(capsys, *tiny(data_root, out, *teacher), *argv)
    assert code == 2 and option in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("script", ["train", "eval"])
def test_help_says_each_default_once_and_lists_models_datasets_and_terms(script):
    import argparse
    import re
    import datasets
    import eval as evaluation
    import losses
    import models
    parser = (train if script == "train" else evaluation).get_args_parser()
    text = parser.format_help()
    entries = {" ".join(e.split()).split()[0]: " ".join(e.split()) for e in re.split(r"\n(?=  -)", text)[1:]}
    for action in parser._actions:
        if argparse.SUPPRESS in (action.default, action.help):  # --help, and a flag for tests
            continue
        entry = entries[action.option_strings[0]]
        assert entry.count("default:") <= 1 and "(default: None)" not in entry, entry
        assert "(default: False)" not in entry, entry
        if action.default is not None and action.default is not False:  # a default: said once
            assert entry.count("default:") == 1, entry
    names = [*models.HEADS, *models.BACKBONES, *models.ESPNETS, *datasets.DATASETS]
    names += list(losses.TERMS) if script == "train" else []
    flat = " ".join(text.split())
    assert all(re.search(rf"\b{name}\b", flat) for name in names), [n for n in names if n not in flat]
    assert len(max(text.splitlines(), key=len)) < 100  # no 2,000-character list


def test_threads_sets_torchs_cpu_threads(data_root, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(capsys, *tiny(data_root, tmp_path / "run", "--threads", 1, "--val-split", ""))[0] == 0
    assert calls == [1]


def test_log_line_shows_weighted_terms_that_add_up_to_the_loss(data_root, teacher_checkpoint, tmp_path, capsys):
    # a term at weight 0.001 must be readable: printed weighted, with significant digits, not 0.000
    out = tmp_path / "run"
    argv = tiny(data_root, out, "--teacher-checkpoint", teacher_checkpoint, "--kd", "pixel=0.001,cwd=3",
                "--log-every", 1, "--val-split", "")
    assert train.main(list(map(str, argv))) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("iter 2/2 ")][-1]
    total, terms = line.split(" | ")[1].removeprefix("loss ").split(" = ")
    printed = {name: float(value) for name, value in (term.split() for term in terms.split(" + "))}
    raw = read_log(out)[-1]  # log.jsonl: unweighted
    assert printed["ce"] == pytest.approx(raw["ce"], rel=5e-3)
    assert printed["pixel"] == pytest.approx(0.001 * raw["pixel"], rel=5e-3) and printed["pixel"] > 0
    assert printed["cwd"] == pytest.approx(3 * raw["cwd"], rel=5e-3)
    assert sum(printed.values()) == pytest.approx(float(total), rel=1e-2)


def test_a_teacher_no_term_uses_is_refused_with_the_fix(data_root, teacher_checkpoint, tmp_path, capsys):
    # without this, the run trains the student alone while loading (and running) the teacher
    out = tmp_path / "run"
    code, err = main(capsys, *tiny(data_root, out, "--teacher-checkpoint", teacher_checkpoint))
    assert code == 2 and "--teacher-checkpoint" in err and "--kd TERM=WEIGHT" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, err = main(capsys, *tiny(data_root, out, "--teacher-checkpoint", teacher_checkpoint, "--kd", "pixel=1",
                                   "--wide-teacher-checkpoint", teacher_checkpoint))
    assert code == 2 and "--wide-teacher-checkpoint" in err and "--kd mgd_pixel=1" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_out_naming_a_file_or_under_a_file(data_root, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    for out in (a_file, a_file / "run"):
        code, err = main(capsys, *tiny(data_root, out))
        assert code == 2 and str(a_file) in err and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "mine"


def nan_teacher(teacher_checkpoint, path):
    ckpt = torch.load(teacher_checkpoint, weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    torch.save(ckpt, path)
    return path


def test_teacher_with_nan_weights_stops_the_run_naming_it(data_root, teacher_checkpoint, tmp_path, capsys):
    bad = nan_teacher(teacher_checkpoint, tmp_path / "nan_teacher.pt")
    out = tmp_path / "run"
    code, err = main(capsys, *tiny(data_root, out, "--teacher-checkpoint", bad, "--kd", "pixel=1"))
    assert code == 2 and "nan_teacher.pt" in err and "not finite" in err, err
    assert not out.exists()


def test_check_divergence_thresholds():
    train.check_divergence(19, 19, 400, 600)  # 19 in a row, 4.75%: still occasional
    with pytest.raises(ValueError, match="20 in a row"):
        train.check_divergence(20, 20, 100, 600)
    train.check_divergence(2, 1, 49, 600)  # 4% ... and under 50 steps the share waits
    train.check_divergence(5, 1, 40, 600)
    with pytest.raises(ValueError, match="3 of 50"):
        train.check_divergence(3, 1, 50, 600)  # 6% > 5%
    with pytest.raises(ValueError, match="1 of 10"):
        train.check_divergence(1, 1, 10, 10)  # the last step of a short run: 10%


def test_a_diverging_run_stops_unfinished(data_root, tmp_path, monkeypatch, capsys):
    def nan_loss(output, labels, args, align_corners=False):
        return output["out"].sum() * float("nan")
    monkeypatch.setattr(train, "task_loss", nan_loss)
    out = tmp_path / "run"
    code, err = main(capsys, *tiny(data_root, out, "--checkpoint-every", 5, iters=30))
    assert code == 2 and "stopped at iteration 20" in err, err
    # what kd_seg's "finished" test sees: the last checkpoint is an earlier step, never iters
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 15
    assert not (out / "metrics.jsonl").exists()
    short = tmp_path / "short"
    code, err = main(capsys, *tiny(data_root, short, iters=4))  # every step of a short run
    assert code == 2 and "4 of 4" in err and not short.exists(), err


def empty_split_copy(data_root, tmp_path, split):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / f"{split}.txt").write_text("")
    return root


def test_empty_train_split_one_line_at_once(data_root, tmp_path):
    root = empty_split_copy(data_root, tmp_path, "train")
    # a subprocess with a timeout: an empty train split used to hang the sampler forever
    r = run_cli("train.py", *tiny(root, tmp_path / "run"), timeout=60)
    assert r.returncode == 2 and "--train-split 'train'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_empty_val_split_one_line_instead_of_miou_0(data_root, tmp_path, capsys):
    root = empty_split_copy(data_root, tmp_path, "val")
    code, err = main(capsys, *tiny(root, tmp_path / "run"))
    assert code == 2 and "--val-split 'val'" in err and not (tmp_path / "run").exists(), err


def test_broken_val_image_fails_before_the_first_step(data_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / "images" / "val" / "val_00003.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    out.mkdir()  # made by the user: a failed run leaves it as it was, and a rerun is accepted
    code = train.main(list(map(str, tiny(root, out))))
    captured = capsys.readouterr()
    assert code == 2 and "val_00003.png" in captured.err and "iter 1" not in captured.out
    assert out.is_dir() and not list(out.iterdir())
    code, err = main(capsys, *tiny(data_root, out))
    assert code == 0, err


def test_failed_final_evaluation_keeps_the_finished_training(data_root, tmp_path, monkeypatch, capsys):
    import eval as evaluation
    evaluate = evaluation.evaluate
    def broken(*args, **kwargs):
        raise ValueError("cannot read image val_00007.png: truncated")
    monkeypatch.setattr(evaluation, "evaluate", broken)
    out = tmp_path / "run"
    code, err = main(capsys, *tiny(data_root, out))
    assert code == 2 and "val_00007" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # kept, finished
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    assert main(capsys, "--out", out, "--resume")[0] == 0  # evaluates the finished run again
    assert [m["iter"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [2]


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704"),
                                   OSError(30, "Read-only file system")])
def test_full_or_read_only_disk_is_one_line_and_leaves_no_temporary_file(error, data_root, tmp_path,
                                                                         monkeypatch, capsys):
    def failing_save(state, path):
        Path(path).write_bytes(b"half a checkpoint")  # what a full disk leaves
        raise error
    monkeypatch.setattr(train.torch, "save", failing_save)
    out = tmp_path / "run"
    code, err = main(capsys, *tiny(data_root, out))
    assert code == 2 and "cannot write the checkpoint" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # neither checkpoint.tmp nor anything else


@pytest.mark.parametrize("error", [MemoryError, torch.OutOfMemoryError])
def test_out_of_memory_is_one_line_suggesting_a_smaller_batch(error, data_root, tmp_path, monkeypatch, capsys):
    import models
    build = models.build_model
    def oom_model(*args, **kwargs):
        model = build(*args, **kwargs)
        def forward(x):
            raise error("CUDA out of memory. Tried to allocate 20.00 GiB")
        model.forward = forward
        return model
    monkeypatch.setattr(models, "build_model", oom_model)
    code, err = main(capsys, *tiny(data_root, tmp_path / "run"))
    assert code == 2 and "--batch-size" in err and "--accumulate" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_resume_applies_given_iters_refuses_other_changes_and_logs_each_iteration_once(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(train_args(data_root, out, "--stop-at", 2, "--log-every", 1, "--eval-every", 1, iters=4))
    with open(out / "log.jsonl", "a") as f:  # the killed process logged past its checkpoint
        f.write(json.dumps({"iter": 3, "loss": 9.0}) + "\n" + '{"iter": 4, "lo')
    code, err = main(capsys, "--out", out, "--resume", "--lr", 0.5, "--data-root", tmp_path)
    assert code == 2 and "--lr 0.5 (saved 0.05)" in err and "--data-root" in err, err
    # --iters 600 is the default value, and given: it applies
    assert main(capsys, "--out", out, "--resume", "--iters", 600, "--stop-at", 3)[0] == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["iters"] == 600
    assert [row["iter"] for row in read_log(out)] == [1, 2, 3]
    metrics = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3]


def test_lengthening_a_finished_run_is_refused_with_the_command_of_the_longer_run(data_root, tmp_path, capsys):
    # a finished run's poly learning rate is 0; resuming it with a larger --iters used to raise
    # it again part-way, silently. The refusal prints the new run's command, which must work.
    import shlex
    out = tmp_path / "run"
    assert main(capsys, *tiny(data_root, out, "--imitation-warmup", 0, "--val-split", ""))[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    code, err = main(capsys, "--out", out, "--resume", "--iters", 4)
    assert code == 2 and "finished its 2 iterations" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "checkpoint.pt").read_bytes() == before
    command = shlex.split(err.split("a new run: ", 1)[1])
    assert command[:2] == ["python", "train.py"] and "--resume" not in command
    assert main(capsys, *command[2:])[0] == 0
    longer = torch.load(tmp_path / "run_4" / "checkpoint.pt", weights_only=True)
    old = torch.load(out / "checkpoint.pt", weights_only=True)["args"]
    assert longer["step"] == 4 and {k for k in old if old[k] != longer["args"][k]} == {"iters", "out"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(data_root, tmp_path, capsys):
    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = main(capsys, *tiny(data_root, locked / "run"))
    finally:
        locked.chmod(0o755)
    assert code == 2 and str(locked) in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------
# Real data: CamVid, SKD's published ESPNets as teachers (conftest.find_real_data).
@needs_real_data
@pytest.mark.parametrize("student, terms", [
    ("espnet_c", ["--kd", "pixel=1,consistency=1,pairwise=0.5,holistic=0.1,imitation=0.01,cwd=3,cwd_feat=50,"
                  "unlabeled=1", "--imitation-warmup", "0"]),
    ("espnet", ["--kd", "mgd_pixel=1,mgd_image=0.001,mgd_region=100"])])
def test_espnet_students_distil_every_term_from_skd_published_espnets_on_camvid(student, terms, tmp_path):
    # every term through ESPNet's 256-channel 1/8 feature (pair-wise, FGFI, CWD features, MGD
    # region), real images, SKD's ESPNet 65.1 as T_D and its ESPNet-C 64.1 as T_W
    out = tmp_path / student
    argv = ["--dataset", "camvid", "--data-root", CAMVID, "--model", student, "--out", out, "--iters", 3,
            "--batch-size", 2, "--crop-size", 64, 96, "--val-split", "", "--device", "cpu", "--log-every", 1,
            "--lr", 0.01, "--teacher-checkpoint", SKD_CAMVID / "ESP" / "SD+KD+CITY_65.1.pth",
            "--unlabeled-root", CAMVID / "val", *terms]
    if student == "espnet":  # T_W: only MGD's terms use it (train.py refuses it otherwise)
        argv += ["--wide-teacher-checkpoint", SKD_CAMVID / "esp-c" / "KD+CITY+SD_64.1.pth"]
    train.train(train.get_args_parser().parse_args(list(map(str, argv))))
    log = read_log(out)
    assert len(log) == 3 and all(math.isfinite(v) for row in log for k, v in row.items() if k != "iter")
    expected = {"ce", "pixel", "consistency", "pairwise", "holistic", "imitation", "cwd", "cwd_feat", "u_ce"} \
        if student == "espnet_c" else {"ce", "mgd_pixel", "u_mgd_pixel", "mgd_image", "mgd_region"}
    assert expected <= set(log[0])
    # the trained ESPNet is a kd-seg checkpoint that teaches in turn
    train.train(train.get_args_parser().parse_args(list(map(str, [
        "--dataset", "camvid", "--data-root", CAMVID, "--model", "espnet_c", "--out", tmp_path / "next", "--iters", 1,
        "--batch-size", 2, "--crop-size", 64, 96, "--val-split", "", "--device", "cpu",
        "--teacher-checkpoint", out / "checkpoint.pt", "--kd", "pixel=1,pairwise=0.5"]))))
    assert (tmp_path / "next" / "checkpoint.pt").is_file()


def test_adam_optimizer_trains_and_resumes(data_root, tmp_path):
    # ESPNet's own training uses Adam; its state is saved and resumed like SGD's
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--optimizer", "adam", "--lr", 0.005, "--weight-decay", 5e-4]
    train.train(train_args(data_root, straight, *flags, iters=4, model="espnet_c"))
    train.train(train_args(data_root, resumed, *flags, "--stop-at", 2, iters=4, model="espnet_c"))
    train.train(train.get_args_parser().parse_args(["--out", str(resumed), "--resume"]))
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (straight, resumed))
    assert "exp_avg" in a["optimizer"]["state"][0] and a["args"]["optimizer"] == "adam"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_task_loss_upsamples_as_the_model_is_scored():
    """Train as scored: an ESPNet (scored with align_corners=True, as SKD's eval_esp.py) trains
    on logits upsampled with True, a DeepLab (scored with False) with False; eval.logits_full
    reads the same attribute."""
    import models
    import torch.nn.functional as F
    args = train.get_args_parser().parse_args(["--device", "cpu"])
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 11, 12, 16), torch.randint(0, 11, (2, 96, 128))

    def ce(corners):
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=corners)
        return F.cross_entropy(up, labels, ignore_index=255)
    for name, corners in (("espnet_c_p1q2", True), ("deeplabv3plus_resnet18_micro", False)):
        model = models.build_model(name, 11)
        assert train.scored_corners(model) is corners
        loss = train.task_loss({"out": logits}, labels, args, train.scored_corners(model))
        assert torch.allclose(loss, ce(corners)) and not torch.allclose(loss, ce(not corners))
