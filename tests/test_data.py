"""t2tvit.data: datasets read from tiny files made here, unsafe pickles refused, transforms for 1 and 3 channels."""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import random
from datetime import date

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.auto_augment import RandAugment

from t2tvit.data import DATASETS, DataError, build_dataset, build_transform, fetch_fashion_mnist
from t2tvit.data.fetch import main as fetch_main
from t2tvit.data.transforms import ToNormalizedTensor, posterize_allowing_zero_bits
from timm.data.transforms import MaybeToTensor
from torchvision import transforms as T

FOUR_IDX = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


# ----------------------------------------------------------------------------------------------------------------
# helpers that write data the way the official distributions do


def write_idx(path, array: np.ndarray, gz: bool = False):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    payload = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + '.gz')
        with gzip.open(path, 'wb') as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_idx_folder(folder, n_train=5, n_val=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (('train', n_train), ('t10k', n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f'{prefix}-images-idx3-ubyte', images, gz)
        write_idx(folder / f'{prefix}-labels-idx1-ubyte', labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def cifar_rows(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def make_cifar10(parent, protocol=2, per_batch=2, n_test=3):
    folder = parent / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    rows, labels = [], []
    for i in range(1, 6):
        data, batch_labels = cifar_rows(rng, per_batch), [int(v) for v in rng.integers(0, 10, per_batch)]
        rows.append(data)
        labels += batch_labels
        batch = {b'batch_label': f'training batch {i} of 5'.encode(), b'labels': batch_labels, b'data': data,
                 b'filenames': [b'x.png'] * per_batch}
        (folder / f'data_batch_{i}').write_bytes(pickle.dumps(batch, protocol=protocol))
    test = {b'labels': [9, 0, 3][:n_test], b'data': cifar_rows(rng, n_test)}
    (folder / 'test_batch').write_bytes(pickle.dumps(test, protocol=protocol))
    names = [n.encode() for n in ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                                  'truck')]
    meta = {b'num_cases_per_batch': per_batch, b'label_names': names, b'num_vis': 3072}
    (folder / 'batches.meta').write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder, np.concatenate(rows), labels, test


def make_cifar100(parent, protocol=2):
    folder = parent / 'cifar-100-python'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(100)
    for name, n in (('train', 4), ('test', 2)):
        batch = {b'fine_labels': [int(v) for v in rng.integers(0, 100, n)],
                 b'coarse_labels': [int(v) for v in rng.integers(0, 20, n)], b'data': cifar_rows(rng, n)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b'fine_label_names': [f'fine_{i}'.encode() for i in range(100)],
            b'coarse_label_names': [f'coarse_{i}'.encode() for i in range(20)]}
    (folder / 'meta').write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


def make_imagefolder(root, val_name='val', corrupt=True):
    """train: cat (3 images + a corrupt one, sorted 2nd) and dog (2 images); val: cat and dog, one image each."""
    rng = np.random.default_rng(1)
    layout = {'train': {'cat': 3, 'dog': 2}, val_name: {'cat': 1, 'dog': 1}}
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (6 + i, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f'img{2 * i}.png')
    if corrupt:
        (root / 'train' / 'cat' / 'img1_broken.jpg').write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    return root


# ----------------------------------------------------------------------------------------------------------------
# build_dataset arguments


def test_unknown_dataset_split_and_policy_are_refused():
    with pytest.raises(DataError, match='imagefolder, cifar10, cifar100, mnist, fashion_mnist, fake'):
        build_dataset('imagenet', '/nowhere', 'train')
    with pytest.raises(DataError, match='train or val'):
        build_dataset('fake', None, 'training')
    with pytest.raises(DataError, match="'fail'.*'skip'"):
        build_dataset('fake', None, 'train', on_bad_image='ignore')
    with pytest.raises(DataError, match='--data'):
        build_dataset('mnist', None, 'train')
    assert issubclass(DataError, ValueError) and len(DATASETS) == 8


# ----------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


def test_mnist_reads_idx_images_and_labels(tmp_path):
    arrays = make_idx_folder(tmp_path)
    train = build_dataset('mnist', tmp_path, 'train')
    val = build_dataset('mnist', tmp_path, 'val', in_chans=1)
    assert len(train) == 5 and len(val) == 3
    assert train.classes == [str(i) for i in range(10)] and train.num_classes == 10
    assert train.data.dtype == torch.uint8 and tuple(train.data.shape) == (5, 28, 28)
    assert train.targets.dtype == torch.int64 and train.targets.tolist() == arrays['train'][1].tolist()
    image, label = val[2]
    assert image.mode == 'L' and isinstance(label, int) and label == int(arrays['t10k'][1][2])
    assert np.array_equal(np.asarray(image), arrays['t10k'][0][2])
    rgb, _ = train[1]
    assert rgb.mode == 'RGB' and np.array_equal(np.asarray(rgb)[..., 1], arrays['train'][0][1])
    test = build_dataset('mnist', tmp_path, 'test')
    assert torch.equal(test.data, build_dataset('mnist', tmp_path, 'val').data)


def test_gzipped_idx_equals_plain(tmp_path):
    make_idx_folder(tmp_path / 'plain', gz=False, seed=3)
    make_idx_folder(tmp_path / 'gz', gz=True, seed=3)
    assert sorted(p.name for p in (tmp_path / 'gz').iterdir()) == sorted(f'{n}.gz' for n in FOUR_IDX)
    for split in ('train', 'val'):
        plain = build_dataset('fashion_mnist', tmp_path / 'plain', split)
        zipped = build_dataset('fashion_mnist', tmp_path / 'gz', split)
        assert torch.equal(plain.data, zipped.data) and torch.equal(plain.targets, zipped.targets)
    assert zipped.classes[0] == 'T-shirt/top' and zipped.classes[-1] == 'Ankle boot' and len(zipped.classes) == 10


def test_missing_idx_files_name_all_four_and_the_fetch(tmp_path):
    with pytest.raises(DataError) as info:
        build_dataset('fashion_mnist', tmp_path, 'train')
    message = str(info.value)
    assert all(name in message for name in FOUR_IDX) and str(tmp_path) in message
    assert 'fetch_fashion_mnist' in message and 'make data' in message and 'dataset-fashion-mnist' in message
    with pytest.raises(DataError) as info:
        build_dataset('mnist', tmp_path, 'val')
    assert 't10k-images-idx3-ubyte' in str(info.value) and 'fetch_fashion_mnist' not in str(info.value)


def test_bad_idx_files_are_named(tmp_path):
    arrays = make_idx_folder(tmp_path, n_train=4)
    images_path, labels_path = tmp_path / 'train-images-idx3-ubyte', tmp_path / 'train-labels-idx1-ubyte'

    write_idx(images_path, arrays['train'][1])  # a labels file under the images name
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte: IDX magic number 0x00000801, expected 0x00000803'):
        build_dataset('mnist', tmp_path, 'train')

    write_idx(images_path, arrays['train'][0])
    images_path.write_bytes(images_path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte.*truncated'):
        build_dataset('mnist', tmp_path, 'train')

    write_idx(images_path, arrays['train'][0])
    write_idx(labels_path, arrays['train'][1][:3])
    with pytest.raises(DataError, match=r'4 images but .*train-labels-idx1-ubyte has 3 labels'):
        build_dataset('mnist', tmp_path, 'train')

    labels_path.write_bytes(b'\x00\x00')
    with pytest.raises(DataError, match=r'train-labels-idx1-ubyte is truncated'):
        build_dataset('mnist', tmp_path, 'train')


# ----------------------------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize('protocol', [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_from_parent_or_batches_folder(tmp_path, protocol):
    folder, rows, labels, test = make_cifar10(tmp_path, protocol=protocol)
    for root in (tmp_path, folder):
        train = build_dataset('cifar10', root, 'train')
        assert len(train) == 10 and train.targets == labels
        assert train.data.shape == (10, 32, 32, 3) and train.data.dtype == np.uint8
        assert train.classes[:2] == ['airplane', 'automobile'] and train.num_classes == 10
    # rows are channel-major: pixel (y, x) of channel c sits at c * 1024 + y * 32 + x
    image, label = train[7]
    assert image.mode == 'RGB' and label == labels[7]
    pixels = np.asarray(image)
    assert pixels[3, 5, 2] == rows[7][2 * 1024 + 3 * 32 + 5] and pixels[31, 0, 0] == rows[7][31 * 32]
    val = build_dataset('cifar10', tmp_path, 'test', in_chans=1)
    assert len(val) == 3 and val.targets == [9, 0, 3]
    grey, _ = val[0]
    assert grey.mode == 'L' and grey.size == (32, 32)


def test_cifar100_uses_fine_labels(tmp_path):
    make_cifar100(tmp_path, protocol=pickle.HIGHEST_PROTOCOL)
    train, val = build_dataset('cifar100', tmp_path, 'train'), build_dataset('cifar100', tmp_path, 'val')
    assert len(train) == 4 and len(val) == 2 and train.num_classes == 100
    assert train.classes[0] == 'fine_0' and train.classes[99] == 'fine_99'
    raw = pickle.loads((tmp_path / 'cifar-100-python' / 'train').read_bytes())
    assert train.targets == raw[b'fine_labels']
    image, label = train[3]
    assert image.size == (32, 32) and label == raw[b'fine_labels'][3]


def test_cifar_missing_files_are_named(tmp_path):
    with pytest.raises(DataError) as info:
        build_dataset('cifar10', tmp_path, 'train')
    message = str(info.value)
    assert 'cifar-10-batches-py' in message and 'data_batch_1' in message and 'batches.meta' in message
    folder, *_ = make_cifar10(tmp_path)
    (folder / 'data_batch_3').unlink()
    with pytest.raises(DataError, match=r'missing data_batch_3 in .*cifar-10-batches-py'):
        build_dataset('cifar10', tmp_path, 'train')
    assert len(build_dataset('cifar10', tmp_path, 'val')) == 3  # val needs only test_batch
    with pytest.raises(DataError, match=r'does not exist.*cifar-100-python.*train, test, meta'):
        build_dataset('cifar100', tmp_path / 'nothing', 'train')


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'echo pwned > {self.marker}',)


@pytest.mark.parametrize('protocol', [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, protocol):
    folder, *_ = make_cifar10(tmp_path)
    marker = tmp_path / 'pwned'
    evil = {b'labels': [0], b'data': RunsAShellCommand(marker)}
    (folder / 'test_batch').write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(DataError, match=r'refused to unpickle (posix|os)\.system from .*test_batch'):
        build_dataset('cifar10', tmp_path, 'val')
    assert not marker.exists()
    # a harmless but non-array class is refused just the same: only what numpy arrays need gets through
    (folder / 'batches.meta').write_bytes(pickle.dumps({b'label_names': [date(2020, 1, 1)]}, protocol=protocol))
    with pytest.raises(DataError, match=r'refused to unpickle datetime\.date from .*batches\.meta'):
        build_dataset('cifar10', tmp_path, 'train')


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-style folders


def test_imagefolder_reads_classes_and_both_val_names(tmp_path):
    make_imagefolder(tmp_path / 'a', corrupt=False)
    make_imagefolder(tmp_path / 'b', val_name='validation', corrupt=False)
    train = build_dataset('imagefolder', tmp_path / 'a', 'train', in_chans=1)
    assert train.classes == ['cat', 'dog'] and train.num_classes == 2 and len(train) == 5
    assert [train[i][1] for i in range(5)] == [0, 0, 0, 1, 1]
    assert train[0][0].mode == 'L'
    for root in ('a', 'b'):
        val = build_dataset('imagefolder', tmp_path / root, 'val')
        assert len(val) == 2 and [label for _, label in val] == [0, 1] and val[1][0].mode == 'RGB'


def test_imagefolder_skips_corrupt_image_once_and_records_it(tmp_path, caplog):
    root = make_imagefolder(tmp_path)
    train = build_dataset('imagefolder', root, 'train', on_bad_image='skip')
    assert len(train) == 6 and os.path.basename(train.samples[1][0]) == 'img1_broken.jpg'
    with caplog.at_level(logging.WARNING, logger='t2tvit.data'):
        samples = [train[i] for i in range(len(train))] + [train[1]]
    assert [os.path.basename(p) for p in train.bad_files] == ['img1_broken.jpg']
    warnings = [r.getMessage() for r in caplog.records if 'img1_broken.jpg' in r.getMessage()]
    assert len(warnings) == 1
    # the corrupt sample is replaced by the next one, image and label together
    assert np.array_equal(np.asarray(samples[1][0]), np.asarray(samples[2][0])) and samples[1][1] == samples[2][1]
    assert np.asarray(samples[1][0]).shape == (7, 8, 3)  # img2.png, the file after the broken one


def test_imagefolder_fail_names_the_corrupt_file(tmp_path):
    root = make_imagefolder(tmp_path)
    train = build_dataset('imagefolder', root, 'train')
    assert train[0][1] == 0
    with pytest.raises(DataError, match=r'img1_broken\.jpg.*on_bad_image=.skip.'):
        train[1]


def test_imagefolder_gives_up_when_nothing_is_readable(tmp_path):
    (tmp_path / 'train' / 'x').mkdir(parents=True)
    for i in range(3):
        (tmp_path / 'train' / 'x' / f'{i}.jpg').write_bytes(b'not an image')
    train = build_dataset('imagefolder', tmp_path, 'train', on_bad_image='skip')
    with pytest.raises(DataError, match='3 images in a row are unreadable'):
        train[0]
    assert len(train.bad_files) == 3


def test_imagefolder_layout_errors_say_what_is_expected(tmp_path):
    with pytest.raises(DataError, match=r'does not exist.*train/<class>/<image>'):
        build_dataset('imagefolder', tmp_path / 'missing', 'train')
    (tmp_path / 'train').mkdir()
    with pytest.raises(DataError, match=r'no val split folder: .*/val \(or .*/validation\) is missing'):
        build_dataset('imagefolder', tmp_path, 'val')
    with pytest.raises(DataError, match=r'train has no class folders.*train/<class>/<image>'):
        build_dataset('imagefolder', tmp_path, 'train')
    (tmp_path / 'train' / 'cat').mkdir()
    (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')
    with pytest.raises(DataError, match=r'no images under .*train.*\.jpg'):
        build_dataset('imagefolder', tmp_path, 'train')


def test_imagefolder_val_keeps_train_labels(tmp_path):
    root = make_imagefolder(tmp_path, corrupt=False)
    for image in (root / 'val' / 'cat').iterdir():
        image.unlink()
    (root / 'val' / 'cat').rmdir()  # val lacks 'cat': 'dog' must stay label 1
    val = build_dataset('imagefolder', root, 'val')
    assert val.classes == ['cat', 'dog'] and [label for _, label in val] == [1]
    (root / 'val' / 'cow').mkdir()
    with pytest.raises(DataError, match=r'class folders that .*train lacks: cow'):
        build_dataset('imagefolder', root, 'val')


# ----------------------------------------------------------------------------------------------------------------
# fake


def test_fake_is_deterministic_and_learnable():
    to_tensor = build_transform(False, 8, crop_pct=1.0, mean=(0.0,), std=(1.0,))
    first = build_dataset('fake', None, 'train', to_tensor, fake_num_samples=40, fake_num_classes=4,
                          fake_image_size=8, seed=5)
    second = build_dataset('fake', 'ignored', 'train', to_tensor, fake_num_samples=40, fake_num_classes=4,
                           fake_image_size=8, seed=5)
    assert len(first) == 40 and first.classes == ['class_0', 'class_1', 'class_2', 'class_3']
    items = [first[i] for i in range(40)]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(items, (second[i] for i in range(40))))
    assert items[0][0].shape == (3, 8, 8) and first.targets == [label for _, label in items]
    other_seed = build_dataset('fake', None, 'train', to_tensor, fake_num_samples=40, fake_num_classes=4,
                               fake_image_size=8, seed=6)
    val = build_dataset('fake', None, 'val', to_tensor, fake_num_samples=40, fake_num_classes=4, fake_image_size=8,
                        seed=5)
    assert not torch.equal(other_seed[0][0], items[0][0]) and not torch.equal(val[0][0], items[0][0])
    # every class appears, and its mean brightness tells it apart from the others
    labels = torch.tensor([label for _, label in items])
    brightness = torch.stack([image.mean() for image, _ in items])
    class_means = torch.stack([brightness[labels == c].mean() for c in range(4)])
    assert set(labels.tolist()) == {0, 1, 2, 3} and bool((class_means.diff() > 0.1).all())
    grey, _ = build_dataset('fake', None, 'train', in_chans=1, fake_image_size=12)[0]
    assert grey.mode == 'L' and grey.size == (12, 12)


# ----------------------------------------------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize('in_chans', [1, 3])
def test_train_transform_with_randaugment_and_erasing(in_chans):
    random.seed(0)
    torch.manual_seed(0)
    mode, shape = ('L', (30, 40)) if in_chans == 1 else ('RGB', (30, 40, 3))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), mode)
    transform = build_transform(True, 24, in_chans=in_chans, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25)
    for _ in range(30):
        out = transform(image)
        assert out.shape == (in_chans, 24, 24) and out.dtype == torch.float32
    # an RGB image for a 1-channel pipeline (and the reverse) is converted first
    other = image.convert('RGB' if in_chans == 1 else 'L')
    assert transform(other).shape == (in_chans, 24, 24)
    plain = build_transform(True, (3 if in_chans == 3 else 1, 20, 20), in_chans=in_chans, color_jitter=0.4)
    assert plain(image).shape == (in_chans, 20, 20)


def test_randaugment_survives_posterize_to_zero_bits():
    """At magnitude 10, 'inc1' posterize keeps 0 bits, which Pillow >= 13 rejects; it must give a black image."""
    image = Image.fromarray(np.full((10, 10), 200, dtype=np.uint8), 'L')
    assert np.asarray(posterize_allowing_zero_bits(image, 0)).max() == 0
    assert np.asarray(posterize_allowing_zero_bits(image.convert('RGB'), 1)).max() == 128
    transform = build_transform(True, 10, in_chans=1, auto_augment='rand-m10-n3-mstd0-inc1')
    rand_augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    assert any(op.name == 'PosterizeIncreasing' and op.aug_fn is posterize_allowing_zero_bits
               for op in rand_augment.ops)
    random.seed(0)
    for _ in range(100):  # each call posterizes with probability ~1/10 (3 of 15 ops, each applied half the time)
        assert transform(image).shape == (1, 10, 10)


@pytest.mark.parametrize('in_chans', [1, 3])
def test_eval_transform_resizes_by_crop_pct_then_center_crops(in_chans):
    mode, shape = ('L', (50, 70)) if in_chans == 1 else ('RGB', (50, 70, 3))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8), mode)
    transform = build_transform(False, 32, in_chans=in_chans, crop_pct=0.8, mean=(0.0,) * 3, std=(1.0,) * 3)
    resize = next(t for t in transform.transforms if type(t).__name__ == 'Resize')
    assert resize.size in (40, [40], (40,))  # int(32 / 0.8): the shorter side becomes 40
    expected = TF.to_tensor(TF.center_crop(TF.resize(image, 40, TF.InterpolationMode.BICUBIC), 32))
    out = transform(image)
    assert out.shape == (in_chans, 32, 32) and torch.allclose(out, expected)
    default = build_transform(False, 224, in_chans=in_chans)
    assert next(t for t in default.transforms if type(t).__name__ == 'Resize').size in (248, [248], (248,))


