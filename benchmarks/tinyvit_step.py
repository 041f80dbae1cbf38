"""Student training throughput with the soft-label store vs with the teacher in the step (TinyViT's
fast distillation), per backend, on the demo recipe (recipes/demo_tinyvit.py).

    KERAS_BACKEND=torch python benchmarks/tinyvit_step.py --teacher=RUNS/teacher/classifier \
        [--steps=20 --batch=64]

The student is demo_tinyvit's TinyViT (32 px, 10 classes), the teacher any classifier preset
(benchmarks/tinyvit_quality.py trains demo_tinyvit_teacher into RUNS/teacher/classifier; without
``--teacher`` that recipe's model with random weights: the timing does not depend on them). Two
``SoftLabelDistillation`` trainers, the same student weights and batch (the replayed images of
one stored epoch): "stored" reads the batch's top-K records, "online" runs the teacher on the
images and sparsifies its softmax (top-K, float16). After one warm-up step each, the two steps
are timed in alternation (``train_on_batch``, waiting for the loss); the record gives the
medians, images/s, their ratio, and the ratio the training FLOPs predict,
(T_fwd + 3 S_fwd) / (3 S_fwd) (T, S: the teacher's and the student's forward FLOPs per image,
``subnet_flops``; a backward pass taken as twice a forward). The data pipeline (the same
replay in both arms) is not timed.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("teacher", None, "A classifier preset directory (default: the demo teacher "
                                     "recipe's model, random weights).")
flags.DEFINE_integer("steps", 20, "Timed steps per arm.")
flags.DEFINE_integer("batch", 64, "Images per step.")
FLAGS = flags.FLAGS


def teacher_model():
    from poa_keras import ImageClassifier
    from poa_keras.finetune import load_finetune_recipe, model_backbone

    if FLAGS.teacher:
        return ImageClassifier.from_preset(FLAGS.teacher)
    return ImageClassifier(model_backbone(load_finetune_recipe("demo_tinyvit_teacher")), 10)


def student_backbone():
    """demo_tinyvit's student, the same weights at every call (the recipe's seed)."""
    from poa_keras.finetune import load_finetune_recipe, model_backbone

    return model_backbone(load_finetune_recipe("demo_tinyvit"))


def main(argv):
    del argv
    import keras

    from poa_keras import ImageClassifier
    from poa_keras.data import make_shapes
    from poa_keras.data.softlabels import ReplayAugment, write_store
    from poa_keras.methods import SoftLabelDistillation

    batch, steps = FLAGS.batch, FLAGS.steps
    teacher, backbone = teacher_model(), student_backbone()
    images = make_shapes(batch, image_size=32, seed=0)[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(teacher, images, tmp, epochs=1, topk=10, verbose=0,
                            config=ReplayAugment(output_size=32, scale=(0.35, 1.0), jitter=0.3))
        x, sparse = next(iter(store.dataset(0, batch)))
    x, sparse = x.numpy(), {k: v.numpy() for k, v in sparse.items()}
    recipe = dict(epochs=1, steps_per_epoch=steps + 1, batch_size=batch, lr=1e-3,
                  lr_scaling="none", warmup_epochs=0)
    arms = {}
    for name, kwargs, data in (("stored", {}, (x, sparse)),
                               ("online", dict(teacher=teacher, topk=10), (x, None))):
        student = ImageClassifier(student_backbone(), 10, pooling="cls")   # one per arm
        trainer = SoftLabelDistillation(student, recipe, **kwargs)
        trainer.compile(optimizer=keras.optimizers.AdamW())
        trainer.train_on_batch(*data)                       # warm-up (compiles)
        arms[name] = (trainer, data)
    times = {name: [] for name in arms}
    for _ in range(steps):
        for name, (trainer, data) in arms.items():
            start = time.perf_counter()
            logs = trainer.train_on_batch(*data, return_dict=True)
            float(np.asarray(logs["loss"]))
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    t_flops = teacher.backbone.subnet_flops(image_size=32)
    s_flops = backbone.subnet_flops(image_size=32)
    print(json.dumps({
        "record": "step", "backend": keras.backend.backend(), "batch": batch, "steps": steps,
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "images_per_s": {k: round(batch / v, 1) for k, v in medians.items()},
        "speedup": round(medians["online"] / medians["stored"], 3),
        "teacher_mflops": round(t_flops / 1e6, 2), "student_mflops": round(s_flops / 1e6, 2),
        "flops_speedup": round((t_flops + 3 * s_flops) / (3 * s_flops), 3),
        "compilations": {name: trainer.num_compilations for name, (trainer, _) in arms.items()},
    }), flush=True)


if __name__ == "__main__":
    app.run(main)
