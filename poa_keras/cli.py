"""The ``poa-keras`` command: pretrain once, then sweep, extract, fine-tune and export any size.

usage: poa-keras <command> [--flags]      (KERAS_BACKEND=jax|tensorflow|torch picks the backend)

    pretrain  run (or resume) a pretraining recipe: `--recipe=demo` (the default) is POA on the
              embedded shapes data, about 10 minutes on 2 CPU cores
    sweep     k-NN top-1, parameters, FLOPs and latency of every subnet of a teacher (with
              --bits also at every bit-width, PTQ); writes sweep.csv, sweep.json and sweep.png
              into --output; --budget_* picks the best fit
    analyze   layer-wise analysis (MAE-Lite): linear CKA between the layers of a model, or of
              two models or subnets (--preset_b / --subnet_b), on the same images; attention
              distance and entropy per layer and head (ViT); writes analysis.json, cka.png and
              attention_*.png into --output
    extract   write one subnet of a teacher as a standalone preset directory
    finetune  train an ImageClassifier on a subnet (embedded shapes or an image folder), report
              the val accuracy before and after, save the model (.keras); with --recipe, run
              (or resume) a fine-tuning recipe: `--recipe=demo_finetune` fine-tunes the demo
              teacher, MAE-Lite's recipe scaled down; `--recipe=demo_tinyvit` distils a tiny
              TinyViT from a teacher's stored soft labels (--teacher: any classifier)
    distill-store  run a teacher ONCE over the data for --epochs augmented epochs and keep
              per image and epoch (seed, top-K ids, top-K probabilities) in --output (TinyViT's
              soft-label store); the fine-tuning recipes' distill.store reads it
    export    write one subnet (optionally int8) as deployable artefacts (preset, SavedModel,
              ONNX, LiteRT, torch .pt2 as the backend allows) with sizes, checks and the int8
              accuracy change
    convert   an officially released checkpoint (DINO, DINOv2, MAE, MAE-Lite, TinyViT) -> a
              preset: --source names the zoo preset it is, --checkpoint the file or URL (the
              card's URL by default); prints the file's sha256 (docs/zoo.md)
    info      backend, registered presets, every family's named configurations, export formats
    subnets   the subnet grid of a teacher: size, parameters, sampling weight, names
    demo      build the demo elastic teacher, list its subnets, extract one and run it

The model comes from --preset (a registered name or a preset directory) or --config (a named
configuration with random weights, e.g. vit_elastic_test, swin_elastic_test,
resnet_elastic_test); the size from --subnet (a name such as small, or fields such as
width=48,depth=3 or, for a ResNet, width=8,depths=1-1-2-1) or --width/--depth.

`poa-keras COMMAND --help` lists the flags of one command.

Examples (tiny, seconds on a CPU):
    poa-keras info
    poa-keras sweep --config=vit_elastic_test --num_train=64 --num_val=32 --output=/tmp/sw
    poa-keras extract --config=vit_elastic_test --subnet=small --output=/tmp/small
    poa-keras finetune --config=vit_elastic_test --subnet=small --epochs=1 --output=/tmp/ft
    poa-keras export --config=vit_elastic_test --subnet=small --quantize=int8 --output=/tmp/ex
See docs/cli.md for every flag.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import textwrap
import time
import warnings

from absl import app, flags, logging

COMMANDS = ("pretrain", "sweep", "analyze", "extract", "finetune", "distill-store", "export",
            "convert", "info", "subnets", "demo")

FLAGS = flags.FLAGS
# -- the model
flags.DEFINE_string("preset", "poa_vit_demo",
                    "Registered preset name or preset directory (see `poa-keras info`).")
flags.DEFINE_string("config", None, "A named configuration of any family (e.g. "
                    "vit_elastic_test, swin_elastic_test, resnet_elastic_test) built with random "
                    "weights instead of a preset (see `poa-keras info`).")
flags.DEFINE_enum("weights", "auto", ["auto", "yes", "no"],
                  "Load the preset's weights: auto = when they exist (a registered preset whose "
                  "weights are not published yet is built with random weights).")
flags.DEFINE_string("subnet", None, "The size: a named size (e.g. small), or spec fields, e.g. "
                    "width=48,depth=3 (ViT, Swin) or width=8,depths=1-1-2-1 (ResNet). Default: "
                    "the intact network.")
flags.DEFINE_integer("width", None, "Subnet width (instead of --subnet).")
flags.DEFINE_integer("depth", None, "Subnet depth (ViT: blocks; Swin: stage-3 blocks).")
flags.DEFINE_string("output", None, "Where to write: a directory (sweep, analyze, extract, "
                    "finetune, export, pretrain; optional for sweep and demo).")
flags.DEFINE_integer("batch_size", None, "Images per batch (demo: 4, sweep: 64 per feature "
                     "pass, analyze: 64 per forward pass and CKA minibatch, finetune: 32 per "
                     "step).")
flags.DEFINE_integer("seed", 0, "Random seed (data, initialisation).")
# -- data (sweep, finetune, export)
flags.DEFINE_string("data", None, "pretrain: an image folder to train on; sweep / finetune / "
                    "export: an image folder with one sub-folder per class (split into train "
                    "and val by --val_fraction); analyze: any image folder (labels unused). "
                    "Default: the embedded shapes data.")
flags.DEFINE_integer("num_train", 512, "sweep / finetune / export: shapes images of the train "
                     "split (the k-NN bank).")
flags.DEFINE_integer("num_val", 256, "sweep / finetune / export: shapes images of the val "
                     "split (the k-NN queries).")
flags.DEFINE_integer("image_size", None, "Image side for the data (default: the model's).")
flags.DEFINE_float("val_fraction", 0.2, "--data folders: the share of images held out for val.")
flags.DEFINE_enum("on_bad_image", "error", ["error", "skip"], "--data folders: every image is "
                  "decoded once first; a file that does not decode stops the command, naming "
                  "it (error), or is left out (skip, with a count).")
# -- pretrain
flags.DEFINE_string("recipe", "demo", "pretrain: a shipped recipe name (demo, demo_dino, "
                    "poa_vit_l16_in1k, dino_vit_s16_in1k) or a .py file defining RECIPE. "
                    "finetune: a fine-tuning recipe (demo_finetune, finetune_mae_tiny_in1k) or "
                    "a .py file defining FINETUNE_RECIPE; without it, finetune runs from its "
                    "flags. Each command refuses the other's recipes. distill-store: a "
                    "distillation recipe (one with a distill section; default demo_tinyvit).")
flags.DEFINE_string("teacher", None, "finetune --recipe (a distillation recipe, e.g. "
                    "demo_tinyvit) / distill-store: the teacher, an ImageClassifier preset (a "
                    "directory such as a fine-tuning run's classifier/, or a registered name) "
                    "or a .keras file (loaded in safe mode); sets distill.teacher.")
flags.DEFINE_integer("topk", None, "distill-store: K, the teacher probabilities kept per image "
                     "and epoch (default: the recipe's distill.topk, 10).")
flags.DEFINE_multi_string("override", [], "pretrain / finetune --recipe / distill-store: "
                          "section.key=value "
                          "changes of the recipe, e.g. --override=train.epochs=1 (repeatable; "
                          "values are Python literals).")
flags.DEFINE_integer("epochs", None, "pretrain, finetune --recipe: stop after this many epochs "
                     "(the schedules keep the recipe's length; run again to resume). finetune "
                     "without a recipe: epochs (default 3). distill-store: the augmented epochs "
                     "to store (default: the recipe's distill.store_epochs).")
flags.DEFINE_string("compilation_cache", "auto", "pretrain / finetune --recipe (JAX): the "
                    "persistent compilation "
                    "cache: auto (the one JAX already uses, else user), user (in the Keras "
                    "cache), run (in --output), off, or a directory.")
flags.DEFINE_bool("resume", True, "pretrain, finetune --recipe: resume from the latest "
                  "checkpoint in --output.")
flags.DEFINE_list("allow_recipe_change", [], "pretrain: recipe keys a resumed run may change, "
                  "e.g. train.lr,train.epochs (the schedules, train.epochs and the checkpoint "
                  "settings; give the new values with --override). Any other change is "
                  "refused.")
flags.DEFINE_enum("verbose", "1", ["0", "1", "2"], "pretrain / finetune: 1 = progress bar, 2 = "
                  "one line per epoch, 0 = silent.")
# -- sweep
flags.DEFINE_string("subnets", "all", "sweep: 'all' (the whole grid) or sizes separated by ';' "
                    "(names may also be separated by ','), e.g. 'small;width=48,depth=3'.")
flags.DEFINE_integer("k", 20, "sweep / export: the k of the weighted k-NN.")
flags.DEFINE_float("temperature", 0.07, "sweep / export: k-NN vote temperature T.")
flags.DEFINE_bool("latency", True, "sweep: time each extracted subnet.")
flags.DEFINE_integer("latency_runs", 10, "sweep: timed interleaved rounds (every subnet once "
                     "per round; median ± interquartile range reported).")
flags.DEFINE_integer("latency_batch", 8, "sweep: images per timed call.")
flags.DEFINE_float("budget_params", None, "sweep: print the best subnet with at most this many "
                   "parameters (combines with the other budgets).")
flags.DEFINE_float("budget_flops", None, "sweep: ... at most this many FLOPs per image.")
flags.DEFINE_float("budget_latency_ms", None, "sweep: ... at most this latency (ms per timed "
                   "batch).")
flags.DEFINE_string("bits", None, "sweep: also evaluate every subnet fake-quantized (PTQ) at "
                    "these weight/activation bit pairs, e.g. 32,8/8,5/5,4/4,3/3,2/4 (2..8 bits, "
                    "32 = float): one row per subnet and pair, with its size in bytes and its "
                    "BitOPs.")
flags.DEFINE_float("budget_bytes", None, "sweep (with --bits): ... at most this many bytes of "
                   "weights at the row's bit-width.")
# -- analyze
flags.DEFINE_string("preset_b", None, "analyze: a second model (registered preset name or preset "
                    "directory) to compare with the first on the same images (CKA between the "
                    "layers of the two).")
flags.DEFINE_string("subnet_b", None, "analyze: the size of the second model (as --subnet); "
                    "without --preset_b, a second subnet of the first model.")
flags.DEFINE_integer("num_images", 256, "analyze: images to analyse (the first of --data, or "
                     "shapes images; at least 4).")
flags.DEFINE_enum("attention", "auto", ["auto", "yes", "no"], "analyze: the attention distance "
                  "and entropy: auto = for the models that have global attention (ViT), yes = "
                  "required (an error for other families), no = CKA only.")
flags.DEFINE_integer("calibration_images", 100, "sweep (with --bits): calibrate every subnet "
                     "on the first this many train images (SSQL: 100).")
# -- finetune
flags.DEFINE_float("lr", 1e-3, "finetune: peak learning rate (AdamW).")
flags.DEFINE_float("weight_decay", 0.05, "finetune: AdamW weight decay.")
flags.DEFINE_float("layer_decay", 1.0, "finetune: layer-wise lr decay (ViT, e.g. 0.75; 1 = off).")
flags.DEFINE_enum("pooling", "cls", ["cls", "avg", "avg_norm"], "finetune: the head reads the "
                  "cls token, the mean patch token, or that mean through a LayerNorm (avg_norm: "
                  "MAE-Lite's fc_norm) (ViT; others use their pooled output).")
# -- export
flags.DEFINE_string("source", None, "convert: the zoo preset the checkpoint is (e.g. "
                    "dino_vit_b16, dinov2_vit_s14, mae_vit_b16_full, tinyvit_5m_22kto1k; "
                    "`poa-keras info` lists them).")
flags.DEFINE_string("checkpoint", None, "convert: the official checkpoint, a local file or an "
                    "https:// / file:// URL (default: the card's URL).")
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "export: quantize a copy with "
                  "model.quantize('int8') before exporting it.")
flags.DEFINE_string("formats", "auto", "export: comma-separated formats among preset, "
                    "tf_saved_model, onnx, openvino, litert, torch; auto = every one this "
                    "backend exports for this model (see `poa-keras info`).")
flags.DEFINE_bool("eval", True, "export: report the k-NN top-1 of the float (and int8) subnet "
                  "on the data (--num_train / --num_val shapes, or --data).")
flags.DEFINE_integer("export_batch_size", None, "export: fix the batch of every artefact "
                     "(default: any batch where the format allows it, else 1).")
flags.DEFINE_bool("overwrite", False, "export: replace an earlier export at --output.")


_MODEL_FLAGS = ("preset", "config", "weights", "seed")
_SIZE_FLAGS = ("subnet", "width", "depth")
_DATA_FLAGS = ("data", "num_train", "num_val", "image_size", "val_fraction", "on_bad_image")
COMMAND_FLAGS = {   # the flags each command reads (`poa-keras COMMAND --help` lists them)
    "pretrain": ("recipe", "output", "override", "epochs", "resume", "allow_recipe_change",
                 "data", "on_bad_image", "verbose", "compilation_cache"),
    "sweep": _MODEL_FLAGS + ("subnets", "k", "temperature", "batch_size", "latency",
                             "latency_batch", "latency_runs", "budget_params", "budget_flops",
                             "budget_latency_ms", "bits", "budget_bytes",
                             "calibration_images") + _DATA_FLAGS + ("output", "verbose"),
    "analyze": _MODEL_FLAGS + _SIZE_FLAGS + ("preset_b", "subnet_b", "num_images", "batch_size",
                                             "attention", "data", "image_size", "on_bad_image",
                                             "output", "verbose"),
    "extract": _MODEL_FLAGS + _SIZE_FLAGS + ("output",),
    "finetune": ("recipe", "override", "teacher", "resume", "compilation_cache") + _MODEL_FLAGS
    + _SIZE_FLAGS + ("epochs", "batch_size", "lr", "weight_decay",
                                              "layer_decay", "pooling") + _DATA_FLAGS
    + ("output", "verbose"),
    "export": _MODEL_FLAGS + _SIZE_FLAGS + ("quantize", "formats", "export_batch_size",
                                            "overwrite", "eval", "k", "temperature")
    + _DATA_FLAGS + ("output",),
    "distill-store": ("teacher", "recipe", "override", "data", "on_bad_image", "epochs", "topk",
                      "output", "verbose"),
    "convert": ("source", "checkpoint", "output"),
    "info": (),
    "subnets": _MODEL_FLAGS,
    "demo": _MODEL_FLAGS + _SIZE_FLAGS + ("batch_size", "output"),
}
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def _usage():
    return (f"usage: poa-keras <{'|'.join(COMMANDS)}> [--flags]\n"
            "       poa-keras --help describes the commands, poa-keras COMMAND --help lists "
            "the flags of one")


def command_summaries():
    """{command: its description in the module docstring}."""
    found, current = {}, None
    for line in __doc__.splitlines():
        match = re.match(r"^    ([\w-]+)\s{2,}(.*)$", line)
        if match and match.group(1) in COMMANDS:
            current = match.group(1)
            found[current] = match.group(2).strip()
        elif current and re.match(r"^\s{10,}\S", line):
            found[current] += " " + line.strip()
        else:
            current = None
    return found


def _flag_line(name):
    flag = FLAGS[name]
    default = flag.default
    if isinstance(default, list):
        default = ",".join(map(str, default))
    shown = f"--{name}" + ("" if default in (None, "") else f"={default}")
    text = re.sub(r";\s*repeat this option to specify a list of values", " (repeatable)",
                  flag.help)
    text = textwrap.fill(text, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return f"  {shown}\n{text}"


def command_help(command=None):
    """What ``poa-keras [COMMAND] --help`` prints: one command's description and flags, or
    the module docstring and every command's flags (``--helpfull``: command=\"all\")."""
    if command is None:
        return __doc__.strip() + "\n"
    if command == "all":
        lines = [__doc__.strip(), "", "flags:"]
        seen = []
        for names in COMMAND_FLAGS.values():
            seen += [n for n in names if n not in seen]
        return "\n".join(lines + [_flag_line(n) for n in seen]) + "\n"
    names = COMMAND_FLAGS[command]
    lines = [f"usage: poa-keras {command}" + (" [--flags]" if names else ""), "",
             textwrap.fill(command_summaries().get(command, ""), width=96), ""]
    if names:
        lines += ["flags:"] + [_flag_line(n) for n in names]
    else:
        lines += ["no flags"]
    return "\n".join(lines + ["", "See docs/cli.md for examples."]) + "\n"


