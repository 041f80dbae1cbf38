"""The TinyViT soft-label store (poa_keras/data/softlabels.py, REFERENCE.md §4): replayed
augmentations equal the store-time ones pixel for pixel (also in another process), records
have the documented size and hold the teacher's own top-K (the dense target: test_distill.py),
resuming is exact, and bad or foreign stores are refused."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from poa_keras.data import make_shapes
from poa_keras.data.softlabels import (ReplayAugment, open_store,
                                       replay_augment, write_store)

N, SIZE, K, CLASSES, EPOCHS, BATCH = 40, 16, 3, 10, 2, 16
CONFIG = ReplayAugment(output_size=12, scale=(0.3, 1.0), flip_prob=0.5, jitter=0.4)
ROOT = Path(__file__).resolve().parent.parent


def make_teacher(seed=0, classes=CLASSES):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Rescaling(4.0, -2.0),
                             keras.layers.Flatten(), keras.layers.Dense(classes)],
                            name="tiny_teacher")


class Capture:
    """preprocess hook: keeps every batch the teacher sees (the store-time augmentations)."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append(np.array(batch))
        return batch

    def epoch(self, e):   # the first batch is write_store's one-image probe
        return np.concatenate(self.batches[1:])[e * N:(e + 1) * N]


@pytest.fixture(scope="module")
def images():
    return make_shapes(N, image_size=SIZE, seed=0)[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory, images):
    directory = tmp_path_factory.mktemp("store") / "store"
    capture = Capture()
    teacher = make_teacher()
    store = write_store(teacher, images, directory, epochs=EPOCHS, topk=K, config=CONFIG,
                        seed=7, batch_size=BATCH, teacher_name="tiny", preprocess=capture,
                        verbose=0)
    return directory, store, capture, teacher


def copy_store(written, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(written[0], target)
    return target


def replayed(store, epoch):
    return np.concatenate([x.numpy() for x, _ in store.dataset(epoch, BATCH)])


def test_replay_equals_store_time_augmentation(written, images):
    directory, _, capture, _ = written
    store = open_store(directory, images, expect={"teacher": "tiny", "topk": K,
                                                  "config": CONFIG})
    for e in range(EPOCHS):
        again = replayed(store, e)
        assert again.dtype == np.float32 and again.shape == (N, 12, 12, 3)
        assert 0.0 <= again.min() and again.max() <= 1.0
        np.testing.assert_array_equal(again, capture.epoch(e))
    # Eagerly, image by image, from the stored seed alone.
    seeds = store.records(1)["seed"]
    for i in (0, 5, N - 1):
        np.testing.assert_array_equal(replay_augment(images[i], int(seeds[i]), CONFIG).numpy(),
                                      capture.epoch(1)[i])
    # Shuffled: the same pairs (image, labels) in another order.
    x, y = zip(*[(a.numpy(), b["ids"].numpy()) for a, b in store.dataset(0, BATCH, 3)])
    order = np.random.Generator(np.random.PCG64(3)).permutation(N)
    np.testing.assert_array_equal(np.concatenate(x), capture.epoch(0)[order])
    np.testing.assert_array_equal(np.concatenate(y), store.records(0)["ids"][order])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the replay pipeline is tf.data on every backend: one backend "
                           "(tensorflow) checks the second process")
def test_replay_in_a_second_process(written, images, tmp_path):
    directory, _, capture, _ = written
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import numpy as np
        from poa_keras.data.softlabels import open_store
        images = np.load({str(tmp_path / "images.npy")!r})
        store = open_store({str(directory)!r}, images)
        x = np.concatenate([a.numpy() for a, _ in store.dataset(1, 7)])
        np.save({str(tmp_path / "replayed.npy")!r}, x)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND="tensorflow")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "replayed.npy"), capture.epoch(1))


def test_record_size_on_disk(written):
    directory, store, _, _ = written
    header = json.loads((directory / "store.json").read_text())
    assert header["record_bytes"] == 4 + 4 * K == store.record_bytes
    for e in range(EPOCHS):
        assert (directory / f"epoch_{e:04d}.bin").stat().st_size == N * (4 + 4 * K)
    assert sorted(p.name for p in directory.iterdir()) == \
        ["epoch_0000.bin", "epoch_0001.bin", "store.json"]
    raw = (directory / "epoch_0001.bin").read_bytes()
    rec = store.records(1)
    # Record 2 by hand: little-endian int32 seed, K int16 ids, K float16 values.
    start = 2 * (4 + 4 * K)
    assert int.from_bytes(raw[start:start + 4], "little", signed=True) == rec["seed"][2]
    np.testing.assert_array_equal(np.frombuffer(raw[start + 4:start + 4 + 2 * K], "<i2"),
                                  rec["ids"][2])
    np.testing.assert_array_equal(np.frombuffer(raw[start + 4 + 2 * K:start + 4 + 4 * K],
                                                "<f2"), rec["values"][2])


