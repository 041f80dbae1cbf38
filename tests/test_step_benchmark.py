"""benchmarks/step.py's pure helpers: the estimator, its statistics, the FLOPs convention and
the summary (no model is built; the script's flags are defined only when it runs as a script)."""
import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "step.py"
_SPEC = importlib.util.spec_from_file_location("step_benchmark", _PATH)
step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(step)


def test_importing_defines_no_flag():
    from absl import flags
    assert "rounds" not in flags.FLAGS and "plans" not in flags.FLAGS


def test_quantile_and_spread_interpolate_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert step.quantile(xs, 0.5) == pytest.approx(2.5)
    assert step.quantile(xs, 0.25) == pytest.approx(1.75)
    assert step.quantile(xs, 0.75) == pytest.approx(3.25)
    st = step.spread(xs + [100.0])
    assert st["median"] == 3.0 and st["min"] == 1.0 and st["max"] == 100.0 and st["n"] == 5
    assert st["q1"] == 2.0 and st["q3"] == 4.0 and st["iqr"] == 2.0
    assert step.spread([0.5]) == {"median": 0.5, "q1": 0.5, "q3": 0.5, "iqr": 0.0,
                                  "min": 0.5, "max": 0.5, "n": 1}
    with pytest.raises(ValueError):
        step.spread([])


def test_per_round_expectation_weights_each_round_by_the_sampler():
    probs = {"a": 0.25, "b": 0.75}
    per_round, mass = step.per_round_expectation({"a": [1.0, 2.0], "b": [3.0, 5.0]}, probs)
    assert per_round == pytest.approx([2.5, 4.25]) and mass == 1.0
    # Only some subnets timed: renormalised over their mass.
    per_round, mass = step.per_round_expectation({"b": [3.0, 5.0]}, probs)
    assert per_round == pytest.approx([3.0, 5.0]) and mass == 0.75
    with pytest.raises(ValueError):
        step.per_round_expectation({"a": [1.0], "b": [1.0, 2.0]}, probs)
    with pytest.raises(ValueError):
        step.per_round_expectation({"c": [1.0]}, probs)


def test_estimate_target_and_ratios():
    probs = {"a": 0.5, "b": 0.5}
    ratios = {"a": 0.2, "b": 0.4}                   # E[r] = 0.3: bound = 1.1 x DINO x 1.3
    dino = [1.0, 1.0, 2.0]
    poa = {"a": [1.0, 1.2, 3.0], "b": [1.6, 1.2, 3.0]}  # E_k = 1.3, 1.2, 3.0
    e = step.estimate(dino, poa, probs, ratios, 1.1)
    assert e["expected_flops_ratio"] == pytest.approx(0.3)
    assert e["poa"]["median"] == pytest.approx(1.3)
    assert e["poa"]["min"] == pytest.approx(1.2) and e["poa"]["max"] == pytest.approx(3.0)
    assert e["dino"]["median"] == 1.0
    assert e["bound_s"] == pytest.approx(1.43) and e["holds"] and e["complete"]
    assert e["poa_over_dino"] == pytest.approx(1.3)
    assert e["poa_over_dino_rounds"]["median"] == pytest.approx(1.3)   # 1.3, 1.2, 1.5
    assert e["poa_from_medians_s"] == pytest.approx(0.5 * 1.2 + 0.5 * 1.6)
    slow = step.estimate(dino, {"a": [2.0] * 3, "b": [2.0] * 3}, probs, ratios, 1.1)
    assert not slow["holds"]
    partial = step.estimate(dino, {"a": poa["a"]}, probs, ratios, 1.1)
    assert not partial["complete"] and partial["mass"] == 0.5
    with pytest.raises(ValueError):
        step.estimate([1.0], poa, probs, ratios, 1.1)


def test_step_flops_convention():
    # A fake backbone: intact = 10 FLOPs per pixel row, a subnet = its value per pixel row.
    def backbone(spec, px):
        return px * (10 if spec is None else spec)

    def heads(spec):
        return 100 if spec is None else 7

    dino = step.step_flops(backbone, heads, batch=2, size=8, local_crops=3)
    # teacher: 2 x 2 crops x 80, x1; student: (4 x 80 + 6 x 40) x 3
    assert dino["backbone"] == 4 * 80 + 3 * (4 * 80 + 6 * 40)
    assert dino["heads"] == 4 * 100 + 3 * 10 * 100
    assert dino["total"] == dino["backbone"] + dino["heads"]
    poa = step.step_flops(backbone, heads, batch=2, size=8, local_crops=3, elastic=5)
    assert poa["backbone"] == dino["backbone"] + 3 * (4 * 40 + 6 * 20)
    assert poa["heads"] == dino["heads"] + 3 * 10 * 7
    no_locals = step.step_flops(backbone, heads, batch=1, size=8, local_crops=0)
    assert no_locals["backbone"] == 2 * 80 + 3 * 2 * 80
    assert step.flops_ratio(backbone, 5, 8, 3) == pytest.approx(0.5)


