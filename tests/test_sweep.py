"""eval/sweep.py: every subnet of a tiny teacher against direct knn_eval calls, subsets, latency,
progress, files (CSV / JSON round trips, a PNG), the Pareto front and budget selection on
hand-made tables, a preset directory as the teacher, a family with a tuple spec field through
the Backbone hooks only, and argument errors.

Cost on JAX: one compiled teacher forward per subnet (the 9-subnet grid once, shared by every
test through one module-scoped result and one feature batch shape) plus one per extracted
subnet that is timed; latency is measured on two subnets only, with one warm-up and two runs."""
import csv
import dataclasses
import json
import warnings

import keras
import numpy as np
import pytest
from conftest import randomize

from poa_keras import ElasticViT, ViTSubnet
from poa_keras.backbones.base import Backbone
from poa_keras.data.synthetic import load_shapes
from poa_keras.elastic.spec import ResNetSubnet
from poa_keras.eval import knn_classify, knn_eval
from poa_keras.eval.latency import inversions, measure_interleaved, spec_dominates, summarize
from poa_keras.eval.sweep import (Selection, SweepResult, format_table, load_sweep, pareto,
                                  plot, print_table, select, sweep)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KS = (5, 20)
BATCH = 50          # <= both split sizes: every forward pass has the same shape
FAST = dict(ks=KS, batch_size=BATCH, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see conftest.py


@pytest.fixture(scope="module")
def teacher():
    keras.utils.set_random_seed(0)
    model = ElasticViT.from_config_name("vit_elastic_test", name="sweep_vit")
    randomize(model, seed=3)
    return model


@pytest.fixture(scope="module")
def data():
    train, val, _ = load_shapes(num_train=200, num_val=100, image_size=32, seed=1)
    assert len(val[0]) >= BATCH
    return train, val


@pytest.fixture(scope="module")
def grid(teacher, data):
    return sweep(teacher, *data, measure_latency=False, **FAST)


def row_of(result, width, depth):
    (row,) = [r for r in result.rows if (r["width"], r["depth"]) == (width, depth)]
    return row


# ----- the sweep itself --------------------------------------------------------------------------

def test_every_subnet_of_the_grid_matches_a_direct_knn_eval(grid, teacher, data):
    (train_x, train_y), (val_x, val_y) = data
    assert len(grid) == len(grid.rows) == 9
    assert grid.specs == teacher.subnets()
    names = {(32, 2): "small", (64, 2): "base", (64, 4): "large"}
    for row, spec in zip(grid.rows, grid.specs):
        assert (row["width"], row["depth"]) == (spec.width, spec.depth)
        direct = knn_eval(teacher, train_x, train_y, val_x, val_y, subnet=spec, ks=KS,
                          batch_size=BATCH)
        for k in KS:
            assert row[f"top1_k{k}"] == direct[k]["top1"], (spec, k)
            assert row[f"top5_k{k}"] == direct[k]["top5"], (spec, k)
        assert (row["top1"], row["top5"]) == (row["top1_k5"], row["top5_k5"])   # first k
        assert row["name"] == names.get((spec.width, spec.depth))
        assert row["params"] == teacher.subnet_params(spec)
        assert row["flops"] == teacher.subnet_flops(spec, image_size=32)
        assert row["feature_dim"] == spec.width
        assert row["latency_ms"] is None and row["latency_ms_per_image"] is None
        json.dumps(row)   # JSON-friendly as it is
    # The accounting is the extracted network's (an independent count of its variables).
    assert row_of(grid, 48, 3)["params"] == teacher.extract((48, 3)).count_params()
    # Costs grow along the grid.
    assert row_of(grid, 32, 2)["flops"] < row_of(grid, 32, 4)["flops"] < \
        row_of(grid, 64, 4)["flops"]
    meta = grid.metadata
    assert meta["ks"] == list(KS) and meta["k"] == 5 and meta["image_size"] == [32, 32]
    assert meta["spec_class"] == "ViTSubnet" and meta["spec_fields"] == ["width", "depth"]
    assert meta["num_train"] == len(train_y) and meta["num_val"] == len(val_y)
    assert meta["num_classes"] == 10 and meta["teacher"] == "sweep_vit"


def test_a_chosen_subset_in_order(grid, teacher, data):
    # A tuple, a name, a spec; ViTSubnet(32, 2) is "small" again and is evaluated once.
    result = sweep(teacher, *data, subnets=[(32, 2), "large", ViTSubnet(32, 2)],
                   measure_latency=False, **FAST)
    assert result.specs == [ViTSubnet(32, 2), ViTSubnet(64, 4)]
    assert [r["name"] for r in result.rows] == ["small", "large"]
    assert result.rows == [row_of(grid, 32, 2), row_of(grid, 64, 4)]


def test_latency_of_the_extracted_subnet(grid, teacher, data, monkeypatch):
    extracted = []
    extract = teacher.extract

    def recording(spec):
        extracted.append(spec)
        return extract(spec)

    monkeypatch.setattr(teacher, "extract", recording)
    result = sweep(teacher, *data, subnets=["small"], latency_batch=3, latency_runs=2,
                   latency_warmup=1, **FAST)
    assert extracted == [ViTSubnet(32, 2)]   # timed: the extracted network, not the teacher
    (row,) = result.rows
    # A measurement, not a number to assert on: only that it is one.
    assert isinstance(row["latency_ms"], float) and row["latency_ms"] > 0
    assert row["latency_ms_per_image"] == pytest.approx(row["latency_ms"] / 3)
    assert row["latency_ms_spread"] >= 0 and row["latency_rounds"] == 2
    for key in ("top1", "top5", "top1_k20", "params", "flops"):
        assert row[key] == row_of(grid, 32, 2)[key], key
    meta = result.metadata
    assert (meta["latency_batch"], meta["latency_runs"], meta["latency_warmup"]) == (3, 2, 1)
    assert "latency ms" in format_table(result)


def test_a_single_name_is_a_list_of_one(grid, teacher, data):
    result = sweep(teacher, *data, subnets="base", measure_latency=False, **FAST)
    assert result.specs == [ViTSubnet(64, 2)]
    assert result.rows == [row_of(grid, 64, 2)]


def test_progress_bar_one_step_per_subnet_and_silence(teacher, data, capsys):
    args = dict(subnets=["small", "base"], measure_latency=False, ks=KS, batch_size=BATCH)
    sweep(teacher, *data, progress=True, **args)
    out = capsys.readouterr().out
    assert "2/2" in out and "top1:" in out
    sweep(teacher, *data, progress=False, **args)
    assert capsys.readouterr().out == ""


def test_teacher_from_a_preset_directory(grid, teacher, data, tmp_path):
    teacher.save_to_preset(tmp_path / "teacher")
    result = sweep(str(tmp_path / "teacher"), *data, subnets=["small"], measure_latency=False,
                   **FAST)
    assert result.rows == [row_of(grid, 32, 2)]
    assert result.metadata["teacher"] == teacher.name


# ----- files -------------------------------------------------------------------------------------

def test_output_dir_gets_csv_json_and_png(teacher, data, tmp_path):
    out = tmp_path / "sweep_out"
    result = sweep(teacher, *data, subnets=["small", "base"], measure_latency=False,
                   output_dir=out, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    assert (out / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    assert load_sweep(out / "sweep.json").rows == result.rows
    assert load_sweep(out / "sweep.csv").rows == result.rows
    assert load_sweep(out).rows == result.rows   # the directory the sweep printed
    with pytest.raises(FileNotFoundError, match="holds no sweep.json or sweep.csv"):
        load_sweep(tmp_path)
    with pytest.raises(FileNotFoundError, match="no sweep file or directory at"):
        load_sweep(out / "nope.json")


def test_plot_is_a_png_with_two_panels(grid, tmp_path):
    path = grid.plot(tmp_path / "figs" / "grid.png")
    png = path.read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 10_000
    assert png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 1.5 * height > 0   # two panels side by side
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["grid.png"]   # no temp left
    one = grid.plot(tmp_path / "one.png", panels="flops")
    assert one.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="no row has a value .*measure_latency=False"):
        grid.plot(tmp_path / "lat.png", panels=("latency_ms",))


def test_json_round_trip_rebuilds_specs(grid, tmp_path):
    grid.to_json(tmp_path / "s.json")
    loaded = SweepResult.from_json(tmp_path / "s.json")
    assert loaded.rows == grid.rows
    assert loaded.specs == grid.specs
    assert loaded.metadata == grid.metadata
    assert loaded.select(params=grid.rows[4]["params"]) == grid.select(
        params=grid.rows[4]["params"])


def test_csv_round_trip(grid, tmp_path):
    grid.to_csv(tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9
    assert table[0]["width"] == "32" and table[0]["name"] == "small"
    assert table[1]["name"] == "" and table[0]["latency_ms"] == ""   # None -> empty cell
    assert float(table[3]["top1_k20"]) == grid.rows[3]["top1_k20"]   # floats exactly
    assert SweepResult.from_csv(tmp_path / "s.csv").rows == grid.rows


# Rows of a family whose spec has a tuple field (a ResNet's stage depths), written by hand.
TUPLE_ROWS = [
    dict(width=64, depths=[3, 4, 6, 3], name="r50", params=25_000_000, flops=8_200_000_000,
         feature_dim=2048, latency_ms=12.5, latency_ms_per_image=0.390625, top1=0.7,
         top5=0.9, top1_k20=0.7, top5_k20=0.9),
    dict(width=96, depths=[3, 8, 36, 3], name=None, params=70_123_456, flops=23_000_000_000,
         feature_dim=2048, latency_ms=None, latency_ms_per_image=None, top1=0.123456789,
         top5=0.5, top1_k20=0.123456789, top5_k20=0.5),
]


def test_tuple_spec_fields_serialise(tmp_path):
    from poa_keras.elastic.spec import ResNetSubnet

    specs = [ResNetSubnet(64, (3, 4, 6, 3)), ResNetSubnet(96, (3, 8, 36, 3))]
    result = SweepResult(TUPLE_ROWS, specs=specs,
                         metadata={"spec_class": "ResNetSubnet", "spec_fields": ["width",
                                                                                  "depths"]})
    result.to_csv(tmp_path / "r.csv")
    text = (tmp_path / "r.csv").read_text()
    assert "64,3-4-6-3,r50," in text and "96,3-8-36-3,," in text
    assert SweepResult.from_csv(tmp_path / "r.csv").rows == TUPLE_ROWS
    result.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["depths"] == [3, 4, 6, 3]
    loaded = SweepResult.from_json(tmp_path / "r.json")
    assert loaded.rows == TUPLE_ROWS and loaded.specs == specs
    assert "3-8-36-3" in format_table(result)


def test_atomic_writes_replace_and_leave_no_temp_files(grid, tmp_path):
    (tmp_path / "s.json").write_text("old")
    grid.to_json(tmp_path / "s.json")
    grid.to_csv(tmp_path / "s.csv")
    grid.to_csv(tmp_path / "s.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json"]
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == grid.rows


# ----- a family through the hooks only -----------------------------------------------------------

@dataclasses.dataclass(frozen=True, order=True)
class StageSpec:
    width: int
    depths: tuple

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))


def toy_features(images, spec):
    """The toy family's feature: a fixed projection of the pixels, one per spec."""
    rng = np.random.default_rng([spec.width] + list(spec.depths))
    flat = np.asarray(images, np.float32).reshape(len(images), -1)
    return flat @ rng.normal(size=(flat.shape[1], spec.width)).astype(np.float32)


class ToyStages(Backbone):
    """Not a ViT: a spec with a tuple field and only the Backbone hooks a sweep uses."""

    subnet_class = StageSpec

    def __init__(self, fixed=None, **kwargs):
        super().__init__(**kwargs)
        self.fixed = fixed   # an "extracted" toy runs this spec as its full network
        self.in_channels = 3

    def subnets(self):
        return [StageSpec(w, d) for w in (4, 8) for d in ((1, 1), (1, 2))]

    @property
    def full_subnet(self):
        return self.fixed or StageSpec(8, (1, 2))

    @property
    def named_subnets(self):
        return {"tiny": StageSpec(4, (1, 1))}

    def validate_subnet(self, spec):
        if spec not in self.subnets():
            raise ValueError(f"{spec} is not on the toy grid")

    def feature_dim(self, subnet=None):
        return (self.resolve_subnet(subnet) or self.full_subnet).width

    def subnet_params(self, subnet=None):
        spec = self.resolve_subnet(subnet) or self.full_subnet
        return 1000 * spec.width * sum(spec.depths)

    def subnet_flops(self, spec=None, image_size=None):
        spec = self.resolve_subnet(spec) or self.full_subnet
        return 2 * image_size[0] * image_size[1] * spec.width * sum(spec.depths)

    def compiled_forward(self, subnet=None, training=False):
        spec = self.resolve_subnet(subnet) or self.full_subnet
        return lambda x: {"cls": keras.ops.convert_to_tensor(
            toy_features(keras.ops.convert_to_numpy(x), spec))}

    def extract(self, subnet):
        return ToyStages(fixed=self.resolve_subnet(subnet), name="toy_extracted")


def test_any_family_through_the_hooks(tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(40, 4, 4, 3)).astype("float32")
    val_x = rng.normal(size=(20, 4, 4, 3)).astype("float32")
    train_y, val_y = rng.integers(0, 3, 40), rng.integers(0, 3, 20)
    toy = ToyStages(name="toy")
    result = sweep(toy, (train_x, train_y), (val_x, val_y), ks=(3,), batch_size=8,
                   latency_batch=4, latency_runs=1, latency_warmup=1, progress=False,
                   output_dir=tmp_path)
    assert result.specs == toy.subnets()
    assert [r["depths"] for r in result.rows] == [[1, 1], [1, 2], [1, 1], [1, 2]]
    assert [r["name"] for r in result.rows] == ["tiny", None, None, None]
    for row, spec in zip(result.rows, result.specs):
        expected = knn_classify(toy_features(train_x, spec), train_y, toy_features(val_x, spec),
                                val_y, 3, ks=(3,))
        assert row["top1"] == expected[3]["top1"] and row["top5"] == expected[3]["top5"]
        assert row["params"] == 1000 * spec.width * sum(spec.depths)
        assert row["flops"] == 2 * 16 * spec.width * sum(spec.depths)
        assert row["latency_ms"] > 0
    assert "4,1-2,," in (tmp_path / "sweep.csv").read_text()
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    assert SweepResult.from_csv(tmp_path / "sweep.csv").rows == result.rows
    row, spec = result.select(params=16000)   # three subnets fit
    assert row["params"] <= 16000
    assert row["top1"] == max(r["top1"] for r in result.rows if r["params"] <= 16000)
    assert spec == StageSpec(row["width"], row["depths"])


# ----- Pareto front ------------------------------------------------------------------------------

# Hand-made: cost columns, accuracy; the expected fronts are worked out by hand below.
HAND = [
    dict(name="a", params=1, flops=50, latency_ms=4.0, top1=0.50, top5=0.90),
    dict(name="b", params=2, flops=10, latency_ms=None, top1=0.40, top5=0.80),
    dict(name="c", params=2, flops=30, latency_ms=2.0, top1=0.60, top5=0.70),
    dict(name="d", params=3, flops=20, latency_ms=3.0, top1=0.60, top5=0.95),
    dict(name="e", params=4, flops=40, latency_ms=1.0, top1=0.80, top5=0.85),
    dict(name="f", params=4, flops=40, latency_ms=5.0, top1=0.80, top5=0.99),
    dict(name="g", params=5, flops=5, latency_ms=6.0, top1=0.70, top5=0.60),
]


def names(rows):
    return [r["name"] for r in rows]


def test_pareto_front_on_a_hand_made_table():
    # params: b is beaten by c (same cost, more accurate), d by c (cheaper, as accurate), g by
    # e (cheaper, more accurate); e and f tie exactly, so neither beats the other.
    assert names(pareto(HAND, x="params")) == ["a", "c", "e", "f"]
    # flops (g 5 < b 10 < d 20 < c 30 < e = f 40 < a 50): g 0.7 beats b, d, c; e, f (0.8) stay;
    # a (50, 0.5) is beaten by e.
    assert names(pareto(HAND, x="flops")) == ["g", "e", "f"]
    # latency: b has none; e (1.0 ms, 0.8) beats every other row.
    assert names(pareto(HAND, x="latency_ms")) == ["e"]
    # top-5 against params: a (1, .90), d (3, .95), f (4, .99); c (2, .70) loses to a.
    assert names(pareto(HAND, x="params", y="top5")) == ["a", "d", "f"]
    result = SweepResult(HAND)
    assert names(result.pareto()) == ["a", "c", "e", "f"]


def test_pareto_errors():
    with pytest.raises(ValueError, match=r"x='top1' is not one of \['params', 'flops'"):
        pareto(HAND, x="top1")
    with pytest.raises(ValueError, match="y='top9' is not a column of the sweep"):
        pareto(HAND, y="top9")
    no_latency = [dict(r, latency_ms=None) for r in HAND]
    with pytest.raises(ValueError, match="measure_latency=False"):
        pareto(no_latency, x="latency_ms")


# ----- select ------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, expected", [
    (dict(params=1), "a"),
    (dict(params=2), "c"),              # the budget itself is allowed; c beats b
    (dict(params=3.5), "c"),            # c and d tie at 0.60: fewer params wins
    (dict(params=100), "e"),            # e and f tie in top-1, params and flops: the first
    (dict(flops=25), "g"),
    (dict(flops=10), "g"),
    (dict(flops=35), "g"),
    (dict(latency_ms=2.5), "e"),
    (dict(latency_ms=4.5), "e"),
    (dict(params=3, flops=25), "d"),    # a, b, c, d fit params; only b, d fit flops
    (dict(params=3, latency_ms=3.5), "c"),
    (dict(params=4, flops=45, latency_ms=10), "e"),
    (dict(params=3, flops=100, latency_ms=2.0), "c"),
])
def test_select_respects_every_budget(budget, expected):
    assert select(HAND, **budget).row["name"] == expected


