"""Shared fixtures: one small synthetic dataset and one briefly trained teacher per test session;
where the real data is (CamVid and SKD's published CamVid students) and the mark that skips the
tests that read it where it is absent."""
import subprocess
import sys
from pathlib import Path

import pytest

import datasets
import train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMALL = {"train": 32, "unlabeled": 32, "val": 16, "test": 16}

# Real data: first where the README tells users to put it, inside the repository; else in
# ../shared/data beside it (CI's machines have it there). CamVid and SKD's files are taken from
# one place, as kd_seg.py looks for skd_camvid/ beside the CamVid folder.
REAL_DATA_PLACES = [(REPO / "data" / "camvid", REPO / "data" / "skd_camvid"),
                    (REPO.parent / "shared" / "data" / "CamVid", REPO.parent / "shared" / "data" / "skd_camvid")]


def find_real_data(places=REAL_DATA_PLACES):
    """(CamVid folder, SKD's CamVid folder) of the first place holding both, else (None, None)."""
    for camvid, skd_camvid in places:
        splits = all((camvid / split).is_dir() for split in ("train", "val", "test"))
        if splits and any(skd_camvid.glob("*/*.pth")):
            return camvid, skd_camvid
    return None, None


CAMVID, SKD_CAMVID = find_real_data()
needs_real_data = pytest.mark.skipif(
    CAMVID is None, reason="CamVid and SKD's CamVid students not found in "
    + " nor in ".join(f"{camvid} and {skd_camvid}" for camvid, skd_camvid in REAL_DATA_PLACES))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    datasets.make_synthetic(root, counts=SMALL)
    return root


def train_args(data_root, out, *extra, iters=6, model="deeplabv3plus_mobilenetv2_tiny"):
    """argv for train.py: a tiny CPU run on the session's synthetic data."""
    return train.get_args_parser().parse_args(
        ["--data-root", str(data_root), "--out", str(out), "--model", model, "--iters", str(iters),
         "--batch-size", "4", "--device", "cpu", "--log-every", "2", *map(str, extra)])


@pytest.fixture(scope="session")
def teacher_checkpoint(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    train.train(train_args(data_root, out, iters=30, model="deeplabv3plus_resnet18_tiny"))
    return out / "checkpoint.pt"


@pytest.fixture(scope="session")
def wide_teacher_checkpoint(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("wide_teacher") / "run"
    train.train(train_args(data_root, out, iters=4, model="deeplabv3plus_wide_resnet_tiny"))
    return out / "checkpoint.pt"


def run_cli(*argv, timeout=120):
    """Run a repo script as a user would; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
