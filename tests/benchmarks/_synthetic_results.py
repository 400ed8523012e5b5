"""compare's results (results.json) filled with made-up numbers, for tests of what is drawn and printed."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from directpred_plugin.benchmarks.report import summarize

FAMILY = ("mlp", "linear", "directpred", "directpred-hybrid", "directcopy", "none")


def synthetic_results(predictors: Sequence[str] = FAMILY, seeds: Sequence[int] = (0, 1, 2), epochs: int = 1,
                      probe_epochs: Optional[List[int]] = None, probe_linear: bool = False,
                      untrained: bool = True) -> Dict[str, Any]:
    """compare's results.json, filled with random numbers: the first predictor scores lowest
    (where the old legend sat), the untrained backbone in the middle."""
    rng = np.random.default_rng(0)
    runs, base = [], []
    for seed in seeds:
        base.append({"seed": seed, "knn_top1": 0.80 + 0.01 * rng.random(), "linear_top1": 0.85 + 0.01 * rng.random()})
        for i, name in enumerate(predictors):
            knn, linear = 0.70 + 0.04 * i + 0.02 * rng.random(), 0.75 + 0.03 * i + 0.02 * rng.random()
            run: Dict[str, Any] = {
                "predictor": name, "seed": seed, "knn_top1": knn, "linear_top1": linear, "collapse": 0.1,
                "effective_rank": 10.0, "alignment": None, "ms_per_step": 1.0, "peak_memory_mib": 100.0,
                "job_seconds": 1.0, "predictor_params": 0, "memory_kind": "cpu_process_max_rss",
                "history": {"epoch": list(range(1, epochs + 1)), "loss": list(-0.5 - 0.1 * rng.random(epochs)),
                            "collapse": list(0.1 + 0.01 * rng.random(epochs)),
                            "effective_rank": list(10 + rng.random(epochs))},
            }
            if probe_epochs:
                at = sorted(set(probe_epochs) | {epochs})
                run["probes"] = {"epoch": at,
                                 "knn_top1": [knn - 0.02 * (len(at) - 1 - k) for k in range(len(at))],
                                 "linear_top1": [linear - 0.02 * (len(at) - 1 - k) for k in range(len(at))]}
            runs.append(run)
    return {"config": {"method": "byol", "dataset": "digits", "backbone": "small-cnn", "framework": "lightly",
                       "epochs": epochs, "batch_size": 128, "proj_dim": 64, "hidden_dim": 256, "seeds": list(seeds),
                       "probe_linear": probe_linear, "jobs": 1, "threads": 1},
            "machine": {"processor": "cpu", "cpu_count": 2, "torch": "2", "device": "cpu", "total_seconds": 1.0},
            "complete": True, "planned_runs": len(runs), "collapse_isotropic_max": 1 / 8, "runs": runs,
            "untrained": base if untrained else [], "summary": summarize(runs, list(predictors))}
