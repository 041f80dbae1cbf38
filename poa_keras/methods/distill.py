"""TinyViT's fast pretraining distillation (Wu et al., ECCV 2022; REFERENCE.md §4): a student
classifier trained on a teacher's soft labels, as a `PlannedTrainer`.

Each step, with a batch of augmented images x in [0, 1] (the soft-label store's replay)::

    stored  (targets="stored"):  ids, values = the store's records        (B, K), float16 values
    online  (targets="teacher"): ids, values = sparse_topk(softmax(teacher(x)), K)
                                 (topk=None: the full softmax, no sparsification)
    labels  (targets="labels"):  target = one_hot(label)                   (the hard-label arm)

    target = dense_soft_targets(ids, values, C)     top-K written in, the rest spread uniformly
    loss   = soft_target_cross_entropy(student(x), target)

No temperature, no ground truth (labels, when the data carries them, are only logged as
``accuracy``). The online variant runs the teacher (inference mode, frozen) inside the step on
the same images; with the same K and the float16 rounding its targets are the stored ones, so a
stored-label step equals an online step (tests/test_distill.py).

Images enter the step in [0, 1] (the replay's output); each model gets them through its own
``preprocessing.from_unit_range`` (its normalisation and input size) when it has a
``preprocessing`` record (an ``ImageClassifier``), as they are otherwise.

Optimisation (TinyViT's 22k distillation): AdamW, lr ``lr x batch / 512``, a linear warmup
from 0 over ``warmup_epochs`` then a cosine to ``min_lr`` per step, weight decay on every
weight but vectors, tokens, position embeddings and attention-bias tables
(``schedules.no_weight_decay``), gradient clipping at a global norm of 5.

Data: ``(images, labels)`` where ``labels`` is the store's ``{"ids", "values"}`` (stored), or
anything for the online teacher (``images`` alone, or with labels), or int class labels
(``targets="labels"``); a dict label may also hold ``"labels"`` (int, for the ``accuracy`` log).

Logs: ``loss``, ``accuracy`` (when labels come with the batch), ``teacher_agreement`` (the share
of images whose student top-1 is the target's top-1), ``lr``.

Recipe keys (``DISTILL_RECIPE``; ``epochs``, ``steps_per_epoch``, ``batch_size`` required):
``lr`` (2.5e-4), ``lr_scaling`` ("linear"), ``reference_batch`` (512), ``min_lr`` (1e-6),
``warmup_epochs`` (5), ``weight_decay`` (0.01), ``clip_grad`` (5.0).
"""
from __future__ import annotations

from keras import ops

from poa_keras.losses.distill import dense_soft_targets, soft_target_cross_entropy, sparse_topk
from poa_keras.methods import schedules as schedules_lib
from poa_keras.methods.base import PlannedTrainer
from poa_keras.methods.simsiam import checked_recipe

DISTILL_RECIPE = dict(
    lr=2.5e-4,                # at reference_batch images (TinyViT: 2.5e-4 x batch / 512)
    lr_scaling="linear",
    reference_batch=512,
    min_lr=1e-6,
    warmup_epochs=5,
    weight_decay=0.01,
    clip_grad=5.0,
)
TARGETS = ("stored", "teacher", "labels")


def learning_rate_schedule(recipe, steps_per_epoch=None):
    """The per-step learning rate of a distillation recipe (float64, epochs x steps_per_epoch):
    linear warmup from 0 over ``warmup_epochs``, then a cosine from the scaled ``lr`` to
    ``min_lr``."""
    return schedules_lib.warmup_cosine_lr(dict(DISTILL_RECIPE, **recipe), steps_per_epoch)


def num_classes_of(model, what="model"):
    """The number of classes of a model mapping images to logits (B, C)."""
    classes = getattr(model, "num_classes", None)
    shape = None
    if classes is None:
        try:
            shape = model.output_shape
            classes = shape[-1]
        except Exception:   # a subclassed or unbuilt model has no output_shape
            classes = None
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"the {what} must map images to class logits (batch, classes) and say "
                         f"how many classes (an ImageClassifier, or a built Keras model with "
                         f"output_shape (None, C)); {getattr(model, 'name', model)!r} gives "
                         f"{shape!r}")
    return classes