def _help_request(argv):
    """The help ``argv`` asks for: None (no help flag), a command, "" (general) or "all"."""
    args = argv[1:]
    asked = [a for a in args if a.split("=")[0] in HELP_FLAGS
             and a.split("=", 1)[-1].lower() not in ("false", "0")]
    if not asked:
        return None
    if any(a.startswith("--helpfull") for a in asked):
        return "all"
    command = next((a for a in args if a in COMMANDS), None)
    return command or ""


def _say(message):
    print(message, flush=True)


# ----- the model and its size --------------------------------------------------------------

def _load_backbone(preset=None):
    """The model of --config, else of --preset; ``preset``: that preset instead (analyze's
    --preset_b)."""
    from poa_keras import Backbone, presets
    from poa_keras.backbones import from_config_name
    from poa_keras.files import recover_directory
    if FLAGS.config and preset is None:
        import keras

        keras.utils.set_random_seed(FLAGS.seed)   # the same random weights for the same seed
        return from_config_name(FLAGS.config)
    source = FLAGS.preset if preset is None else preset
    load = FLAGS.weights != "no"
    recover_directory(source)   # a save killed between its two renames left the old one aside
    if FLAGS.weights == "auto" and not os.path.isdir(source):
        card = presets.get_card(source)
        if not (card.get("weights") or {}).get("url"):
            _say(f"note: preset {source!r} has no published weights; using random weights")
            load = False
    return Backbone.from_preset(source, load_weights=load)


