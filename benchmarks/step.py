"""Training-step cost of DINO and POA on every backend, against a plain-PyTorch reference
(GitHub issue 12), measured in one run.

    python benchmarks/step.py                        # demo config, jax, tensorflow, torch
    python benchmarks/step.py --config=vit_s16 --overrides=image_size=64,min_width=192,min_depth=6

The parent launches one subprocess per backend (``KERAS_BACKEND`` set; one after the other,
never two at once); each prints JSON lines on stdout, and the parent prints them, then a
summary (``format_summary``).

Setup. ``--config`` (default ``vit_elastic_demo``), each override of ``--overrides``
(``key=value,...``) applied to both trainers' backbone (``ElasticViT.from_config_name(config,
**overrides)``, with ``named_subnets={}`` when overriding, since the named sizes may fall off
the changed grid). Batch ``--batch`` (32) of 2 global crops of the configuration's image size
and ``--local_crops`` (4) local crops of half that size: random images, the same numpy batch
for every step of every variant. DINO trains the intact network with one DINOHead of
``--prototypes`` (1024) prototypes; POA a MultiProjectionHead of ``--poa_heads`` (1, so both do
the same head work) heads of as many prototypes; hidden ``--hidden`` (512), bottleneck
``--bottleneck`` (128), 3 layers. Both: Sinkhorn-Knopp teacher targets (POA's default; DINO's
``centering="sinkhorn"`` set to match), AdamW (lr 1e-4), gradient clipping on (each method's
recipe value: DINO 3.0, POA 1.5), no last-layer freeze (DINO runs one program), layer decay and
the patch-embed lr multiplier off (both do the same optimizer work), other settings their
defaults.

The reference: ``benchmarks/torch_reference.py``'s ``ReferenceTrainer`` (eager PyTorch, the
same arithmetic as our steps; PyTorch whatever the Keras backend), built with ``from_trainer``
right after our trainers were built, so it starts from the same weights, and run on the same
batch and the same subnets. Device ``--reference_device`` (auto: CUDA when torch sees one, else
the CPU). Threads: the reference runs with ``torch.set_num_threads(--reference_threads)`` (0:
the CPU cores this process may use); ours keep their defaults (XLA and TensorFlow use every
core; on the torch backend the worker puts torch's own default back before each of our steps).
Both thread counts are reported.

POA's subnets. ``--plans=all`` (default): every subnet the sampler can draw (the grid minus the
intact network), each pinned in turn (``POA.next_subnet``). ``--plans=K`` times only the first
K distinct subnets a sampler seeded ``--plan_seed`` draws: the estimate is then renormalised
over their probability mass and marked PARTIAL (not a valid E[POA]; for smoke tests only).

Warm-up, then timing. First one untimed-for-the-estimate step of every variant (ours and the
reference: DINO, then every subnet): on JAX/TensorFlow the first step of each program compiles
it. Each of these first steps is timed; the compile time of a program is reported as the first
step that compiled it minus that variant's median timed step (``compile_s``; the first step
itself as ``first_step_s``), per program and in total, with the number of programs compiled
(``num_compilations``) for DINO and POA. POA compiles one program per WIDTH on JAX/TensorFlow
(the depth is a run-time block mask), none on PyTorch; the report gives what the grid would
cost with one program per (width, depth) beside it, and checks that nothing compiles during
the timed rounds.

Then ``--rounds`` (5) rounds; each runs one step of every variant: our DINO step, the
reference's DINO step, and one step of every timed POA subnet for ours and for the reference,
in an order shuffled per round (``--order=shuffled``, seed ``--order_seed``) or fixed
(``--order=fixed``), so that load from other processes hits every variant alike. Step time is
the wall time of ``train_on_batch`` (its logs come back as numbers, so the step has finished) or
of the reference's ``timed_step`` (synchronised). Per variant: the MEDIAN over the rounds, the
interquartile range (linear interpolation) and min/max.

Estimator (no extrapolation): with P(p) from ``backbone.sampler(seed).frequencies()`` and t_k(p)
the step time of subnet p in round k, E_k = sum_p P(p) t_k(p) is one draw-weighted POA step per
round; E[POA] is the median of E_k over the rounds (IQR and min/max beside it; the sum of P(p)
times each subnet's median is also reported). POA/DINO is reported as E[POA] / median DINO and
as the median over rounds of E_k / t_k(DINO) (both measured in the same round). Target:
E[POA] <= ``--target_factor`` (1.1) x median DINO x (1 + E[r]), E[r] = sum_p P(p) r(p), r(p) =
backbone FLOPs of subnet p over every crop of a step / the same for the intact network. The
ratio ours / reference is reported per variant and for DINO and E[POA]. The reference's times
on every backend are also a control: it is the same torch code everywhere, so its change across
backends measures the machine's load drift during the run.

FLOPs per training step (analytic; a multiply-add = 2 FLOPs; ``step_flops``): every backbone
pass from ``backbone.subnet_flops(spec, image size)`` (its convention: matmuls, attention and
patch embedding, no element-wise work), teacher = intact net on the 2 global crops (forward
only: x1), each student = its subnet on every crop (forward + backward ~ 3 x forward: x3); DINO
has the intact student, POA the intact and the elastic one. The heads are ADDED analytically:
the matmuls of their linear layers per CLS token (first linear with the subnet's width for the
elastic student), with the same 1x / 3x factors. Not counted: losses (softmax, cross-entropies,
Sinkhorn-Knopp, KoLeo), the optimizer, gradient clipping and the EMA update. Achieved GFLOP/s =
FLOPs / median step time (E[POA]: E[FLOPs] / E[POA]); the fraction of peak divides it by a
matmul peak measured in the same worker: a square float32 matmul of ``--matmul_n`` (1024)
(``keras.ops.matmul``: jitted on jax, in a tf.function on tensorflow, eager on torch; median of
``--matmul_repeats`` runs after 2 warm-up runs), peak = 2 n^3 / t, with our threads; and the same
in eager torch with the reference's threads for the reference.

End-to-end (``--recipe_epochs=N``, 0 = off): ``poa_keras.pretrain.pretrain("demo", tmpdir,
epochs=N, verbose=0, save_teacher=False, compilation_cache="off")`` in the worker, after the
timing: wall seconds and seconds per optimizer step, compilation and data preparation included
(about 75 s per epoch with torch on 2 cores; jax and tensorflow compile one program per width
first). ``--recipe_overrides`` (section.key=value,...) changes the recipe, e.g.
``data.steps_per_epoch=20`` for a short run.

Compilation check (``--check_config``, default ``vit_elastic_test`` with ``--check_overrides``,
default none: its 3 widths x 3 depths grid, 8 subnets; empty ``--check_config=`` skips it): a
POA trainer draws from its own sampler (``--check_batch``) until every subnet of the grid was
drawn, then ``--check_steps`` more: the compile count must equal the number of distinct plans
(with the run-time depth of JAX/TensorFlow: the number of WIDTHS; 0 on PyTorch) and stay there.

Sizes: the issue judges the speed targets at ViT-S/16 widths and depths at 64 px, batch 32:
``--config=vit_s16 --overrides=image_size=64,min_width=192,min_depth=6`` (4 widths x 7 depths,
27 subnets).
"""
import ast
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

