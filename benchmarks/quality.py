"""What POA's elastic branch buys: k-NN quality of extracted subnets, POA vs the same recipe
without the elastic student, over seeds.

    KERAS_BACKEND=torch python benchmarks/quality.py [--runs=runs/quality --seeds=0,1,2]
    # smoke test (seconds of training, meaningless numbers):
    KERAS_BACKEND=torch python benchmarks/quality.py --runs=/tmp/q --seeds=0 \\
        --override=train.epochs=1 --override=data.steps_per_epoch=2 \\
        --override=data.num_images=256 --override=data.num_val=128

Arms (``--arms``), each trained once per seed of ``--seeds`` (the recipe's ``seed`` -- weight
initialisation and the augmentation stream -- and ``train.sampler_seed`` set to the seed; the
images themselves, ``data.seed``, stay the same, so every arm is evaluated on the same bank and
the same held-out queries):

* ``poa``: ``--poa_recipe`` (recipes/demo.py), subnets EXTRACTED from its EMA teacher
  (``teacher.extract(spec)``, a standalone network of that size);
* ``poa_no_elastic``: the SAME recipe with only ``train.elastic_student=False`` (the same two
  projection heads, Sinkhorn-Knopp targets, KoLeo, schedules, data and crops; POA's loss with
  the intact student alone: methods/poa.py), trained with the same compute (below), the same
  subnets sliced out of its teacher with the same ``extract``. This is the comparison that
  isolates the elastic branch;
* ``dino_slice`` (optional): ``--dino_recipe`` (recipes/demo_dino.py: one DINO head, no KoLeo),
  same compute; it differs from POA in more than the elastic branch;
* ``random`` (always, seed 0 only): the POA recipe's network at initialisation, untrained.

Subnets: smallest = (min width, min depth), middle = (widths[len // 2], depths[len // 2]), full
= (max width, max depth) of the grid (``vit_elastic_demo``: (48, 3), (80, 5), (96, 6)).

Metric: weighted k-NN (DINO protocol, ``poa_keras.eval.knn_classify``: L2-normalised CLS
features, votes exp(sim / T), T = ``--temperature`` = 0.07) with the TRAIN split of the
embedded shapes data (the images pretraining saw, now with their labels) as the bank and its
held-out VAL split (``data.num_val`` images, never seen in training and used for no choice:
no recipe, threshold or epoch was picked on them) as the queries; top-1 / top-5 for every k of
``--ks``, headline k = ``--k`` (20).

Collapse (``poa_keras.eval.collapse``): every (arm, seed) gets the similarity spread of its
full-size features and the mean entropy of its teacher's heads on the queries. An arm is
``degenerate`` when its full-size spread is below 0.3 x the POA teacher's of the same seed,
below 1e-4, or its teacher's entropy is within 0.5 nats of uniform (ln K); the module doc
argues the thresholds (the old DINO baseline, spread 0.0022 vs POA's 0.176, is caught by the
first). A degenerate (arm, seed) is labelled so and left out of the means and the tests.

Same compute (``--compute``): POA's step trains the intact student AND an elastic subnet, so it
costs more than a step without it. The other arms keep the recipe's epochs and every schedule
(all measured in epochs: stretched to the new total) but get ``data.steps_per_epoch`` =
round(ratio x POA's steps per epoch), i.e. ratio times as many optimizer steps and images:

* ``flops`` (default): analytic training FLOPs per image from ``ElasticViT.subnet_flops``
  (multiply-add = 2; backward = 2 x forward, so a trained forward costs 3, the EMA teacher's
  forward 1)::

      no elastic = F(full, 2 globals) + 3 F(full, all crops)
      POA        = no elastic + 3 E_s[F(s, all crops)]   (s: the POA sampler's distribution)

  F(net, all crops) = 2 F(net, global_size) + num_local F(net, local_size). Heads (under 1 %
  here) and element-wise ops are not counted;
* ``flops_simple``: ratio = 1 + E_s[F(s, all crops)] / F(full, all crops) (students only);
* ``steps``: ratio = 1 (equal steps and epochs, NOT equal compute; for reference).

Runs: ``RUNS/seed<s>/<arm>`` are ``pretrain`` run directories: a rerun resumes a finished run
(nothing retrained) and only evaluates; an unfinished one continues from its last checkpoint.
Each also gets ``quality_timing.json`` (epoch and step times). ``RUNS/features/`` keeps the
extracted features (keyed by a hash of the teacher's weights, the images and the backend;
``--nocache_features`` to skip).

Output (stdout): JSON lines -- ``setup``, ``budget``, ``run`` (per training run), ``knn`` (per
arm, seed and subnet), ``collapse`` (per arm and seed), ``compare`` (per seed and subnet: POA
minus each other arm, exact McNemar test on the paired queries), ``summary`` (per arm and
subnet: mean +- sd over the non-degenerate seeds) and ``paired`` (per subnet: the paired
t-test over seeds of POA minus each arm, ``scipy.stats.ttest_rel``) -- then a table. Training
output goes to stderr.

Overrides (``--override``, every arm; ``--poa_override`` / ``--dino_override``, one recipe) are
pretrain's "section.key=value"; ``train.epochs`` is an integer (pretrain counts whole epochs),
so shrink a run with ``data.steps_per_epoch`` and ``data.num_images`` / ``data.num_val``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags

ARMS = ("poa", "poa_no_elastic", "dino_slice")
flags.DEFINE_string("runs", "runs/quality", "Directory of the run directories "
                    "(seed<s>/<arm>/); reruns resume / reuse them.")
flags.DEFINE_list("arms", ["poa", "poa_no_elastic"], f"Trained arms, of {list(ARMS)} "
                  "('poa' is always trained: it is the reference of the others).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: one run of every arm per seed.")
flags.DEFINE_string("poa_recipe", "demo", "POA recipe (a name in recipes/ or a .py path).")
flags.DEFINE_string("dino_recipe", "demo_dino", "DINO recipe of the dino_slice arm (same "
                    "backbone and data).")
flags.DEFINE_multi_string("override", [], "section.key=value for every recipe (repeatable).")
flags.DEFINE_multi_string("poa_override", [], "section.key=value for the POA recipe only "
                          "(both POA arms).")
flags.DEFINE_multi_string("dino_override", [], "section.key=value for the DINO recipe only.")
flags.DEFINE_enum("compute", "flops", ["flops", "flops_simple", "steps"],
                  "How the other arms' budget is matched to POA's (see the module docstring).")
flags.DEFINE_list("ks", ["10", "20", "100", "200"], "k of the k-NN evaluation.")
flags.DEFINE_integer("k", 20, "The headline k (of the JSON top1 field, the table, the tests).")
flags.DEFINE_float("temperature", 0.07, "k-NN vote temperature T.")
flags.DEFINE_integer("eval_batch", 64, "Images per forward pass of the feature extraction.")
flags.DEFINE_enum("verbose", "2", ["0", "1", "2"], "Keras fit verbosity of training (stderr).")
flags.DEFINE_bool("cache_features", True, "Keep the extracted features in RUNS/features/ "
                  "(keyed by a hash of the teacher's weights and the images), so that a rerun "
                  "only redoes the k-NN.")
FLAGS = flags.FLAGS

TIMING_FILE = "quality_timing.json"
SUBNETS = ("smallest", "middle", "full")


def emit(record):
    print(json.dumps(record), flush=True)


def _r(x, digits=4):
    return None if x is None else round(float(x), digits)


# ------------------------------------------------------------------------------ recipes, data

def base_recipes():
    """(POA recipe, DINO recipe or None) with the shared overrides, checked for fairness."""
    from poa_keras.pretrain import load_recipe

    poa = load_recipe(FLAGS.poa_recipe, list(FLAGS.override) + list(FLAGS.poa_override))
    if poa["method"] != "poa":
        raise ValueError(f"--poa_recipe must be a POA recipe, got method {poa['method']!r}")
    if poa["data"].get("source", "shapes") != "shapes":
        raise ValueError("benchmarks/quality.py evaluates on the labelled held-out split of the "
                         "embedded shapes data set: the recipe's data.source must be 'shapes'")
    if "dino_slice" not in FLAGS.arms:
        return poa, None
    dino = load_recipe(FLAGS.dino_recipe, list(FLAGS.override) + list(FLAGS.dino_override))
    if dino["method"] != "dino":
        raise ValueError(f"--dino_recipe must be a DINO recipe, got {dino['method']!r}")
    for section in ("backbone", "data"):
        if poa[section] != dino[section]:
            raise ValueError(f"the two recipes must share their {section!r} section for a fair "
                             f"comparison: {poa[section]} vs {dino[section]}")
    for key in ("epochs", "batch_size"):
        if poa["train"][key] != dino["train"][key]:
            raise ValueError(f"the two recipes must share train.{key}: "
                             f"{poa['train'][key]} vs {dino['train'][key]}")
    return poa, dino


def arm_recipe(arm, seed, poa, dino, steps_per_epoch):
    """The recipe of one (arm, seed): the seed overrides, the ablation switch, the budget."""
    from poa_keras.pretrain import apply_override, load_recipe

    recipe = load_recipe(dino if arm == "dino_slice" else poa)
    # the images stay those of the base recipe: only the training's seed changes
    recipe["data"].setdefault("seed", int(poa.get("seed", 0)))
    apply_override(recipe, f"seed={int(seed)}")
    if arm != "dino_slice":
        apply_override(recipe, f"train.sampler_seed={int(seed)}")
    if arm == "poa_no_elastic":
        apply_override(recipe, "train.elastic_student=False")
    if arm != "poa":
        apply_override(recipe, f"data.steps_per_epoch={int(steps_per_epoch)}")
    return recipe


def crop_sizes(recipe):
    """(global_size, local_size, num_local) of the recipe's multi-crop pipeline."""
    import inspect

    from poa_keras.data.multicrop import multicrop_dataset

    defaults = {k: p.default for k, p in inspect.signature(multicrop_dataset).parameters.items()}
    data = recipe["data"]
    return tuple(int(data.get(k, defaults[k])) for k in ("global_size", "local_size",
                                                          "num_local"))