def _parse_value(key, text):
    text = text.strip()
    try:
        if "-" in text.strip("-"):
            return tuple(int(t) for t in text.split("-"))
        return int(text)
    except ValueError:
        raise ValueError(f"bad subnet value {key}={text!r}: give an integer or integers joined "
                         "by '-' (e.g. depths=3-4-6-3)") from None


def parse_subnet(backbone, text):
    """A spec from --subnet text: a named size, or fields 'width=48,depth=3' /
    'width=64,depths=3-4-6-3' (missing fields: the intact network's)."""
    text = (text or "").strip()
    if not text:
        raise ValueError("empty subnet; give a named size or fields such as width=48,depth=3")
    fields = [f.name for f in dataclasses.fields(backbone.subnet_class)]
    if "=" not in text:
        if text not in backbone.named_subnets:
            raise ValueError(f"unknown subnet {text!r} for {backbone.name}; named sizes: "
                             f"{sorted(backbone.named_subnets) or 'none'}, or give fields of "
                             f"{backbone.subnet_class.__name__} ({', '.join(fields)}), e.g. "
                             f"{_example(backbone)}")
        return backbone.resolve_subnet(text)
    kwargs = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"bad subnet {text!r}: write name=value pairs separated by ',', "
                             f"e.g. {_example(backbone)}")
        if key not in fields:
            raise ValueError(f"bad subnet {text!r}: {key!r} is not a field of "
                             f"{backbone.subnet_class.__name__}; its fields: {fields}")
        kwargs[key] = _parse_value(key, value)
    return backbone.subnet_from_kwargs(**kwargs)


def _example(backbone):
    spec = backbone.subnets()[0]
    return ",".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, tuple) else v}"
                    for k, v in dataclasses.asdict(spec).items())


def _subnet(backbone):
    if FLAGS.subnet and (FLAGS.width is not None or FLAGS.depth is not None):
        raise ValueError("give either --subnet or --width/--depth, not both")
    if FLAGS.subnet:
        return parse_subnet(backbone, FLAGS.subnet)
    if FLAGS.width is None and FLAGS.depth is None:
        return None
    kwargs = {k: v for k, v in (("width", FLAGS.width), ("depth", FLAGS.depth)) if v is not None}
    return backbone.subnet_from_kwargs(**kwargs)


def _grid_hint(backbone):
    specs = backbone.subnets()
    return (f"named sizes {sorted(backbone.named_subnets)}; the grid runs from {specs[0]} to "
            f"{specs[-1]} ({len(specs)} subnets, `poa-keras subnets` lists them), e.g. "
            f"--subnet={_example(backbone)}")


def _spec_text(spec):
    return ", ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, tuple) else v}"
                     for k, v in dataclasses.asdict(spec).items())


