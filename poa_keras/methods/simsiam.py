"""SimSiam (Chen & He, CVPR 2021) as a `PlannedTrainer`: the float baseline of SSQL
(REFERENCE.md §5), trained exactly as SSQL is, without the quantized branch.

Encoder = backbone (any family of poa_keras: its ``"pooled"`` feature, the full network) +
``SimSiamProjector``; predictor = ``SimSiamPredictor``. Each step, with the two views of a batch
x1, x2 (B images each)::

    z = projector(backbone(concat(x1, x2))["pooled"])        (2B, D) -> z1, z2
    p = predictor(z)                                          (2B, D) -> p1, p2
    loss = (D(p1, z2) + D(p2, z1)) / 2,  D(p, z) = -mean cos(p, stop_gradient(z))

(``losses/simsiam.py``). Both views go through ONE forward, so every BatchNorm normalises
over the 2B images of both views. The reference runs one forward per view (BatchNorm
statistics over the B images of one view): a deliberate difference, which lets SSQL's "batch"
activation ranges cover both views, as the reference's observers do (methods/ssql.py).

Data: ``{"global": (2, B, H, W, 3)}`` (``multicrop_dataset(..., num_local=0)``; a "local"
entry with no views is accepted, local views are refused), or a ``(views,)`` tuple.

Optimisation (REFERENCE §5, SimSiam's and SSQL's recipe): SGD with momentum 0.9 (compile with
``keras.optimizers.SGD(momentum=0.9)``; ``poa_keras.pretrain`` does), one learning rate for
every parameter, per step a cosine from ``lr`` to ``min_lr`` (0) over the run, with an optional
linear warmup (``warmup_epochs``, 0: none) and the lr scaling rule ``lr_scaling`` ("none":
SSQL's lr 0.05 is not scaled by the batch; "linear": SimSiam's lr x batch / 256). No gradient
clipping (``clip_grad`` None).

Weight decay, ``weight_decay_mode``:

* "l2" (default): PyTorch SGD's weight decay, which adds ``wd * w`` to the gradient of EVERY
  parameter (BatchNorm gains and offsets and biases included) before the momentum. Keras'
  optimizers decay decoupled (``w -= lr * wd * w``), which with momentum 0.9 decays about ten
  times less, so the trainer puts it into the gradient itself: the loss it differentiates is
  ``loss + (wd/2 sum ||w||^2 - stop_gradient(wd/2 sum ||w||^2))``, whose value is exactly the
  SimSiam loss (the logged one) and whose gradient is torch's. The optimizer must then have no
  weight decay of its own (``compile`` refuses one). The logged ``grad_norm`` includes the
  ``wd * w`` terms.
* "decoupled": the step value ``weight_decay`` goes to the optimizer, which decays with its own
  rule (AdamW's ``lr * wd * w``; ``no_weight_decay_variables`` is empty: every variable).

Keras' SGD keeps ``velocity = m * velocity - lr * g`` where torch keeps ``buf = m * buf + g`` and
steps ``-lr * buf``: equal at a constant learning rate; with the cosine the two weigh past
gradients by their own step's lr (Keras) or the current one (torch), a relative difference
below 1e-3 per step in these runs.

The plan is always None: ONE program is compiled (DESIGN contract 6).

Logs: ``loss`` (the SimSiam loss, in [-1, 1]), ``z_std`` (the collapse indicator
``normalized_std`` of z1: about 1/sqrt(D) when healthy, 0 when collapsed), ``lr``,
``grad_norm``.

Recipe keys (``SIMSIAM_RECIPE``; ``epochs``, ``steps_per_epoch``, ``batch_size`` required):
``lr`` (0.05), ``lr_scaling`` ("none"), ``reference_batch`` (None: 256), ``min_lr`` (0),
``warmup_epochs`` (0), ``weight_decay`` (1e-4; SSQL's CIFAR runs 5e-4), ``weight_decay_mode``
("l2"), ``clip_grad`` (None).
"""
from __future__ import annotations

import difflib

