"""MAE-Lite's fine-tuning of ViT-Tiny on ImageNet-1k (REFERENCE.md §3; wangsr126/mae-lite,
projects/eval_tools/finetuning_exp.py on finetuning_mae_exp.py, with timm 0.4.12's data
pipeline): 78.0 % top-1 after the 400-epoch MAE pretraining (recipes/mae_lite_tiny_in1k.py).

* 300 epochs, batch 1024, AdamW (0.9, 0.999), eps 1e-8, lr 1e-3 x 1024 / 256 = 4e-3, 5 warmup
  epochs from 0, then a cosine to 1e-6, per step; weight decay 0.05, not on biases, norms, the
  cls token and the position embedding; layer-wise lr decay 0.85; no gradient clipping.
* Head: the mean of the patch tokens, a LayerNorm (fc_norm, eps 1e-6), the linear classifier.
* Augmentation: RandomResizedCrop (0.08, 1), aspect (3/4, 4/3), bicubic, to 224 px; a flip;
  RandAugment "rand-m10-mstd0.5-inc1" (here: Keras' RandAugment, 2 ops, factor 0.45, see
  below); colour jitter 0.3 (which timm applies only without RandAugment: so none, as here);
  mixup 0.2 with probability 1, no cutmix; no label smoothing, drop path or random erasing.
* Evaluation: resize the shorter side to 224 / 0.875 = 256 (bicubic), centre crop 224 (timm's
  defaults, as MAE-Lite's resolve_data_config leaves them).

What differs from MAE-Lite, and why (docs/finetune.md has the details):

* RandAugment is Keras' (keras.layers.RandAugment), not timm's: 11 ops (timm's "inc1" set has
  15: no Invert, SolarizeAdd, separate x / y shear and translation here), both drawn ops
  always applied (timm: each with probability 0.5), strengths drawn uniformly in [0, factor]
  per image (timm: magnitude 10 with Gaussian noise of std 0.5, clipped to [0, 10]), on one
  scale for all ops. Factor 0.45 is the median (and the geometric mean) of the factors that
  match timm's m10 maximum op by op (rotation 30 deg -> 0.083, shear 0.3, translation 0.45,
  colour / contrast / sharpness 1 +- 0.9 -> 0.9-0.95, solarize -> 1, posterize 0 bits ->
  <= 0.24); since timm applies each op with probability 0.5 near its maximum and Keras always,
  uniformly up to the factor, the mean strength per drawn op comes out alike too.
* MixUp is Keras' (keras.layers.MixUp): one mixing weight per image, partners by a random
  permutation (timm's mode "batch": one weight per batch, the batch mixed with its reverse).
* The pooled tokens are the backbone's final-normed ones (MAE-Lite removes the encoder's final
  norm when it pools); fc_norm follows either way.
* The crop is cut at whole pixels and resized with TensorFlow's antialiased bicubic (PIL's
  kernel has the same a = -0.5); RandAugment's geometric ops interpolate bilinearly (Keras
  offers bilinear or nearest; timm: bicubic).

The model: the teacher/ of the MAE-Lite pretraining run, ``poa-keras pretrain
--recipe=mae_lite_tiny_in1k --output=runs/mae_lite_tiny_in1k``; another one with
``--override=model.preset=DIR``.

Data: TFDS ``imagenet2012`` (prepared by hand as TFDS describes; the "validation" split is
the held-out one), or folders of class sub-folders: ``--override=data.source='folder'
--override=data.path=/data/imagenet/train --override=data.val_path=/data/imagenet/val``.
"""
FINETUNE_RECIPE = dict(
    model=dict(preset="runs/mae_lite_tiny_in1k/teacher",
               preprocessing=dict(image_size=224, resize="resize_shorter_then_center_crop",
                                  crop_pct=0.875, interpolation="bicubic")),
    classifier=dict(pooling="avg_norm", dropout=0.0),
    data=dict(source="tfds", name="imagenet2012", split="train", val_split="validation",
              image_key="image", label_key="label", shuffle_buffer=10_000),
    augment=dict(image_size=224, crop_scale=(0.08, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
                 interpolation="bicubic", flip_prob=0.5, randaugment_ops=2,
                 randaugment_factor=0.45, color_jitter=0.3, force_color_jitter=False,
                 mixup=0.2, cutmix=0.0, mix_prob=1.0, switch_prob=0.5,
                 lanes=8),                     # 8 RandAugment lanes side by side per map call
    optimizer=dict(name="adamw", beta_1=0.9, beta_2=0.999, epsilon=1e-8),
    train=dict(epochs=300, batch_size=1024, lr=1e-3, lr_scaling="linear", reference_batch=256,
               min_lr=1e-6, warmup_epochs=5, weight_decay=0.05, layer_decay=0.85,
               patch_embed_lr_mult=1.0, clip_grad=None, label_smoothing=0.0),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)
