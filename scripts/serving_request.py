"""Print the JSON body of a request to the served student (``POST /invocations`` of ``mlflow models serve``).

The served model takes raw ``uint8`` images ``(N, H, W, C)``, channels last, with the channel count it was trained
on: 1 for the default digits (and MNIST), 3 for RGB photos. This reads that count from the model's metadata and
converts each image file to it with Pillow (``L`` or ``RGB``); the model resizes and crops by itself. All images
of one request must have one size (MLflow sends the batch as one array).

Usage (``MLFLOW_TRACKING_URI`` names the store that holds the registered model)::

    python scripts/serving_request.py my_image.png [more.png ...] [--model models:/deit-student@champion] \\
        > request.json
    curl -s -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d @request.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def request_body(paths: list[str], channels: int) -> dict[str, list]:
    """``{"inputs": N x H x W x C}`` for the image files, converted to ``channels`` (1 or 3)."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise SystemExit(f"error: the model takes {channels}-channel images; this script converts to 1 or 3 only")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert(mode), dtype=np.uint8).reshape(image.height, image.width, channels))
    sizes = sorted({a.shape[:2] for a in images})
    if len(sizes) > 1:
        raise SystemExit(f"error: the images have different sizes {sizes}; send one request per size")
    return {"inputs": np.stack(images).tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    parser.add_argument("--model", default="models:/deit-student@champion",
                        help="the served model, for its channel count (default: %(default)s)")
    args = parser.parse_args(argv)
    import mlflow

    channels = int(mlflow.models.get_model_info(args.model).metadata["channels"])
    json.dump(request_body(args.images, channels), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