def test_transform_fits_mean_std_to_channels():
    grey = build_transform(False, 16, in_chans=1, mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3))
    normalize = next(t for t in grey.transforms if isinstance(t, T.Normalize))
    assert torch.allclose(torch.as_tensor(normalize.mean), torch.tensor([0.4]))
    assert torch.allclose(torch.as_tensor(normalize.std), torch.tensor([0.2]))
    rgb = build_transform(False, 16, in_chans=3, mean=(0.5,), std=(0.5,))
    assert build_transform(False, 16, in_chans=3)(Image.new('L', (20, 20))).shape == (3, 16, 16)
    assert rgb(Image.new('RGB', (16, 16), (255, 0, 128))).shape == (3, 16, 16)
    with pytest.raises(DataError, match='in_chans=4'):
        build_transform(False, 16, in_chans=4)
    with pytest.raises(DataError, match='2 values'):
        build_transform(False, 16, mean=(0.5, 0.5))
    with pytest.raises(DataError, match='positive std'):
        build_transform(False, 16, in_chans=1, std=(0.0,))


@pytest.mark.parametrize('training', [True, False])
def test_to_normalized_tensor_gives_timm_s_numbers(training):
    """build_transform ends in ToNormalizedTensor, which must give exactly what timm's MaybeToTensor then
    torchvision's Normalize give, for greyscale and RGB images of any size, and take their path for anything else."""
    rng = np.random.default_rng(3)
    for in_chans, shape in ((1, (28, 28)), (3, (37, 23, 3)), (3, (224, 224, 3))):
        mode = 'L' if in_chans == 1 else 'RGB'
        mean, std = rng.uniform(0.1, 0.9, in_chans), rng.uniform(0.1, 0.5, in_chans)
        transform = build_transform(training, shape[:2], in_chans=in_chans, mean=mean, std=std, scale=(1.0, 1.0),
                                    ratio=(shape[1] / shape[0],) * 2, hflip=0.0, color_jitter=None, crop_pct=1.0)
        fused = [t for t in transform.transforms if isinstance(t, T.Normalize)]
        assert len(fused) == 1 and type(fused[0]) is ToNormalizedTensor
        assert not any(isinstance(t, MaybeToTensor) for t in transform.transforms)
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        reference = T.Compose([MaybeToTensor(), T.Normalize(torch.tensor(mean, dtype=torch.float32),
                                                             torch.tensor(std, dtype=torch.float32))])
        out = fused[0](image)
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (in_chans, *shape[:2])
        assert torch.equal(out, reference(image))
        assert torch.equal(transform(image), reference(image))  # the crop at full size keeps every pixel
    step = ToNormalizedTensor((0.5,), (0.25,))
    as_tensor = torch.rand(1, 5, 5)  # a tensor passes through MaybeToTensor as it is, then is normalised
    assert torch.equal(step(as_tensor), (as_tensor - 0.5) / 0.25)
    floats = Image.fromarray(rng.uniform(0, 1, (4, 6)).astype(np.float32), 'F')  # not 8-bit: torchvision's path
    assert torch.equal(step(floats), T.Normalize((0.5,), (0.25,))(MaybeToTensor()(floats)))


