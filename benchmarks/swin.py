"""ElasticSwin on the active backend: extraction time of the named subnets of the reference
teacher, inference latency of an extracted subnet vs. the same size built directly (and vs. the
elastic forward), and POA step throughput on a small configuration.

    KERAS_BACKEND=torch python benchmarks/swin.py [--teacher=swin_elastic --subnet=tiny
        --batch=8 --repeats=5 --step_config=swin_elastic_demo --step_batch=16 --steps=3]

Prints one JSON line per measurement. Forwards are compiled (jax.jit / tf.function) or eager
without autograd (torch), as ``Backbone.compiled_forward``; variants are timed interleaved,
each round starting with the next variant, and the median is reported (the minimum beside it).
The extracted/direct ratio should be ~1: extraction leaves no slicing at run time. POA: 2
global crops of the configuration's image size and ``--local_crops`` local crops of half of it,
random images, AdamW; the plan is pinned to ``--step_subnet`` (one compiled program); images/s
= batch / min step time after ``--warmup`` untimed (compiling) steps. ``--skip`` leaves out
parts (extract, latency, step).
Extraction of every subnet of the grid: ``benchmarks/extract.py --config=swin_elastic``.
"""
import json
import statistics
import time

import keras
import numpy as np
from absl import app, flags

from poa_keras import ElasticSwin

flags.DEFINE_string("teacher", "swin_elastic", "Named configuration of the teacher.")
flags.DEFINE_string("subnet", "tiny", "Named size whose forward latency is measured.")
flags.DEFINE_integer("batch", 8, "Batch size of the latency measurement.")
flags.DEFINE_integer("repeats", 5, "Timed calls per latency variant (interleaved).")
flags.DEFINE_string("step_config", "swin_elastic_demo", "Configuration of the POA step.")
flags.DEFINE_string("step_subnet", "tiny", "Named size the POA step's elastic branch runs.")
flags.DEFINE_integer("step_batch", 16, "Images per POA step.")
flags.DEFINE_integer("local_crops", 2, "Local crops per image in the POA step.")
flags.DEFINE_integer("warmup", 1, "Untimed POA steps (the first compiles).")
flags.DEFINE_integer("steps", 3, "Timed POA steps.")
flags.DEFINE_list("skip", [], "Parts to leave out: extract, latency, step.")
FLAGS = flags.FLAGS


def emit(record):
    print(json.dumps(dict(record, backend=keras.backend.backend())), flush=True)


def _sync(out):
    return keras.ops.convert_to_numpy(out["cls"])  # waits for asynchronous backends


def bench_extract(teacher):
    for name, spec in teacher.named_subnets.items():
        start = time.perf_counter()
        sub = teacher.extract(spec)
        elapsed = time.perf_counter() - start
        emit({"benchmark": "swin_extract", "teacher": FLAGS.teacher, "subnet": name,
              "spec": [spec.width, spec.depth], "params": sub.count_params(),
              "seconds": round(elapsed, 3)})
        del sub