# ------------------------------------------------------------------------------ timing

class StepTimer:
    """A Keras callback that records epoch times and per-step times (with the POA subnet of
    the step), merged into RUN/quality_timing.json (keyed by epoch, so a resumed run keeps
    the epochs it trained before)."""

    def __new__(cls, path):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.path = path
                self.data = _read_json(path) or {"epochs": {}}
                self.data["backend"] = keras.backend.backend()

            def on_epoch_begin(self, epoch, logs=None):
                self._epoch, self._epoch_start, self._steps = epoch, time.perf_counter(), []

            def on_train_batch_begin(self, batch, logs=None):
                self._batch_start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                logs = logs or {}
                float(logs.get("loss", 0.0))      # the step's results are here: it has finished
                seconds = time.perf_counter() - self._batch_start
                plan = None
                if "width" in logs and "depth" in logs:
                    plan = [int(round(float(logs["width"]))), int(round(float(logs["depth"])))]
                self._steps.append([round(seconds, 5), plan])

            def on_epoch_end(self, epoch, logs=None):
                self.data["epochs"][str(epoch)] = {
                    "seconds": round(time.perf_counter() - self._epoch_start, 3),
                    "steps": self._steps}
                _write_json(self.path, self.data)

        return _Timer()


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def timing_summary(run_dir):
    """Times of a run directory's training from its quality_timing.json (None if absent).

    A step time runs from on_train_batch_begin to on_train_batch_end: the train function
    (forward, backward, optimizer, EMA), NOT the fetch of the batch from the multi-crop
    pipeline, which Keras does before on_train_batch_begin. steady_s: sum over the steps of the
    median step time of the step's plan (POA: its subnet; DINO: all steps together), i.e.
    without compilation outliers; step_s: sum of the step times; wall_s: sum of the epoch
    times (data pipeline and checkpoint saving included)."""
    data = _read_json(os.path.join(run_dir, TIMING_FILE))
    if not data or not data.get("epochs"):
        return None
    steps = [s for e in data["epochs"].values() for s in e["steps"]]
    by_plan = {}
    for seconds, plan in steps:
        by_plan.setdefault(json.dumps(plan), []).append(seconds)
    median = {plan: statistics.median(t) for plan, t in by_plan.items()}
    return {"backend": data.get("backend"), "epochs_timed": len(data["epochs"]),
            "steps_timed": len(steps),
            "wall_s": round(sum(e["seconds"] for e in data["epochs"].values()), 2),
            "step_s": round(sum(s for s, _ in steps), 2),
            "steady_s": round(sum(median[json.dumps(p)] for _, p in steps), 2),
            "median_step_s": round(statistics.median(s for s, _ in steps), 4) if steps else None}


