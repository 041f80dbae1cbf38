"""What quantization-aware pretraining buys under low-bit post-training quantization (PTQ):
k-NN top-1 of PTQ features at several bit-widths, over seeds.

    # POA x SSQL (recipes/demo_poa_ssql.py) vs POA (recipes/demo.py), smallest and full subnet
    KERAS_BACKEND=torch python benchmarks/ssql_quality.py --pair=poa --runs=runs/ssql
    # SSQL (recipes/demo_ssql.py) vs SimSiam (recipes/demo_simsiam.py) at equal training FLOPs
    KERAS_BACKEND=torch python benchmarks/ssql_quality.py --pair=ssql --runs=runs/ssql
    # smoke test (seconds, meaningless numbers)
    KERAS_BACKEND=torch python benchmarks/ssql_quality.py --pair=poa --runs=/tmp/sq --seeds=0 \\
        --override=train.epochs=1 --override=data.steps_per_epoch=2 \\
        --override=data.num_images=256 --override=data.num_val=128

Arms, each trained once per seed (the recipe's ``seed``, and for POA ``train.sampler_seed``
and ``train.quant_seed`` = 100 + seed; the images, ``data.seed``, stay the same):

* ``--pair=poa``: ``poa`` (recipes/demo.py) and ``poa_ssql`` (recipes/demo_poa_ssql.py: the
  same recipe plus the quantized elastic student). Same steps and epochs: POA x SSQL adds
  element-wise quantizer ops only (its step time is measured and reported, ``run`` records);
* ``--pair=ssql``: ``simsiam`` and ``ssql`` (recipes/demo_simsiam.py, demo_ssql.py: the same
  backbone, heads, data and schedules). Equal training FLOPs: an SSQL step runs the encoder
  forward and backward twice (float and quantized branch), a SimSiam step once, so SimSiam
  gets ``--simsiam_ratio`` (2) times the optimizer steps per epoch (``data.steps_per_epoch``;
  every schedule is in epochs and stretches with it).

Evaluation: ``poa_keras.eval.sweep(teacher, train, val, subnets, bits=...)``: min/max PTQ of
the frozen backbone (calibrated on the first 100 train images), weighted k-NN (k = 20,
T = 0.07) of the first ``--query_images`` (1000) held-out val images (used for no choice)
against the first ``--bank_images`` (2000) train images as the bank, at every bit pair of ``--bits`` (SSQL's set), for the smallest and the full
subnet (POA) or the one network (SSQL, SimSiam). Per (arm, subnet, bits): mean +- sd over the
seeds; per (subnet, bits): a paired t-test over seeds of the quantization-aware arm minus its
baseline (``scipy.stats.ttest_rel``). Collapse: the similarity spread of the float features
(``eval.collapse``) is reported per run; a collapsed run (spread < 1e-4) is reported, not
averaged.

Runs: ``RUNS/seed<s>/<arm>`` are pretrain run directories; a finished one is reused (its
``teacher/`` preset), an unfinished one resumes. Output: JSON lines on stdout (``run``,
``ptq`` per arm / seed / subnet / bits, ``summary``, ``paired``), then a table.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (its flags: --runs, --seeds, --override, --verbose, --k, ...)

PAIRS = {"poa": ("poa", "poa_ssql"), "ssql": ("simsiam", "ssql")}
RECIPES = {"poa": "demo", "poa_ssql": "demo_poa_ssql", "simsiam": "demo_simsiam",
           "ssql": "demo_ssql"}
flags.DEFINE_enum("pair", "poa", list(PAIRS), "Which comparison: poa (POA x SSQL vs POA) or "
                  "ssql (SSQL vs SimSiam).")
flags.DEFINE_list("bits", ["32", "8/8", "5/5", "4/4", "3/3", "2/4"], "W/A bit pairs of the PTQ "
                  "evaluation (32: float).")
flags.DEFINE_float("simsiam_ratio", 2.0, "--pair=ssql: SimSiam's optimizer steps per SSQL "
                   "step (equal training FLOPs: 2).")
flags.DEFINE_enum("stage", "all", ["all", "train", "eval"], "train: only train the runs "
                  "(e.g. with torch, the fastest trainer on a CPU); eval: only evaluate finished "
                  "runs (e.g. with jax, whose compiled forwards are the fastest here); all: both.")
flags.DEFINE_integer("bank_images", 2000, "Train images in the k-NN bank (the first ones; "
                     "calibration uses the first 100 of them).")
flags.DEFINE_integer("query_images", 1000, "Held-out val images queried (the first ones).")
FLAGS = flags.FLAGS


def arm_recipe(arm, seed):
    from poa_keras.pretrain import apply_override, load_recipe

    recipe = load_recipe(RECIPES[arm], list(FLAGS.override))
    recipe["data"].setdefault("seed", int(recipe.get("seed", 0)))
    apply_override(recipe, f"seed={int(seed)}")
    if recipe["method"] == "poa":
        apply_override(recipe, f"train.sampler_seed={int(seed)}")
        if arm == "poa_ssql":
            apply_override(recipe, f"train.quant_seed={100 + int(seed)}")
    if arm == "simsiam":
        base = quality._steps_per_epoch(recipe)
        apply_override(recipe, f"data.steps_per_epoch={round(FLAGS.simsiam_ratio * base)}")
    return recipe


def teacher_of(arm, seed, recipe):
    """The trained backbone of one run (trained now if its directory has no finished run)."""
    from poa_keras import Backbone

    run_dir = os.path.join(FLAGS.runs, f"seed{seed}", arm)
    done = os.path.join(run_dir, "teacher")
    saved = quality._read_json(os.path.join(run_dir, "recipe.json"))
    if os.path.isdir(done) and saved is not None:
        mismatch = _recipe_mismatch(saved, recipe)
        if mismatch:
            raise ValueError(f"{run_dir} was trained with another recipe ({mismatch}); move it "
                             "away or give another --runs")
        if FLAGS.stage == "train":
            return None
        quality.emit({"record": "run", "arm": arm, "seed": seed, "run_dir": run_dir,
                      "reused": True, "timing": quality.timing_summary(run_dir)})
        return Backbone.from_preset(done)
    if FLAGS.stage == "eval":
        raise FileNotFoundError(f"{run_dir} has no finished run (--stage=eval evaluates "
                                "finished runs only)")
    result, _ = quality.train(recipe, run_dir, f"{arm}/seed{seed}")
    return None if FLAGS.stage == "train" else result.teacher


def _recipe_mismatch(saved, recipe):
    """The first (section.key) where a saved run's recipe differs from this one, or None."""
    expected = json.loads(json.dumps(recipe, default=list))
    for section in ("method", "backbone", "head", "data", "train", "seed"):
        a, b = saved.get(section), expected.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"{section}.{key}: {a.get(key)!r} vs {b.get(key)!r}"
        elif a != b:
            return f"{section}: {a!r} vs {b!r}"
    return None


