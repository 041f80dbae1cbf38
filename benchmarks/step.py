"""Training-step throughput of DINO and POA on every backend, measured in one run.

    python benchmarks/step.py [--backends=jax,tensorflow,torch --batch=32 --steps=4 --plans=2
                               --plan_choice=sampler --check_config=vit_elastic_test]

The parent launches one subprocess per backend (KERAS_BACKEND set, one after the other, never
two at once); each prints JSON lines on stdout, and the parent prints a summary table, the
cross-backend ratios and whether the POA target holds.

Setup (``--config=vit_elastic_demo``): 2 global crops of the configuration's image size (64 px)
and ``--local_crops`` local crops of half that size (32 px), random images, AdamW. DINO trains
the intact network with one DINOHead (``--prototypes`` prototypes); POA with a
MultiProjectionHead of ``--poa_heads`` heads of ``--prototypes`` prototypes each (hidden
``--hidden``, bottleneck ``--bottleneck``, 3 layers). Both use the same schedules (no
last-layer freeze, so DINO runs one plan; layer decay and the patch-embed lr multiplier off, so
both do the same optimizer work), their own defaults otherwise.

Timing: the first ``--warmup`` steps of every program (DINO's one plan, each POA plan) run
before timing and include compilation (its time is reported apart, as ``compile_s``); then
``--steps`` rounds, each running one DINO step and one POA step per measured plan (interleaved,
so that load from other processes hits every variant alike). Step time = ``--statistic``
(default min; the median is reported beside it) over the rounds of ``train_on_batch`` (its logs
come back as numbers, so the step has finished); images/s = batch / step time. The minimum is
the default because the machine this was written on is shared: other processes' load only ever
adds time, and it came and went within a run, moving medians of a few rounds by 2x.

POA plans: the sampler draws one elastic subnet per step, one compiled program each (jax,
tensorflow), and compiling a POA step of the demo configuration takes tens of seconds on a
small CPU, so ``--plans=K`` times only K plans: the first K distinct plans a sampler seeded
with ``--plan_seed`` draws, or with ``--plan_choice=spread`` the plans of smallest and largest
FLOPs ratio and K - 2 evenly spaced between (``--plans=all``: every plan of the grid). Every
measured plan is reported with its analytic FLOPs ratio r = (backbone FLOPs of the subnet over
every crop of a step) / (the same for the intact network), from ``ElasticViT.subnet_flops``.

Estimate of POA's expected step time under the sampler: with every plan measured, the exact
expectation sum_p P(p) t(p). Otherwise a least-squares line t = a + b r through the measured
plans (r = their FLOPs ratio), evaluated at E[r] (exact for a linear cost model, since the
expectation of a line is the line at the expectation); with a single plan (or plans of one
ratio), b is taken as DINO's time per unit of FLOPs (t = t(p) + t_dino (E[r] - r(p))). The
plan-weighted mean of the measured plans (their P renormalised) is printed beside it.

Target (jax): E[POA step time] <= 1.1 x DINO step time x (1 + E[r]).

Compilation check: on the timed run, the compile count after the warmup must not move during
the timed rounds. On ``--check_config`` with ``--check_overrides`` (small: by default
vit_elastic_test cut to a 2 x 2 grid, 3 plans; ``--check_overrides=`` for its whole 3 x 3 grid,
8 plans, about 8 minutes on jax on a loaded 2-core CPU), POA draws its plans
from the sampler (``--check_batch``, crops of the configuration's size and half of it) until
every plan of the grid has been seen, then runs ``--check_steps`` more steps: the compile count
must equal the number of plans (jax, tensorflow; 0 on torch, which is eager) and stay there.
``--check_config=`` (empty) skips it.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("backends", ["jax", "tensorflow", "torch"], "Backends, in order.")
flags.DEFINE_string("config", "vit_elastic_demo", "Named ElasticViT configuration to time.")
flags.DEFINE_integer("batch", 32, "Batch size (images; each has 2 global + local crops).")
flags.DEFINE_integer("local_crops", 4, "Local crops per image (half the global size).")
flags.DEFINE_integer("steps", 4, "Timed rounds (one step of every variant per round).")
flags.DEFINE_enum("statistic", "min", ["min", "median"],
                  "Step time of a variant over the timed rounds.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per program before timing (compiles it).")
flags.DEFINE_string("plans", "2", "POA plans to time: K (the first K distinct plans the "
                    "sampler draws) or 'all'.")
flags.DEFINE_enum("plan_choice", "sampler", ["sampler", "spread"],
                  "sampler: the first K distinct plans a seeded sampler draws; spread: the "
                  "plans of smallest and largest FLOPs ratio and K - 2 evenly spaced between "
                  "(a better-conditioned line fit).")
flags.DEFINE_integer("plan_seed", 0, "Seed of the sampler that picks the timed plans.")
flags.DEFINE_integer("hidden", 512, "Head hidden width.")
flags.DEFINE_integer("bottleneck", 128, "Head bottleneck width.")
flags.DEFINE_integer("prototypes", 1024, "Prototypes of DINO's head and of each POA head.")
flags.DEFINE_integer("poa_heads", 2, "Heads of POA's MultiProjectionHead.")
flags.DEFINE_string("check_config", "vit_elastic_test", "Configuration of the compile-count "
                    "check over every plan of its grid; empty: no check.")
flags.DEFINE_string("check_overrides", "depth=2,min_depth=1,min_width=48",
                    "Overrides of --check_config (key=int,...): the default leaves a 2 x 2 grid "
                    "(widths 48, 64; depths 1, 2), 3 plans, because every plan costs a "
                    "compilation of tens of seconds on a small CPU.")
flags.DEFINE_integer("check_batch", 4, "Batch size of the compile-count check.")
flags.DEFINE_integer("check_steps", 6, "Steps after every plan was seen, in the check.")
flags.DEFINE_float("target_factor", 1.1, "Target: POA <= factor x DINO x (1 + E[r]).")
flags.DEFINE_integer("timeout", 900, "Seconds allowed to each backend's subprocess.")
flags.DEFINE_string("worker", "", "Internal: run the measurements of this backend here.")
FLAGS = flags.FLAGS

_FORWARDED = ("config", "batch", "local_crops", "steps", "statistic", "warmup", "plans",
              "plan_choice", "plan_seed", "hidden", "bottleneck", "prototypes", "poa_heads",
              "check_config", "check_overrides", "check_batch", "check_steps", "target_factor")


def emit(record):
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------ the worker
def _recipe(batch):
    return dict(epochs=1, steps_per_epoch=1000, batch_size=batch, warmup_epochs=0,
                warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0, layer_decay=1.0,
                patch_embed_lr_mult=1.0)


def _overrides(text):
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, value = item.split("=")
        out[key.strip()] = int(value)
    return out


def _trainers(config, batch, hidden, bottleneck, prototypes, poa_heads, with_dino=True,
              overrides=None):
    import keras

    from poa_keras import ElasticViT
    from poa_keras.methods import DINO, POA

    class PlannedPOA(POA):
        """POA whose plan can be pinned (to time one plan); the sampler's otherwise."""

        forced_plan = None

        def next_plan(self):
            return self.forced_plan if self.forced_plan is not None else super().next_plan()

    keras.utils.set_random_seed(0)
    overrides = dict(overrides or {})
    if overrides:  # the configuration's named sizes may fall off a cut grid
        overrides.setdefault("named_subnets", {})
    head = dict(hidden_dim=hidden, bottleneck_dim=bottleneck)
    dino = None
    if with_dino:
        dino = DINO(ElasticViT.from_config_name(config, name="dino_student", **overrides),
                    dict(head, out_dim=prototypes), recipe=_recipe(batch))
        dino.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
    poa = PlannedPOA(ElasticViT.from_config_name(config, name="poa_student", **overrides),
                     dict(head, out_dims=[prototypes] * poa_heads), recipe=_recipe(batch))
    poa.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
    return dino, poa