# ------------------------------------------------------------------------------ training

def train(recipe, run_dir, label):
    from poa_keras.pretrain import pretrain

    os.makedirs(run_dir, exist_ok=True)
    timer = StepTimer(os.path.join(run_dir, TIMING_FILE))
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):   # Keras' progress output
        result = pretrain(recipe, run_dir, resume=True, verbose=int(FLAGS.verbose),
                          callbacks=[timer])
    elapsed = time.perf_counter() - start
    steps = _to_int(result.trainer.optimizer.iterations)
    timing = timing_summary(run_dir)
    emit({"record": "run", "teacher": label, "method": recipe["method"], "run_dir": run_dir,
          "resumed_from": result.resumed_from, "epochs": int(recipe["train"]["epochs"]),
          "steps_per_epoch": _steps_per_epoch(recipe), "optimizer_steps": steps,
          "this_call_s": round(elapsed, 1), "timing": timing})
    return result, timing


def _to_int(x):
    from keras import ops

    return int(ops.convert_to_numpy(x))


def _steps_per_epoch(recipe):
    from poa_keras.pretrain import steps_per_epoch

    if recipe["data"].get("steps_per_epoch"):
        return int(recipe["data"]["steps_per_epoch"])
    (images, _), _, _ = shapes_data(recipe)
    return steps_per_epoch(recipe, len(images))


