"""The DINO baseline of the CPU demo: the demo recipe (recipes/demo.py) without POA's elastic
student -- the same backbone, data, crops, schedules and teacher targets (Sinkhorn-Knopp), one
DINO head. benchmarks/quality.py trains it for as long as the POA demo took (equal compute) and
slices subnets out of its teacher, the "DINO, then slice" baseline of the POA paper.
"""
from poa_keras.pretrain import load_recipe

RECIPE = load_recipe("demo")
RECIPE.pop("name")
RECIPE.update(method="dino",
              head=dict(hidden_dim=512, bottleneck_dim=128, out_dim=512))
for _key in ("lambda_ie", "same_view_temp", "koleo_weight", "sampler_seed"):
    RECIPE["train"].pop(_key)
