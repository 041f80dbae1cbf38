"""The contract every backbone family passes (DESIGN.md contracts 1-4), run on each case of
tests/family_contract.py: the elastic ViT, Swin and ResNet, and a non-elastic BatchNorm
family. Family-specific facts are checked through the cases' hooks on the way (so nothing is
computed twice); what only one family has stays in its own test file."""
import dataclasses
import json

import keras
import numpy as np
import pytest
from conftest import forward, to_np
from family_contract import (BACKEND, CASES, max_diff, outputs, restart_sampler,
                             resnet_bn_teacher, same_weights, tiny_bn_teacher,
                             tinyvit_teacher, train_step, unchanged, weights)

from poa_keras import Backbone
from poa_keras.elastic import block_boundaries, set_block_boundaries
from poa_keras.methods import POA


@pytest.fixture(scope="session")
def tiny_bn():
    return tiny_bn_teacher()


@pytest.fixture(scope="session")
def tiny_resnet_bn():
    return resnet_bn_teacher()


@pytest.fixture(scope="session")
def tiny_tinyvit():
    return tinyvit_teacher()


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param


@pytest.fixture(scope="module")
def teacher(case, request):
    return request.getfixturevalue(case.teacher)


def _elastic_only(case):
    if not case.elastic:
        pytest.skip(f"{case.name} is not elastic: its grid is the one intact spec")


# -- forward == extract ----------------------------------------------------------------------
def test_elastic_forward_equals_extracted_subnet(case, teacher):
    images = case.images()
    specs = case.specs(teacher)
    for spec in specs:
        sub = teacher.extract(spec)
        assert type(sub) is type(teacher) and sub is not teacher
        assert sub.full_subnet == spec   # the extracted network's full configuration is the spec
        if case.check_extracted:
            case.check_extracted(spec, sub)
        assert sub.count_params() == teacher.subnet_params(spec)
        elastic = outputs(teacher, images, spec, **case.call_options)
        if case.check_outputs:
            case.check_outputs(spec, elastic)
        diff = max_diff(elastic, outputs(sub, images, **case.call_options))
        assert diff <= 1e-5, (spec, diff)
    plain = outputs(teacher, images, **case.call_options)
    assert "cls" in plain and "pooled" in plain
    # the full spec is the unsliced network
    assert max_diff(outputs(teacher, images, teacher.full_subnet, **case.call_options),
                    plain) == 0.0
    if case.elastic:   # a smaller subnet is another function (other widths, or other values)
        assert specs[0] != teacher.full_subnet
        small = outputs(teacher, images, specs[0], **case.call_options)
        assert any(small[k].shape != plain[k].shape or np.abs(small[k] - plain[k]).max() > 1e-2
                   for k in plain)


KEEP_TRACES = {}


def keep_forward(model, static):
    """``(images, keep) -> outputs`` of the subnet ``static`` under a run-time block mask:
    on JAX one jitted program per (model, static) whose traces are counted in KEEP_TRACES."""
    if BACKEND != "jax":
        return lambda images, keep: model(images, subnet=static,
                                          keep=keras.ops.convert_to_tensor(keep))
    import jax

    key = (model.name, static)
    if key not in KEEP_PROGRAMS:
        def run(images, keep):
            KEEP_TRACES[key] = KEEP_TRACES.get(key, 0) + 1
            return model(images, subnet=static, keep=keep)
        KEEP_PROGRAMS[key] = jax.jit(run)
    return KEEP_PROGRAMS[key]


KEEP_PROGRAMS = {}