from absl import app, flags


def define_flags():
    """The command-line flags (defined only when run as a script: importing this module, e.g.
    from a test, defines none)."""
    flags.DEFINE_list("backends", ["jax", "tensorflow", "torch"], "Backends, in order.")
    flags.DEFINE_string("config", "vit_elastic_demo", "Named ElasticViT configuration to time.")
    flags.DEFINE_string("overrides", "", "Overrides of --config, key=value,... (e.g. "
                        "image_size=64,min_width=192,min_depth=6); named_subnets={} then.")
    flags.DEFINE_integer("batch", 32, "Batch size (images; each has 2 global + local crops).")
    flags.DEFINE_integer("local_crops", 4, "Local crops per image (half the global size).")
    flags.DEFINE_integer("rounds", 5, "Timed rounds (one step of every variant per round).")
    flags.DEFINE_enum("order", "shuffled", ["shuffled", "fixed"],
                      "Order of the variants within a round.")
    flags.DEFINE_integer("order_seed", 0, "Seed of the per-round shuffle.")
    flags.DEFINE_string("plans", "all", "POA subnets to time: 'all' (the whole grid the sampler "
                        "draws from; needed for a valid E[POA]) or K (the first K distinct subnets "
                        "a seeded sampler draws: a PARTIAL estimate, for smoke tests).")
    flags.DEFINE_integer("plan_seed", 0, "Seed of the sampler that picks K subnets.")
    flags.DEFINE_integer("hidden", 512, "Head hidden width.")
    flags.DEFINE_integer("bottleneck", 128, "Head bottleneck width.")
    flags.DEFINE_integer("prototypes", 1024, "Prototypes of DINO's head and of each POA head.")
    flags.DEFINE_integer("poa_heads", 1, "Heads of POA's MultiProjectionHead.")
    flags.DEFINE_bool("reference", True, "Time the plain-PyTorch reference too.")
    flags.DEFINE_string("reference_device", "auto", "Device of the reference: auto (cuda if "
                        "torch sees one, else cpu), cpu or cuda.")
    flags.DEFINE_integer("reference_threads", 0, "torch threads of the reference (0: the CPU "
                         "cores available to the process).")
    flags.DEFINE_integer("matmul_n", 1024, "Side of the square float32 matmul of the peak.")
    flags.DEFINE_integer("matmul_repeats", 10, "Timed runs of the peak matmul (median).")
    flags.DEFINE_integer("recipe_epochs", 0, "Epochs of the demo recipe to run end to end in each "
                         "worker (0: off).")
    flags.DEFINE_list("recipe_overrides", [], "Overrides of the demo recipe (section.key=value, "
                      "e.g. data.steps_per_epoch=20 for a short run).")
    flags.DEFINE_string("check_config", "vit_elastic_test", "Configuration of the compile-count "
                        "check over every subnet of its grid; empty: no check.")
    flags.DEFINE_string("check_overrides", "", "Overrides of --check_config (key=value,...).")
    flags.DEFINE_integer("check_batch", 4, "Batch size of the compile-count check.")
    flags.DEFINE_integer("check_steps", 6, "Steps after every subnet was drawn, in the check.")
    flags.DEFINE_float("target_factor", 1.1, "Target: E[POA] <= factor x DINO x (1 + E[r]).")
    flags.DEFINE_enum("block_boundaries", "auto", ["auto", "on", "off"],
                      "poa_keras.elastic.set_block_boundaries for our steps (auto: the library's "
                      "default, on for JAX and TensorFlow on the CPU).")
    flags.DEFINE_integer("timeout", 10800, "Seconds allowed to each backend's subprocess.")
    flags.DEFINE_string("worker", "", "Internal: run the measurements of this backend here.")


FLAGS = flags.FLAGS

_FORWARDED = ("config", "overrides", "batch", "local_crops", "rounds", "order", "order_seed",
              "plans", "plan_seed", "hidden", "bottleneck", "prototypes", "poa_heads",
              "reference", "reference_device", "reference_threads", "matmul_n",
              "matmul_repeats", "recipe_epochs", "recipe_overrides", "check_config",
              "check_overrides", "check_batch", "check_steps", "target_factor",
              "block_boundaries")


