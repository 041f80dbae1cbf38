"""The poa-keras command, run as a user would (subprocess) for every sub-command, plus its error
paths in-process through ``cli.main`` (the same code, without a 5 s interpreter start each)."""
import csv
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from poa_keras import Backbone, ElasticViT

BACKEND = keras.backend.backend()
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _run(*args, timeout=300):
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    return subprocess.run([sys.executable, "-m", "poa_keras.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _params(model):
    """The weights of the network, without the activation quantizers' calibrated ranges."""
    return sum(int(np.prod(w.shape)) for w in model.weights if w.name != "range")


def test_demo_lists_extracts_and_runs(tmp_path):
    result = _run("demo", "--config=vit_elastic_test", f"--output={tmp_path / 'sub'}")
    assert result.returncode == 0, result.stderr
    assert "9 subnets" in result.stdout
    assert "extracted ViTSubnet(width=32, depth=2)" in result.stdout
    assert "max |extracted - elastic| = 0.00e+00" in result.stdout or \
        "e-0" in result.stdout.split("max |extracted - elastic| = ")[1]
    sub = ElasticViT.from_preset(tmp_path / "sub")
    assert (sub.embed_dim, sub.depth) == (32, 2)


def test_extract_writes_a_preset_and_bad_flags_fail(tmp_path, cli):
    ok = _run("extract", "--config=vit_elastic_test", "--width=48", "--depth=3",
              f"--output={tmp_path / 'w48'}")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "w48" / "model.weights.h5").is_file()
    bad_command = _run("explode")
    assert bad_command.returncode != 0 and "valid commands" in bad_command.stderr
    bad_flag = _run("info", "--no_such_flag=1")
    assert bad_flag.returncode != 0 and "no_such_flag" in bad_flag.stderr
    code, _, err = cli("extract", "--config=vit_elastic_test", "--width=40",
                       f"--output={tmp_path / 'bad'}")
    assert code == 1 and "width=40" in err and "[32, 48, 64]" in err
    assert not (tmp_path / "bad").exists()
    code, _, err = cli("subnets", "--preset=nope")
    assert code == 1 and "known presets" in err


def test_help_of_one_command_lists_its_flags_and_exits_0():
    from poa_keras import cli as module

    result = _run("sweep", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: poa-keras sweep [--flags]") and "k-NN top-1" in out
    for flag in ("--subnets=all", "--budget_params", "--on_bad_image=error", "--preset="):
        assert flag in out, out
    assert "--recipe" not in out and "--quantize" not in out   # other commands' flags
    assert module._help_request(["poa-keras", "--help"]) == ""
    assert module._help_request(["poa-keras", "pretrain", "-h"]) == "pretrain"
    assert module._help_request(["poa-keras", "export", "--helpfull"]) == "all"
    assert module._help_request(["poa-keras", "sweep", "--k=5"]) is None
    assert "--allow_recipe_change=" not in module.command_help("pretrain")   # no default shown
    assert "--allow_recipe_change" in module.command_help("pretrain")
    assert "poa-keras COMMAND --help" in module.command_help()
    every = module.command_help("all")
    for name in {n for names in module.COMMAND_FLAGS.values() for n in names}:
        assert f"--{name}" in every
    assert module.command_help("info").count("--") == 0 and "no flags" in module.command_help(
        "info")


def test_subnets_of_every_family(cli):
    code, out, _ = cli("subnets", "--config=vit_elastic_test")
    assert code == 0 and "small" in out and "9 subnets" in out
    code, out, _ = cli("subnets", "--config=resnet_elastic_test")
    assert code == 0 and "depths" in out and "1-1-2-1" in out and "8 subnets" in out
    code, out, _ = cli("subnets", "--config=swin_elastic_test")
    assert code == 0 and "6 subnets" in out


def test_info_lists_backend_presets_configs_and_formats():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"backend {BACKEND}" in out and "poa_vit_l" in out
    for config in ("vit_elastic_test", "swin_elastic_test", "resnet_elastic_test"):
        assert config in out
    assert f"export formats on the {BACKEND} backend" in out and "preset          yes" in out


def test_subnet_flag_works_for_every_family(cli, tmp_path):
    from poa_keras import cli as module
    from poa_keras.backbones import from_config_name

    resnet = from_config_name("resnet_elastic_test")
    assert module.parse_subnet(resnet, "width=8,depths=1-1-2-1") == \
        resnet.resolve_subnet((8, (1, 1, 2, 1)))
    assert module.parse_subnet(resnet, "large") == resnet.resolve_subnet("large")
    swin = from_config_name("swin_elastic_test")
    assert module.parse_subnet(swin, "depth=2") == swin.resolve_subnet((32, 2))
    code, out, err = cli("extract", "--config=resnet_elastic_test",
                         "--subnet=width=8,depths=1-2-2-1", f"--output={tmp_path / 'r'}")
    assert code == 0, err
    sub = Backbone.from_preset(tmp_path / "r")
    assert type(sub).__name__ == "ElasticResNet" and tuple(sub.max_depths) == (1, 2, 2, 1)
    errors = {
        ("--subnet=huge",): ["unknown subnet 'huge'", "named sizes", "width=32,depth=2"],
        ("--subnet=width=48,height=3",): ["'height' is not a field of ViTSubnet",
                                          "['width', 'depth']"],
        ("--subnet=width=4x",): ["bad subnet value width='4x'"],
        ("--subnet=width48",): ["unknown subnet 'width48'", "width=32,depth=2"],
        ("--subnet=width=48,3",): ["name=value pairs"],
        ("--subnet=small", "--width=32"): ["either --subnet or --width/--depth"],
        ("--width=40",): ["width=40", "[32, 48, 64]"],
    }
    for flags_, messages in errors.items():
        code, _, err = cli("extract", "--config=vit_elastic_test", *flags_,
                           f"--output={tmp_path / 'x'}")
        assert code == 1 and err.startswith("error: "), (flags_, err)
        for message in messages:
            assert message in err, (flags_, err)
    code, _, err = cli("extract", "--config=resnet_elastic_test", "--depth=3",
                       f"--output={tmp_path / 'x'}")
    assert code == 1 and "unknown subnet keyword" in err and "depths=" in err
    code, _, err = cli("extract", "--config=resnet_elastic_test", "--subnet=depths=1-9-2-1",
                       f"--output={tmp_path / 'x'}")
    assert code == 1 and "stage 2 depth 9" in err
    assert not (tmp_path / "x").exists()


def test_errors_of_sweep_finetune_and_export(cli, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "file.txt").write_text("x")
    not_here = {"jax": "litert", "tensorflow": "torch", "torch": "tf_saved_model"}[BACKEND]
    cases = [
        (("export", "--config=vit_elastic_test"), ["export needs --output=DIR"]),
        (("finetune", "--config=vit_elastic_test"), ["finetune needs --output=DIR"]),
        (("extract", "--config=vit_elastic_test"), ["extract needs --output=DIR"]),
        (("extract", "--config=vit_elastic_test", f"--output={tmp_path / 'e'}"),
         ["extract needs --subnet", "named sizes"]),
        (("export", "--config=vit_elastic_test", f"--output={existing}"),
         ["exists", "--overwrite"]),
        (("export", "--config=vit_elastic_test", "--formats=zip", f"--output={tmp_path / 'a'}"),
         ["unknown export format 'zip'", "valid formats"]),
        (("export", "--config=vit_elastic_test", f"--formats=preset,{not_here}", "--noeval",
          f"--output={tmp_path / 'b'}"), [f"format '{not_here}' cannot export",
                                          "formats that work here"]),
        (("export", "--config=no_such_config", f"--output={tmp_path / 'c'}"),
         ["unknown backbone configuration 'no_such_config'", "vit_elastic_test"]),
        (("finetune", "--config=vit_elastic_test", "--epochs=0", f"--output={tmp_path / 'd'}"),
         ["--epochs must be >= 1"]),
        (("finetune", "--config=vit_elastic_test", "--layer_decay=1.5",
          f"--output={tmp_path / 'd'}"), ["--layer_decay must lie in (0, 1]"]),
        (("sweep", "--config=vit_elastic_test", "--budget_params=-1"),
         ["--budget_params=-1.0 must be > 0"]),
        (("sweep", "--config=vit_elastic_test", "--subnets=small;huge"),
         ["unknown subnet 'huge'"]),
        (("sweep", "--config=vit_elastic_test", "--data=/no/such/dir"),
         ["--data='/no/such/dir' is not a directory"]),
        (("sweep", "--config=vit_elastic_test", "--num_train=0"), ["--num_train must be >= 1"]),
        (("sweep", "--config=vit_elastic_test", "--nolatency", "--budget_latency_ms=5"),
         ["needs the latency measured"]),
        # checked before any data is made (other sizes are resized by the backbone's
        # preprocessing to its input size)
        (("finetune", "--config=vit_elastic_test", "--image_size=4",
          f"--output={tmp_path / 'f'}"), ["--image_size must be >= 8, got 4"]),
        (("pretrain", "--recipe=demo", "--override=train.epoch=2",
          f"--output={tmp_path / 'p'}"), ["train.epoch (did you mean train.epochs?)"]),
        (("pretrain", "--recipe=demo", "--allow_recipe_change=train.batch_size",
          f"--output={tmp_path / 'p'}"), ["'train.batch_size' cannot change when a run resumes"]),
    ]
    for args, messages in cases:
        code, _, err = cli(*args)
        assert code == 1 and err.startswith("error: "), (args, err)
        for message in messages:
            assert message in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]   # nothing half written
    assert (existing / "file.txt").read_text() == "x"
    from absl import flags
    with pytest.raises(flags.IllegalFlagValueError, match="int4"):
        flags.FLAGS(["poa-keras", "export", "--quantize=int4"])
    flags.FLAGS.unparse_flags()


def test_an_unreachable_weights_url_is_an_error_line(cli, monkeypatch, tmp_path):
    from poa_keras import presets

    card = {"name": "remote", "architecture": {"class_name": "ElasticViT",
                                                 "config_name": "vit_elastic_test"},
            "license": "test", "weights": {"url": (tmp_path / "gone.h5").as_uri()}}
    monkeypatch.setattr(presets, "list_presets", lambda: {"remote": card})
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    code, _, err = cli("subnets", "--preset=remote")
    assert code == 1 and err.startswith("error: preset 'remote': cannot download its weights")
    assert "Traceback" not in err


def test_a_data_folder_with_an_undecodable_image_is_named_or_skipped(cli, tmp_path):
    for name in ("circle", "square"):
        (tmp_path / name).mkdir()
        for i in range(3):
            keras.utils.save_img(tmp_path / name / f"{i}.png",
                                 np.full((8, 8, 3), 60 * i, np.uint8))
    (tmp_path / "square" / "saved_page.jpg").write_text("<html>404</html>")
    args = ("sweep", "--config=vit_elastic_test", f"--data={tmp_path}", "--subnets=small",
            "--nolatency", "--verbose=0")
    code, _, err = cli(*args)
    assert code == 1 and err.startswith("error: 1 of the 7 image files") and \
        f"{tmp_path / 'square' / 'saved_page.jpg'} (Unknown image file format" in err, err
    with pytest.warns(UserWarning, match="skipped 1 of the 7 image files"):
        code, out, err = cli(*args, "--on_bad_image=skip", "--k=2", "--val_fraction=0.5")
    assert code == 0, err
    split = re.search(r"\(2 classes\), (\d+) train / (\d+) val images", out)
    assert split and int(split[1]) + int(split[2]) == 6, out   # the 6 readable images


def test_sweep_writes_table_files_and_selects(tmp_path):
    out = tmp_path / "sweep"
    result = _run("sweep", "--config=vit_elastic_test", "--subnets=small,large",
                  "--num_train=40", "--num_val=20", "--latency_runs=1", "--latency_batch=2",
                  "--budget_params=40000", f"--output={out}", "--verbose=0")
    assert result.returncode == 0, result.stderr
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["width"]), int(r["depth"])) for r in rows] == [(32, 2), (64, 4)]
    teacher = ElasticViT.from_config_name("vit_elastic_test")
    for row in rows:
        spec = (int(row["width"]), int(row["depth"]))
        assert int(row["params"]) == _params(teacher.extract(spec))
        assert 0.0 <= float(row["top1"]) <= float(row["top5"]) <= 1.0
        assert float(row["latency_ms"]) > 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["metadata"]["num_classes"] == 10 and data["metadata"]["k"] == 20
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1 %" in result.stdout and "small" in result.stdout
    # only the small subnet (32,384 parameters) fits 40,000
    assert "best within params <= 40000: ViTSubnet(width=32, depth=2)" in result.stdout
    assert "--subnet=width=32,depth=2" in result.stdout


