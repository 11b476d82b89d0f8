"""`t2tvit ablate`: a tiny design study on fake data, the MAC convention against the paper, and bad input."""
from __future__ import annotations

import json

import pytest
import timm
import yaml
from PIL import Image

from t2tvit.cli.main import main
from t2tvit.data import DataError
from t2tvit.engine.config import ConfigError
from t2tvit.engine.evaluate import evaluate_checkpoint
from t2tvit.models import count_parameters, read_checkpoint
from t2tvit.tools.ablate import ABLATION_VARIANTS, DEFAULT_VARIANTS, count_macs, run_ablation

VARIANTS = ['t2t_vit_14', 't2t_vit_p_14', 't2t_vit_dense']
TINY_RUN = dict(dataset='fake', max_steps=2, batch_size=16, throughput_batch=4, throughput_seconds=0.05,
                overrides={'fake_num_samples': 64, 'progress': 'off'}, log=lambda message: None)


@pytest.fixture(scope='module')
def tiny_ablation(tmp_path_factory):
    output = tmp_path_factory.mktemp('runs')
    return run_ablation(VARIANTS, output=str(output), **TINY_RUN), output


def test_tables_hold_one_sane_row_per_variant(tiny_ablation):
    result, output = tiny_ablation
    folder = output / 'ablate-fake'
    assert result.folder == folder and not result.interrupted
    assert [p.name for p in result.files] == ['results.json', 'results.md', 'results.png']
    rows = json.loads((folder / 'results.json').read_text())['results']
    assert [r['variant'] for r in rows] == VARIANTS
    for row in rows:
        model = timm.create_model(row['variant'], img_size=28, in_chans=1, num_classes=10,
                                  **ABLATION_VARIANTS[row['variant']].small_kwargs)
        assert (row['params_total'], row['params_trainable']) == count_parameters(model)
        assert row['macs'] > 1e6 and row['images_per_s'] > 0
        assert 0 <= row['top1'] <= 100
        assert row['status'] == 'budget' and row['global_step'] == 2
        assert row['paper']['top1'] > 75  # the paper's ImageNet number for this idea
    by_name = {r['variant']: r for r in rows}
    # the T2T module costs more than a patch embedding on the same backbone
    assert by_name['t2t_vit_p_14']['macs'] < by_name['t2t_vit_14']['macs']
    assert by_name['t2t_vit_14']['paper']['model'] == 'T2T-ViT-14' and by_name['t2t_vit_14']['paper']['top1'] == 81.5


def test_every_variant_trained_with_the_same_recipe_seed_and_budget(tiny_ablation):
    _, output = tiny_ablation
    configs = {v: yaml.safe_load((output / 'ablate-fake' / v / 'config.yaml').read_text()) for v in VARIANTS}
    shared = {'recipe', 'seed', 'max_steps', 'batch_size', 'lr', 'epochs', 'img_size', 'in_chans', 'dataset'}
    assert len({tuple(str(c[k]) for k in sorted(shared)) for c in configs.values()}) == 1
    for variant, config in configs.items():
        assert config['model'] == variant and config['max_steps'] == 2
        assert config['model_kwargs']['embed_dim'] == ABLATION_VARIANTS[variant].small_kwargs['embed_dim']


def test_top1_is_the_final_weights_on_the_validation_split(tiny_ablation):
    result, output = tiny_ablation
    run = output / 'ablate-fake' / 't2t_vit_dense'
    expected = evaluate_checkpoint(str(run / 'last.pth'), None, dataset='fake', workers=0)['top1']
    assert {r.variant: r.top1 for r in result.results}['t2t_vit_dense'] == expected


def test_markdown_and_chart(tiny_ablation):
    result, output = tiny_ablation
    markdown = (output / 'ablate-fake' / 'results.md').read_text()
    table = [line for line in markdown.splitlines() if line.startswith('| `')]
    assert [line.split('`')[1] for line in table] == VARIANTS
    assert '| T2T-ViT-Dense | 80.6 | 23.7 | 5.5 |' in table[2]
    assert 'FLOPs / 2' in markdown
    with Image.open(output / 'ablate-fake' / 'results.png') as image:
        assert image.format == 'PNG' and image.width > 1000 and image.height > 100


