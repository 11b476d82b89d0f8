"""`t2tvit ablate`: a tiny seeded study on fake data, the size sweep, timm baselines, resuming, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
import timm
import yaml
from PIL import Image

from t2tvit.cli.main import main
from t2tvit.data import DataError
from t2tvit.engine.config import ConfigError
from t2tvit.engine.evaluate import evaluate_checkpoint
from t2tvit.errors import InputError
from t2tvit.models import count_parameters, read_checkpoint
from t2tvit.tools import ablate
from t2tvit.tools.ablate import ABLATION_VARIANTS, DEFAULT_VARIANTS, count_macs, plan_runs, run_ablation
from t2tvit.tools.stats import summarize

VARIANTS = ['t2t_vit_14', 't2t_vit_p_14', 't2t_vit_dense']
TINY_RUN = dict(dataset='fake', max_steps=2, batch_size=16, throughput_batch=4, throughput_seconds=0.05,
                overrides={'fake_num_samples': 64, 'progress': 'off'}, log=lambda message: None)


@pytest.fixture(scope='module')
def tiny_study(tmp_path_factory):
    output = tmp_path_factory.mktemp('runs')
    return run_ablation(VARIANTS, seeds=[0, 1], output=str(output), **TINY_RUN), output


def _results(output):
    return json.loads((output / 'ablate-fake' / 'results.json').read_text())


def test_results_hold_per_variant_statistics_and_costs(tiny_study):
    result, output = tiny_study
    assert result.folder == output / 'ablate-fake' and not result.interrupted
    assert [p.name for p in result.files] == ['results.json', 'results.md', 'results.png', 'results_macs.png']
    record = _results(output)
    assert record['setup']['seeds'] == [0, 1] and record['setup']['train_images'] == ['all']
    rows = record['variants']
    assert [r['variant'] for r in rows] == VARIANTS
    for row in rows:
        model = timm.create_model(row['variant'], img_size=28, in_chans=1, num_classes=10,
                                  **ABLATION_VARIANTS[row['variant']].small_kwargs)
        assert (row['params_total'], row['params_trainable']) == count_parameters(model)
        assert row['macs'] > 1e6 and row['images_per_s'] > 0
        runs = [r for r in record['runs'] if r['variant'] == row['variant']]
        assert [r['seed'] for r in runs] == [0, 1] and all(r['global_step'] == 2 for r in runs)
        assert row['top1'] == [r['top1'] for r in runs]
        expected = summarize(row['top1'])
        assert (row['n'], row['mean'], row['std'], row['ci95']) == \
            (2, expected['mean'], expected['std'], expected['ci95'])
    by_name = {r['variant']: r for r in rows}
    assert by_name['t2t_vit_p_14']['macs'] < by_name['t2t_vit_14']['macs']
    patch = by_name['t2t_vit_p_14']['difference']
    assert patch['baseline'] == 't2t_vit_14' and patch['seeds'] == [0, 1]
    assert patch['differences'] == [a - b for a, b in zip(by_name['t2t_vit_p_14']['top1'],
                                                           by_name['t2t_vit_14']['top1'])]


def test_claims_carry_the_papers_numbers_and_a_computed_verdict(tiny_study):
    _, output = tiny_study
    claims = {c['variant']: c for c in _results(output)['claims']}
    assert set(claims) == {'t2t_vit_p_14', 't2t_vit_dense'}  # the variants of this study that a claim compares
    patch = claims['t2t_vit_p_14']
    assert (patch['paper_baseline_top1'], patch['paper_variant_top1'], patch['paper_difference']) == (81.5, 79.5, -2.0)
    assert patch['n'] == 2 and patch['verdict'] in ('holds', 'does not hold', 'inconclusive')
    low, high = patch['ci95']
    assert patch['ci95_width'] == pytest.approx(high - low)
    expected = 'holds' if high < 0 else 'does not hold' if low > 0 else 'inconclusive'
    assert patch['verdict'] == expected


def test_every_run_has_the_same_recipe_and_step_budget(tiny_study):
    _, output = tiny_study
    configs = {(v, s): yaml.safe_load((output / 'ablate-fake' / v / f'seed{s}-all' / 'config.yaml').read_text())
               for v in VARIANTS for s in (0, 1)}
    shared = {'recipe', 'max_steps', 'batch_size', 'lr', 'sched', 'warmup_epochs', 'img_size', 'in_chans', 'dataset',
              'val_holdout'}
    assert len({tuple(str(c[k]) for k in sorted(shared)) for c in configs.values()}) == 1
    for (variant, seed), config in configs.items():
        assert config['model'] == variant and config['seed'] == seed and config['max_steps'] == 2
        assert config['sched'] == 'cosine' and config['sched_steps'] == 2 and config['val_holdout'] == 0
        assert config['model_kwargs']['embed_dim'] == ABLATION_VARIANTS[variant].small_kwargs['embed_dim']


def test_the_learning_rate_anneals_to_min_lr_at_the_last_step(tiny_study):
    # the budget ends mid-epoch, so an epoch-long cosine would stop above min_lr
    _, output = tiny_study
    run = output / 'ablate-fake' / 't2t_vit_14' / 'seed0-all'
    config = yaml.safe_load((run / 'config.yaml').read_text())
    state = torch.load(run / 'last.pth', map_location='cpu', weights_only=True)
    assert [group['lr'] for group in state['optimizer']['param_groups']] == pytest.approx(
        [config['min_lr']] * len(state['optimizer']['param_groups']))


def test_top1_is_the_final_weights_on_the_validation_split(tiny_study):
    result, output = tiny_study
    run = output / 'ablate-fake' / 't2t_vit_dense' / 'seed1-all'
    expected = evaluate_checkpoint(str(run / 'last.pth'), None, dataset='fake', workers=0)['top1']
    assert {(r.variant, r.seed): r.top1 for r in result.runs}[('t2t_vit_dense', 1)] == expected


def test_markdown_and_figures(tiny_study):
    _, output = tiny_study
    markdown = (output / 'ablate-fake' / 'results.md').read_text()
    table = [line for line in markdown.splitlines() if line.startswith('| `')]
    assert [line.split('`')[1] for line in table[:3]] == VARIANTS
    assert '| the T2T module beats a plain patch tokenizer | `t2t_vit_p_14` | 79.5 - 81.5 = -2.0 |' in markdown
    assert 'FLOPs / 2' in markdown and '95% Student t' in markdown
    for name in ('results.png', 'results_macs.png'):
        with Image.open(output / 'ablate-fake' / name) as image:
            assert image.format == 'PNG' and image.width > 700 and image.height > 100


def test_rerun_trains_nothing_again(tiny_study):
    first, output = tiny_study
    checkpoints = [output / 'ablate-fake' / v / f'seed{s}-all' / 'last.pth' for v in VARIANTS for s in (0, 1)]
    before = [p.stat().st_mtime_ns for p in checkpoints]
    again = run_ablation(VARIANTS, seeds=[0, 1], output=str(output), **TINY_RUN)
    assert [p.stat().st_mtime_ns for p in checkpoints] == before
    assert [(r.variant, r.seed, r.top1) for r in again.runs] == [(r.variant, r.seed, r.top1) for r in first.runs]


def test_an_interrupted_study_resumes_at_the_run_it_stopped_in(tmp_path, monkeypatch, capsys):
    """The third run is stopped after one of its two steps; rerunning keeps the first two runs, finishes the
    third from its checkpoint and trains the fourth."""
    real = ablate._train_run
    calls = []

    def stop_third(config, force=False):
        calls.append((config['model'], config['seed']))
        if len(calls) == 3:
            result = real(dict(config, max_steps=1), force)  # one step, saved to last.pth, then "interrupted"
            return type(result)(**{**result.__dict__, 'status': 'interrupted'})
        return real(config, force)

    monkeypatch.setattr(ablate, '_train_run', stop_third)
    variants = ['t2t_vit_14', 't2t_vit_p_14']
    first = run_ablation(variants, seeds=[0, 1], output=str(tmp_path), **TINY_RUN)
    assert first.interrupted and [(r.variant, r.seed) for r in first.runs] == [('t2t_vit_14', 0), ('t2t_vit_p_14', 0)]
    third = tmp_path / 'ablate-fake' / 't2t_vit_14' / 'seed1-all'
    assert read_checkpoint(third / 'last.pth')['global_step'] == 1
    done = [tmp_path / 'ablate-fake' / v / 'seed0-all' / 'last.pth' for v in variants]
    before = [p.stat().st_mtime_ns for p in done]

    capsys.readouterr()
    calls.clear()
    monkeypatch.setattr(ablate, '_train_run',
                        lambda config, force=False: calls.append(config['run_name']) or real(config, force))
    second = run_ablation(variants, seeds=[0, 1], output=str(tmp_path), **TINY_RUN)
    assert not second.interrupted and calls == ['seed1-all', 'seed1-all']  # only the third and fourth run train
    assert [p.stat().st_mtime_ns for p in done] == before
    assert f'resuming {third} at epoch 1, step 1 (global step 1)' in capsys.readouterr().out
    assert read_checkpoint(third / 'last.pth')['global_step'] == 2
    assert [r.global_step for r in second.runs] == [2, 2, 2, 2]


def test_plan_puts_whole_seeds_first():
    assert plan_runs(['a', 'b'], [0, 1], [100, 'all'], ['a']) == [
        ('a', 0, 'all'), ('b', 0, 'all'), ('a', 0, 100), ('a', 1, 'all'), ('b', 1, 'all'), ('a', 1, 100)]


def test_one_seed_size_sweep_and_a_timm_baseline(tmp_path):
    """One seed: every verdict inconclusive with the reason. A seeded 32-image subset trains beside the whole
    split, and a timm ViT gets its patch size through model_kwargs."""
    result = run_ablation(['t2t_vit_14', 't2t_vit_p_14', 'test_vit'], seeds=[3], train_images=['all', 32],
                          sweep_variants=['t2t_vit_14'], model_kwargs={'test_vit': {'patch_size': 4}},
                          output=str(tmp_path), **TINY_RUN)
    record = _results(tmp_path)
    assert record['setup']['seeds'] == [3] and record['setup']['train_images'] == [32, 'all']
    assert [(r.variant, r.train_images) for r in result.runs] == [
        ('t2t_vit_14', 'all'), ('t2t_vit_p_14', 'all'), ('test_vit', 'all'), ('t2t_vit_14', 32)]
    [claim] = record['claims']
    assert claim['verdict'] == 'inconclusive' and claim['ci95'] is None and claim['n'] == 1
    assert claim['reason'] == '1 paired seed(s): no interval; run two or more seeds'
    subset = yaml.safe_load((tmp_path / 'ablate-fake' / 't2t_vit_14' / 'seed3-32' / 'config.yaml').read_text())
    assert subset['val_holdout'] == 64 - 32 and subset['max_steps'] == 2
    assert [(r['variant'], r['train_images'], r['n']) for r in record['size_sweep']] == [
        ('t2t_vit_14', 32, 1), ('t2t_vit_14', 'all', 1)]
    vit = next(r for r in record['variants'] if r['variant'] == 'test_vit')
    model = timm.create_model('test_vit', img_size=28, in_chans=1, num_classes=10, patch_size=4)
    assert vit['params_total'] == count_parameters(model)[0] and vit['model_kwargs'] == {'patch_size': 4}
    assert vit['idea'] == 'timm model' and vit['n'] == 1 and vit['ci95'] is None
    assert (tmp_path / 'ablate-fake' / 'results_sizes.png').is_file()


def test_macs_follow_the_papers_convention():
    """FLOPs / 2 with attention counted: T2T-ViT-14 is 4.8 G in the paper, T2T-ViT_t-14 6.1 G (Table 7)."""
    model = timm.create_model('t2t_vit_14')
    assert count_macs(model, (3, 224, 224)) / 1e9 == pytest.approx(4.8, rel=0.02)
    transformer_tokens = timm.create_model('t2t_vit_t_14')
    assert count_macs(transformer_tokens, (3, 224, 224)) / 1e9 == pytest.approx(6.1, rel=0.02)


@pytest.mark.parametrize('kwargs,message', [
    (dict(variants=['t2t_vit_14', 't2t_vit_99']),
     r"unknown variant\(s\) t2t_vit_99; .*t2t_vit_16_ghost.*every timm model name"),
    (dict(variants=['t2t_vit_14'], train_images=[65]),
     'more than the 64 training images of the data set; give sizes up to 64, or all'),
    (dict(variants=['t2t_vit_14'], train_images=[8]), 'fewer than one batch'),
    (dict(variants=['t2t_vit_14'], train_images=['most']), 'give whole numbers of training images or all'),
    (dict(variants=['test_convnext']),
     r'test_convnext cannot take 1x28x28 input \(.*\); give it builder arguments that fit, e\.g\. --model-kwargs'),
    (dict(variants=['test_vit']), r'test_vit cannot take 1x28x28 input .*patch_size: 4'),
    (dict(variants=['t2t_vit_14'], model_kwargs={'resnet18': {}}), 'names resnet18, which is not among --variants'),
    (dict(variants=['t2t_vit_14'], seeds=[]), 'give at least one seed'),
    (dict(variants=['t2t_vit_14'], sweep_variants=['t2t_vit_p_14']), 'names t2t_vit_p_14, which is not among'),
])
def test_bad_input_stops_before_any_training(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message) as raised:
        run_ablation(output=str(tmp_path), **{**TINY_RUN, **kwargs})
    assert isinstance(raised.value, InputError)
    assert not (tmp_path / 'ablate-fake').exists()


def test_missing_data_stops_before_any_training(tmp_path):
    with pytest.raises(DataError, match='not found in .*missing.*make data'):
        run_ablation(['t2t_vit_14'], dataset='fashion_mnist', data=str(tmp_path / 'missing'), output=str(tmp_path))
    with pytest.raises(ConfigError, match='--dataset cifar10 needs its folder: pass --data DIR'):
        run_ablation(['t2t_vit_14'], dataset='cifar10', output=str(tmp_path))
    assert not any(tmp_path.glob('ablate-*/*'))


def test_keys_the_ablation_sets_itself_are_refused(tmp_path):
    for key, value in (('model', 't2t_vit_7'), ('seed', 3), ('val_holdout', 10)):
        with pytest.raises(ConfigError, match=f'sets {key} itself'):
            run_ablation(['t2t_vit_14'], output=str(tmp_path), **dict(TINY_RUN, overrides={key: value}))


def test_cli_help_documents_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['ablate', '--help'])
    assert exit_info.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    assert '(default: fashion_mnist)' in text and '(default: 400)' in text and '(default: 0,1,2)' in text
    assert 'data/fashion-mnist' in text and 'any timm model name' in text
    assert all(name in text for name in DEFAULT_VARIANTS) and 't2t_vit_t_14' in text


@pytest.mark.parametrize('argv,message', [
    (['--variants', 't2t_vit_14,nope'], 'unknown variant(s) nope'),
    (['--seed', '1', '--seeds', '0,1'], 'give --seed N (one seed) or --seeds S,T,... , not both'),
    (['--variants', 'test_convnext'], 'test_convnext cannot take 1x28x28 input'),
    (['--train-images', '100000'], '--train-images 100000 is more than the 256 training images'),
    (['--model-kwargs', 'test_vit=[1, 2]'], '--model-kwargs \'test_vit=[1, 2]\': give NAME="{key: value, ...}"'),
    (['--model-kwargs', 'test_vit={patch_size: 4'], 'is not valid YAML'),
])
def test_cli_refuses_bad_input_in_one_line(capsys, tmp_path, argv, message):
    assert main(['ablate', '--dataset', 'fake', '--output', str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count('\n') == 0 and err.startswith('error: ')
    assert not (tmp_path / 'ablate-fake').exists()


def test_cli_runs_a_tiny_one_seed_study(capsys, tmp_path):
    code = main(['ablate', '--variants', 't2t_vit_16_ghost,test_vit', '--model-kwargs', 'test_vit={patch_size: 7}',
                 '--dataset', 'fake', '--max-steps', '1', '--seed', '5', '--batch-size', '8',
                 '--throughput-batch', '2', '--throughput-seconds', '0.01', '--set', 'fake_num_samples=16',
                 '--set', 'progress=off', '--output', str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert '| `t2t_vit_16_ghost` | Ghost cheap operations | 1 |' in out and 'results_macs.png' in out
    assert '| `test_vit` | timm model | 1 |' in out
    assert read_checkpoint(tmp_path / 'ablate-fake' / 't2t_vit_16_ghost' / 'seed5-all' / 'last.pth')['global_step'] == 1
    record = _results(tmp_path)
    assert record['setup']['command'].startswith('t2tvit ') and record['setup']['seeds'] == [5]
    assert record['setup']['model_kwargs']['test_vit'] == {'patch_size': 7}


def test_a_cnn_without_an_img_size_argument_builds_for_the_data_set():
    """resnet18's builder has no img_size: the training engine builds it without one, at 1 channel, 10 classes."""
    from t2tvit.tools.ablate_build import build_variant, check_variant_input
    check_variant_input('resnet18', {}, 28, 1, 10)
    model = build_variant('resnet18', {}, 28, 1, 10)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10