def _print_grid(backbone):
    freq = backbone.sampler().frequencies()
    names = {backbone.resolve_subnet(s): n for n, s in backbone.named_subnets.items()}
    fields = [f.name for f in dataclasses.fields(backbone.subnet_class)]

    def cell(v):
        return "-".join(map(str, v)) if isinstance(v, tuple) else str(v)

    rows = [[cell(getattr(spec, f)) for f in fields]
            + [f"{backbone.subnet_params(spec):,}", f"{freq.get(spec, 0.0):.4f}",
               names.get(spec, "")] for spec in backbone.subnets()]
    header = fields + ["params", "p(draw)", "name"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        _say("  ".join(c.rjust(w) if i < len(header) - 1 else c
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    _say(f"{len(backbone.subnets())} subnets; the intact network (p=0) is trained by the intact "
         "student, the others are drawn for the elastic student")


# ----- data ---------------------------------------------------------------------------------

def _labelled_data(image_size, seed=None):
    """((train images, labels), (val images, labels), class names): the embedded shapes data
    (--num_train / --num_val), or --data, a folder with one sub-folder per class."""
    import numpy as np

    seed = FLAGS.seed if seed is None else seed
    if FLAGS.data:
        if not os.path.isdir(FLAGS.data):
            raise ValueError(f"--data={FLAGS.data!r} is not a directory (it should hold one "
                             "sub-folder of images per class)")
        from poa_keras.data import images_from_directory, train_val_split

        dataset, names = images_from_directory(FLAGS.data, image_size=image_size,
                                               with_labels=True, on_bad_image=FLAGS.on_bad_image,
                                               progress=FLAGS.verbose != "0")
        images, labels = [], []
        for image, label in dataset.as_numpy_iterator():
            images.append(image)
            labels.append(label)
        images, labels = np.stack(images), np.asarray(labels, np.int32)
        if len(names) < 2:
            raise ValueError(f"--data={FLAGS.data!r} has {len(names)} class folder(s); "
                             "classification needs at least 2")
        train, val = train_val_split(images, labels, val_fraction=FLAGS.val_fraction, seed=seed)
        if len(train[0]) == 0 or len(val[0]) == 0:
            raise ValueError(f"--data={FLAGS.data!r}: {len(images)} images leave an empty split "
                             f"at --val_fraction={FLAGS.val_fraction}")
        _say(f"data: {FLAGS.data} ({len(names)} classes), {len(train[0])} train / "
             f"{len(val[0])} val images of {image_size} px")
        return train, val, list(names)
    for flag in ("num_train", "num_val"):
        if getattr(FLAGS, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(FLAGS, flag)}")
    from poa_keras.data import load_shapes

    train, val, names = load_shapes(FLAGS.num_train, FLAGS.num_val, image_size=image_size,
                                    seed=seed)
    _say(f"data: the embedded shapes, {len(train[0])} train / {len(val[0])} val images of "
         f"{image_size} px, {len(names)} classes")
    return train, val, list(names)


def _image_size(backbone, preprocessed=True):
    """--image_size (default: the model's), checked before any data is made: the size the
    network will see (``preprocessed``: after the backbone's preprocessing, which may resize
    the images; else that size itself) must suit it (a ViT or Swin takes multiples of its
    patch size)."""
    size = FLAGS.image_size or int(backbone.image_size)
    if size < 8:
        raise ValueError(f"--image_size must be >= 8, got {size}")
    seen = (size, size)
    preprocessing = getattr(backbone, "preprocessing", None) if preprocessed else None
    if hasattr(preprocessing, "output_size"):
        seen = tuple(int(s) for s in preprocessing.output_size(size, size))
    try:
        backbone.subnet_flops(None, image_size=seen)   # the family's own size check
    except ValueError as error:
        resized = "" if seen == (size, size) else f" (resized to {seen[0]}x{seen[1]})"
        raise ValueError(f"--image_size={size}{resized}: {error}") from None
    return size


def _require_output(command):
    if not FLAGS.output:
        raise ValueError(f"{command} needs --output=DIR, the directory to write")
    return FLAGS.output


# ----- commands -----------------------------------------------------------------------------

def cmd_info():
    import keras

    from poa_keras import presets
    from poa_keras.backbones import BACKBONE_CLASSES
    from poa_keras.version import __version__
    from poa_keras.export import available_formats

    _say(f"poa_keras {__version__}, keras {keras.__version__}, backend "
         f"{keras.backend.backend()}")
    _say("registered presets:")
    for name, card in presets.list_presets().items():
        _say(f"  {name:<20} {card['architecture']['class_name']} "
             f"({card['architecture']['config_name']}), {presets.weights_status(card)}: "
             f"{card['description']}")
    _say("named configurations (--config):")
    for class_name, cls in BACKBONE_CLASSES.items():
        _say(f"  {class_name}: {', '.join(sorted(cls.configs))}")
    _say(f"export formats on the {keras.backend.backend()} backend:")
    for fmt, reason in available_formats().items():
        _say(f"  {fmt:<15} {'yes' if reason is None else 'no: ' + reason}")


ZOO_TABLE_BEGIN = "<!-- zoo table: generated from zoo/*.json by tests/test_zoo.py -->"
ZOO_TABLE_END = "<!-- end of the zoo table -->"


def zoo_table():
    """docs/zoo.md's table, one row per registered preset, from the zoo cards alone (name,
    family, parameters of the architecture, source, licence, digest rule, status)."""
    from poa_keras import presets

    rows = ["| preset | family (configuration) | parameters | source | licence | digest | "
            "status |", "| --- | --- | ---: | --- | --- | --- | --- |"]
    for name, card in presets.list_presets().items():
        arch, weights = card["architecture"], card.get("weights") or {}
        klass = presets.registered_class(presets.registered_name_of(arch["class_name"]))
        params = klass.unbuilt(config_name=arch["config_name"]).subnet_params()
        if weights.get("sha256"):
            digest = f"sha256 `{weights['sha256'][:12]}…`"
        elif weights.get("url") or weights.get("file") or weights.get("format"):
            digest = weights.get("digest", presets.TRUST_ON_FIRST_USE)
        else:
            digest = "-"
        status = presets.weights_status(card)
        source = card.get("source", card.get("paper", ""))
        rows.append(f"| `{name}` | {arch['class_name']} ({arch['config_name']}) | "
                    f"{params / 1e6:.1f} M | {source} | {card['license']} | {digest} | "
                    f"{status} |")
    return "\n".join(rows)


def cmd_subnets():
    _print_grid(_load_backbone())


def cmd_convert():
    from poa_keras import convert, presets

    output = _require_output("convert")
    convertible = {name: card for name, card in presets.list_presets().items()
                   if (card.get("weights") or {}).get("format") in convert.FORMATS}
    name = FLAGS.source
    if name not in convertible:
        raise ValueError(f"convert needs --source, one of the zoo presets with an official "
                         f"checkpoint; got {name!r}; valid: {', '.join(sorted(convertible))}")
    card = convertible[name]
    weights = card["weights"]
    checkpoint = FLAGS.checkpoint or weights.get("url")
    if not checkpoint:
        raise ValueError(f"--source={name} has no direct download "
                         f"({weights.get('status', 'no URL')}); give --checkpoint=FILE")
    card_file = checkpoint == weights.get("url")
    with presets.cache_lock(name):
        if "://" in checkpoint:   # downloaded once into the cache, with the preset's digest rule
            # a URL other than the card's gets its own cache name and no trust record
            suffix = f"{weights['format']}.checkpoint" if card_file else \
                f"{weights['format']}.{presets.sha256_of_text(checkpoint)[:12]}.checkpoint"
            path, digest, first_use = presets.download(
                name, checkpoint, weights.get("sha256") if card_file else None, suffix,
                record=card_file)
        else:
            path, first_use = checkpoint, False
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"--checkpoint={path}: no such file; the file of {name} is "
                    f"{weights.get('url') or weights.get('status', 'not downloadable')}")
            digest = presets.sha256_of(path)
            if weights.get("sha256") and digest != weights["sha256"]:
                raise ValueError(f"--checkpoint={path} has sha256 {digest}, but {name}'s "
                                 f"published file has {weights['sha256']}: another file (or a "
                                 "damaged one)")
        start = time.perf_counter()
        try:
            convert.convert_file(path, card, output, sha256=digest)
        except Exception:
            if first_use:   # never trusted: a later load downloads it again
                os.remove(path)
            raise
        if first_use:
            presets.trust(name, path, digest)
    _say(f"converted {path} -> {output} ({time.perf_counter() - start:.1f} s)")
    _say(f"sha256 of the checkpoint: {digest}")
    if not weights.get("sha256"):
        _say(f"  (the card of {name} publishes none: trust-on-first-use; paste it into "
             f"zoo/{name}.json's weights.sha256 to pin it)")


def cmd_extract():
    output = _require_output("extract")
    backbone = _load_backbone()
    spec = _subnet(backbone)
    if spec is None:
        raise ValueError(f"extract needs --subnet (or --width/--depth); {_grid_hint(backbone)}")
    sub = backbone.extract(spec)
    sub.save_to_preset(output)
    _say(f"wrote {spec} ({sub.count_params():,} parameters) to {output}")


def cmd_demo():
    import keras
    import numpy as np

    keras.utils.set_random_seed(FLAGS.seed)
    start = time.perf_counter()
    backbone = _load_backbone()
    _say(f"built {backbone.name}: {backbone.count_params():,} parameters, "
         f"{len(backbone.subnets())} subnets ({time.perf_counter() - start:.1f} s)")
    _print_grid(backbone)
    spec = _subnet(backbone) or backbone.resolve_subnet(
        "small" if "small" in backbone.named_subnets else backbone.subnets()[0])
    start = time.perf_counter()
    sub = backbone.extract(spec)
    _say(f"extracted {spec}: {sub.count_params():,} parameters "
         f"({time.perf_counter() - start:.2f} s)")
    size = backbone.image_size
    images = np.random.default_rng(FLAGS.seed).uniform(
        -1, 1, (FLAGS.batch_size or 4, size, size, backbone.in_channels)).astype("float32")
    elastic = backbone.compiled_forward(spec)(images)
    out = sub.compiled_forward()(images)
    diff = float(np.abs(keras.ops.convert_to_numpy(out["cls"])
                        - keras.ops.convert_to_numpy(elastic["cls"])).max())
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items())
    _say(f"ran the extracted subnet on {images.shape}: {shapes}; max |extracted - elastic| = "
         f"{diff:.2e}")
    if FLAGS.output:
        sub.save_to_preset(FLAGS.output)
        _say(f"saved the subnet as a preset in {FLAGS.output}")


def _recipe_overrides():
    """--override entries, plus those the --data and --on_bad_image flags stand for (the
    pretraining and fine-tuning recipes share the data keys)."""
    overrides = list(FLAGS.override)
    if FLAGS.data:
        overrides += ["data.source=folder", f"data.path={FLAGS.data}"]
    if FLAGS["on_bad_image"].present:
        overrides += [f"data.on_bad_image={FLAGS.on_bad_image!r}"]
    return overrides


def cmd_pretrain():
    from poa_keras.methods.nan_guard import NonFiniteLoss
    from poa_keras.pretrain import check_allowed_changes, load_recipe, pretrain

    check_allowed_changes(FLAGS.allow_recipe_change)
    overrides = _recipe_overrides()
    recipe = load_recipe(FLAGS.recipe, overrides)
    output = FLAGS.output or os.path.join("runs", recipe.get("name") or "recipe")
    import keras

    _say(f"pretraining recipe {recipe.get('name', FLAGS.recipe)!r} ({recipe['method']}, "
         f"{recipe['backbone']['config']}) on the {keras.backend.backend()} backend into "
         f"{output}")
    start = time.perf_counter()
    try:
        result = pretrain(recipe, output, resume=FLAGS.resume, epochs=FLAGS.epochs,
                          compilation_cache=FLAGS.compilation_cache,
                          verbose=int(FLAGS.verbose),
                          allow_recipe_change=FLAGS.allow_recipe_change)
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    trainer = result.trainer
    if result.resumed_from:
        changed = "".join(f", {k} {a!r} -> {b!r}" for k, (a, b) in result.recipe_changes.items())
        _say(f"resumed from {result.resumed_from}{changed}")
    if result.history:
        last = result.history[-1]
        terms = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "dino_intact", "dino_elastic",
                                                          "same_view", "koleo", "dino")
                          if k in last)
        _say(f"epoch {int(last['epoch'])}/{recipe['train']['epochs']}: {terms}")
    report = trainer.compilation_report()
    _say(f"{report['plans_seen']} plans run, {report['num_compilations']} step programs "
         f"compiled ({report['backend']}); {time.perf_counter() - start:.0f} s")
    teacher = os.path.join(output, "teacher")
    if os.path.isdir(teacher):
        _say(f"teacher preset: {teacher}  (Backbone.from_preset({teacher!r}, width=..., "
             "depth=...))")
    return 0


