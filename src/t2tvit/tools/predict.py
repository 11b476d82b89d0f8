"""`t2tvit predict`: top-k labels for image files and folders, through the model's own eval transform."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import UnidentifiedImageError
from tqdm import tqdm

from ..data.images import UNREADABLE_IMAGE_ERRORS, find_images, load_image
from ..cpu_kernels import for_device
from ..engine.preflight import check_finite
from ..engine.restore import RestoredModel

__all__ = ['Prediction', 'PredictResult', 'predict_images']

PathLike = Union[str, 'os.PathLike[str]']


@dataclass
class Prediction:
    image: str
    top: List[Tuple[int, str, float]]  # (class index, class name, probability), most likely first

    def as_dict(self) -> Dict:
        return {'image': self.image,
                'top': [{'index': i, 'label': name, 'probability': p} for i, name, p in self.top]}


@dataclass
class PredictResult:
    predictions: List[Prediction] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (file, why it could not be read)


def _read(path: str, mode: str, transform: Callable):
    try:
        return transform(load_image(path, mode)), None
    except UnidentifiedImageError:
        return None, 'not an image format PIL can read'
    except UNREADABLE_IMAGE_ERRORS as e:
        return None, f'{type(e).__name__}: {e}'


@torch.inference_mode()
def predict_images(
        restored: RestoredModel,
        inputs: Sequence[PathLike],
        topk: int = 5,
        batch_size: int = 32,
        device: Union[str, torch.device] = 'cpu',
        progress: Optional[bool] = None,
) -> PredictResult:
    """Class probabilities for every image in `inputs` (files, or folders searched recursively), in batches.

    Unreadable files are skipped and listed in `failed` with the reason; a path that does not exist, or a folder
    without images, raises `DataError` before any work. `progress=None` shows a bar only on a terminal.
    """
    if topk < 1:
        raise ValueError(f'topk={topk}; ask for at least 1 class')
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size}; use at least 1')
    result = PredictResult()
    paths = [str(p) for p in find_images(inputs, skipped=result.failed)]
    model = for_device(restored.model.to(device), device).eval()  # CPU kernels on CPU
    transform = restored.transform()
    mode = 'L' if restored.preprocess['in_chans'] == 1 else 'RGB'
    k = min(topk, len(restored.classes))
    bar = tqdm(total=len(paths), unit='img', desc='predict', disable=None if progress is None else not progress)
    with bar:
        for start in range(0, len(paths), batch_size):
            batch, names = [], []
            for path in paths[start:start + batch_size]:
                tensor, error = _read(path, mode, transform)
                if error is None:
                    batch.append(tensor)
                    names.append(path)
                else:
                    result.failed.append((path, error))
            if batch:
                logits = model(torch.stack(batch).to(device)).float()  # (B, num_classes)
                check_finite(logits, ', '.join(names[:3]) + (' ...' if len(names) > 3 else ''))
                probs = logits.softmax(dim=-1)
                values, indices = probs.topk(k, dim=-1)
                for name, vals, idxs in zip(names, values.tolist(), indices.tolist()):
                    result.predictions.append(Prediction(
                        name, [(i, restored.classes[i], v) for i, v in zip(idxs, vals)]))
            bar.update(len(paths[start:start + batch_size]))
    return result
