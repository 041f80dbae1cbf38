"""Elastify a released dense model, then POA: do its small subnets beat slicing the release?

    KERAS_BACKEND=torch python benchmarks/elastify_quality.py [--runs=runs/elastify --seeds=0,1,2]

The "release" is made here, as a user would meet one: the dense DINO demo (recipes/demo_dino.py
with a DINO-style ViT: no LayerScale, no mask token, one size) is trained, its teacher written
in DINO's OFFICIAL key layout (a torch .pth: cls_token, pos_embed, patch_embed.proj.*,
blocks.{i}.*, norm.*) and converted back with the dino_pth converter (the path of a real
download; the converted model is checked equal to the trained one). Then, on the same embedded
shapes data:

* ``slice``: ``ElasticViT.elastify(release, min_width=48, min_depth=3)`` evaluated at once:
  every subnet is a slice of the release (first channels, first blocks; POA's block choice for
  depth), no training;
* ``poa``: the demo POA recipe (recipes/demo.py) for ``--poa_epochs`` epochs with
  ``backbone.init`` = the release (student and EMA teacher start from it; the grid is the
  demo's, widths 48..96, depths 3..6; fresh projection heads), once per seed of ``--seeds``;
  its EMA teacher's subnets are extracted;
* ``dino_continued`` (the control for the extra training): the dense DINO recipe for the same
  epochs from the same release (``backbone.init``; fresh head, same schedule shape), then
  elastified and sliced like ``slice``: what continuing WITHOUT POA's elastic student gives.

Metric: weighted k-NN top-1 (k = 20, T = 0.07, L2-normalised CLS) with the TRAIN split of the
shapes data as the bank and its held-out VAL split as the queries (never trained on, used for
no choice). Subnets: (48, 3) smallest, (64, 4), (80, 5), (96, 6) intact. The POA arm gets MORE
compute than the slice arm (its continued training); ``dino_continued`` gets the same epochs
and steps as POA (fewer FLOPs: no elastic student).

Writes JSON lines to stdout (and ``RUNS/results.jsonl``) and a summary at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_string("runs", "runs/elastify", "Where the runs go (a rerun reuses finished ones).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the POA arm.")
flags.DEFINE_integer("poa_epochs", 2, "Epochs of POA (and of the DINO control) from the "
                     "release.")
flags.DEFINE_list("arms", ["slice", "poa", "dino_continued"], "Arms to run.")
flags.DEFINE_multi_string("dense_override", [], "Overrides of the dense DINO recipe.")
flags.DEFINE_multi_string("poa_override", [], "Overrides of the POA recipe.")
FLAGS = flags.FLAGS

SUBNETS = ((48, 3), (64, 4), (80, 5), (96, 6))
DENSE = ["backbone.layer_scale_init=None", "backbone.use_mask_token=False",
         "backbone.min_width=96", "backbone.min_depth=6", "backbone.named_subnets=None",
         "backbone.pos_embed_resize='dino'"]


def emit(record):
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(FLAGS.runs, "results.jsonl"), "a") as f:
        f.write(line + "\n")


def run(recipe, run_dir):
    from poa_keras.pretrain import pretrain

    with contextlib.redirect_stdout(sys.stderr):
        return pretrain(recipe, run_dir, resume=True, verbose=0)


def write_official_dino(backbone, path):
    """The backbone's weights under DINO's published key names and torch layouts."""
    import numpy as np
    import torch

    from poa_keras.convert.vit import layer_plan

    inverse = {"linear": lambda v: v.T, "conv": lambda v: v.transpose(3, 2, 0, 1),
               "same": lambda v: v}
    state = {key: torch.from_numpy(np.ascontiguousarray(inverse[layout](
        np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable))))
        for variable, key, layout in layer_plan(backbone)}
    torch.save(state, path)
    return sorted(state)


def features(model, images, pixel_normalization):
    from poa_keras.eval.features import extract_features

    return extract_features(model, images, batch_size=256, normalize=True,
                            pixel_normalization=pixel_normalization)


def evaluate(label, seed, elastic, data, pixel_normalization):
    from poa_keras import ViTSubnet
    from poa_keras.eval.knn import knn_classify

    (x_train, y_train), (x_val, y_val), names = data
    out = {}
    for width, depth in SUBNETS:
        start = time.perf_counter()
        model = elastic.extract(ViTSubnet(width, depth))
        res = knn_classify(features(model, x_train, pixel_normalization), y_train,
                           features(model, x_val, pixel_normalization), y_val, len(names),
                           ks=(20,), temperature=0.07)
        out[(width, depth)] = res[20]["top1"]
        emit({"record": "knn", "arm": label, "seed": seed, "width": width, "depth": depth,
              "top1": round(float(res[20]["top1"]), 4), "bank": len(y_train),
              "queries": len(y_val), "eval_s": round(time.perf_counter() - start, 1)})
    return out


def main(argv):
    import keras
    import numpy as np

    from poa_keras import ElasticViT
    from poa_keras.convert import convert_checkpoint, read_torch_checkpoint
    from poa_keras.pretrain import load_recipe, shapes_split

    os.makedirs(FLAGS.runs, exist_ok=True)
    # 1. the "release": a dense DINO demo, written in DINO's official layout, converted back
    dense_recipe = load_recipe("demo_dino", DENSE + list(FLAGS.dense_override))
    dense = run(dense_recipe, os.path.join(FLAGS.runs, "dense_dino"))
    teacher = dense.trainer.teacher_backbone
    pth = os.path.join(FLAGS.runs, "dino_demo_official.pth")
    keys = write_official_dino(teacher, pth)
    card = {"name": "dino_demo", "architecture": {"class_name": "ElasticViT",
                                                  "config_name": "vit_elastic_demo"},
            "weights": {"format": "dino_pth"}}
    released, _, _ = convert_checkpoint(
        read_torch_checkpoint(pth), card, min_width=96, min_depth=6, layer_scale_init=None,
        use_mask_token=False, named_subnets=None, pos_embed_resize="dino")
    data = shapes_split(dense_recipe["data"], int(dense_recipe.get("seed", 0)))
    pixel_normalization = dense_recipe["data"].get("normalize", "imagenet")
    probe = data[1][0][:8].astype("float32") / 255.0
    diff = float(np.max(np.abs(keras.ops.convert_to_numpy(released(probe)["cls"])
                               - keras.ops.convert_to_numpy(teacher(probe)["cls"]))))
    emit({"record": "release", "official_keys": len(keys), "roundtrip_max_abs_diff": diff})
    assert diff < 1e-5, diff
    release_dir = os.path.join(FLAGS.runs, "release_preset")
    released.preprocessing = teacher.preprocessing
    released.save_to_preset(release_dir)

    # 2. slicing the release
    results = {}
    if "slice" in FLAGS.arms:
        sliced = ElasticViT.elastify(release_dir, min_width=48, min_depth=3)
        results["slice"] = [evaluate("slice", 0, sliced, data, pixel_normalization)]
    # 3. POA from the release, and the dense DINO control
    for seed in FLAGS.seeds if "dino_continued" in FLAGS.arms else ():
        recipe = load_recipe("demo_dino", DENSE + [
            f"backbone.init={release_dir!r}", f"train.epochs={FLAGS.poa_epochs}",
            f"seed={seed}"] + list(FLAGS.dense_override))
        result = run(recipe, os.path.join(FLAGS.runs, f"dino_continued_seed{seed}"))
        continued = os.path.join(FLAGS.runs, f"dino_continued_seed{seed}", "teacher")
        results.setdefault("dino_continued", []).append(evaluate(
            "dino_continued", int(seed), ElasticViT.elastify(continued, min_width=48,
                                                              min_depth=3),
            data, pixel_normalization))
    for seed in FLAGS.seeds if "poa" in FLAGS.arms else ():
        recipe = load_recipe("demo", [
            f"backbone.init={release_dir!r}", "backbone.layer_scale_init=None",
            "backbone.pos_embed_resize='dino'",
            f"train.epochs={FLAGS.poa_epochs}", f"seed={seed}", f"train.sampler_seed={seed}"]
            + list(FLAGS.poa_override))
        result = run(recipe, os.path.join(FLAGS.runs, f"poa_seed{seed}"))
        results.setdefault("poa", []).append(evaluate(
            "poa", int(seed), result.trainer.teacher_backbone, data, pixel_normalization))
    summary = {}
    for arm, runs in results.items():
        for spec in SUBNETS:
            values = np.array([r[spec] for r in runs]) * 100
            summary[f"{arm} {spec}"] = (f"{values.mean():.1f} ± {values.std(ddof=1):.1f} "
                                        f"(n={len(values)})" if len(values) > 1
                                        else f"{values.mean():.1f} (deterministic)")
    emit({"record": "summary", "top1_percent": summary})


if __name__ == "__main__":
    app.run(main)
