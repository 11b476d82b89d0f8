"""README.md and docs/ stay true: links resolve, tables are the committed benchmark files' (or the code's) own
figures, and the marked examples still print what the documents show (`tests/docs_check.py` does the work)."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

import docs_check
from docs_check import REPO, broken_links, examples, line_matches, markdown_files, output_matches, run_example
from test_data import make_idx_folder

DEMO_RUN = Path(os.environ.get('T2TVIT_DEMO_RUN', REPO / docs_check.DEMO_RUN))
DATA = Path(os.environ.get('T2TVIT_DATA', REPO / 'data' / 'fashion-mnist'))


def _examples(*kinds):
    return [pytest.param(e, id=f'{e.path.name}:{e.line}') for p in markdown_files() for e in examples(p)
            if e.kind in kinds]


@pytest.fixture(scope='module')
def scratch():
    return docs_check.scratch_folder(None, None)


def test_readme_is_a_front_door():
    readme = (REPO / 'README.md').read_text()
    assert len(readme.splitlines()) <= 300
    for page in ('models', 'training', 'speed', 'export', 'visualization'):
        assert f'(docs/{page}.md' in readme, page  # every guide page is linked from the README
    assert 'make demo' in readme and 'make test' in readme


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_anchors_resolve(path):
    assert broken_links(path) == []


def test_link_checker_finds_a_missing_file_and_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_check, 'REPO', tmp_path)
    (tmp_path / 'other.md').write_text('# A heading, with `code`\n\n## Twice\n## Twice\n')
    doc = tmp_path / 'doc.md'
    doc.write_text('[ok](other.md#a-heading-with-code) [ok](other.md#twice-1) [bad](missing.md) '
                   '[bad](other.md#nowhere) `[not a link](nowhere.md)` [web](https://example.org/x)\n')
    assert broken_links(doc) == ['doc.md: missing.md (no such file)', 'doc.md: other.md#nowhere (no heading makes #nowhere)']


def test_output_comparison_allows_only_the_stated_tolerance():
    assert line_matches('  99.74%  Ankle boot', '  99.70%  Ankle boot', rtol=0.001, atol=0)
    assert not line_matches('  99.74%  Ankle boot', '  98.00%  Ankle boot', rtol=0.001, atol=0)
    assert not line_matches('  99.74%  Ankle boot', '  99.74%  Sneaker', rtol=1, atol=1)
    assert line_matches('wrote 1,234 files', 'wrote 1,235 files', rtol=0, atol=1)
    assert output_matches(['a', '...', 'z'], ['a', 'b', 'c', 'z'], 0, 0)
    assert not output_matches(['a', '...', 'z'], ['a', 'b', 'c'], 0, 0)
    assert not output_matches(['a'], ['a', 'extra line'], 0, 0)


def test_form_only_comparison_allows_other_numbers_classes_and_column_widths():
    labels = ('T-shirt/top', 'Shirt', 'Sneaker')
    assert line_matches('    8.17%  T-shirt/top', '   24.70%  Shirt', 0, 0, labels)
    assert line_matches('  100.00%  Sneaker', '    0.00%  Shirt', 0, 0, labels)
    assert not line_matches('    8.17%  T-shirt/top', '   24.70%  Dress', 0, 0, labels)  # not a class of the model
    assert not line_matches('    8.17%  Shirt', '   24.70%', 0, 0, labels)
    assert not line_matches('samples/test0.png', 'samples/test0.jpg', 0, 0, labels)


@pytest.mark.parametrize('name', list(docs_check.TABLES))
def test_tables_are_the_committed_figures(name):
    doc, make, source = docs_check.TABLES[name]
    table = make(docs_check.load_benchmark(source) if source else None)
    assert table in (REPO / doc).read_text(), f'{doc}: regenerate with `python tests/docs_check.py --table {name}`'


@pytest.mark.parametrize('example', _examples('fast', 'python'))
def test_fast_examples_print_what_the_documents_show(example, scratch):
    assert run_example(example, scratch) == []


def test_a_changed_figure_is_caught(scratch, tmp_path):
    doc = tmp_path / 'doc.md'
    doc.write_text('<!-- check: fast rtol=0.01 -->\n```console\n$ python -c "print(0.5)"\n0.502\n```\n'
                   '<!-- check: fast rtol=0.01 -->\n```console\n$ python -c "print(0.5)"\n0.6\n```\n')
    assert [len(run_example(e, scratch)) for e in examples(doc)] == [0, 1]


def test_make_samples_writes_the_files_the_examples_read(tmp_path):
    make_idx_folder(tmp_path / 'data', n_train=5, n_val=6)
    sys.path.insert(0, str(REPO / 'examples'))
    try:
        import make_samples
    finally:
        sys.path.pop(0)
    written = make_samples.write_samples(tmp_path / 'data', tmp_path / 'samples')
    names = sorted(p.name for p in written)
    assert names == ['notes.jpg', 'palette.gif', 'stretched_rgba.png', 'test0.png', 'test1.png', 'test2.png']
    assert Image.open(tmp_path / 'samples' / 'test0.png').size == (28, 28)
    assert Image.open(tmp_path / 'samples' / 'stretched_rgba.png').mode == 'RGBA'
    with pytest.raises(Exception):
        Image.open(tmp_path / 'samples' / 'notes.jpg')


@pytest.mark.slow
@pytest.mark.parametrize('example', _examples('demo'))
def test_demo_examples_print_what_the_documents_show(example, tmp_path_factory):
    """`make docs-check`: needs `make demo`'s run folder (or T2TVIT_DEMO_RUN) and Fashion-MNIST (or T2TVIT_DATA)."""
    if not (DEMO_RUN / 'best.pth').is_file() or not DATA.is_dir():
        pytest.skip(f'run `make demo` first: no {DEMO_RUN}/best.pth or no {DATA}')
    work, demo = _demo_scratch()
    assert run_example(example, work, demo=demo) == []
    why_form = docs_check.form_only(example, demo)
    if why_form:
        warnings.warn(f'{example.where}: {why_form}')


