"""POA x SSQL on the CPU demo: the POA demo recipe (recipes/demo.py: the small elastic ViT on the
embedded shapes data) whose elastic student also runs fake-quantized (methods/poa.py, "POA x
SSQL"): on half of the steps at bit-widths drawn uniformly from weights 2..8 x activations
4..8 (SSQL's sets, REFERENCE.md §5), a quarter of those on the intact size. One run, one
teacher; afterwards ``poa-keras sweep --bits=32,8/8,5/5,4/4,3/3,2/4`` shows every (size,
bit-width) pair. Everything else (data, schedules, heads, epochs) is the POA demo's, so the
two runs compare at the same data and step count (benchmarks/quality.py --arms=poa,poa_ssql).
"""
from poa_keras.pretrain import load_recipe

RECIPE = load_recipe("demo")
RECIPE.pop("name")
RECIPE["train"].update(
    quant_weight_bits=(2, 3, 4, 5, 6, 7, 8),
    quant_activation_bits=(4, 5, 6, 7, 8),
    quant_probability=0.5,
    quant_intact_probability=0.25,
    quant_seed=1,
)
