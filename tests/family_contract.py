"""The contract every backbone family passes, as data (DESIGN.md contracts 1-4; the way
keras-hub's ``run_backbone_test`` takes a class and its arguments).

One ``FamilyCase`` per family says how to build its tiny models, which specs and images to use
and what family-specific facts to check on the way; ``tests/test_family_contract.py`` runs the
same checks on every case: forward == extract over the grid, config / ``.keras`` / preset round
trips, int8, export, bfloat16, stochastic depth, the family hooks, one DINO and one POA step.
A new family costs a case here (and its truly family-specific tests in its own file), not a
copy of the checks.

Non-elastic families (one intact spec; ``extract`` copies) pass the same contract: the
BatchNorm ``ResNet``, ``TinyViT`` and the tiny BatchNorm network ``TinyBNNet`` below (a
minimal family of one's own). The DINO steps of the last two also check the BatchNorm
statistics against numpy.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import keras
import numpy as np
import pytest
from conftest import SMALL_VIT, forward, randomize, randomize_bn_variances, to_np
from keras import ops

from poa_keras import (ElasticResNet, ElasticSwin, ElasticViT, ResNet, ResNetSubnet, SwinSubnet,
                       ViTSubnet)
from poa_keras.backbones import NonElasticBackbone
from poa_keras.backbones.resnet import CONFIGS as RESNET_CONFIGS
from poa_keras.backbones.resnet_bn import CONFIGS as RESNET_BN_CONFIGS
from poa_keras.backbones.swin import CONFIGS as SWIN_CONFIGS
from poa_keras.backbones.tinyvit import CONFIGS as TINYVIT_CONFIGS
from poa_keras.backbones.tinyvit import TinyViT
from poa_keras.elastic.layers import StochasticDepth
from poa_keras.elastic.spec import IntactSubnet
from poa_keras.methods import DINO, POA

BACKEND = keras.backend.backend()


# ----- helpers ---------------------------------------------------------------------------------
def outputs(model, images, subnet=None, **options):
    """{name: float64 numpy} of a forward (``conftest.forward``: compiled on JAX); list outputs
    (feature maps, blocks) become name/0, name/1, ..."""
    out = forward(model, images, subnet, **options)
    flat = {}
    for name, value in out.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{name}/{i}": to_np(v) for i, v in enumerate(value)})
        else:
            flat[name] = to_np(value)
    return flat


def max_diff(a, b):
    """The largest |a - b| over every output (both must have the same outputs and shapes)."""
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for name in a:
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


def weights(variables):
    return [to_np(v) for v in variables]


def same_weights(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


def train_step(trainer, data):
    return {k: float(v) for k, v in trainer.train_on_batch(data, return_dict=True).items()}


@contextlib.contextmanager
def unchanged(trainer):
    """Runs the block, then puts every variable of the trainer and its optimizer back as it
    was (and the host-side step count with them): a trainer shared between test files (the
    micro ViT's, with tests/test_methods.py) leaves a contract check exactly as it found it."""
    if not trainer.optimizer.built:   # its moments exist (as zeros) before the snapshot
        trainer.optimizer.build(trainer.trainable_variables)
    variables = (list(trainer.weights) + list(trainer.metrics_variables)
                 + list(trainer.optimizer.variables))
    values = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
    try:
        yield trainer
    finally:
        for variable, value in zip(variables, values):
            variable.assign(value)
        trainer.sync_host_step()


def poa_trainer(backbone, heads, recipe, plan):
    """A compiled POA trainer whose sampler draws ``plan`` first; ``restart_sampler(trainer)``
    makes it draw ``plan`` again (one compiled program per trainer)."""
    seed = next(s for s in range(200) if backbone.sampler(seed=s).next() == plan)
    trainer = POA(backbone, dict(heads), recipe=dict(recipe, sampler_seed=seed))
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=recipe["lr"]))
    trainer.start_state = trainer.get_sampler_state()
    return trainer


def restart_sampler(trainer):
    trainer.set_sampler_state(trainer.start_state)


# ----- the case --------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainCase:
    """A POA and a DINO step of a family (micro models: compiling a train step is what costs)."""

    poa: Callable = None           # () -> (POA trainer made with poa_trainer, batch, plan)
    dino: Callable = None          # () -> (compiled DINO trainer, batch)
    dino_steps: int = 1
    check_poa: Callable = None     # (trainer, logs) -> None: family-specific facts
    check_dino: Callable = None    # (trainer, batch, student weights before) -> None
    no_masks: Callable = None      # () -> a fresh backbone for the "POA with iBOT" refusal


