"""The ``directpred-bench`` command line: sub-commands, options and help, parsed without torch.

A top-level module rather than part of ``directpred_plugin.benchmarks``: importing anything
under ``directpred_plugin`` runs the package's ``__init__``, which imports torch (seconds).
``--help`` and a mistyped option need none of that, so this module imports the standard
library only, and :func:`main` imports the chosen benchmark
(``directpred_plugin.benchmarks.<command>``) after parsing, once the modules the command
needs are known to be installed.

Defaults that only the command line sets (``step``'s and ``compare``'s default predictors,
``theory``'s sweep) are owned here and imported by the benchmarks. Where a value belongs to
the benchmark code (a registry's names, a dataclass default), it is written here too and
``tests/benchmarks/test_cli_help.py`` checks it against the code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: How to install what the benchmarks need (README, Install).
INSTALL_BENCH = 'pip install -e ".[bench]"'
#: Import name -> distribution name, where the two differ.
DISTRIBUTIONS = {"sklearn": "scikit-learn"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help; descriptions as written.

    Options whose help already states the default ("default: ...", "(default ...",
    "default per ..."), flags and options defaulting to None (their help says what None
    means) get no "(default: ...)" suffix. A default of 0 is shown like any other.
    """

    STATES_DEFAULT = re.compile(r"\(default\b|\bdefault:|\bdefault per\b|^default\b")

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if self.STATES_DEFAULT.search(text) or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action) or ""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# ----------------------------------------------------------------------------- speed
SPEED_DESCRIPTION = """\
Per-training-call cost of the DirectPred head next to the MLP predictors it replaces.

One "call" is what a training step does with a predictor: forward on a (batch, dim) input
that requires grad, then backward of a scalar loss (for the MLP this includes its parameter
gradients; for the head it includes the statistics update and the refresh, amortised over
freq). All configurations are timed in one process, interleaved round by round, so the
ratios compare like with like. The table is printed at the end (and, with --out, written to
speed.json and speed.md); while the progress bar runs, each width's rows appear as it ends.

Head specs name the refresh strategy, e.g. directpred:freq=5,refresh=iterative; floor is a
head that never refreshes within the run (statistics, output and backward only). For every
head that is not refresh=exact the same calls are replayed untimed and each refresh's W_p is
compared with the exact rule (float64 eigendecomposition) for the same F_hat: the "max error"
column is the largest relative Frobenius error over the run, "fallbacks" counts refreshes
handed to the exact rule by the self-check.
"""

#: speed's --predictors names beside the family's (benchmarks.predictors.predictor_names("speed"))
SPEED_BASELINES = ("byol-mlp", "simsiam-mlp", "floor")
SPEED_PREDICTORS = ["byol-mlp", "simsiam-mlp", "floor", "directpred:refresh=exact", "directpred:freq=5,refresh=exact",
                    "directpred:freq=10,refresh=exact", "directpred:freq=5,refresh=iterative",
                    "directcopy:refresh=exact", "directcopy:refresh=iterative",
                    "directcopy:freq=5,refresh=iterative", "directcopy:freq=10,refresh=iterative"]


def speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 512, 1024, 2048], help="predictor widths")
    parser.add_argument("--predictors", nargs="+", default=SPEED_PREDICTORS, metavar="SPEC",
                        help=f"{', '.join(SPEED_BASELINES)}, closed-form predictors name:key=value,... (the names of "
                             "directpred_plugin.VARIANTS, with their defaults) with Python-literal values, "
                             "e.g. 'directpred:eps=0.05,freq=5,refresh=iterative', or any nn.Module class by import "
                             "path, built as Class(dim, **options): 'package.module.Class:key=value'")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per call")
    parser.add_argument("--calls", type=int, default=100, help="timed calls per configuration")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 0 keeps PyTorch's default (1, as for compare: next to other busy "
                             "processes OpenMP's spinning threads made 2-thread steps 3-35x slower on a 2-core "
                             "machine; on an idle machine give the core count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-errors", dest="errors", action="store_false",
                        help="skip the untimed replay that measures each refresh against the exact rule")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for speed.json and speed.md (default: none, the table is only printed)")


