"""Inference latency of an extracted subnet vs. the same-size ViT built directly, and vs. the
elastic (sliced) forward of the same subnet, measured in one run with interleaved repeats.

    KERAS_BACKEND=jax python benchmarks/forward.py [--teacher=vit_l16_elastic --subnet=small
                                                     --direct=vit_s16 --batch=8]

Every forward is compiled (jax.jit / tf.function) or eager without autograd (torch). The
extracted/direct ratio must stay within 1.05: extraction leaves no slicing at run time.
"""
import json
import statistics
import time

import keras
import numpy as np
from absl import app, flags

from poa_keras import ElasticViT

flags.DEFINE_string("teacher", "vit_l16_elastic", "Named configuration of the teacher.")
flags.DEFINE_string("subnet", "small", "Named size of the subnet.")
flags.DEFINE_string("direct", "vit_s16", "Named configuration of the same size, built directly.")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("repeats", 15, "Timed calls per variant (interleaved).")
FLAGS = flags.FLAGS


def _sync(out):
    return keras.ops.convert_to_numpy(out["cls"])  # waits for asynchronous backends


def main(_):
    keras.utils.set_random_seed(0)
    teacher = ElasticViT.from_config_name(FLAGS.teacher)
    spec = teacher.resolve_subnet(FLAGS.subnet)
    extracted = teacher.extract(spec)
    direct = ElasticViT.from_config_name(FLAGS.direct, layer_scale_init=teacher.layer_scale_init,
                                         use_mask_token=teacher.use_mask_token)
    assert direct.count_params() == extracted.count_params(), "not the same size"
    size = teacher.image_size
    images = np.random.default_rng(0).uniform(-1, 1, (FLAGS.batch, size, size, 3)).astype(
        "float32")
    variants = {
        "extracted": extracted.compiled_forward(),
        "direct": direct.compiled_forward(),
        "elastic": teacher.compiled_forward(spec),
    }
    for fn in variants.values():  # compile and warm up
        _sync(fn(images))
        _sync(fn(images))
    times = {name: [] for name in variants}
    for _ in range(FLAGS.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            _sync(fn(images))
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "benchmark": "forward_latency", "backend": keras.backend.backend(),
        "teacher": FLAGS.teacher, "subnet": [spec.width, spec.depth], "batch": FLAGS.batch,
        "image": size, "median_s": {k: round(v, 4) for k, v in median.items()},
        "extracted_over_direct": round(median["extracted"] / median["direct"], 3),
        "elastic_over_extracted": round(median["elastic"] / median["extracted"], 3),
    }))


if __name__ == "__main__":
    app.run(main)