@dataclasses.dataclass
class FamilyCase:
    """What the contract needs to know about one family."""

    name: str
    cls: type
    teacher: str                     # a (session) fixture: the randomised tiny teacher
    images: Callable                 # () -> float32 images for the forward checks
    specs: Callable                  # teacher -> the specs to check forward == extract on
    bad_spec: tuple                  # (spec, exception class, regex of its message)
    micro: Callable                  # (**config overrides) -> a default-initialised small model
    micro_images: Callable           # () -> images for the micro model
    int8: tuple                      # (spec of the micro model, number of int8 layers)
    bf16_spec: object                # spec of the micro model for the bfloat16 check
    drop_path_spec: object           # spec of the micro model for the stochastic-depth check
    export_spec: object              # spec of the micro model to export
    train: TrainCase
    elastic: bool = True
    batch_norm: bool = False         # training mode also changes BatchNorm's statistics
    call_options: dict = dataclasses.field(default_factory=dict)
    export_skip: dict = dataclasses.field(default_factory=dict)   # backend -> reason
    check_extracted: Callable = None   # (spec, sub) -> None
    check_outputs: Callable = None     # (spec, outputs) -> None
    check_keras_loaded: Callable = None   # (loaded extracted subnet) -> None
    check_preset: Callable = None      # (preset dir, teacher, full) -> None


# ----- ViT -------------------------------------------------------------------------------------
def _vit_images():
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")


def _vit_micro(**overrides):
    keras.utils.set_random_seed(0)
    return ElasticViT(**dict(SMALL_VIT, **overrides))


def _vit_check_extracted(spec, sub):
    assert (sub.embed_dim, sub.depth) == (spec.width, spec.depth)


# POA and DINO on a micro ViT (tests/test_methods.py runs more steps on the same trainers).
VIT_TRAIN = dict(image_size=16, patch_size=8, embed_dim=32, depth=2, head_dim=16, min_width=16,
                 min_depth=1)
VIT_PLAN = ViTSubnet(16, 1)
# One-step recipes: constant lr, momentum and temperature, no weight decay, no clipping.
STEP_RECIPE = dict(epochs=1, steps_per_epoch=50, batch_size=4, lr=1e-4, lr_scaling="none",
                   min_lr=1e-4, warmup_epochs=0, warmup_teacher_temp_epochs=0,
                   freeze_last_layer_epochs=0, weight_decay=0.0, weight_decay_end=0.0,
                   momentum_teacher=0.9, final_momentum_teacher=0.9, clip_grad=None)
VIT_RECIPE = STEP_RECIPE


def vit_batch():
    rng = np.random.default_rng(0)
    return {"global": rng.normal(size=(2, 4, 16, 16, 3)).astype("float32"),
            "local": rng.normal(size=(2, 4, 8, 8, 3)).astype("float32")}


_SHARED = {}


def vit_poa():
    """The module-wide POA trainer of the micro ViT (shared with tests/test_methods.py)."""
    if "poa" not in _SHARED:
        keras.utils.set_random_seed(0)
        backbone = ElasticViT(name="student", **VIT_TRAIN)
        _SHARED["poa"] = poa_trainer(backbone, dict(hidden_dim=32, bottleneck_dim=16,
                                                    out_dims=(20, 30)),
                                     dict(VIT_RECIPE, koleo_weight=0.0), VIT_PLAN)
    return _SHARED["poa"]


def dino_trainer(backbone, recipe=None):
    """A DINO trainer with the small test heads around ``backbone``, compiled with AdamW at
    lr 1e-3; ``recipe`` defaults to ``STEP_RECIPE`` at lr (and min_lr) 1e-3."""
    if recipe is None:
        recipe = dict(STEP_RECIPE, lr=1e-3, min_lr=1e-3)
    trainer = DINO(backbone, dict(hidden_dim=32, bottleneck_dim=16, out_dim=20), recipe=recipe)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3))
    return trainer


def micro_dino(backbone):
    """``(dino_trainer(backbone), batch)``: a batch of 2 x 4 random views, 16 px global and
    8 px local (the convolutional micro families' DINO step)."""
    trainer = dino_trainer(backbone)
    rng = np.random.default_rng(0)
    batch = {"global": rng.normal(size=(2, 4, 16, 16, 3)).astype("float32"),
             "local": rng.normal(size=(2, 4, 8, 8, 3)).astype("float32")}
    return trainer, batch


