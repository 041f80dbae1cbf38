"""PlannedTrainer: the per-backend train step shared by the trainers (DESIGN contracts 5, 6).

A toy trainer: a 4 -> 8 -> 2 ReLU MLP student whose plan slices its hidden layer to the first k
units, an EMA teacher copy held as non-trainable variables, and host schedules for the learning
rate, weight decay, EMA momentum and a loss weight. Every expected value is computed in numpy
from the weights recorded after each step."""
import dataclasses
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import to_np

from poa_keras.methods.base import PlannedTrainer

BACKEND = keras.backend.backend()
COMPILED = BACKEND in ("jax", "tensorflow")
WIDTHS = (2, 4, 8)
STEPS_FIRST, STEPS_MORE = 12, 12


@dataclasses.dataclass(frozen=True)
class Width:
    """A hashable plan, like a ViTSubnet."""
    k: int


def lr_at(step):
    return 0.05 + 0.01 * (step % 3)


def wd_at(step):
    return 0.02 * (step % 4)


def momentum_at(step):
    return 0.9 + 0.03 * (step % 3)


def loss_weight_at(step):
    # Every 4th step has no loss: the SGD update is then weight decay alone.
    return 0.0 if step % 4 == 3 else 1.0


class ToyEMA(PlannedTrainer):
    def __init__(self, plan_seed=0, fixed_plan=None, schedules=True, **kwargs):
        super().__init__(**kwargs)
        rng = np.random.default_rng(0)
        init = dict(w1=rng.normal(0, 0.5, (4, 8)), b1=rng.normal(0, 0.1, (8,)),
                    w2=rng.normal(0, 0.5, (8, 2)))
        self.student = [self.add_weight(shape=v.shape, initializer="zeros", name=f"s_{n}")
                        for n, v in init.items()]
        self.teacher = [self.add_weight(shape=v.shape, initializer="zeros", trainable=False,
                                        name=f"t_{n}") for n, v in init.items()]
        for s, t, v in zip(self.student, self.teacher, init.values()):
            s.assign(v.astype("float32"))
            t.assign(v.astype("float32"))
        self.host = types.SimpleNamespace(rng=np.random.default_rng(plan_seed), drawn=[],
                                          fixed_plan=fixed_plan, schedules=schedules)

    def next_plan(self):
        if self.host.fixed_plan is not None:
            plan = self.host.fixed_plan
        else:
            plan = Width(int(self.host.rng.choice(WIDTHS)))
        self.host.drawn.append(plan)
        return plan

    def step_hyperparameters(self, step):
        if not self.host.schedules:
            return dict(momentum=0.9, loss_weight=1.0, learning_rate=0.05, weight_decay=0.0)
        return dict(learning_rate=lr_at(step), weight_decay=wd_at(step),
                    momentum=momentum_at(step), loss_weight=loss_weight_at(step))

    def frozen_variables(self, plan):
        return [self.student[1]] if plan.k == 2 else []

    def _mlp(self, x, weights, k):
        w1, b1, w2 = weights
        h = keras.ops.relu(keras.ops.matmul(x, w1[:, :k]) + b1[:k])
        return keras.ops.matmul(h, w2[:k])

    def compute_loss_and_logs(self, data, plan, training=True):
        x, y = data
        out = self._mlp(x, self.student, plan.k)
        target_out = self._mlp(x, self.teacher, plan.k)  # no stop_gradient on purpose
        task = keras.ops.mean(keras.ops.square(out - y))
        distill = keras.ops.mean(keras.ops.square(out - target_out))
        loss = self.step_values["loss_weight"] * (task + 0.1 * distill)
        return loss, {"task": task, "width": float(plan.k)}

    def after_optimizer_step(self, plan):
        m = self.step_values["momentum"]
        for t, s in zip(self.teacher, self.student):
            t.assign(m * t + (1.0 - m) * s)


class Recorder(keras.callbacks.Callback):
    """Student/teacher weights and logs after every step (initial weights first)."""

    def __init__(self):
        super().__init__()
        self.weights, self.logs = [], []

    def _record(self):
        if BACKEND == "jax":
            self.model.jax_state_sync()  # fit keeps the JAX state outside the variables
        m = self.model
        self.weights.append(([to_np(v) for v in m.student], [to_np(v) for v in m.teacher]))

    def on_train_begin(self, logs=None):
        if not self.weights:
            self._record()

    def on_train_batch_end(self, batch, logs=None):
        self._record()
        self.logs.append({k: float(v) for k, v in logs.items()})