def test_stored_topk_is_the_teachers_own(written, images):
    directory, store, capture, teacher = written
    for e in range(EPOCHS):
        rec = store.records(e)
        seeds = np.random.Generator(np.random.PCG64([7, e])).integers(0, 2 ** 31, N,
                                                                      dtype=np.int32)
        np.testing.assert_array_equal(rec["seed"], seeds)
        x = replayed(store, e)
        logits = np.asarray(keras.ops.convert_to_numpy(teacher(x)), np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for i in range(N):
            top = sorted(range(CLASSES), key=lambda c: -p[i, c])[:K]
            assert list(rec["ids"][i]) == top
            np.testing.assert_allclose(rec["values"][i].astype(np.float64), p[i, top],
                                       rtol=2 ** -11, atol=0)
        labels = [b for _, b in store.dataset(e, BATCH)]
        ids = np.concatenate([b["ids"].numpy() for b in labels])
        values = np.concatenate([b["values"].numpy() for b in labels])
        assert ids.dtype == np.int32 and values.dtype == np.float32
        np.testing.assert_array_equal(ids, rec["ids"])
        np.testing.assert_array_equal(values, rec["values"].astype(np.float32))


def test_resume_rewrites_a_deleted_epoch_identically(written, images, tmp_path):
    directory = copy_store(written, tmp_path)
    before = {e: (directory / f"epoch_{e:04d}.bin").read_bytes() for e in range(EPOCHS)}
    (directory / "epoch_0001.bin").unlink()
    capture = Capture()
    write_store(make_teacher(), images, directory, epochs=EPOCHS, topk=K, config=CONFIG, seed=7,
                batch_size=BATCH, preprocess=capture, verbose=0)
    assert sum(len(b) for b in capture.batches) == 1 + N   # the probe and epoch 1 only
    for e in range(EPOCHS):
        assert (directory / f"epoch_{e:04d}.bin").read_bytes() == before[e]
    # Extending the store to a third epoch keeps the first two.
    store = write_store(make_teacher(), images, directory, epochs=3, topk=K, config=CONFIG,
                        seed=7, batch_size=BATCH, verbose=0)
    assert store.epochs == 3 and open_store(directory, images).epochs == 3
    assert (directory / "epoch_0000.bin").read_bytes() == before[0]


def test_foreign_store_is_refused(written, images, tmp_path):
    directory = copy_store(written, tmp_path)
    kwargs = dict(epochs=EPOCHS, topk=K, config=CONFIG, seed=7, batch_size=BATCH, verbose=0)
    with pytest.raises(ValueError, match="topk: store has 3, expected 4"):
        write_store(make_teacher(), images, directory, **{**kwargs, "topk": 4})
    with pytest.raises(ValueError, match="another teacher_fingerprint"):
        write_store(make_teacher(seed=1), images, directory, **kwargs)
    with pytest.raises(ValueError, match="teacher: store has 'tiny', expected 'other'"):
        write_store(make_teacher(), images, directory, teacher_name="other", **kwargs)
    other_config = ReplayAugment(output_size=12, scale=(0.5, 1.0))
    with pytest.raises(ValueError, match="augment"):
        write_store(make_teacher(), images, directory, **{**kwargs, "config": other_config})
    other_images = images.copy()
    other_images[0, 0, 0, 0] ^= 1
    with pytest.raises(ValueError, match="images_fingerprint"):
        write_store(make_teacher(), other_images, directory, **kwargs)
    with pytest.raises(ValueError, match="images_fingerprint"):
        open_store(directory, other_images)
    with pytest.raises(ValueError, match="num_images"):
        open_store(directory, images[:-1])
    with pytest.raises(ValueError, match="augment"):
        open_store(directory, images, expect={"config": other_config})
    with pytest.raises(ValueError, match="topk: store has 3, expected 5"):
        open_store(directory, images, expect={"topk": 5})
    with pytest.raises(ValueError, match="teacher_fingerprint"):
        open_store(directory, images, expect={"teacher": make_teacher(seed=1)})
    open_store(directory, images, expect={"teacher": written[3]})
    with pytest.raises(ValueError, match="unknown expect keys"):
        open_store(directory, images, expect={"colour": 1})
    with pytest.raises(ValueError, match="no soft-label store"):
        open_store(tmp_path / "nothing", images)


def test_truncated_or_missing_shard_is_refused(written, images, tmp_path):
    directory = copy_store(written, tmp_path)
    shard = directory / "epoch_0001.bin"
    shard.write_bytes(shard.read_bytes()[:-5])
    expected = f"{N * (4 + 4 * K)} bytes"
    with pytest.raises(ValueError, match=f"epoch_0001.bin is truncated.*expected {N * 16}"):
        open_store(directory, images)
    shard.unlink()
    with pytest.raises(ValueError, match=f"epoch_0001.bin is missing \\(expected {expected}"):
        open_store(directory, images)


def test_bad_arguments(images, tmp_path):
    kwargs = dict(epochs=1, config=CONFIG, verbose=0)
    with pytest.raises(ValueError, match="topk=11 is larger than the teacher's number of "
                                         "classes 10"):
        write_store(make_teacher(), images, tmp_path / "a", topk=11, **kwargs)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        write_store(make_teacher(), images, tmp_path / "a", topk=0, **kwargs)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        write_store(make_teacher(), images, tmp_path / "a", topk=1, epochs=0, config=CONFIG)
    not_logits = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Dense(4)])
    with pytest.raises(ValueError, match=r"class logits of shape \(B, C\).*\(1, 12, 12, 4\)"):
        write_store(not_logits, images, tmp_path / "a", topk=1, **kwargs)
    with pytest.raises(ValueError, match="uint8 array"):
        write_store(make_teacher(), images.astype(np.float32), tmp_path / "a", topk=1,
                    **kwargs)
    assert not any((tmp_path / "a").glob("epoch_*"))
    with pytest.raises(ValueError, match="flip_prob"):
        ReplayAugment(flip_prob=2.0)
    with pytest.raises(ValueError, match="unknown ReplayAugment settings"):
        ReplayAugment.from_config({"sizes": 3})


