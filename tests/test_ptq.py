"""eval/ptq.py, quantization/cost.py, the quantized compiled forward and the 2-D (size x bits)
sweep: calibration against numpy min / max of the float activations, batch independence of a
calibrated quantized forward, 8/8 features close to the float ones (tiny ViT and ResNet with
weights of a realistic scale), elastic forward = extracted subnet when quantized, bytes and
BitOPs against hand counts, one compiled program for every bit pair, the PTQ k-NN and linear
probe, the quantized sweep (rows, float rows = the float sweep, Pareto / select by bytes,
files, the real Keras int8 columns) and bad input.

Cost on JAX: a handful of jitted programs of two tiny models (float, calibration, quantized)
plus the programs of two extracted subnets in the sweep."""
import csv
import warnings

import keras
import numpy as np
import pytest
from conftest import randomize, to_np

from poa_keras.backbones import from_config_name
from poa_keras.backbones.compiled import calibration_forward, compiled_forward
from poa_keras.data.synthetic import load_shapes
from poa_keras.eval import (calibrate, check_calibrated, ptq_features, ptq_knn_eval,
                            ptq_linear_probe, train_linear_classifier)
from poa_keras.eval.features import extract_features
from poa_keras.eval.knn import knn_classify
from poa_keras.eval.ptq import parse_bits, parse_bits_list
from poa_keras.eval.sweep import SweepResult, load_sweep, pareto, select, sweep
from poa_keras.quantization import QuantConfig, activation_quantizers, quantize
from poa_keras.quantization.cost import quant_cost

BACKEND = keras.backend.backend()
B = 4   # every forward of the fixtures' models runs batches of 4: one program shape each
pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see conftest.py


def _model(config, seed=1):
    keras.utils.set_random_seed(0)
    model = from_config_name(config)
    randomize(model, seed=seed)   # N(0, 0.2) weights: every channel and quantizer works
    return model


@pytest.fixture(scope="module")
def vit():
    return _model("vit_elastic_test")


@pytest.fixture(scope="module")
def resnet():
    return _model("resnet_elastic_test")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (12, 32, 32, 3)).astype("float32")


