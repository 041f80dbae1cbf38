"""Plots extraction time against subnet size from the ``extract`` lines of benchmarks/extract.py
(``--per_subnet``) output files: one panel per teacher configuration, one colour per backend.

    python benchmarks/plot_extract.py benchmarks/results/extract_all_*.jsonl \
        --output=benchmarks/results/extract_all.png
"""
import collections
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("output", "extract_all.png", "Where the PNG goes.")
FLAGS = flags.FLAGS


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give the JSONL files of benchmarks/extract.py --per_subnet")
    points = collections.defaultdict(lambda: collections.defaultdict(list))
    totals = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                key = (record["config"], record["backend"])
                if record["benchmark"] == "extract":
                    points[record["config"]][record["backend"]].append(
                        (record["params"] / 1e6, record["seconds"]))
                elif record["benchmark"] == "extract_all":
                    totals[key] = record
    if not points:
        raise app.UsageError(f"no 'extract' lines in {paths}: run extract.py with --per_subnet")
    configs = sorted(points)
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4.8), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for backend in sorted(points[config]):
            params, seconds = zip(*points[config][backend])
            summary = totals.get((config, backend))
            label = backend if summary is None else (
                f"{backend}: {summary['subnets']} subnets, {summary['total_s']:.0f} s total, "
                f"median {summary['median_s']:.2f} s")
            ax.scatter(params, seconds, s=10, alpha=0.7, label=label)
        ax.set_title(f"extract every subnet of {config}")
        ax.set_xlabel("parameters of the extracted subnet (M)")
        ax.set_ylabel("extraction time (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.tight_layout()
    fig.savefig(FLAGS.output, dpi=110)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