def vit_dino():
    """The module-wide DINO trainer of the micro ViT (shared with tests/test_methods.py)."""
    if "dino" not in _SHARED:
        keras.utils.set_random_seed(1)
        _SHARED["dino"] = dino_trainer(ElasticViT(name="dino_student", **VIT_TRAIN))
    return _SHARED["dino"]


VIT = FamilyCase(
    name="vit", cls=ElasticViT, teacher="small_vit", images=_vit_images,
    # the whole grid: 25 specs, min width, min depth and the full network included
    specs=lambda teacher: teacher.subnets(),
    bad_spec=(ViTSubnet(40, 3), ValueError, r"width=40 .* valid widths: \[32, 48, 64, 80, 96\]"),
    micro=_vit_micro, micro_images=_vit_images,
    int8=(ViTSubnet(64, 2), 2 * 4),   # qkv, proj, fc1, fc2 of each of the 2 blocks
    bf16_spec=ViTSubnet(48, 3), drop_path_spec=ViTSubnet(48, 4), export_spec=ViTSubnet(48, 2),
    check_extracted=_vit_check_extracted,
    train=TrainCase(poa=lambda: (vit_poa(), vit_batch(), VIT_PLAN),
                    dino=lambda: (vit_dino(), vit_batch())),
)


# ----- Swin ------------------------------------------------------------------------------------
SWIN_TINY = dict(SWIN_CONFIGS["swin_elastic_test"])   # widths 16, 32; stage-3 depths 1..3


def _swin_images():
    # Height 20, width 28 (patch 2): stages of 10x14, 5x7, 3x4 and 2x2 tokens -- windows
    # padded everywhere, odd maps merged.
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 20, 28, 3)).astype("float32")


def _swin_specs(teacher):
    # On jax (a compilation per program): the narrow width at depth 2 (kept blocks 0 and 2: the
    # extracted stage 3 is unshifted, pattern [F, F]) and the full width at the smallest depth;
    # on the eager backends the whole grid (extremes (16, 1) and (32, 3) included).
    specs = [SwinSubnet(16, 2), SwinSubnet(32, 1)]
    if BACKEND != "jax":
        specs += [s for s in teacher.subnets() if s not in specs]
    return specs


def _swin_micro(**overrides):
    keras.utils.set_random_seed(0)
    return ElasticSwin(**dict(SWIN_TINY, depths=(1, 1, 1, 1), min_depth=1, named_subnets={},
                              **overrides))


def _swin_check_extracted(spec, sub):
    assert (sub.embed_dim, sub.depths) == (spec.width, (1, 2, spec.depth, 1))


def _swin_check_outputs(spec, out):
    assert [out[f"feature_maps/{i}"].shape for i in range(4)] == [
        (2, 10, 14, spec.width), (2, 5, 7, 2 * spec.width), (2, 3, 4, 4 * spec.width),
        (2, 2, 2, 8 * spec.width)]
    assert out["cls"].shape == (2, 8 * spec.width)
    np.testing.assert_array_equal(out["cls"], out["pooled"])
    np.testing.assert_allclose(out["cls"], out["feature_maps/3"].mean((1, 2)), atol=1e-5)


def _swin_check_keras_loaded(loaded):
    assert loaded.shifts[2] == [False, False]


def _swin_check_preset(directory, teacher, full):
    assert full.get_config()["depths"] == [1, 2, 3, 1]
    named = ElasticSwin.from_preset(directory, subnet="tiny")
    assert (named.embed_dim, named.depths) == (16, (1, 2, 1, 1))
    with pytest.raises(ValueError, match=r"width=20 .* valid widths: \[16, 32\]"):
        ElasticSwin.from_preset(directory, width=20)


TRAIN_SWIN = dict(image_size=16, patch_size=2, embed_dim=32, depths=(1, 1, 1, 1), head_dim=16,
                  window_size=2, min_width=16)   # 2 subnets: the sampler's only plan is (16, 1)
SWIN_RECIPE = dict(STEP_RECIPE, layer_decay=0.9, patch_embed_lr_mult=0.2)