def _sweep_subnets(backbone):
    text = (FLAGS.subnets or "all").strip()
    if text == "all":
        return None
    parts = text.split(";") if (";" in text or "=" in text) else text.split(",")
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise ValueError(f"--subnets={FLAGS.subnets!r} names no subnet; give 'all' or sizes "
                         "such as 'small;base'")
    return [parse_subnet(backbone, p) for p in parts]


def _sweep_bits():
    """--bits parsed (None without it); a bad pair is an error naming the valid values."""
    from poa_keras.eval.ptq import parse_bits_list

    if FLAGS.bits is None:
        return None
    try:
        return parse_bits_list(FLAGS.bits)
    except ValueError as error:
        raise ValueError(f"--bits={FLAGS.bits}: {error}") from None


def cmd_sweep():
    from poa_keras.eval.sweep import format_table, select, sweep
    from poa_keras.quantization import FLOAT_BITS, format_bits_pair

    budgets = {k: v for k, v in (("params", FLAGS.budget_params), ("flops", FLAGS.budget_flops),
                                 ("latency_ms", FLAGS.budget_latency_ms),
                                 ("bytes", FLAGS.budget_bytes)) if v is not None}
    for key, value in budgets.items():
        if not value > 0:
            raise ValueError(f"--budget_{key}={value} must be > 0")
    if "latency_ms" in budgets and not FLAGS.latency:
        raise ValueError("--budget_latency_ms needs the latency measured (drop --nolatency)")
    pairs = _sweep_bits()   # checked before the model and the data are made
    if "bytes" in budgets and pairs is None:
        raise ValueError("--budget_bytes needs --bits (e.g. --bits=32,8/8,4/4): the size in "
                         "bytes is a quantized sweep's column")
    if pairs is not None:
        if FLAGS.calibration_images < 1:
            raise ValueError(f"--calibration_images must be >= 1, got "
                             f"{FLAGS.calibration_images}")
        if FLAGS.calibration_images > FLAGS.num_train and FLAGS.data is None:
            raise ValueError(f"--calibration_images={FLAGS.calibration_images} exceeds "
                             f"--num_train={FLAGS.num_train} (calibration uses the first train "
                             "images)")
        if "latency_ms" in budgets and (FLOAT_BITS, FLOAT_BITS) not in pairs:
            raise ValueError("--budget_latency_ms needs the float rows: add 32 to --bits")
    if FLAGS.output and os.path.exists(FLAGS.output) and not os.path.isdir(FLAGS.output):
        raise ValueError(f"--output={FLAGS.output!r} exists and is not a directory")
    teacher = _load_backbone()
    specs = _sweep_subnets(teacher)
    train, val, names = _labelled_data(_image_size(teacher))
    count = len(teacher.subnets()) if specs is None else len(specs)
    _say(f"sweeping {count} subnets of {teacher.name} ({type(teacher).__name__}) on the "
         f"{__import__('keras').backend.backend()} backend: k-NN k={FLAGS.k}, "
         f"T={FLAGS.temperature}")
    quantized = {}
    if pairs is not None:
        quantized = dict(bits=pairs, num_calibration_images=FLAGS.calibration_images)
        _say(f"at bit pairs (W/A) {', '.join(format_bits_pair(*p) for p in pairs)}: PTQ, each "
             f"subnet calibrated on the first {FLAGS.calibration_images} train images")
    result = sweep(teacher, train, val, subnets=specs, ks=(FLAGS.k,),
                   temperature=FLAGS.temperature, batch_size=FLAGS.batch_size or 64,
                   measure_latency=FLAGS.latency, latency_batch=FLAGS.latency_batch,
                   latency_runs=FLAGS.latency_runs, output_dir=FLAGS.output,
                   progress=FLAGS.verbose != "0", num_classes=len(names), **quantized)
    _say(format_table(result, pareto_x="params" if pairs is None else "bytes"))
    if FLAGS.output:
        _say(f"wrote {os.path.join(FLAGS.output, 'sweep.csv')}, sweep.json and sweep.png")
    if budgets:
        chosen = select(result, **budgets)
        row, spec = chosen
        wanted = ", ".join(f"{k} <= {v:g}" for k, v in budgets.items())
        at = "" if chosen.bits is None else f" at {format_bits_pair(*chosen.bits)} (W/A)"
        size = "" if row.get("bytes") is None else f"{row['bytes']:,} bytes, "
        _say(f"best within {wanted}: {spec}{at} ({row['params']:,} parameters, {size}"
             f"{row['flops'] / 1e9:.4g} GFLOPs, top-1 {100 * row['top1']:.1f} %); extract it "
             f"with --subnet={_spec_text(spec).replace(', ', ',')}")