_SHAPES = {}


def shapes_data(recipe):
    """shapes_split of the recipe's data section (what pretraining used), generated once."""
    from poa_keras.pretrain import shapes_split

    data = {k: v for k, v in recipe["data"].items() if k != "steps_per_epoch"}
    key = json.dumps([data, recipe.get("seed", 0)], sort_keys=True, default=list)
    if key not in _SHAPES:
        _SHAPES[key] = shapes_split(recipe["data"], int(recipe.get("seed", 0)))
    return _SHAPES[key]


# ------------------------------------------------------------------------------ the budget

def flops_budget(recipe, teacher, sampler):
    """(ratio, details) of the analytic compute of a POA step over a step without the elastic
    student (the teacher's forward and the intact student's training are the same)."""
    global_size, local_size, num_local = crop_sizes(recipe)

    def crops(spec):
        return (2 * teacher.subnet_flops(spec, global_size)
                + num_local * teacher.subnet_flops(spec, local_size))

    probabilities = sampler.frequencies()
    full = crops(None)
    elastic = sum(p * crops(spec) for spec, p in probabilities.items())
    teacher_fwd = 2 * teacher.subnet_flops(None, global_size)
    plain = teacher_fwd + 3 * full
    poa = plain + 3 * elastic
    simple = 1.0 + elastic / full
    details = {"crops": f"2x{global_size}px + {num_local}x{local_size}px",
               "gflops_full_forward_all_crops": _r(full / 1e9),
               "gflops_expected_subnet_forward_all_crops": _r(elastic / 1e9),
               "expected_subnet_flops_fraction": _r(elastic / full),
               "gflops_per_image_no_elastic_step": _r(plain / 1e9),
               "gflops_per_image_poa_step": _r(poa / 1e9),
               "ratio_flops": _r(poa / plain), "ratio_flops_simple": _r(simple),
               "sampler_subnets": len(probabilities)}
    ratio = {"flops": poa / plain, "flops_simple": simple, "steps": 1.0}[FLAGS.compute]
    return ratio, details


def decide_budget(poa_recipe, init_trainer):
    """Steps per epoch of the arms other than POA, for the same compute as POA's runs."""
    poa_spe = _steps_per_epoch(poa_recipe)
    epochs = int(poa_recipe["train"]["epochs"])
    ratio, details = flops_budget(poa_recipe, init_trainer.teacher_backbone,
                                  init_trainer.sampler)
    rule = {
        "flops": "steps = POA steps x training FLOPs(POA step) / training FLOPs(step without "
                 "the elastic student) (fwd 1, fwd+bwd 3, EMA teacher fwd only)",
        "flops_simple": "steps = POA steps x (1 + E[subnet FLOPs] / full FLOPs)",
        "steps": "steps = POA steps (equal steps, NOT equal compute)",
    }[FLAGS.compute]
    spe = max(1, int(round(ratio * poa_spe)))
    emit({"record": "budget", "compute": FLAGS.compute, "rule": rule, "ratio": _r(ratio),
          "epochs": epochs, "poa_steps_per_epoch": poa_spe, "other_steps_per_epoch": spe,
          "poa_steps": epochs * poa_spe, "other_steps": epochs * spe,
          "realised_ratio": _r(spe / poa_spe), "details": details})
    return spe


# ------------------------------------------------------------------------------ evaluation