class Exploding(keras.Model):
    """A teacher whose third call raises (mid-epoch: the first call is the probe)."""

    def __init__(self):
        super().__init__(name="exploding")
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(CLASSES)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("teacher failed")
        return self.dense(self.flatten(x))


def test_nothing_half_written_when_the_teacher_fails(images, tmp_path):
    directory = tmp_path / "store"
    with pytest.raises(RuntimeError, match="teacher failed"):
        write_store(Exploding(), images, directory, epochs=1, topk=K, config=CONFIG,
                    batch_size=BATCH, verbose=0)
    assert sorted(os.listdir(directory)) == ["store.json"]   # no shard, no temporary
    with pytest.raises(ValueError, match="epoch_0000.bin is missing"):
        open_store(directory, images)


def test_replay_augment_is_a_pure_function_of_image_and_seed(images):
    a = replay_augment(images[0], 123, CONFIG).numpy()
    np.testing.assert_array_equal(a, replay_augment(images[0], 123, CONFIG.get_config()))
    assert not np.array_equal(a, replay_augment(images[0], 124, CONFIG).numpy())
    assert ReplayAugment.from_json(CONFIG.to_json()) == CONFIG
    plain = ReplayAugment(output_size=SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0,
                          jitter=0.0)
    # No crop, flip or jitter: the image itself, scaled to [0, 1].
    np.testing.assert_allclose(replay_augment(images[3], 5, plain).numpy(),
                               images[3] / 255.0, atol=1e-6)
    flipped = ReplayAugment(output_size=SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                            flip_prob=1.0, jitter=0.0)
    np.testing.assert_allclose(replay_augment(images[3], 5, flipped).numpy(),
                               images[3][:, ::-1] / 255.0, atol=1e-6)


def test_mixup_and_cutmix_replay_pair_by_pair(images, tmp_path):
    from poa_keras.data.softlabels import epoch_partners, mix_parameters

    mixing = ReplayAugment(output_size=12, scale=(0.3, 1.0), jitter=0.4, mixup=0.8, cutmix=1.0,
                           mix_prob=0.9, switch_prob=0.5)
    capture = Capture()
    store = write_store(make_teacher(), images, tmp_path / "mixed", epochs=1, topk=K,
                        config=mixing, seed=7, batch_size=BATCH, preprocess=capture, verbose=0)
    written = capture.epoch(0)
    np.testing.assert_array_equal(replayed(store, 0), written)          # replayed exactly
    # shuffled and batched otherwise: the same image for the same index
    x = np.concatenate([a.numpy() for a, _ in store.dataset(0, 5, shuffle_seed=1)])
    np.testing.assert_array_equal(
        x, written[np.random.Generator(np.random.PCG64(1)).permutation(N)])
    partners = epoch_partners(7, 0, N)
    assert (partners[partners] == np.arange(N)).all() and (partners != np.arange(N)).all()
    seeds = store.records(0)["seed"]
    plain = ReplayAugment(output_size=12, scale=(0.3, 1.0), jitter=0.4)
    modes = set()
    for i in range(N):
        j = int(partners[i])
        a = replay_augment(images[i], int(seeds[i]), plain).numpy().astype(np.float64)
        b = replay_augment(images[j], int(seeds[j]), plain).numpy().astype(np.float64)
        mode, lam, box = (np.asarray(v) for v in mix_parameters(int(seeds[i] ^ seeds[j]), mixing))
        modes.add(int(mode))
        if mode == 0:
            want = a
        elif mode == 1:
            assert 0.0 <= lam <= 1.0
            want = lam * a + (1.0 - lam) * b
        else:
            top, left, bottom, right = box
            want = a.copy()
            want[top:bottom, left:right] = b[top:bottom, left:right]
            area = (bottom - top) * (right - left)
            assert lam == pytest.approx(1.0 - area / 144.0, abs=1e-6)
        np.testing.assert_allclose(written[i], want, atol=1e-6)
    assert modes == {0, 1, 2}
    # an unmixed config leaves the record as before: stores written before still open
    assert "mixup" not in plain.get_config() and mixing.get_config()["cutmix"] == 1.0
    with pytest.raises(ValueError, match="mixup must be a finite number >= 0"):
        ReplayAugment(mixup=-1)
