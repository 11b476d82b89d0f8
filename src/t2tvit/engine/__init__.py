"""Training, evaluation and fine-tuning: config, loop, checkpoints, distributed set-up, metrics.

`t2tvit.engine.evaluate` is the evaluation module (`evaluate`, `evaluate_checkpoint`); the package does not bind
the name to the function, so that `import t2tvit.engine.evaluate` always gives the module.
"""
from .config import DEFAULTS, ConfigError, load_recipe, resolve_config
from .evaluate import evaluate_checkpoint
from .train import RunResult, TrainingDiverged, train

__all__ = ['DEFAULTS', 'ConfigError', 'load_recipe', 'resolve_config', 'RunResult', 'TrainingDiverged',
           'evaluate_checkpoint', 'train']