def test_head_forward_flops():
    assert step.head_forward_flops(96, 512, 128, 1024) == \
        2 * (96 * 512 + 512 * 512 + 512 * 128 + 128 * 1024)
    assert step.head_forward_flops(4, 8, 2, 3, num_layers=2) == 2 * (4 * 8 + 8 * 2 + 2 * 3)


def test_parse_overrides():
    assert step.parse_overrides("image_size=64, min_width=192,min_depth=6") == {
        "image_size": 64, "min_width": 192, "min_depth": 6}
    assert step.parse_overrides("") == {}
    assert step.parse_overrides("layer_scale_init=0.1,name=x") == {
        "layer_scale_init": 0.1, "name": "x"}
    with pytest.raises(ValueError):
        step.parse_overrides("image_size")


def _stats(median):
    return step.spread([median * 0.9, median, median * 1.1])


def _records(holds=True, with_reference=True):
    backend = "jax"
    out = [{"record": "setup", "backend": backend, "config": "vit_elastic_test",
            "overrides": "", "batch": 4, "crops": "2x32px + 4x16px", "widths": 3, "depths": 3,
            "grid_subnets": 8, "timed_subnets": 8, "expected_flops_ratio": 0.3, "rounds": 3,
            "order": "shuffled", "threads_ours": "XLA default (2 cores)",
            "threads_reference": 2, "reference_device": "cpu"},
           {"record": "peak", "backend": backend, "n": 1024, "ours_gflops": 50.0,
            "reference_gflops": 40.0, "reference_threads": 2}]
    impls = ("ours", "reference") if with_reference else ("ours",)
    for impl, scale in zip(impls, (1.0, 2.0)):
        out.append({"record": "variant", "backend": backend, "impl": impl, "variant": "dino",
                    "plan": None, "p": None, "flops_ratio": None, "gflop_step": 1.0,
                    "first_step_s": 9.0, "stats": _stats(0.5 * scale), "gflops_per_s": 2.0,
                    "peak_fraction": 0.04})
        out.append({"record": "variant", "backend": backend, "impl": impl, "variant": "poa",
                    "plan": [32, 2], "p": 1.0, "flops_ratio": 0.3, "gflop_step": 1.3,
                    "first_step_s": 20.0, "stats": _stats(0.6 * scale), "gflops_per_s": 2.1,
                    "peak_fraction": None})
        out.append({"record": "estimate", "backend": backend, "impl": impl, "complete": True,
                    "mass": 1.0, "expected_flops_ratio": 0.3, "dino": _stats(0.5 * scale),
                    "poa": _stats(0.6 * scale), "poa_from_medians_s": 0.6 * scale,
                    "poa_over_dino": 1.2, "poa_over_dino_rounds": _stats(1.2),
                    "bound_s": 0.715 * scale, "holds": holds, "dino_gflop": 1.0,
                    "poa_gflop": 1.3, "dino_gflops_per_s": 2.0, "poa_gflops_per_s": 2.1,
                    "dino_peak_fraction": 0.04, "poa_peak_fraction": 0.042})
    if with_reference:
        out.append({"record": "versus", "backend": backend, "dino": 0.5, "poa": 0.5,
                    "dino_rounds": _stats(0.5), "poa_rounds": _stats(0.5)})
    out.append({"record": "compile", "backend": backend, "runtime_depth": True, "widths": 3,
                "depths": 3, "timed_subnets": 8, "programs_if_per_subnet": 8,
                "programs_if_per_width": 3, "expected_poa_programs": 3, "dino_programs": 1,
                "poa_programs": 3, "dino_compile_s": 8.5,
                "programs": [{"program": "ViTSubnet(width=32, depth=4)",
                              "compiled_by": [32, 2], "compile_s": 19.4}],
                "compile_total_s": 27.9, "first_steps_total_s": 29.0,
                "no_new_compilation": True, "ok": True})
    out.append({"record": "backend_done", "backend": backend, "rc": 0, "wall_s": 60.0})
    return out


def test_format_summary_reports_the_target_ratios_and_compilation():
    text = step.format_summary(_records(), 1.1)
    assert "TARGET (jax): HOLDS" in text
    assert "ours/ref" in text and "0.500" in text               # 0.5 / 1.0 per variant
    assert "E[POA] 0.600 [0.570, 0.630]" in text                # the spread of the rounds
    assert "one program per width would be 3, one per (width, depth) 8" in text
    assert "(width=32, depth=4) (first needed by 32x2): 19.4 s" in text
    assert "no new compilation: OK" in text
    failing = step.format_summary(_records(holds=False), 1.1)
    assert "TARGET (jax): DOES NOT HOLD" in failing and "FAILS" in failing
    alone = step.format_summary(_records(with_reference=False), 1.1)
    assert "ours / reference" not in alone and "TARGET (jax): HOLDS" in alone
    broken = step.format_summary(_records()[:-1] + [
        {"record": "backend_done", "backend": "jax", "rc": 1, "wall_s": 1.0}], 1.1)
    assert "FAILED (rc=1)" in broken