def bench_latency(teacher):
    spec = teacher.resolve_subnet(FLAGS.subnet)
    extracted = teacher.extract(spec)
    config = teacher.get_config()
    config.update(embed_dim=spec.width, depths=list(teacher.subnet_depths(spec)),
                  min_width=None, min_depth=None, shifts=None, named_subnets={},
                  name="direct")
    direct = ElasticSwin.from_config(config)  # the same size, alternating shifts
    assert direct.count_params() == extracted.count_params(), "not the same size"
    size = teacher.image_size
    images = np.random.default_rng(0).uniform(-1, 1, (FLAGS.batch, size, size, 3)).astype(
        "float32")
    variants = {"extracted": extracted.compiled_forward(), "direct": direct.compiled_forward(),
                "elastic": teacher.compiled_forward(spec)}
    compile_s = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        _sync(fn(images))
        compile_s[name] = round(time.perf_counter() - start, 2)
        _sync(fn(images))
    times = {name: [] for name in variants}
    order = list(variants)
    for i in range(FLAGS.repeats):
        # each round starts with the next variant, so that no variant always follows the same
        # one (caches, allocator state): position effects spread over all of them
        for name in order[i % len(order):] + order[:i % len(order)]:
            fn = variants[name]
            start = time.perf_counter()
            _sync(fn(images))
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    emit({"benchmark": "swin_forward_latency", "teacher": FLAGS.teacher, "subnet": FLAGS.subnet,
          "spec": [spec.width, spec.depth], "batch": FLAGS.batch, "image_size": size,
          "median_s": {k: round(v, 4) for k, v in median.items()},
          "min_s": {k: round(min(v), 4) for k, v in times.items()},
          "first_call_s": compile_s,
          "extracted_over_direct": round(median["extracted"] / median["direct"], 3),
          "elastic_over_extracted": round(median["elastic"] / median["extracted"], 3),
          "gflops_per_image": round(teacher.subnet_flops(spec) / 1e9, 3)})


def bench_step():
    from poa_keras.methods import POA

    class PinnedPOA(POA):
        def next_plan(self):
            return self.backbone.resolve_subnet(FLAGS.step_subnet)

    keras.utils.set_random_seed(0)
    backbone = ElasticSwin.from_config_name(FLAGS.step_config, name="student")
    batch = FLAGS.step_batch
    trainer = PinnedPOA(backbone, dict(hidden_dim=256, bottleneck_dim=64, out_dims=(512, 512)),
                        recipe=dict(epochs=1, steps_per_epoch=1000, batch_size=batch,
                                    warmup_epochs=0, warmup_teacher_temp_epochs=0,
                                    freeze_last_layer_epochs=0, layer_decay=0.9,
                                    patch_embed_lr_mult=0.2, ibot_weight=0.0))
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
    size = backbone.image_size
    rng = np.random.default_rng(0)
    data = {"global": rng.uniform(-1, 1, (2, batch, size, size, 3)).astype("float32")}
    if FLAGS.local_crops:
        data["local"] = rng.uniform(-1, 1, (FLAGS.local_crops, batch, size // 2, size // 2,
                                            3)).astype("float32")
    start = time.perf_counter()
    for _ in range(FLAGS.warmup):
        trainer.train_on_batch(data, return_dict=True)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        logs = trainer.train_on_batch(data, return_dict=True)
        times.append(time.perf_counter() - start)
        if not np.isfinite(float(logs["loss"])):
            raise FloatingPointError(f"non-finite loss: {logs}")
    emit({"benchmark": "swin_poa_step", "config": FLAGS.step_config,
          "elastic_subnet": FLAGS.step_subnet, "batch": batch, "global_size": size,
          "local_crops": FLAGS.local_crops, "warmup_s": round(warmup_s, 2),
          "min_step_s": round(min(times), 3), "median_step_s": round(statistics.median(times), 3),
          "images_per_s": round(batch / min(times), 2)})


def main(_):
    unknown = set(FLAGS.skip) - {"extract", "latency", "step"}
    if unknown:
        raise ValueError(f"--skip={sorted(unknown)}: valid parts are 'extract', 'latency', 'step'")
    keras.utils.set_random_seed(0)
    if not {"extract", "latency"} <= set(FLAGS.skip):
        start = time.perf_counter()
        teacher = ElasticSwin.from_config_name(FLAGS.teacher)
        emit({"benchmark": "swin_teacher_build", "teacher": FLAGS.teacher,
              "params": teacher.count_params(), "subnets": len(teacher.subnets()),
              "seconds": round(time.perf_counter() - start, 2)})
        if "extract" not in FLAGS.skip:
            bench_extract(teacher)
        if "latency" not in FLAGS.skip:
            bench_latency(teacher)
        del teacher
    if "step" not in FLAGS.skip:
        bench_step()


if __name__ == "__main__":
    app.run(main)