def _batch(batch, size, local_crops, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    data = {"global": rng.uniform(-1, 1, (2, batch, size, size, 3)).astype("float32")}
    if local_crops:
        data["local"] = rng.uniform(-1, 1, (local_crops, batch, size // 2, size // 2, 3)
                                    ).astype("float32")
    return data


def _step(trainer, data):
    start = time.perf_counter()
    logs = trainer.train_on_batch(data, return_dict=True)
    elapsed = time.perf_counter() - start
    if not all(map(_finite, logs.values())):
        raise FloatingPointError(f"non-finite logs: {logs}")
    return elapsed


def _finite(x):
    x = float(x)
    return x == x and abs(x) != float("inf")


def flops_ratio(backbone, spec, size, local_crops):
    """Backbone FLOPs of a subnet over every crop of one step / the same for the intact net."""
    def step_flops(s):
        return 2 * backbone.subnet_flops(s, size) + local_crops * backbone.subnet_flops(
            s, size // 2)
    return step_flops(spec) / step_flops(None)


def pick_plans(backbone, how_many, seed, choice="sampler", ratios=None):
    """`how_many` distinct plans (all: the whole grid): the first ones a fresh sampler draws,
    or ("spread") those of extreme FLOPs ratio and evenly spaced ratios between."""
    sampler = backbone.sampler(seed=seed)
    grid = sorted(set(sampler.candidates))
    if how_many == "all" or int(how_many) >= len(grid):
        return grid
    if int(how_many) < 1:
        raise ValueError(f"--plans must be >= 1 or 'all', got {how_many}")
    if choice == "spread":
        import numpy as np

        by_ratio = sorted(grid, key=ratios.get)
        if int(how_many) == 1:
            return [by_ratio[len(by_ratio) // 2]]
        lo, hi = ratios[by_ratio[0]], ratios[by_ratio[-1]]
        plans = []
        for goal in np.linspace(lo, hi, int(how_many)):
            spec = min((s for s in by_ratio if s not in plans),
                       key=lambda s: abs(ratios[s] - goal))
            plans.append(spec)
        return plans
    plans = []
    while len(plans) < int(how_many):
        spec = sampler.next()
        if spec not in plans:
            plans.append(spec)
    return plans


def estimate(measured, probabilities, ratios, dino_s):
    """E[POA step time] under the sampler from {plan: seconds}; returns (seconds, method,
    (intercept, slope) of the line t = a + b r used, or None)."""
    import numpy as np

    expected_r = sum(p * ratios[s] for s, p in probabilities.items())
    if set(measured) >= set(probabilities):
        return (sum(p * measured[s] for s, p in probabilities.items()), "exact expectation",
                None)
    r = np.array([ratios[s] for s in measured])
    t = np.array([measured[s] for s in measured])
    if len(measured) >= 2 and np.ptp(r) > 1e-3:
        slope, intercept = np.polyfit(r, t, 1)
        return (float(intercept + slope * expected_r),
                f"linear fit over {len(measured)} plans at E[r]",
                (float(intercept), float(slope)))
    intercept = float(np.mean(t - dino_s * r))
    return (intercept + dino_s * expected_r,
            "one ratio measured; slope = DINO time per unit FLOPs", (intercept, dino_s))


def worker(backend):
    import keras

    assert keras.backend.backend() == backend, (keras.backend.backend(), backend)
    build_start = time.perf_counter()
    dino, poa = _trainers(FLAGS.config, FLAGS.batch, FLAGS.hidden, FLAGS.bottleneck,
                          FLAGS.prototypes, FLAGS.poa_heads)
    backbone = poa.backbone
    size = backbone.image_size
    data = _batch(FLAGS.batch, size, FLAGS.local_crops)
    probabilities = backbone.sampler(seed=FLAGS.plan_seed).frequencies()
    ratios = {s: flops_ratio(backbone, s, size, FLAGS.local_crops) for s in probabilities}
    expected_r = sum(p * ratios[s] for s, p in probabilities.items())
    plans = pick_plans(backbone, FLAGS.plans, FLAGS.plan_seed, FLAGS.plan_choice, ratios)
    emit({"record": "setup", "backend": backend, "config": FLAGS.config, "batch": FLAGS.batch,
          "crops": f"2x{size}px + {FLAGS.local_crops}x{size // 2}px",
          "grid_plans": len(probabilities), "timed_plans": [[s.width, s.depth] for s in plans],
          "full_gflops_per_image_step": round(
              (2 * backbone.subnet_flops(None, size)
               + FLAGS.local_crops * backbone.subnet_flops(None, size // 2)) / 1e9, 3),
          "expected_flops_ratio": round(expected_r, 4),
          "build_s": round(time.perf_counter() - build_start, 2)})

    # Warm-up: the first step of every program compiles it.
    variants = [("dino", dino, None)] + [(f"poa_w{s.width}_d{s.depth}", poa, s) for s in plans]
    compile_s = {}
    for name, trainer, plan in variants:
        if plan is not None:
            trainer.forced_plan = plan
        times = [_step(trainer, data) for _ in range(max(FLAGS.warmup, 1))]
        compile_s[name] = times[0]
        assert plan is None or trainer.last_plan == plan
    compilations = {"dino": dino.num_compilations, "poa": poa.num_compilations}

    times = {name: [] for name, _, _ in variants}
    for _ in range(FLAGS.steps):
        for name, trainer, plan in variants:
            if plan is not None:
                trainer.forced_plan = plan
            times[name].append(_step(trainer, data))
    poa.forced_plan = None
    median = {name: statistics.median(t) for name, t in times.items()}
    pick = min if FLAGS.statistic == "min" else statistics.median
    chosen = {name: pick(t) for name, t in times.items()}
    for name, trainer, plan in variants:
        emit({"record": "variant", "backend": backend, "variant": name,
              "plan": None if plan is None else [plan.width, plan.depth],
              "flops_ratio": None if plan is None else round(ratios[plan], 4),
              "sampler_p": None if plan is None else round(probabilities[plan], 4),
              "first_step_s": round(compile_s[name], 2),
              "median_s": round(median[name], 3), "mean_s": round(statistics.mean(
                  times[name]), 3), "min_s": round(min(times[name]), 3),
              "step_s": round(chosen[name], 3), "statistic": FLAGS.statistic,
              "images_per_s": round(FLAGS.batch / chosen[name], 2),
              "times_s": [round(x, 3) for x in times[name]]})
    after = {"dino": dino.num_compilations, "poa": poa.num_compilations}
    emit({"record": "compilations", "backend": backend, "after_warmup": compilations,
          "after_timing": after, "steps": {"dino": FLAGS.warmup + FLAGS.steps,
                                           "poa": len(plans) * (FLAGS.warmup + FLAGS.steps)},
          "no_new_compilation": after == compilations,
          "poa_report": poa.compilation_report()})

    dino_s = chosen["dino"]
    measured = {plan: chosen[name] for name, _, plan in variants if plan is not None}
    poa_s, method, line = estimate(measured, probabilities, ratios, dino_s)
    weights = sum(probabilities[s] for s in measured)
    weighted = sum(probabilities[s] * t for s, t in measured.items()) / weights
    bound = FLAGS.target_factor * dino_s * (1 + expected_r)
    emit({"record": "estimate", "backend": backend, "dino_step_s": round(dino_s, 3),
          "expected_flops_ratio": round(expected_r, 4),
          "poa_expected_step_s": round(poa_s, 3), "method": method,
          "line_intercept_slope_s": None if line is None else [round(x, 3) for x in line],
          "warning": ("the fitted line falls with FLOPs: noise (or a per-step overhead that "
                      "dwarfs the FLOPs) dominates, the fit means little"
                      if line is not None and line[1] <= 0 else None),
          "poa_measured_plans_weighted_s": round(weighted, 3),
          "measured_probability_mass": round(weights, 3),
          "poa_over_dino": round(poa_s / dino_s, 3),
          "target_s": round(bound, 3), "target_holds": bool(poa_s <= bound)})
    del dino, poa
    if FLAGS.check_config:
        check_compilations(backend)


def check_compilations(backend):
    """Every plan of a small grid compiles once, and nothing compiles after they were all seen."""
    start = time.perf_counter()
    _, poa = _trainers(FLAGS.check_config, FLAGS.check_batch, 32, 16, 64, 2, with_dino=False,
                       overrides=_overrides(FLAGS.check_overrides))
    data = _batch(FLAGS.check_batch, poa.backbone.image_size, 2, seed=1)
    grid = set(poa.sampler.candidates)
    steps = 0
    while poa.plans_seen != grid:
        _step(poa, data)
        steps += 1
    seen_at = poa.num_compilations
    for _ in range(FLAGS.check_steps):
        _step(poa, data)
    report = poa.compilation_report()
    expected = 0 if backend == "torch" else len(grid)
    emit({"record": "compile_check", "backend": backend, "config": FLAGS.check_config,
          "overrides": FLAGS.check_overrides,
          "plans": len(grid), "steps_until_all_seen": steps,
          "compilations_when_all_seen": seen_at,
          "compilations_after": poa.num_compilations, "extra_steps": FLAGS.check_steps,
          "ok": seen_at == poa.num_compilations == expected
          and report["compiled_plans"] == expected,
          "seconds": round(time.perf_counter() - start, 1)})


# ------------------------------------------------------------------------------ the parent
def run_backends():
    records = []
    script = os.path.abspath(__file__)
    args = [f"--{name}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for name in _FORWARDED for v in [getattr(FLAGS, name)]]
    for backend in FLAGS.backends:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, script, f"--worker={backend}"] + args,
                                  env=env, capture_output=True, text=True,
                                  timeout=FLAGS.timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = f"timed out after {FLAGS.timeout} s", "timeout"
        for line in out.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                records.append(json.loads(line))
        wall = time.perf_counter() - start
        emit({"record": "backend_done", "backend": backend, "rc": rc, "wall_s": round(wall, 1)})
        if rc != 0:
            print(f"--- {backend} failed (rc={rc}); stderr tail:\n" + err[-3000:],
                  file=sys.stderr, flush=True)
    summarize(records)


def summarize(records):
    def find(kind):
        return [r for r in records if r["record"] == kind]

    print(f"\nstep time ({FLAGS.statistic} over the rounds; median beside it) and images/s "
          "per variant; ratios are within one backend")
    print(f"{'backend':<11} {'variant':<16} {'plan':<9} {'FLOPs r':>8} {'P(plan)':>8} "
          f"{'step s':>8} {'median s':>9} {'img/s':>8} {'/DINO':>7} {'1st step s':>10}")
    dino = {r["backend"]: r["step_s"] for r in find("variant") if r["variant"] == "dino"}
    for r in find("variant"):
        plan = "intact" if r["plan"] is None else f"{r['plan'][0]}x{r['plan'][1]}"
        ratio = r["step_s"] / dino[r["backend"]]
        print(f"{r['backend']:<11} {r['variant']:<16} {plan:<9} "
              f"{r['flops_ratio'] if r['flops_ratio'] is not None else 1.0:>8.3f} "
              f"{r['sampler_p'] if r['sampler_p'] is not None else 0:>8.3f} "
              f"{r['step_s']:>8.3f} {r['median_s']:>9.3f} {r['images_per_s']:>8.2f} "
              f"{ratio:>7.3f} "
              f"{r['first_step_s']:>10.2f}")
    print("\nexpected POA step under the sampler vs the target "
          f"(POA <= {FLAGS.target_factor} x DINO x (1 + E[r]))")
    for r in find("estimate"):
        verdict = "HOLDS" if r["target_holds"] else "FAILS"
        print(f"{r['backend']:<11} DINO {r['dino_step_s']:.3f} s, E[r] "
              f"{r['expected_flops_ratio']:.3f}, E[POA] {r['poa_expected_step_s']:.3f} s "
              f"({r['method']}; measured plans weighted: "
              f"{r['poa_measured_plans_weighted_s']:.3f} s), POA/DINO "
              f"{r['poa_over_dino']:.3f}, bound {r['target_s']:.3f} s: {verdict}")
        if r.get("line_intercept_slope_s"):
            a, b = r["line_intercept_slope_s"]
            print(f"{'':<11} line t = {a:.3f} + {b:.3f} r s")
        if r.get("warning"):
            print(f"{'':<11} WARNING: {r['warning']}")
    estimates = {r["backend"]: r for r in find("estimate")}
    if len(estimates) > 1:
        base = next(iter(estimates))
        print(f"\ncross-backend step-time ratios (vs {base})")
        ref = estimates[base]
        for b, r in estimates.items():
            print(f"{b:<11} DINO {r['dino_step_s'] / ref['dino_step_s']:.3f}  "
                  f"E[POA] {r['poa_expected_step_s'] / ref['poa_expected_step_s']:.3f}")
    print("\ncompilations")
    for r in find("compilations"):
        verdict = "no new compilation" if r["no_new_compilation"] else "RECOMPILED"
        print(f"{r['backend']:<11} after warm-up {r['after_warmup']}, after timing "
              f"{r['after_timing']} ({r['steps']} steps): {verdict}")
    for r in find("compile_check"):
        print(f"{r['backend']:<11} {r['config']}: {r['plans']} plans seen in "
              f"{r['steps_until_all_seen']} steps, {r['compilations_when_all_seen']} "
              f"compilations then, {r['compilations_after']} after {r['extra_steps']} more "
              f"steps: {'OK' if r['ok'] else 'FAILED'} ({r['seconds']} s)")
    jax = estimates.get("jax")
    if jax is not None:
        print(f"\nTARGET (jax): {'HOLDS' if jax['target_holds'] else 'DOES NOT HOLD'}")


def main(argv):
    del argv
    if FLAGS.worker:
        worker(FLAGS.worker)
    else:
        run_backends()


if __name__ == "__main__":
    app.run(main)
