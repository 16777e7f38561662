"""Which SSD tile (chunk) is fastest for one Mamba-2 layer, forward + backward, on this device.

Any tile gives the same result up to rounding; `elasticlm.model.mamba2.scan_chunk_size` picks the
one used at run time. Median of several repeats per tile, all in one process.

    python bench/bench_scan_chunk.py [--seq 256 --batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_model import NANO_SHAPED

import elasticlm.model.mamba2 as mamba2
from elasticlm import ModelConfig, preset
from elasticlm.model.hybrid import HybridLM


def median_seconds(mixer: torch.nn.Module, width, x: torch.Tensor, repeats: int) -> float:
    mixer.compute(x, width)[0].sum().backward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mixer.compute(x, width)[0].sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiles", default="16,32,64,128")
    args = ap.parse_args()
    tiles = [int(t) for t in args.tiles.split(",")]
    torch.manual_seed(0)
    print(f"{'shape':12s} " + " ".join(f"{t:>8d}" for t in tiles) + "   (ms per layer fwd+bwd)")
    for name, fields in (("demo", preset("demo").to_dict()), ("nano-shaped", NANO_SHAPED)):
        config = ModelConfig.from_dict({**fields, "pattern": "M"})
        mixer, width = HybridLM(config).layers[0].mixer, config.layer_widths(0)
        x = torch.randn(args.batch, args.seq, config.hidden_size, requires_grad=True)
        row = []
        for tile in tiles:
            mamba2.scan_chunk_size = lambda chunk, device, tile=tile: tile
            row.append(1e3 * median_seconds(mixer, width, x, args.repeats))
        print(f"{name:12s} " + " ".join(f"{v:8.0f}" for v in row))


if __name__ == "__main__":
    main()