def _swin_views():
    # Local views (8 px: 4, 2, 1, 1 tokens per side, all padded to the window) double the
    # step program; on jax and tensorflow, whose compilation of it dominates, the steps run
    # without them (the padded small maps are checked by the forward tests).
    rng = np.random.default_rng(0)
    views = {"global": rng.normal(size=(2, 4, 16, 16, 3)).astype("float32")}
    if BACKEND == "torch":
        views["local"] = rng.normal(size=(2, 4, 8, 8, 3)).astype("float32")
    return views


def _swin_poa():
    keras.utils.set_random_seed(0)
    backbone = ElasticSwin(name="student", **TRAIN_SWIN)
    trainer = poa_trainer(backbone, dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20, 30)),
                          dict(SWIN_RECIPE, koleo_weight=0.0, ibot_weight=0.0),
                          SwinSubnet(16, 1))
    return trainer, _swin_views(), SwinSubnet(16, 1)


def _swin_check_poa(trainer, logs):
    assert trainer.head.get_config()["in_dim"] == 256
    multipliers = dict(zip((v.path for v in trainer.trainable_variables),
                           trainer.lr_multipliers()))
    assert multipliers["student/patch_embed/proj/kernel"] == pytest.approx(0.9 ** 5 * 0.2)
    assert multipliers["student/stages_2_blocks_0/attn/qkv/dense/kernel"] == pytest.approx(
        0.9 ** 2)


def _swin_dino():
    keras.utils.set_random_seed(1)
    backbone = ElasticSwin(name="dino_student", **TRAIN_SWIN)
    trainer = DINO(backbone, dict(hidden_dim=32, bottleneck_dim=16, out_dim=20),
                   recipe=dict(SWIN_RECIPE, lr=1e-3, min_lr=1e-3, layer_decay=1.0,
                               patch_embed_lr_mult=1.0))
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3))
    return trainer, _swin_views()


SWIN = FamilyCase(
    name="swin", cls=ElasticSwin, teacher="tiny_swin", images=_swin_images, specs=_swin_specs,
    bad_spec=(SwinSubnet(24, 2), ValueError, r"width=24 .* valid widths: \[16, 32\]"),
    micro=_swin_micro,
    micro_images=lambda: np.random.default_rng(0).uniform(
        -1, 1, size=(2, 32, 32, 3)).astype("float32"),
    int8=(SwinSubnet(16, 1), 4 * 4 + 3),   # qkv, proj, fc1, fc2 per block; 3 merge reductions
    bf16_spec=SwinSubnet(16, 1), drop_path_spec=SwinSubnet(16, 1), export_spec=SwinSubnet(16, 1),
    call_options={"return_feature_maps": True},
    export_skip={"jax": "jax exports through jax2tf: minutes of compilation on a small CPU for "
                        "what the tensorflow run checks"},
    check_extracted=_swin_check_extracted, check_outputs=_swin_check_outputs,
    check_keras_loaded=_swin_check_keras_loaded, check_preset=_swin_check_preset,
    train=TrainCase(poa=_swin_poa, dino=_swin_dino, check_poa=_swin_check_poa,
                    no_masks=lambda: ElasticSwin(name="s2", **TRAIN_SWIN)),
)


# ----- ResNet ----------------------------------------------------------------------------------
RESNET_TINY = dict(RESNET_CONFIGS["resnet_elastic_test"])   # widths 8 / 12, depths (1, 1-2, 2-3, 1)


def _resnet_images():
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 33, 45, 3)).astype("float32")


def _resnet_specs(teacher):
    specs = teacher.subnets()
    assert len(specs) == 8 and specs[0] == ResNetSubnet(8, (1, 1, 2, 1))
    assert specs[-1] == teacher.full_subnet == ResNetSubnet(12, (1, 2, 3, 1))
    rng = np.random.default_rng(3)
    # the narrowest + shallowest, a random one and the full network
    return [specs[0], specs[int(rng.integers(1, len(specs) - 1))], specs[-1]]


def _resnet_micro(**overrides):
    keras.utils.set_random_seed(0)
    # two stages of 1 to 2 blocks (few layers)
    return ElasticResNet(**dict(RESNET_TINY, max_depths=(1, 2), min_depths=(1, 1),
                                strides=(1, 2), named_subnets={}, **overrides))


def _resnet_check_extracted(spec, sub):
    assert isinstance(sub, ElasticResNet) and sub.full_subnet == spec


def _resnet_check_outputs(spec, out):
    assert np.abs(out["cls"]).max() > 0.1   # not a degenerate all-zero output


