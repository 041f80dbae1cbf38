"""Our DINO and POA trainers against the plain-PyTorch reference (benchmarks/torch_reference.py,
GitHub issue 12): same logged losses per step, same student and teacher weights (and DINO
centers) after each of 3 steps.

The reference is pure PyTorch, so it checks our trainer on every Keras backend. Tolerance rule,
for every logged loss term, the gradient norm, every weight and every center value::

    |ours - reference| <= ATOL + RTOL * |ours|,   ATOL = RTOL = 1e-4

(measured on all three backends: at most 2e-6 on weights, 1e-5 relative on losses and gradient
norms, 4e-5 relative on DINO's tiny step-2 loss, i.e. 2e-7 absolute).

Setup: a micro elastic ViT (vit_elastic_test cut to widths 16/32, depths 2/3: blocks [0, 2]
at depth 2), random-perturbed weights (LayerScale 0.5, so every block matters) and a teacher
that differs from the student, 2 global 32 px + 2 local 16 px crops (bicubic position
embedding resize), batch 4, AdamW, schedules that move every step (lr cosine without warmup,
weight decay 0.04 -> 0.4, teacher momentum 0.6 -> 0.95, teacher temperature 0.04 -> 0.07 over
the 3 steps), layer decay 0.7, patch-embed lr x 0.2, gradient clipping active on some steps and
not on others, the heads' last layer frozen on step 0 (POA: lr scale 0, the DINOv2 way; DINO:
no gradient, DINO's way). POA: two heads, Sinkhorn targets, KoLeo; DINO: centering. Compiled
backends (jax, tensorflow) get one program per trainer: POA's sampler seed draws one subnet
(narrower in width and depth: blocks [0, 2]) on all 3 steps and DINO's last layer stays frozen
on all 3 steps; on torch the seed draws 2 distinct subnets (one at full width with a block
skipped) and DINO's last layer trains from step 1 on (after the freeze, PyTorch's per-parameter
Adam step count lags Keras' global one: the reference's Keras convention must absorb it).

The comparison can fail: the reference run with a wrong lambda, with schedules one step off
and with PyTorch's own Adam epsilon/step-count convention is checked to break it.
"""
import importlib.util
import pathlib

import keras
import numpy as np
import pytest

from poa_keras import ElasticViT
from poa_keras.methods import DINO, POA

torch = pytest.importorskip("torch")

BACKEND = keras.backend.backend()
ATOL = RTOL = 1e-4
STEPS = 3

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"
_SPEC = importlib.util.spec_from_file_location("torch_reference", _PATH)
torch_reference = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(torch_reference)

BACKBONE = dict(embed_dim=32, depth=3, head_dim=16, min_width=16, min_depth=2,
                layer_scale_init=0.5, named_subnets={})
HEAD = dict(hidden_dim=24, bottleneck_dim=12)
RECIPE = dict(epochs=1, steps_per_epoch=6, batch_size=4, lr=5e-3, lr_scaling="none",
              min_lr=1e-4, warmup_epochs=0, weight_decay=0.04, weight_decay_end=0.4,
              momentum_teacher=0.6, final_momentum_teacher=0.95, warmup_teacher_temp=0.04,
              teacher_temp=0.07, warmup_teacher_temp_epochs=0.5,
              freeze_last_layer_epochs=1 / 6, layer_decay=0.7, patch_embed_lr_mult=0.2)