_DEMO_SCRATCH = []


def _demo_scratch():
    # one folder for all demo examples: the ONNX example reads what the export example wrote
    if not _DEMO_SCRATCH:
        _DEMO_SCRATCH.append((docs_check.scratch_folder(DEMO_RUN, DATA), docs_check.demo_model(DEMO_RUN)))
    return _DEMO_SCRATCH[0]


def test_another_demo_model_is_checked_for_form_only(tmp_path):
    """A demo example shown with one model and run with another: the same lines, any numbers and class names."""
    classes = ('T-shirt/top', 'Shirt', 'Pullover', 'Ankle boot')
    assert line_matches('   97.31%  Pullover', '   61.02%  T-shirt/top', 0, 0, classes)
    assert line_matches('test0: Ankle boot 100.0%, Shirt 0.0%', 'test0: Shirt 88.1%, Ankle boot 11.9%', 0, 0, classes)
    assert not line_matches('   97.31%  Pullover', '   97.31%  Trouser', 0, 0, classes)  # not a class of the model
    assert not line_matches('   97.31%  Pullover', 'Pullover', 0, 0, classes)  # the number is gone
    assert not output_matches(['0.97  Pullover', '0.02  Shirt'], ['0.97  Pullover'], 0, 0, classes)
    step = ('python -c "print(\'0.61  Shirt\')"', ['0.97  Pullover'])
    shown_with = docs_check.Example(tmp_path / 'doc.md', 3, 'demo', model='aaaaaaaaaaaa', steps=[step])
    assert run_example(shown_with, tmp_path, demo=docs_check.DemoModel('bbbbbbbbbbbb', classes)) == []
    same_model = run_example(shown_with, tmp_path, demo=docs_check.DemoModel('aaaaaaaaaaaa', classes))
    assert len(same_model) == 1 and '0.61  Shirt' in same_model[0]  # the model shown: number by number


def test_demo_model_id_names_the_weights(tmp_path):
    import torch

    weights = {'head.weight': torch.arange(6.).view(2, 3), 'head.bias': torch.zeros(2, dtype=torch.bfloat16)}
    ids = []
    for i, change in enumerate([None, None, ('head.weight', 1e-3), ('head.bias', 1.)]):
        state = {k: v.clone() for k, v in weights.items()}
        if change:
            state[change[0]].view(-1)[0] += change[1]
        run = tmp_path / str(i)
        run.mkdir()
        torch.save({'state_dict': state, 'epoch': i, 'classes': ['a', 'b']}, run / 'best.pth')
        model = docs_check.demo_model(run)
        assert model.classes == ('a', 'b') and len(model.id) == 12
        ids.append(model.id)
    assert ids[0] == ids[1] and len(set(ids)) == 3  # the epoch is no part of it; each weight change is


