"""Run an exported T2T-ViT with onnxruntime, numpy and PIL only (no torch): python onnx_predict.py MODEL.onnx IMAGE"""
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

model_path, image_path = sys.argv[1], sys.argv[2]
info = json.load(open(model_path + '.json'))  # written beside the model by `t2tvit export`
pre = info['preprocess']

image = Image.open(image_path).convert(pre['image_mode'])  # 'RGB' or 'L'
w, h, r = image.width, image.height, pre['resize']
if isinstance(r, int):  # the shorter side becomes r, keeping the aspect ratio (as torchvision's Resize)
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
else:  # [height, width]
    size = (r[1], r[0])
image = image.resize(size, {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR}[pre['interpolation']])
crop_h, crop_w = pre['center_crop']
left, top = int(round((image.width - crop_w) / 2)), int(round((image.height - crop_h) / 2))
image = image.crop((left, top, left + crop_w, top + crop_h))

x = np.asarray(image, dtype=np.float32) / 255
x = x[:, :, None] if x.ndim == 2 else x  # (H, W, C)
x = (x - np.array(pre['mean'], np.float32)) / np.array(pre['std'], np.float32)
x = x.transpose(2, 0, 1)[None]  # (1, C, H, W)

session = ort.InferenceSession(model_path, providers=['CPUExecutionProvider'])
logits = session.run(None, {info['input_name']: x})[0][0]
probs = np.exp(logits - logits.max())
probs /= probs.sum()
for i in probs.argsort()[::-1][:5]:
    print(f"{probs[i]:.4f}  {info['classes'][i]}")