# ----------------------------------------------------------------------------------------------------------------
# fetch_fashion_mnist (never downloads in tests)


def test_fetch_is_a_no_op_when_the_files_are_there(tmp_path, monkeypatch, capsys):
    import subprocess

    def no_subprocess(*args, **kwargs):
        raise AssertionError('fetch ran a command although the files were present')

    monkeypatch.setattr(subprocess, 'run', no_subprocess)
    for name in FOUR_IDX[:2]:
        (tmp_path / f'{name}.gz').write_bytes(b'')
    for name in FOUR_IDX[2:]:
        (tmp_path / name).write_bytes(b'')  # plain files count too
    before = sorted(p.name for p in tmp_path.iterdir())
    assert fetch_fashion_mnist(tmp_path) == tmp_path
    assert fetch_main([str(tmp_path)]) == 0 and str(tmp_path) in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fetch_without_apt_get_says_how_to_get_the_files(tmp_path, monkeypatch, capsys):
    empty = tmp_path / 'empty-bin'
    empty.mkdir()
    monkeypatch.setenv('PATH', str(empty))
    dest = tmp_path / 'fm'
    with pytest.raises(DataError) as info:
        fetch_fashion_mnist(dest)
    message = str(info.value)
    assert '`apt-get` is not installed' in message and 'apt-get download dataset-fashion-mnist' in message
    assert 'dpkg -x' in message and '--data' in message and str(dest) in message
    assert 'train-images-idx3-ubyte.gz' in message
    assert list(dest.iterdir()) == []  # nothing half-copied
    assert fetch_main([str(dest)]) == 1 and 'apt-get' in capsys.readouterr().err