def test_size_sweep_pairs_each_size_with_the_baseline_at_that_size():
    """The data-size question is how the gap to T2T moves with the data: per size, the paired difference against the
    baseline's runs of the same size and seed."""
    from t2tvit.tools.ablate import RunRecord
    from t2tvit.tools.ablate_report import build_record, sweep_table
    top1 = {('t2t_vit_14', 100): [70.0, 71.0, 72.0], ('t2t_vit_14', 'all'): [80.0, 81.0, 82.0],
            ('t2t_vit_p_14', 100): [71.0, 72.5, 73.0], ('t2t_vit_p_14', 'all'): [78.0, 79.5, 79.0]}
    runs = [RunRecord(variant, seed, size, value, 'budget', 10, 'x')
            for (variant, size), values in top1.items() for seed, value in enumerate(values)]
    setup = dict(train_images=[100, 'all'], baseline='t2t_vit_14',
                 model_kwargs={'t2t_vit_14': {}, 't2t_vit_p_14': {}})
    record = build_record(setup, runs, {}, ['t2t_vit_14', 't2t_vit_p_14'])
    rows = {(r['variant'], r['train_images']): r for r in record['size_sweep']}
    small, full = rows[('t2t_vit_p_14', 100)]['difference'], rows[('t2t_vit_p_14', 'all')]['difference']
    assert small['differences'] == [1.0, 1.5, 1.0] and full['differences'] == [-2.0, -1.5, -3.0]
    assert small['ci95'][0] > 0 and full['ci95'][1] < 0
    assert small['mean'] == summarize([1.0, 1.5, 1.0])['mean']
    assert rows[('t2t_vit_14', 'all')]['difference']['differences'] == [0.0, 0.0, 0.0]
    table = sweep_table(record).splitlines()
    assert table[2].endswith('| - | - |') and table[3].endswith('| - | - |')
    assert '| +1.17 | [' in table[4] and '| -2.17 | [' in table[5]


def test_a_far_off_model_does_not_flatten_the_others_on_the_figure():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from t2tvit.tools.ablate_plots import _fit_axis
    fig, ax = plt.subplots()
    _fit_axis(ax, [85.8, 84.5, 62.8], [[84.9, 86.6], [84.2, 84.7], [59.2, 66.4]])
    low, high = ax.get_xlim()
    assert 80 < low < 84.2 and 86.6 < high < 90  # fitted to the two near models' intervals
    assert [t.get_text() for t in ax.texts] == ['62.8 (off axis)']
    fig2, ax2 = plt.subplots()
    _fit_axis(ax2, [85.8, 84.5], [[84.9, 86.6], [84.2, 84.7]])
    assert not ax2.texts  # nothing far off: matplotlib's own limits
    plt.close(fig)
    plt.close(fig2)