def test_sweep_bits_flag_rows_budget_and_bad_pairs(cli, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = cli("sweep", "--config=vit_elastic_test", "--subnets=small",
                            "--num_train=20", "--num_val=10", "--nolatency", "--k=5",
                            "--bits=32,8/8,2/4", "--calibration_images=10",
                            "--budget_bytes=30000", f"--output={out}", "--verbose=0")
    assert code == 0, err
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["bits"] for r in rows] == ["32", "8/8", "2/4"]
    assert int(rows[0]["bytes"]) == 4 * int(rows[0]["params"])
    assert int(rows[2]["bytes"]) < int(rows[1]["bytes"]) < int(rows[0]["bytes"])
    assert rows[1]["int8_layers"] == "Dense:8" and rows[1]["float_layers"] == "Conv2D:1"
    assert "size (MB)" in stdout and "calibrated on the first 10 train images" in stdout
    # 18,944 bytes at 2/4 is the only row within 30,000
    assert "best within bytes <= 30000: ViTSubnet(width=32, depth=2) at 2/4 (W/A)" in stdout
    assert json.loads((out / "sweep.json").read_text())["metadata"]["bits"] == \
        ["32", "8/8", "2/4"]
    cases = [
        (("--bits=4/x",), ["--bits=4/x: malformed bit-width pair '4/x'", "weights in 2..8",
                           "or 32 for float"]),
        (("--bits=9/9",), ["weight bit-width in '9/9' 9 is not supported; valid: 2..8"]),
        (("--bits=8/8,,4/4",), ["empty entry"]),
        (("--budget_bytes=1000",), ["--budget_bytes needs --bits"]),
        (("--bits=4/4", "--budget_bytes=0"), ["--budget_bytes=0.0 must be > 0"]),
        (("--bits=4/4", "--calibration_images=0"), ["--calibration_images must be >= 1"]),
        (("--bits=4/4", "--num_train=20"), ["--calibration_images=100 exceeds --num_train=20"]),
    ]
    for extra, messages in cases:
        target = tmp_path / "bad"
        code, _, err = cli("sweep", "--config=vit_elastic_test", *extra, f"--output={target}")
        assert code == 1 and err.startswith("error: "), (extra, err)
        for message in messages:
            assert message in err, (extra, err)
        assert not target.exists()   # nothing half written