def emit(record):
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------ pure helpers (tested)
def parse_overrides(text):
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} (values as Python literals when they parse)."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def quantile(values, q):
    """The q-quantile of values (numpy's default linear interpolation)."""
    import numpy as np

    xs = [float(x) for x in values]
    if not xs:
        raise ValueError("no values")
    return float(np.quantile(xs, q))


def spread(values):
    """{median, q1, q3, iqr, min, max, n} of a non-empty list of numbers."""
    xs = [float(x) for x in values]
    q1, q3 = quantile(xs, 0.25), quantile(xs, 0.75)
    return {"median": quantile(xs, 0.5), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def per_round_expectation(times, probabilities):
    """([E_k], mass): E_k = sum_p P(p) t_k(p) / mass over the measured subnets p (``times``:
    {subnet: [t_0, t_1, ...]}, one time per round; mass = their total probability, 1 when every
    subnet of ``probabilities`` was measured)."""
    measured = [s for s in probabilities if s in times]
    if not measured:
        raise ValueError("no measured subnet has a probability")
    lengths = {len(times[s]) for s in measured}
    if len(lengths) != 1:
        raise ValueError(f"subnets were timed in different numbers of rounds: {lengths}")
    mass = sum(probabilities[s] for s in measured)
    rounds = lengths.pop()
    return [sum(probabilities[s] * times[s][k] for s in measured) / mass
            for k in range(rounds)], mass


def estimate(dino_times, poa_times, probabilities, ratios, factor):
    """The POA estimate of one implementation from the round-aligned times (``dino_times``:
    [t_k(DINO)], ``poa_times``: {subnet: [t_k]}), the sampler's probabilities and the FLOPs
    ratios: E[POA] = median over rounds of E_k, its spread, POA/DINO and the target check."""
    per_round, mass = per_round_expectation(poa_times, probabilities)
    if len(per_round) != len(dino_times):
        raise ValueError(f"{len(dino_times)} DINO rounds but {len(per_round)} POA rounds")
    expected_r = sum(p * ratios[s] for s, p in probabilities.items())
    dino = spread(dino_times)
    poa = spread(per_round)
    from_medians = sum(probabilities[s] * quantile(t, 0.5) for s, t in poa_times.items()
                       if s in probabilities) / mass
    bound = factor * dino["median"] * (1.0 + expected_r)
    return {"complete": mass > 1.0 - 1e-9, "mass": mass, "expected_flops_ratio": expected_r,
            "dino": dino, "poa": poa, "poa_from_medians_s": from_medians,
            "poa_over_dino": poa["median"] / dino["median"],
            "poa_over_dino_rounds": spread([e / d for e, d in zip(per_round, dino_times)]),
            "bound_s": bound, "holds": poa["median"] <= bound}


def head_forward_flops(in_dim, hidden_dim, bottleneck_dim, out_dim, num_layers=3):
    """Matmul FLOPs of one DINOHead on one token: in -> hidden (x num_layers - 2 more) ->
    bottleneck -> out_dim prototypes (2 FLOPs per multiply-add)."""
    widths = [int(in_dim)] + [int(hidden_dim)] * (int(num_layers) - 1) + [int(bottleneck_dim)]
    return 2 * (sum(a * b for a, b in itertools.pairwise(widths))
                + int(bottleneck_dim) * out_dim)


def step_flops(backbone_flops, head_flops, batch, size, local_crops, elastic=None):
    """Analytic FLOPs of one training step: {backbone, heads, total}.

    ``backbone_flops(spec, pixels)``: forward FLOPs of one image through a subnet (None = the
    intact net); ``head_flops(spec)``: forward FLOPs of the heads on one CLS token of that
    subnet. Teacher: intact net on the 2 global crops, x1 (forward only); students: every crop,
    x3 (forward + backward); the intact student always, the elastic one when ``elastic`` is a
    subnet (POA)."""
    globals_, locals_ = 2 * batch, local_crops * batch

    def student(spec):
        bb = globals_ * backbone_flops(spec, size)
        if locals_:
            bb += locals_ * backbone_flops(spec, size // 2)
        return bb, (globals_ + locals_) * head_flops(spec)

    backbone = globals_ * backbone_flops(None, size)
    heads = globals_ * head_flops(None)
    for spec in [None] + ([elastic] if elastic is not None else []):
        bb, hd = student(spec)
        backbone += 3 * bb
        heads += 3 * hd
    return {"backbone": backbone, "heads": heads, "total": backbone + heads}


def flops_ratio(backbone_flops, spec, size, local_crops):
    """Backbone FLOPs of a subnet over every crop of a step / the same for the intact net."""
    def crops(s):
        return 2 * backbone_flops(s, size) + (local_crops * backbone_flops(s, size // 2)
                                               if local_crops else 0)
    return crops(spec) / crops(None)


def _plan_text(plan):
    return "intact" if plan is None else f"{plan[0]}x{plan[1]}"


def _s(x):
    return f"{x:.3f}"


def _iqr_text(st):
    return f"{_s(st['median'])} [{_s(st['q1'])}, {_s(st['q3'])}] ({_s(st['min'])}-{_s(st['max'])})"


def _pct(x):
    return "   -" if x is None else f"{100 * x:4.0f}%"


def format_summary(records, target_factor=1.1):
    """The human-readable summary of a run's JSON records (a string)."""
    def find(kind, backend=None):
        return [r for r in records if r.get("record") == kind
                and (backend is None or r.get("backend") == backend)]

    lines = []
    backends = list(dict.fromkeys(r["backend"] for r in records if "backend" in r))
    for setup in find("setup"):
        lines.append(
            f"[{setup['backend']}] {setup['config']}"
            f"{' ' + setup['overrides'] if setup.get('overrides') else ''}, batch "
            f"{setup['batch']}, crops {setup['crops']}; grid {setup['widths']} widths x "
            f"{setup['depths']} depths, {setup['grid_subnets']} subnets drawn, "
            f"{setup['timed_subnets']} timed; E[r] {setup['expected_flops_ratio']:.3f}; "
            f"rounds {setup['rounds']} ({setup['order']} order); threads: ours "
            f"{setup['threads_ours']}, reference {setup['threads_reference']} on "
            f"{setup['reference_device']}; block boundaries "
            f"{setup.get('block_boundaries', 'n/a')}")
    for peak in find("peak"):
        ref = (f", reference (torch, {peak['reference_threads']} threads) "
               f"{peak['reference_gflops']:.1f}" if peak.get("reference_gflops") else "")
        lines.append(f"[{peak['backend']}] matmul peak {peak['n']}^3 float32: ours "
                     f"{peak['ours_gflops']:.1f} GFLOP/s{ref}")

    lines.append("\nper variant: step time s, median [q1, q3] (min-max) over the rounds; "
                 "GFLOP per step (backbones + heads, see the docstring), GFLOP/s at the median, "
                 "% of the matmul peak; 1st = the warm-up step (compiles on jax/tf)")
    head = (f"{'backend':<11}{'variant':<9}{'P(p)':>6}{'r':>6}{'GFLOP':>8} | "
            f"{'ours':<38}{'GF/s':>7}{'peak':>6}{'1st s':>7} | "
            f"{'reference':<38}{'GF/s':>7}{'peak':>6} | {'ours/ref':>8}")
    lines.append(head)
    for backend in backends:
        variants = find("variant", backend)
        refs = {(v["variant"], tuple(v["plan"] or ())): v for v in variants
                if v["impl"] == "reference"}
        for v in (v for v in variants if v["impl"] == "ours"):
            ref = refs.get((v["variant"], tuple(v["plan"] or ())))
            name = "dino" if v["variant"] == "dino" else _plan_text(v["plan"])
            p = "" if v["p"] is None else f"{v['p']:.3f}"
            r = 1.0 if v["flops_ratio"] is None else v["flops_ratio"]
            row = (f"{backend:<11}{name:<9}{p:>6}{r:>6.3f}{v['gflop_step']:>8.2f} | "
                   f"{_iqr_text(v['stats']):<38}{v['gflops_per_s']:>7.1f}"
                   f"{_pct(v['peak_fraction']):>6}{v['first_step_s']:>7.2f} | ")
            if ref is not None:
                row += (f"{_iqr_text(ref['stats']):<38}{ref['gflops_per_s']:>7.1f}"
                        f"{_pct(ref['peak_fraction']):>6} | "
                        f"{v['stats']['median'] / ref['stats']['median']:>8.3f}")
            else:
                row += f"{'-':<38}{'':>13} | {'-':>8}"
            lines.append(row)

    lines.append(f"\nexpected POA step under the sampler, E[POA] = median over rounds of "
                 f"sum_p P(p) t_k(p) [IQR] (min-max); target E[POA] <= {target_factor} x DINO "
                 "x (1 + E[r])")
    for e in find("estimate"):
        verdict = "HOLDS" if e["holds"] else "FAILS"
        if not e["complete"]:
            verdict += f" (PARTIAL: only {e['mass']:.3f} of the probability mass timed; "\
                       "not a valid estimate)"
        lines.append(
            f"{e['backend']:<11}{e['impl']:<10} DINO {_iqr_text(e['dino'])}; E[POA] "
            f"{_iqr_text(e['poa'])} (from medians {e['poa_from_medians_s']:.3f}); POA/DINO "
            f"{e['poa_over_dino']:.3f} (per round {e['poa_over_dino_rounds']['median']:.3f} "
            f"[{e['poa_over_dino_rounds']['q1']:.3f}, {e['poa_over_dino_rounds']['q3']:.3f}]"
            f"); E[r] {e['expected_flops_ratio']:.3f}, bound {e['bound_s']:.3f} s: {verdict}")
        lines.append(
            f"{'':<21} GFLOP/step DINO {e['dino_gflop']:.2f}, E[POA] {e['poa_gflop']:.2f}; "
            f"GFLOP/s DINO {e['dino_gflops_per_s']:.1f} ({_pct(e['dino_peak_fraction']).strip()}"
            f" of peak), POA {e['poa_gflops_per_s']:.1f} "
            f"({_pct(e['poa_peak_fraction']).strip()} of peak)")
    versus = find("versus")
    if versus:
        lines.append("\nours / reference (same run, same data, same subnets; < 1: ours faster)")
        for v in versus:
            lines.append(f"{v['backend']:<11} DINO {v['dino']:.3f} (per round "
                         f"{v['dino_rounds']['median']:.3f} [{v['dino_rounds']['q1']:.3f}, "
                         f"{v['dino_rounds']['q3']:.3f}]), E[POA] {v['poa']:.3f} (per round "
                         f"{v['poa_rounds']['median']:.3f} [{v['poa_rounds']['q1']:.3f}, "
                         f"{v['poa_rounds']['q3']:.3f}])")
    ours = {e["backend"]: e for e in find("estimate") if e["impl"] == "ours"}
    refs = {e["backend"]: e for e in find("estimate") if e["impl"] == "reference"}
    if len(ours) > 1:
        base = next(iter(ours))
        lines.append(f"\ncross-backend ratios of medians (vs {base}); the reference is the same "
                     "torch code on every backend: its ratio is the machine's drift")
        for b, e in ours.items():
            row = (f"{b:<11} ours DINO {e['dino']['median'] / ours[base]['dino']['median']:.3f}"
                   f"  E[POA] {e['poa']['median'] / ours[base]['poa']['median']:.3f}")
            if b in refs and base in refs:
                row += (f"   reference DINO "
                        f"{refs[b]['dino']['median'] / refs[base]['dino']['median']:.3f}  "
                        f"E[POA] {refs[b]['poa']['median'] / refs[base]['poa']['median']:.3f}")
            lines.append(row)

    lines.append("\ncompilation (compile s = first step - median step of that variant)")
    for c in find("compile"):
        programs = ", ".join(f"{p['program'].replace('ViTSubnet', '')} (first needed by "
                             f"{_plan_text(p['compiled_by'])}): {p['compile_s']:.1f} s"
                             for p in c["programs"])
        lines.append(
            f"{c['backend']:<11} DINO {c['dino_programs']} program(s) ({c['dino_compile_s']:.1f}"
            f" s); POA {c['poa_programs']} program(s) for {c['timed_subnets']} subnets "
            f"(expected {c['expected_poa_programs']}; grid {c['widths']} widths x "
            f"{c['depths']} depths, {c['programs_if_per_subnet']} subnets: one program per "
            f"width would be {c['programs_if_per_width']}, one per (width, depth) "
            f"{c['programs_if_per_subnet']}; run-time depth "
            f"{c['runtime_depth']}); compile total {c['compile_total_s']:.1f} s "
            f"(first steps {c['first_steps_total_s']:.1f} s); timed rounds: "
            f"{'no new compilation' if c['no_new_compilation'] else 'RECOMPILED'}: "
            f"{'OK' if c['ok'] else 'FAILED'}")
        if programs:
            lines.append(f"{'':<11} {programs}")
    for r in find("compile_check"):
        lines.append(
            f"{r['backend']:<11} check {r['config']}"
            f"{' ' + r['overrides'] if r['overrides'] else ''}: {r['widths']} widths x "
            f"{r['depths']} depths, {r['subnets']} subnets drawn in {r['steps_until_all_seen']}"
            f" steps; {r['compilations_when_all_seen']} compilations then, "
            f"{r['compilations_after']} after {r['extra_steps']} more (expected "
            f"{r['expected']}): {'OK' if r['ok'] else 'FAILED'} ({r['seconds']} s)")
    for r in find("recipe"):
        lines.append(f"\n{r['backend']:<11} demo recipe, {r['epochs']} epoch(s): "
                     f"{r['wall_s']:.1f} s wall, {r['steps']} steps, {r['s_per_step']:.3f} s/step "
                     f"(compilation included; {r['compilations']} compilations)")
    for r in find("backend_done"):
        if r["rc"] != 0:
            lines.append(f"{r['backend']:<11} FAILED (rc={r['rc']})")
    if "jax" in ours:
        e = ours["jax"]
        state = ("HOLDS" if e["holds"] else "DOES NOT HOLD") + ("" if e["complete"]
                                                                 else " (PARTIAL estimate)")
        lines.append(f"\nTARGET (jax): {state}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the worker
def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _recipe(batch, steps):
    # steps: the length of the schedules (longer than any run of this script: no step runs
    # past their end)
    return dict(epochs=1, steps_per_epoch=int(steps), batch_size=batch,
                warmup_epochs=0, warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0,
                layer_decay=1.0, patch_embed_lr_mult=1.0, centering="sinkhorn")


def build_trainers(config, overrides, batch, hidden, bottleneck, prototypes, poa_heads,
                   steps=100_000, with_dino=True):
    """(DINO or None, POA whose subnet can be pinned: ``pinned_subnet``), compiled."""
    import keras

    from poa_keras import ElasticViT
    from poa_keras.methods import DINO, POA

    class PinnedPOA(POA):
        """POA whose elastic subnet can be pinned (``pinned_subnet``); else the sampler's."""

        pinned_subnet = None

        def next_subnet(self):
            if self.pinned_subnet is not None:
                return self.pinned_subnet
            return super().next_subnet()

    keras.utils.set_random_seed(0)
    overrides = dict(overrides or {})
    if overrides:  # the configuration's named sizes may fall off a changed grid
        overrides.setdefault("named_subnets", {})
    head = dict(hidden_dim=hidden, bottleneck_dim=bottleneck)
    dino = None
    if with_dino:
        dino = DINO(ElasticViT.from_config_name(config, **dict(overrides, name="dino_student")),
                    dict(head, out_dim=prototypes), recipe=_recipe(batch, steps))
        dino.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
    poa = PinnedPOA(ElasticViT.from_config_name(config, **dict(overrides, name="poa_student")),
                    dict(head, out_dims=[prototypes] * poa_heads), recipe=_recipe(batch, steps))
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


def _finite(x):
    return math.isfinite(float(x))


def _check_logs(logs, who):
    if not all(map(_finite, logs.values())):
        raise FloatingPointError(f"{who}: non-finite logs: {logs}")


def _step(trainer, data):
    start = time.perf_counter()
    logs = trainer.train_on_batch(data, return_dict=True)
    elapsed = time.perf_counter() - start
    _check_logs(logs, type(trainer).__name__)
    return elapsed


def _heads_of(head):
    return list(head.heads) if hasattr(head, "heads") else [head]


def _head_flops_fn(trainer):
    """spec -> matmul FLOPs of the trainer's heads on one CLS token of that subnet."""
    heads = _heads_of(trainer.head)
    backbone = trainer.backbone

    def flops(spec):
        active = None if spec is None else backbone.head_active_in(spec)
        return sum(head_forward_flops(active or h.in_dim, h.hidden_dim, h.bottleneck_dim,
                                      h.out_dim, h.num_layers) for h in heads)
    return flops


def matmul_peak(backend, n, repeats):
    """(GFLOP/s, median seconds) of an n^3 float32 matmul with keras.ops on this backend."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
    b = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
    if backend == "jax":
        import jax

        fn = jax.jit(keras.ops.matmul)

        def run():
            fn(a, b).block_until_ready()
    elif backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(keras.ops.matmul)

        def run():
            fn(a, b)[0, 0].numpy()
    else:
        import torch

        def run():
            out = keras.ops.matmul(a, b)
            if out.is_cuda:
                torch.cuda.synchronize()
    return _time_matmul(run, n, repeats)


def torch_matmul_peak(n, repeats, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)

    def run():
        torch.matmul(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
    return _time_matmul(run, n, repeats)


def _time_matmul(run, n, repeats):
    for _ in range(2):
        run()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    t = quantile(times, 0.5)
    return 2.0 * n ** 3 / t / 1e9, t


def _threads_ours(backend):
    if backend == "torch":
        import torch
        return f"torch {torch.get_num_threads()}"
    if backend == "tensorflow":
        import tensorflow as tf
        intra = tf.config.threading.get_intra_op_parallelism_threads()
        return f"tf intra-op {intra or 'default'} ({_cores()} cores)"
    return f"XLA default ({_cores()} cores)"


def _r(x, digits=4):
    return None if x is None else round(float(x), digits)


def _rs(st, digits=4):
    return {k: (v if k == "n" else round(v, digits)) for k, v in st.items()}


def worker(backend):
    import keras
    import torch
    import torch_reference  # benchmarks/ is on sys.path (this script's directory)

    assert keras.backend.backend() == backend, (keras.backend.backend(), backend)
    default_threads = torch.get_num_threads()
    ref_threads = FLAGS.reference_threads or _cores()
    threads_ours = _threads_ours(backend)
    ref_device = FLAGS.reference_device
    if ref_device == "auto":
        ref_device = "cuda" if torch.cuda.is_available() else "cpu"

    def ours_threads():
        if backend == "torch" and torch.get_num_threads() != default_threads:
            torch.set_num_threads(default_threads)

    def reference_threads():
        if torch.get_num_threads() != ref_threads:
            torch.set_num_threads(ref_threads)

    from poa_keras.elastic import block_boundaries, set_block_boundaries

    set_block_boundaries({"auto": None, "on": True, "off": False}[FLAGS.block_boundaries])
    overrides = parse_overrides(FLAGS.overrides)
    build_start = time.perf_counter()
    dino, poa = build_trainers(FLAGS.config, overrides, FLAGS.batch, FLAGS.hidden,
                               FLAGS.bottleneck, FLAGS.prototypes, FLAGS.poa_heads)
    refs = {}
    if FLAGS.reference:   # before our first step: the same initial weights
        refs = {"dino": torch_reference.ReferenceTrainer.from_trainer(dino, device=ref_device),
                "poa": torch_reference.ReferenceTrainer.from_trainer(poa, device=ref_device)}
    build_s = time.perf_counter() - build_start

    backbone = poa.backbone
    size = backbone.image_size
    data = _batch(FLAGS.batch, size, FLAGS.local_crops)
    probabilities = backbone.sampler(seed=FLAGS.plan_seed).frequencies()
    grid = sorted(probabilities)
    if FLAGS.plans == "all":
        plans = grid
    else:
        k = int(FLAGS.plans)
        if k < 1:
            raise ValueError(f"--plans must be 'all' or >= 1, got {FLAGS.plans}")
        sampler, plans = backbone.sampler(seed=FLAGS.plan_seed), []
        while len(plans) < min(k, len(grid)):
            spec = sampler.next()
            if spec not in plans:
                plans.append(spec)
    bb_flops = backbone.subnet_flops
    ratios = {s: flops_ratio(bb_flops, s, size, FLAGS.local_crops) for s in grid}
    expected_r = sum(p * ratios[s] for s, p in probabilities.items())
    flops = {"dino": step_flops(bb_flops, _head_flops_fn(dino), FLAGS.batch, size,
                                FLAGS.local_crops)}
    poa_heads = _head_flops_fn(poa)
    for s in grid:
        flops[s] = step_flops(bb_flops, poa_heads, FLAGS.batch, size, FLAGS.local_crops, s)
    widths = sorted({s.width for s in backbone.subnets()})
    depths = sorted({s.depth for s in backbone.subnets()})
    emit({"record": "setup", "backend": backend, "config": FLAGS.config,
          "overrides": FLAGS.overrides, "batch": FLAGS.batch,
          "crops": f"2x{size}px + {FLAGS.local_crops}x{size // 2}px",
          "widths": len(widths), "depths": len(depths), "width_values": widths,
          "depth_values": depths, "grid_subnets": len(grid), "timed_subnets": len(plans),
          "expected_flops_ratio": round(expected_r, 4), "rounds": FLAGS.rounds,
          "order": FLAGS.order, "threads_ours": threads_ours,
          "threads_reference": ref_threads if refs else None,
          "reference_device": ref_device if refs else None,
          "runtime_depth": bool(poa.runtime_depth), "block_boundaries": block_boundaries(),
          "build_s": round(build_s, 2)})

    # The machine's matmul peak, in this process: ours with our threads, torch with the
    # reference's.
    ours_threads()
    ours_peak, ours_peak_s = matmul_peak(backend, FLAGS.matmul_n, FLAGS.matmul_repeats)
    ref_peak = ref_peak_s = None
    if refs:
        reference_threads()
        ref_peak, ref_peak_s = torch_matmul_peak(FLAGS.matmul_n, FLAGS.matmul_repeats,
                                                 ref_device)
    emit({"record": "peak", "backend": backend, "n": FLAGS.matmul_n,
          "ours_gflops": round(ours_peak, 2), "ours_s": round(ours_peak_s, 5),
          "reference_gflops": _r(ref_peak, 2), "reference_s": _r(ref_peak_s, 5),
          "reference_threads": ref_threads if refs else None})

    # The variants: (impl, method, subnet or None).
    tasks = [("ours", "dino", None)] + ([("reference", "dino", None)] if refs else [])
    for s in plans:
        tasks += [("ours", "poa", s)] + ([("reference", "poa", s)] if refs else [])

    def run(impl, method, spec):
        if impl == "ours":
            ours_threads()
            trainer = dino if method == "dino" else poa
            if method == "poa":
                poa.pinned_subnet = spec
            seconds = _step(trainer, data)
            if method == "poa" and poa.last_subnet != spec:
                raise AssertionError(f"pinned {spec}, ran {poa.last_subnet}")
            return seconds
        reference_threads()
        seconds, logs = refs[method].timed_step(data, plan=spec)
        _check_logs(logs, f"reference {method}")
        return seconds

    # Warm-up: the first step of every variant (compiles the programs on jax/tensorflow).
    first, compiled_by = {}, {}
    for task in tasks:
        before = (dino.num_compilations, poa.num_compilations)
        first[task] = run(*task)
        after = (dino.num_compilations, poa.num_compilations)
        if task[0] == "ours" and after != before:
            program = "DINO" if task[1] == "dino" else repr(poa.last_plan)
            compiled_by[task] = (program, sum(after) - sum(before))
    warm = {"dino": dino.num_compilations, "poa": poa.num_compilations}

    # Timed rounds.
    times = {task: [] for task in tasks}
    rng = random.Random(FLAGS.order_seed)
    for _ in range(FLAGS.rounds):
        order = list(tasks)
        if FLAGS.order == "shuffled":
            rng.shuffle(order)
        for task in order:
            times[task].append(run(*task))
    timed = {"dino": dino.num_compilations, "poa": poa.num_compilations}
    poa.pinned_subnet = None
    ours_threads()
    stats = {task: spread(t) for task, t in times.items()}

    peaks = {"ours": ours_peak, "reference": ref_peak}
    for task in tasks:
        impl, method, spec = task
        f = flops["dino" if spec is None else spec]["total"]
        gfs = f / stats[task]["median"] / 1e9
        emit({"record": "variant", "backend": backend, "impl": impl, "variant": method,
              "plan": None if spec is None else [spec.width, spec.depth],
              "p": None if spec is None else round(probabilities[spec], 5),
              "flops_ratio": None if spec is None else round(ratios[spec], 4),
              "gflop_step": round(f / 1e9, 4),
              "gflop_backbone": round(flops["dino" if spec is None else spec]["backbone"]
                                      / 1e9, 4),
              "first_step_s": round(first[task], 3),
              "compiled": compiled_by.get(task, (None,))[0] if impl == "ours" else None,
              "stats": _rs(stats[task]), "times_s": [round(x, 4) for x in times[task]],
              "gflops_per_s": round(gfs, 2),
              "peak_fraction": _r(gfs / peaks[impl] if peaks[impl] else None)})

    # Compilation: programs, compile seconds, grid costs.
    programs = []
    for task, (program, count) in compiled_by.items():
        if task[1] == "poa":
            programs.append({"program": program, "compiled_by": [task[2].width, task[2].depth],
                             "traces": count, "first_step_s": round(first[task], 3),
                             "steady_median_s": round(stats[task]["median"], 4),
                             "compile_s": round(max(0.0, first[task] - stats[task]["median"]),
                                                3)})
    dino_task = ("ours", "dino", None)
    dino_compile = max(0.0, first[dino_task] - stats[dino_task]["median"])
    compile_total = dino_compile + sum(p["compile_s"] for p in programs)
    first_total = sum(first[t] for t in compiled_by)
    expected_programs = 0 if backend == "torch" else len({poa.plan_for(s) for s in plans})
    expected_dino = 0 if backend == "torch" else 1
    no_new = timed == warm
    emit({"record": "compile", "backend": backend, "runtime_depth": bool(poa.runtime_depth),
          "widths": len(widths), "depths": len(depths), "timed_subnets": len(plans),
          "programs_if_per_subnet": len(grid),
          "programs_if_per_width": len({s.width for s in grid}),
          "expected_poa_programs": expected_programs,
          "dino_programs": warm["dino"], "poa_programs": warm["poa"],
          "dino_first_step_s": round(first[dino_task], 3),
          "dino_compile_s": round(dino_compile, 3), "programs": programs,
          "compile_total_s": round(compile_total, 3),
          "first_steps_total_s": round(first_total, 3),
          "after_warmup": warm, "after_timing": timed, "no_new_compilation": no_new,
          "poa_report": poa.compilation_report(),
          "ok": bool(no_new and warm["poa"] == expected_programs
                     and warm["dino"] == expected_dino)})

    # Estimates per implementation. E[FLOPs] over the timed subnets (renormalised like the
    # times when only some were timed).
    timed_mass = sum(probabilities[s] for s in plans)
    expected_poa_flops = sum(probabilities[s] * flops[s]["total"] for s in plans) / timed_mass
    estimates = {}
    for impl in ("ours", "reference") if refs else ("ours",):
        poa_times = {s: times[(impl, "poa", s)] for s in plans}
        e = estimate(times[(impl, "dino", None)], poa_times, probabilities, ratios,
                     FLAGS.target_factor)
        estimates[impl] = e
        dino_gfs = flops["dino"]["total"] / e["dino"]["median"] / 1e9
        poa_gfs = expected_poa_flops / e["poa"]["median"] / 1e9
        emit({"record": "estimate", "backend": backend, "impl": impl,
              "complete": e["complete"], "mass": round(e["mass"], 5),
              "expected_flops_ratio": round(e["expected_flops_ratio"], 4),
              "dino": _rs(e["dino"]), "poa": _rs(e["poa"]),
              "poa_from_medians_s": round(e["poa_from_medians_s"], 4),
              "poa_over_dino": round(e["poa_over_dino"], 4),
              "poa_over_dino_rounds": _rs(e["poa_over_dino_rounds"]),
              "bound_s": round(e["bound_s"], 4), "holds": bool(e["holds"]),
              "dino_gflop": round(flops["dino"]["total"] / 1e9, 4),
              "poa_gflop": round(expected_poa_flops / 1e9, 4),
              "dino_gflops_per_s": round(dino_gfs, 2), "poa_gflops_per_s": round(poa_gfs, 2),
              "dino_peak_fraction": _r(dino_gfs / peaks[impl] if peaks[impl] else None),
              "poa_peak_fraction": _r(poa_gfs / peaks[impl] if peaks[impl] else None)})
    if refs:
        o, r = estimates["ours"], estimates["reference"]
        ours_rounds, _ = per_round_expectation({s: times[("ours", "poa", s)] for s in plans},
                                               probabilities)
        ref_rounds, _ = per_round_expectation(
            {s: times[("reference", "poa", s)] for s in plans}, probabilities)
        emit({"record": "versus", "backend": backend,
              "dino": round(o["dino"]["median"] / r["dino"]["median"], 4),
              "poa": round(o["poa"]["median"] / r["poa"]["median"], 4),
              "dino_rounds": _rs(spread([a / b for a, b in zip(
                  times[("ours", "dino", None)], times[("reference", "dino", None)])])),
              "poa_rounds": _rs(spread([a / b for a, b in zip(ours_rounds, ref_rounds)]))})
    dino = poa = refs = None   # free them before the check and the recipe
    if FLAGS.check_config:
        check_compilations(backend)
    if FLAGS.recipe_epochs:
        run_recipe(backend, FLAGS.recipe_epochs)


def check_compilations(backend):
    """Every subnet of a grid is drawn; the compile count is the number of distinct plans (one
    per width with the run-time depth; 0 on torch) and does not move afterwards."""
    start = time.perf_counter()
    _, poa = build_trainers(FLAGS.check_config, parse_overrides(FLAGS.check_overrides),
                            FLAGS.check_batch, 32, 16, 64, 1, with_dino=False)
    data = _batch(FLAGS.check_batch, poa.backbone.image_size, 2, seed=1)
    grid = set(poa.sampler.candidates)
    drawn, steps = set(), 0
    while drawn != grid:
        if steps > 50 * len(grid):
            raise RuntimeError(f"the sampler drew only {len(drawn)} of {len(grid)} subnets in "
                               f"{steps} steps")
        _step(poa, data)
        drawn.add(poa.last_subnet)
        steps += 1
    seen_at = poa.num_compilations
    for _ in range(FLAGS.check_steps):
        _step(poa, data)
    report = poa.compilation_report()
    expected = 0 if backend == "torch" else len({poa.plan_for(s) for s in grid})
    subnets = poa.backbone.subnets()
    emit({"record": "compile_check", "backend": backend, "config": FLAGS.check_config,
          "overrides": FLAGS.check_overrides, "runtime_depth": bool(poa.runtime_depth),
          "widths": len({s.width for s in subnets}), "depths": len({s.depth for s in subnets}),
          "subnets": len(grid), "steps_until_all_seen": steps,
          "compilations_when_all_seen": seen_at,
          "compilations_after": poa.num_compilations, "extra_steps": FLAGS.check_steps,
          "expected": expected,
          "ok": bool(seen_at == poa.num_compilations == expected
                     and report["compiled_plans"] == expected),
          "seconds": round(time.perf_counter() - start, 1)})


def run_recipe(backend, epochs):
    """The demo recipe end to end (data, compilation, fit), wall time per optimizer step."""
    from poa_keras.pretrain import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = pretrain("demo", tmp, overrides=list(FLAGS.recipe_overrides), epochs=epochs,
                          verbose=0, save_teacher=False, compilation_cache="off")
        wall = time.perf_counter() - start
        trainer = result.trainer
        steps = int(keras_number(trainer.optimizer.iterations))
    emit({"record": "recipe", "backend": backend, "epochs": epochs,
          "overrides": list(FLAGS.recipe_overrides), "wall_s": round(wall, 2),
          "steps": steps, "s_per_step": round(wall / max(steps, 1), 4),
          "compilations": trainer.num_compilations})


def keras_number(x):
    import keras
    return keras.ops.convert_to_numpy(x)


# ------------------------------------------------------------------------------ the parent
def _flag_text(value):
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def run_backends():
    records = []
    script = os.path.abspath(__file__)
    args = [f"--{name}={_flag_text(getattr(FLAGS, name))}" for name in _FORWARDED]
    for backend in FLAGS.backends:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, script, f"--worker={backend}"] + args,
                                  env=env, capture_output=True, text=True, check=False,
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
        done = {"record": "backend_done", "backend": backend, "rc": rc, "wall_s": round(wall, 1)}
        emit(done)
        records.append(done)
        if rc != 0:
            print(f"--- {backend} failed (rc={rc}); stderr tail:\n" + err[-3000:],
                  file=sys.stderr, flush=True)
    print("\n" + format_summary(records, FLAGS.target_factor), flush=True)


def main(argv):
    del argv
    if FLAGS.worker:
        worker(FLAGS.worker)
    else:
        run_backends()


if __name__ == "__main__":
    define_flags()
    app.run(main)