def pick_subnets(backbone):
    from poa_keras.elastic.spec import ViTSubnet

    widths, depths = backbone.widths, backbone.depths
    return {"smallest": ViTSubnet(widths[0], depths[0]),
            "middle": ViTSubnet(widths[len(widths) // 2], depths[len(depths) // 2]),
            "full": ViTSubnet(widths[-1], depths[-1])}


def evaluate(label, seed, teacher, subnets, data, timing, steps, ks, pixel_normalization):
    """knn_classify of the features of every subnet (extracted once, cached), with the
    similarity spread of each."""
    import numpy as np

    from poa_keras.eval.collapse import similarity_spread
    from poa_keras.eval.features import extract_features
    from poa_keras.eval.knn import knn_classify

    (x_train, y_train), (x_val, y_val), names = data
    fingerprint = _fingerprint(teacher, data, pixel_normalization) if FLAGS.cache_features \
        else None
    results = {}
    for name, spec in subnets.items():
        start = time.perf_counter()
        model = teacher.extract(spec)
        params = int(model.count_params())
        if params != teacher.subnet_params(spec):
            raise AssertionError(f"{label} {spec}: extracted {params} params, subnet_params "
                                 f"says {teacher.subnet_params(spec)}")
        cache = None if fingerprint is None else os.path.join(
            FLAGS.runs, "features", f"{label}_w{spec.width}_d{spec.depth}_{fingerprint}.npz")
        cached = cache is not None and os.path.isfile(cache)
        if cached:
            with np.load(cache) as stored:
                train_features, test_features = stored["train"], stored["test"]
        else:
            kwargs = dict(batch_size=FLAGS.eval_batch, normalize=True,
                          pixel_normalization=pixel_normalization)
            train_features = extract_features(model, x_train, **kwargs)
            test_features = extract_features(model, x_val, **kwargs)
            if cache is not None:
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                np.savez(cache + ".tmp.npz", train=train_features, test=test_features)
                os.replace(cache + ".tmp.npz", cache)
        del model
        res = knn_classify(train_features, y_train, test_features, y_val, len(names), ks=ks,
                           temperature=FLAGS.temperature, return_predictions=True)
        res["spread"] = similarity_spread(train_features, test_features, FLAGS.k)
        results[name] = res
        emit({"record": "knn", "backend": _backend(), "arm": label, "seed": seed,
              "subnet": name, "width": spec.width, "depth": spec.depth, "params": params,
              "gflops_per_image": _r(teacher.subnet_flops(spec) / 1e9),
              "k": FLAGS.k, "top1": _r(res[FLAGS.k]["top1"]), "top5": _r(res[FLAGS.k]["top5"]),
              "knn": {str(k): {"top1": _r(res[k]["top1"]), "top5": _r(res[k]["top5"]),
                               "k_used": res[k]["k_used"]} for k in ks},
              "sim_spread": float(f"{res['spread']:.3g}"),
              "bank": len(y_train), "queries": len(y_val), "temperature": FLAGS.temperature,
              "train_steps": steps,
              "train_steady_s": None if timing is None else timing["steady_s"],
              "train_wall_s": None if timing is None else timing["wall_s"],
              "eval_s": round(time.perf_counter() - start, 1), "features_cached": cached})
    return results


def head_entropies(trainer, recipe, images, pixel_normalization):
    """Mean entropy per head of the teacher's output (softmax(head(cls) / teacher_temp)) on
    the images, and each head's K."""
    import numpy as np
    from keras import ops

    from poa_keras.eval.collapse import teacher_entropy
    from poa_keras.eval.features import extract_features

    cls = extract_features(trainer.teacher_backbone, images, batch_size=FLAGS.eval_batch,
                           normalize=False, pixel_normalization=pixel_normalization)
    per_head = None
    for start in range(0, len(cls), 512):
        out = trainer.teacher_head(ops.convert_to_tensor(cls[start:start + 512]))
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        chunk = [np.asarray(ops.convert_to_numpy(o), np.float32) for o in out]
        per_head = chunk if per_head is None else [
            np.concatenate([a, b]) for a, b in zip(per_head, chunk)]
    temp = float(recipe["train"].get("teacher_temp", 0.04))
    return teacher_entropy(per_head, temp), [int(h.shape[1]) for h in per_head]


def _fingerprint(teacher, data, pixel_normalization):
    """Hash of the teacher's weights, the evaluation images and the preprocessing: the key of
    the cached features (RUNS/features/), so a rerun on the same runs skips the extraction."""
    import hashlib

    import numpy as np
    from keras import ops

    digest = hashlib.sha256()
    for variable in teacher.weights:
        digest.update(variable.path.encode())
        digest.update(np.ascontiguousarray(ops.convert_to_numpy(variable)).tobytes())
    (x_train, _), (x_val, _), _ = data
    for array in (x_train, x_val):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(f"{pixel_normalization}|{_backend()}".encode())
    return digest.hexdigest()[:20]


def _backend():
    import keras

    return keras.backend.backend()


def mcnemar(pred_a, pred_b, labels):
    """(a right & b wrong, a wrong & b right, exact two-sided p) over paired predictions."""
    import numpy as np

    a, b = np.asarray(pred_a) == labels, np.asarray(pred_b) == labels
    n10, n01 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = n10 + n01
    if n == 0:
        return n10, n01, 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(n10, n01) + 1)) / 2.0 ** n
    return n10, n01, min(1.0, 2.0 * tail)


