"""Your own data from the command line (docs/DATASETS.md, `folder`): the documented example run
exactly as printed, the classes travelling in the checkpoint, and every bad input in one line.

Run: python -m pytest -q tests/test_own_data.py
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import datasets
import eval as evaluation
import train
from conftest import REPO


def docs_example():
    """The shell block of docs/DATASETS.md's `folder` section."""
    text = (REPO / "docs" / "DATASETS.md").read_text()
    section = text[text.index("### `folder`"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_docs_example_runs_exactly_as_printed(tmp_path):
    # in an empty folder, as a user in a clone would: the scripts beside it, `python` on the PATH
    for script in REPO.glob("*.py"):
        (tmp_path / script.name).symlink_to(script)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-e", "-c", docs_example()], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for run in ("teacher", "student"):
        assert (tmp_path / "runs" / "mine" / run / "checkpoint.pt").is_file()
    assert re.search(r"^red square +\d+\.\d$", r.stdout, re.M) and re.search(r"^mIoU +\d+\.\d\d$", r.stdout, re.M)
    # the predictions of the val images (the 5th and 10th), coloured with the file's colours
    pred = tmp_path / "runs" / "mine" / "pred"
    assert sorted(p.name for p in pred.glob("*.png")) == ["04.png", "09.png"]
    colour = np.array(Image.open(pred / "color" / "04.png").convert("RGB")).reshape(-1, 3)
    ids = np.array(Image.open(pred / "04.png")).reshape(-1)
    palette = [datasets.generated_palette(3)[0], (0xe0, 0x28, 0x28), (0x28, 0x28, 0xe0)]   # background: none given
    assert (colour == np.array(palette)[ids]).all() and (pred / "confidence" / "04.png").is_file()
    # nothing was written into the data folder
    written = {str(p.relative_to(tmp_path / "mydata")) for p in (tmp_path / "mydata").rglob("*") if p.is_file()}
    assert written == {"classes.txt"} | {f"{folder}/{i:02d}.{suffix}" for i in range(12)
                                         for folder, suffix in (("images", "jpg"), ("labels", "png"))}


# ----------------------------------------------------------------------------------------------
# the classes travel in the checkpoint; bad input is one line

@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """12 images of 24x32, classes 0..2 and the raw id 7 for pixels to ignore; classes.txt beside."""
    root = tmp_path_factory.mktemp("own") / "mydata"
    rng = np.random.default_rng(0)
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True)
    for i in range(12):
        label = rng.choice(np.array([0, 1, 2, 7], np.uint8), (24, 32))
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i:02d}.png")
        Image.fromarray(label).save(root / "labels" / f"{i:02d}.png")
    (root.parent / "classes.txt").write_text("sky #0000ff\nroad #808080\ncar #ff0000\n")
    return root


def train_main(capsys, *argv):
    """train.py's command line, in this process: (exit code, stdout, stderr)."""
    code = train.main([str(a) for a in argv])
    return (code, *capsys.readouterr())


def eval_main(capsys, *argv):
    """eval.py's command line, in this process: (exit code, stdout, stderr)."""
    code = evaluation.report_errors(evaluation.main, evaluation.get_args_parser().parse_args(list(map(str, argv))))
    return (code, *capsys.readouterr())


def tiny(data_root, out, *extra):
    return ["--dataset", "folder", "--data-root", data_root, "--out", out, "--iters", 2, "--batch-size", 2,
            "--crop-size", 16, 16, "--device", "cpu", *extra]