def _resnet_check_preset(directory, teacher, full):
    import json

    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["class_name"] == "ElasticResNet" and metadata["num_subnets"] == 8
    spec = teacher.subnets()[0]
    named = ElasticResNet.from_preset(str(directory), subnet="small")
    assert named.full_subnet == spec
    assert full.full_subnet == teacher.full_subnet and full.named_subnets == teacher.named_subnets


# Compiling a train step of a ResNet is slow on JAX and TensorFlow: one stage of 1..2 blocks,
# widths 4 / 8, global views only. The POA sampler draws from 3 subnets.
MICRO_RESNET = dict(image_size=16, stem_channels=4, base_channels=4, widths=(4, 8),
                    max_depths=(2,), min_depths=(1,), strides=(1,), num_groups=4)
RESNET_PLAN = ResNetSubnet(4, (1,))
RESNET_RECIPE = dict(STEP_RECIPE, lr=1e-3, min_lr=1e-3, layer_decay=0.95,
                     patch_embed_lr_mult=1.0)


def _resnet_batch():
    return {"global": np.random.default_rng(0).normal(size=(2, 4, 16, 16, 3)).astype("float32")}


def _resnet_poa():
    keras.utils.set_random_seed(0)
    backbone = ElasticResNet(name="student", **MICRO_RESNET)
    trainer = poa_trainer(backbone, dict(hidden_dim=32, bottleneck_dim=16, out_dims=(20, 30)),
                          dict(RESNET_RECIPE, ibot_weight=0.0), RESNET_PLAN)
    return trainer, _resnet_batch(), RESNET_PLAN


def _resnet_check_poa(trainer, logs):
    assert (logs["width"], logs["depth_1"]) == (4.0, 1.0) and "depth_2" not in logs
    # layer decay from the backbone hook: the stem is layer 0 of 2 blocks
    multipliers = dict(zip([v.path for v in trainer.trainable_variables],
                           trainer.lr_multipliers()))
    stem = next(p for p in multipliers if "stem_conv" in p)
    assert multipliers[stem] == pytest.approx(0.95 ** 2)


def _resnet_dino():
    keras.utils.set_random_seed(1)
    backbone = ElasticResNet(name="dino_student", **MICRO_RESNET)
    return dino_trainer(backbone, dict(RESNET_RECIPE, layer_decay=1.0)), _resnet_batch()


RESNET = FamilyCase(
    name="resnet", cls=ElasticResNet, teacher="tiny_resnet", images=_resnet_images,
    specs=_resnet_specs,
    bad_spec=(ResNetSubnet(10, (1, 1, 2, 1)), ValueError, r"width=10 .* valid widths: \[8, 12\]"),
    micro=_resnet_micro, micro_images=_resnet_images,
    # the 1 x 1 convs (Dense layers): conv1 + conv3 of the 2 blocks and the 2 shortcuts; Keras
    # 3 has no int8 Conv2D, so the 3 x 3 convs and the stem stay float
    int8=(ResNetSubnet(12, (1, 1)), 2 * 2 + 2),
    bf16_spec=ResNetSubnet(8, (1, 1)), drop_path_spec=ResNetSubnet(8, (1, 2)),
    export_spec=ResNetSubnet(8, (1, 1)),
    call_options={"return_feature_maps": True},
    export_skip={"jax": "jax exports through jax2tf: a ResNet's SavedModel export from JAX is "
                        "tested by test_export.py (export_subnet, tf_saved_model)"},
    check_extracted=_resnet_check_extracted, check_outputs=_resnet_check_outputs,
    check_preset=_resnet_check_preset,
    train=TrainCase(poa=_resnet_poa, dino=_resnet_dino, dino_steps=2,
                    check_poa=_resnet_check_poa,
                    no_masks=lambda: ElasticResNet(name="r2", **MICRO_RESNET)),
)


