"""What MAE pretraining and MAE-Lite's attention distillation give a small ViT, on the embedded
shapes data: k-NN and linear-probe top-1 of held-out images, over seeds.

    KERAS_BACKEND=jax python benchmarks/mae_quality.py --runs=runs/mae
    # smoke test (seconds, meaningless numbers)
    KERAS_BACKEND=torch python benchmarks/mae_quality.py --runs=/tmp/mq --seeds=0 \\
        --override=train.epochs=1 --override=data.steps_per_epoch=2 \\
        --override=data.num_images=256 --override=data.num_val=128

Arms, per seed (the recipe's ``seed`` and ``train.mask_seed``; the images, ``data.seed``, stay
the same):

* ``random``: the encoder ``vit_mae_demo`` as initialised with that seed (no training);
* ``mae``: recipes/demo_mae.py with as many optimizer steps as give it the training FLOPs of a
  distillation run (``data.steps_per_epoch`` x the analytic FLOPs ratio; every schedule is in
  epochs and stretches with it);
* ``mae_distill``: recipes/demo_mae_distill.py, the same student, data and schedule plus the
  attention distillation from ONE frozen teacher (recipes/demo_mae_teacher.py, trained once,
  seed 0, into RUNS/teacher; as in MAE-Lite, the teacher's own pretraining is not counted).
  The teacher itself is evaluated too (an ``eval`` record of arm ``teacher``, seed 0), as a
  diagnostic: it is no arm of the comparison.

FLOPs (analytic, per image; forward x 3 for forward + backward): the encoder on the 1 + K
visible tokens (its linear layers scale with the tokens, its attention with their square, the
patch embedding sees all N patches), the decoder on 1 + N tokens; distillation adds the
teacher's forward on the same 1 + K tokens.

Evaluation (held-out images used for no choice): the CLS feature (final norm) of the first
``--bank_images`` train images and ``--query_images`` val images; weighted k-NN (k = 20,
T = 0.07) and a linear probe (``eval.linear.train_linear_classifier``, its default grid of
learning rates, best on the val images as DINOv2 reports it). Per arm: mean +- sd over seeds;
per pair (mae - random, mae_distill - mae): a paired t-test over the seeds.

Output: JSON lines on stdout (``budget``, ``run``, ``eval``, ``summary``, ``paired``), then a
table. ``RUNS/seed<s>/<arm>`` are pretrain run directories; a finished one is reused.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (its flags: --runs, --seeds, --override, --verbose, --k, ...)

flags.DEFINE_integer("bank_images", 2000, "Train images of the k-NN bank and the probe.")
flags.DEFINE_integer("query_images", 1000, "Held-out val images (the first ones).")
flags.DEFINE_enum("feature", "cls", ["cls", "mean_patch"], "The evaluated feature: the CLS "
                  "token or the mean of the patch tokens (MAE's global pool), both final-norm.")
flags.DEFINE_enum("stage", "all", ["all", "train", "eval"], "train: only train; eval: only "
                  "evaluate finished runs.")
flags.DEFINE_list("train_arms", ["mae", "mae_distill"], "The trained arms this call runs (two "
                  "calls with one arm each train side by side, e.g. with one PyTorch thread "
                  "each on 2 cores).")
FLAGS = flags.FLAGS
ARMS = ("random", "mae", "mae_distill")


def encoder_flops(backbone, tokens):
    """Forward FLOPs per image of an ElasticViT on ``tokens`` tokens (1 + visible patches)."""
    terms = backbone.subnet_flops(None, backbone.image_size, breakdown=True)
    full = 1 + backbone.grid_size ** 2
    linear = terms["qkv"] + terms["proj"] + terms["mlp"]
    attention = terms["attn_scores"] + terms["attn_values"]
    return terms["patch_embed"] + linear * tokens / full + attention * (tokens / full) ** 2


def decoder_flops(backbone, head):
    tokens = 1 + backbone.grid_size ** 2
    dim, depth = int(head["dim"]), int(head["depth"])
    hidden = int(dim * float(head.get("mlp_ratio", 4.0)))
    block = 2 * tokens * (4 * dim * dim + 2 * dim * hidden) + 4 * tokens * tokens * dim
    out = backbone.patch_size ** 2 * backbone.in_channels
    return 2 * tokens * backbone.embed_dim * dim + depth * block + 2 * tokens * dim * out


def budget(student_recipe, teacher_recipe):
    """(ratio of a distillation step's FLOPs to an MAE step's, details)."""
    from poa_keras.backbones import from_config_name
    from poa_keras.data.masking import num_visible_patches

    def build(recipe):
        config = dict(recipe["backbone"])
        return from_config_name(config.pop("config"), **config)

    student, teacher = build(student_recipe), build(teacher_recipe)
    visible = num_visible_patches(student.grid_size ** 2,
                                  float(student_recipe["train"].get("mask_ratio", 0.75)))
    mae = 3 * (encoder_flops(student, 1 + visible) + decoder_flops(student,
                                                                    student_recipe["head"]))
    distill = mae + encoder_flops(teacher, 1 + visible)
    details = {"record": "budget", "visible_patches": visible,
               "mflops_mae_step_per_image": quality._r(mae / 1e6),
               "mflops_distill_step_per_image": quality._r(distill / 1e6),
               "ratio": quality._r(distill / mae)}
    return distill / mae, details


def recipes(seed, ratio):
    from poa_keras.pretrain import apply_override, load_recipe

    out = {}
    for arm, name in (("mae", "demo_mae"), ("mae_distill", "demo_mae_distill")):
        recipe = load_recipe(name, list(FLAGS.override))
        recipe["data"].setdefault("seed", int(recipe.get("seed", 0)))
        apply_override(recipe, f"seed={int(seed)}")
        apply_override(recipe, f"train.mask_seed={int(seed)}")
        if arm == "mae":
            steps = quality._steps_per_epoch(recipe)
            apply_override(recipe, f"data.steps_per_epoch={round(ratio * steps)}")
        else:
            recipe["distill"] = dict(teacher=os.path.join(FLAGS.runs, "teacher", "teacher"))
        out[arm] = recipe
    return out


def trained(recipe, run_dir, label):
    from poa_keras import Backbone

    if os.path.isdir(os.path.join(run_dir, "teacher")):
        quality.emit({"record": "run", "arm": label, "run_dir": run_dir, "reused": True,
                      "timing": quality.timing_summary(run_dir)})
        return Backbone.from_preset(os.path.join(run_dir, "teacher"))
    if FLAGS.stage == "eval":
        raise FileNotFoundError(f"{run_dir} has no finished run")
    result, _ = quality.train(recipe, run_dir, label)
    return result.teacher


def mean_patch_tokens(backbone, images, batch_size=250):
    """The mean of the final-norm patch tokens (MAE's global-pool feature), batch by batch."""
    import numpy as np
    from keras import ops

    from poa_keras.eval.features import to_backbone_input

    out = []
    for start in range(0, len(images), batch_size):
        x = to_backbone_input(images[start:start + batch_size], backbone.in_channels,
                              backbone.preprocessing)
        tokens = backbone(x, training=False)["patch_tokens"]
        out.append(np.asarray(ops.convert_to_numpy(ops.mean(tokens, axis=1))))
    return np.concatenate(out)


def evaluate(arm, seed, backbone, recipe):
    from poa_keras.eval.features import extract_features
    from poa_keras.eval.knn import knn_classify
    from poa_keras.eval.linear import train_linear_classifier

    (x_train, y_train), (x_val, y_val), names = quality.shapes_data(recipe)
    x_train, y_train = x_train[:FLAGS.bank_images], y_train[:FLAGS.bank_images]
    x_val, y_val = x_val[:FLAGS.query_images], y_val[:FLAGS.query_images]
    if FLAGS.feature == "cls":
        bank = extract_features(backbone, x_train, normalize=False)
        queries = extract_features(backbone, x_val, normalize=False)
    else:
        bank, queries = mean_patch_tokens(backbone, x_train), mean_patch_tokens(backbone, x_val)
    knn = knn_classify(bank, y_train, queries, y_val, len(names), ks=(int(FLAGS.k),),
                       temperature=float(FLAGS.temperature))[int(FLAGS.k)]["top1"]
    probe = train_linear_classifier(bank, y_train, queries, y_val, len(names), seed=int(seed))
    record = {"record": "eval", "arm": arm, "seed": int(seed), "feature": FLAGS.feature,
              "knn_top1": quality._r(knn),
              "linear_top1": quality._r(probe["top1"]),
              "linear_lr": probe["best_learning_rate"]}
    quality.emit(record)
    return record


def main(argv):
    del argv
    from poa_keras.backbones import from_config_name
    from poa_keras.pretrain import load_recipe

    teacher_recipe = load_recipe("demo_mae_teacher", list(FLAGS.override))
    ratio, details = budget(load_recipe("demo_mae", list(FLAGS.override)), teacher_recipe)
    quality.emit(details)
    teacher = None
    if "mae_distill" in FLAGS.train_arms or FLAGS.stage != "train":
        teacher = trained(teacher_recipe, os.path.join(FLAGS.runs, "teacher"), "teacher")
    results = []
    if FLAGS.stage != "train":
        # a diagnostic, not an arm: distillation can only pass on what the teacher has
        # (on the students' images: the data section of the MAE arm)
        evaluate("teacher", 0, teacher, recipes(FLAGS.seeds[0], ratio)["mae"])
    for seed in FLAGS.seeds:
        arms = recipes(seed, ratio)
        for arm in ("mae", "mae_distill"):
            if FLAGS.stage == "train" and arm not in FLAGS.train_arms:
                continue
            backbone = trained(arms[arm], os.path.join(FLAGS.runs, f"seed{seed}", arm),
                               f"{arm}/seed{seed}")
            if FLAGS.stage != "train":
                results.append(evaluate(arm, seed, backbone, arms[arm]))
        if FLAGS.stage != "train":
            import keras

            keras.utils.set_random_seed(int(seed))
            config = dict(arms["mae"]["backbone"])
            random = from_config_name(config.pop("config"), **config)
            from poa_keras.pretrain import data_preprocessing

            random.preprocessing = data_preprocessing(arms["mae"])
            results.append(evaluate("random", seed, random, arms["mae"]))
    if FLAGS.stage == "train":
        return
    table = {}
    for metric in ("knn_top1", "linear_top1"):
        for arm in ARMS:
            values = {r["seed"]: r[metric] for r in results if r["arm"] == arm}
            mean, sd = quality.mean_sd(values.values())
            table[(metric, arm)] = (mean, sd)
            quality.emit({"record": "summary", "metric": metric, "arm": arm,
                          "mean": quality._r(mean), "sd": quality._r(sd),
                          "seeds": sorted(values)})
        for a, b in (("mae", "random"), ("mae_distill", "mae")):
            va = {r["seed"]: r[metric] for r in results if r["arm"] == a}
            vb = {r["seed"]: r[metric] for r in results if r["arm"] == b}
            seeds = sorted(set(va) & set(vb))
            diff, sd, t, p, n = quality.paired_test([va[s] for s in seeds],
                                                    [vb[s] for s in seeds])
            quality.emit({"record": "paired", "metric": metric, "pair": f"{a}-{b}",
                          "diff_mean": quality._r(diff), "diff_sd": quality._r(sd),
                          "t": quality._r(t), "p": quality._r(p), "n": n})
    print(f"\n{'metric':<12} " + " ".join(f"{arm:>16}" for arm in ARMS))
    for metric in ("knn_top1", "linear_top1"):
        print(f"{metric:<12} " + " ".join(f"{quality._pct(*table[(metric, arm)]):>16}"
                                          for arm in ARMS))


if __name__ == "__main__":
    app.run(main)