# ----------------------------------------------------------------------------- compare
COMPARE_DESCRIPTION = """\
Side-by-side BYOL or SimSiam training with each predictor: accuracy, collapse, alignment, cost.

Every run trains the same model and changes only the predictor: BYOL (online backbone +
projector + predictor, EMA target, symmetrised negative cosine) or, with --method simsiam,
SimSiam (no target network, stop-gradient on the projections). Defaults run offline on a
laptop CPU: scikit-learn's handwritten digits, a small CNN, 6 predictors x 3 seeds.
--dataset fashion-mnist is the offline benchmark that tells the predictors apart;
--dataset cifar10|stl10 with --device cuda scales the same comparison up.

Predictors are named name or name:key=value,... (directpred:eps=0.1), so an option sweep is
a list of specs: --predictors directpred:eps=0 directpred:eps=0.1.

Independent runs (predictor x seed, and the untrained baseline per seed) go to --jobs worker
processes of --threads threads each; a run depends only on its predictor and seed, so the
numbers are those of a serial run. The run folder (--out, default runs/compare-<time>) is
named at the start and rewritten after every finished run: results.json (configuration,
machine, command, every run with its training curves, per-predictor summary), results.csv
(one row per run), results.md (mean +- std over seeds); accuracy.png and curves.png when all
runs are done (or interrupted). At the end the terminal shows kNN and linear top-1 per
predictor; results.md has every column. --probe-epochs also probes along training: each
run's probes (epoch, kNN and linear top-1, the final probes as the last point), early and
final numbers in results.md and accuracy vs epoch in probes.png.

The models are assembled from lightly's building blocks as lightly's examples do;
--framework solo builds solo-learn's BYOL instead, the predictor chosen by its config key
method_kwargs.predictor, trained in the same loop.
"""

#: compare's --predictors names (benchmarks.predictors.predictor_names("compare"))
COMPARE_PREDICTORS = ("mlp", "directpred", "directpred-hybrid", "directcopy", "directset", "ns", "ns2", "stiefel",
                      "visser", "linear", "none")
