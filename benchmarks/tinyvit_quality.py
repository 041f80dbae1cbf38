"""TinyViT's fast distillation on the embedded data (recipes/demo_tinyvit.py): the student on
stored soft labels vs the same student with the teacher in the step (the same top-K + float16
targets, and the teacher's full softmax) vs the same student on the hard labels, all on the same
replayed augmentation, schedule and steps.

    KERAS_BACKEND=torch python benchmarks/tinyvit_quality.py --runs=runs/tinyvit \
        [--seeds=0,1,2] [--arms=stored,teacher,teacher_dense,labels]

The teacher (recipes/demo_tinyvit_teacher.py) is trained once, in RUNS/teacher. For every seed
s and arm: ``finetune("demo_tinyvit", RUNS/seed<s>/<arm>, overrides=[distill.targets=<arm>,
seed=s, the teacher])`` (the seed drives the student's initialisation, the augmentation seeds
and the order). Per run: the held-out top-1 of the classifier and the k-NN top-1 (k = 20) of
its backbone's features (the 3200 training images as the memory, the 1000 held-out images used
for no choice), and the wall time; then mean +- sd per arm and paired t-tests, as JSON lines
(``tinyvit_summary.summarize``; that script merges seeds run in separate processes).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (emit; its flags: --runs, --seeds, ...)
import tinyvit_summary  # noqa: E402

flags.DEFINE_list("distill_arms", ["stored", "teacher", "teacher_dense", "labels"],
                  "Arms (distill.targets of recipes/demo_tinyvit.py).")
flags.DEFINE_multi_string("distill_override", [], "section.key=value for every student run.")
FLAGS = flags.FLAGS


def knn_top1(classifier, recipe):
    from poa_keras.eval.knn import knn_eval
    from poa_keras.finetune import labelled_data

    data = labelled_data(recipe)
    (x, y), (xv, yv) = data.train, data.val
    result = knn_eval(classifier.backbone, x, y, xv, yv, ks=(20,))
    return float(result[20]["top1"])


def run(name, run_dir, overrides):
    from poa_keras.finetune import finetune, load_finetune_recipe

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = finetune(name, run_dir, overrides=overrides, verbose=0)
    seconds = time.perf_counter() - start
    recipe = load_finetune_recipe(name, overrides)
    return result, knn_top1(result.classifier, recipe), seconds


def main(argv):
    del argv
    teacher, knn, seconds = run("demo_tinyvit_teacher", os.path.join(FLAGS.runs, "teacher"), [])
    quality.emit({"record": "teacher", "top1": quality._r(teacher.top1),
                  "knn_top1": quality._r(knn), "seconds": round(seconds, 1)})
    preset = teacher.preset_dir
    students = []
    for seed in FLAGS.seeds:
        for arm in FLAGS.distill_arms:
            overrides = [f"distill.targets={arm!r}", "distill.teacher_recipe=None",
                         f"seed={int(seed)}"] + list(FLAGS.distill_override)
            if arm != "labels":
                overrides.append(f"distill.teacher={preset!r}")
            result, knn, seconds = run("demo_tinyvit", os.path.join(
                FLAGS.runs, f"seed{seed}", arm), overrides)
            students.append({"record": "student", "arm": arm, "seed": int(seed),
                             "top1": quality._r(result.top1), "knn_top1": quality._r(knn),
                             "seconds": round(seconds, 1)})
            quality.emit(students[-1])
    tinyvit_summary.summarize(students)


if __name__ == "__main__":
    app.run(main)