def test_select_metric_and_what_it_returns(grid):
    assert select(HAND, params=3, metric="top5").row["name"] == "d"
    assert select(HAND, flops=45, metric="top5").row["name"] == "f"
    picked = select(HAND, params=2)
    assert isinstance(picked, Selection) and picked.spec is None
    row, spec = grid.select(flops=row_of(grid, 48, 3)["flops"])
    fitting = [r for r in grid.rows if r["flops"] <= row_of(grid, 48, 3)["flops"]]
    assert row["flops"] <= row_of(grid, 48, 3)["flops"]
    assert row["top1"] == max(r["top1"] for r in fitting)
    assert spec == ViTSubnet(row["width"], row["depth"])
    assert grid.select(params=10**9, metric="top5_k20").row["top5_k20"] == \
        max(r["top5_k20"] for r in grid.rows)


def test_select_errors_name_the_budget_and_the_cheapest_cost(grid):
    with pytest.raises(ValueError, match=r"no subnet fits the budget params <= 0.5; the "
                                         r"cheapest available: params 1 \('a'\)$"):
        select(HAND, params=0.5)
    # Each budget alone can be met, together they cannot.
    with pytest.raises(ValueError, match=r"budget params <= 1 and latency_ms <= 3 ms; the "
                                         r"cheapest available: params 1 \('a'\); latency_ms 1 ms"
                                         r" \('e'\)$"):
        select(HAND, params=1, latency_ms=3)
    cheapest = min(r["params"] for r in grid.rows)
    with pytest.raises(ValueError, match=f"params <= 1,000; the cheapest available: params "
                                         f"{cheapest:,} \\(width=32 depth=2 'small'\\)$"):
        grid.select(params=1000)
    with pytest.raises(ValueError, match="give at least one budget"):
        select(HAND)
    with pytest.raises(ValueError, match="give at least one budget"):
        grid.select(metric="top5")
    for bad in (-1, 0, float("nan"), True, "10"):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            select(HAND, params=bad)
    with pytest.raises(ValueError, match="latency_ms.*measure_latency=False"):
        grid.select(latency_ms=100)
    with pytest.raises(ValueError, match="metric='top9' is not a column"):
        select(HAND, params=3, metric="top9")
    with pytest.raises(ValueError, match="no rows"):
        select([], params=3)
    with pytest.raises(TypeError, match="a SweepResult or a list of row dicts"):
        select(HAND[0], params=3)