def test_depth_as_a_run_time_block_mask(case, teacher):
    """DESIGN contract 6: the static part of a spec is its width (``full_depth_subnet``); the
    depth is a run-time 0/1 mask (``block_keep``) with which the forward equals the static
    subnet's; only blocks that some subnet skips get a conditional."""
    if not case.elastic:
        spec = teacher.full_subnet
        assert not teacher.has_elastic_depth() and teacher.full_depth_subnet(spec) == spec
        return
    assert teacher.has_elastic_depth()
    images = case.images()
    full = teacher.block_keep(None)
    assert full.dtype == np.float32 and set(full.tolist()) == {1.0}
    skippable = teacher.skippable_blocks()
    assert skippable and len(skippable) < len(full)
    for spec in case.specs(teacher)[:6]:   # ViT: width 32 at every depth; one program
        static = teacher.full_depth_subnet(spec)
        assert teacher.full_depth_subnet(static) == static
        assert teacher.head_active_in(static) == teacher.head_active_in(spec)
        keep = teacher.block_keep(spec)
        assert keep.shape == full.shape and set(np.flatnonzero(keep == 0)) <= skippable
        kept = sum(len(ids) for ids in teacher.block_ids(spec)) if isinstance(
            teacher.block_ids(spec)[0], list) else len(teacher.block_ids(spec))
        assert int(keep.sum()) == kept
        out = {k: to_np(v) for k, v in keep_forward(teacher, static)(images, keep).items()}
        diff = max_diff(out, outputs(teacher, images, spec))
        assert diff <= 1e-5, (spec, diff)
    if BACKEND == "jax":   # one program per width: the mask is an argument
        assert set(KEEP_TRACES.values()) == {1}, KEEP_TRACES
    with pytest.raises(ValueError, match=r"keep must have shape \(%d,\)" % len(full)):
        teacher(images, subnet=teacher.full_subnet, keep=keras.ops.ones((len(full) + 1,)))


def _training_loss_and_grads(model, images, subnet, keep=None, values=True):
    """(sum of squares of every tensor output of a TRAINING forward, its gradients with
    respect to the trainable variables), as float64 numpy, on the current backend; on JAX also
    the number of conditionals in the forward's jaxpr (and with ``values=False`` only that:
    (None, None, count), no program compiled)."""
    variables = model.trainable_variables
    depth = {} if keep is None else {"keep": keep}

    def loss_of(out):
        return sum(keras.ops.sum(keras.ops.square(v)) for _, v in sorted(out.items())
                   if not isinstance(v, (list, tuple)))

    conds = None
    if BACKEND == "jax":
        import jax
        trainable = [v.value for v in variables]
        others = [v.value for v in model.non_trainable_variables]

        def f(tv):
            return loss_of(model.stateless_call(tv, others, images, subnet=subnet,
                                                training=True, **depth)[0])
        conds = str(jax.make_jaxpr(f)(trainable)).count("cond[")
        if not values:
            return None, None, conds
        loss, grads = jax.jit(jax.value_and_grad(f))(trainable)
    elif BACKEND == "tensorflow":
        import tensorflow as tf
        with tf.GradientTape() as tape:
            loss = loss_of(model(images, subnet=subnet, training=True, **depth))
        grads = tape.gradient(loss, variables)
    else:
        import torch
        loss = loss_of(model(images, subnet=subnet, training=True, **depth))
        grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
    return to_np(loss), [np.zeros(v.shape) if g is None else to_np(g)   # unused: no gradient
                         for v, g in zip(variables, grads)], conds


def test_block_boundaries_change_no_value(case, teacher):
    """``set_block_boundaries(True)`` (the default on JAX and TensorFlow on the CPU) runs every
    block of a training pass in a conditional, so that XLA does not fuse the residual
    stream's gradient across blocks. The loss and every gradient are those without it, at the
    intact size, a sliced size and a sliced size with a run-time depth mask (on JAX only the
    last: each compiled gradient program costs seconds); on JAX the forward holds one
    conditional per block that keeps its shape, and without boundaries only the mask's."""
    _elastic_only(case)
    images = case.images()
    spec = case.specs(teacher)[1]
    blocks = len(teacher.block_keep(None))
    static = teacher.full_depth_subnet(spec)
    keep = keras.ops.convert_to_tensor(teacher.block_keep(spec))
    try:
        for subnet, mask in ((None, None), (spec, None), (static, keep)):
            results = {}
            for on in (False, True):
                set_block_boundaries(on)
                assert block_boundaries() is on
                results[on] = _training_loss_and_grads(
                    teacher, images, subnet, mask, values=BACKEND != "jax" or mask is not None)
            (loss_off, grads_off, conds_off), (loss_on, grads_on, conds_on) = \
                results[False], results[True]
            if BACKEND == "jax":
                skipped = 0 if mask is None else len(teacher.skippable_blocks())
                assert conds_off == skipped, (subnet, conds_off)
                assert skipped < conds_on <= blocks, (subnet, conds_on, blocks)
            if loss_off is None:
                continue
            assert abs(loss_on - loss_off) <= 1e-5 * max(1.0, abs(loss_off)), (subnet, loss_on,
                                                                                loss_off)
            assert len(grads_on) == len(grads_off)
            for g_on, g_off in zip(grads_on, grads_off):
                scale = max(1.0, float(np.abs(g_off).max()))
                assert float(np.abs(g_on - g_off).max()) <= 1e-5 * scale, subnet
    finally:
        set_block_boundaries(None)
    with pytest.raises(ValueError, match=r"True, False or None \(auto\), got 'yes'"):
        set_block_boundaries("yes")