#: framework -> what compare runs without --predictors (solo: those of lightly's it can build, checked by a test)
COMPARE_DEFAULT_PREDICTORS = {
    "lightly": ("mlp", "linear", "directpred", "directpred-hybrid", "directcopy", "none"),
    "solo": ("mlp", "directpred", "directpred-hybrid", "directcopy"),
}


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = COMPARE_DEFAULT_PREDICTORS
    parser.add_argument("--dataset", default="digits",
                        help="digits (offline, bundled with scikit-learn), fashion-mnist (offline, from its IDX "
                             "files: apt-get install dataset-fashion-mnist, or a torchvision download), cifar10 "
                             "or stl10")
    parser.add_argument("--data-dir", default="data",
                        help="where the dataset lives: torchvision's root folder (cifar10/stl10; fashion-mnist: "
                             "the IDX files or torchvision's FashionMNIST/raw under it; when absent, "
                             "fashion-mnist falls back to the Debian package's folder)")
    parser.add_argument("--download", action="store_true", help="download cifar10/stl10 if missing")
    parser.add_argument("--method", default="byol", choices=["byol", "simsiam"],
                        help="byol: EMA target network; simsiam: no target, stop-gradient (lightly only)")
    parser.add_argument("--framework", default="lightly", choices=sorted(defaults),
                        help="which SSL framework builds the model (solo: solo-learn's BYOL, installed from "
                             "source, see integrations/solo_learn/README.md)")
    parser.add_argument("--predictors", nargs="+", default=None, metavar="NAME[:KEY=VALUE,...]",
                        help=f"any of {', '.join(COMPARE_PREDICTORS)}, each optionally with options, e.g. "
                             f"directpred:eps=0.1,freq=5 (default: {', '.join(defaults['lightly'])}; "
                             f"--framework solo: {', '.join(defaults['solo'])})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="one run per predictor and seed; a seed fixes initialisation, batch order and views")
    parser.add_argument("--backbone", default=None,
                        help="small-cnn, fashion-cnn, resnet18 (CIFAR stem), resnet18-imagenet-stem or "
                             "timm:<model> (default per dataset: small-cnn / fashion-cnn / resnet18 / "
                             "resnet18-imagenet-stem); --framework solo: resnet18 (default) or "
                             "resnet18-imagenet-stem, solo-learn's own")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help="default per dataset: digits 60, fashion-mnist 4, cifar10 200, stl10 100")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="default per dataset: 128 / 128 / 256 / 256")
    parser.add_argument("--proj-dim", type=_positive_int, default=None,
                        help="projection width d (default 64 / 128 / 256 / 256)")
    parser.add_argument("--hidden-dim", type=_positive_int, default=None,
                        help="hidden width of the projector and of BYOL's MLP predictor (default 256 / 512 / 4096 "
                             "/ 4096); SimSiam's MLP predictor has hidden width d/4")
    parser.add_argument("--subset", type=_positive_int, default=None,
                        help="train on (and fit the probes to) the first N training images (default: all)")
    parser.add_argument("--test-subset", type=_positive_int, default=None,
                        help="score the probes on the first N test images (default: all)")
    parser.add_argument("--lr", type=float, default=None,
                        help="SGD learning rate for batch 256, scaled linearly with the batch size "
                             "(default per dataset: fashion-mnist 0.3, others 0.06)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--ema-start", type=float, default=None,
                        help="BYOL's target EMA momentum at step 0, cosine-scheduled to 1 "
                             "(default per dataset: fashion-mnist 0.9, others 0.99)")
    parser.add_argument("--knn-k", type=_positive_int, default=20, help="neighbours of the kNN probe")
    parser.add_argument("--probe-epochs", nargs="+", type=_positive_int, default=None, metavar="EPOCH",
                        help="also run the kNN probe after these epochs (e.g. 1 2 4 8), recorded per run with the "
                             "final probes as the last point and drawn in probes.png (default: the probes after the "
                             "last epoch only; each point costs an embedding of the training and test images)")
    parser.add_argument("--probe-linear", action="store_true",
                        help="fit the linear probe at --probe-epochs too (slower on large training sets)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (cifar10/stl10; default min(8, CPUs))")
    parser.add_argument("--jobs", type=_positive_int, default=min(os.cpu_count() or 1, 4),
                        help="runs trained at once, each in its own process (the numbers equal a serial run's); "
                             "default: the CPU count, at most 4. Use 1 on a GPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run; 0 keeps PyTorch's default (1: the default models are too "
                             "small to gain from more, and next to other busy processes OpenMP's spinning "
                             "threads made 2-thread steps 3-35x slower on a 2-core machine)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/compare-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run folder --out: keep its finished runs (same options; --jobs and "
                             "--threads may differ) and train the others")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- theory
THEORY_DESCRIPTION = """\
The paper's linear model: when BYOL-style training collapses, and how the predictor prevents it.

Setting (Tian, Chen & Ganguli, ICML 2021, Sec. 3): data x ~ N(0, I_n), two views x1 = x + e1
and x2 = x + e2 with augmentation noise e ~ N(0, sigma^2 I_n); a linear online network W, a
linear predictor W_p, a target W_a that follows W by an EMA (W_a += beta (W - W_a) per step),
the loss 1/2 E||W_p W x1 - StopGrad(W_a x2)||^2 and plain SGD with weight decay eta on every
trained matrix. Several independent runs are simulated at once (a leading batch axis).

Scenarios:
  (a) no predictor (W_p = I)                     -> ||W|| decays to 0 (collapse)
  (b) no stop-gradient (target = online W)       -> collapse
  (c) SGD-trained W_p; DirectPred                -> no collapse
  (d) SGD-trained symmetric W_p                  -> eigenspace alignment with F rises to 1
  (e) sweep of weight decay x EMA rate with an SGD-trained W_p: where training collapses.

DirectPred appears twice. directpred is DirectPredHead as the library ships it:
p_j = sqrt(s_j / max s) + eps, so its largest eigenvalue is 1 + eps whatever the scale of F.
That normalisation is harmless under BYOL's cosine loss, which ignores the scale of the
prediction, but this L2 model is not scale-free: an SGD-trained predictor settles near
1 / (1 + sigma^2) on each eigen-direction, and a predictor held at 1 lets ||W|| shrink (slowly,
at a rate set by the EMA). directpred-sqrt is the same head's W_p multiplied by sqrt(max s),
i.e. the unnormalised p_j = sqrt(s_j) (+ eps sqrt(max s)), which keeps the scale of F. The
table reports both as measured.

Outputs in --out (default runs/theory-<time>): theory.json, theory.md and theory.png. Runs in
seconds on a CPU.
"""

