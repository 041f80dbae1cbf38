"""The SimSiam baseline of the SSQL CPU demo: recipes/demo_ssql.py without the quantized
branch -- the same backbone, heads, data, augmentation, optimiser, schedule and number of steps
(SSQL's comparison: SimSiam and SSQL trained identically, REFERENCE.md §5). A SimSiam step runs
one forward and backward where an SSQL step runs two, so this run takes about half as long
(about 5 minutes with one PyTorch thread on 2 cores; see recipes/demo_ssql.py for the
measurements).
"""
from poa_keras.pretrain import load_recipe

RECIPE = load_recipe("demo_ssql")
RECIPE.pop("name")
RECIPE["method"] = "simsiam"
for _key in ("weight_bits", "activation_bits", "sampler_seed"):
    RECIPE["train"].pop(_key)