def _analysis_images(image_size):
    """--num_images uint8 images: the first ones of --data (a folder of images, labels
    ignored) or shapes images."""
    import numpy as np

    if FLAGS.data:
        if not os.path.isdir(FLAGS.data):
            raise ValueError(f"--data={FLAGS.data!r} is not a directory of images")
        from poa_keras.data import images_from_directory

        dataset = images_from_directory(FLAGS.data, image_size=image_size,
                                        on_bad_image=FLAGS.on_bad_image,
                                        progress=FLAGS.verbose != "0")
        images = list(dataset.take(FLAGS.num_images).as_numpy_iterator())
        if len(images) < 4:
            raise ValueError(f"--data={FLAGS.data!r} holds {len(images)} images; the analysis "
                             "needs at least 4")
        _say(f"data: {len(images)} images of {FLAGS.data} at {image_size} px")
        return np.stack(images)
    from poa_keras.data import make_shapes

    images, _, _ = make_shapes(FLAGS.num_images, image_size=image_size, seed=FLAGS.seed)
    _say(f"data: {len(images)} images of the embedded shapes at {image_size} px")
    return images


def cmd_analyze():
    from poa_keras.eval.analysis import analyze, check_same_input_size, save_analysis

    output = _require_output("analyze")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output={output!r} exists and is not a directory")
    if FLAGS.num_images < 4:
        raise ValueError(f"--num_images must be >= 4 (the CKA's minibatches need at least 4 "
                         f"images), got {FLAGS.num_images}")
    batch = 64 if FLAGS.batch_size is None else FLAGS.batch_size
    if batch < 4:
        raise ValueError(f"--batch_size must be >= 4 for the CKA's unbiased HSIC, got {batch}")
    model_a = _load_backbone()
    spec_a = _subnet(model_a)
    model_b = _load_backbone(FLAGS.preset_b) if FLAGS.preset_b else (
        model_a if FLAGS.subnet_b else None)
    spec_b = parse_subnet(model_b, FLAGS.subnet_b) if FLAGS.subnet_b else None
    if model_b is not None:
        check_same_input_size(model_a, model_b)   # before any data is made
    images = _analysis_images(_image_size(model_a))
    names = [f"{m.name}" + ("" if s is None else f" {s}")
             for m, s in ((model_a, spec_a), (model_b, spec_b)) if m is not None]
    _say(f"analysing {' vs '.join(names)} on the {__import__('keras').backend.backend()} "
         f"backend")
    result = analyze(model_a, images, model_b=model_b, subnet_a=spec_a, subnet_b=spec_b,
                     batch_size=batch, attention={"auto": "auto", "yes": True,
                                                  "no": False}[FLAGS.attention],
                     verbose=int(FLAGS.verbose != "0"))
    other = result["model_b"] or result["model_a"]
    count = len(result["batch_sizes"])
    _say(f"linear CKA: {len(result['model_a']['layers'])} x {len(other['layers'])} layers, "
         f"{result['num_images']} images in {count} minibatch{'es' * (count > 1)}")
    for role, stats in result["attention"].items():
        name = result[f"model_{role}"]["name"]
        if stats is None:
            continue
        if "refused" in stats:
            _say(f"attention: none ({stats['refused']})")
            continue
        means = " ".join(f"{sum(d) / len(d):.1f}" for d in stats["distance_px"])
        _say(f"attention distance of {name} (px, mean over heads, per block): {means}")
    paths = save_analysis(result, output)
    _say(f"wrote {', '.join(os.path.basename(p) for p in paths)} into {output}")


