"""Write the sample files the README's `predict`, `visualize` and ONNX examples read (`make demo` runs this).

    python examples/make_samples.py data/fashion-mnist samples

From the Fashion-MNIST test split: test0.png (an ankle boot), test1.png (a pullover) and test2.png (trousers),
28x28 greyscale as stored; the shirt of test image 4 as a palette GIF (palette.gif) and stretched to a 200x150 RGBA
PNG (stretched_rgba.png); and notes.jpg, a text file with an image suffix, which `predict` names and skips.
Nothing is downloaded: the IDX files are the ones `make data` fetched.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2tvit.data import DataError, build_dataset


def write_samples(data: Path, out: Path) -> list:
    test = build_dataset('fashion_mnist', data, 'test', in_chans=1)  # PIL 'L' images
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(3):
        image, _ = test[i]
        image.save(out / f'test{i}.png')
        written.append(out / f'test{i}.png')
    shirt, _ = test[4]
    shirt.convert('P').save(out / 'palette.gif')
    shirt.resize((200, 150)).convert('RGBA').save(out / 'stretched_rgba.png')
    (out / 'notes.jpg').write_text('not an image: predict names this file and skips it\n')
    return written + [out / 'palette.gif', out / 'stretched_rgba.png', out / 'notes.jpg']


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('data', type=Path, help='folder with the Fashion-MNIST IDX files')
    parser.add_argument('out', type=Path, nargs='?', default=Path('samples'), help='where to write (samples/)')
    args = parser.parse_args(argv)
    try:
        for path in write_samples(args.data, args.out):
            print(f'wrote {path}')
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