def test_finetune_saves_a_model_and_reports_val_accuracy(tmp_path):
    out = tmp_path / "ft"
    # batches of 20: one train and one test step shape (one compilation each on JAX / TF)
    result = _run("finetune", "--config=vit_elastic_test", "--subnet=small", "--num_train=40",
                  "--num_val=20", "--epochs=2", "--lr=3e-3", "--layer_decay=0.75",
                  "--batch_size=20", "--verbose=2", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert "val accuracy before:" in result.stdout and "val accuracy after:" in result.stdout
    report = json.loads((out / "finetune.json").read_text())
    assert report["epochs"] == 2 and len(report["history"]["loss"]) == 2
    # the saved classifier, on the val split made here, gives the reported accuracy
    from poa_keras.data import load_shapes
    _, (x_val, y_val), names = load_shapes(40, 20, image_size=32, seed=0)
    assert report["classes"] == list(names) and report["num_val"] == len(y_val)
    model = keras.saving.load_model(out / "classifier.keras")
    logits = keras.ops.convert_to_numpy(model.predict(
        ((x_val / 255.0 - MEAN) / STD).astype(np.float32), batch_size=20, verbose=0))
    assert logits.shape == (len(y_val), 10)
    accuracy = float((logits.argmax(1) == y_val).mean())
    assert accuracy == pytest.approx(report["val_accuracy_after"], abs=1e-6)
    assert report["subnet"] == {"width": 32, "depth": 2}
    # the classifier preset: the same model, taking the raw uint8 images
    from poa_keras import ImageClassifier
    again = ImageClassifier.from_preset(str(out / "preset"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again.predict(
        x_val, batch_size=20, verbose=0)), logits, atol=1e-4)


def test_export_cli_int8_resnet_with_accuracy_report(tmp_path):
    out = tmp_path / "deploy"
    result = _run("export", "--config=resnet_elastic_test", "--subnet=width=8,depths=1-1-2-1",
                  "--quantize=int8", "--formats=preset", "--num_train=40", "--num_val=20",
                  f"--output={out}")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["artifacts"]) == ["preset", "preset_int8"]
    assert report["quantize"] == "int8" and report["family"] == "ElasticResNet"
    acc = report["accuracy"]
    assert acc["num_train"] + acc["num_val"] == 60 and acc["k"] == 20
    assert 0 < acc["max_abs_feature_diff"] and 0.99 < acc["mean_cosine"] < 1.0
    assert "change" in result.stdout and "preset_int8" in result.stdout
    # the int8 preset holds the float preset quantized: the same weights, quantized here
    import gc

    from poa_keras.export import load_preset
    int8_model = Backbone.from_preset(out / "preset")
    gc.freeze()
    try:
        int8_model.quantize("int8")
    finally:
        gc.unfreeze()
    loaded = load_preset(out / "preset_int8")
    weights = [keras.ops.convert_to_numpy(w) for w in loaded.weights]
    assert "int8" in {str(w.dtype) for w in weights}
    for a, b in zip(weights, int8_model.weights):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))


