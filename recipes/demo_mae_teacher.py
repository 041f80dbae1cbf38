"""The teacher of the MAE distillation demo (recipes/demo_mae_distill.py): recipes/demo_mae.py
with a twice wider encoder, ``vit_mae_demo_wide`` (width 128, 4 blocks of 8 heads x 16), as
MAE-Lite distils ViT-Tiny from the wider MAE-Base; 40 epochs (about 10 minutes with PyTorch on
one thread).
"""
from poa_keras.pretrain import load_recipe

_DEMO = load_recipe("demo_mae")
_DEMO.pop("name", None)

RECIPE = dict(_DEMO, backbone=dict(config="vit_mae_demo_wide"),
              head=dict(dim=64, depth=1, num_heads=2, mlp_ratio=4.0),
              train=dict(_DEMO["train"], epochs=40))