def mean_sd(values):
    values = [float(v) for v in values]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_test(a, b):
    """Paired t-test over seeds of a - b: (mean difference, sd, t, two-sided p, n)."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return mean, sd, None, None, len(diffs)
    if not sd:
        return mean, sd, (math.inf if mean else 0.0), (0.0 if mean else 1.0), len(diffs)
    from scipy import stats

    result = stats.ttest_rel(a, b)
    return mean, sd, float(result.statistic), float(result.pvalue), len(diffs)


def _pct(mean, sd):
    if mean is None:
        return "collapsed"
    return f"{100 * mean:.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


# ------------------------------------------------------------------------------ main

def main(argv):
    del argv
    import numpy as np

    from poa_keras.eval.collapse import collapse_verdict
    from poa_keras.pretrain import build_trainer

    arms = ["poa"] + [a for a in FLAGS.arms if a != "poa"]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"--arms: unknown {bad}; valid: {list(ARMS)}")
    seeds = [int(s) for s in FLAGS.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {FLAGS.seeds}")
    ks = sorted({int(k) for k in FLAGS.ks} | {FLAGS.k})
    os.makedirs(FLAGS.runs, exist_ok=True)
    poa_recipe, dino_recipe = base_recipes()
    emit({"record": "setup", "backend": _backend(), "arms": arms, "seeds": seeds,
          "poa_recipe": FLAGS.poa_recipe, "dino_recipe": dino_recipe and FLAGS.dino_recipe,
          "overrides": list(FLAGS.override), "poa_overrides": list(FLAGS.poa_override),
          "dino_overrides": list(FLAGS.dino_override), "compute": FLAGS.compute,
          "runs": FLAGS.runs, "ks": ks, "k": FLAGS.k, "temperature": FLAGS.temperature})

    data = shapes_data(poa_recipe)
    pixel_normalization = poa_recipe["data"].get("normalize", "imagenet")
    y_val = np.asarray(data[1][1])
    # The untrained network (the POA recipe at seed 0): the random arm and the FLOPs budget.
    init = build_trainer(poa_recipe, _steps_per_epoch(poa_recipe))
    other_spe = decide_budget(poa_recipe, init)
    subnets = pick_subnets(init.teacher_backbone)
    results = {("random", 0): evaluate("random", 0, init.teacher_backbone, subnets, data,
                                       None, 0, ks, pixel_normalization)}
    verdicts = {}
    for seed in seeds:
        for arm in arms:
            recipe = arm_recipe(arm, seed, poa_recipe, dino_recipe, other_spe)
            result, timing = train(recipe, os.path.join(FLAGS.runs, f"seed{seed}", arm),
                                   f"{arm}/seed{seed}")
            results[arm, seed] = evaluate(arm, seed, result.teacher, subnets, data, timing,
                                          _to_int(result.trainer.optimizer.iterations), ks,
                                          pixel_normalization)
            entropies, protos = head_entropies(result.trainer, recipe, data[1][0],
                                               pixel_normalization)
            reference = None if arm == "poa" else results["poa", seed]["full"]["spread"]
            verdict = collapse_verdict(results[arm, seed]["full"]["spread"], entropies, protos,
                                       reference_spread=reference)
            verdicts[arm, seed] = verdict
            emit({"record": "collapse", "arm": arm, "seed": seed, "degenerate":
                  verdict["collapsed"], "reasons": verdict["reasons"],
                  "spread_full": _r(verdict["spread"], 6),
                  "spread_ratio_to_poa": _r(verdict["spread_ratio"]),
                  "teacher_entropy": [_r(e) for e in entropies],
                  "ln_k": [_r(math.log(k)) for k in protos],
                  "entropy_gap": _r(verdict["entropy_gap"])})
            del result
        for arm in arms[1:]:
            for name, spec in subnets.items():
                mine, other = results["poa", seed][name][FLAGS.k], results[arm, seed][name][
                    FLAGS.k]
                n10, n01, p = mcnemar(mine["predictions"], other["predictions"], y_val)
                emit({"record": "compare", "seed": seed, "arm": arm, "subnet": name,
                      "width": spec.width, "depth": spec.depth, "k": FLAGS.k,
                      "poa_top1": _r(mine["top1"]), "arm_top1": _r(other["top1"]),
                      "poa_minus_arm": _r(mine["top1"] - other["top1"]),
                      "poa_only_right": n10, "arm_only_right": n01, "mcnemar_p": _r(p, 6),
                      "arm_degenerate": verdicts[arm, seed]["collapsed"]})

    # Means over the non-degenerate seeds, and the paired tests.
    def top1(arm, seed, name):
        return results[arm, seed][name][FLAGS.k]["top1"]

    summary = {}
    for arm in arms:
        healthy = [s for s in seeds if not verdicts[arm, s]["collapsed"]]
        for name in subnets:
            mean, sd = mean_sd([top1(arm, s, name) for s in healthy])
            summary[arm, name] = (mean, sd)
            emit({"record": "summary", "arm": arm, "subnet": name, "k": FLAGS.k,
                  "top1_mean": _r(mean), "top1_sd": _r(sd), "seeds": healthy,
                  "degenerate_seeds": [s for s in seeds if s not in healthy]})
    tests = {}
    for arm in arms[1:]:
        both = [s for s in seeds if not (verdicts[arm, s]["collapsed"]
                                         or verdicts["poa", s]["collapsed"])]
        for name in subnets:
            mean, sd, t, p, n = paired_test([top1("poa", s, name) for s in both],
                                            [top1(arm, s, name) for s in both])
            tests[arm, name] = (mean, sd, t, p, n)
            emit({"record": "paired", "arm": arm, "subnet": name, "k": FLAGS.k,
                  "test": "paired t-test over seeds (scipy.stats.ttest_rel), POA - arm",
                  "seeds": both, "n": n, "mean_diff": _r(mean), "sd_diff": _r(sd),
                  "t": _r(t), "p": _r(p, 6)})

    # The table.
    (x_train, _), _, _ = data
    print()
    print(f"k-NN top-1 % (weighted, T={FLAGS.temperature}, k={FLAGS.k}) on {len(y_val)} "
          f"held-out images, bank = {len(x_train)} training images; backend {_backend()}; "
          f"mean ± sd over seeds {seeds} (degenerate seeds left out); compute rule: "
          f"{FLAGS.compute}")
    columns = arms + ["random"]
    header = f"{'subnet':<9} {'w x d':<7} {'params':>8} " + " ".join(
        f"{c:>16}" for c in columns)
    print(header)
    print("-" * len(header))
    for name, spec in subnets.items():
        cells = [_pct(*summary[a, name]) for a in arms] + [
            f"{100 * top1('random', 0, name):.2f}"]
        print(f"{name:<9} {f'{spec.width}x{spec.depth}':<7} "
              f"{init.teacher_backbone.subnet_params(spec):>8,} "
              + " ".join(f"{c:>16}" for c in cells))
    print()
    for arm in arms[1:]:
        for name in ("smallest", "full"):
            mean, sd, t, p, n = tests[arm, name]
            if mean is None:
                print(f"POA - {arm}, {name}: no seed where both arms are healthy")
                continue
            print(f"POA - {arm}, {name}: {100 * mean:+.2f} pt (sd {_pct(sd, None) if sd else '-'}"
                  f" over {n} seeds), paired t-test p = {'-' if p is None else f'{p:.3g}'}")
    degenerate = [f"{a}/seed{s}: {'; '.join(v['reasons'])}" for (a, s), v in verdicts.items()
                  if v["collapsed"]]
    if degenerate:
        print("\ndegenerate (left out of means and tests): " + " | ".join(degenerate))
    print(flush=True)


if __name__ == "__main__":
    app.run(main)
