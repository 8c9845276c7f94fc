"""Experiment 3 — sanity check by cascading model-parameter randomization (Adebayo et al., NeurIPS 2018).

The GAP model of experiment 1 (the same config; trained here if experiment 1 has not run) is explained
on test canvases, then its layers are re-initialized one after the other from the top (the classifier
``fc`` first, then the convs downwards), each step keeping the earlier randomizations. A method whose
maps depend on what the model learned must change: we report, per method and step, the mean Spearman
rank correlation between the maps of the trained model and those of the randomized one (1 = unchanged;
the "drop" is 1 minus it). Maps that become constant (rank correlation undefined) are counted.

    python -m experiments.sanity_check --config experiments/configs/sanity.json [--smoke]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from experiments import common
from flaxcam import metrics
from flaxcam.evaluation import randomize_layers
from flaxcam.models import init_variables


def randomized(variables: dict, fresh: dict, layers: Sequence[str]) -> dict:
    """``variables`` with the parameters of ``layers`` replaced by those of ``fresh`` (a new initialization)."""
    return randomize_layers(variables, fresh, layers)


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the experiment; returns the results dict (also written to the results folder)."""
    args = common.parse_args(__doc__.splitlines()[0], "sanity.json", argv)
    config = common.load_config(args.config, args.smoke)
    digits_config = common.load_config(common.ROOT / "configs" / config["model_from"], args.smoke)
    out = common.output_folder(args)
    started = time.perf_counter()
    train_config = common.train_config(digits_config["train"], pooling="avg")
    train_data = common.digits(digits_config["data"], digits_config["train_count"], seed=0)
    result = common.train_on(train_config, train_data, out / "runs" / "digits_avg", progress=not args.no_progress)
    test = common.digits(digits_config["data"], config["test_count"], seed=1)
    inputs = common.model_inputs(train_config, test.images)
    fresh = init_variables(result.model, (1, *train_config.input_size, 3), seed=config["randomization_seed"])
    cascade = config["cascade"]
    missing = [layer for layer in cascade if layer not in result.variables["params"]]
    if missing:
        raise ValueError(
            f"cascade layers {missing} are not in the model; its layers: {sorted(result.variables['params'])}"
        )
    results: dict = {"config": config, "cascade": cascade, "methods": {}}
    for method in config["methods"]:
        original, _ = common.explain_maps(
            result.model, result.variables, inputs, test.labels, method, layer=config["layer"]
        )
        steps = []
        for depth in range(1, len(cascade) + 1):
            variables = randomized(result.variables, fresh, cascade[:depth])
            maps, _ = common.explain_maps(result.model, variables, inputs, test.labels, method, layer=config["layer"])
            rho = np.asarray(metrics.rank_correlation(original, maps))
            steps.append(
                {
                    "randomized": cascade[:depth],
                    "mean_rank_correlation": float(np.nanmean(rho)) if np.isfinite(rho).any() else None,
                    "constant_maps": int(np.isnan(rho).sum()),
                }
            )
        results["methods"][method] = steps
        print(
            f"{method}: " + ", ".join(f"{s['randomized'][-1]} {s['mean_rank_correlation']}" for s in steps),
            file=sys.stderr,
        )
    results["drop_after_head"] = {
        m: None if s[0]["mean_rank_correlation"] is None else 1 - s[0]["mean_rank_correlation"]
        for m, s in results["methods"].items()
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["provenance"] = common.provenance("python -m experiments.sanity_check " + " ".join(argv or sys.argv[1:]))
    common.write_json(out / "sanity_check.json", results)
    _figure(out / "sanity_check.png", results)
    return results


def _figure(path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    labels = ["trained"] + [f"+{layer}" for layer in results["cascade"]]
    for method, steps in results["methods"].items():
        values = [1.0] + [np.nan if s["mean_rank_correlation"] is None else s["mean_rank_correlation"] for s in steps]
        ax.plot(range(len(values)), values, marker="o", label=method)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_xlabel("cascading randomization (top layer first)")
    ax.set_ylabel("Spearman rank correlation\nwith the trained model's maps")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run()