#: theory's scenarios (benchmarks.theory.SCENARIOS)
THEORY_SCENARIOS = ("no-predictor", "no-stop-gradient", "gradient-predictor", "directpred-sqrt", "directpred",
                    "symmetric-predictor")
#: option -> default, those of benchmarks.linear_model.LinearSetting
THEORY_SETTING = {"dim": 8, "batch": 128, "steps": 2500, "lr": 0.2, "weight_decay": 0.005, "ema_rate": 0.02,
                  "noise": 0.25, "runs": 3, "seed": 0}
#: what the weight-decay x EMA sweep of benchmarks.theory covers by default
THEORY_SWEEP_WEIGHT_DECAY = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
THEORY_SWEEP_EMA_RATE = [0.005, 0.02, 0.1, 1.0]


def theory_arguments(parser: argparse.ArgumentParser) -> None:
    d = THEORY_SETTING
    parser.add_argument("--dim", type=int, default=d["dim"], help="width of the linear model")
    parser.add_argument("--batch", type=int, default=d["batch"], help="samples per step")
    parser.add_argument("--steps", type=int, default=d["steps"], help="training steps per run")
    parser.add_argument("--lr", type=float, default=d["lr"], help="SGD learning rate")
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="SGD weight decay")
    parser.add_argument("--ema-rate", type=float, default=d["ema_rate"], help="beta in W_a += beta (W - W_a)")
    parser.add_argument("--noise", type=float, default=d["noise"], help="augmentation noise variance sigma^2")
    parser.add_argument("--runs", type=int, default=d["runs"], help="independent runs per scenario")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed of the first run")
    parser.add_argument("--scenarios", nargs="+", default=list(THEORY_SCENARIOS), metavar="NAME",
                        help=f"any of {', '.join(THEORY_SCENARIOS)}")
    parser.add_argument("--sweep-weight-decay", type=float, nargs="*", default=THEORY_SWEEP_WEIGHT_DECAY,
                        help="(e) weight decays to sweep (none: skip the sweep)")
    parser.add_argument("--sweep-ema-rate", type=float, nargs="*", default=THEORY_SWEEP_EMA_RATE,
                        help="(e) EMA rates to sweep (none: skip the sweep)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: the matrices are tiny); 0 keeps PyTorch's default")
    parser.add_argument("--out", type=Path, default=None, help="folder (default runs/theory-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- step
STEP_DESCRIPTION = """\
Whole training step of BYOL and SimSiam with each predictor: what a user's step costs.

One step is what a training loop does per batch: forward of both views through backbone,
projector and predictor (and, for BYOL, the EMA target's forward), the symmetric negative
cosine loss, backward, the optimizer (SGD with momentum) and BYOL's EMA update of the target.
The models are the compare benchmark's lightly methods (BYOL: projection 256, MLP predictor
256-4096-256; SimSiam: projection 2048, bottleneck predictor 2048-512-2048) with the
predictor swapped; DirectPred and DirectCopy pool the two views of a step
(calls_per_update="auto"). Every configuration is built up front and timed round-robin (a
block of steps each, round after round) in one process, so all see the same machine state;
the median over rounds of each block's mean step time is reported with its ratio to the MLP
of the same backbone, method and mode. On CUDA, "peak MiB" is the largest allocation above
what was resident when a block started (activations, gradients, temporaries), under bf16
autocast unless --amp none.
"""

#: benchmarks.backbones.backbone_names("step"), benchmarks.step.METHODS; what step times by default
STEP_BACKBONES = ("small-cnn", "resnet18-cifar", "resnet50")
STEP_METHODS = ("byol", "simsiam")
STEP_PREDICTORS = ["mlp", "directpred", "directpred:freq=5", "directcopy"]


def step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbones", nargs="+", choices=sorted(STEP_BACKBONES), default=None,
                        help="default: resnet18-cifar, and resnet50 (224x224) on CUDA")
    parser.add_argument("--methods", nargs="+", choices=sorted(STEP_METHODS), default=list(STEP_METHODS),
                        help="methods")
    parser.add_argument("--predictors", nargs="+", default=STEP_PREDICTORS, metavar="SPEC",
                        help="the compare benchmark's predictor specs, name[:key=value,...]; mlp is the reference")
    parser.add_argument("--compile", action="store_true", help="also time each configuration under torch.compile")
    parser.add_argument("--amp", choices=["bf16", "none"], default=None,
                        help="autocast dtype (default: bf16 on CUDA, none on the CPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per view")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per configuration and round; a multiple of every freq, so that each "
                             "block holds the same number of refreshes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first, interleaved like the timed ones")
    parser.add_argument("--byol-dim", type=int, default=None, help="projection width (default: BYOL's 256)")
    parser.add_argument("--simsiam-dim", type=int, default=None, help="projection width (default: SimSiam's 2048)")
    parser.add_argument("--hidden", type=int, default=None,
                        help="projector (and BYOL MLP predictor) hidden width (default: 4096 BYOL, 2048 SimSiam)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps PyTorch's default")
    parser.add_argument("--profile", metavar="METHOD:PREDICTOR", default=None,
                        help="also profile one step of this configuration (first backbone), e.g. byol:directpred "
                             "(default: no profile)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for step.json and step.md (default: none, the table is only printed)")


