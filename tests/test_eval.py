"""eval.py: the confusion-matrix mIoU, the CLI, prediction PNGs, FPS and bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import eval as evaluation
import models
from conftest import run_cli


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


class PointwiseModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_published_checkpoint_evaluates_and_teaches(data_root, tmp_path):
    # Issue 16: a file in a published layout (here CIRKD's DeepLabV3, the deep-stem ResNet-18 with
    # BGR / Caffe-mean input) works wherever a kd-seg checkpoint does: eval.py reports its mIoU,
    # train.py distils from it; a class count other than the dataset's is refused.
    import train
    from conftest import train_args
    num_classes = datasets.build_dataset("synthetic", data_root, "val").num_classes
    state = models.build_model("deeplabv3_resnet18_v1s", num_classes, aux=True).state_dict()
    from test_models import PUBLISHED
    torch.save(models.rename_keys(state, PUBLISHED["deeplabv3_resnet18_v1s"], inverse=True), tmp_path / "cirkd.pth")
    args = evaluation.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "cirkd.pth"), "--data-root", str(data_root), "--split", "val", "--device", "cpu"])
    assert 0 <= evaluation.main(args)["metrics"]["miou"] <= 1
    with pytest.raises(ValueError, match=f"checkpoint has {num_classes} classes, the dataset has 19"):
        evaluation.load_checkpoint(tmp_path / "cirkd.pth", expect_classes=19)
    train.train(train_args(data_root, tmp_path / "student", "--teacher-checkpoint", tmp_path / "cirkd.pth",
                           "--kd", "pixel=1", iters=2, model="pspnet_resnet18_micro"))
    assert (tmp_path / "student" / "checkpoint.pt").is_file()
