"""`t2tvit predict` and what it stands on: class names, image loading, the shared checkpoint restore."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import t2tvit
from t2tvit.cli.main import main as cli
from t2tvit.data import DataError
from t2tvit.data.images import find_images, load_image
from t2tvit.data.labels import (
    CIFAR10_CLASSES, CIFAR100_CLASSES, IMAGENET_CLASSES_FILE, class_names_for, imagenet_classes)
from t2tvit.engine.restore import restore_model
from t2tvit.tools.predict import predict_images

# --- class names ------------------------------------------------------------------------------------------------


def test_shipped_imagenet_names_are_timms_in_index_order():
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    names = imagenet_classes()
    assert len(names) == 1000 and names == [info.index_to_description(i) for i in range(1000)]
    assert names[0] == 'tench, Tinca tinca' and names[281].startswith('tabby')
    assert IMAGENET_CLASSES_FILE.read_text(encoding='utf-8').count('\n') == 1000


def test_cifar_class_lists():
    assert len(CIFAR10_CLASSES) == 10 and CIFAR10_CLASSES[3] == 'cat'
    # the CIFAR-100 archive lists its fine labels alphabetically
    assert len(set(CIFAR100_CLASSES)) == 100 and CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)


def test_class_names_come_from_the_best_source(tmp_path):
    labels = tmp_path / 'labels.txt'
    labels.write_text('a\nb\nc\n\n')
    assert class_names_for(3, saved=['x', 'y', 'z'], labels_file=labels) == ['a', 'b', 'c']
    assert class_names_for(3, saved=['x', 'y', 'z'], dataset='cifar10') == ['x', 'y', 'z']
    assert class_names_for(10, saved=['x'], dataset='fashion_mnist')[0] == 'T-shirt/top'  # wrong length: passed over
    assert class_names_for(100, dataset='cifar100')[1] == 'aquarium_fish'
    assert class_names_for(1000)[1] == 'goldfish, Carassius auratus'
    assert class_names_for(4) == ['0', '1', '2', '3']
    with pytest.raises(DataError, match='has 3 names but the model predicts 4'):
        class_names_for(4, labels_file=labels)
    with pytest.raises(DataError, match='does not exist'):
        class_names_for(4, labels_file=tmp_path / 'missing.txt')


# --- images -----------------------------------------------------------------------------------------------------

def test_load_image_handles_common_modes(tmp_path):
    rgba = Image.new('RGBA', (6, 4), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: shown white
    rgba.save(tmp_path / 'rgba.png')
    image = load_image(tmp_path / 'rgba.png')
    assert image.mode == 'RGB' and image.size == (6, 4)
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 0)) == (10, 200, 30)

    palette = Image.new('P', (5, 5), 1)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.save(tmp_path / 'palette.gif')
    assert load_image(tmp_path / 'palette.gif').getpixel((2, 2)) == (250, 10, 10)
    assert load_image(tmp_path / 'palette.gif', 'L').mode == 'L'

    Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)).save(tmp_path / 'deep.png')  # 16-bit grey
    assert load_image(tmp_path / 'deep.png', 'L').getpixel((1, 1)) == 255

    Image.new('L', (4, 4), 77).save(tmp_path / 'grey.jpg')
    assert load_image(tmp_path / 'grey.jpg').mode == 'RGB'


def test_load_image_applies_the_exif_rotation(tmp_path):
    image = Image.new('RGB', (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to show upright
    image.save(tmp_path / 'phone.jpg', exif=exif)
    assert load_image(tmp_path / 'phone.jpg').size == (20, 40)


def test_find_images_walks_folders_and_refuses_missing_paths(tmp_path):
    (tmp_path / 'sub').mkdir()
    for name in ('b.png', 'a.JPG', 'sub/c.webp', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    assert [p.name for p in find_images([tmp_path])] == ['a.JPG', 'b.png', 'c.webp']
    with pytest.raises(DataError, match='nope.png does not exist'):
        find_images([tmp_path / 'nope.png'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='holds no images'):
        find_images([tmp_path / 'empty'])


# --- predict ----------------------------------------------------------------------------------------------------

@pytest.fixture()
def photo_folder(tmp_path):
    """Images of several modes and sizes, one corrupt file and a file that is not an image."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / 'rgb.jpg')
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / 'grey.png')
    Image.fromarray(rng.integers(0, 255, (40, 30, 4), dtype=np.uint8), 'RGBA').save(folder / 'rgba.png')
    Image.fromarray(rng.integers(0, 255, (33, 33, 3), dtype=np.uint8)).convert('P').save(folder / 'palette.gif')
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    (folder / 'readme.txt').write_text('not an image, and not picked up from a folder')
    return folder


