"""ElasticResNet: extraction time of the reference teacher's named subnets, inference latency of an
extracted subnet vs. the same network built directly, and POA step throughput, in one run on the
active backend.

    KERAS_BACKEND=torch python benchmarks/resnet.py [--teacher=resnet_elastic --subnet=r50
        --direct=resnet50 --batch=8 --repeats=5 --poa_config=resnet_elastic_demo --poa_batch=16
        --poa_steps=3]

Prints one JSON line per measurement:

* ``resnet_extract``: building the teacher (random weights) and extracting every named subnet
  (seconds each, parameter counts).
* ``resnet_forward``: median latency of ``--subnet`` extracted from the teacher, of the same
  configuration built directly (``--direct``; parameter counts must match) and of the teacher's
  elastic (sliced) forward of that subnet, over ``--repeats`` interleaved rounds (each
  starting with the next variant) after a warm-up (compiled on jax / tensorflow, eager without
  autograd on torch). ``extracted_over_direct``
  should stay near 1: extraction leaves no slicing at run time.
* ``resnet_poa_step``: POA ``train_on_batch`` time (min over ``--poa_steps`` after one warm-up
  step per plan; a fixed plan, so no step compiles) on ``--poa_config`` with 2 global crops of
  its image size and ``--local_crops`` crops of half that size; images/s = batch / step time.

``--skip=teacher`` or ``--skip=poa`` leaves a part out. The extraction time of every subnet of
the grid (not only the named ones) is ``benchmarks/extract.py --config=resnet_elastic``.
"""
import json
import statistics
import time

import keras
import numpy as np
from absl import app, flags

from poa_keras import ElasticResNet

flags.DEFINE_string("teacher", "resnet_elastic", "Named configuration of the teacher.")
flags.DEFINE_string("subnet", "r50", "Named size whose latency is measured.")
flags.DEFINE_string("direct", "resnet50", "Named configuration of the same size, built directly.")
flags.DEFINE_integer("batch", 8, "Inference batch size.")
flags.DEFINE_integer("image_size", 224, "Inference image size.")
flags.DEFINE_integer("repeats", 5, "Timed calls per variant (interleaved).")
flags.DEFINE_string("poa_config", "resnet_elastic_demo", "Configuration trained by POA.")
flags.DEFINE_integer("poa_batch", 16, "POA batch size (images).")
flags.DEFINE_integer("local_crops", 2, "POA local crops per image (half the image size).")
flags.DEFINE_integer("poa_steps", 3, "Timed POA steps.")
flags.DEFINE_list("skip", [], "Parts to leave out: teacher (extract and forward), poa.")
FLAGS = flags.FLAGS


def emit(record):
    print(json.dumps(dict(record, backend=keras.backend.backend())), flush=True)


def _sync(out):
    return keras.ops.convert_to_numpy(out["cls"])  # waits for asynchronous backends


def bench_teacher():
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    teacher = ElasticResNet.from_config_name(FLAGS.teacher)
    build_s = time.perf_counter() - start
    extract = {}
    subnets = {}
    for name, spec in teacher.named_subnets.items():
        start = time.perf_counter()
        subnets[name] = teacher.extract(spec)
        extract[name] = {"seconds": round(time.perf_counter() - start, 3),
                         "params": subnets[name].count_params(),
                         "width": spec.width, "depths": list(spec.depths)}
    emit({"benchmark": "resnet_extract", "teacher": FLAGS.teacher,
          "teacher_params": teacher.count_params(), "teacher_build_s": round(build_s, 2),
          "subnets_in_grid": len(teacher.subnets()), "extract": extract})

    spec = teacher.resolve_subnet(FLAGS.subnet)
    extracted = subnets[FLAGS.subnet] if FLAGS.subnet in subnets else teacher.extract(spec)
    del subnets
    direct = ElasticResNet.from_config_name(FLAGS.direct)
    if direct.count_params() != extracted.count_params():
        raise ValueError(f"{FLAGS.direct} has {direct.count_params()} parameters, the extracted "
                         f"{FLAGS.subnet} {extracted.count_params()}: not the same size")
    size = FLAGS.image_size
    images = np.random.default_rng(0).uniform(-1, 1, (FLAGS.batch, size, size, 3)).astype(
        "float32")
    variants = {"extracted": extracted.compiled_forward(), "direct": direct.compiled_forward(),
                "elastic": teacher.compiled_forward(spec)}
    for fn in variants.values():  # compile and warm up
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
    emit({"benchmark": "resnet_forward", "teacher": FLAGS.teacher, "subnet": FLAGS.subnet,
          "direct": FLAGS.direct, "batch": FLAGS.batch, "image_size": size,
          "median_s": {k: round(v, 4) for k, v in median.items()},
          "extracted_over_direct": round(median["extracted"] / median["direct"], 3),
          "elastic_over_extracted": round(median["elastic"] / median["extracted"], 3),
          "gflops_per_image": round(teacher.subnet_flops(spec, size) / 1e9, 2)})


def bench_poa():
    from poa_keras.methods import POA

    keras.utils.set_random_seed(0)
    backbone = ElasticResNet.from_config_name(FLAGS.poa_config, name="poa_student")
    recipe = dict(epochs=1, steps_per_epoch=1000, batch_size=FLAGS.poa_batch, warmup_epochs=0,
                  warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0, layer_decay=0.95,
                  patch_embed_lr_mult=1.0, ibot_weight=0.0)
    trainer = POA(backbone, dict(hidden_dim=256, bottleneck_dim=64, out_dims=(512, 512)),
                  recipe=recipe)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
    size = backbone.image_size
    rng = np.random.default_rng(0)
    data = {"global": rng.normal(size=(2, FLAGS.poa_batch, size, size, 3)).astype("float32")}
    if FLAGS.local_crops:
        data["local"] = rng.normal(size=(FLAGS.local_crops, FLAGS.poa_batch, size // 2,
                                         size // 2, 3)).astype("float32")
    state = trainer.get_sampler_state()
    plan = trainer.sampler.next()
    trainer.set_sampler_state(state)
    start = time.perf_counter()
    trainer.train_on_batch(data, return_dict=True)   # warm-up (compiles on jax / tensorflow)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(FLAGS.poa_steps):
        trainer.set_sampler_state(state)   # the same plan every step: no new program
        start = time.perf_counter()
        logs = trainer.train_on_batch(data, return_dict=True)
        float(logs["loss"])
        times.append(time.perf_counter() - start)
    step = min(times)
    emit({"benchmark": "resnet_poa_step", "config": FLAGS.poa_config,
          "params": backbone.count_params(), "batch": FLAGS.poa_batch, "image_size": size,
          "local_crops": FLAGS.local_crops, "plan": [plan.width, list(plan.depths)],
          "warmup_s": round(warmup_s, 2), "step_s_min": round(step, 3),
          "step_s_median": round(statistics.median(times), 3),
          "images_per_s": round(FLAGS.poa_batch / step, 2),
          "compilations": trainer.num_compilations})


def main(_):
    unknown = set(FLAGS.skip) - {"teacher", "poa"}
    if unknown:
        raise ValueError(f"--skip={sorted(unknown)}: valid parts are 'teacher' and 'poa'")
    if "teacher" not in FLAGS.skip:
        bench_teacher()
    if "poa" not in FLAGS.skip:
        bench_poa()


if __name__ == "__main__":
    app.run(main)