def test_models_page_variant_table_is_the_codes():
    """docs/models.md's variant table against `t2tvit info`: depth, heads and both parameter counts."""
    from t2tvit.tools.info import variant_rows

    info = {}
    for row in variant_rows():
        name, _, tag = row.name.partition('.')
        if tag in ('', 'in1k', 'fmnist'):
            info[name] = row
    text = (REPO / 'docs' / 'models.md').read_text().split('<!-- table: variants -->', 1)[1]
    rows = [line for line in text.splitlines()[3:] if line.startswith('| `')]
    assert len(rows) == len(info)
    for line in rows:
        cells = [c.strip() for c in line.strip('|').split('|')]
        row = info[cells[0].strip('`')]
        assert (int(cells[3]), int(cells[4])) == (row.depth, row.num_heads), cells[0]
        assert cells[5] == f'{row.params_total:,} / {row.params_trainable:,}', cells[0]


def test_design_study_small_builds_table_is_the_codes():
    """docs/ablation.md's small-scale builds: params and MACs at 28 px, 1 channel, 10 classes, from the builders."""
    import timm
    import torch

    from t2tvit.models.utils import count_parameters
    from t2tvit.tools.ablate import ABLATION_VARIANTS, count_macs

    text = (REPO / 'docs' / 'ablation.md').read_text().split('## Small scale', 1)[1].split('## Results', 1)[0]
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in text.splitlines() if line.startswith('| `')]
    assert {r[0].strip('`') for r in rows} == set(ABLATION_VARIANTS)
    for cells in rows:
        name = cells[0].strip('`')
        with torch.device('meta'):
            model = timm.create_model(name, img_size=28, in_chans=1, num_classes=10,
                                      **ABLATION_VARIANTS[name].small_kwargs)
        total, _ = count_parameters(model)
        assert (f'{total / 1e6:.3f}', f'{count_macs(model, (1, 28, 28)) / 1e6:.1f}') == (cells[3], cells[4]), name


def test_design_study_record_is_complete_and_its_verdicts_are_computed():
    """The committed study behind docs/ablation.md: its budget, host, date and command are recorded, and every
    verdict is what `stats.verdict` gives for the recorded interval (none typed by hand)."""
    from t2tvit.tools.paper import CLAIMS
    from t2tvit.tools.stats import summarize, verdict

    record = docs_check.load_benchmark(docs_check.STUDY)
    setup = record['setup']
    assert setup['host'] and setup['date'] and setup['command'].startswith('t2tvit ablate')
    assert len(setup['seeds']) >= 3 and len(setup['train_images']) >= 3 and setup['max_steps'] >= 1
    assert {c['variant'] for c in record['claims']} == {c.variant for c in CLAIMS}
    for claim in record['claims']:
        assert verdict(claim['paper_difference'], claim['ci95'], claim['n']) == \
            {'verdict': claim['verdict'], 'reason': claim['reason']}, claim['claim']
    for row in record['variants']:
        assert summarize(row['top1'])['ci95'] == row['ci95'], row['variant']


def test_writing_a_demo_example_names_the_model_that_printed_it(tmp_path):
    doc = tmp_path / 'doc.md'
    doc.write_text('Text.\n\n<!-- check: demo model=aaaaaaaaaaaa rtol=0.02 atol=0.05 -->\n```console\n'
                   '$ t2tvit predict x.png\n   97.31%  Pullover\n```\nAfter.\n')
    example, = docs_check.examples(doc)
    assert (example.model, example.rtol, example.atol) == ('aaaaaaaaaaaa', 0.02, 0.05)
    docs_check.rewrite(example, [['   61.02%  Shirt']], model='0123456789ab')
    assert doc.read_text() == ('Text.\n\n<!-- check: demo model=0123456789ab rtol=0.02 atol=0.05 -->\n```console\n'
                               '$ t2tvit predict x.png\n   61.02%  Shirt\n```\nAfter.\n')
    assert docs_check.examples(doc)[0].model == '0123456789ab'
