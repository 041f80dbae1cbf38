"""Time to extract every subnet of an elastic teacher (random weights), any family.

    KERAS_BACKEND=jax python benchmarks/extract.py [--config=vit_l16_elastic,swin_elastic,
        resnet_elastic] [--limit=0] [--per_subnet]

For each configuration in turn: builds the teacher, then extracts each subnet of its grid
(``teacher.subnets()``, the order of the sampler) and checks that the extracted network has the
parameter count the teacher predicts for it (``subnet_params``); a mismatch stops the run.
Prints per configuration one JSON line ``extract_all`` with the total, mean, median, min and
max seconds and the slowest subnet, and with ``--per_subnet`` one ``extract`` line per subnet
before it. A progress bar goes to stderr.
"""
import dataclasses
import json
import statistics
import sys
import time

import keras
from absl import app, flags

from poa_keras.backbones import from_config_name

flags.DEFINE_list("config", ["vit_l16_elastic"], "Named configurations of the teachers.")
flags.DEFINE_integer("limit", 0, "Extract only the first this many subnets (0 = all).")
flags.DEFINE_bool("per_subnet", False, "Also print one line per extracted subnet.")
FLAGS = flags.FLAGS


def _spec_json(spec):
    """A subnet as JSON: its fields (width, depth or depths) as plain values."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(spec).items()}


def emit(record):
    print(json.dumps(dict(record, backend=keras.backend.backend())), flush=True)


def bench(config):
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    teacher = from_config_name(config)
    build_s = time.perf_counter() - start
    specs = teacher.subnets()[: FLAGS.limit or None]
    bar = keras.utils.Progbar(len(specs), unit_name="subnet")
    stdout, sys.stdout = sys.stdout, sys.stderr  # the bar on stderr, the JSON alone on stdout
    times, params = [], 0
    try:
        for i, spec in enumerate(specs):
            start = time.perf_counter()
            sub = teacher.extract(spec)
            times.append(time.perf_counter() - start)
            count = sub.count_params()
            expected = teacher.subnet_params(spec)
            if count != expected:
                raise AssertionError(f"subnet {spec} extracted with {count} parameters, the "
                                     f"teacher predicts {expected}")
            params += count
            del sub
            if FLAGS.per_subnet:
                sys.stdout = stdout
                emit({"benchmark": "extract", "config": config, "subnet": _spec_json(spec),
                      "params": count, "seconds": round(times[-1], 3)})
                sys.stdout = sys.stderr
            bar.update(i + 1)
    finally:
        sys.stdout = stdout
    slowest = max(range(len(times)), key=times.__getitem__)
    emit({"benchmark": "extract_all", "config": config, "family": type(teacher).__name__,
          "teacher_params": teacher.count_params(), "teacher_build_s": round(build_s, 2),
          "subnets": len(specs), "subnets_in_grid": len(teacher.subnets()),
          "total_s": round(sum(times), 2), "mean_s": round(statistics.mean(times), 3),
          "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
          "max_s": round(max(times), 3), "slowest": _spec_json(specs[slowest]),
          "params_extracted": params})


def main(_):
    for config in FLAGS.config:
        bench(config)


if __name__ == "__main__":
    app.run(main)
