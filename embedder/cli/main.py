"""Command line: parse -> typed config -> API call -> exit code. No logic lives here."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import warnings

from embedder.errors import EmbedderError, EmbedderNotice

EPILOG = "Docs: README.md. Every command has --help."


def _int_or_auto(value: str) -> int | None:
    return None if value == "auto" else int(value)


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="image folder (ImageFolder tree, train/val split tree or flat) or .txt/.csv file list")
    p.add_argument("--model", required=True, help="backbone name (see `embedder models`)")
    p.add_argument("--out", required=True, help="HDF5 cache to create, resume or append to (e.g. feats.h5)")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT (pretrained), none (random init) or PATH to a state dict")
    p.add_argument("--layer", action="append", default=None, metavar="NAME",
                   help="output point (default: the pooled last conv stage); any name from `embedder inspect MODEL`. "
                        "Repeat for several layers in one pass: each is stored as its own dataset, the first as "
                        "/features; `style` names the Gram style descriptor")
    p.add_argument("--pool", choices=["avg", "max", "gem", "none"], default="avg",
                   help="how a [C, H, W] map becomes a vector: average, max, generalised mean (p=3), none = flatten")
    p.add_argument("--style", action="store_true",
                   help="also store the Gram-matrix style descriptor as the layer `style` (indexable)")
    p.add_argument("--style-layer", action="append", default=None, metavar="NAME",
                   help="a layer of the style descriptor; repeat (default: the model's, see `embedder inspect`)")
    p.add_argument("--style-dim", type=int, default=2048,
                   help="length of the style descriptor (seeded count-sketch projection); 0 = full Gram triangles")
    p.add_argument("--normalize", choices=["none", "l2"], default="none", help="store L2-normalised features")
    p.add_argument("--batch-size", type=_int_or_auto, default=None,
                   help="images per forward pass (default auto: 4 on CPU, 32 on GPU; measured, see docs/BENCHMARKS.md)")
    p.add_argument("--workers", type=_int_or_auto, default=None, help="reader processes (default auto)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = fastest measured for the device (see docs/BENCHMARKS.md)")
    p.add_argument("--memory-layout", default="auto", choices=["auto", "channels_last", "contiguous"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone: 1.25-1.5x faster on CPU once compiled, 18-26 s to compile; "
                        "worth it from about 1,300 images (docs/BENCHMARKS.md)")
    p.add_argument("--image-size", type=int, default=None, help="override the weights' crop size (resize keeps its ratio)")
    p.add_argument("--limit", type=int, default=None, help="only the first N files of the sorted listing")
    p.add_argument("--layout", default="auto",
                   choices=["auto", "imagefolder", "split-imagefolder", "flat", "filelist"],
                   help="how SOURCE is organised (default: detect)")
    p.add_argument("--dtype", dest="feature_dtype", default="float32", choices=["float32", "float16"],
                   help="storage type of the features")
    p.add_argument("--commit-every", type=int, default=512, help="files per committed part (most a kill can lose)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images as decompression bombs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache with another configuration")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    g = p.add_argument_group("scale-out on Ray (docs/SCALING.md)")
    g.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="ray: shard the listing over a Ray cluster's actor pool (pip install 'embedder[ray]')")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join: auto (the one `ray start` made) or HOST:PORT; default: start a local one")
    g.add_argument("--shard-size", type=int, default=65536,
                   help="rows per shard file (rounded up to whole batches): the unit of work and of resume")
    g.add_argument("--actors", type=int, default=None, help="actor pool size (default: fill the cluster)")
    g.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0")
    g.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="CPUs reserved per actor (its reader processes are --workers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedder",
        description="Frozen pretrained CNN features, extracted once into an HDF5 cache.",
        epilog=EPILOG,
    )
    from embedder._version import __version__

    parser.add_argument("--version", action="version", version=f"embedder {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: EMBEDDER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list backbones, feature widths and offline weight availability")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="list a model's layers (graph nodes) with output shapes, default and head marked")
    p.add_argument("model", help="backbone name (see `embedder models`)")
    p.add_argument("--image-size", type=int, default=None, help="input size for the shapes (default: the model's)")
    p.add_argument("--weights", default="none", help="none (default: shapes need no weights), DEFAULT or PATH")
    p.add_argument("--depth", type=int, default=None, help="0 = the model's children only, 1 = one level more, ...")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("embed", help="extract features of an image folder into an HDF5 cache (resumable)")
    _add_embed_args(p)

    p = sub.add_parser("merge", help="consolidate a sharded cache (from --backend ray) into one self-contained file")
    p.add_argument("cache", help="the sharded cache OUT.h5 (a virtual view), or its OUT.h5.shards folder")
    p.add_argument("--out", required=True, help="single HDF5 cache to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("probe", help="train a linear probe (or a scikit-learn classifier) on a feature cache")
    p.add_argument("cache", help="feature cache to train on (split by train/ val/ folders, or stratified)")
    p.add_argument("--val-cache", default=None, help="validation cache (same fingerprint): selects the regularisation")
    p.add_argument("--test-cache", default=None, help="test cache (same fingerprint), reported once")
    p.add_argument("--classifier", default="probe", choices=["probe", "logreg", "linear-svm", "ridge", "knn", "mlp"],
                   help="probe = PyTorch linear head with a C sweep; others = scikit-learn pipelines tuned by CV")
    p.add_argument("--out", default=None, help="PROBE_DIR for the model, report.json and confusion_matrix.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--memory-budget", default="2G", help="train in memory up to this size, else stream blocks")
    p.add_argument("--device", default="auto")
    p.add_argument("--layer", default=None, help="which layer of a multi-layer cache (default: the first, /features)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (includes val_accuracy)")

    p = sub.add_parser("evaluate", help="apply a saved probe or classifier to another cache")
    p.add_argument("probe_dir")
    p.add_argument("cache")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="assemble backbone + trained linear probe into one image classifier")
    p.add_argument("probe_dir")
    p.add_argument("--out", required=True, help="MODEL.pt to write")
    p.add_argument("--weights", default=None, help="the weights file, when the cache was embedded with --weights PATH")

    p = sub.add_parser("predict", help="label images with an exported or fine-tuned classifier")
    p.add_argument("model", help="MODEL.pt from `embedder export` or `embedder finetune`")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("finetune", help="train the whole network (or a head on a frozen backbone) on images")
    p.add_argument("source", help="ImageFolder tree, split tree (train/ val/ [test/]) or file list")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output folder: best.pt (for `embedder predict`) and history.json")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT, none or PATH")
    p.add_argument("--layer", default=None, help="feature layer the head sits on (default: the pooled last stage)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["step", "cosine"], default="step")
    p.add_argument("--step-size", type=int, default=7, help="epochs between LR drops (step schedule)")
    p.add_argument("--gamma", type=float, default=0.1, help="LR factor at each drop (step schedule)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="fixed feature extractor: only the head trains, the backbone re-runs every epoch (eval-locked)")
    p.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm statistics and affine weights locked")
    p.add_argument("--init-head", default=None, metavar="PROBE_DIR", help="start the head from a trained linear probe")
    p.add_argument("--head", choices=["linear", "mlp"], default="linear")
    p.add_argument("--mlp-hidden", type=int, default=512)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--workers", type=_int_or_auto, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stylize", help="neural style transfer: repaint --content with the texture of --style (L-BFGS)")
    p.add_argument("--content", required=True, help="image whose layout is kept")
    p.add_argument("--style", required=True, help="image whose texture (Gram statistics) is transferred")
    p.add_argument("--out", required=True, help="OUT.png to write")
    p.add_argument("--model", default="efficientnet_lite0",
                   help="backbone (default efficientnet_lite0: its weights work offline; vgg19 is the classic)")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT, none or PATH")
    p.add_argument("--steps", type=int, default=100, help="L-BFGS iterations")
    p.add_argument("--style-weight", type=float, default=100.0, help="weight of the (relative) style loss")
    p.add_argument("--content-weight", type=float, default=1.0, help="weight of the (relative) content loss")
    p.add_argument("--style-layer", action="append", default=None, metavar="NAME[:WEIGHT]",
                   help="a style layer and its weight; repeat for several (default: the model's, see inspect)")
    p.add_argument("--content-layer", default=None, help="content layer (default: the model's, see inspect)")
    p.add_argument("--image-size", type=int, default=256, help="longer side of the output in pixels")
    p.add_argument("--init", choices=["content", "noise"], default="content", help="start from the content image or seeded noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("index", help="build a FAISS similarity index from a feature cache")
    p.add_argument("cache")
    p.add_argument("--out", required=True, help="INDEX_DIR to write (replaced atomically)")
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf", "hnsw", "ivfsq", "ivfpq"],
                   help="auto: exact when small, HNSW or IVF when large, IVF-SQ8 then IVF-PQ as memory gets short")
    p.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    p.add_argument("--memory-budget", default=None, help="e.g. 4G (default 4G): bounds the index size")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the search parameters are tuned to")
    p.add_argument("--on-disk", action="store_true",
                   help="ivf/ivfsq/ivfpq: build one index per shard and merge their lists on disk (faiss contrib.ondisk); "
                        "automatic when the index would exceed --memory-budget")
    p.add_argument("--layer", default=None,
                   help="which layer of a multi-layer cache to index, e.g. `style` (default: the first, /features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("search", help="query an index by image(s), cached path, row id or vector")
    p.add_argument("index_dir")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", nargs="+", help="query image files or folders (several = batch mode)")
    q.add_argument("--path", help="a path as stored in the cache")
    q.add_argument("--id", type=int, dest="row_id", help="a cache row id")
    q.add_argument("--vector", help="a .npy file with one vector (D,) or several (n, D)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="JSON lines: one object per query")
    p.add_argument("--grid", default=None, help="write a PNG of each query and its neighbours")
    p.add_argument("--layer", default=None,
                   help="the layer the index must have been built on (checked; an index holds one layer)")
    p.add_argument("--weights", default=None, help="the weights file, when the cache was embedded with --weights PATH")

    p = sub.add_parser("dedup", help="list near-duplicate groups of a cache (range search)")
    p.add_argument("cache")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity >= T (or squared L2 <= T)")
    p.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    p.add_argument("--layer", default=None, help="which layer of a multi-layer cache (default: the first)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plot", help="2-D scatter of a cache coloured by label")
    p.add_argument("cache")
    p.add_argument("--method", default="pca", choices=["pca", "tsne"])
    p.add_argument("--out", default=None)
    p.add_argument("--max-points", type=int, default=5000)
    p.add_argument("--layer", default=None, help="which layer of a multi-layer cache (default: the first)")

    p = sub.add_parser("serve", help="HTTP search service with a web page (FastAPI + uvicorn)")
    p.add_argument("index_dir")
    p.add_argument("--host", default="127.0.0.1", help="default loopback only; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*' = any, for a proxy that "
                        "checks Host itself); always allowed: localhost, 127.0.0.1, ::1 and --host unless 0.0.0.0/::")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads get 413")
    p.add_argument("--max-upload-pixels", type=int, default=None,
                   help="uploads declaring more pixels are refused (400) before decoding (default 50,000,000; "
                        "each image decoded at once may take ~4 bytes per pixel)")
    p.add_argument("--decode-slots", type=int, default=None,
                   help="images decoded at once, uploads and thumbnails together (default 2)")
    p.add_argument("-k", type=int, default=10, help="neighbours returned when a request does not say")
    p.add_argument("--weights", default=None, help="the weights file, when the cache was embedded with --weights PATH")

    p = sub.add_parser("info", help="describe a feature cache")
    p.add_argument("cache")
    p.add_argument("--errors", action="store_true", help="list every file in the errors table")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("run", help="run a declarative pipeline (TOML), e.g. pipelines/quickstart.toml")
    p.add_argument("pipeline")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("make-samples", help="write the sample datasets (from data shipped in packages)")
    p.add_argument("out", nargs="?", default="data", help="folder to write into (default: data)")
    p.add_argument("--only", nargs="*", default=None, help="subset of: digits lfw_subset photos")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["embedder", *argv])  # what a cache records, to say how to resume it
    debug = args.debug or os.environ.get("EMBEDDER_DEBUG", "") not in ("", "0")
    warnings.showwarning = _show_notice
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("embedder: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place that turns any failure into one line
        if debug:
            raise
        message, code = explain(exc)
        print(f"embedder: error: {message}", file=sys.stderr)
        if getattr(exc, "unclean", False):
            # HDF5 does not recover from a write that failed midway: its exit handler would try
            # to flush the broken file again and can crash the interpreter. Everything embedder
            # wrote is complete or gone (temporary files are removed), so leave without it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


_default_showwarning = warnings.showwarning


def _show_notice(message, category, filename, lineno, file=None, line=None):
    """Library notices (EmbedderNotice) as one `embedder: ...` line; other warnings as Python shows them."""
    if issubclass(category, EmbedderNotice):
        print(f"embedder: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def explain(exc: Exception) -> tuple[str, int]:
    """One line (or a short block, for listed differences) that says what happened and what to do."""
    if isinstance(exc, EmbedderError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        return _explain_os_error(exc), 1
    if isinstance(exc, MemoryError):
        return ("out of memory. Lower --batch-size (embed) or --memory-budget (index, probe), or close other "
                "programs; rerunning resumes what was committed."), 1
    return (f"internal error: {type(exc).__name__}: {exc}. This is a bug in embedder: rerun with --debug to see "
            "where it happened, and report it."), 70


def _explain_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}. Free some space and rerun the same command: finished and "
                "committed work is kept.")
    if exc.errno == errno.EROFS:
        return f"read-only file system{where}. Write the output (--out) to writable storage."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}. Check the permissions, or write the output (--out) elsewhere."
    if exc.errno == errno.ENOENT:
        return f"no such file or folder{where}."
    reason = exc.strerror or str(exc)
    return f"{reason}{where}."


def _dispatch(args) -> int:
    if args.command == "models":
        from embedder.cli.commands import models

        return models(as_json=args.json)
    if args.command == "inspect":
        from embedder.cli.commands import inspect_command

        return inspect_command(args.model, image_size=args.image_size, weights=args.weights, depth=args.depth,
                               as_json=args.json)
    if args.command == "embed":
        from embedder.atomic import WriteLock

        # The lock first, before torch is even imported (seconds): a second run into the same
        # cache is refused at once, with the running one's pid.
        with WriteLock(args.out) as lock:
            return _embed(args, lock)
    if args.command == "merge":
        from embedder.cli.commands import merge_command

        return merge_command(args.cache, args.out, args.overwrite)
    if args.command == "probe":
        from embedder.cli.commands import probe_command
        from embedder.learn.train import ProbeConfig
        from embedder.options import parse_size

        config = ProbeConfig(
            cache=args.cache, out=args.out, val_cache=args.val_cache, test_cache=args.test_cache,
            classifier=args.classifier, seed=args.seed, val_fraction=args.val_fraction,
            test_fraction=args.test_fraction, memory_budget=parse_size(args.memory_budget), device=args.device,
            layer=args.layer,
        )
        return probe_command(config, as_json=args.json)
    if args.command == "evaluate":
        from embedder.cli.commands import evaluate_command

        return evaluate_command(args.probe_dir, args.cache, as_json=args.json)
    if args.command == "export":
        from embedder.cli.commands import export_command

        return export_command(args.probe_dir, args.out, args.weights)
    if args.command == "predict":
        from embedder.cli.commands import predict_command

        return predict_command(args.model, args.images, top_k=args.top_k, batch_size=args.batch_size,
                               device=args.device, as_json=args.json)
    if args.command == "finetune":
        from embedder.learn.finetune import FinetuneConfig, finetune

        config = FinetuneConfig(
            source=args.source, model=args.model, out=args.out, weights=args.weights, layer=args.layer,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, schedule=args.schedule, step_size=args.step_size, gamma=args.gamma,
            freeze_backbone=args.freeze_backbone, freeze_bn=args.freeze_bn, init_head=args.init_head,
            head=args.head, mlp_hidden=args.mlp_hidden, image_size=args.image_size, workers=args.workers,
            device=args.device, seed=args.seed, limit=args.limit, progress=not args.quiet,
        )
        report = finetune(config)
        print_json(report.as_dict()) if args.json else print(report.summary())
        return 0
    if args.command == "stylize":
        from embedder.models.stylize import StylizeConfig, stylize

        config = StylizeConfig(
            content=args.content, style=args.style, out=args.out, model=args.model, weights=args.weights,
            steps=args.steps, style_weight=args.style_weight, content_weight=args.content_weight,
            style_layers=tuple(args.style_layer or ()), content_layer=args.content_layer, image_size=args.image_size,
            init=args.init, seed=args.seed, device=args.device, progress=not args.quiet,
        )
        report = stylize(config)
        print_json(report.as_dict()) if args.json else print(report.summary())
        return 0
    if args.command == "index":
        from embedder.cli.commands import index_command

        return index_command(args.cache, args.out, args.kind, args.metric, args.memory_budget, args.target_recall,
                             args.seed, not args.quiet, args.json, on_disk=args.on_disk, layer=args.layer)
    if args.command == "search":
        from embedder.cli.commands import search_command

        return search_command(args.index_dir, args.image, args.path, args.row_id, args.vector, args.k, args.json,
                              args.grid, args.weights, layer=args.layer)
    if args.command == "dedup":
        from embedder.cli.commands import dedup_command

        return dedup_command(args.cache, args.threshold, args.metric, args.json, layer=args.layer)
    if args.command == "plot":
        from embedder.cli.commands import plot_command

        return plot_command(args.cache, args.method, args.out, args.max_points, layer=args.layer)
    if args.command == "serve":
        return _serve(args)
    if args.command == "info":
        from embedder.cli.commands import info

        return info(args.cache, list_errors=args.errors, as_json=args.json)
    if args.command == "run":
        from embedder.cli.pipeline import run_pipeline

        run_pipeline(args.pipeline, progress=not args.quiet)
        return 0
    if args.command == "make-samples":
        from embedder.data.samples import make_samples

        print(make_samples(args.out, only=args.only).summary())
        return 0
    raise AssertionError(args.command)


def _embed(args, lock) -> int:
    from embedder.cli.commands import embed_command
    from embedder.data.decode import DEFAULT_MAX_PIXELS
    from embedder.extract.config import EmbedConfig

    config = EmbedConfig(
        source=args.source,
        model=args.model,
        out=args.out,
        weights=args.weights,
        layer=args.layer[0] if args.layer else None,
        extra_layers=tuple(args.layer[1:]) if args.layer else (),
        pool=args.pool,
        style=args.style,
        style_layers=tuple(args.style_layer or ()),
        style_dim=args.style_dim,
        normalize=args.normalize,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        memory_layout=args.memory_layout,
        compile=args.compile,
        image_size=args.image_size,
        limit=args.limit,
        layout=args.layout,
        feature_dtype=args.feature_dtype,
        commit_every=args.commit_every,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    ray_options = None
    if args.backend == "ray":
        from embedder.extract.ray import RayOptions

        ray_options = RayOptions(address=args.address, shard_size=args.shard_size, actors=args.actors,
                                 gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor)
    return embed_command(config, as_json=args.json, ray_options=ray_options, lock=lock, command=args.command_line)


def _serve(args) -> int:
    from embedder.serve.app import allowed_hosts_for, create_app, run

    hosts = allowed_hosts_for(args.host, args.allowed_host)
    # Flags left out keep the service's own defaults (importing them here would load FastAPI for every command).
    given = {"max_pixels": args.max_upload_pixels, "decode_slots": args.decode_slots}
    app = create_app(args.index_dir, max_upload_bytes=int(args.max_upload_mb * 2**20), default_k=args.k,
                     weights_path=args.weights, allowed_hosts=hosts,
                     **{name: value for name, value in given.items() if value is not None})
    where = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.index_dir} on http://{where}:{args.port}/  (answering Host: {', '.join(hosts)}; "
          "API spec: /openapi.json)", flush=True)
    run(app, host=args.host, port=args.port)
    return 0


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
