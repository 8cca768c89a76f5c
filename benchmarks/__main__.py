"""One entry point for the benchmarks: `python -m benchmarks [--quick] [NAME ...]`.

Each benchmark runs the variants it compares side by side in one process and prints
ratios; docs/BENCHMARKS.md records the results with the command that produced them.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time

import torch

BENCHMARKS = {
    "precision": "CPU precision and memory layout, model only (torch fp32, channels_last, bf16 side by side)",
    "fastpaths": "int8 and bf16 against the exact fp32 default: model only, end to end, fidelity cards",
    "int8_routes": "int8 routes side by side: ONNX Runtime QDQ (ours), torch.ao FX, torchao PT2E, Intel "
                   "Neural Compressor; speed at batch 32, fidelity cards; the decode share of embed, fp32 and int8",
    "int8_options": "ONNX Runtime's int8 options side by side, model only: QDQ / QOperator, U8S8 / S8S8, per "
                    "channel / per tensor / reduce_range, more operators, spinning, optimisation level; batches 1-16",
    "int8_nodes": "which nodes to keep in fp32: Lite0 with its k costliest convolutions (ONNX Runtime's per-tensor "
                  "SQNR) in fp32, against levels 0 and 2",
    "compiled": "--compile (torch.compile, inductor) against eager: compile time, speed-up, break-even",
    "runtime": "torch eager, bf16, --compile and ONNX Runtime against the GEMM peak; model only and end to end",
    "extraction": "JPEG files -> committed cache, against the bare model forward",
    "decode": "JPEG photos -> model input: PIL, torchvision.io.decode_jpeg, --jpeg-draft; decode share per model",
    "tutorial": "embedder's defaults against the PyTorch tutorial's ImageFolder + PIL + fp32 loop",
    "training": "cached linear probe against the fixed-feature-extractor loop, same epochs",
    "evaluation": "digits: linear probe against DINOv2's k-NN vote, few-shot (1-10 per class) mean ± std, layer sweep",
    "memory": "peak RSS of extraction at N and 10 N images; index build RSS against --memory-budget",
    "compressed": "IVF with raw, 8-bit (ivfsq) and PQ-coded (ivfpq) vectors: recall for the bytes",
    "search": "flat, IVF and HNSW: build time, size, recall@10, latency, throughput",
    "filters": "filtered search (10%, 1% of the rows) against unfiltered: flat, IVF, HNSW latency and recall",
    "curate": "label mistakes on digits with 5% flipped (precision@n); dedup through IVF against exact, 200k x 512",
    "tar": "webdataset tar shards against a folder of the same JPEGs, both through embed()",
    "urls": "http(s) URL rows from a loopback server (0 and 50 ms delay) against a folder: fetch/s, embed img/s",
    "sharded": "Ray Data backend: per-worker throughput of sharded extraction, against the local backend",
    "service": "embedder serve under attack and load: schemathesis fuzz, abusive requests, N concurrent clients",
    "slowclients": "embedder serve while N slow-header clients hold sockets: /health and query answers, with and "
                   "without the deadlines",
    "map": "the service's /map page at 100k points: embedder map time, /map/points size, Chromium load and draw",
    "export": "export-vectors (Parquet, npy) at N and 10 N rows: added peak RSS stays flat",
    "errors": "the errors table of a listing of mostly missing files: writer time and added RSS at N .. 8 N rows",
    "fidelity": "default and layer features against timm's and torchvision's own models and transforms: min cosine",
    "sync": "rerun of embed with 1% changed against the full run; watch latency; unchanged sync at 100k paths",
}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], metavar="NAME",
                    help=f"which to run (default: all): {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="small models and inputs: about a minute in all")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args()
    if args.list:
        for name, what in BENCHMARKS.items():
            print(f"{name:<12} {what}")
        return
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{'quick' if args.quick else 'full'} mode")
    for name in args.names or list(BENCHMARKS):
        print(f"\n== {name}: {BENCHMARKS[name]}")
        t0 = time.perf_counter()
        importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        print(f"   ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