def test_pretrain_runs_a_recipe_file_resumes_and_reports_errors(tmp_path, cli):
    from test_pretrain import TINY

    recipe = tmp_path / "tiny.py"
    recipe.write_text("RECIPE = " + repr(TINY))
    out = tmp_path / "run"
    first = _run("pretrain", f"--recipe={recipe}", f"--output={out}", "--epochs=1",
                 "--verbose=2", "--override=train.lr=2e-3")
    assert first.returncode == 0, first.stderr
    assert "epoch 1/2: loss" in first.stdout and "dino_elastic" in first.stdout
    # nothing among the progress lines that is not ours: Keras' shuffle warning is not
    # provoked, TensorFlow's start-up notices (imported by the command) are left out
    assert "shuffle" not in first.stderr, first.stderr
    if BACKEND != "tensorflow":   # there TensorFlow is imported with Keras, before the command
        assert "cudart_stub" not in first.stderr and "InitializeLog" not in first.stderr
    assert (out / "checkpoints" / "epoch_0001" / "state.json").is_file()
    assert not (out / "teacher").exists()             # only after the recipe's last epoch
    second = _run("pretrain", f"--recipe={recipe}", f"--output={out}", "--verbose=0",
                  "--override=train.lr=2e-3")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "epoch 2/2" in second.stdout
    assert (out / "teacher" / "config.json").is_file()
    other = _run("pretrain", f"--recipe={recipe}", f"--output={out}", "--verbose=0")
    assert other.returncode == 1 and "another recipe" in other.stderr and "train" in other.stderr
    assert "--allow_recipe_change=train.lr" in other.stderr   # how to resume with it changed
    code, _, err = cli("pretrain", "--recipe=nope", f"--output={tmp_path / 'x'}")
    assert code == 1 and "shipped recipes" in err
    code, _, err = cli("pretrain", "--recipe=demo", "--data=/no/such/dir",
                       f"--output={tmp_path / 'y'}")
    assert code == 1 and "/no/such/dir" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # no empty run dirs