POA_CLIP, DINO_CLIP = 150.0, 3.0
# jax and tensorflow compile one program per plan (tens of seconds each on a small shared CPU),
# so there POA runs ONE plan for the 3 steps and DINO freezes its last layer on all 3 steps (one
# program per trainer); on torch (eager, nothing compiled) POA switches between 2 plans and
# DINO's last layer is frozen on step 0 only.
COMPILED = BACKEND in ("jax", "tensorflow")
DINO_FREEZE_EPOCHS = 3 / 6 if COMPILED else 1 / 6
LOSS_TERMS = {"poa": ("loss", "dino_intact", "dino_elastic", "same_view", "koleo", "grad_norm"),
              "dino": ("loss", "dino", "grad_norm")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reference runs PyTorch on every backend: one CPU thread (shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def batch():
    rng = np.random.default_rng(2)
    return {"global": rng.normal(size=(2, 4, 32, 32, 3)).astype("float32"),
            "local": rng.normal(size=(2, 4, 16, 16, 3)).astype("float32")}


def sampler_seed(backbone):
    """A seed whose first STEPS plans are, on torch, 2 distinct subnets (the first two differ;
    one of them at full width), on jax/tensorflow one subnet narrower in width and depth."""
    for seed in range(200):
        sampler = backbone.sampler(seed=seed)
        plans = [sampler.next() for _ in range(STEPS)]
        if COMPILED:
            if len(set(plans)) == 1 and plans[0].width < backbone.embed_dim and \
                    plans[0].depth < backbone.depth:
                return seed, plans
        elif len(set(plans)) == 2 and any(p.width == backbone.embed_dim for p in plans) \
                and plans[0] != plans[1]:
            return seed, plans
    raise AssertionError("no suitable sampler seed")


def build(method):
    keras.utils.set_random_seed(0)
    backbone = ElasticViT.from_config_name("vit_elastic_test", name="student", **BACKBONE)
    rng = np.random.default_rng(1)
    for v in backbone.weights:   # biases, tokens and the mask token non-zero too
        v.assign(np_(v).astype("float32") + rng.normal(0, 0.02, v.shape).astype("float32"))
    if method == "poa":
        seed, plans = sampler_seed(backbone)
        trainer = POA(backbone, dict(HEAD, out_dims=(20, 28)),
                      recipe=dict(RECIPE, sampler_seed=seed, clip_grad=POA_CLIP))
    else:
        plans = None
        trainer = DINO(backbone, dict(HEAD, out_dim=20),
                       recipe=dict(RECIPE, centering="center", clip_grad=DINO_CLIP,
                                   freeze_last_layer_epochs=DINO_FREEZE_EPOCHS))
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3))
    for v in trainer.teacher_backbone.weights + trainer.teacher_head.weights:
        if "weight_g" not in v.path:   # a teacher unlike the student: the EMA shows
            v.assign(np_(v).astype("float32") + rng.normal(0, 0.01, v.shape).astype("float32"))
    return trainer, plans


def keras_state(trainer):
    """The trained weights (not the activation quantizers' calibrated ranges, PTQ state that
    float training never touches and the reference does not have)."""
    student = {v.path: np_(v) for v in trainer.backbone.weights + trainer.head.weights
               if v.name != "range"}
    teacher = {v.path: np_(v) for v in
               trainer.teacher_backbone.weights + trainer.teacher_head.weights
               if v.name != "range"}
    centers = [np_(trainer.center)] if isinstance(trainer, DINO) else \
        [np_(c) for c in trainer.centers]
    return student, teacher, centers


def ref_state(ref):
    return ref.student_weights(), ref.teacher_weights(), ref.centers()


def excess(ours, ref):
    """max(|ours - ref| - (ATOL + RTOL |ours|)): <= 0 when within the tolerance."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref) - (ATOL + RTOL * np.abs(ours))))


def worst(ours_run, ref_run, method):
    """(largest excess, where) over every step's logged terms, weights and centers."""
    out = (-np.inf, None)
    for step, ((o_logs, o_state), (r_logs, r_state)) in enumerate(zip(ours_run, ref_run)):
        for name in LOSS_TERMS[method]:
            out = max(out, (excess(o_logs[name], r_logs[name]), f"step {step} {name}"))
        for what, o, r in zip(("student", "teacher"), o_state[:2], r_state[:2]):
            assert sorted(o) == sorted(r), (what, sorted(set(o) ^ set(r)))
            for path in o:
                out = max(out, (excess(o[path], r[path]), f"step {step} {what} {path}"))
        for i, (o, r) in enumerate(zip(o_state[2], r_state[2])):
            out = max(out, (excess(o, r), f"step {step} center {i}"))
    return out


def run_reference(ref, data):
    return [(ref.train_step(data), ref_state(ref)) for _ in range(STEPS)]


