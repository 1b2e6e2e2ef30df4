"""Decoding cost of one Classify's queries, in process: p50 of 30 `decode_for_model` calls on 64 PNG
test images per flagship metric model (BENCHMARKS.md, "The served path against its own engine"), with
the libspng fast path and with Pillow alone, calls alternating so that drift hits both.
Usage: python scripts/decode_bench.py [--images 64] [--calls 30]   (needs the bundles in bundles/)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from fewshot.export.loader import open_bundle
from fewshot.export.registry import Registry
from fewshot.models.data import load_dataset
from fewshot.models.preprocess import encode_png
from fewshot.server import images as decoding
from fewshot.server.images import ImageLimits, decode_for_model
from fewshot_proto import fewshot_pb2 as pb

MODELS = {"omniglot-conv4-directsum": "omniglot", "tinyimagenet-conv4-sce-nca-directsum": "tinyimagenet"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--bundles", default="bundles")
    args = parser.parse_args()
    registry = Registry.load(args.bundles)
    for name, dataset in MODELS.items():
        model = open_bundle(registry.get(name), "cpu")
        data = load_dataset(dataset, "test")
        images = [pb.Image(encoded=encode_png(data.images[i])) for i in range(args.images)]
        fast, variants = decoding.pyspng, {"libspng fast path": [], "Pillow alone": []}
        for i in range(3 + args.calls):
            for variant, ms in variants.items():
                decoding.pyspng = fast if variant == "libspng fast path" else None
                start = time.perf_counter()
                decode_for_model(images, model, ImageLimits(), "query")
                if i >= 3:
                    ms.append(1e3 * (time.perf_counter() - start))
        decoding.pyspng = fast
        p50 = {v: float(np.median(ms)) for v, ms in variants.items()}
        for variant, ms in variants.items():
            print(
                f"{name}: decode {args.images} PNG queries, {variant}: p50 {p50[variant]:.2f} ms "
                f"(p10 {np.percentile(ms, 10):.2f}, p90 {np.percentile(ms, 90):.2f}) over {args.calls} calls"
            )
        print(f"{name}: the fast path takes {p50['libspng fast path'] / p50['Pillow alone']:.2f}x Pillow's time")


if __name__ == "__main__":
    main()