# ----- a non-elastic family with BatchNorm -----------------------------------------------------
@keras.saving.register_keras_serializable(package="poa_keras_tests")
class TinyBNNet(NonElasticBackbone):
    """A minimal non-elastic family with BatchNorm: patchify conv (2 x 2, stride 2, no bias) ->
    BatchNorm -> ReLU -> residual MLP (Dense-ReLU-Dense, stochastic depth) -> global mean.
    Returns {"cls": (B, width), "pooled": (B, width)}."""

    family = "TinyBN"

    def __init__(self, image_size=16, in_channels=3, width=8, hidden=16, drop_path_rate=0.0,
                 drop_path_uniform=True, bn_momentum=0.9, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.in_channels = int(image_size), int(in_channels)
        self.width, self.hidden = int(width), int(hidden)
        self.drop_path_rate, self.drop_path_uniform = float(drop_path_rate), drop_path_uniform
        self.bn_momentum = float(bn_momentum)
        policy = self.dtype_policy
        self.stem = keras.layers.Conv2D(self.width, 2, strides=2, use_bias=False, dtype=policy,
                                        name="stem")
        self.norm = keras.layers.BatchNormalization(momentum=self.bn_momentum, epsilon=1e-5,
                                                    dtype=policy, name="norm")
        self.fc1 = keras.layers.Dense(self.hidden, dtype=policy, name="fc1")
        self.fc2 = keras.layers.Dense(self.width, dtype=policy, name="fc2")
        self.drop_path = StochasticDepth(self.drop_path_rate, dtype=policy, name="drop_path")
        self.build()

    def build(self, input_shape=None):
        self.stem.build((None, None, None, self.in_channels))
        self.norm.build((None, None, None, self.width))
        self.fc1.build((None, self.width))
        self.fc2.build((None, self.hidden))
        self.drop_path.build(None)
        self.built = True

    def feature_dim(self, subnet=None):
        self.resolve_subnet(subnet)
        return self.width

    def call(self, images, subnet=None, training=None, masks=None):
        if masks is not None:
            raise ValueError(f"{self.name} takes no masks")
        self.resolve_subnet(subnet)
        self._check_rank_and_channels(images)
        x = ops.relu(self.norm(self.stem(images), training=training))
        x = x + self.drop_path(self.fc2(ops.relu(self.fc1(x))), training=training)
        pooled = ops.mean(x, axis=(1, 2))
        return {"cls": pooled, "pooled": pooled}

    def get_config(self):
        config = super().get_config()
        config.update(image_size=self.image_size, in_channels=self.in_channels,
                      width=self.width, hidden=self.hidden, drop_path_rate=self.drop_path_rate,
                      drop_path_uniform=self.drop_path_uniform, bn_momentum=self.bn_momentum)
        return config


def _bn_micro(**overrides):
    keras.utils.set_random_seed(0)
    return TinyBNNet(**overrides)


def _bn_images():
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 16, 3)).astype("float32")


def tiny_bn_teacher():
    """Random weights of a moderate scale everywhere, BatchNorm statistics included (the
    variances positive), so that a copy that lost any of them shows."""
    model = _bn_micro(name="tiny_bn")
    randomize(model, seed=1)
    rng = np.random.default_rng(2)
    model.norm.moving_variance.assign(rng.uniform(0.5, 2.0, size=(model.width,)))
    return model


def _stem_statistics(kernel, views):
    """Per-channel mean and (biased) variance of the patchify conv over a (V, B, H, W, 3) batch,
    in numpy: what a training-mode BatchNorm normalises with."""
    x = views.reshape((-1,) + views.shape[2:]).astype(np.float64)
    b, h, w, c = x.shape
    patches = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    y = patches.reshape(b, h // 2, w // 2, 4 * c) @ kernel.reshape(4 * c, -1)
    return y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))


def _bn_check_dino(trainer, batch, before):
    """The student's BatchNorm ran in training mode on the global views, then on the local
    ones (two momentum updates of its moving statistics, numpy below); the teacher's are the
    EMA of the student's (the generic EMA check), so it normalises with them."""
    backbone = trainer.backbone
    start = dict(zip([v.path for v in backbone.weights], before))
    kernel = start[backbone.stem.kernel.path]
    mean = start[backbone.norm.moving_mean.path]
    var = start[backbone.norm.moving_variance.path]
    m = backbone.bn_momentum
    for views in (batch["global"], batch["local"]):
        batch_mean, batch_var = _stem_statistics(kernel, views)
        mean, var = m * mean + (1 - m) * batch_mean, m * var + (1 - m) * batch_var
    np.testing.assert_allclose(to_np(backbone.norm.moving_mean), mean, atol=1e-5)
    np.testing.assert_allclose(to_np(backbone.norm.moving_variance), var, atol=1e-5)
    trainable = {id(v) for v in trainer.trainable_variables}
    assert id(backbone.norm.moving_mean) not in trainable


def _bn_dino():
    keras.utils.set_random_seed(1)
    backbone = TinyBNNet(name="bn_student")
    return micro_dino(backbone)


