"""The teacher of the TinyViT distillation demo (recipes/demo_tinyvit.py): a small ResNet
trained from scratch on the labels of the embedded shapes data set (32 px, 3200 training and
1000 held-out images, 10 classes), with demo_tinyvit's data, augmentation and optimizer. It is an ordinary fine-tuning recipe (poa_keras/finetune.py);
demo_tinyvit runs it first, in ``<output>/teacher_run``, when no ``--teacher`` is given.

Why a ResNet from scratch rather than the demo POA teacher plus fine-tuning: it takes about 3
minutes on 2 CPU cores with PyTorch and needs no earlier run; any classifier preset can replace
it (``poa-keras finetune --recipe=demo_tinyvit --teacher=runs/demo_finetune/classifier``).
"""
from poa_keras.finetune import load_finetune_recipe

# the student's data, augmentation, optimizer and seed; its own model and schedule; no distill
FINETUNE_RECIPE = {k: v for k, v in load_finetune_recipe("demo_tinyvit").items()
                   if k != "distill"}
FINETUNE_RECIPE.update(
    name="demo_tinyvit_teacher",
    model=dict(config="resnet_bn_test", config_args=dict(widths=(32, 64), depths=(2, 2))),
    train=dict(epochs=8, batch_size=64, lr=2e-3, lr_scaling="none", min_lr=1e-5,
               warmup_epochs=1, weight_decay=0.05, layer_decay=1.0, label_smoothing=0.0),
)
