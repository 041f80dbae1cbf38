"""ElasticViT.subnet_flops against independent counts.

* every backend: a hand-written count from the layer shapes of the EXTRACTED model (its Dense
  and Conv2D kernels, LayerNorm gammas and attention widths), exact;
* every backend: the dense ops of the traced forward (jax: dot_general / conv in the jaxpr;
  tensorflow: MatMul / BatchMatMul / Einsum / Conv2D in the tf.function graph; torch:
  ``torch.utils.flop_counter``, which does not see the CPU attention kernel, so its count is
  compared with the total minus the two attention terms), exact;
* jax: XLA's ``cost_analysis()`` of the jitted extracted forward, which also counts element-wise
  ops (GELU's erf expansion, softmax, norms, biases): it must lie between the analytic count and
  15 % above it on the demo configuration.

Traced counts are taken per image as count(batch 2) - count(batch 1), which removes the
once-per-call work (the bicubic resize of the position embedding at another image size).
"""
import math

import keras
import numpy as np
import pytest

from poa_keras import ElasticViT
from poa_keras.elastic.layers import ElasticAttention
from poa_keras.elastic.spec import ViTSubnet

BACKEND = keras.backend.backend()
SIZES = [32, 16, (32, 16)]
XLA_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def teacher():
    keras.utils.set_random_seed(0)
    return ElasticViT.from_config_name("vit_elastic_test")


def _hw(size):
    return (size, size) if isinstance(size, int) else size


