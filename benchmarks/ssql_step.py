"""What quantization-aware training costs per step, and that it compiles nothing extra.

    KERAS_BACKEND=torch python benchmarks/ssql_step.py [--steps=12 --batch=64]

Two pairs, each built from the demo recipes (same backbone, heads, batch):

* ``ssql`` / ``simsiam``: recipes/demo_ssql.py vs demo_simsiam.py (``resnet_bn_demo``, two
  64 px views). SSQL runs the encoder twice per step (float and quantized), so about 2x;
* ``poa_ssql`` / ``poa``: recipes/demo_poa_ssql.py vs demo.py (``vit_elastic_demo``, 2 global
  + 2 local crops), every step at the same pinned subnet (the middle of the grid) so both
  arms do the same work; POA x SSQL's elastic student is quantized at random bits on half of
  the steps (its quantized steps at the intact size are switched off here).

The two arms of a pair are timed in alternation (step of A, step of B, ...) after one warm-up
step each, so a drift of the machine hits both; the medians and their ratio are printed as
JSON lines, with each trainer's ``num_compilations`` after the steps (the bit-widths are
run-time values: the quantized arm compiles what its float twin does).
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("steps", 12, "Timed steps per arm.")
flags.DEFINE_integer("batch", 64, "Images per view.")
FLAGS = flags.FLAGS


def _trainer(name, batch, steps):
    import keras

    from poa_keras.pretrain import build_trainer, load_recipe

    recipe = load_recipe(name, [f"train.batch_size={batch}"])
    keras.utils.set_random_seed(0)
    teacher = None
    if recipe.get("distill"):   # MAE-Lite: a teacher of the teacher recipe's architecture
        from poa_keras.backbones import from_config_name

        source = recipe.pop("distill")
        if source.get("teacher"):
            from poa_keras import Backbone

            teacher = Backbone.from_preset(source["teacher"])
        else:
            config = dict(load_recipe(source["teacher_recipe"])["backbone"])
            teacher = from_config_name(config.pop("config"), **config)
    return build_trainer(recipe, steps, teacher=teacher), recipe


def _views(recipe, batch, rng):
    data = recipe["data"]
    size = int(data.get("global_size", data.get("image_size")))
    out = {"global": rng.uniform(-1, 1, (2, batch, size, size, 3)).astype("float32")}
    if int(data.get("num_local", 0) or 0):
        local = int(data["local_size"])
        out["local"] = rng.uniform(-1, 1, (int(data["num_local"]), batch, local, local,
                                            3)).astype("float32")
    return out


def _pin_subnet(trainer):
    """POA: every step at the grid's middle subnet (the same work in both arms; POA x SSQL's
    quantized steps at the intact size are switched off for the timing)."""
    if hasattr(trainer, "next_subnet") and getattr(trainer, "elastic", False):
        grid = trainer.backbone.subnets()
        middle = grid[len(grid) // 2]
        trainer.next_subnet = lambda: middle
        if "quant_intact_probability" in trainer.recipe:
            trainer.recipe["quant_intact_probability"] = 0.0


def pair(name_a, name_b, steps, batch):
    import keras

    rng = np.random.default_rng(0)
    arms = []
    for name in (name_a, name_b):
        trainer, recipe = _trainer(name, batch, steps + 1)
        _pin_subnet(trainer)
        arms.append((name, trainer, _views(recipe, batch, rng)))
    times = {name: [] for name, _, _ in arms}
    for name, trainer, data in arms:          # warm-up (compiles)
        trainer.train_on_batch(data)
    for _ in range(steps):
        for name, trainer, data in arms:
            start = time.perf_counter()
            logs = trainer.train_on_batch(data, return_dict=True)
            float(keras.ops.convert_to_numpy(logs["loss"]))   # wait for the step
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    record = {"record": "step", "backend": keras.backend.backend(), "batch": batch,
              "steps": steps, "median_s": {k: round(v, 4) for k, v in medians.items()},
              "ratio": round(medians[name_a] / medians[name_b], 3),
              "images_per_s": {k: round(batch / v, 1) for k, v in medians.items()},
              "compilations": {name: trainer.num_compilations for name, trainer, _ in arms}}
    print(json.dumps(record), flush=True)


def main(argv):
    del argv
    pair("demo_ssql", "demo_simsiam", FLAGS.steps, FLAGS.batch)
    pair("demo_poa_ssql", "demo", FLAGS.steps, FLAGS.batch)


if __name__ == "__main__":
    app.run(main)