def test_rerun_resumes_instead_of_training_again(tiny_ablation):
    first, output = tiny_ablation
    checkpoints = [output / 'ablate-fake' / v / 'last.pth' for v in VARIANTS]
    before = [p.stat().st_mtime_ns for p in checkpoints]
    again = run_ablation(VARIANTS, output=str(output), **TINY_RUN)
    assert [p.stat().st_mtime_ns for p in checkpoints] == before  # nothing trained or saved again
    assert [(r.variant, r.top1, r.global_step) for r in again.results] == \
        [(r.variant, r.top1, r.global_step) for r in first.results]


def test_macs_follow_the_papers_convention():
    """FLOPs / 2 with attention counted: T2T-ViT-14 is 4.8 G in the paper, T2T-ViT_t-14 6.1 G (Table 7)."""
    model = timm.create_model('t2t_vit_14')
    assert count_macs(model, (3, 224, 224)) / 1e9 == pytest.approx(4.8, rel=0.02)
    assert all(m.fused_attn == timm.layers.use_fused_attn() for m in model.modules() if hasattr(m, 'fused_attn'))
    transformer_tokens = timm.create_model('t2t_vit_t_14')
    # the token transformer's 3136x3136 attention is what makes it dearer
    assert count_macs(transformer_tokens, (3, 224, 224)) / 1e9 == pytest.approx(6.1, rel=0.02)


def test_unknown_variant_is_named_with_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown variant\\(s\\) t2t_vit_99.*t2t_vit_16_ghost.*--variants"):
        run_ablation(['t2t_vit_14', 't2t_vit_99'], output=str(tmp_path), **TINY_RUN)
    assert not (tmp_path / 'ablate-fake').exists()


def test_missing_data_stops_before_any_training(tmp_path):
    with pytest.raises(DataError, match='not found in .*missing.*make data'):
        run_ablation(['t2t_vit_14'], dataset='fashion_mnist', data=str(tmp_path / 'missing'), output=str(tmp_path))
    with pytest.raises(ConfigError, match='--dataset cifar10 needs its folder: pass --data DIR'):
        run_ablation(['t2t_vit_14'], dataset='cifar10', output=str(tmp_path))
    assert not any(tmp_path.glob('ablate-*/*'))


def test_keys_the_ablation_sets_itself_are_refused(tmp_path):
    with pytest.raises(ConfigError, match='sets model itself'):
        run_ablation(['t2t_vit_14'], output=str(tmp_path), **dict(TINY_RUN, overrides={'model': 't2t_vit_7'}))


def test_cli_help_documents_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['ablate', '--help'])
    assert exit_info.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    assert '(default: fashion_mnist)' in text and '(default: 1)' in text and 'data/fashion-mnist' in text
    assert all(name in text for name in DEFAULT_VARIANTS) and 't2t_vit_t_14' in text


def test_cli_names_an_unknown_variant(capsys, tmp_path):
    assert main(['ablate', '--variants', 't2t_vit_14,nope', '--dataset', 'fake', '--output', str(tmp_path)]) == 2
    assert 'unknown name(s) nope' in capsys.readouterr().err


def test_cli_runs_a_tiny_ablation(capsys, tmp_path):
    code = main(['ablate', '--variants', 't2t_vit_16_ghost', '--dataset', 'fake', '--max-steps', '1',
                 '--batch-size', '8', '--throughput-batch', '2', '--throughput-seconds', '0.01',
                 '--set', 'fake_num_samples=16', '--set', 'progress=off', '--output', str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert '| `t2t_vit_16_ghost` | Ghost cheap operations |' in out and 'results.png' in out
    assert read_checkpoint(tmp_path / 'ablate-fake' / 't2t_vit_16_ghost' / 'last.pth')['global_step'] == 1