TINY_BN = FamilyCase(
    name="tiny_bn (non-elastic)", cls=TinyBNNet, teacher="tiny_bn", images=_bn_images,
    specs=lambda teacher: teacher.subnets(),
    bad_spec=(ViTSubnet(8, 1), TypeError, r"expected an IntactSubnet"),
    micro=_bn_micro, micro_images=_bn_images,
    int8=(IntactSubnet(), 2),   # fc1 and fc2 (Keras 3 has no int8 Conv2D)
    bf16_spec=IntactSubnet(), drop_path_spec=IntactSubnet(), export_spec=IntactSubnet(),
    elastic=False, batch_norm=True,
    train=TrainCase(dino=_bn_dino, check_dino=_bn_check_dino),
)


# ----- the BatchNorm ResNet (non-elastic) ------------------------------------------------------
RESNET_BN_TINY = dict(RESNET_BN_CONFIGS["resnet_bn_test"])   # CIFAR stem, 2 BasicBlocks, 8 / 16


def _resnet_bn_images():
    # odd sizes: the stride-2 stage rounds up (17 x 23 -> 9 x 12)
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 17, 23, 3)).astype("float32")


def _resnet_bn_micro(**overrides):
    keras.utils.set_random_seed(0)
    return ResNet(**dict(RESNET_BN_TINY, **overrides))


def resnet_bn_teacher():
    """The tiny BatchNorm ResNet with random weights everywhere, BatchNorm statistics
    included (variances positive), so that a copy that lost any of them shows."""
    model = _resnet_bn_micro(name="tiny_resnet_bn")
    randomize(model, seed=1)
    randomize_bn_variances(model, seed=2)
    return model


def _resnet_bn_check_outputs(spec, out):
    assert [out[f"feature_maps/{i}"].shape for i in range(2)] == [(2, 17, 23, 8),
                                                                 (2, 9, 12, 16)]
    np.testing.assert_allclose(out["cls"], out["feature_maps/1"].mean((1, 2)), atol=1e-5)
    assert np.abs(out["cls"]).max() > 0.1   # not a degenerate all-zero output


def _resnet_bn_check_preset(directory, teacher, full):
    import json

    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["class_name"] == "ResNet" and metadata["num_subnets"] == 1
    assert full.get_config()["cifar_stem"] is True and full.block == "basic"


def _cifar_stem_statistics(kernel, views):
    """Per-channel mean and (biased) variance of the 3 x 3/1 stem conv (padding 1) over a
    (V, B, H, W, 3) batch, in numpy: what a training-mode BatchNorm normalises with."""
    x = views.reshape((-1,) + views.shape[2:]).astype(np.float64)
    b, h, w, _ = x.shape
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    y = sum(padded[:, i:i + h, j:j + w, :] @ kernel[i, j] for i in range(3) for j in range(3))
    return y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))


def _resnet_bn_check_dino(trainer, batch, before):
    """The student's stem BatchNorm ran in training mode on the global views, then on the
    local ones: two torch-style momentum updates (0.1 of the batch statistics) of its moving
    statistics, in numpy."""
    backbone = trainer.backbone
    start = dict(zip([v.path for v in backbone.weights], before))
    kernel = start[backbone.stem_conv.conv.kernel.path]
    mean = start[backbone.stem_norm.moving_mean.path]
    var = start[backbone.stem_norm.moving_variance.path]
    assert backbone.bn_momentum == 0.9
    for views in (batch["global"], batch["local"]):
        batch_mean, batch_var = _cifar_stem_statistics(kernel, views)
        mean, var = 0.9 * mean + 0.1 * batch_mean, 0.9 * var + 0.1 * batch_var
    np.testing.assert_allclose(to_np(backbone.stem_norm.moving_mean), mean, atol=1e-5)
    np.testing.assert_allclose(to_np(backbone.stem_norm.moving_variance), var, atol=1e-5)
    trainable = {id(v) for v in trainer.trainable_variables}
    assert id(backbone.stem_norm.moving_mean) not in trainable


def _resnet_bn_dino():
    keras.utils.set_random_seed(1)
    backbone = ResNet(name="resnet_bn_student", **dict(RESNET_BN_TINY, image_size=16))
    return micro_dino(backbone)


