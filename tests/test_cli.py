"""The poa-keras command, run as a user would (subprocess)."""
import os
import subprocess
import sys

import keras
import pytest

from poa_keras import ElasticViT


def _run(*args, timeout=300):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    return subprocess.run([sys.executable, "-m", "poa_keras.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_demo_lists_extracts_and_runs(tmp_path):
    result = _run("demo", "--config=vit_elastic_test", f"--output={tmp_path / 'sub'}")
    assert result.returncode == 0, result.stderr
    assert "9 subnets" in result.stdout
    assert "extracted ViTSubnet(width=32, depth=2)" in result.stdout
    assert "max |extracted - elastic| = 0.00e+00" in result.stdout or \
        "e-0" in result.stdout.split("max |extracted - elastic| = ")[1]
    sub = ElasticViT.from_preset(tmp_path / "sub")
    assert (sub.embed_dim, sub.depth) == (32, 2)


def test_extract_writes_a_preset_and_bad_flags_fail(tmp_path):
    ok = _run("extract", "--config=vit_elastic_test", "--width=48", "--depth=3",
              f"--output={tmp_path / 'w48'}")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "w48" / "model.weights.h5").is_file()
    bad_width = _run("extract", "--config=vit_elastic_test", "--width=40",
                     f"--output={tmp_path / 'bad'}")
    assert bad_width.returncode != 0
    assert "width=40" in bad_width.stderr and "[32, 48, 64]" in bad_width.stderr
    assert not (tmp_path / "bad").exists()
    bad_command = _run("explode")
    assert bad_command.returncode != 0 and "valid commands" in bad_command.stderr
    bad_flag = _run("info", "--no_such_flag=1")
    assert bad_flag.returncode != 0 and "no_such_flag" in bad_flag.stderr
    bad_preset = _run("subnets", "--preset=nope")
    assert bad_preset.returncode != 0 and "known presets" in bad_preset.stderr


@pytest.mark.parametrize("command", ["info", "subnets"])
def test_info_and_subnets(command):
    result = _run(command) if command == "info" else _run(command, "--config=vit_elastic_test")
    assert result.returncode == 0, result.stderr
    assert ("poa_vit_l" in result.stdout) if command == "info" else ("small" in result.stdout)


def test_pretrain_runs_a_recipe_file_resumes_and_reports_errors(tmp_path):
    from test_pretrain import TINY

    recipe = tmp_path / "tiny.py"
    recipe.write_text("RECIPE = " + repr(TINY))
    out = tmp_path / "run"
    first = _run("pretrain", f"--recipe={recipe}", f"--output={out}", "--epochs=1",
                 "--verbose=2", "--override=train.lr=2e-3")
    assert first.returncode == 0, first.stderr
    assert "epoch 1/2: loss" in first.stdout and "dino_elastic" in first.stdout
    assert (out / "checkpoints" / "epoch_0001" / "state.json").is_file()
    assert not (out / "teacher").exists()             # only after the recipe's last epoch
    second = _run("pretrain", f"--recipe={recipe}", f"--output={out}", "--verbose=0",
                  "--override=train.lr=2e-3")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "epoch 2/2" in second.stdout
    assert (out / "teacher" / "config.json").is_file()
    other = _run("pretrain", f"--recipe={recipe}", f"--output={out}", "--verbose=0")
    assert other.returncode == 1 and "another recipe" in other.stderr and "train" in other.stderr
    unknown = _run("pretrain", "--recipe=nope", f"--output={tmp_path / 'x'}")
    assert unknown.returncode == 1 and "shipped recipes" in unknown.stderr
    bad = _run("pretrain", "--recipe=demo", "--data=/no/such/dir", f"--output={tmp_path / 'y'}")
    assert bad.returncode == 1 and "/no/such/dir" in bad.stderr
