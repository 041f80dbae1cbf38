"""Summaries of benchmarks/tinyvit_quality.py runs whose seeds ran in separate processes: reads
their JSON lines (files given as arguments), keeps one teacher record and every student record,
and appends the per-arm mean +- sd and the paired t-tests over seeds, as that script does.

    python benchmarks/tinyvit_summary.py a.jsonl b.jsonl c.jsonl > results/tinyvit_quality.jsonl
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (mean_sd, paired_test, emit)

PAIRS = (("stored", "teacher"), ("stored", "teacher_dense"), ("stored", "labels"))
METRICS = ("top1", "knn_top1")


def main(paths):
    records = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    teachers = [r for r in records if r["record"] == "teacher"]
    students = sorted((r for r in records if r["record"] == "student"),
                      key=lambda r: (r["seed"], r["arm"]))
    for record in teachers[:1] + students:
        quality.emit(record)
    summarize(students)


def summarize(students):
    """Emits the per-arm mean +- sd and the paired tests of the student records."""
    results = {}
    for r in students:
        results.setdefault(r["arm"], {})[r["seed"]] = r
    for arm, runs in results.items():
        for metric in METRICS:
            mean, sd = quality.mean_sd(r[metric] for r in runs.values())
            quality.emit({"record": "summary", "arm": arm, "metric": metric,
                          "mean": quality._r(mean), "sd": quality._r(sd), "seeds": sorted(runs)})
    for a, b in PAIRS:
        if a in results and b in results:
            seeds = sorted(set(results[a]) & set(results[b]))
            for metric in METRICS:
                diff, sd, t, p, n = quality.paired_test([results[a][s][metric] for s in seeds],
                                                        [results[b][s][metric] for s in seeds])
                quality.emit({"record": "paired", "pair": f"{a}-{b}", "metric": metric,
                              "diff_mean": quality._r(diff), "diff_sd": quality._r(sd),
                              "t": quality._r(t), "p": quality._r(p), "n": n})


if __name__ == "__main__":
    main(sys.argv[1:])
