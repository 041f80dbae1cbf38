"""TinyViT-21M's fast pretraining distillation on ImageNet-22k (REFERENCE.md §4; microsoft/Cream,
TinyViT/configs/22k_distill/tiny_vit_21m_22k_distill.yaml): 84.8 % ImageNet-1k top-1 after the
22k -> 1k fine-tuning, with the paper's CLIP-ViT-L/14 teacher.

    poa-keras distill-store --recipe=tinyvit_21m_in22k_distill --teacher=TEACHER \\
        --data=/path/to/imagenet22k --output=stores/in22k_k100        # pass 1, once
    poa-keras finetune --recipe=tinyvit_21m_in22k_distill \\
        --override=distill.store="'stores/in22k_k100'" --data=/path/to/imagenet22k   # any student

The teacher is an argument (``--teacher`` / ``distill.teacher``: an ImageClassifier preset or a
.keras file mapping 224 px images to 21,841 logits): the paper's CLIP-ViT-L/14 teacher is not
available here, and its released top-100 logit files only replay with the official
augmentation code (REFERENCE.md §4), not this library's. Without a finished store the run writes
one first (``<output>/store``), which needs the teacher.

The paper's settings: 90 epochs, batch 4096, AdamW (0.9, 0.999, eps 1e-8), lr 2.5e-4 x
batch / 512 = 2e-3, 5 warmup epochs, cosine (to 1e-6 x batch / 512 here: REFERENCE.md gives
no minimum), weight decay 0.01 (not on vectors or attention-bias tables), gradient clipping at
5, drop path 0.1 for 21M, soft-target cross-entropy on the top-100 probabilities (the rest
spread uniformly), no temperature, no mixup / cutmix (the 22k-distill configs disable them),
random resized crop (0.08, 1) to 224, flip, colour jitter 0.4.

What differs, and why:

* No RandAugment (m9-mstd0.5) and no random erasing (0.25): the store replays its augmentation
  from a seed with stateless ops only (data/softlabels.py); Keras' RandAugment draws from a
  stateful generator and cannot be replayed. Colour jitter is brightness / contrast /
  saturation with one strength (timm adds hue 0).
* The crop is bilinear (TensorFlow's crop_and_resize); the official code uses bicubic.
* The images are held in memory for the store (N x 256^2 x 3 bytes: about 2.8 TB for IN-22k):
  this recipe runs as written on a subset, or on a machine with that much memory; a streaming
  source is not built yet. ``data.image_size`` (256) is the side the images are resized and
  centre-cropped to before the random crop.
* Store size: 4 + 4 x 100 = 404 bytes per image and epoch (14.2M images x 90 epochs: about
  516 GB); ``--override=distill.topk=10`` makes it 44 bytes.
"""
FINETUNE_RECIPE = dict(
    name="tinyvit_21m_in22k_distill",
    model=dict(config="tinyvit_21m", config_args=dict(drop_path_rate=0.1)),
    classifier=dict(pooling="cls", dropout=0.0),
    data=dict(source="folder", path="imagenet22k/train", val_fraction=0.01, image_size=256,
              threads=None),   # --data=DIR: the class folders
    augment=dict(image_size=224, crop_scale=(0.08, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
                 interpolation="bilinear", flip_prob=0.5, randaugment_ops=0, color_jitter=0.4,
                 mixup=0.0, cutmix=0.0),
    optimizer=dict(name="adamw", beta_1=0.9, beta_2=0.999, epsilon=1e-8),
    train=dict(epochs=90, batch_size=4096, lr=2.5e-4, lr_scaling="linear", reference_batch=512,
               min_lr=1e-6, warmup_epochs=5, weight_decay=0.01, clip_grad=5.0, layer_decay=1.0,
               label_smoothing=0.0),
    distill=dict(teacher=None, teacher_recipe=None, targets="stored", topk=100,
                 store_epochs=90, teacher_batch_size=256),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)