def _mid_spec(model):
    return model.subnets()[len(model.subnets()) // 2]


def _quantizer_inputs(model, images, subnet=None):
    """{quantizer path: every value it sees} in a float forward, captured independently of the
    observer: each quantizer's call is wrapped to keep its input (jitted on JAX, which returns
    them as outputs)."""
    quantizers = activation_quantizers(model)
    seen = {}
    for q in quantizers:
        def call(x, q=q, original=q.call):
            seen.setdefault(q.path, []).append(x)
            return original(x)
        q.call = call
    float_quant = QuantConfig(32, 32, ranges="batch")   # the quantizers run, at 32 bits: float

    def run(x):
        seen.clear()
        model(x, subnet=subnet, training=False, quant=float_quant)
        return dict(seen)

    try:
        if BACKEND == "jax":
            import jax
            out = jax.jit(run)(images)
        else:
            out = run(keras.ops.convert_to_tensor(images))
    finally:
        for q in quantizers:
            del q.call
    return {path: np.concatenate([to_np(v).ravel() for v in values])
            for path, values in out.items()}


def _close_up_to_ties(got, want, step, max_fraction=0.01):
    """Equal to float tolerance, except for at most ``max_fraction`` of the elements, which may
    differ by about one quantization step (a value exactly on a rounding tie can round either
    way when two forwards add the same numbers in another order)."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    off = diff > 1e-5 + 1e-5 * np.abs(want)
    assert off.mean() <= max_fraction, (off.mean(), diff.max())
    assert diff.max() <= 2 * step + 1e-5, diff.max()


# ----- calibration ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_calibrated_ranges_are_the_min_max_of_the_float_activations(family, request, images):
    model = request.getfixturevalue(family)
    spec = _mid_spec(model)
    calibration = calibrate(model, images, subnet=spec, num_images=8, batch_size=B)
    want = _quantizer_inputs(model, images[:8], subnet=spec)
    assert sorted(calibration.ranges) == sorted(want) and want   # exactly the ones that run
    by_path = {q.path: q for q in activation_quantizers(model)}
    for path, values in want.items():
        low, high = to_np(by_path[path].range)
        np.testing.assert_allclose([low, high], [values.min(), values.max()], rtol=1e-6,
                                   atol=1e-6, err_msg=path)
        assert calibration.ranges[path] == (pytest.approx(low), pytest.approx(high))
    for path, q in by_path.items():   # those the subnet does not run: uncalibrated
        if path not in want:
            np.testing.assert_array_equal(to_np(q.range), [0.0, 0.0])
    assert calibration.subnet == spec and calibration.num_images == 8
    assert calibration.constant == ()


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_a_calibrated_quantized_image_does_not_depend_on_its_batch(family, request, images):
    model = request.getfixturevalue(family)
    spec = _mid_spec(model)
    calibrate(model, images, subnet=spec, num_images=12, batch_size=B)
    forward = compiled_forward(model, spec, quantized=True)
    batch = to_np(forward(images[:B], 4, 4)["cls"])
    # each image alone: a batch of B copies of it (its own batch; one program shape)
    alone = np.stack([to_np(forward(np.repeat(images[i:i + 1], B, 0), 4, 4)["cls"])[0]
                      for i in range(B)])
    _close_up_to_ties(alone, batch, step=np.abs(batch).max() / 7)
    if family != "vit":
        return   # (one family shows it; another compiled program costs seconds)
    # what the calibration buys: with the batch's own ranges the output does depend on it
    batch_ranges = _jitted(lambda x: model(x, subnet=spec,
                                           quant=QuantConfig(4, 4, ranges="batch"))["cls"])
    mixed = to_np(batch_ranges(images[:B]))
    own = to_np(batch_ranges(np.repeat(images[:1], B, 0)))
    assert np.abs(mixed[0] - own[0]).max() > 1e-3


def _jitted(fn):
    """fn jitted on JAX (eager JAX compiles op by op: seconds per op shape), as is elsewhere."""
    if BACKEND == "jax":
        import jax
        return jax.jit(fn)
    return fn


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_8_bit_features_are_close_to_the_float_ones(family, request, images):
    model = request.getfixturevalue(family)
    spec = _mid_spec(model)
    calibrate(model, images, subnet=spec, num_images=12, batch_size=B)
    float_features = extract_features(model, images, subnet=spec, batch_size=B)
    q8 = ptq_features(model, images, "8/8", subnet=spec, batch_size=B)
    q4 = ptq_features(model, images, (4, 4), subnet=spec, batch_size=B)
    f32 = ptq_features(model, images, "32", subnet=spec, batch_size=B)
    cos8 = np.sum(q8 * float_features, axis=1)   # unit rows
    cos4 = np.sum(q4 * float_features, axis=1)
    assert cos8.min() >= 0.999, cos8
    assert cos4.mean() < cos8.mean()   # fewer bits, further from float
    np.testing.assert_allclose(f32, float_features, atol=1e-5)   # "32" is float


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_quantized_elastic_forward_equals_the_quantized_extracted_subnet(family, request,
                                                                         images):
    model = request.getfixturevalue(family)
    spec = _mid_spec(model)
    extracted = model.extract(spec)
    with pytest.raises(ValueError, match="not calibrated"):   # extraction: fresh ranges
        ptq_features(extracted, images, "4/4")
    calibrate(model, images, subnet=spec, num_images=8, batch_size=B)
    calibrate(extracted, images, num_images=8, batch_size=B)
    # the same quantizers in the same order (block names are renumbered by the extraction)
    teacher_ranges = [to_np(_quantizer(model, p).range)
                      for p in quant_cost(model, spec).activation_quantizers]
    extracted_ranges = [to_np(_quantizer(extracted, p).range)
                        for p in quant_cost(extracted).activation_quantizers]
    np.testing.assert_allclose(teacher_ranges, extracted_ranges, rtol=1e-5, atol=1e-6)
    for bits in ("8/8", "4/4", "2/4"):
        elastic = ptq_features(model, images, bits, subnet=spec, normalize=False, batch_size=B)
        sub = ptq_features(extracted, images, bits, normalize=False, batch_size=B)
        _close_up_to_ties(sub, elastic, step=np.abs(elastic).max() / 7)


def _quantizer(model, path):
    (q,) = [q for q in activation_quantizers(model) if q.path == path]
    return q


def test_one_compiled_program_serves_every_bit_pair(vit, images):
    spec = _mid_spec(vit)
    calibrate(vit, images, subnet=spec, num_images=8, batch_size=B)
    forward = vit.compiled_forward(spec, quantized=True)   # through the Backbone method too
    assert forward is compiled_forward(vit, spec, quantized=True)
    assert forward is not vit.compiled_forward(spec)        # the float path is its own
    before = forward.traces()
    outs = {(8, 8): to_np(forward(images[:B], 8, 8)["cls"])}
    first = forward.traces()
    outs.update({bits: to_np(forward(images[:B], *bits)["cls"])
                 for bits in ((4, 4), (2, 4), (5, 5), (32, 32))})
    assert forward.traces() == first   # no new program for another pair
    if BACKEND in ("jax", "tensorflow"):
        assert first - before <= 1 and first >= 1   # (traced here, or by an earlier test)
    else:
        assert first == 0   # eager
    assert np.abs(outs[(4, 4)] - outs[(8, 8)]).max() > 1e-4   # the bits are not ignored
    np.testing.assert_allclose(outs[(32, 32)],
                               to_np(vit.compiled_forward(spec)(images[:B])["cls"]), atol=1e-5)
    observe = calibration_forward(vit, spec)
    assert observe is calibration_forward(vit, spec)
    traced = observe.traces()
    calibrate(vit, images, subnet=spec, num_images=8, batch_size=B)
    assert observe.traces() == traced


def test_a_constant_calibration_tensor_warns_and_stays_float(vit):
    extracted = vit.extract("small")
    zeros = np.zeros((4, 32, 32, 3), np.float32)   # the patch embedding's input is constant
    with pytest.warns(UserWarning, match=r"constant tensor.*patch_embed/input_quantizer"):
        calibration = calibrate(extracted, zeros, num_images=4)
    assert any("patch_embed" in p for p in calibration.constant)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # warned once, at calibration
        features = ptq_features(extracted, zeros, "4/4", normalize=False)
    assert np.isfinite(features).all()


# ----- bytes and BitOPs ------------------------------------------------------------------------

def test_bytes_and_bitops_of_a_tiny_vit_by_hand(vit):
    cost = quant_cost(vit.extract("small"))   # width 32, depth 2, 16 patches + CLS
    patch = 8 * 8 * 3 * 32                      # the patch embedding: fixed 8 bits
    block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32   # qkv, proj, fc1, fc2: the scope's bits
    quantized = patch + 2 * block
    other = (32 + 17 * 32 + 32 + 32                      # cls, pos, mask token, patch bias
             + 2 * (2 * 32 + 96 + 32 + 2 * 32 + 128 + 32 + 2 * 32)   # norms, biases, ls
             + 2 * 32)                                   # final norm
    assert cost.params == quantized + other == 32384
    assert cost.quantized_params == quantized and cost.float_params == other
    assert cost.bytes(32, 32) == 4 * cost.params
    assert cost.bytes(8, 8) == quantized + 4 * other
    assert cost.bytes(4, 4) == patch + 2 * block * 4 // 8 + 4 * other
    assert cost.bytes(2, 4) == patch + 2 * block * 2 // 8 + 4 * other
    macs_patch, macs_blocks = 16 * patch, 2 * 17 * block
    assert cost.macs == macs_patch + macs_blocks
    assert cost.bitops(4, 4) == macs_patch * 8 * 8 + macs_blocks * 4 * 4
    assert cost.bitops(2, 4) == macs_patch * 8 * 8 + macs_blocks * 2 * 4
    assert cost.bitops(32, 32) == (macs_patch + macs_blocks) * 32 * 32
    assert len(cost.activation_quantizers) == 1 + 2 * 4
    # the elastic teacher's subnet counts the same
    teacher_cost = quant_cost(vit, "small")
    assert (teacher_cost.params, teacher_cost.bytes(4, 4), teacher_cost.bitops(4, 4)) == \
        (cost.params, cost.bytes(4, 4), cost.bitops(4, 4))


def test_resnet_and_swin_macs(resnet):
    spec = _mid_spec(resnet)
    cost = quant_cost(resnet, spec)
    # every multiply-add of this ResNet is in a (quantized) convolution
    assert 2 * cost.macs == resnet.subnet_flops(spec, image_size=(32, 32))
    stem = cost.layers[0]
    assert stem.weight_policy == 8 and stem.macs == 16 * 16 * 7 * 7 * 3 * 8
    assert stem.bits(2, 4) == (8, 8) and stem.bits(32, 32) == (32, 32)
    swin = from_config_name("swin_elastic_test")
    swin_cost = quant_cost(swin, swin.subnets()[0])
    (qkv,) = [layer for layer in swin_cost.layers
              if layer.name.endswith("stages_0_blocks_0/attn/qkv")]
    # windows are folded into the batch axis: every one of the 16 x 16 tokens counts
    assert qkv.macs == 16 * 16 * 16 * 48


# ----- PTQ k-NN and linear probe ----------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    train, val, _ = load_shapes(num_train=40, num_val=20, image_size=32, seed=1)
    return train, val


def test_ptq_knn_and_linear_probe_on_quantized_features(vit, data, monkeypatch):
    (xt, yt), (xv, yv) = data
    result = ptq_knn_eval(vit, xt, yt, xv, yv, bits=["32", "4/4"], subnet="small", ks=(5,),
                          num_calibration_images=20, batch_size=20, num_classes=10)
    assert sorted(result) == ["32", "4/4"]
    spec = vit.resolve_subnet("small")
    bank = ptq_features(vit, xt, "4/4", subnet=spec, batch_size=20)   # calibrated above
    queries = ptq_features(vit, xv, "4/4", subnet=spec, batch_size=20)
    want = knn_classify(bank, yt, queries, yv, 10, ks=(5,))
    assert result["4/4"][5]["top1"] == want[5]["top1"]
    # the probe trains eval.linear's classifier grid on the quantized (unnormalised) features
    from poa_keras.eval import ptq as ptq_module
    seen = []

    def recording_trainer(train, train_y, val, val_y, num_classes, **kwargs):
        seen.append((train, val))
        return train_linear_classifier(train, train_y, val, val_y, num_classes, **kwargs)

    monkeypatch.setattr(ptq_module, "train_linear_classifier", recording_trainer)
    probe = ptq_linear_probe(vit, xt, yt, xv, yv, bits="4/4", subnet=spec, num_classes=10,
                             learning_rates=(0.1,), epochs=1, batch_size=20,
                             num_calibration_images=20, feature_batch_size=20)
    ((train, val),) = seen
    np.testing.assert_array_equal(
        train, ptq_features(vit, xt, "4/4", subnet=spec, normalize=False, batch_size=20))
    np.testing.assert_array_equal(
        val, ptq_features(vit, xv, "4/4", subnet=spec, normalize=False, batch_size=20))
    assert probe["4/4"]["bits"] == "4/4" and probe["4/4"]["feature_dim"] == 32
    assert 0 <= probe["4/4"]["top1"] <= 1


# ----- the quantized sweep ------------------------------------------------------------------------

PAIRS = ["32", "8/8", "4/4", "2/4"]


@pytest.fixture(scope="module")
def swept(vit, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq_sweep")
    result = sweep(vit, *data, subnets=["small", "large"], bits=PAIRS, ks=(5,), batch_size=20,
                   progress=False, num_calibration_images=20, output_dir=out,
                   latency_runs=1, latency_warmup=1, latency_batch=2)
    return result, out


def test_quantized_sweep_rows_are_subnets_times_pairs(swept, vit, data):
    result, _ = swept
    assert len(result.rows) == 2 * len(PAIRS) and len(result.specs) == len(result.rows)
    assert [r["bits"] for r in result.rows] == PAIRS * 2
    assert [(r["width"], r["depth"]) for r in result.rows] == [(32, 2)] * 4 + [(64, 4)] * 4
    assert result.metadata["bits"] == PAIRS and result.metadata["num_calibration_images"] == 20
    float_sweep = sweep(vit, *data, subnets=["small", "large"], ks=(5,), batch_size=20,
                        progress=False, measure_latency=False)
    for row in result.rows:
        spec = vit.resolve_subnet((row["width"], row["depth"]))
        (plain,) = [r for r in float_sweep.rows
                    if (r["width"], r["depth"]) == (spec.width, spec.depth)]
        cost = quant_cost(vit, spec)
        w, a = parse_bits(row["bits"])
        assert (row["weight_bits"], row["activation_bits"]) == (w, a)
        assert row["params"] == plain["params"] and row["flops"] == plain["flops"]
        assert row["bytes"] == cost.bytes(w, a) and row["bitops"] == cost.bitops(w, a)
        if row["bits"] == "32":
            assert row["top1"] == plain["top1"] and row["top5"] == plain["top5"]
            assert row["latency_ms"] > 0 and row["bytes"] == 4 * row["params"]
        else:
            assert row["latency_ms"] is None
        if row["bits"] == "8/8":   # the real Keras int8 model
            assert 0 <= row["int8_top1"] <= 1
            assert row["int8_layers"] == f"Dense:{4 * spec.depth}"
            assert row["float_layers"] == "Conv2D:1"   # the patch embedding: no int8 conv
        else:
            assert row["int8_top1"] is None and row["int8_layers"] is None


def test_quantized_sweep_pareto_select_and_files(swept):
    result, out = swept
    front = result.pareto(x="bytes")
    assert front and front == pareto(result.rows, x="bytes")
    for r in result.rows:   # nothing beats a front row on bytes and top-1 at once
        assert not any(o["bytes"] <= r["bytes"] and o["top1"] > r["top1"] for o in front
                       if r in front)
    small = min(r["bytes"] for r in result.rows)
    choice = result.select(bytes=small)
    assert choice.row["bytes"] == small and choice.bits == (2, 4)
    assert choice.spec == result.specs[result.rows.index(choice.row)]
    assert select(result, budget_bytes=small).row is choice.row
    budget = 40000   # the small subnet below 8/8, the large one never
    best = result.select(budget_bytes=budget)
    fits = [r for r in result.rows if r["bytes"] <= budget]
    assert best.row["top1"] == max(r["top1"] for r in fits)
    with pytest.raises(ValueError, match="no subnet fits the budget bytes <= 1"):
        result.select(bytes=1)
    with pytest.raises(ValueError, match="same budget"):
        result.select(bytes=1000, budget_bytes=2000)
    float_only = SweepResult([{"width": 1, "params": 5, "top1": 0.5}])
    with pytest.raises(ValueError, match="'bytes' is not a column"):
        float_only.select(bytes=10)
    # files: CSV / JSON round trips keep the bit columns; the plot is a PNG
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["bits"] for r in rows] == PAIRS * 2
    back = load_sweep(out)
    assert back.rows == result.rows and back.specs == result.specs
    assert load_sweep(out / "sweep.csv").select(bytes=small).bits == (2, 4)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bits" in result.format_table() and "size (MB)" in result.format_table()
    assert "int8 top-1 %" in result.format_table()
    assert repr(result).startswith("SweepResult(8 rows: 2 subnets x 4 bit pairs")


def test_a_sweep_without_the_float_pair_times_nothing(vit, data):
    result = sweep(vit, *data, subnets=["small"], bits="4/4, 8/8", ks=(5,), batch_size=20,
                   progress=False, num_calibration_images=20, int8=False)
    assert [r["bits"] for r in result.rows] == ["4/4", "8/8"]
    assert all(r["latency_ms"] is None and r["int8_top1"] is None for r in result.rows)


# ----- bad input ---------------------------------------------------------------------------------

def test_bad_bit_pairs_name_the_valid_values():
    assert parse_bits("4/4") == (4, 4) and parse_bits("32") == (32, 32)
    assert parse_bits((2, 4)) == (2, 4) and parse_bits(QuantConfig(5, 5)) == (5, 5)
    assert parse_bits_list("32,8/8,4/4") == [(32, 32), (8, 8), (4, 4)]
    assert parse_bits_list((4, 4)) == [(4, 4)] and parse_bits_list(["4/4", "4/4"]) == [(4, 4)]
    for bad, message in [("4/x", "malformed bit-width pair '4/x'"),
                         ("4-4", "malformed bit-width pair '4-4'"),
                         ("9/9", r"weight bit-width in '9/9' 9 is not supported; valid: 2..8"),
                         ("4/1", r"activation bit-width in '4/1' 1 is not supported"),
                         ((4, 33), "is not supported"), (4, "malformed"),
                         ([4, 4, 4], "not understood"), (None, "not understood")]:
        with pytest.raises(ValueError, match=message):
            parse_bits(bad)
    with pytest.raises(ValueError, match="empty entry"):
        parse_bits_list("32,,4/4")
    with pytest.raises(ValueError, match="bits is empty"):
        parse_bits_list([])


def test_bad_calibration_input(vit, images):
    extracted = vit.extract("small")
    with pytest.raises(ValueError, match="no images given"):
        calibrate(extracted, None)
    with pytest.raises(ValueError, match=r"shape \(num_images, height, width, 3\), got shape "
                                         r"\(12, 32, 32\)"):
        calibrate(extracted, images[..., 0], num_images=4)
    with pytest.raises(ValueError, match=r"got shape \(12, 32, 32, 4\)"):
        calibrate(extracted, np.concatenate([images, images[..., :1]], -1), num_images=4)
    with pytest.raises(ValueError, match="12 images, fewer than the 100 asked for"):
        calibrate(extracted, images)
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        calibrate(extracted, images, num_images=0)
    with pytest.raises(ValueError, match=r"non-finite activations \(NaN or inf\) on the "
                                         r"calibration images at \d quantizer\(s\): .*qkv"):
        calibrate(extracted, np.full((4, 32, 32, 3), np.nan, np.float32), num_images=4)
    calibrate(vit, images, subnet="small", num_images=4)
    with pytest.raises(ValueError, match=r"calibrated for subnet ViTSubnet\(width=32, depth=2\), "
                                         r"not ViTSubnet\(width=64, depth=4\)"):
        ptq_features(vit, images, "4/4", subnet="large")
    with pytest.raises(ValueError, match=r"not calibrated: .*qkv/input_quantizer"):
        check_calibrated(extracted)
    with pytest.raises(ValueError, match="malformed"):
        sweep(vit, (images, np.zeros(12, int)), (images, np.zeros(12, int)), bits=["4/x"])
    with pytest.raises(ValueError, match="num_calibration_images=100 but train_data holds 12"):
        sweep(vit, (images, np.zeros(12, int)), (images, np.zeros(12, int)), bits=["4/4"])


def test_an_int8_model_is_refused(vit, images):
    extracted = vit.extract("small")
    quantize(extracted, "int8")
    for call in (lambda: calibrate(extracted, images, num_images=4),
                 lambda: ptq_features(extracted, images, "8/8"),
                 lambda: ptq_knn_eval(extracted, images, np.zeros(12, int), images,
                                      np.zeros(12, int), bits="8/8")):
        with pytest.raises(ValueError, match="already quantized \\(int8\\).*needs the float"):
            call()