def test_predict_matches_the_model_on_its_eval_transform_in_any_batch_size(tiny_run, photo_folder):
    restored = restore_model(tiny_run)
    assert restored.name == 't2t_vit_mini' and restored.classes == [f'class_{i}' for i in range(4)]
    one = predict_images(restored, [photo_folder], topk=4, batch_size=1, progress=False)
    many = predict_images(restored, [photo_folder], topk=4, batch_size=3, progress=False)
    assert [p.image for p in one.predictions] == [str(photo_folder / n) for n in
                                                  ('grey.png', 'palette.gif', 'rgb.jpg', 'rgba.png')]
    assert [path for path, _ in one.failed] == [str(photo_folder / 'broken.png')]
    transform = restored.transform()
    with torch.no_grad():
        for a, b in zip(one.predictions, many.predictions):
            expected = restored.model(transform(load_image(a.image)).unsqueeze(0)).softmax(-1)[0]
            probs = [p for _, _, p in a.top]
            assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
            for (index, name, prob), (index_b, _, prob_b) in zip(a.top, b.top):
                assert name == f'class_{index}' and index == index_b
                assert prob == pytest.approx(expected[index].item(), abs=1e-6)
                assert prob_b == pytest.approx(prob, abs=1e-5)


def test_predict_command_text_json_and_exit_status(tiny_run, photo_folder, tmp_path, capsys):
    assert cli(['predict', str(photo_folder / 'rgb.jpg'), '--checkpoint', str(tiny_run), '--topk', '2']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith('rgb.jpg') and len(out) == 3 and out[1].strip().endswith(tuple(f'class_{i}'
                                                                                           for i in range(4)))
    labels = tmp_path / 'labels.txt'
    labels.write_text('cat\ndog\nfox\nowl\n')
    code = cli(['predict', str(photo_folder), '--checkpoint', str(tiny_run), '--json', '--labels', str(labels)])
    captured = capsys.readouterr()
    assert code == 1  # one file could not be read
    report = json.loads(captured.out)
    assert report['model'] == 't2t_vit_mini' and len(report['predictions']) == 4
    assert {t['label'] for p in report['predictions'] for t in p['top']} <= {'cat', 'dog', 'fox', 'owl'}
    assert [f['image'] for f in report['failed']] == [str(photo_folder / 'broken.png')]
    assert 'broken.png' in captured.err and 'skipped' in captured.err


def test_predict_names_bad_input(tiny_run, photo_folder, tmp_path, capsys):
    assert cli(['predict', str(tmp_path / 'missing.jpg'), '--checkpoint', str(tiny_run)]) == 2
    assert 'missing.jpg does not exist' in capsys.readouterr().err
    assert cli(['predict', str(photo_folder), '--checkpoint', str(tmp_path / 'nope.pth')]) == 2
    assert 'nope.pth' in capsys.readouterr().err
    assert cli(['predict', str(photo_folder), '--checkpoint', str(tiny_run), '--model', 't2t_vit_14']) == 2
    assert 'does not fit t2t_vit_14' in capsys.readouterr().err
    assert cli(['predict', str(photo_folder), '--checkpoint', str(tiny_run), '--model', 'resnet_t2t']) == 2
    assert "unknown model 'resnet_t2t'" in capsys.readouterr().err
    assert cli(['predict', str(photo_folder), '--checkpoint', str(tiny_run), '--model-kwargs', '{num_heads: 3}']) == 2
    assert 'cannot build t2t_vit_mini: embed_dim 32 is not divisible by num_heads 3' in capsys.readouterr().err
    assert cli(['predict', str(photo_folder), '--checkpoint', str(tiny_run), '--topk', '0']) == 2
    assert '--topk 0: give a whole number >= 1' in capsys.readouterr().err


def test_a_1000_class_state_dict_predicts_imagenet_names(tmp_path, capsys):
    kwargs = dict(embed_dim=32, depth=1, num_heads=2, token_dim=8, img_size=32)
    model = t2tvit.create_model('t2t_vit_7', **kwargs)
    torch.save(model.state_dict(), tmp_path / 'bare.pth')  # no name, no config: the command line says
    Image.new('RGB', (50, 40), (120, 30, 200)).save(tmp_path / 'x.png')
    assert cli(['predict', str(tmp_path / 'x.png'), '--checkpoint', str(tmp_path / 'bare.pth')]) == 2
    assert 'pass --model NAME' in capsys.readouterr().err
    code = cli(['predict', str(tmp_path / 'x.png'), '--checkpoint', str(tmp_path / 'bare.pth'), '--model',
                't2t_vit_7', '--model-kwargs', json.dumps(kwargs), '--json', '--topk', '1'])
    assert code == 0
    top = json.loads(capsys.readouterr().out)['predictions'][0]['top'][0]
    with torch.no_grad():
        index = model.eval()(restore_model(tmp_path / 'bare.pth', 't2t_vit_7', kwargs).transform()(
            load_image(tmp_path / 'x.png')).unsqueeze(0)).argmax().item()
    assert top['index'] == index and top['label'] == imagenet_classes()[index]


@pytest.mark.parametrize('content, what', [
    (b'notes for later\n', 'a text file'), (b'', 'an empty file'), (b'\x89PNG\r\n\x1a\n' + bytes(40), 'a PNG image'),
    (bytes(range(7, 40)), 'in no format torch.save writes (it starts with bytes 07 08 09 0a)')])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(content, what, photo_folder, tmp_path, capsys):
    notes = tmp_path / 'notes.txt'
    notes.write_bytes(content)
    assert cli(['predict', str(photo_folder / 'rgb.jpg'), '--checkpoint', str(notes)]) == 2
    err = capsys.readouterr().err
    assert err == (f'error: {notes} is not a checkpoint: it is {what}; give a file saved with torch.save '
                   '(.pth, .pth.tar) or a .safetensors file\n')


def test_a_truncated_checkpoint_is_an_input_error(tiny_run, photo_folder, tmp_path, capsys):
    from t2tvit.models.checkpoint import CheckpointError, read_checkpoint
    for name, data in (('cut.pth', tiny_run.read_bytes()[:3000]), ('legacy.pth', b'\x80\x02\x8a\x0aq\x01.')):
        (tmp_path / name).write_bytes(data)
        assert cli(['predict', str(photo_folder / 'rgb.jpg'), '--checkpoint', str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f'error: {tmp_path / name}: ') and 'unexpected' not in err, err
        with pytest.raises(CheckpointError):
            read_checkpoint(tmp_path / name)


def test_cuda_without_a_gpu_is_an_input_error(tiny_run, photo_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    argvs = [['predict', str(photo_folder / 'rgb.jpg'), '--checkpoint', str(tiny_run)],
             ['eval', '--checkpoint', str(tiny_run), '--dataset', 'fake', '--output', str(tmp_path / 'eval')],
             ['train', '--dataset', 'fake', '--val-holdout', '0', '--output', str(tmp_path / 'runs')],
             ['ablate', '--dataset', 'fake', '--output', str(tmp_path / 'runs'), '--max-steps', '1']]
    for argv in argvs:
        assert cli(argv + ['--device', 'cuda']) == 2, argv
        assert capsys.readouterr().err == \
            'error: device=cuda asked for, but no CUDA GPU is visible; use --device cpu\n', argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ['photos']


def test_both_formats_torch_save_writes_still_read(tmp_path):
    from t2tvit.models.checkpoint import read_checkpoint
    state = {'state_dict': {'head.weight': torch.arange(6.).view(2, 3)}}
    for zipped in (True, False):
        path = tmp_path / f'zip{zipped}.pth'
        torch.save(state, path, _use_new_zipfile_serialization=zipped)
        assert torch.equal(read_checkpoint(path)['state_dict']['head.weight'], state['state_dict']['head.weight'])