# The flags of the flag-based finetune, and the recipe key that replaces each with --recipe.
_FINETUNE_FLAG_KEYS = {"preset": "model.preset", "config": "model.config",
                       "weights": "model.load_weights", "subnet": "model.subnet",
                       "width": "model.subnet", "depth": "model.subnet",
                       "batch_size": "train.batch_size", "lr": "train.lr",
                       "weight_decay": "train.weight_decay", "layer_decay": "train.layer_decay",
                       "pooling": "classifier.pooling", "num_train": "data.num_images",
                       "num_val": "data.num_val", "image_size": "data.image_size",
                       "val_fraction": "data.val_fraction", "seed": "seed"}


def _finetune_recipe():
    """``finetune --recipe``: runs (or resumes) a fine-tuning recipe (poa_keras/finetune.py)."""
    import keras

    from poa_keras.finetune import finetune, load_finetune_recipe
    from poa_keras.methods.nan_guard import NonFiniteLoss

    given = [name for name in _FINETUNE_FLAG_KEYS if FLAGS[name].present]
    if given:
        hints = ", ".join(f"--{n} -> --override={_FINETUNE_FLAG_KEYS[n]}=..." for n in given)
        raise ValueError(f"with --recipe, the recipe sets the model, data and training: give "
                         f"{hints}")
    overrides = _recipe_overrides() + _teacher_overrides()
    recipe = load_finetune_recipe(FLAGS.recipe, overrides)
    output = FLAGS.output or os.path.join("runs", recipe.get("name") or "finetune")
    model = recipe["model"].get("preset") or recipe["model"].get("config")
    _say(f"fine-tuning recipe {recipe.get('name', FLAGS.recipe)!r} ({model}) on the "
         f"{keras.backend.backend()} backend into {output}")
    start = time.perf_counter()
    try:
        result = finetune(recipe, output, resume=FLAGS.resume, epochs=FLAGS.epochs,
                          compilation_cache=FLAGS.compilation_cache, verbose=int(FLAGS.verbose))
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.resumed_from:
        _say(f"resumed from {result.resumed_from}")
    if result.history:
        last = result.history[-1]
        _say(f"epoch {int(last['epoch'])}/{recipe['train']['epochs']}: loss {last['loss']:.4f}")
    if result.top1 is None:
        _say(f"no held-out top-1: the classifier learnt the teacher's classes, not the data's "
             f"{len(result.class_names)}; {time.perf_counter() - start:.0f} s")
    else:
        _say(f"held-out top-1: {100 * result.top1:.2f} % ({len(result.class_names)} classes); "
             f"{time.perf_counter() - start:.0f} s")
    if result.preset_dir:
        _say(f"classifier preset: {result.preset_dir}  (ImageClassifier.from_preset"
             f"({result.preset_dir!r})); result.json")
    return 0


def _teacher_overrides():
    """The recipe overrides --teacher stands for: distill.teacher, and no teacher recipe."""
    if not FLAGS.teacher:
        return []
    return [f"distill.teacher={FLAGS.teacher!r}", "distill.teacher_recipe=None"]


def cmd_distill_store():
    """Pass 1 of TinyViT's fast distillation: the soft-label store of --teacher over the data
    of a distillation recipe (--recipe, default demo_tinyvit; --data: an image folder)."""
    from poa_keras.finetune import (check_distill_sources, distill_teacher, in_memory_images,
                                    labelled_data, load_finetune_recipe, section,
                                    write_recipe_store)

    if not FLAGS.teacher:
        raise ValueError("distill-store needs --teacher=PRESET_OR_KERAS_FILE: an "
                         "ImageClassifier preset (directory or registered name) or a .keras "
                         "file")
    output = _require_output("distill-store")
    overrides = _recipe_overrides() + _teacher_overrides() + ["distill.targets='stored'"]
    if FLAGS.epochs is not None:
        overrides.append(f"distill.store_epochs={FLAGS.epochs}")
    if FLAGS.topk is not None:
        overrides.append(f"distill.topk={FLAGS.topk}")
    recipe_name = FLAGS.recipe if FLAGS["recipe"].present else "demo_tinyvit"
    recipe = load_finetune_recipe(recipe_name, overrides)
    if not recipe.get("distill"):
        raise ValueError(f"--recipe={recipe_name!r} has no distill section: give a distillation "
                         "recipe (e.g. demo_tinyvit, tinyvit_21m_in22k_distill)")
    check_distill_sources(recipe)
    verbose = int(FLAGS.verbose)
    start = time.perf_counter()
    data = labelled_data(recipe, progress=verbose > 0)
    images, _ = in_memory_images(data.train, int(section(recipe, "data")["image_size"]),
                                 count=data.num_train, progress=verbose > 0)
    teacher, name = distill_teacher(recipe, output, verbose=verbose)
    _say(f"storing the top-{section(recipe, 'distill')['topk']} soft labels of teacher "
         f"{name!r} over {len(images)} images into {output}")
    store = write_recipe_store(recipe, teacher, images, output, teacher_name=name,
                               verbose=verbose)
    size = store.epochs * store.num_images * store.record_bytes
    _say(f"{store.epochs} epoch(s) x {store.num_images} images x {store.record_bytes} bytes = "
         f"{size:,} bytes ({store.num_classes} classes, augmentation "
         f"{store.config.get_config()}); {time.perf_counter() - start:.0f} s. Train a student "
         f"on it: poa-keras finetune --recipe={recipe_name} --override=distill.store={output!r} "
         f"--override=distill.store_epochs={store.epochs} --override=distill.topk={store.topk}")
    return 0


