"""Training, evaluation and fine-tuning: config, loop, checkpoints, distributed set-up, metrics."""
from .config import DEFAULTS, ConfigError, load_recipe, resolve_config
from .evaluate import evaluate
from .train import RunResult, TrainingDiverged, train

__all__ = ['DEFAULTS', 'ConfigError', 'load_recipe', 'resolve_config', 'RunResult', 'TrainingDiverged', 'evaluate',
           'train']