# ----- table -------------------------------------------------------------------------------------

def test_format_table_is_aligned_and_readable(grid, capsys):
    text = format_table(grid)
    lines = text.splitlines()
    assert len(lines) == 2 + 9
    header = lines[0]
    for column in ("width", "depth", "name", "params (M)", "GFLOPs", "top-1 %", "top-5 %"):
        assert column in header
    assert "latency ms" not in header   # not measured
    assert set(lines[1]) <= {"-", " "}
    small = row_of(grid, 32, 2)
    cells = lines[2].split()
    assert cells[:3] == ["32", "2", "small"]
    assert cells[-2:] == [f"{100 * small['top1']:.1f}", f"{100 * small['top5']:.1f}"]
    # Right-aligned numbers: every row's top-1 ends where the header's "top-1 %" ends.
    end = header.index("top-1 %") + len("top-1 %")
    for line in lines[2:]:
        assert line[end - 1] != " " and line[end] == " "
    print_table(grid)
    assert capsys.readouterr().out.strip() == text.strip()


def test_format_table_values_and_front_on_hand_rows():
    rows = [dict(width=32, depth=2, name="small", params=32384, flops=1106176,
                 latency_ms=3.25, latency_ms_spread=0.25, top1=0.11, top5=0.425),
            dict(width=64, depth=4, name=None, params=21_412_345, flops=7_374_000_000,
                 latency_ms=None, top1=0.085, top5=None)]
    lines = format_table(rows, pareto_x="params").splitlines()
    assert lines[0].split("  ")[0:2] == ["width", "depth"]
    assert "latency ms" in lines[0] and lines[0].endswith("front")
    assert lines[2].split() == ["32", "2", "small", "0.03238", "0.001106", "3.25", "±", "0.25",
                                "11.0", "42.5", "*"]   # latency: median ± spread
    assert lines[3].split() == ["64", "4", "21.41", "7.374", "-", "8.5", "-"]   # not on front