@pytest.fixture(scope="module", params=["poa", "dino"])
def runs(request):
    """Our trainer's 3 steps and the reference's, plus the references built to be wrong."""
    method = request.param
    trainer, plans = build(method)
    data = batch()
    ref = torch_reference.ReferenceTrainer.from_trainer(trainer, device="cpu")
    mutants = {
        "torch Adam convention": torch_reference.ReferenceTrainer.from_trainer(
            trainer, device="cpu", adam_convention="torch"),
        "schedules one step off": torch_reference.ReferenceTrainer.from_trainer(
            trainer, device="cpu"),
    }
    mutants["schedules one step off"].step_hyperparameters = \
        lambda step: trainer.step_hyperparameters(step + 1)
    if method == "poa":
        wrong = torch_reference.ReferenceTrainer.from_trainer(trainer, device="cpu")
        wrong.step_hyperparameters = \
            lambda step: dict(trainer.step_hyperparameters(step), lambda_ie=0.7)
        mutants["lambda 0.7 instead of 0.8"] = wrong
    initial = keras_state(trainer), ref_state(ref)
    ours = []
    for _ in range(STEPS):
        logs = {k: float(v) for k, v in trainer.train_on_batch(data, return_dict=True).items()}
        ours.append((logs, keras_state(trainer)))
    return dict(method=method, trainer=trainer, plans=plans, ours=ours, initial=initial,
                ref=ref, reference=run_reference(ref, data),
                mutants={name: run_reference(m, data) for name, m in mutants.items()})


def test_setup_exercises_every_rule(runs):
    """The reference starts from our weights, and the run exercises what it should."""
    trainer, method = runs["trainer"], runs["method"]
    (o_student, o_teacher, _), (r_student, r_teacher, _) = runs["initial"]
    for o, r in ((o_student, r_student), (o_teacher, r_teacher)):
        assert sorted(o) == sorted(r)
        for path in o:
            np.testing.assert_array_equal(o[path].astype(np.float32), r[path], err_msg=path)
    # The reference's own lr multipliers (DINOv2 layer ids) are ours, and not all 1.
    ours = trainer.lr_multipliers()
    theirs = runs["ref"].lr_multipliers()
    assert len(ours) == len(trainer.trainable_variables)
    # The mask token (iBOT only) gets a zero gradient from us, none from the reference: it is
    # no parameter of the reference's optimizer (both leave it unchanged).
    missing = {v.path for v in trainer.trainable_variables} - set(theirs)
    assert missing == {trainer.backbone.mask_token.path}, missing
    for v, m in zip(trainer.trainable_variables, ours):
        factor = m[0] if isinstance(m, tuple) else m
        if v.path not in missing:
            assert theirs[v.path] == pytest.approx(factor, rel=1e-12), v.path
    assert len({round(m, 9) for m in theirs.values()}) >= 4
    # Clipping on some steps, not on others.
    clip = POA_CLIP if method == "poa" else DINO_CLIP
    norms = [logs["grad_norm"] for logs, _ in runs["ours"]]
    assert any(n > clip for n in norms) and any(n < clip for n in norms), norms
    # The last layer: frozen on step 0 (DINO on jax/tensorflow: on every step), trained after.
    last = [v.path for v in trainer.head.weights if "last_layer/weight_v" in v.path]
    frozen = STEPS if method == "dino" and COMPILED else 1
    assert trainer.freeze_last_layer_steps == frozen
    states = [o_student] + [state[0] for _, state in runs["ours"]]
    for path in last:
        for step in range(STEPS):
            change = np.abs(states[step + 1][path] - states[step][path]).max()
            if step < frozen:
                assert change == 0.0, (path, step)
            else:
                assert change > 1e-4, (path, step)
    if method == "poa":
        plans = [(p.width, p.depth) for p in runs["plans"]]
        assert [(logs["width"], logs["depth"]) for logs, _ in runs["ours"]] == plans
        assert [(logs["width"], logs["depth"]) for logs, _ in runs["reference"]] == plans
        assert runs["ref"].last_plan == runs["plans"][-1] == trainer.last_subnet
        assert all(logs["koleo"] > 0 for logs, _ in runs["ours"])


def test_same_losses_and_weights_as_reference(runs):
    value, where = worst(runs["ours"], runs["reference"], runs["method"])
    assert value <= 0.0, f"exceeds atol + rtol * |ours| by {value:.3g} at {where}"


def test_wrong_reference_is_caught(runs):
    """The comparison is sensitive: deliberately wrong references fail it."""
    for name, run in runs["mutants"].items():
        value, where = worst(runs["ours"], run, runs["method"])
        assert value > 10 * ATOL, f"{name}: only {value:.3g} off (at {where})"
