"""Time to extract every subnet of an elastic teacher (random weights).

    KERAS_BACKEND=jax python benchmarks/extract.py [--config=vit_l16_elastic]

Prints one JSON line per measurement.
"""
import json
import time

import keras
from absl import app, flags

from poa_keras import ElasticViT

flags.DEFINE_string("config", "vit_l16_elastic", "Named configuration of the teacher.")
flags.DEFINE_integer("limit", 0, "Extract only this many subnets (0 = all).")
FLAGS = flags.FLAGS


def main(_):
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    teacher = ElasticViT.from_config_name(FLAGS.config)
    build_s = time.perf_counter() - start
    specs = teacher.subnets()[: FLAGS.limit or None]
    bar = keras.utils.Progbar(len(specs), unit_name="subnet")
    times, params = [], 0
    for i, spec in enumerate(specs):
        start = time.perf_counter()
        sub = teacher.extract(spec)
        times.append(time.perf_counter() - start)
        params += sub.count_params()
        del sub
        bar.update(i + 1)
    print(json.dumps({
        "benchmark": "extract_all", "backend": keras.backend.backend(), "config": FLAGS.config,
        "teacher_params": teacher.count_params(), "teacher_build_s": round(build_s, 2),
        "subnets": len(specs), "total_s": round(sum(times), 2),
        "mean_s": round(sum(times) / len(times), 3), "max_s": round(max(times), 3),
        "params_extracted": params,
    }))


if __name__ == "__main__":
    app.run(main)