# ----- quantized rows (a 2-D size x bits sweep; the sweep itself is in test_ptq.py) -------------

# Two subnets x three bit pairs; bytes and BitOPs as a quantized sweep writes them.
QUANT = [dict(width=32, depth=2, name="small", bits=b, weight_bits=w, activation_bits=a,
              params=100, bytes=size, bitops=ops, flops=10, top1=top1, top5=0.9)
         for b, w, a, size, ops, top1 in [("32", 32, 32, 400, 1024, 0.50),
                                          ("8/8", 8, 8, 120, 64, 0.49),
                                          ("2/4", 2, 4, 60, 8, 0.20)]] + \
        [dict(width=64, depth=4, name="large", bits=b, weight_bits=w, activation_bits=a,
              params=300, bytes=size, bitops=ops, flops=30, top1=top1, top5=0.9)
         for b, w, a, size, ops, top1 in [("32", 32, 32, 1200, 3072, 0.70),
                                          ("8/8", 8, 8, 320, 192, 0.69),
                                          ("2/4", 2, 4, 120, 24, 0.30)]]


def _label(row):
    return f"{row['name']} {row['bits']}"


def test_pareto_and_select_by_bytes_on_hand_rows(tmp_path):
    # bytes: small 2/4 (60), small 8/8 (120, 0.49; large 2/4 ties on bytes but is worse),
    # large 8/8 (320, 0.69), large 32 (1200, 0.70); small 32 (400, 0.5) loses to large 8/8.
    assert [_label(r) for r in pareto(QUANT, x="bytes")] == \
        ["small 2/4", "small 8/8", "large 8/8", "large 32"]
    # BitOPs: large 2/4 (24, 0.3) is cheaper than small 8/8 (64) and beats small 2/4's 0.2
    assert [_label(r) for r in pareto(QUANT, x="bitops")] == \
        ["small 2/4", "large 2/4", "small 8/8", "large 8/8", "large 32"]
    chosen = select(QUANT, bytes=400)
    assert _label(chosen.row) == "large 8/8" and chosen.bits == (8, 8) and chosen.spec is None
    assert select(QUANT, budget_bytes=119).bits == (2, 4)
    assert select(QUANT, bytes=10_000).bits == (32, 32)
    assert _label(select(QUANT, bitops=100, params=100).row) == "small 8/8"
    row, spec = select(QUANT, bytes=400)   # still a (row, spec) pair
    assert spec is None and row["bits"] == "8/8"
    assert select(HAND, params=2).bits is None   # a float-only sweep has no bits
    with pytest.raises(ValueError, match=r"no subnet fits the budget bytes <= 10; the cheapest "
                                         r"available: bytes 60 \(width=32 depth=2 'small' "
                                         r"bits=2/4\)"):
        select(QUANT, bytes=10)
    with pytest.raises(ValueError, match="same budget"):
        select(QUANT, bytes=100, budget_bytes=200)
    with pytest.raises(ValueError, match="'bytes' is not a column of the sweep"):
        select(HAND, bytes=100)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        select(QUANT, budget_bytes=-5)


