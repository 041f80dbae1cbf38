"""Short fine-tuning (recipes/demo_finetune.py, MAE-Lite's recipe scaled down) of the encoders of
benchmarks/mae_quality.py: random init vs MAE vs MAE + attention distillation, per seed.

    KERAS_BACKEND=torch python benchmarks/mae_finetune.py --runs=runs/mae [--epochs=4]

For every seed s of ``--seeds`` and arm: ``finetune("demo_finetune", RUNS/seed<s>/<arm>/finetune,
overrides=[model.preset=<the arm's encoder>, model.subnet=None, seed=s])``; the random arm's
encoder is ``vit_mae_demo`` initialised with seed s (saved as a preset first). The held-out top-1
(1000 images used for no choice) per run, mean +- sd per arm, paired t-tests (mae - random,
mae_distill - mae) as JSON lines, then a table.
"""
from __future__ import annotations

import contextlib
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (its flags: --runs, --seeds, ...)

flags.DEFINE_integer("epochs", None, "Fine-tuning epochs (default: the recipe's).")
FLAGS = flags.FLAGS
ARMS = ("random", "mae", "mae_distill")


def encoder_preset(arm, seed):
    """The preset directory of an arm's encoder (the random one is made here)."""
    run = os.path.join(FLAGS.runs, f"seed{seed}", arm)
    preset = os.path.join(run, "teacher")
    if arm == "random" and not os.path.isdir(preset):
        import keras

        from poa_keras.backbones import from_config_name
        from poa_keras.pretrain import data_preprocessing, load_recipe

        keras.utils.set_random_seed(int(seed))
        encoder = from_config_name("vit_mae_demo")
        encoder.preprocessing = data_preprocessing(load_recipe("demo_mae"))
        encoder.save_to_preset(preset)
    if not os.path.isdir(preset):
        raise FileNotFoundError(f"{preset} is missing: run benchmarks/mae_quality.py first")
    return preset


def main(argv):
    del argv
    from poa_keras.finetune import finetune

    results = {arm: {} for arm in ARMS}
    for seed in FLAGS.seeds:
        for arm in ARMS:
            overrides = [f"model.preset={encoder_preset(arm, seed)!r}", "model.subnet=None",
                         f"seed={int(seed)}"]
            if FLAGS.epochs:
                overrides.append(f"train.epochs={int(FLAGS.epochs)}")
            with contextlib.redirect_stdout(sys.stderr):
                result = finetune("demo_finetune",
                                  os.path.join(FLAGS.runs, f"seed{seed}", arm, "finetune"),
                                  overrides=overrides, verbose=0)
            results[arm][int(seed)] = float(result.top1)
            quality.emit({"record": "finetune", "arm": arm, "seed": int(seed),
                          "top1": quality._r(result.top1)})
    for arm in ARMS:
        mean, sd = quality.mean_sd(results[arm].values())
        quality.emit({"record": "summary", "arm": arm, "top1_mean": quality._r(mean),
                      "top1_sd": quality._r(sd), "seeds": sorted(results[arm])})
    for a, b in (("mae", "random"), ("mae_distill", "mae")):
        seeds = sorted(set(results[a]) & set(results[b]))
        diff, sd, t, p, n = quality.paired_test([results[a][s] for s in seeds],
                                                [results[b][s] for s in seeds])
        quality.emit({"record": "paired", "pair": f"{a}-{b}", "diff_mean": quality._r(diff),
                      "diff_sd": quality._r(sd), "t": quality._r(t), "p": quality._r(p),
                      "n": n})
    print("\n" + " ".join(f"{arm:>16}" for arm in ARMS))
    print(" ".join(f"{quality._pct(*quality.mean_sd(results[arm].values())):>16}"
                   for arm in ARMS))


if __name__ == "__main__":
    app.run(main)