# ----------------------------------------------------------------------------- health-plot
HEALTH_DESCRIPTION = """\
Plot the RankMe and eigenspace alignment of DirectPred heads from Lightning metrics.csv files.

Reads the .../rankme and .../alignment columns that lightly's DirectPredDiagnostics and
solo-learn's method_kwargs.directpred.log_every_n_steps log through a CSVLogger (Lightning's
default logger where TensorBoard is not installed), one line per head and file, against the
logged step. Example: directpred-bench health-plot lightning_logs/version_0/metrics.csv
--out health.png
"""


def health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.csv files written by Lightning's CSVLogger")
    parser.add_argument("--labels", nargs="*", help="one legend label per file (default: the head names alone)")
    parser.add_argument("--title", help="figure title (default: none)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (required, no default)")


# ----------------------------------------------------------------------------- the command
@dataclass(frozen=True)
class Command:
    """One sub-command: its help, its options, and the benchmark module whose ``run(args)`` runs it."""

    module: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    #: the modules of the bench extra that the command imports (checked before it starts)
    needs: Tuple[str, ...]

    @property
    def summary(self) -> str:
        return self.description.splitlines()[0]


#: Sub-command -> what it is and which module runs it.
COMMANDS: Dict[str, Command] = {
    "speed": Command("directpred_plugin.benchmarks.speed", SPEED_DESCRIPTION, speed_arguments,
                     ("lightly", "tqdm")),
    "compare": Command("directpred_plugin.benchmarks.compare", COMPARE_DESCRIPTION, compare_arguments,
                       ("lightly", "sklearn", "matplotlib", "tqdm")),
    "theory": Command("directpred_plugin.benchmarks.theory", THEORY_DESCRIPTION, theory_arguments,
                      ("matplotlib", "tqdm")),
    "step": Command("directpred_plugin.benchmarks.step", STEP_DESCRIPTION, step_arguments, ("lightly", "tqdm")),
    "health-plot": Command("directpred_plugin.benchmarks.health", HEALTH_DESCRIPTION, health_arguments,
                           ("matplotlib",)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="directpred-bench", description="DirectPred comparison benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.summary, description=command.description,
                                         formatter_class=HelpFormatter))
    return parser


def missing_modules(names: Sequence[str]) -> List[str]:
    """The distributions of ``names`` that are not installed, without importing any of them."""
    return [DISTRIBUTIONS.get(name, name) for name in names if importlib.util.find_spec(name) is None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    # Here, not in the benchmark: compare's runs import lightly in worker processes, where a
    # missing module ends in a long cross-process traceback.
    missing = missing_modules(command.needs)
    if missing:
        raise SystemExit(f"directpred-bench {args.command} needs {' and '.join(missing)} (the bench extra): "
                         f"{INSTALL_BENCH}")
    args.argv = argv  # the command as given, for the tables that record it
    importlib.import_module(command.module).run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