def cmd_finetune():
    if FLAGS["recipe"].present:
        return _finetune_recipe()
    import keras

    from poa_keras.classifier import ImageClassifier
    from poa_keras.files import atomic_path, atomic_write_json

    output = _require_output("finetune")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output={output!r} exists and is not a directory")
    epochs = 3 if FLAGS.epochs is None else FLAGS.epochs
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if not FLAGS.lr > 0:
        raise ValueError(f"--lr must be > 0, got {FLAGS.lr}")
    if not 0 < FLAGS.layer_decay <= 1:
        raise ValueError(f"--layer_decay must lie in (0, 1], got {FLAGS.layer_decay}")
    keras.utils.set_random_seed(FLAGS.seed)
    teacher = _load_backbone()
    spec = _subnet(teacher)
    backbone = teacher if spec is None else teacher.extract(spec)
    # uint8 images go through the backbone's recorded preprocessing inside the classifier
    train, val, names = _labelled_data(_image_size(backbone))
    x_train, y_train = train[0], train[1].astype("int32")
    x_val, y_val = val[0], val[1].astype("int32")
    clf = ImageClassifier(backbone, num_classes=len(names), pooling=FLAGS.pooling)
    optimizer = keras.optimizers.AdamW(FLAGS.lr, weight_decay=FLAGS.weight_decay)
    if FLAGS.layer_decay != 1.0:
        optimizer = clf.layer_decay_optimizer(optimizer, layer_decay=FLAGS.layer_decay)
    clf.compile(optimizer=optimizer)
    batch = FLAGS.batch_size or 32
    what = "the intact network" if spec is None else str(spec)
    _say(f"fine-tuning {what} of {teacher.name} ({backbone.count_params():,} parameters) + a "
         f"{len(names)}-class head for {epochs} epochs (AdamW lr {FLAGS.lr:g}, layer decay "
         f"{FLAGS.layer_decay:g}, batch {batch})")
    before = clf.evaluate(x_val, y_val, batch_size=batch, verbose=0, return_dict=True)
    _say(f"val accuracy before: {100 * before['accuracy']:.2f} %")
    import warnings
    with warnings.catch_warnings():
        # a ViT's mask token (iBOT pretraining only) gets no gradient here: expected
        warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
        history = clf.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs,
                          batch_size=batch, verbose=int(FLAGS.verbose), shuffle=True)
    after = clf.evaluate(x_val, y_val, batch_size=batch, verbose=0, return_dict=True)
    _say(f"val accuracy after: {100 * after['accuracy']:.2f} % (before "
         f"{100 * before['accuracy']:.2f} %)")
    model_path = os.path.join(output, "classifier.keras")
    with atomic_path(model_path) as tmp:
        clf.save(str(tmp))
    report = {"backbone": teacher.name, "family": type(backbone).__name__,
              "subnet": None if spec is None else dataclasses.asdict(spec),
              "parameters": int(clf.count_params()), "classes": names, "epochs": epochs,
              "lr": FLAGS.lr, "layer_decay": FLAGS.layer_decay,
              "num_train": int(len(y_train)), "num_val": int(len(y_val)),
              "val_accuracy_before": float(before["accuracy"]),
              "val_accuracy_after": float(after["accuracy"]),
              "history": {k: [float(v) for v in vs] for k, vs in history.history.items()}}
    atomic_write_json(os.path.join(output, "finetune.json"), report)
    clf.save_to_preset(os.path.join(output, "preset"))
    _say(f"wrote {model_path} (keras.saving.load_model), preset/ "
         "(ImageClassifier.from_preset) and finetune.json")


def cmd_export():
    from poa_keras.export import check_output, export_subnet, parse_formats

    output = _require_output("export")
    formats = None if FLAGS.formats.strip() in ("", "auto") else FLAGS.formats
    quantize = None if FLAGS.quantize == "none" else FLAGS.quantize
    check_output(output, FLAGS.overwrite)   # the cheap checks before loading anything
    parse_formats(formats)
    teacher = _load_backbone()
    spec = _subnet(teacher)
    eval_data = None
    if FLAGS.eval:
        train, val, _ = _labelled_data(_image_size(teacher))
        eval_data = (train, val)
    export_subnet(teacher, subnet=spec, output=output, quantize=quantize, formats=formats,
                  eval_data=eval_data, batch_size=FLAGS.export_batch_size,
                  overwrite=FLAGS.overwrite, k=FLAGS.k, temperature=FLAGS.temperature,
                  progress=True)


def main(argv):
    import logging as std_logging

    logging.set_verbosity(logging.WARNING)  # JAX reports its backend search at INFO
    # tf.function retracing notes (a check batch of another size is expected to retrace)
    std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = argv[1] if len(argv) > 1 else "nothing"
        raise app.UsageError(f"unknown command {got!r}; valid commands: {', '.join(COMMANDS)}\n"
                             + _usage())
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[2:]}; flags look like --name=value")
    try:
        return globals()[f"cmd_{argv[1].replace('-', '_')}"]() or 0
    except (ValueError, OSError, TypeError, KeyError) as error:
        # OSError: a missing file, an unreachable download (ConnectionError), a full disk ...
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 1


# What TensorFlow prints when it is imported, whatever TF_CPP_MIN_LOG_LEVEL says (its logging
# is configured only after): a notice of absl and, on a machine without a GPU, that no CUDA
# driver was found. Nothing a user of this command can act on.
_TF_STARTUP_NOTICES = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR$|^I\d{4} [\d:.]+\s+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on "
    r"your machine, GPU will not be used\.$")


def _import_tensorflow_quietly():
    """Imports TensorFlow (the data pipelines need it) with the C-level stderr captured, then
    writes back everything it printed except its two start-up notices (``_TF_STARTUP_NOTICES``).
    Not when TensorFlow is imported already, or when TF_CPP_MIN_LOG_LEVEL=0 asks for all."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines
                                     if not _TF_STARTUP_NOTICES.match(line.rstrip("\n"))))
            sys.stderr.flush()


def _format_warning(message, category, filename, lineno, line=None):
    """Our own warnings (e.g. image files left out) as one line, ``warning: ...``; others as
    Python prints them."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    if os.path.abspath(filename).startswith(package):
        return f"warning: {message}\n"
    return _PYTHON_FORMAT_WARNING(message, category, filename, lineno, line)


_PYTHON_FORMAT_WARNING = warnings.formatwarning


def _set_by_user(name):
    """Whether the environment the process started with has ``name`` (JAX, imported with
    Keras, sets TF_CPP_MIN_LOG_LEVEL=1 when it is unset: os.environ cannot tell)."""
    try:
        with open("/proc/self/environ", "rb") as f:   # the initial environment (Linux)
            return any(e.startswith(name.encode() + b"=") for e in f.read().split(b"\0"))
    except OSError:
        return name in os.environ and not ("jax" in sys.modules
                                           and os.environ[name] == "1")


def run():
    # TensorFlow's C++ logging (imported after this on the jax and torch backends) then shows
    # fatal errors only (its other lines are about GPUs a CPU run does not use); a level the
    # user set is kept.
    if not _set_by_user("TF_CPP_MIN_LOG_LEVEL"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    help_for = _help_request(sys.argv)
    if help_for is not None:   # absl would print the whole module help and exit with 1
        sys.stdout.write(command_help(help_for or None))
        sys.exit(0)
    warnings.formatwarning = _format_warning
    if any(a in ("pretrain", "sweep", "analyze", "finetune", "export") for a in sys.argv[1:2]):
        _import_tensorflow_quietly()
    main_module = sys.modules.get("__main__")
    if main_module is not None and not main_module.__doc__:
        main_module.__doc__ = __doc__   # what --help prints under the `poa-keras` script
    try:
        app.run(main)
    except BrokenPipeError:
        # `poa-keras info | head`: the reader closed the pipe; not an error of the command.
        # Point stdout at devnull so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    run()