def test_table_plot_and_files_of_quantized_rows(tmp_path):
    result = SweepResult(QUANT, metadata={"spec_fields": ["width", "depth"],
                                          "bits": ["32", "8/8", "2/4"], "teacher": "t"})
    lines = result.format_table(pareto_x="bytes").splitlines()
    assert lines[0].split() == ["width", "depth", "name", "bits", "params", "(M)", "size",
                                "(MB)", "GBitOPs", "GFLOPs", "top-1", "%", "top-5", "%",
                                "front"]
    assert lines[3].split() == ["32", "2", "small", "8/8", "0.0001000", "0.0001200",
                                "0.00000006400", "0.00000001000", "49.0", "90.0", "*"]
    assert repr(result) == "SweepResult(6 rows: 2 subnets x 3 bit pairs of t)"
    assert result.plot(tmp_path / "q.png").read_bytes()[:8] == PNG_SIGNATURE
    assert plot(result, tmp_path / "p.png", panels="params").read_bytes()[:8] == PNG_SIGNATURE
    result.to_csv(tmp_path / "q.csv")
    back = load_sweep(tmp_path / "q.csv")
    assert back.rows == result.rows   # "32" stays the text of a bit pair
    assert back.select(bytes=400).bits == (8, 8)
    # float columns are not spec fields
    assert back.spec_fields == ["width", "depth"]


