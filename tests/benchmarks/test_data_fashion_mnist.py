"""``compare --dataset fashion-mnist``: the IDX reader on synthetic files, and a smoke run on the real ones."""

import gzip
import json
import struct

import pytest
import torch

pytest.importorskip("lightly")
pytest.importorskip("sklearn")

import _directpred_bench as cli
from directpred_plugin.benchmarks import data as bench_data
from directpred_plugin.benchmarks.data import FASHION_MNIST_FILES, build_dataset, find_fashion_mnist, read_idx

pytestmark = pytest.mark.slow  # trains real models or spawns processes: CI runs it, the fast tier does not

INSTALL = "sudo apt-get update && sudo apt-get install dataset-fashion-mnist"


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    """A torchvision-style folder (FashionMNIST/raw) of synthetic IDX files: 40 train, 20 test images."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for (split, kind), stem in FASHION_MNIST_FILES.items():
        n = 40 if split == "train" else 20
        if kind == "images":
            array = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        else:
            array = (torch.arange(n) % 10).to(torch.uint8)
        write_idx(raw / f"{stem}.gz", array)
    return tmp_path


def test_reads_a_torchvision_style_folder(fake_fashion_mnist):
    files = find_fashion_mnist(fake_fashion_mnist)
    images = read_idx(files["train", "images"])
    assert images.shape == (40, 28, 28) and images.dtype == torch.uint8
    data = build_dataset("fashion-mnist", data_dir=fake_fashion_mnist, subset=32, test_subset=10)
    assert data.images["train"].shape == (32, 1, 28, 28) and len(data.labels["test"]) == 10
    assert 0.0 <= float(data.images["train"].min()) and float(data.images["train"].max()) <= 1.0
    assert data.labels["train"][:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    x0, x1 = next(data.views(16, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert x0.shape == (16, 1, 28, 28) and not torch.equal(x0, x1)


def test_missing_files_name_both_install_routes(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        build_dataset("fashion-mnist", data_dir=tmp_path)
    assert "FashionMNIST('data', download=True)" in str(error.value) and str(tmp_path) in str(error.value)


def test_compare_on_the_real_files(tmp_path):
    try:
        find_fashion_mnist(None)
    except FileNotFoundError:
        pytest.skip(f"Fashion-MNIST not installed: {INSTALL}")
    argv = ["compare", "--dataset", "fashion-mnist", "--method", "simsiam", "--subset", "256", "--test-subset", "200",
            "--epochs", "1", "--batch-size", "128", "--proj-dim", "16", "--hidden-dim", "32", "--seeds", "0",
            "--predictors", "directpred", "--jobs", "1", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    assert results["config"]["backbone"] == "fashion-cnn" and run["steps"] == 2
    # 200 real test images over 10 classes: even an untrained CNN's features beat chance by far.
    assert results["untrained"][0]["knn_top1"] > 0.3 and run["knn_top1"] > 0.3
    assert 1.0 <= run["effective_rank"] <= 16.0