def test_grid_specs_and_errors(case, teacher):
    specs = teacher.subnets()
    assert len(specs) == len(set(specs)) >= 1 and teacher.full_subnet in specs
    assert len(teacher.sampling_counts()) == len(specs)
    for spec in specs:
        assert hash(spec) == hash(dataclasses.replace(spec))   # frozen, hashable values
        assert teacher.resolve_subnet(dataclasses.astuple(spec)) == spec
        assert teacher.subnet_from_kwargs(**dataclasses.asdict(spec)) == spec
    for name, spec in teacher.named_subnets.items():
        assert teacher.resolve_subnet(name) == teacher.resolve_subnet(spec)
    assert teacher.resolve_subnet(None) is None
    bad, error, message = case.bad_spec
    with pytest.raises(error, match=message):
        teacher.resolve_subnet(bad)
    with pytest.raises(error, match=message):
        teacher.extract(bad)
    with pytest.raises(ValueError, match=r"unknown named size 'huge'.*known sizes"):
        teacher.extract("huge")
    if case.elastic:
        sampler = teacher.sampler(seed=0)
        assert teacher.full_subnet not in sampler.frequencies()
        assert set(sampler.frequencies()) <= set(specs)
    else:
        with pytest.raises(ValueError, match="is not elastic"):
            teacher.subnet_from_kwargs(width=8)


def test_family_hooks(case, teacher):
    images = case.images()
    spec = case.specs(teacher)[0]
    full = outputs(teacher, images, **case.call_options)   # compiled by the forward test
    assert teacher.feature_dim() == full["cls"].shape[-1]
    assert teacher.feature_dim(spec) == outputs(teacher, images, spec,
                                                **case.call_options)["cls"].shape[-1]
    assert teacher.head_active_in(None) is None
    for s in teacher.subnets():
        width = teacher.feature_dim(s)
        assert teacher.head_active_in(s) == (None if width == teacher.feature_dim() else width)
    ints = {f.name: float(getattr(spec, f.name)) for f in dataclasses.fields(spec)
            if isinstance(getattr(spec, f.name), int)}
    logged = teacher.subnet_log_values(spec)
    assert all(isinstance(v, float) for v in logged.values())
    assert {k: v for k, v in logged.items() if k in ints} == ints
    assert isinstance(teacher.supports_masks, bool)
    paths = [v.path for v in teacher.weights]
    assert all(teacher.lr_multiplier(p) == 1.0 for p in paths)
    if teacher.max_layer_id is None:   # no layer ids: layer decay is refused, not ignored
        with pytest.raises(ValueError, match="defines no layer ids"):
            teacher.lr_multiplier(paths[0], 0.5)
        return
    for p in paths:   # the one rule of Backbone.lr_multiplier, on the family's layer ids
        layer = teacher.layer_id(p)
        assert 0 <= layer <= teacher.max_layer_id, p
        expected = 0.5 ** (teacher.max_layer_id - layer) * (
            0.2 if teacher.is_patch_embedding(p) else 1.0)
        assert teacher.lr_multiplier(p, 0.5, 0.2) == pytest.approx(expected), p
    assert min(teacher.layer_id(p) for p in paths) == 0


