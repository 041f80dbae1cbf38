"""The CPU demo of fine-tuning: the "small" subnet (width 48, 3 blocks) of the demo teacher
fine-tuned on the embedded shapes data set with MAE-Lite's recipe (recipes/
finetune_mae_tiny_in1k.py) scaled down; about 1-2 minutes on 2 CPU cores with PyTorch.

The model is the teacher/ of the demo pretraining: run ``poa-keras pretrain --recipe=demo
--output=runs/demo`` first (about 7 minutes), from the same working directory; or give any
preset (a directory or a registered name) with ``--override=model.preset=DIR``. Without one
the run stops before anything is built and says so.

What differs from MAE-Lite's recipe, and why:

* 32 px shapes, 3200 training and 1000 held-out images (10 classes), batch 64 (50 steps per
  epoch), 4 epochs, 1 warmup epoch;
* crops of (0.35, 1) of the image instead of (0.08, 1): the shapes are small, and smaller
  crops often miss them (as in the pretraining demo, recipes/demo.py);
* layer decay 0.75 instead of 0.85: the small subnet has 3 blocks, not 12;
* RandAugment's factor 0.3 instead of 0.45: at 32 px the same shear and translation move the
  shapes off the image;
* one private tf.data thread, so the augmentation leaves the other core to the train step.

On JAX every epoch's RandAugment pipeline takes longer to build (about 20 s more on 2 busy
cores; docs/finetune.md says why), so the run takes a few minutes there.

The rest is MAE-Lite's: AdamW (0.9, 0.999), lr 1e-3 x batch / 256, cosine to 1e-6, weight
decay 0.05, the mean-pooled patch tokens + fc_norm, Keras' RandAugment with 2 ops, mixup 0.2,
no label smoothing. The top-1 on the held-out images is printed and saved in result.json.
"""
FINETUNE_RECIPE = dict(
    model=dict(preset="runs/demo/teacher", subnet="small"),
    classifier=dict(pooling="avg_norm", dropout=0.0),
    data=dict(source="shapes", palette="light_on_dark", num_images=3200, num_val=1000,
              image_size=32, seed=0, threads=1),
    augment=dict(crop_scale=(0.35, 1.0), interpolation="bicubic", flip_prob=0.5,
                 randaugment_ops=2, randaugment_factor=0.3, color_jitter=0.3, mixup=0.2,
                 cutmix=0.0),
    optimizer=dict(name="adamw", beta_1=0.9, beta_2=0.999, epsilon=1e-8),
    train=dict(epochs=4, batch_size=64, lr=1e-3, lr_scaling="linear", reference_batch=256,
               min_lr=1e-6, warmup_epochs=1, weight_decay=0.05, layer_decay=0.75,
               label_smoothing=0.0),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)