RESNET_BN = FamilyCase(
    name="resnet_bn (non-elastic)", cls=ResNet, teacher="tiny_resnet_bn",
    images=_resnet_bn_images, specs=lambda teacher: teacher.subnets(),
    bad_spec=(ResNetSubnet(8, (1, 1)), TypeError, r"expected an IntactSubnet"),
    micro=_resnet_bn_micro, micro_images=_resnet_bn_images,
    # the 1 x 1/2 shortcut conv of stage 2 (a Dense layer); Keras 3 has no int8 Conv2D
    int8=(IntactSubnet(), 1),
    bf16_spec=IntactSubnet(), drop_path_spec=IntactSubnet(), export_spec=IntactSubnet(),
    elastic=False, batch_norm=True, call_options={"return_feature_maps": True},
    check_outputs=_resnet_bn_check_outputs, check_preset=_resnet_bn_check_preset,
    train=TrainCase(dino=_resnet_bn_dino, check_dino=_resnet_bn_check_dino),
)


# ----- TinyViT (non-elastic) ---------------------------------------------------------------------
TINYVIT_TINY = dict(TINYVIT_CONFIGS["tinyvit_test"])   # dims 8..24, depths (1, 1, 2, 1)


def _tinyvit_images():
    # 27 x 41: stage maps 7 x 11, 4 x 6, 2 x 3, 1 x 2 (windows 3, 3, 2: padded everywhere)
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 27, 41, 3)).astype("float32")


# Two stages (an MBConv stage, one attention stage with windows of 2), for the deployment
# checks and the DINO step (compiling its programs is what costs on JAX): 16 px images give
# 4 x 4 then 2 x 2 maps; the DINO step's local views of 8 px 2 x 2 then 1 x 1 (padded).
MICRO_TINYVIT = dict(image_size=16, embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2),
                     window_sizes=(2, 2))


def _tinyvit_micro(**overrides):
    keras.utils.set_random_seed(0)
    return TinyViT(**dict(MICRO_TINYVIT, **overrides))


def tinyvit_teacher():
    """The tiny TinyViT with random weights everywhere (attention biases, the MBConv's
    zero-initialised BN scale, BN statistics with positive variances)."""
    keras.utils.set_random_seed(0)
    model = TinyViT(name="tiny_tinyvit", **TINYVIT_TINY)
    randomize(model, seed=1)
    randomize_bn_variances(model, seed=2)
    return model


def _tinyvit_check_outputs(spec, out):
    assert [out[f"feature_maps/{i}"].shape for i in range(4)] == [
        (2, 7, 11, 8), (2, 4, 6, 16), (2, 2, 3, 16), (2, 1, 2, 24)]
    assert out["cls"].shape == (2, 24)


def _tinyvit_check_preset(directory, teacher, full):
    import json

    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["class_name"] == "TinyViT" and metadata["num_subnets"] == 1
    assert full.get_config()["window_sizes"] == [3, 3, 3, 2]


def _tinyvit_dino():
    keras.utils.set_random_seed(1)
    backbone = TinyViT(name="tinyvit_student", **MICRO_TINYVIT)
    return micro_dino(backbone)


TINYVIT = FamilyCase(
    name="tinyvit (non-elastic)", cls=TinyViT, teacher="tiny_tinyvit",
    images=_tinyvit_images, specs=lambda teacher: teacher.subnets(),
    bad_spec=(ViTSubnet(8, 1), TypeError, r"expected an IntactSubnet"),
    micro=_tinyvit_micro,
    micro_images=lambda: np.random.default_rng(0).uniform(
        -1, 1, size=(2, 16, 16, 3)).astype("float32"),
    # the Dense layers: the MBConv's conv1 + conv3, the patch merging's conv1 + conv3, and qkv,
    # proj, fc1, fc2 of the attention block; the 3 x 3 and depthwise convs stay float
    int8=(IntactSubnet(), 2 + 2 + 4),
    bf16_spec=IntactSubnet(), drop_path_spec=IntactSubnet(), export_spec=IntactSubnet(),
    elastic=False, batch_norm=True, call_options={"return_feature_maps": True},
    export_skip={"jax": "jax exports through jax2tf: minutes of compilation on a small CPU for "
                        "what the tensorflow run checks"},
    check_outputs=_tinyvit_check_outputs, check_preset=_tinyvit_check_preset,
    train=TrainCase(dino=_tinyvit_dino),
)

CASES = [VIT, SWIN, RESNET, TINY_BN, RESNET_BN, TINYVIT]
