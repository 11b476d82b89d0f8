"""What a run leaves behind for people: metrics as JSON lines, loss/accuracy/LR curves and a confusion matrix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .checkpointing import CheckpointSaveError, atomic_write


class MetricsLog:
    """Append-only JSON-lines file; on resume it drops what came after the checkpoint, so replayed steps are not
    logged twice."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:  # a full disk or a folder made read-only during the run
            raise CheckpointSaveError(e.errno, f'could not append to {self.path}: {e.strerror or e}; free disk '
                                      'space, then rerun the same command to resume') from e

    def truncate_after(self, global_step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get('global_step', 0) <= global_step]
        text = ''.join(line + '\n' for line in kept)
        atomic_write(self.path, lambda f: f.write(text.encode()), 'metrics log')


def write_eval_json(path: Path, result: Dict[str, Any], classes: Sequence[str]) -> None:
    """An evaluation as JSON: the scalars, per-class top-1 by class name, and the confusion matrix as lists."""
    payload = {k: v for k, v in result.items() if k not in ('confusion', 'per_class_top1')}
    payload['per_class_top1'] = dict(zip(classes, result['per_class_top1']))
    payload['confusion'] = result['confusion'].tolist()
    text = json.dumps(payload, indent=1)
    atomic_write(Path(path), lambda f: f.write(text.encode()), 'evaluation')


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_png: Path, title: str = '') -> Optional[Path]:
    """Training loss, learning rate and evaluation accuracy against the optimizer step, in one PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get('type') == 'train']
    evals = [r for r in records if r.get('type') == 'eval']
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        steps = [r['global_step'] for r in train]
        axes[0].plot(steps, [r['loss'] for r in train], label='train loss')
        axes[2].plot(steps, [r['lr'] for r in train], color='tab:green')
    if evals:
        steps = [r['global_step'] for r in evals]
        axes[0].plot(steps, [r['loss'] for r in evals], marker='o', label='eval loss')
        axes[1].plot(steps, [r['top1'] for r in evals], marker='o', label='top-1')
        axes[1].plot(steps, [r['top5'] for r in evals], marker='o', label='top-5')
        if any('ema_top1' in r for r in evals):
            axes[1].plot(steps, [r.get('ema_top1') for r in evals], marker='s', label='EMA top-1')
    axes[0].set(title='loss', xlabel='optimizer step')
    held_out = any(r.get('split') == 'held-out' for r in evals)
    axes[1].set(title='held-out accuracy (%)' if held_out else 'accuracy (%)', xlabel='optimizer step')
    axes[2].set(title='learning rate', xlabel='optimizer step')
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save_figure(fig, out_png, 'training curves')
    return Path(out_png)


def _save_figure(fig, out_png: Path, what: str) -> None:
    """PNG through `atomic_write`: a full disk gives a named error and leaves no half-written picture."""
    import matplotlib.pyplot as plt
    try:
        fig.tight_layout()
        atomic_write(Path(out_png), lambda f: fig.savefig(f, format='png', dpi=100), what)
    finally:
        plt.close(fig)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], out_png: Path, title: str = '') -> Path:
    """Row-normalised confusion matrix (true class per row); counts written in the cells when they fit."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    confusion = confusion.to(torch.float64)
    rates = confusion / confusion.sum(dim=1, keepdim=True).clamp_min(1)
    k = len(classes)
    size = min(4 + 0.6 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rates.numpy(), cmap='Blues', vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label='fraction of the true class')
    if k <= 30:
        ax.set_xticks(range(k), labels=list(classes), rotation=45, ha='right')
        ax.set_yticks(range(k), labels=list(classes))
        for i in range(k):
            for j in range(k):
                count = int(confusion[i, j])
                if count:
                    ax.text(j, i, str(count), ha='center', va='center', fontsize=8,
                            color='white' if rates[i, j] > 0.5 else 'black')
    ax.set(xlabel='predicted', ylabel='true', title=title or 'confusion matrix')
    _save_figure(fig, out_png, 'confusion matrix')
    return Path(out_png)
