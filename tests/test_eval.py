"""eval.py: the confusion-matrix mIoU, the CLI, prediction PNGs, FPS, bad input and the
output-folder lock."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import eval as evaluation
import models
import train
from conftest import REPO, run_cli


def test_miou_closed_form_with_absent_class_and_ignore():
    # 3 classes; class 2 never occurs except under an ignored pixel, so it is left out.
    target = torch.tensor([0, 0, 1, 1, 255])
    pred = torch.tensor([0, 1, 1, 1, 2])
    cm = evaluation.ConfusionMatrix(3)
    cm.update(pred, target)
    m = cm.compute()
    # class 0: TP 1, union 2 -> 1/2; class 1: TP 2, union 3 -> 2/3
    assert m["iou"][0] == pytest.approx(0.5)
    assert m["iou"][1] == pytest.approx(2 / 3)
    assert m["iou"][2] is None
    assert m["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["acc"] == pytest.approx(3 / 4)


def test_predicted_but_absent_class_counts_as_zero():
    cm = evaluation.ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    m = cm.compute()
    assert m["iou"] == [pytest.approx(0.5), 0.0]
    assert m["miou"] == pytest.approx(0.25)


def test_confusion_accumulates_over_batches():
    a, b = evaluation.ConfusionMatrix(4), evaluation.ConfusionMatrix(4)
    pred, target = torch.randint(0, 4, (2, 8, 8)), torch.randint(0, 4, (2, 8, 8))
    a.update(pred, target)
    b.update(pred[:1], target[:1])
    b.update(pred[1:], target[1:])
    assert torch.equal(a.mat, b.mat)


def test_eval_cli_metrics_pngs_and_fps(data_root, teacher_checkpoint, tmp_path):
    pred_dir, result = tmp_path / "pred", tmp_path / "result.json"
    r = run_cli("eval.py", "--checkpoint", teacher_checkpoint, "--data-root", data_root,
                "--split", "val", "--save-pred", pred_dir, "--fps", "--fps-size", "64", "64",
                "--fps-iters", "3", "--fps-seconds", "1", "--device", "cpu", "--json", result)
    assert r.returncode == 0, r.stderr
    assert "mIoU" in r.stdout and "FPS" in r.stdout and "disk" in r.stdout  # class-name table
    out = json.loads(result.read_text())
    assert 0 <= out["metrics"]["miou"] <= 1 and out["fps"]["fps"] > 0 and out["gflops"] > 0
    label = Image.open(pred_dir / "val_00000.png")
    assert label.mode == "P"
    assert Image.open(pred_dir / "confidence" / "val_00000.png").mode == "L"
    assert Image.open(pred_dir / "color" / "val_00000.png").mode == "RGB"
    assert len(list(pred_dir.glob("*.png"))) == 16


def test_pseudo_labels_threshold_resume_and_diagnostics(data_root, teacher_checkpoint, tmp_path):
    teacher, _ = evaluation.load_checkpoint(teacher_checkpoint)
    images = datasets.build_dataset("folder", data_root / "images" / "unlabeled", None, classes_from="synthetic")
    # threshold 1.0: nothing is that confident, every pixel ignored
    evaluation.save_predictions(teacher, images, tmp_path / "all_ignored", "cpu", threshold=1.0)
    assert np.all(datasets.read_label_png(tmp_path / "all_ignored" / "unlabeled_00000.png") == 255)
    # threshold 0: full coverage, ids and confidence round-trip
    out = tmp_path / "pseudo"
    evaluation.save_predictions(teacher, images, out, "cpu", threshold=0.0, owner={"t": 0})
    ids = datasets.read_label_png(out / "unlabeled_00003.png")
    assert ids.max() < 8
    image, _ = images[3]
    probs = evaluation.predict(teacher, image[None], image.shape[-2:])[0]
    assert np.array_equal(ids, probs.argmax(0).numpy())
    conf = np.array(Image.open(out / "confidence" / "unlabeled_00003.png"))
    assert np.abs(conf / 255 - probs.max(0).values.numpy()).max() <= 1 / 255 + 1e-6
    # an interrupted run: delete two files, rerun -> only those are redone
    (out / "unlabeled_00005.png").unlink()
    (out / "unlabeled_00006.png").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    evaluation.save_predictions(teacher, images, out, "cpu", threshold=0.0, owner={"t": 0})
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert (out / "unlabeled_00005.png").exists() and not list(out.rglob("*.tmp"))
    # another run's folder is refused
    with pytest.raises(ValueError, match="another run"):
        evaluation.save_predictions(teacher, images, out, "cpu", threshold=0.5, owner={"t": 1})
    rows = evaluation.pseudo_label_diagnostics(out, datasets.build_dataset("synthetic", data_root, "unlabeled"))
    assert rows[0]["coverage"] == pytest.approx(1.0)
    coverages = [r["coverage"] for r in rows]
    assert coverages == sorted(coverages, reverse=True)  # a higher threshold keeps fewer pixels
    evaluation.plot_diagnostics(rows, tmp_path / "plot.png")
    assert Image.open(tmp_path / "plot.png").size == (420, 300)


def test_folder_we_did_not_write_is_refused(tmp_path):
    (tmp_path / "someone_elses.txt").write_text("x")
    with pytest.raises(ValueError, match="did not write"):
        evaluation.claim_output_dir(tmp_path, {})


def test_fps_protocol_fields():
    model = models.build_model("deeplabv2_mobilenetv2_tiny", 8)
    r = evaluation.measure_fps(model, (32, 32), "cpu", iters=3, min_seconds=1)
    assert r["iters"] == 3 and r["fps"] > 0 and "cpu" in r["device"] and r["upsample_argmax"]


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "missing.pt", "--data-root", "x"], "not found"),
    (["--model", "nope", "--num-classes", "3", "--fps"], "unknown"),
    (["--model", "deeplabv2_resnet18", "--fps"], "num-classes"),
])
def test_eval_bad_input_one_line(argv, message):
    r = run_cli("eval.py", *argv)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_checkpoint_of_other_class_count_or_corrupt(teacher_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="classes"):
        evaluation.load_checkpoint(teacher_checkpoint, expect_classes=19)
    with pytest.raises(ValueError, match="holds model"):
        evaluation.load_checkpoint(teacher_checkpoint, expect_model="pspnet_resnet18")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(teacher_checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a kd-seg checkpoint"):
        evaluation.load_checkpoint(broken)


def test_sliding_window_covers_the_image_and_equals_plain_when_the_window_fits():
    torch.manual_seed(0)
    model = models.build_model("deeplabv3_resnet18_micro", 3, output_stride=8).eval()
    images = torch.randn(1, 3, 40, 56)
    plain = evaluation.predict(model, images, (40, 56))
    assert torch.allclose(evaluation.predict(model, images, (40, 56), window=(64, 64)), plain)
    windowed = evaluation.predict(model, images, (40, 56), window=(24, 32))
    assert windowed.shape == plain.shape and torch.isfinite(windowed).all()
    assert torch.allclose(windowed.sum(1), torch.ones(1, 40, 56), atol=1e-5)  # every pixel covered
    # a 1x1-conv "model" sees no context: windowed and plain logits agree exactly
    pointwise = PointwiseModel()
    assert torch.allclose(evaluation.predict(pointwise, images, (40, 56), window=(24, 32)),
                          evaluation.predict(pointwise, images, (40, 56)), atol=1e-6)
    # a 1x1 window (a stride of 2/3 of it would be 0) still tiles the image
    small = images[..., :5, :7]
    assert torch.allclose(evaluation.predict(pointwise, small, (5, 7), window=(1, 1)),
                          evaluation.predict(pointwise, small, (5, 7)), atol=1e-6)


class PointwiseModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


# ----------------------------------------------------------------------------- faults (issue 14)
def eval_main(capsys, *argv):
    """eval.py's command line, in this process (fast): (exit code, stderr)."""
    code = evaluation.report_errors(evaluation.main, evaluation.get_args_parser().parse_args(list(map(str, argv))))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["--scales", "0"], "--scales"), (["--scales", "1", "-1"], "--scales"), (["--scales", "nan"], "--scales"),
    (["--fps-size", "0", "0"], "--fps-size"), (["--threads", "-1"], "--threads"),
    (["--window", "0", "0"], "--window"), (["--workers", "-1"], "--workers"),
    (["--threshold", "nan"], "--threshold"), (["--device", "nonsense"], "--device"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_eval_bad_option_values_one_line(argv, option, data_root, teacher_checkpoint, capsys):
    code, err = eval_main(capsys, "--checkpoint", teacher_checkpoint, "--data-root", data_root, *argv)
    assert code == 2 and option in err and len(err.strip().splitlines()) == 1, err


def test_json_naming_a_folder_leaves_no_temporary_file(data_root, teacher_checkpoint, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    code, err = eval_main(capsys, "--checkpoint", teacher_checkpoint, "--data-root", data_root,
                          "--device", "cpu", "--json", folder)
    assert code == 2 and "--json" in err and str(folder) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"] and not list(folder.iterdir())


def test_eval_empty_split_and_nan_model_are_one_line(data_root, teacher_checkpoint, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / "val.txt").write_text("")
    code, err = eval_main(capsys, "--checkpoint", teacher_checkpoint, "--data-root", root, "--device", "cpu")
    assert code == 2 and "--split 'val'" in err, err  # not "mIoU 0.0", exit 0
    ckpt = torch.load(teacher_checkpoint, weights_only=True)
    ckpt["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "nan.pt")
    pred = tmp_path / "pseudo"
    code, err = eval_main(capsys, "--checkpoint", tmp_path / "nan.pt", "--dataset", "folder", "--data-root",
                          data_root / "images" / "unlabeled", "--save-pred", pred, "--device", "cpu")
    assert code == 2 and "nan.pt" in err and "not finite" in err and not pred.exists(), err


def test_worker_error_on_a_truncated_image_is_one_line(data_root, teacher_checkpoint, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    image = root / "images" / "val" / "val_00005.png"
    image.write_bytes(image.read_bytes()[:300])  # the header reads, the pixels do not
    # the CLI is the subject: its default 2 loader workers, whose error carries their traceback
    r = run_cli("eval.py", "--checkpoint", teacher_checkpoint, "--data-root", root, "--device", "cpu")
    assert r.returncode == 2 and "val_00005.png" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_documented_pseudo_label_command_resumes_by_weights_not_path(data_root, teacher_checkpoint,
                                                                     wide_teacher_checkpoint, tmp_path, capsys):
    checkpoint, pseudo = tmp_path / "teacher.pt", tmp_path / "pseudo"
    shutil.copy(teacher_checkpoint, checkpoint)
    # the README's command, without --split (the folder itself is the images)
    argv = ["--dataset", "folder", "--data-root", data_root / "images" / "unlabeled", "--save-pred", pseudo,
            "--threshold", 0.5, "--flip", "--device", "cpu"]
    assert eval_main(capsys, "--checkpoint", checkpoint, *argv)[0] == 0
    assert len(list(pseudo.glob("*.png"))) == 32
    (pseudo / ".unlabeled_00003.png.tmp").write_bytes(b"half a png")  # a kill between write and rename
    moved = tmp_path / "moved.pt"  # the same weights under another name: the same labels, resumed
    shutil.copy(checkpoint, moved)
    assert eval_main(capsys, "--checkpoint", moved, *argv)[0] == 0
    assert not list(pseudo.rglob("*.tmp"))
    shutil.copy(wide_teacher_checkpoint, checkpoint)  # other weights at the same path: refused
    code, err = eval_main(capsys, "--checkpoint", checkpoint, *argv)
    assert code == 2 and "another run" in err, err


def test_second_writer_is_refused_and_a_stale_lock_taken_over(data_root, teacher_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    lock = tmp_path / "out.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, eval\nwith eval.lock_output_dir(sys.argv[1]):\n"
         "    print('locked', flush=True)\n    time.sleep(300)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock.read_text().strip() == str(holder.pid)
        with pytest.raises(ValueError, match=f"{out}.*process {holder.pid}"):
            with evaluation.lock_output_dir(out):
                pass
        # the commands that write a folder: one line naming it and the writer's pid
        train_argv = ["--data-root", data_root, "--out", out, "--iters", 1, "--device", "cpu"]
        assert train.main(list(map(str, train_argv))) == 2
        err = capsys.readouterr().err
        assert str(out) in err and str(holder.pid) in err and len(err.strip().splitlines()) == 1, err
        code, err = eval_main(capsys, "--checkpoint", teacher_checkpoint, "--data-root", data_root,
                              "--device", "cpu", "--save-pred", out)
        assert code == 2 and str(holder.pid) in err, err
    finally:
        holder.kill()  # kill -9: no chance to clean up, the lock stays behind
        holder.wait()
    assert lock.exists()
    with evaluation.lock_output_dir(out):  # stale: its process is gone, taken over
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()
    with pytest.raises(KeyError):  # released on an error too
        with evaluation.lock_output_dir(out):
            raise KeyError("boom")
    assert not lock.exists()