def subnets_of(teacher):
    if len(teacher.subnets()) == 1:
        return {"intact": None}
    picks = quality.pick_subnets(teacher)
    return {"smallest": picks["smallest"], "full": picks["full"]}


def evaluate(arm, seed, teacher, recipe):
    from poa_keras.eval import sweep
    from poa_keras.eval.collapse import similarity_spread
    from poa_keras.eval.features import extract_features

    (x_train, y_train), (x_val, y_val), _ = quality.shapes_data(recipe)
    # every bit pair re-embeds the bank and the queries: a subset keeps a teacher's
    # evaluation to minutes on 2 CPU cores
    x_train, y_train = x_train[:FLAGS.bank_images], y_train[:FLAGS.bank_images]
    x_val, y_val = x_val[:FLAGS.query_images], y_val[:FLAGS.query_images]
    subnets = subnets_of(teacher)
    specs = [s for s in subnets.values() if s is not None] or None
    result = sweep(teacher, (x_train, y_train), (x_val, y_val), subnets=specs,
                   ks=(int(FLAGS.k),), temperature=float(FLAGS.temperature),
                   measure_latency=False, progress=False, bits=list(FLAGS.bits), int8=False)
    rows = []
    for row, spec in zip(result.rows, result.specs or [None] * len(result.rows)):
        name = "intact" if specs is None else next(n for n, s in subnets.items() if s == spec)
        rows.append(dict(record="ptq", arm=arm, seed=int(seed), subnet=name, bits=row["bits"],
                         top1=quality._r(row["top1"]), bytes=row.get("bytes"),
                         bitops=row.get("bitops")))
        quality.emit(rows[-1])
    for name, spec in subnets.items():
        bank = extract_features(teacher, x_train[:1000], subnet=spec)
        queries = extract_features(teacher, x_val[:500], subnet=spec)
        spread = float(similarity_spread(bank, queries))
        quality.emit({"record": "collapse", "arm": arm, "seed": int(seed), "subnet": name,
                      "spread": round(spread, 5), "collapsed": spread < 1e-4})
        if spread < 1e-4:
            rows = [r for r in rows if r["subnet"] != name]
    return rows