import keras
from keras import ops

from poa_keras.heads.simsiam import SimSiamPredictor, SimSiamProjector
from poa_keras.losses.simsiam import normalized_std, simsiam_loss
from poa_keras.methods import schedules as schedules_lib
from poa_keras.methods.base import PlannedTrainer
from poa_keras.methods.teacher_student import flatten_views, split_views
from poa_keras.quantization.observer import quantization_scope

WEIGHT_DECAY_MODES = ("l2", "decoupled")
SIMSIAM_RECIPE = dict(
    lr=0.05,                  # SSQL: 0.05 for every batch size (not scaled)
    lr_scaling="none",        # "linear": SimSiam's lr * batch / 256
    reference_batch=None,     # None: 256 for "linear"
    min_lr=0.0,
    warmup_epochs=0,
    weight_decay=1e-4,        # ImageNet; CIFAR 5e-4
    weight_decay_mode="l2",   # PyTorch SGD's coupled weight decay (see the module doc)
    clip_grad=None,
)


def check_recipe_keys(recipe, defaults, owner):
    """A ValueError naming every key of ``recipe`` that is neither in ``defaults`` nor a
    run-length key (``schedules.RUN_KEYS``), each with the closest valid key."""
    valid = set(defaults) | set(schedules_lib.RUN_KEYS)
    unknown = sorted(set(recipe) - valid, key=str)
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"{owner}: unknown recipe key{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(parts)}; valid keys: {sorted(valid)}")


def checked_recipe(recipe, defaults, owner):
    """``defaults`` updated with ``recipe`` after ``check_recipe_keys``; a negative
    ``weight_decay`` is refused."""
    given = dict(recipe or {})
    check_recipe_keys(given, defaults, owner)
    merged = dict(defaults, **given)
    if float(merged["weight_decay"]) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {merged['weight_decay']}")
    return merged


def learning_rate_schedule(recipe, steps_per_epoch=None):
    """The per-step learning rate of a SimSiam/SSQL recipe: a float64 array of length
    epochs x steps_per_epoch (``schedules.cosine_schedule``: linear warmup over
    ``warmup_epochs`` from 0, then a cosine from the scaled ``lr`` to ``min_lr``)."""
    return schedules_lib.warmup_cosine_lr(dict(SIMSIAM_RECIPE, **recipe), steps_per_epoch)