# ----- argument errors ---------------------------------------------------------------------------

def test_sweep_argument_errors(teacher, data, tmp_path):
    (train_x, train_y), (val_x, val_y) = data
    train, val = (train_x, train_y), (val_x, val_y)
    (tmp_path / "a_file").write_text("x")
    cases = [
        (dict(teacher=42), TypeError, "teacher must be an elastic backbone .*got int"),
        (dict(teacher="no_such_preset"), ValueError, "unknown preset 'no_such_preset'"),
        (dict(teacher=str(tmp_path)), ValueError, "has no config.json"),
        (dict(train_data=train_x), TypeError, r"train_data must be an \(images, labels\) pair"),
        (dict(val_data=(val_x, val_y, val_y)), TypeError, "val_data .* of length 3"),
        (dict(train_data=(train_x, train_y[:-1])), ValueError,
         f"train_data has {len(train_y)} images but labels of shape"),
        (dict(train_data=(train_x[..., 0], train_y)), ValueError,
         r"train_data images must have shape \(num_images, height, width, channels\)"),
        (dict(val_data=(val_x[:, :16, :16], val_y)), ValueError,
         r"same \(height, width, channels\), got \(32, 32, 3\) and \(16, 16, 3\)"),
        (dict(train_data=(train_x.astype("int32"), train_y)), TypeError,
         "must be uint8 .* or float"),
        (dict(train_data=(train_x, train_y.astype("float32"))), TypeError,
         "train_data labels must be integers"),
        (dict(val_data=(val_x[:0], val_y[:0])), ValueError, "val_data is empty"),
        (dict(num_classes=5), ValueError, r"labels must lie in \[0, num_classes=5\)"),
        (dict(subnets=[]), ValueError, "subnets is empty"),
        (dict(subnets=(32, 2)), TypeError, r"looks like ONE spec: pass \[\(32, 2\)\]"),
        (dict(subnets=[(40, 2)]), ValueError, "width=40 is not on the grid"),
        (dict(subnets=[(32, 9)]), ValueError, "depth=9 is out of range"),
        (dict(subnets=["huge"]), ValueError, "unknown named size 'huge'"),
        (dict(subnets=[3.5]), TypeError, "expected a ViTSubnet"),
        (dict(subnets=42), TypeError, "subnets must be None or a list"),
        (dict(ks=(0,)), ValueError, "every k must be >= 1"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(latency_batch=0), ValueError, "latency_batch must be >= 1"),
        (dict(latency_warmup=0), ValueError, "latency_warmup must be >= 1"),
        (dict(pixel_normalization="zscore"), ValueError, "pixel_normalization must be one of"),
        (dict(output_dir=tmp_path / "a_file"), ValueError, "exists and is not a directory"),
    ]
    for change, error, match in cases:
        args = dict(teacher=teacher, train_data=train, val_data=val, progress=False)
        args.update(change)
        with pytest.raises(error, match=match):
            sweep(**args)


