"""eval.py: the confusion-matrix mIoU, the CLI, prediction PNGs, submission files, FPS, GMACs,
bad input and the output-folder lock."""
import glob
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
from conftest import CAMVID, REPO, SKD_CAMVID, needs_real_data, run_cli
from test_datasets import make_voc, write_label


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
    assert "GMACs" in r.stdout
    out = json.loads(result.read_text())
    assert 0 <= out["metrics"]["miou"] <= 1 and out["fps"]["fps"] > 0 and out["gmacs"] > 0
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


def test_readme_cost_command_for_an_untrained_model():
    # the README's `eval.py --model espnet_c --num-classes 11 --fps --fps-size 360 480`, at smoke scale
    r = run_cli("eval.py", "--model", "espnet_c", "--num-classes", "11", "--fps", "--fps-size", "360", "480",
                "--fps-iters", "2", "--fps-seconds", "0.1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0.35" in r.stdout and "1.14" in r.stdout, r.stdout   # params (M), GMACs at 360x480


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
    with pytest.raises(ValueError, match="broken.pt: truncated or corrupt checkpoint"):
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
    """Logits from each pixel's colour alone (a 1x1 conv): no context, so windows change nothing,
    and its argmax at the image's own size is `conv(image).argmax(1)`."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


# ----------------------------------------------------------------------------- costs as deployed
def test_costs_leave_out_the_auxiliary_head():
    # The aux head only trains: params, MACs and FPS of aux=True must be those of aux=False.
    torch.manual_seed(0)
    with_aux = models.build_model("pspnet_resnet18_micro", 19, output_stride=8, aux=True)
    without = models.build_model("pspnet_resnet18_micro", 19, output_stride=8)
    aux_params = sum(p.numel() for p in with_aux.aux_head.parameters())
    assert aux_params > 0
    assert sum(p.numel() for p in with_aux.parameters()) == evaluation.count_params(without) + aux_params
    assert evaluation.count_params(with_aux) == evaluation.count_params(without)
    assert evaluation.count_gmacs(with_aux, (64, 64)) == evaluation.count_gmacs(without, (64, 64))
    assert with_aux.train()(torch.randn(2, 3, 64, 64)).keys() == {"out", "feat", "aux"}
    assert "aux" not in with_aux.eval()(torch.randn(1, 3, 64, 64))  # what FPS times


def test_gmacs_match_torchvisions_published_deeplabv3_resnet101():
    # torchvision's model table: deeplabv3_resnet101 (21 classes, output stride 8, with its aux
    # FCNHead) has 60,996,202 parameters and 258.743 "GFLOPS" at 520x520, which are multiply-adds.
    # kd-seg's same configuration gives exactly that: the deployed network (count_gmacs) plus the
    # aux head run on layer3's feature. On the meta device nothing is computed: about 2 s.
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = models.build_model("deeplabv3_resnet101", 21, output_stride=8, aux=True).eval()
        layer3 = torch.zeros(1, model.backbone.middle_channels, 65, 65)  # 520 / 8
    aux_counter = FlopCounterMode(display=False)
    with aux_counter, torch.no_grad():
        model.aux_head(layer3)
    deployed = evaluation.count_gmacs(model, (520, 520))
    assert round(deployed + aux_counter.get_total_flops() / 2e9, 3) == 258.743
    assert sum(p.numel() for p in model.parameters()) == 60_996_202
    assert round(deployed, 3) == 248.752  # what kd-seg reports: the aux head never runs at test time
    aux_params = sum(p.numel() for p in model.aux_head.parameters())
    assert evaluation.count_params(model) == 60_996_202 - aux_params == 58_630_997


# ----------------------------------------------------------------------------- submission files
# docs/DATASETS.md's labelId -> trainId table, written out here so the test does not read datasets.py's.
LABEL_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_STEMS = ["frankfurt_000000_000294", "frankfurt_000001_007973", "lindau_000000_000019"]


def write_random_image(path, size, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_cityscapes_val(root, size=(24, 16)):
    """Cityscapes val in its own layout: 3 images in 2 cities, random labelIds 0..33 (ignored ids
    included)."""
    rng = np.random.default_rng(0)
    for stem in CITYSCAPES_STEMS:
        city = stem.split("_")[0]
        write_random_image(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", size, rng)
        write_label(str(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"),
                    rng.integers(0, 34, (size[1], size[0])))
    return root


def make_ade20k_val(root, size=(24, 16)):
    rng = np.random.default_rng(1)
    base = root / "ADEChallengeData2016"
    for name in ["ADE_val_00000001", "ADE_val_00000002"]:
        write_random_image(base / "images" / "validation" / f"{name}.jpg", size, rng)
        write_label(str(base / "annotations" / "validation" / f"{name}.png"),
                    rng.integers(0, 151, (size[1], size[0])))
    return root


def pointwise_argmax(model, image):
    with torch.no_grad():
        return model.conv(image[None])[0].argmax(0).numpy()


@pytest.mark.parametrize("name, make, split, num_classes", [
    ("cityscapes", make_cityscapes_val, "val", 19),
    ("ade20k", make_ade20k_val, "val", 150),
    ("voc", lambda root: make_voc(str(root)) and root, "val", 21),  # make_voc returns VOC2012
])
def test_submission_files_hold_the_predictions_in_the_datasets_own_ids(tmp_path, name, make,
                                                                        split, num_classes):
    torch.manual_seed(0)
    model = PointwiseModel(num_classes).eval()
    dataset = datasets.build_dataset(name, str(make(tmp_path / name)), split)
    out = tmp_path / "submission"
    evaluation.save_submission(model, dataset, name, out, "cpu")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in dataset.image_paths]
    # one flat folder, one file per image, named after the image (plus kd-seg's marker)
    expected = sorted([stem + ".png" for stem in stems] + ["kd_seg_run.json"])
    assert sorted(f.name for f in out.iterdir()) == expected
    for index, stem in enumerate(stems):
        written = Image.open(out / f"{stem}.png")
        ids = np.array(written)
        prediction = pointwise_argmax(model, dataset[index][0])
        if name == "cityscapes":  # labelIds, single channel; back to trainIds with docs/DATASETS.md's table
            assert written.mode == "L" and set(np.unique(ids)) <= set(LABEL_ID_TO_TRAIN_ID)
            assert np.array_equal(np.vectorize(LABEL_ID_TO_TRAIN_ID.get)(ids), prediction)
        elif name == "ade20k":  # ids 1..150, 0 ("other") never predicted
            assert written.mode == "L" and ids.min() >= 1
            assert np.array_equal(ids, prediction + 1)
        else:  # VOC: palette PNG of VOC ids with the VOC colour map
            assert written.mode == "P" and np.array_equal(ids, prediction)
            colours = np.array(written.convert("RGB"))
            assert all(tuple(colours[y, x]) == datasets.voc_palette(21)[ids[y, x]]
                       for y, x in [(0, 0), (3, 5), (5, 7)])
        assert len(np.unique(prediction)) > 1  # the check sees more than one class


def test_submission_is_resumable_and_refuses_other_files(tmp_path):
    model = PointwiseModel(19).eval()
    dataset = datasets.build_dataset("cityscapes", str(make_cityscapes_val(tmp_path / "cs")), "val")
    out, owner = tmp_path / "submission", {"checkpoint": "a"}
    evaluation.save_submission(model, dataset, "cityscapes", out, "cpu", owner=owner)
    first = out / f"{CITYSCAPES_STEMS[0]}_leftImg8bit.png"
    first.unlink()
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    evaluation.save_submission(model, dataset, "cityscapes", out, "cpu", owner=owner)  # resumes
    assert first.exists() and all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert not list(out.glob(".*"))  # no temporary file left
    with pytest.raises(ValueError, match="another run"):
        evaluation.save_submission(model, dataset, "cityscapes", out, "cpu", owner={"checkpoint": "b"})
    (out / "frankfurt_000000_000294_leftImg8bit_color.png").write_bytes(b"")  # a second match
    with pytest.raises(ValueError, match="no file of this submission"):
        evaluation.save_submission(model, dataset, "cityscapes", out, "cpu", owner=owner)
    with pytest.raises(ValueError, match="no official format"):
        evaluation.save_submission(model, dataset, "camvid", tmp_path / "other", "cpu")


def test_submission_cli_needs_a_dataset_with_an_official_format(tmp_path):
    r = run_cli("eval.py", "--checkpoint", tmp_path / "run.pt", "--data-root", tmp_path,
                "--dataset", "camvid", "--submission", tmp_path / "sub")
    assert r.returncode == 2 and "--submission" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sub").exists()


def test_cityscapesscripts_reads_the_submission_and_agrees_with_eval_py(tmp_path, monkeypatch):
    # The official evaluation (not a CI dependency: runs only where it is installed) finds each
    # ground truth's file in the submission folder by its own rule (getPrediction) and gives
    # exactly eval.py's mIoU over the same images. Its instance-level score is switched off: it
    # needs instanceIds files and calls np.in1d, which numpy 2.4 removed.
    pytest.importorskip("cityscapesscripts")
    root = make_cityscapes_val(tmp_path / "cityscapes")
    monkeypatch.setenv("CITYSCAPES_DATASET", str(root))  # read when the module is imported
    sys.modules.pop("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling", None)
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    torch.manual_seed(0)
    model = PointwiseModel(19).eval()
    dataset = datasets.build_dataset("cityscapes", str(root), "val")
    evaluation.save_submission(model, dataset, "cityscapes", tmp_path / "submission", "cpu")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1)
    miou = evaluation.evaluate(model, loader, "cpu", dataset.num_classes)["miou"]
    args = official.args
    args.predictionPath, args.evalInstLevelScore, args.JSONOutput, args.quiet = (
        str(tmp_path / "submission"), False, False, True)
    ground_truth = sorted(glob.glob(args.groundTruthSearch))
    assert len(ground_truth) == 3
    result = official.evaluateImgLists([official.getPrediction(args, gt) for gt in ground_truth],
                                       ground_truth, args)
    assert result["averageScoreClasses"] == pytest.approx(miou, abs=1e-12)


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


# ----------------------------------------------------------------------------------------------
# Real data: CamVid and SKD's published CamVid students (conftest.find_real_data).


@needs_real_data
@pytest.mark.parametrize("file, official", [("ESP/SD+KD+CITY_65.1.pth", 65.13), ("esp-c/BASE56.7.pth", 56.75)])
def test_skd_published_camvid_student_scores_its_published_miou(file, official, tmp_path):
    # The README's command on the whole 233-image test split. `official`: SKD's own model code and
    # eval_esp.py protocol on the same files and images (2 decimals); kd-seg must agree to 0.05.
    r = run_cli("eval.py", "--checkpoint", SKD_CAMVID / file, "--dataset", "camvid", "--data-root", CAMVID,
                "--split", "test", "--device", "cpu", "--json", tmp_path / "result.json", timeout=600)
    assert r.returncode == 0, r.stderr
    miou = 100 * json.loads((tmp_path / "result.json").read_text())["metrics"]["miou"]
    assert abs(miou - official) < 0.05, miou
    assert f"mIoU        {miou:.2f}" in r.stdout and "Bicyclist" in r.stdout


@needs_real_data
def test_camvid_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    espnet = SKD_CAMVID / "ESP" / "base_57.8.pth"
    result = tmp_path / "result.json"
    # a CamVid root in another layout: no test/ folder
    other = tmp_path / "not_camvid"
    (other / "images").mkdir(parents=True)
    code, err = eval_main(capsys, "--checkpoint", espnet, "--dataset", "camvid", "--data-root", other,
                          "--split", "test", "--device", "cpu", "--json", result)
    assert code == 2 and "CamVid split 'test'" in err and str(other) in err, err
    # labels missing beside the images
    (other / "test").mkdir()
    shutil.copy(CAMVID / "test" / "0001TP_008550.png", other / "test")
    code, err = eval_main(capsys, "--checkpoint", espnet, "--dataset", "camvid", "--data-root", other,
                          "--split", "test", "--device", "cpu", "--json", result)
    assert code == 2 and "testannot" in err and "0001TP_008550.png" in err, err
    # a truncated file
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(espnet.read_bytes()[:100_000])
    code, err = eval_main(capsys, "--checkpoint", truncated, "--dataset", "camvid", "--data-root", CAMVID,
                          "--split", "test", "--device", "cpu", "--json", result)
    assert code == 2 and "truncated.pth" in err and len(err.strip().splitlines()) == 1, err
    # a window the network cannot take (it ran and scored garbage, exit 0)
    code, err = eval_main(capsys, "--checkpoint", espnet, "--dataset", "camvid", "--data-root", CAMVID,
                          "--split", "test", "--device", "cpu", "--window", "1", "1", "--json", result)
    assert code == 2 and "--window 1 1" in err and "at least 16" in err, err
    assert not result.exists()


@needs_real_data
def test_espnet_class_count_other_than_the_datasets_is_refused(data_root, capsys):
    code, err = eval_main(capsys, "--checkpoint", SKD_CAMVID / "esp-c" / "KD58.7.pth", "--data-root", data_root,
                          "--device", "cpu")
    assert code == 2 and "checkpoint has 11 classes, the dataset has 8" in err, err


@needs_real_data
def test_published_teacher_pseudo_labels_a_folder(tmp_path, capsys):
    # Zhu et al.'s offline labels from a published file (which names no dataset): class ids, with
    # generated colours for the pictures
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("0001TP_008550.png", "0001TP_008580.png"):
        shutil.copy(CAMVID / "test" / name, folder)
    code, err = eval_main(capsys, "--checkpoint", SKD_CAMVID / "esp-c" / "KD58.7.pth", "--dataset", "folder",
                          "--data-root", folder, "--save-pred", tmp_path / "pseudo", "--threshold", 0.5,
                          "--device", "cpu")
    assert code == 0, err
    labels = [np.array(Image.open(tmp_path / "pseudo" / n)) for n in ("0001TP_008550.png", "0001TP_008580.png")]
    assert all(label.shape == (360, 480) and set(np.unique(label)) <= set(range(11)) | {255} for label in labels)
    assert (tmp_path / "pseudo" / "color" / "0001TP_008550.png").is_file()


# ----------------------------------------------------------------------------- the coursework path (issue 31)
def run_folder_copy(checkpoint, folder):
    """A train.py run folder (checkpoint.pt beside args.json) holding `checkpoint`."""
    folder.mkdir()
    shutil.copy(checkpoint, folder / "checkpoint.pt")
    shutil.copy(checkpoint.parent / "args.json", folder / "args.json")
    return folder / "checkpoint.pt"


def test_checkpoint_knows_its_dataset_and_results_go_to_its_run_folder(data_root, teacher_checkpoint, tmp_path, capsys):
    voc = tmp_path / "voc"
    make_voc(voc)
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text("{}")
    torch.save({"model": models.build_model("deeplabv3plus_mobilenetv2_tiny", 21).state_dict(),
                "args": {"model": "deeplabv3plus_mobilenetv2_tiny", "num_classes": 21, "dataset": "voc"}},
               run / "checkpoint.pt")
    code, err = eval_main(capsys, "--checkpoint", run / "checkpoint.pt", "--data-root", voc, "--device", "cpu")
    assert code == 0, err  # no --dataset: the checkpoint's (it was synthetic, which failed on this folder)
    results = json.loads((run / "eval_val.json").read_text())
    assert len(results["classes"]) == 21 and results["classes"]["tvmonitor"]["iou"] is not None
    assert "| tvmonitor |" in (run / "eval_val.md").read_text() and "mIoU" in (run / "eval_val.md").read_text()
    assert eval_main(capsys, "--checkpoint", run / "checkpoint.pt", "--data-root", voc, "--device", "cpu")[0] == 0
    (run / "eval_val.md").write_text("my notes")  # a file eval.py did not write: refused, kept
    code, err = eval_main(capsys, "--checkpoint", run / "checkpoint.pt", "--data-root", voc, "--device", "cpu")
    assert code == 2 and "eval_val.md" in err and (run / "eval_val.md").read_text() == "my notes", err
    # a dataset folder given without its name never gets advice to write the benchmark into it
    copy = tmp_path / "copy.pt"  # no args.json beside it: nothing written beside it
    shutil.copy(teacher_checkpoint, copy)
    code, err = eval_main(capsys, "--checkpoint", copy, "--data-root", voc, "--device", "cpu")
    assert code == 2 and "make_synthetic" not in err and "voc" in err and len(err.strip().splitlines()) == 1, err
    code, err = eval_main(capsys, "--checkpoint", copy, "--data-root", data_root, "--device", "cpu")
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["copy.pt", "run", "voc"], err


def test_evaluation_prints_progress_with_an_eta(data_root, capsys):
    model = models.build_model("deeplabv3plus_mobilenetv2_tiny", 8)
    loader = torch.utils.data.DataLoader(datasets.build_dataset("synthetic", data_root, "val"), batch_size=4)
    evaluation.evaluate(model, loader, "cpu", 8, progress="evaluating val", log_seconds=0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("evaluating val 4/16 |") and "eta" in lines[0] and len(lines) == 4, lines
    evaluation.evaluate(model, loader, "cpu", 8, progress="evaluating val")  # under 5 s: silent
    assert capsys.readouterr().out == ""


def test_folder_without_labels_says_predictions_only_and_writes_them(data_root, teacher_checkpoint, tmp_path, capsys):
    unlabeled = data_root / "images" / "unlabeled"
    checkpoint = run_folder_copy(teacher_checkpoint, tmp_path / "run")
    code = evaluation.report_errors(evaluation.main, evaluation.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--dataset", "folder", "--data-root", str(unlabeled), "--device", "cpu"]))
    out = capsys.readouterr().out
    assert code == 0 and "32 images without labels: predictions only (no mIoU)" in out, out
    assert len(list((tmp_path / "run" / "pred_unlabeled").glob("*.png"))) == 32
    shutil.copy(teacher_checkpoint, tmp_path / "copy.pt")  # not in a run folder: where to, then?
    code, err = eval_main(capsys, "--checkpoint", tmp_path / "copy.pt", "--dataset", "folder", "--data-root",
                          unlabeled, "--device", "cpu")
    assert code == 2 and "--save-pred DIR" in err and len(err.strip().splitlines()) == 1, err
