"""How many train-step programs a POA run over a family's whole grid compiles, and how long they
take, with the depth as a static plan (one program per subnet) and as a run-time block mask
(one program per width, DESIGN contract 6), on the active backend (jax or tensorflow).

    KERAS_BACKEND=jax python benchmarks/compile_grid.py [--family=vit --config=vit_l16_elastic
        --image_size=32 --batch=1 --local_crops=0 --measure=2]

Counts: the distinct plans of the grid in each mode (``POA.plan_for`` over every subnet the
sampler can draw; with iBOT twice as many). Seconds: compiling a program for the whole grid
would take hours on a small CPU, so ``--measure`` plans of each mode are compiled for a tiny
batch (``--batch`` images of ``--image_size`` px, 2 global crops and ``--local_crops`` local
crops of half the size: compile time hardly depends on the batch) and timed as the first
``train_on_batch`` minus a second one (the run itself); the grid's total is EXTRAPOLATED as
count x the mean measured seconds (the measured plans are the widest ones at full and at
minimum depth: an upper-end estimate per static program). One JSON line per measured program,
then a summary line.
"""
import json
import time

import keras
import numpy as np
from absl import app, flags

flags.DEFINE_enum("family", "vit", ["vit", "swin", "resnet"], "Backbone family.")
flags.DEFINE_string("config", "vit_l16_elastic", "Named configuration of the family.")
flags.DEFINE_integer("image_size", 32, "Global crop size (local crops: half).")
flags.DEFINE_integer("batch", 1, "Images per step.")
flags.DEFINE_integer("local_crops", 0, "Local crops per image.")
flags.DEFINE_integer("measure", 2, "Programs of each mode to compile and time (0: counts only).")
FLAGS = flags.FLAGS


def emit(record):
    print(json.dumps(record), flush=True)


def _backbone():
    from poa_keras import ElasticResNet, ElasticSwin, ElasticViT

    cls = {"vit": ElasticViT, "swin": ElasticSwin, "resnet": ElasticResNet}[FLAGS.family]
    overrides = {"image_size": FLAGS.image_size} if FLAGS.family != "resnet" else {}
    return cls.from_config_name(FLAGS.config, **overrides)


def _trainer(backbone, runtime_depth, subnet):
    from poa_keras.methods import POA

    class Pinned(POA):
        def next_subnet(self):
            return subnet

    trainer = Pinned(backbone, dict(hidden_dim=64, bottleneck_dim=32, out_dims=(64,)),
                     recipe=dict(epochs=1, steps_per_epoch=10, batch_size=FLAGS.batch,
                                 warmup_epochs=0, koleo_weight=0.0),
                     runtime_depth=runtime_depth)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
    return trainer


def main(argv):
    del argv
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        raise SystemExit(f"{backend} compiles nothing; run with KERAS_BACKEND=jax or tensorflow")
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    backbone = _backbone()
    build_s = time.perf_counter() - start
    grid = sorted(set(backbone.sampler(seed=0).candidates))
    static_plans = set(grid)                                        # one program per subnet
    runtime_plans = {backbone.full_depth_subnet(s) for s in grid}   # one per width
    rng = np.random.default_rng(0)
    size = FLAGS.image_size
    data = {"global": rng.uniform(-1, 1, (2, FLAGS.batch, size, size, 3)).astype("float32")}
    if FLAGS.local_crops:
        data["local"] = rng.uniform(-1, 1, (FLAGS.local_crops, FLAGS.batch, size // 2,
                                            size // 2, 3)).astype("float32")
    widest = max(s.width for s in grid)
    at_width = sorted(s for s in grid if s.width == widest)
    picks = [at_width[-1], at_width[0]][:FLAGS.measure]
    seconds = {"static": [], "runtime": []}
    for mode, runtime in (("static", False), ("runtime", True)):
        for subnet in picks:
            trainer = _trainer(backbone, runtime, subnet)
            t0 = time.perf_counter()
            trainer.train_on_batch(data)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            trainer.train_on_batch(data)
            run = time.perf_counter() - t0
            seconds[mode].append(max(first - run, 0.0))
            emit({"record": "program", "backend": backend, "mode": mode,
                  "subnet": str(subnet), "plan": str(trainer.last_plan),
                  "compilations": trainer.num_compilations,
                  "compile_s": round(first - run, 2), "step_s": round(run, 3)})
            del trainer
    summary = {"record": "grid", "backend": backend, "config": FLAGS.config,
               "image_size": size, "batch": FLAGS.batch, "build_s": round(build_s, 1),
               "subnets_drawn": len(grid), "widths": len({s.width for s in grid}),
               "programs_static": len(static_plans), "programs_runtime": len(runtime_plans)}
    if backbone.supports_masks:   # the iBOT phase doubles both (ViT only)
        summary.update(programs_static_with_ibot=2 * len(static_plans),
                       programs_runtime_with_ibot=2 * len(runtime_plans))
    for mode, count in (("static", len(static_plans)), ("runtime", len(runtime_plans))):
        if seconds[mode]:
            mean = float(np.mean(seconds[mode]))
            summary[f"{mode}_compile_s_measured_mean"] = round(mean, 1)
            summary[f"{mode}_grid_compile_s_extrapolated"] = round(count * mean, 0)
    emit(summary)


if __name__ == "__main__":
    app.run(main)
