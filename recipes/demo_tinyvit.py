"""The CPU demo of TinyViT's fast pretraining distillation (REFERENCE.md §4) on the embedded
shapes data set, in three stages, each resumable:

1. the teacher: recipes/demo_tinyvit_teacher.py (a small ResNet trained on the labels), run in
   ``<output>/teacher_run`` unless ``--teacher`` (``distill.teacher``) names a classifier
   preset or a .keras file;
2. the store: the teacher runs ONCE over the 3200 training images for ``store_epochs``
   augmented epochs; per image and epoch it keeps (seed, top-3 class ids, top-3
   probabilities) = 16 bytes in ``<output>/store`` (data/softlabels.py). K = 3 of 10 classes:
   the remaining mass is spread over the other 7, as TinyViT's K = 10 (or 100) of 1000
   (21,841) classes is spread over the rest, so the sparsification matters here too;
3. the student: a tiny TinyViT (head dim 32 as in the paper, 4 stages, 32 px) trained for 30
   epochs on the stored labels only, its augmentation replayed from the stored seeds (epoch e
   reads stored epoch e mod 10); the teacher is not in its step.

Store + student take about 4 minutes on 2 CPU cores with PyTorch (the store about 75 s, the
student about 5 s per epoch; the teacher stage apart: about 3 minutes). The held-out top-1 is printed and kept in result.json (the labels are
never used in training; they are logged as ``accuracy``).

``--override=distill.targets="teacher"`` runs the same student with the teacher in the step
(the online comparison, same top-K + float16 targets); ``"teacher_dense"`` with its full
softmax; ``"labels"`` on the hard labels with the same augmentation (no teacher).

Scaled down from TinyViT's 22k distillation (recipes/tinyvit_21m_in22k_distill.py): 30 epochs
over 10 stored ones, batch 64, lr 1e-3 (no batch scaling), warmup 2 epochs, crops of (0.35, 1) (the shapes are
small), colour jitter 0.3. The rest is the paper's: AdamW, weight decay 0.01, clipping at 5,
soft-target cross-entropy without temperature.
"""
FINETUNE_RECIPE = dict(
    name="demo_tinyvit",
    model=dict(config="tinyvit_test",
               config_args=dict(embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4))),
    classifier=dict(pooling="cls", dropout=0.0),
    data=dict(source="shapes", palette="light_on_dark", num_images=3200, num_val=1000,
              image_size=32, seed=0, threads=1),
    augment=dict(crop_scale=(0.35, 1.0), interpolation="bilinear", flip_prob=0.5,
                 randaugment_ops=0, color_jitter=0.3, mixup=0.0, cutmix=0.0),
    optimizer=dict(name="adamw", beta_1=0.9, beta_2=0.999, epsilon=1e-8),
    train=dict(epochs=30, batch_size=64, lr=1e-3, lr_scaling="none", min_lr=1e-5,
               warmup_epochs=2, weight_decay=0.01, clip_grad=5.0, layer_decay=1.0,
               label_smoothing=0.0),
    distill=dict(teacher_recipe="demo_tinyvit_teacher", targets="stored", topk=3,
                 store_epochs=10),
    checkpoint=dict(every_epochs=1, keep=2),
    seed=0,
)
