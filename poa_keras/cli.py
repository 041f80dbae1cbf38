"""The ``poa-keras`` command.

    poa-keras demo      build the demo elastic teacher, list its subnets, extract one and run it
    poa-keras info      backend, registered presets and named configurations
    poa-keras subnets   the subnet grid of a preset: size, parameters, blocks, sampling weight
    poa-keras extract   write one subnet of a preset as a standalone preset directory
    poa-keras pretrain  run (or resume) a pretraining recipe: `--recipe=demo` (the default) is
                        POA on the embedded shapes data, about 10 minutes on 2 CPU cores
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

COMMANDS = ("demo", "info", "subnets", "extract", "pretrain")

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "poa_vit_demo",
                    "Registered preset name or preset directory (see `poa-keras info`).")
flags.DEFINE_string("config", None, "A named configuration (e.g. vit_elastic_demo) to build "
                    "with random weights instead of a preset.")
flags.DEFINE_enum("weights", "auto", ["auto", "yes", "no"],
                  "Load the preset's weights: auto = when they exist (a registered preset whose "
                  "weights are not published yet is built with random weights).")
flags.DEFINE_integer("width", None, "Subnet width (a multiple of the head dim).")
flags.DEFINE_integer("depth", None, "Subnet depth (number of blocks).")
flags.DEFINE_string("subnet", None, "A named size instead of --width/--depth (e.g. small).")
flags.DEFINE_string("output", None, "Directory to write (extract: required).")
flags.DEFINE_integer("batch_size", 4, "Images per batch in the demo.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("recipe", "demo", "pretrain: a shipped recipe name (demo, demo_dino, "
                    "poa_vit_l16_in1k, dino_vit_s16_in1k) or a .py file defining RECIPE.")
flags.DEFINE_string("data", None, "pretrain: an image folder to train on (sets data.source="
                    "'folder' and data.path).")
flags.DEFINE_multi_string("override", [], "pretrain: section.key=value changes of the recipe, "
                          "e.g. --override=train.epochs=1 (repeatable; values are Python "
                          "literals).")
flags.DEFINE_integer("epochs", None, "pretrain: stop after this many epochs (the schedules keep "
                     "the recipe's length; run again to resume).")
flags.DEFINE_bool("resume", True, "pretrain: resume from the latest checkpoint in --output.")
flags.DEFINE_enum("verbose", "1", ["0", "1", "2"], "pretrain: 1 = progress bar with every loss "
                  "term, 2 = one line per epoch, 0 = silent.")


def _usage():
    return (f"usage: poa-keras <{'|'.join(COMMANDS)}> [--flags]\n"
            "       poa-keras --help shows every flag")


def _load_backbone():
    from poa_keras import Backbone, ElasticViT, presets
    if FLAGS.config:
        return ElasticViT.from_config_name(FLAGS.config)
    source = FLAGS.preset
    load = FLAGS.weights != "no"
    if FLAGS.weights == "auto" and not os.path.isdir(source):
        card = presets.get_card(source)
        if not (card.get("weights") or {}).get("url"):
            print(f"note: preset {source!r} has no published weights yet; using random weights")
            load = False
    return Backbone.from_preset(source, load_weights=load)


def _subnet(backbone):
    if FLAGS.subnet and (FLAGS.width is not None or FLAGS.depth is not None):
        raise ValueError("give either --subnet or --width/--depth, not both")
    if FLAGS.subnet:
        return backbone.resolve_subnet(FLAGS.subnet)
    if FLAGS.width is None and FLAGS.depth is None:
        return None
    return backbone.subnet_from_kwargs(width=FLAGS.width, depth=FLAGS.depth)


def _print_grid(backbone):
    freq = backbone.sampler().frequencies()
    names = {spec: name for name, spec in backbone.named_subnets.items()}
    print(f"{'width':>6} {'depth':>6} {'heads':>6} {'params':>12} {'p(draw)':>8}  name")
    for spec in backbone.subnets():
        print(f"{spec.width:>6} {spec.depth:>6} {spec.width // backbone.head_dim:>6} "
              f"{backbone.subnet_params(spec):>12,} {freq.get(spec, 0.0):>8.4f}  "
              f"{names.get(spec, '')}")
    print(f"{len(backbone.subnets())} subnets; the intact network (p=0) is trained by the intact "
          "student, the others are drawn for the elastic student")


def cmd_info():
    import keras

    from poa_keras import __version__, presets
    from poa_keras.backbones import VIT_CONFIGS
    print(f"poa_keras {__version__}, keras {keras.__version__}, backend "
          f"{keras.backend.backend()}")
    print("registered presets:")
    for name, card in presets.list_presets().items():
        weights = "weights published" if (card.get("weights") or {}).get("url") else \
            "no weights yet"
        print(f"  {name:<16} {card['architecture']['class_name']} "
              f"({card['architecture']['config_name']}), {weights}: {card['description']}")
    print("named configurations:", ", ".join(sorted(VIT_CONFIGS)))


def cmd_subnets():
    _print_grid(_load_backbone())


def cmd_extract():
    if not FLAGS.output:
        raise ValueError("extract needs --output=DIR, the preset directory to write")
    backbone = _load_backbone()
    spec = _subnet(backbone)
    if spec is None:
        raise ValueError("extract needs --width/--depth or --subnet; valid widths "
                         f"{backbone.widths}, depths {backbone.depths[0]}..{backbone.depths[-1]}"
                         f", named sizes {sorted(backbone.named_subnets)}")
    sub = backbone.extract(spec)
    sub.save_to_preset(FLAGS.output)
    print(f"wrote {spec} ({sub.count_params():,} parameters) to {FLAGS.output}")


def cmd_demo():
    import keras
    import numpy as np

    keras.utils.set_random_seed(FLAGS.seed)
    start = time.perf_counter()
    backbone = _load_backbone()
    print(f"built {backbone.name}: {backbone.count_params():,} parameters, "
          f"{len(backbone.subnets())} subnets ({time.perf_counter() - start:.1f} s)")
    _print_grid(backbone)
    spec = _subnet(backbone) or backbone.resolve_subnet(
        "small" if "small" in backbone.named_subnets else backbone.subnets()[0])
    start = time.perf_counter()
    sub = backbone.extract(spec)
    print(f"extracted {spec}: {sub.count_params():,} parameters "
          f"({time.perf_counter() - start:.2f} s)")
    size = backbone.image_size
    images = np.random.default_rng(FLAGS.seed).uniform(
        -1, 1, (FLAGS.batch_size, size, size, backbone.in_channels)).astype("float32")
    elastic = backbone.compiled_forward(spec)(images)
    out = sub.compiled_forward()(images)
    diff = float(np.abs(keras.ops.convert_to_numpy(out["cls"])
                        - keras.ops.convert_to_numpy(elastic["cls"])).max())
    print(f"ran the extracted subnet on {images.shape}: cls {tuple(out['cls'].shape)}, "
          f"patch tokens {tuple(out['patch_tokens'].shape)}; max |extracted - elastic| = "
          f"{diff:.2e}")
    if FLAGS.output:
        sub.save_to_preset(FLAGS.output)
        print(f"saved the subnet as a preset in {FLAGS.output}")


def cmd_pretrain():
    from poa_keras.methods.checkpoint import NonFiniteLoss
    from poa_keras.methods.pretrain import load_recipe, pretrain

    overrides = list(FLAGS.override)
    if FLAGS.data:
        overrides += ["data.source=folder", f"data.path={FLAGS.data}"]
    recipe = load_recipe(FLAGS.recipe, overrides)
    output = FLAGS.output or os.path.join("runs", recipe.get("name") or "recipe")
    import keras

    print(f"pretraining recipe {recipe.get('name', FLAGS.recipe)!r} ({recipe['method']}, "
          f"{recipe['backbone']['config']}) on the {keras.backend.backend()} backend into "
          f"{output}")
    start = time.perf_counter()
    try:
        result = pretrain(recipe, output, resume=FLAGS.resume, epochs=FLAGS.epochs,
                          verbose=int(FLAGS.verbose))
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    trainer = result.trainer
    if result.resumed_from:
        print(f"resumed from {result.resumed_from}")
    if result.history:
        last = result.history[-1]
        terms = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "dino_intact", "dino_elastic",
                                                          "same_view", "koleo", "dino")
                          if k in last)
        print(f"epoch {int(last['epoch'])}/{recipe['train']['epochs']}: {terms}")
    report = trainer.compilation_report()
    print(f"{report['plans_seen']} plans run, {report['num_compilations']} step programs "
          f"compiled ({report['backend']}); {time.perf_counter() - start:.0f} s")
    teacher = os.path.join(output, "teacher")
    if os.path.isdir(teacher):
        print(f"teacher preset: {teacher}  (Backbone.from_preset({teacher!r}, width=..., "
              "depth=...))")
    return 0


def main(argv):
    logging.set_verbosity(logging.WARNING)  # JAX reports its backend search at INFO
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = argv[1] if len(argv) > 1 else "nothing"
        raise app.UsageError(f"unknown command {got!r}; valid commands: {', '.join(COMMANDS)}\n"
                             + _usage())
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[2:]}; flags look like --name=value")
    try:
        return globals()[f"cmd_{argv[1]}"]() or 0
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)


if __name__ == "__main__":
    run()
