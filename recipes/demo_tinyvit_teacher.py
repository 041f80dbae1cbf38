"""The teacher of the TinyViT distillation demo (recipes/demo_tinyvit.py): a small ResNet
trained from scratch on the labels of the embedded shapes data set (32 px, 3200 training and
1000 held-out images, 10 classes). It is an ordinary fine-tuning recipe (poa_keras/finetune.py);
demo_tinyvit runs it first, in ``<output>/teacher_run``, when no ``--teacher`` is given.

Why a ResNet from scratch rather than the demo POA teacher plus fine-tuning: it takes about 3
minutes on 2 CPU cores with PyTorch and needs no earlier run; any classifier preset can replace
it (``poa-keras finetune --recipe=demo_tinyvit --teacher=runs/demo_finetune/classifier``).
"""
FINETUNE_RECIPE = dict(
    name="demo_tinyvit_teacher",
    model=dict(config="resnet_bn_test", config_args=dict(widths=(32, 64), depths=(2, 2))),
    classifier=dict(pooling="cls", dropout=0.0),
    data=dict(source="shapes", palette="light_on_dark", num_images=3200, num_val=1000,
              image_size=32, seed=0, threads=1),
    augment=dict(crop_scale=(0.35, 1.0), interpolation="bilinear", flip_prob=0.5,
                 randaugment_ops=0, color_jitter=0.3, mixup=0.0, cutmix=0.0),
    optimizer=dict(name="adamw", beta_1=0.9, beta_2=0.999, epsilon=1e-8),
    train=dict(epochs=8, batch_size=64, lr=2e-3, lr_scaling="none", min_lr=1e-5,
               warmup_epochs=1, weight_decay=0.05, layer_decay=1.0, label_smoothing=0.0),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)