@pytest.mark.parametrize("config", ["swin_elastic_test", "resnet_elastic_test"])
def test_sweep_of_a_tiny_swin_and_resnet_teacher(config, data, tmp_path):
    """The same sweep, unchanged, on the other two families: rows = the chosen subnets, each
    equal to a direct knn_eval of that subnet, parameters = the extracted network's count,
    files written, select() within the budget."""
    from poa_keras.backbones import from_config_name
    keras.utils.set_random_seed(0)
    teacher = from_config_name(config)
    randomize(teacher, seed=4)
    specs = [teacher.subnets()[0], teacher.subnets()[-1]]   # the smallest and the intact one
    (train_x, train_y), (val_x, val_y) = data
    result = sweep(teacher, *data, subnets=specs, measure_latency=False, output_dir=tmp_path,
                   **FAST)
    assert result.specs == specs and len(result.rows) == 2
    assert result.metadata["spec_class"] == type(specs[0]).__name__
    for row, spec in zip(result.rows, specs):
        direct = knn_eval(teacher, train_x, train_y, val_x, val_y, subnet=spec, ks=KS,
                          batch_size=BATCH)
        assert row["top1"] == direct[KS[0]]["top1"], spec
        assert row["params"] == teacher.extract(spec).count_params()
    assert result.rows[0]["params"] < result.rows[1]["params"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    assert len(load_sweep(tmp_path / "sweep.json").rows) == 2
    row, spec = select(result, params=result.rows[0]["params"])
    assert spec == specs[0] and row["params"] <= result.rows[0]["params"]


# ----------------------------------------------------------------------- interleaved latency

class FakeClock:
    """A clock that a fake model call advances by its programmed duration: timings without
    noise from this machine, so the measurement logic itself is what is tested."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaving_removes_a_drift_that_sequential_timing_turns_into_an_inversion():
    """A machine that slows down over time (+1 ms per call): timed one model after another,
    the model timed first looks faster although it is bigger; interleaved rounds give every
    model the same drift, so the true order comes back, with the drift as spread."""
    clock, calls_made = FakeClock(), []
    cost = {ViTSubnet(96, 3): 0.010, ViTSubnet(48, 3): 0.005}

    def make(spec):
        def call():
            calls_made.append(spec)
            clock.now += cost[spec] + 0.001 * len(calls_made)
        return call

    calls = {spec: make(spec) for spec in (ViTSubnet(96, 3), ViTSubnet(48, 3))}
    # sequential: all runs of the big one, then all of the small one
    sequential = {}
    for spec, call in calls.items():
        times = []
        for _ in range(10):
            start = clock()
            call()
            times.append(clock() - start)
        sequential[spec] = np.median(times)
    assert sequential[ViTSubnet(96, 3)] < sequential[ViTSubnet(48, 3)]   # inverted
    calls_made.clear()
    stats, remaining = measure_interleaved(calls, rounds=10, warmup=1, clock=clock,
                                           dominates=spec_dominates)
    assert remaining == []
    big, small = stats[ViTSubnet(96, 3)], stats[ViTSubnet(48, 3)]
    assert big.median > small.median and big.rounds == small.rounds == 10
    # every round timed both once: (warmup 1 + 10 rounds) x 2 models
    assert len(calls_made) == 22
    assert all(set(calls_made[i:i + 2]) == set(calls) for i in range(0, 22, 2))
    assert not inversions(stats, spec_dominates)


def test_a_persistent_inversion_is_remeasured_then_reported():
    clock, counts = FakeClock(), {}
    cost = {ViTSubnet(64, 4): 0.002, ViTSubnet(48, 3): 0.004, ViTSubnet(48, 4): 0.0045}

    def make(spec):
        def call():
            counts[spec] = counts.get(spec, 0) + 1
            clock.now += cost[spec] * (1.0 + 0.01 * (counts[spec] % 3))
        return call

    calls = {spec: make(spec) for spec in cost}
    stats, remaining = measure_interleaved(calls, rounds=4, warmup=1, max_rounds=12,
                                           clock=clock, dominates=spec_dominates)
    # (64, 4) contains both others and is faster: the two pairs are re-measured to 12 rounds,
    # (48, 4) vs (48, 3) is in order and is not
    assert set(remaining) == {(ViTSubnet(64, 4), ViTSubnet(48, 3)),
                              (ViTSubnet(64, 4), ViTSubnet(48, 4))}
    assert {s: st.rounds for s, st in stats.items()} == {
        ViTSubnet(64, 4): 12, ViTSubnet(48, 3): 12, ViTSubnet(48, 4): 12}
    assert stats[ViTSubnet(48, 3)].median == pytest.approx(0.004 * 1.01, rel=0.02)
    # the median and the quartiles against numpy on the same rounds
    assert summarize([3.0, 1.0, 2.0, 10.0]) == pytest.approx(
        (np.median([1, 2, 3, 10]), np.percentile([1, 2, 3, 10], 25),
         np.percentile([1, 2, 3, 10], 75), 4))


def test_spec_dominance():
    dom = spec_dominates
    assert dom(ViTSubnet(64, 4), ViTSubnet(48, 4)) and dom(ViTSubnet(64, 4), ViTSubnet(48, 3))
    assert not dom(ViTSubnet(64, 3), ViTSubnet(48, 4)) and not dom(ViTSubnet(48, 3),
                                                                   ViTSubnet(48, 3))
    assert dom(ResNetSubnet(64, (3, 4)), ResNetSubnet(64, (2, 4)))
    assert not dom(ResNetSubnet(64, (3, 4)), ResNetSubnet(32, (2, 5)))


def test_select_warns_when_the_latency_budget_is_within_the_spread():
    rows = [dict(name="small", params=1, flops=1, latency_ms=5.0, latency_ms_spread=0.2,
                 latency_ms_per_image=0.5, top1=0.5),
            dict(name="big", params=2, flops=2, latency_ms=8.3, latency_ms_spread=0.8,
                 latency_ms_per_image=0.83, top1=0.7)]
    with pytest.warns(UserWarning, match="more accurate .*big"):
        assert select(rows, latency_ms=8.0).row["name"] == "small"
    with pytest.warns(UserWarning, match="chosen .*big"):
        assert select(rows, latency_ms_per_image=0.85).row["name"] == "big"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select(rows, latency_ms=6.0).row["name"] == "small"    # clear either way
        assert select(rows, latency_ms=10.0).row["name"] == "big"
