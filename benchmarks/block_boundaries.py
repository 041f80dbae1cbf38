"""Block boundaries on and off (``poa_keras.elastic.set_block_boundaries``), interleaved in one
run: what the conditional around every block of a training pass buys on JAX and TensorFlow.

    python benchmarks/block_boundaries.py --backends=jax
    python benchmarks/block_boundaries.py --config=vit_s16 \
        --overrides=image_size=64,min_width=192,min_depth=6 --steps=4 --rounds=2

Each (round, setting) runs in its own process (a setting is read when a program is traced, and
a fresh process compiles afresh): it builds the trainer of ``benchmarks/step.py``
(``build_trainers``: batch ``--batch`` of 2 global and 4 local crops, one head of 1024
prototypes, Sinkhorn-Knopp, AdamW, clipping), runs one step (timed apart: it compiles), then
``--steps`` timed steps. ``--variant``: ``dino``, or a POA subnet ``WIDTHxDEPTH`` pinned for
every step. The two settings alternate (off, on; then on, off; ...), so load drift hits both.
Reported per backend: the median step of each setting over every timed step, its quartiles, the
first (compiling) step, and the ratio on / off (< 1: the boundaries are faster)."""
import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

flags.DEFINE_list("backends", ["jax", "tensorflow"], "Backends, in order.")
flags.DEFINE_string("config", "vit_elastic_demo", "Named ElasticViT configuration.")
flags.DEFINE_string("overrides", "", "Overrides of --config (key=value,...).")
flags.DEFINE_string("variant", "dino", "dino, or a POA subnet WIDTHxDEPTH.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("rounds", 2, "Processes per setting (alternating order).")
flags.DEFINE_integer("steps", 15, "Timed steps per process.")
flags.DEFINE_string("worker", "", "Internal: on or off, run in this process.")
FLAGS = flags.FLAGS


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [round(q[0], 4), round(q[2], 4)]


def worker():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import step  # benchmarks/step.py: the trainers and batch of the step benchmark

    from poa_keras import ViTSubnet
    from poa_keras.elastic import set_block_boundaries

    set_block_boundaries(FLAGS.worker == "on")
    poa_variant = FLAGS.variant != "dino"
    dino, poa = step.build_trainers(FLAGS.config, step.parse_overrides(FLAGS.overrides),
                                    FLAGS.batch, 512, 128, 1024, 1, with_dino=not poa_variant)
    trainer = dino
    if poa_variant:
        width, depth = (int(v) for v in FLAGS.variant.lower().split("x"))
        poa.pinned_subnet = ViTSubnet(width, depth)
        trainer = poa
    data = step._batch(FLAGS.batch, trainer.backbone.image_size, 4)
    first = step._step(trainer, data)
    times = [step._step(trainer, data) for _ in range(FLAGS.steps)]
    print(json.dumps({"first_s": first, "times_s": times}), flush=True)


def run():
    script = os.path.abspath(__file__)
    args = [f"--config={FLAGS.config}", f"--overrides={FLAGS.overrides}",
            f"--variant={FLAGS.variant}", f"--batch={FLAGS.batch}", f"--steps={FLAGS.steps}"]
    for backend in FLAGS.backends:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        times = {"off": [], "on": []}
        first = {"off": [], "on": []}
        for r in range(FLAGS.rounds):
            for setting in (("off", "on") if r % 2 == 0 else ("on", "off")):
                proc = subprocess.run([sys.executable, script, f"--worker={setting}"] + args,
                                      env=env, capture_output=True, text=True, check=False)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
                if proc.returncode != 0 or not lines:
                    sys.exit(f"{backend} {setting} failed (rc {proc.returncode}):\n"
                             + proc.stderr[-3000:])
                record = json.loads(lines[-1])
                times[setting] += record["times_s"]
                first[setting].append(round(record["first_s"], 2))
        median = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "backend": backend, "config": FLAGS.config, "overrides": FLAGS.overrides,
            "variant": FLAGS.variant, "batch": FLAGS.batch, "steps_per_setting": len(times["on"]),
            "median_s": {k: round(v, 4) for k, v in median.items()},
            "iqr_s": {k: quartiles(v) for k, v in times.items()},
            "first_step_s": first, "on_over_off": round(median["on"] / median["off"], 3)}),
            flush=True)


def main(argv):
    del argv
    worker() if FLAGS.worker else run()


if __name__ == "__main__":
    app.run(main)