# -- serialization ---------------------------------------------------------------------------
def test_config_and_keras_file_round_trip(case, teacher, tmp_path):
    images = case.images()
    config = teacher.get_config()
    clone = case.cls.from_config(json.loads(json.dumps(config)))   # JSON, as in a preset
    assert clone.get_config() == config
    assert clone.subnets() == teacher.subnets() and clone.named_subnets == teacher.named_subnets
    spec = case.specs(teacher)[0]
    sub = teacher.extract(spec)
    sub.save(str(tmp_path / "sub.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "sub.keras"))  # safe_mode: no pickles
    assert type(loaded) is case.cls and loaded.get_config() == sub.get_config()
    if case.check_keras_loaded:
        case.check_keras_loaded(loaded)
    same_weights(loaded, sub)
    assert max_diff(outputs(loaded, images, **case.call_options),
                    outputs(sub, images, **case.call_options)) == 0.0
    teacher.save(str(tmp_path / "teacher.keras"))
    reloaded = keras.saving.load_model(str(tmp_path / "teacher.keras"))
    same_weights(reloaded, teacher)
    assert max_diff(outputs(reloaded, images, spec, **case.call_options),
                    outputs(teacher, images, spec, **case.call_options)) == 0.0


def test_preset_round_trip(case, teacher, tmp_path):
    teacher.save_to_preset(tmp_path / "teacher")
    full = Backbone.from_preset(tmp_path / "teacher")
    assert type(full) is case.cls and full.get_config() == teacher.get_config()
    same_weights(full, teacher)
    spec = teacher.subnets()[0]
    sub = Backbone.from_preset(tmp_path / "teacher", **dataclasses.asdict(spec))
    assert sub.full_subnet == spec
    same_weights(sub, teacher.extract(spec))
    same_weights(case.cls.from_preset(tmp_path / "teacher", subnet=spec), sub)
    bad, error, message = case.bad_spec
    with pytest.raises(error, match=message):
        Backbone.from_preset(tmp_path / "teacher", subnet=bad)
    if case.check_preset:
        case.check_preset(tmp_path / "teacher", teacher, full)
    sub.save_to_preset(tmp_path / "sub")   # an extracted subnet is a preset of its own
    same_weights(Backbone.from_preset(tmp_path / "sub"), sub)


# -- deployment ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_extracted_subnet_quantizes_to_int8(case):
    spec, num_quantized = case.int8
    teacher = case.micro()   # default initialisation: realistic weight scales
    images = case.micro_images()
    sub = teacher.extract(spec)
    ref = outputs(sub, images)["cls"]
    sub.quantize("int8")
    quantized = [layer for layer in sub._flatten_layers()
                 if getattr(layer, "quantization_mode", None)]
    assert len(quantized) == num_quantized
    out = outputs(sub, images)["cls"]
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99, cos
    assert not np.allclose(out, ref, atol=1e-7)   # the int8 kernels really are in use
    smaller = [s for s in sub.subnets() if s != sub.full_subnet]
    if smaller:   # slicing needs float weights
        with pytest.raises(ValueError, match=r"quantized \(int8\).*Extract the sub-network first"):
            sub(images, subnet=smaller[0])


def test_extracted_subnet_exports(case, tmp_path):
    if BACKEND in case.export_skip:
        pytest.skip(case.export_skip[BACKEND])
    teacher = case.micro()
    sub = teacher.extract(case.export_spec)
    images = case.micro_images()
    ref = outputs(sub, images)["cls"]
    shape = (None,) + images.shape[1:]
    spec = keras.InputSpec(shape=shape, dtype="float32")
    if BACKEND in ("jax", "tensorflow"):
        import tensorflow as tf

        sub.export(str(tmp_path / "saved"), format="tf_saved_model", input_signature=[spec])
        reloaded = tf.saved_model.load(str(tmp_path / "saved"))   # it owns the variables
        out = np.asarray(reloaded.serve(tf.constant(images))["cls"])
    else:
        import torch

        # without dynamic_shapes torch.export specialises the batch to the sample batch of 1
        batch = torch.export.Dim("batch", min=1, max=4096)
        sub.export(str(tmp_path / "model.pt2"), format="torch", input_signature=[spec],
                   dynamic_shapes=({0: batch},))
        out = torch.export.load(str(tmp_path / "model.pt2")).module()(torch.from_numpy(images))
        out = (out["cls"] if isinstance(out, dict) else out[0]).detach().numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_bfloat16_forward(case):
    model = case.micro(dtype="mixed_bfloat16")
    ref_model = case.micro()
    ref_model.set_weights(model.get_weights())
    images = case.micro_images()
    spec = case.bf16_spec
    out = forward(model, images, spec)["cls"]
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    ref = to_np(forward(ref_model, images, spec)["cls"])
    assert np.isfinite(to_np(out)).all()
    assert np.abs(to_np(out) - ref).max() < 0.1 * np.abs(ref).max() + 0.05
    sub = model.extract(spec)
    assert keras.backend.standardize_dtype(forward(sub, images)["cls"].dtype) == "bfloat16"


def test_stochastic_depth_only_in_training(case):
    model = case.micro(drop_path_rate=0.5, drop_path_uniform=True)
    images = np.concatenate([case.micro_images()] * 8)
    spec = case.drop_path_spec
    a = outputs(model, images, spec)["cls"]
    assert max_diff({"cls": a}, {"cls": outputs(model, images, spec)["cls"]}) == 0.0
    if case.batch_norm:
        # BatchNorm normalises a training batch with its own statistics: compare with the
        # same network without stochastic depth, also in training mode.
        reference = case.micro(drop_path_rate=0.0, drop_path_uniform=True)
        reference.set_weights(model.get_weights())
        a = outputs(reference, images, spec, training=True)["cls"]
    c = outputs(model, images, spec, training=True)["cls"]
    assert float(np.abs(c - a).max()) > 1e-3


# -- trainers (no family-specific code in them) ----------------------------------------------
def _teacher_is_the_ema(trainer, teacher0, student_after):
    m = trainer.schedules.at(0)["momentum"]
    for t, t0, s in zip(trainer.teacher_backbone.weights, teacher0, student_after):
        np.testing.assert_allclose(to_np(t), m * t0 + (1 - m) * s, atol=1e-5)


def test_dino_step(case):
    trainer, batch = case.train.dino()
    with unchanged(trainer):
        _dino_step(case, trainer, batch)


def _dino_step(case, trainer, batch):
    backbone = trainer.backbone
    before = weights(backbone.weights)
    teacher0 = weights(trainer.teacher_backbone.weights)
    logs = train_step(trainer, batch)
    assert all(np.isfinite(v) for v in logs.values()), logs
    after = weights(backbone.weights)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, before))
    _teacher_is_the_ema(trainer, teacher0, after)
    if case.train.check_dino:
        case.train.check_dino(trainer, batch, before)
    losses = [logs["loss"]] + [train_step(trainer, batch)["loss"]
                               for _ in range(case.train.dino_steps - 1)]
    assert np.all(np.isfinite(losses)), losses
    assert trainer.num_compilations <= 1


