"""Regenerates the plots of docs/health/: short logged runs on scikit-learn's digits, on the CPU.

- lightly: ``integrations/lightly/byol.py`` (lightly's BYOL, ResNet-18, a DirectPred head),
  its ``DirectPredDiagnostics`` every ``--log-every`` steps.
- solo-learn: its ``main_pretrain.py`` with ``integrations/solo_learn/byol.yaml``, the guide's
  command, on the digits written out as an image folder, with
  ``method_kwargs.directpred.log_every_n_steps``; the Trainer's default logger writes the CSV.

Each run's diagnostic columns are kept as ``<run>.csv`` beside ``<run>.png``::

    python docs/health/make_plots.py --solo-learn PATH/TO/solo-learn --steps 150
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def export_digits(folder: Path) -> None:
    """scikit-learn's digits as 32x32 RGB PNGs, one subfolder per class (an ImageFolder)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / str(label) / f"{index}.png")


def keep_diagnostics(metrics: Path, out: Path) -> None:
    """The step and every ``directpred/...`` column of the rows that have them."""
    with open(metrics, newline="") as f:
        reader = csv.DictReader(f)
        columns = ["step"] + [c for c in reader.fieldnames or () if c.startswith("directpred/")]
        rows = [{c: row[c] for c in columns} for row in reader if any(row[c] for c in columns[1:])]
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def run(command: list, cwd: Path) -> None:
    print("$", " ".join(map(str, command)), flush=True)
    subprocess.run([str(c) for c in command], cwd=cwd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solo-learn", type=Path, required=True, help="a solo-learn checkout (main_pretrain.py)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args()
    steps, batch, every = args.steps, args.batch_size, args.log_every
    work = Path(tempfile.mkdtemp(prefix="directpred-health-"))
    epochs = -(-steps // (1797 // batch))  # the momentum schedules span the run

    run([sys.executable, "byol.py", "--dataset", "digits", "--epochs", epochs, "--max-steps", steps,
         "--batch-size", batch, "--num-workers", 0, "--accelerator", "cpu", "--log-every", every,
         "--output-dir", work / "lightly"], cwd=REPO / "integrations" / "lightly")
    (metrics,) = (work / "lightly").rglob("metrics.csv")
    keep_diagnostics(metrics, HERE / "lightly-byol-digits.csv")

    export_digits(work / "digits")
    solo = args.solo_learn.resolve()
    run([sys.executable, solo / "main_pretrain.py", "--config-path", REPO / "integrations" / "solo_learn",
         "--config-name", "byol.yaml", f"hydra.searchpath=[file://{solo / 'scripts' / 'pretrain' / 'cifar'}]",
         "data.dataset=custom", f"data.train_path={work / 'digits'}", "data.val_path=null", "data.num_workers=0",
         "accelerator=cpu", 'devices="1"', "strategy=auto", "sync_batchnorm=False", "precision=32",
         f"max_epochs={epochs}", f"++max_steps={steps}", f"optimizer.batch_size={batch}", "optimizer.lr=0.3",
         "method_kwargs.proj_hidden_dim=1024", "method_kwargs.pred_hidden_dim=1024",
         "method_kwargs.proj_output_dim=128", f"++method_kwargs.directpred.log_every_n_steps={every}",
         f"++log_every_n_steps={every}", "++wandb.enabled=False", "++auto_resume.enabled=False",
         "++scheduler.warmup_epochs=1", "checkpoint.enabled=False"], cwd=work)
    (metrics,) = (work / "lightning_logs").rglob("metrics.csv")
    keep_diagnostics(metrics, HERE / "solo-byol-digits.csv")

    for name, title in (("lightly-byol-digits", "lightly BYOL on digits (CPU), DirectPredDiagnostics"),
                        ("solo-byol-digits", "solo-learn BYOL on digits (CPU), main_pretrain.py")):
        run([sys.executable, "-m", "_directpred_bench", "health-plot", HERE / f"{name}.csv",
             "--title", title, "--out", HERE / f"{name}.png"], cwd=REPO)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