class SimSiam(schedules_lib.PerStepLearningRate, PlannedTrainer):
    """SimSiam: backbone + projector (the encoder) and predictor, one program (see the module
    docstring).

    Args:
        backbone: a backbone of any family (its full network is trained).
        projector: a SimSiamProjector, or a dict of its arguments (``in_dim`` defaults to
            ``backbone.feature_dim()``).
        predictor: a SimSiamPredictor, or a dict of its arguments (``dim`` defaults to the
            projector's ``out_dim``).
        recipe: the recipe dict (module docstring); defaults: ``recipe_defaults``.
        clip_grad: "recipe" (the recipe's ``clip_grad``, None), a number or None.
        feature: which backbone output feeds the projector ("pooled").
    """

    recipe_defaults = SIMSIAM_RECIPE

    def __init__(self, backbone, projector=None, predictor=None, recipe=None,
                 clip_grad="recipe", feature="pooled", **kwargs):
        recipe = checked_recipe(recipe, self.recipe_defaults, type(self).__name__)
        if recipe["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {list(WEIGHT_DECAY_MODES)}, "
                             f"got {recipe['weight_decay_mode']!r}")
        lr = learning_rate_schedule(recipe)
        super().__init__(clip_grad=recipe["clip_grad"] if clip_grad == "recipe" else clip_grad,
                         **kwargs)
        self.recipe = recipe
        self.lr_schedule = lr
        self.feature = str(feature)
        if projector is None or isinstance(projector, dict):
            config = dict(projector or {})
            config.setdefault("in_dim", backbone.feature_dim())
            config.setdefault("name", "projector")
            projector = SimSiamProjector(**config)
        if predictor is None or isinstance(predictor, dict):
            config = dict(predictor or {})
            config.setdefault("dim", projector.out_dim)
            config.setdefault("name", "predictor")
            predictor = SimSiamPredictor(**config)
        if predictor.dim != projector.out_dim:
            raise ValueError(f"the predictor's dim {predictor.dim} must equal the projector's "
                             f"out_dim {projector.out_dim}")
        if projector.in_dim != backbone.feature_dim():
            raise ValueError(f"the projector's in_dim {projector.in_dim} must equal the "
                             f"backbone's feature_dim() {backbone.feature_dim()}")
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor

    # ------------------------------------------------------------------------------ schedule
    def step_hyperparameters(self, step):
        values = {"learning_rate": self.learning_rate_at(step)}
        name = "l2_weight_decay" if self.recipe["weight_decay_mode"] == "l2" else "weight_decay"
        values[name] = float(self.recipe["weight_decay"])
        return values

    def compile(self, optimizer="rmsprop", **kwargs):
        optimizer = keras.optimizers.get(optimizer)
        decay = getattr(optimizer, "weight_decay", None)
        if self.recipe["weight_decay_mode"] == "l2" and decay:
            raise ValueError(
                f"{type(self).__name__} with weight_decay_mode='l2' adds PyTorch SGD's weight "
                f"decay to the gradients itself; the optimizer's own weight_decay={decay} "
                "would decay twice: compile with an optimizer without weight_decay (e.g. "
                "keras.optimizers.SGD(momentum=0.9)) or use weight_decay_mode='decoupled'")
        super().compile(optimizer=optimizer, **kwargs)

    # ------------------------------------------------------------------------------ forward
    def views(self, data):
        """The two views of a batch, flattened: (2B, H, W, C) (view 1 first)."""
        globals_, locals_ = split_views(data)
        if locals_ is not None:
            raise ValueError(f"{type(self).__name__} trains on two views; the batch also has "
                             f"{locals_.shape[0]} local views (use multicrop_dataset(..., "
                             "num_local=0), the recipe's data.num_local=0)")
        if globals_.shape[0] != 2:
            raise ValueError(f"{type(self).__name__} needs 2 views per image, got "
                             f"{globals_.shape[0]} (shape {tuple(globals_.shape)})")
        return flatten_views(globals_)

    def encode(self, images, training=True, quant=None):
        """z of the encoder (backbone + projector): (N, D). With ``quant`` (a QuantConfig),
        the backbone and the projector run fake-quantized (methods/ssql.py)."""
        if quant is None:
            features = self.backbone(images, training=training)[self.feature]
        else:
            features = self.backbone(images, training=training, quant=quant)[self.feature]
        with quantization_scope(quant):   # None: float (also inside an outer scope)
            return self.projector(features, training=training)

    @staticmethod
    def split(x):
        """(2B, ...) -> (first view's B rows, second view's B rows)."""
        half = x.shape[0] // 2
        return x[:half], x[half:]

    def weight_decay_term(self):
        """0 in value, ``wd * w`` in gradient for every trainable variable (weight decay mode
        "l2"; see the module docstring); None in "decoupled" mode."""
        if self.recipe["weight_decay_mode"] != "l2":
            return None
        squares = [ops.sum(ops.square(ops.cast(v.value, "float32")))
                   for v in self.trainable_variables]
        l2 = 0.5 * self.step_values["l2_weight_decay"] * sum(squares)
        return l2 - ops.stop_gradient(l2)

    def regularized(self, loss):
        term = self.weight_decay_term()
        return loss if term is None else loss + term

    def compute_loss_and_logs(self, data, plan, training=True):
        x = self.views(data)
        z = self.encode(x, training=training)
        p = self.predictor(z, training=training)
        (z1, z2), (p1, p2) = self.split(z), self.split(p)
        loss = simsiam_loss(p1, p2, z1, z2)
        logs = {"z_std": normalized_std(z1), "lr": self.step_values["learning_rate"]}
        return self.regularized(loss), logs