def test_classes_travel_in_the_checkpoint_to_eval_and_pseudo_labels(own_data, tmp_path, capsys):
    classes = own_data.parent / "classes.txt"
    code, _, err = train_main(capsys, *tiny(own_data, tmp_path / "run", "--class-names", classes,
                                            "--ignore-index", 7))
    assert code == 0, err
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    saved = evaluation.load_checkpoint_dict(checkpoint)["args"]
    assert (saved["num_classes"], saved["classes"], saved["ignore_index"]) == (3, ["sky", "road", "car"], 7)
    assert saved["palette"] == [[0, 0, 255], [128, 128, 128], [255, 0, 0]]
    # eval.py takes names, colours and the ignored id (7 would be refused as a class) from the
    # checkpoint, and scores val (the 5th and 10th image) by default
    code, out, err = eval_main(capsys, "--checkpoint", checkpoint, "--dataset", "folder", "--data-root", own_data,
                               "--device", "cpu", "--workers", 0, "--save-pred", tmp_path / "pred")
    assert code == 0, err
    assert re.search(r"^road +\d+\.\d$", out, re.M) and "mIoU" in out
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == ["04.png", "09.png"]
    ids = np.array(Image.open(tmp_path / "pred" / "04.png"))
    colour = np.array(Image.open(tmp_path / "pred" / "color" / "04.png").convert("RGB"))
    assert (colour == np.array(saved["palette"])[ids]).all()
    # the same run's pseudo labels of unlabeled images train a student on your own data
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(unlabeled / name)
    code, _, err = eval_main(capsys, "--checkpoint", checkpoint, "--dataset", "folder", "--data-root", unlabeled,
                             "--device", "cpu", "--workers", 0, "--save-pred", tmp_path / "pseudo")
    assert code == 0 and (tmp_path / "pseudo" / "color" / "a.png").is_file(), err
    code, _, err = train_main(capsys, *tiny(own_data, tmp_path / "zhu", "--class-names", classes, "--ignore-index", 7,
                                            "--unlabeled-root", unlabeled, "--pseudo-labels", tmp_path / "pseudo"))
    assert code == 0, err


@pytest.mark.parametrize("argv, message", [
    ([], "--dataset folder needs --num-classes N or --class-names FILE"),
    (["--num-classes", 0], "--num-classes must be positive"),
    (["--num-classes", 2], "contains ids [2] that map outside [0, 2)"),   # found at the first read
    (["--class-names", "{data}/nothing.txt"], "class names file not found: {data}/nothing.txt"),
    (["--class-names", "{classes}", "--num-classes", 4], "classes.txt names 3 classes; expected 4 (--num-classes)"),
    (["--num-classes", 3, "--ignore-index", 2], "ignore index 2 (--ignore-index): expected 255 or an id above"),
    (["--num-classes", 3, "--ignore-index", 300], "--ignore-index"),
    (["--num-classes", 3, "--data-root", "{data}/images"], "training needs labels: expected {data}/images/images"),
    (["--num-classes", 3, "--val-split", "test"], "split 'test' not found: expected {data}/test.txt"),
    (["--dataset", "synthetic", "--class-names", "{classes}"], "--class-names and --ignore-index are for --dataset fo"),
    (["--dataset", "synthetic", "--num-classes", 3], "--num-classes 3: synthetic has 8 classes"),
])
def test_bad_own_data_options_are_one_line_and_write_nothing(argv, message, own_data, tmp_path, capsys):
    paths = dict(data=own_data, classes=own_data.parent / "classes.txt")
    argv = [str(a).format(**paths) for a in argv]
    code, _, err = train_main(capsys, *tiny(own_data, tmp_path / "run", "--ignore-index", 7), *argv)
    assert code == 2 and message.format(**paths) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_eval_bad_own_data_options_are_one_line(own_data, tmp_path, capsys):
    code, _, err = train_main(capsys, *tiny(own_data, tmp_path / "run", "--num-classes", 3, "--ignore-index", 7))
    assert code == 0, err
    base = ["--checkpoint", tmp_path / "run" / "checkpoint.pt", "--data-root", own_data, "--device", "cpu",
            "--workers", 0]
    for argv, message in [
            (["--dataset", "folder", "--class-names", own_data.parent / "classes.txt", "--num-classes", 2],
             "classes.txt names 3 classes; expected 2 (--num-classes)"),
            (["--dataset", "folder", "--num-classes", 4], "has 3 classes, but 4 were given for --dataset folder"),
            (["--dataset", "folder", "--ignore-index", 255], "contains ids [7]"),
            (["--dataset", "camvid", "--ignore-index", 7], "--ignore-index are for --dataset folder")]:
        code, _, err = eval_main(capsys, *base, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