def main(argv):
    del argv
    baseline, aware = PAIRS[FLAGS.pair]
    results = []
    for seed in FLAGS.seeds:
        for arm in (baseline, aware):
            recipe = arm_recipe(arm, seed)
            teacher = teacher_of(arm, seed, recipe)
            if teacher is not None:
                results.extend(evaluate(arm, seed, teacher, recipe))
    if FLAGS.stage == "train":
        return
    table = []
    keys = sorted({(r["subnet"], r["bits"]) for r in results},
                  key=lambda k: (k[0], -_bits_order(k[1])))
    for subnet, bits in keys:
        per_arm = {}
        for arm in (baseline, aware):
            per_arm[arm] = {r["seed"]: r["top1"] for r in results
                            if (r["arm"], r["subnet"], r["bits"]) == (arm, subnet, bits)}
            mean, sd = quality.mean_sd(per_arm[arm].values())
            quality.emit({"record": "summary", "arm": arm, "subnet": subnet, "bits": bits,
                          "top1_mean": quality._r(mean), "top1_sd": quality._r(sd),
                          "seeds": sorted(per_arm[arm])})
        seeds = sorted(set(per_arm[baseline]) & set(per_arm[aware]))
        a = [per_arm[aware][s] for s in seeds]
        b = [per_arm[baseline][s] for s in seeds]
        diff, sd, t, p, n = quality.paired_test(a, b)
        quality.emit({"record": "paired", "pair": f"{aware}-{baseline}", "subnet": subnet,
                      "bits": bits, "diff_mean": quality._r(diff), "diff_sd": quality._r(sd),
                      "t": quality._r(t), "p": quality._r(p), "n": n,
                      "better_on_every_seed": bool(a) and all(x > y for x, y in zip(a, b))})
        table.append((subnet, bits, quality.mean_sd(b), quality.mean_sd(a), diff, p))
    print(f"\n{'subnet':<9} {'bits':<5} {baseline:>16} {aware:>16} {'diff':>7} {'p':>6}")
    for subnet, bits, base, mine, diff, p in table:
        print(f"{subnet:<9} {bits:<5} {quality._pct(*base):>16} {quality._pct(*mine):>16} "
              f"{'' if diff is None else f'{100 * diff:+.1f}':>7} "
              f"{'' if p is None else f'{p:.3f}':>6}")


def _bits_order(text):
    from poa_keras.quantization import parse_bits_pair

    w, a = parse_bits_pair(text)
    return w * 100 + a


if __name__ == "__main__":
    app.run(main)