def layer_walk_flops(model, image_size, include_norms=False):
    """FLOPs (multiply-add = 2) of one image, from the shapes of the model's own layers."""
    height, width = _hw(image_size)
    convs = [l for l in model._flatten_layers() if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 1
    kh, kw, cin, cout = (int(s) for s in convs[0].kernel.shape)
    sh, sw = convs[0].strides
    patches = (height // sh) * (width // sw)
    tokens = patches + (1 if getattr(model, "cls_token", None) is not None else 0)
    flops = 2 * patches * kh * kw * cin * cout
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dense):
            fan_in, fan_out = (int(s) for s in layer.kernel.shape)
            flops += 2 * tokens * fan_in * fan_out
        elif isinstance(layer, ElasticAttention):
            # Q K^T and A V: per head N x N x head_dim multiply-adds each; heads * head_dim is
            # the width of each of the q, k, v groups of the fused projection.
            inner = int(layer.qkv.dense.kernel.shape[1]) // 3
            flops += 2 * 2 * tokens * tokens * inner
        elif isinstance(layer, keras.layers.LayerNormalization) and include_norms:
            flops += 7 * tokens * int(layer.gamma.shape[0])
    return flops


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("include_norms", [False, True])
def test_matches_layer_walk_of_extracted_subnets(teacher, size, include_norms):
    for spec in teacher.subnets():
        sub = teacher.extract(spec)
        expected = layer_walk_flops(sub, size, include_norms)
        assert teacher.subnet_flops(spec, size, include_norms=include_norms) == expected, spec
        # The extracted network counts itself the same way (its intact network).
        assert sub.subnet_flops(None, size, include_norms=include_norms) == expected


def test_intact_network(teacher):
    full = teacher.subnet_flops(None)
    assert full == teacher.subnet_flops(teacher.full_subnet)
    assert full == teacher.subnet_flops("large") == teacher.subnet_flops((64, 4))
    assert full == teacher.subnet_flops(None, teacher.image_size)
    assert full == layer_walk_flops(teacher, teacher.image_size)
    assert full == teacher.extract(None).subnet_flops()
    assert max(teacher.subnet_flops(s) for s in teacher.subnets()) == full


def test_breakdown_and_convention(teacher):
    parts = teacher.subnet_flops((32, 2), 32, breakdown=True)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert "norms" not in parts
    n, w, d = 1 + 16, 32, 2
    # one multiply-add = 2 FLOPs: the qkv projection is 2 * N * w * 3w per block
    assert parts["qkv"] == d * 2 * n * w * 3 * w
    assert parts["attn_scores"] == parts["attn_values"] == d * 2 * n * n * w
    assert parts["patch_embed"] == 2 * 16 * (8 * 8 * 3) * w
    with_norms = teacher.subnet_flops((32, 2), 32, include_norms=True, breakdown=True)
    assert with_norms["norms"] == 7 * n * w * (2 * d + 1)
    assert with_norms["total"] == parts["total"] + with_norms["norms"]
    # monotone on the grid: wider or deeper never costs less
    for spec in teacher.subnets():
        wider = ViTSubnet(min(spec.width + 16, 64), spec.depth)
        deeper = ViTSubnet(spec.width, min(spec.depth + 1, 4))
        assert teacher.subnet_flops(wider) >= teacher.subnet_flops(spec)
        assert teacher.subnet_flops(deeper) >= teacher.subnet_flops(spec)


def test_invalid_arguments(teacher):
    with pytest.raises(ValueError, match="patch size"):
        teacher.subnet_flops(None, 30)
    with pytest.raises(ValueError, match="patch size"):
        teacher.subnet_flops(None, (32, 0))
    with pytest.raises(ValueError, match="width=40"):
        teacher.subnet_flops((40, 2))


# ------------------------------------------------------------------- traced-graph counts
def _jax_dense_flops(sub, batch, size):
    import jax

    def count(jaxpr):
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                out = eqn.outvars[0].aval.shape
                total += 2 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                out = eqn.outvars[0].aval.shape
                out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
                total += 2 * math.prod(out) * math.prod(rhs) // out_features
            for param in eqn.params.values():  # pjit, custom_jvp, ...: nested jaxprs
                for sub_jaxpr in (param if isinstance(param, (list, tuple)) else [param]):
                    if hasattr(sub_jaxpr, "jaxpr") and hasattr(sub_jaxpr.jaxpr, "eqns"):
                        total += count(sub_jaxpr.jaxpr)
                    elif hasattr(sub_jaxpr, "eqns"):
                        total += count(sub_jaxpr)
        return total

    x = np.zeros((batch,) + _hw(size) + (3,), "float32")
    tv = [v.value for v in sub.trainable_variables]
    ntv = [v.value for v in sub.non_trainable_variables]
    closed = jax.make_jaxpr(lambda t, n, x: sub.stateless_call(t, n, x)[0]["cls"])(tv, ntv, x)
    return count(closed.jaxpr)


def _tf_dense_flops(sub, batch, size):
    import tensorflow as tf

    fn = tf.function(lambda x: sub(x)["cls"])
    graph = fn.get_concrete_function(
        tf.TensorSpec((batch,) + _hw(size) + (3,), tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        shapes = [tuple(t.shape.as_list()) for t in op.inputs]
        if op.type == "MatMul":
            (m, k), (k2, n) = shapes[0], shapes[1]
            if op.get_attr("transpose_a"):
                m, k = k, m
            if op.get_attr("transpose_b"):
                k2, n = n, k2
            total += 2 * m * k * n
        elif op.type in ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"):
            out = tuple(op.outputs[0].shape.as_list())
            a = shapes[0]
            k = a[-2] if op.get_attr("adj_x") else a[-1]
            total += 2 * math.prod(out) * k
        elif op.type == "Einsum":
            equation = op.get_attr("equation").decode()
            inputs = equation.split("->")[0].split(",")
            sizes = {}
            for labels, shape in zip(inputs, shapes):
                assert "." not in labels, equation
                sizes.update(zip(labels, shape))
            total += 2 * math.prod(sizes.values())
        elif op.type == "Conv2D":
            kernel = shapes[1]
            out = tuple(op.outputs[0].shape.as_list())
            total += 2 * math.prod(out) * math.prod(kernel[:3])
    return total


def _torch_dense_flops(sub, batch, size):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((batch,) + _hw(size) + (3,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sub(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("spec,size", [((32, 2), 32), ((48, 3), 16), ((64, 4), 32),
                                       ((64, 2), (32, 16))])
def test_traced_dense_ops(teacher, spec, size):
    sub = teacher.extract(spec)
    counter = {"jax": _jax_dense_flops, "tensorflow": _tf_dense_flops,
               "torch": _torch_dense_flops}.get(BACKEND)
    if counter is None:
        pytest.skip(f"no graph counter for {BACKEND}")
    per_image = counter(sub, 2, size) - counter(sub, 1, size)
    parts = teacher.subnet_flops(spec, size, breakdown=True)
    expected = parts["total"]
    if BACKEND == "torch":
        # torch's flop counter has no formula for the CPU attention kernel (it counts mm, bmm,
        # addmm and convolution only): compare without Q K^T and A V.
        expected -= parts["attn_scores"] + parts["attn_values"]
    assert per_image == expected, (per_image, parts)


@pytest.mark.skipif(BACKEND != "jax", reason="XLA cost analysis is a JAX tool here")
@pytest.mark.parametrize("spec,size", [(None, 32), ((96, 3), 32), ((80, 4), 64)])
def test_xla_cost_analysis(spec, size):
    import jax

    keras.utils.set_random_seed(0)
    demo = ElasticViT.from_config_name("vit_elastic_demo")
    sub = demo.extract(spec)
    tv = [v.value for v in sub.trainable_variables]
    ntv = [v.value for v in sub.non_trainable_variables]

    def xla_flops(batch):
        x = np.zeros((batch, size, size, 3), "float32")
        fn = jax.jit(lambda t, n, x: sub.stateless_call(t, n, x)[0]["cls"])
        analysis = fn.lower(tv, ntv, x).compile().cost_analysis()
        if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
            analysis = analysis[0]
        return float(analysis["flops"])

    per_image = xla_flops(2) - xla_flops(1)
    analytic = demo.subnet_flops(spec, size, include_norms=True)
    ratio = per_image / analytic
    assert 1.0 <= ratio <= 1.0 + XLA_TOLERANCE, (per_image, analytic, ratio)
