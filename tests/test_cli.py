"""The `t2tvit` command line as a user runs it."""
from __future__ import annotations

import subprocess
import sys

from t2tvit.cli.main import main


def test_info_prints_every_variant_with_paper_numbers(capsys):
    assert main(['info']) == 0
    out = capsys.readouterr().out
    assert 't2t_vit_14.in1k ' in out and '21,545,550' in out and '21.5' in out
    assert 't2t_vit_t_24.in1k_384' in out


def test_info_checks_official_fixtures(fixtures_dir, capsys):
    assert main(['info', '--no-tags', '--fixtures', str(fixtures_dir / 'official')]) == 0
    out = capsys.readouterr().out
    assert out.count('  yes') == 14 and '  NO' not in out  # 7 fixtures, each as .pth.tar and _ddp_raw.pth


def test_info_fails_when_outputs_differ(fixtures_dir, capsys):
    assert main(['info', '--no-tags', '--fixtures', str(fixtures_dir / 'official'), '--tolerance', '1e-12']) == 1
    assert 'differ from the official ones' in capsys.readouterr().err


def test_info_names_a_wrong_fixtures_folder(tmp_path, capsys):
    assert main(['info', '--fixtures', str(tmp_path)]) == 2
    assert 'tiny_configs.json' in capsys.readouterr().err


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, '-m', 't2tvit', '--help'], capture_output=True, text=True, check=True)
    assert 'info' in result.stdout