def test_poa_step(case):
    if not case.elastic:
        pytest.skip(f"{case.name}: POA's elastic student needs a grid of more than the intact "
                    "network (POA refuses it: test_poa_refuses_a_non_elastic_family)")
    trainer, batch, plan = case.train.poa()
    with unchanged(trainer):
        _poa_step(case, trainer, batch, plan)


def _poa_step(case, trainer, batch, plan):
    backbone = trainer.backbone
    restart_sampler(trainer)
    student0 = weights(backbone.weights)
    teacher0 = weights(trainer.teacher_backbone.weights)
    logs = train_step(trainer, batch)
    assert trainer.last_subnet == plan
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert logs["dino_elastic"] > 0 and logs["same_view"] > 0 and logs["dino_intact"] > 0
    for name, value in backbone.subnet_log_values(plan).items():
        assert logs[name] == value
    after = weights(backbone.weights)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, student0))
    _teacher_is_the_ema(trainer, teacher0, after)
    if case.train.check_poa:
        case.train.check_poa(trainer, logs)
    # the plan's program was traced once (the shared trainer may hold programs of other plans)
    traces = trainer.compilation_report()["traces_per_plan"]
    assert traces.get(repr(trainer.last_plan), 0) <= 1, traces
    if case.train.no_masks is not None:
        fresh = case.train.no_masks()
        assert not fresh.supports_masks
        with pytest.raises(ValueError, match="needs a backbone that takes masks"):
            POA(fresh, dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20,)),
                recipe=dict(trainer.recipe, ibot_weight=1.0))


@pytest.mark.parametrize("case", [c for c in CASES if not c.elastic],
                         ids=[c.name for c in CASES if not c.elastic])
def test_poa_refuses_a_non_elastic_family(case):
    model = case.micro()
    with pytest.raises(ValueError, match="POA trains an elastic backbone.*DINO"):
        POA(model, dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20,)),
            recipe=dict(epochs=1, steps_per_epoch=2, batch_size=4))