def _dataset():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = np.stack([np.tanh(x[:, 0] - x[:, 1]), x[:, 2] * 0.5 + x[:, 3]], axis=1).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True).repeat()


@pytest.fixture(scope="module")
def run():
    keras.utils.set_random_seed(0)
    model = ToyEMA(plan_seed=1)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
    rec = Recorder()
    ds = _dataset()
    model.fit(ds, epochs=2, steps_per_epoch=STEPS_FIRST // 2, verbose=0, callbacks=[rec])
    first = dict(report=model.compilation_report(), n=model.num_compilations,
                 compiled=model.compiled_plans, drawn=list(model.host.drawn),
                 lr=float(to_np(model.optimizer.learning_rate)))
    model.fit(ds, epochs=1, steps_per_epoch=STEPS_MORE, verbose=0, callbacks=[rec])
    return types.SimpleNamespace(model=model, rec=rec, first=first)


def test_loss_falls(run):
    task = [log["task"] for log in run.rec.logs]
    assert len(task) == STEPS_FIRST + STEPS_MORE
    assert np.mean(task[-6:]) < 0.7 * np.mean(task[:6]), task


def test_teacher_is_exact_ema_of_updated_student(run):
    w = run.rec.weights
    for step in range(1, len(w)):
        m = momentum_at(step - 1)
        student, teacher = w[step]
        previous_teacher = w[step - 1][1]
        for s, t, t0 in zip(student, teacher, previous_teacher):
            np.testing.assert_allclose(t, m * t0 + (1 - m) * s, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step - 1}")


def test_teacher_gets_no_gradient(run):
    model = run.model
    teacher_ids = {id(v) for v in model.teacher}
    assert not teacher_ids & {id(v) for v in model.trainable_variables}
    assert all(not v.trainable for v in model.teacher)
    if BACKEND == "torch":
        assert all(v.value.grad is None for v in model.teacher)
    # The loss depends on the teacher, yet it moved only by the EMA rule (checked above): no
    # optimizer update reached it. And it did move, so the check above is not vacuous.
    w = run.rec.weights
    assert not np.allclose(w[0][1][0], w[-1][1][0])


def test_schedules_reach_the_optimizer_inside_the_step(run):
    """On loss-free steps SGD does weight decay alone: w' = w (1 - wd lr), with the scheduled
    wd and lr of that step; b1 is frozen by the plan k=2 and must not move at all."""
    w, drawn = run.rec.weights, run.model.host.drawn
    checked = 0
    for step in range(len(w) - 1):
        before, after = w[step][0], w[step + 1][0]
        if drawn[step].k == 2:
            np.testing.assert_array_equal(after[1], before[1])
        if loss_weight_at(step) == 0.0:
            factor = 1.0 - wd_at(step) * lr_at(step)
            for i in (0, 1, 2):
                if i == 1 and drawn[step].k == 2:
                    continue
                np.testing.assert_allclose(after[i], before[i] * factor, rtol=1e-6, atol=1e-7)
            checked += 1
        else:
            assert not np.allclose(after[0], before[0])
    assert checked == (len(w) - 1) // 4
    assert run.first["lr"] == pytest.approx(lr_at(STEPS_FIRST - 1))


def test_plan_sequence_is_what_next_plan_returned(run):
    drawn = run.model.host.drawn
    assert len(drawn) == STEPS_FIRST + STEPS_MORE
    assert [log["width"] for log in run.rec.logs] == [float(p.k) for p in drawn]
    assert run.model.last_plan == drawn[-1]
    assert run.model.plans_seen == set(drawn)


def test_one_program_per_plan_and_no_growth(run):
    first = run.first
    assert set(first["drawn"]) == {Width(k) for k in WIDTHS}  # every plan seen early
    model = run.model
    if COMPILED:
        assert first["n"] == len(set(first["drawn"])) == 3
        assert first["compiled"] == set(first["drawn"])
        assert model.num_compilations == 3  # 12 more steps, no new program
        assert model.compiled_plans == model.plans_seen
        assert run.rec.logs[-1]["compilations"] == 3
    else:
        assert model.num_compilations == 0 and model.compiled_plans == set()
    report = model.compilation_report()
    assert report["plans_seen"] == 3 and report["num_compilations"] == model.num_compilations


def test_global_norm_clipping():
    """With SGD, no decay and clip < |g|: each update has global norm lr * clip."""
    keras.utils.set_random_seed(0)
    clip = 0.05
    model = ToyEMA(fixed_plan=Width(8), schedules=False, clip_grad=clip)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
    rec = Recorder()
    model.fit(_dataset(), epochs=1, steps_per_epoch=3, verbose=0, callbacks=[rec])
    for step in range(3):
        delta = [a - b for a, b in zip(rec.weights[step + 1][0], rec.weights[step][0])]
        norm = np.sqrt(sum(np.sum(d ** 2) for d in delta))
        grad_norm = rec.logs[step]["grad_norm"]
        assert grad_norm > 2 * clip
        np.testing.assert_allclose(norm, 0.05 * clip * grad_norm / (grad_norm + 1e-6),
                                   rtol=1e-4)
    assert model.num_compilations == (1 if COMPILED else 0)


def test_bad_plans_are_refused():
    class Unhashable(ToyEMA):
        def next_plan(self):
            return [8]

    x, y = np.zeros((4, 4), "float32"), np.zeros((4, 2), "float32")
    model = Unhashable()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
    with pytest.raises(TypeError, match="hashable"):
        model.train_on_batch(x, y)
    if COMPILED:
        model = ToyEMA(plan_seed=1, max_plans=1)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
        with pytest.raises(RuntimeError, match="max_plans=1"):
            for _ in range(10):
                model.train_on_batch(x, y)


def test_state_threads_through_unsynced_steps(run):
    """The same 12 steps without a callback syncing the state after each one (and, on the
    compiled backends, two steps per train-function call) end at the recorded weights."""
    keras.utils.set_random_seed(0)
    model = ToyEMA(plan_seed=1)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05),
                  steps_per_execution=2 if COMPILED else 1)
    model.fit(_dataset(), epochs=2, steps_per_epoch=STEPS_FIRST // 2, verbose=0)
    assert model.host.drawn == run.first["drawn"]
    student, teacher = run.rec.weights[STEPS_FIRST]
    for v, expected in zip(model.student + model.teacher, student + teacher):
        np.testing.assert_allclose(to_np(v), expected, rtol=1e-6, atol=1e-7)
    assert int(to_np(model.optimizer.iterations)) == STEPS_FIRST


@pytest.mark.skipif(keras.backend.backend() != "torch",
                    reason="the multi-tensor fast paths exist on PyTorch only (JAX and "
                    "TensorFlow compile the step, and XLA fuses the per-variable loops)")
def test_torch_fused_paths_equal_the_generic_loops():
    """methods/torch_fused.py against the generic keras.ops loops it replaces: two POA steps
    with layer decay, the patch-embed multiplier, the last-layer freeze (a per-step
    multiplier), active clipping, AdamW with weight decay and the EMA teacher."""
    from poa_keras import ElasticViT
    from poa_keras.methods import POA

    recipe = dict(epochs=1, steps_per_epoch=4, batch_size=2, lr=1e-2, lr_scaling="none",
                  warmup_epochs=0, weight_decay=0.05, layer_decay=0.7, patch_embed_lr_mult=0.2,
                  freeze_last_layer_epochs=0.25, clip_grad=0.05, sampler_seed=1)

    def trainer(fused):
        keras.utils.set_random_seed(0)
        backbone = ElasticViT(image_size=16, patch_size=8, embed_dim=32, depth=2, head_dim=16,
                              min_width=16, min_depth=1, layer_scale_init=0.5)
        t = POA(backbone, dict(hidden_dim=16, bottleneck_dim=8, out_dims=(10,)), recipe=recipe)
        t.fused_updates = fused
        t.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.05))
        return t

    fused, generic = trainer(True), trainer(False)
    assert fused.fused_step() and not generic.fused_step()
    rng = np.random.default_rng(0)
    data = {"global": rng.normal(size=(2, 2, 16, 16, 3)).astype("float32"),
            "local": rng.normal(size=(2, 2, 8, 8, 3)).astype("float32")}
    start = [np.array(keras.ops.convert_to_numpy(v)) for v in fused.weights]
    for _ in range(2):
        a = fused.train_on_batch(data, return_dict=True)
        b = generic.train_on_batch(data, return_dict=True)
        assert float(a["grad_norm"]) > recipe["clip_grad"]   # clipping is active
        for name in ("loss", "grad_norm"):
            np.testing.assert_allclose(float(a[name]), float(b[name]), rtol=1e-6)
    moved = 0
    for x, y, w0 in zip(fused.weights, generic.weights, start):
        x, y = keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y)
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        moved += bool(np.abs(x - w0).max() > 0)
    assert moved > len(start) // 2   # student and teacher weights both moved
