"""benchmarks/extract.py, run as a user would (subprocess) on the tiny teacher of every family:
it extracts the whole grid, and each subnet's line carries the parameter count the teacher
predicts for that subnet. Guards the benchmark against the API drifting under it."""
import json
import pathlib
import subprocess
import sys

import pytest

from poa_keras.backbones import from_config_name

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "extract.py"
CONFIGS = ("vit_elastic_test", "swin_elastic_test", "resnet_elastic_test")


@pytest.fixture(scope="module")
def records():
    proc = subprocess.run([sys.executable, str(SCRIPT), f"--config={','.join(CONFIGS)}",
                           "--per_subnet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds JSON only


@pytest.mark.parametrize("config", CONFIGS)
def test_extract_benchmark_covers_the_grid(records, config):
    teacher = from_config_name(config)
    grid = teacher.subnets()
    lines = [r for r in records if r["benchmark"] == "extract" and r["config"] == config]
    assert [teacher.subnet_class(**r["subnet"]) for r in lines] == grid
    assert [r["params"] for r in lines] == [teacher.subnet_params(spec) for spec in grid]
    (summary,) = [r for r in records if r["benchmark"] == "extract_all"
                  and r["config"] == config]
    assert summary["subnets"] == summary["subnets_in_grid"] == len(grid)
    assert summary["family"] == type(teacher).__name__
    assert summary["params_extracted"] == sum(r["params"] for r in lines)
    seconds = [r["seconds"] for r in lines]
    assert summary["min_s"] <= summary["median_s"] <= summary["max_s"]
    assert summary["max_s"] == pytest.approx(max(seconds), abs=1e-3)
    assert summary["total_s"] == pytest.approx(sum(seconds), abs=0.01 + 1e-3 * len(seconds))