class SoftLabelDistillation(schedules_lib.PerStepLearningRate, PlannedTrainer):
    """A student classifier trained on soft labels (module docstring).

    Args:
        student: a Keras model mapping images to class logits (B, C): an ``ImageClassifier`` on
            any backbone (TinyViT, an extracted POA subnet, ResNet), built.
        recipe: the recipe dict (module docstring); defaults ``DISTILL_RECIPE``.
        teacher: for ``targets="teacher"``: a Keras model mapping images to logits (B, C),
            frozen, run in inference mode inside the step.
        topk: with a teacher: K of the sparsification (the store's); None keeps its full
            softmax (the dense arm of the benchmark).
        targets: "stored", "teacher" or "labels" (default: "teacher" with a teacher, else
            "stored").
        store: optional, the ``SoftLabelStore`` the batches come from: its classes must be the
            student's (the dense target spreads the rest over C - K classes, so another C would
            be silently wrong).
        clip_grad: "recipe" (the recipe's ``clip_grad``), a number or None.
    """

    recipe_defaults = DISTILL_RECIPE

    def __init__(self, student, recipe=None, teacher=None, topk=None, targets=None, store=None,
                 clip_grad="recipe", **kwargs):
        recipe = checked_recipe(recipe, self.recipe_defaults, type(self).__name__)
        targets = targets or ("teacher" if teacher is not None else "stored")
        if targets not in TARGETS:
            raise ValueError(f"targets={targets!r}; valid: {list(TARGETS)}")
        if (targets == "teacher") != (teacher is not None):
            raise ValueError(f"targets={targets!r} " + ("needs a teacher" if teacher is None
                                                        else "takes no teacher"))
        if topk is not None and teacher is None:
            raise ValueError("topk sparsifies an online teacher's targets; the store's K is "
                             "its own")
        lr = learning_rate_schedule(recipe)
        super().__init__(clip_grad=recipe["clip_grad"] if clip_grad == "recipe" else clip_grad,
                         **kwargs)
        self.recipe = recipe
        self.lr_schedule = lr
        self.student = student
        self.num_classes = num_classes_of(student, "student")
        self.targets = targets
        self.teacher = teacher
        self.topk = None
        if teacher is not None:
            classes = num_classes_of(teacher, "teacher")
            if classes != self.num_classes:
                raise ValueError(f"the teacher has {classes} classes, the student "
                                 f"{self.num_classes}: they must be the same")
            if topk is not None:
                if isinstance(topk, bool) or not isinstance(topk, int) or \
                        not 1 <= topk <= classes:
                    raise ValueError(f"topk={topk!r}; valid: an int in [1, {classes}] (the "
                                     "teacher's classes), or None for its full softmax")
                self.topk = topk
            teacher.trainable = False
        if store is not None:
            if targets != "stored":
                raise ValueError(f"a store serves targets='stored', not {targets!r}")
            if store.num_classes != self.num_classes:
                raise ValueError(f"the store holds {store.num_classes}-class soft labels, the "
                                 f"student has {self.num_classes} classes: they must be the "
                                 "same")
        # imported here: the store module imports TensorFlow, which poa_keras.methods does not
        from poa_keras.data.softlabels import unit_range_input

        identity = lambda x: x   # noqa: E731  (a model without a preprocessing record)
        self._student_input = unit_range_input(student) or identity
        self._teacher_input = (unit_range_input(teacher) or identity) if teacher is not None \
            else None

    # ------------------------------------------------------------------------------ schedule
    def step_hyperparameters(self, step):
        return {"learning_rate": self.learning_rate_at(step),
                "weight_decay": float(self.recipe["weight_decay"])}

    def no_weight_decay_variables(self):
        return [v for v in self.trainable_variables if schedules_lib.no_weight_decay(v)]

    # ------------------------------------------------------------------------------- forward
    def split(self, data):
        """(images, label dict or labels or None) of a batch."""
        if isinstance(data, (tuple, list)):
            if len(data) != 2:
                raise ValueError(f"a distillation batch is images or (images, labels); got "
                                 f"{len(data)} entries")
            return data[0], data[1]
        if isinstance(data, dict):
            raise ValueError("a distillation batch is images or (images, labels), got a dict "
                             f"with keys {sorted(data)}")
        return data, None

    def target(self, images, labels):
        """(dense target (B, C) float32, int class labels or None) of a batch."""
        if self.targets == "stored":
            if not isinstance(labels, dict) or not {"ids", "values"} <= set(labels):
                raise ValueError("targets='stored' needs batches (images, {'ids', 'values'}) "
                                 "from a soft-label store (SoftLabelStore.dataset); got labels "
                                 f"{type(labels).__name__}")
            k = int(labels["values"].shape[-1])
            if k > self.num_classes:
                raise ValueError(f"the store keeps K={k} classes, the student has "
                                 f"{self.num_classes}")
            return (dense_soft_targets(labels["ids"], labels["values"], self.num_classes),
                    labels.get("labels"))
        if self.targets == "labels":
            hard = labels.get("labels") if isinstance(labels, dict) else labels
            if hard is None:
                raise ValueError("targets='labels' needs batches (images, int labels)")
            return ops.one_hot(ops.cast(hard, "int32"), self.num_classes), hard
        hard = labels.get("labels") if isinstance(labels, dict) else labels
        logits = self.teacher(self._teacher_input(images), training=False)
        probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        if self.topk is None:
            return ops.stop_gradient(probs), hard
        ids, values = sparse_topk(probs, self.topk)
        return ops.stop_gradient(dense_soft_targets(ids, values, self.num_classes)), hard

    def compute_loss_and_logs(self, data, plan, training=True):
        images, labels = self.split(data)
        target, hard = self.target(images, labels)
        logits = self.student(self._student_input(images), training=training)
        loss = soft_target_cross_entropy(logits, target)
        predicted = ops.argmax(logits, axis=-1)
        logs = {"teacher_agreement": ops.mean(ops.cast(
            ops.equal(predicted, ops.argmax(target, axis=-1)), "float32"))}
        if hard is not None:
            logs["accuracy"] = ops.mean(ops.cast(
                ops.equal(ops.cast(predicted, "int32"), ops.cast(hard, "int32")), "float32"))
        logs["lr"] = self.step_values["learning_rate"]
        return loss, logs
