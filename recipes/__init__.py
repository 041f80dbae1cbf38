"""Training recipes, one Python file each, defining ``RECIPE`` (a dict; the sections are
described in ``poa_keras/pretrain.py``). Run one with
``poa-keras pretrain --recipe=NAME`` or ``poa_keras.pretrain.pretrain("NAME", dir)``.

* ``demo``: POA on the embedded shapes data set, a small elastic ViT, about 10 minutes on 2 CPU
  cores (the README's main job).
* ``demo_dino``: the DINO baseline of the demo (same backbone, data and step count; no elastic
  branch), for benchmarks/quality.py.
* ``poa_vit_l16_in1k``: the paper's ViT-L/16 POA teacher on ImageNet-1k.
* ``dino_vit_s16_in1k``: DINO ViT-S/16 on ImageNet-1k (300 epochs, the README's boosted run).

Fine-tuning recipes define ``FINETUNE_RECIPE`` instead (sections in ``poa_keras/finetune.py``)
and run with ``poa-keras finetune --recipe=NAME`` or ``poa_keras.finetune.finetune("NAME",
dir)``; each command refuses the other kind:

* ``demo_finetune``: the demo teacher's small subnet fine-tuned on the shapes data, MAE-Lite's
  recipe scaled down (1-2 minutes on 2 CPU cores).
* ``finetune_mae_tiny_in1k``: MAE-Lite's fine-tuning of ViT-Tiny on ImageNet-1k (300 epochs).
"""
