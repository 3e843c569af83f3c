"""The `guardrail` command: one function per verb, errors mapped to exit codes (1 error, 2 usage error).

Every verb's argparse code lives here, and no library module imports this one: the library stays usable without
the command, and there is no import cycle back into it. Heavy libraries are imported inside the verbs, so
`guardrail --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence

from .blocklist import DEFAULT_THRESHOLD
from .embedding_sets import DEFAULT_DESCRIPTOR_THRESHOLD
from .errors import GuardrailError, UsageError
from .index import KINDS as INDEX_KINDS


def add_embedder_arguments(parser: argparse.ArgumentParser) -> None:
    """The embedder is rebuilt from the blocklist's spec; these say where its weights and compute are."""
    parser.add_argument(
        "--pretrained",
        help="open_clip pretrained tag or local weights file (default: the blocklist's tag; a blocklist built from a "
        "weights file needs that file here)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the embedder (default: cpu)")


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """How `check` and `calibrate` use a blocklist's descriptor set and tiles."""
    parser.add_argument("--descriptor", metavar="FILE",
                        help="the TorchScript/ONNX descriptor file of the blocklist's descriptor set (default: the "
                        "file its spec records); with a descriptor set the check runs in two stages")
    parser.add_argument("--main-only", action="store_true",
                        help="ignore the blocklist's descriptor set: match with the main vectors alone")
    parser.add_argument("--tiles", action="store_true",
                        help="also match tiles of each image (partial copies); needs calibrated tile thresholds")


def _descriptor_for(blocklist, args: argparse.Namespace):
    """The blocklist's descriptor, rebuilt from its spec (and `--descriptor FILE`), or None for one stage."""
    from .rebuild import embedder_from_spec

    if args.main_only or blocklist.descriptor is None:
        if args.descriptor and not args.main_only:
            raise UsageError(f"--descriptor {args.descriptor}: the blocklist has no descriptor set; build one with "
                             "guardrail build --descriptor FILE")
        return None
    return embedder_from_spec(blocklist.descriptor.spec, pretrained=args.descriptor, device=args.device)


def cmd_info(args: argparse.Namespace) -> int:
    """Print a blocklist's count, spec, threshold and creation time; verifies the checksum and every vector."""
    import os

    from .blocklist import Blocklist

    blocklist = Blocklist.load(args.blocklist)  # raises BlocklistError on any damage
    info = {
        "path": args.blocklist,
        "bytes": os.path.getsize(args.blocklist),
        "count": len(blocklist),
        "threshold": blocklist.threshold,
        "created": blocklist.created,
        "checksum": "ok",
        "vectors": f"{blocklist.embeddings.dtype} x {blocklist.dim}",
        "index": blocklist.index_kind or "none stored (exact search, or chosen at load)",
        "index_params": blocklist.index_params or {},
        "spec": blocklist.spec,
        "tiles": _tiles_info(blocklist.tiles, blocklist.tile_threshold),
    }
    if blocklist.descriptor is not None:
        descriptor = blocklist.descriptor
        info["descriptor"] = {
            "vectors": f"{descriptor.embeddings.dtype} x {descriptor.dim}",
            "threshold": descriptor.threshold,
            "recall_threshold": blocklist.recall_threshold,
            "tiles": _tiles_info(descriptor.tiles, descriptor.tile_threshold),
            "spec": descriptor.spec,
        }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, dict) else value}")
    return 0


def _tiles_info(tiles, threshold) -> str:
    from .embedding_sets import TILE_GRID

    if tiles is None:
        return "none stored"
    return f"{len(TILE_GRID)} per entry ({', '.join(TILE_GRID)}), threshold {threshold if threshold is not None else 'not calibrated'}"


def cmd_check(args: argparse.Namespace) -> int:
    """One verdict per image. Exit 1 when any image matches (or cannot be read), 0 when none does."""
    from .blocklist import Blocklist
    from .rebuild import embedder_from_spec
    from .errors import ImageDecodeError
    from .guard import Guard
    from .images import load_image

    blocklist = Blocklist.load(args.blocklist)
    embedder = embedder_from_spec(blocklist.spec, pretrained=args.pretrained, device=args.device)
    guard = Guard(blocklist, embedder, threshold=args.threshold, descriptor=_descriptor_for(blocklist, args),
                  tiles=args.tiles)
    decoded, errors = {}, {}
    for path in args.images:
        try:
            decoded[path] = load_image(path)
        except ImageDecodeError as error:
            errors[path] = str(error)
    verdicts = dict(zip(decoded, guard.check(list(decoded.values())))) if decoded else {}
    results = [
        {"image": path, "error": errors[path]} if path in errors else {"image": path, **verdicts[path].to_dict()}
        for path in args.images
    ]
    for result in results:
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        elif "error" in result:
            print(f"ERROR  {result['image']}: {result['error']}")
        else:
            status = "MATCH" if result["matched"] else "ok   "
            decided = "" if result["stage"] == "main" else f"  stage={result['stage']}"
            tile = f"  tile={result['tile']!r}" if result["tile"] else ""
            print(f"{status}  {result['image']}  score={result['score']:.4f}  entry={result['entry_id']}{decided}{tile}")
    return 1 if any(r.get("matched") or "error" in r for r in results) else 0


def _write_json_atomically(path: str, payload: dict) -> None:
    from .blocklist import atomic_path

    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _nprobe_value(text: str) -> int | str:
    """`--nprobe`: "auto" or a positive integer."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")
    return value


def cmd_build(args: argparse.Namespace) -> int:
    """Build a blocklist from SOURCEs; writes it (and the report) atomically, or nothing at all."""
    from .build import BuildError, build_blocklist
    from .embedders import OpenCLIPEmbedder, open_clip_spec
    from .sources import source_kind

    if args.engine == "local" and (args.address or args.shards or args.actors or args.shard_size):
        raise UsageError("--address, --shards, --actors and --shard-size are for --engine ray; add --engine ray")
    precomputed_only = all(source_kind(source) == "embeddings" for source in args.sources)
    if precomputed_only:  # LAION / clip-retrieval vectors: the spec is stated, no weights are loaded
        embedder, spec = None, open_clip_spec(args.model, args.pretrained)
    else:
        embedder = OpenCLIPEmbedder(args.model, args.pretrained, device=args.device, batch_size=args.batch_size)
        spec = None
    descriptor = None
    if args.descriptor:
        if args.engine == "ray":
            raise UsageError("--descriptor and --tiles are built by --engine local only, for now; drop --engine ray")
        from .descriptors import descriptor_from_file

        descriptor = descriptor_from_file(args.descriptor, image_size=args.descriptor_image_size,
                                          resize_mode=args.descriptor_resize, device=args.device,
                                          batch_size=args.batch_size)
    if args.tiles and args.engine == "ray":
        raise UsageError("--descriptor and --tiles are built by --engine local only, for now; drop --engine ray")
    options = dict(threshold=args.threshold, dedupe=args.dedupe, on_error=args.on_error, spec=spec,
                   batch_size=args.batch_size, workers=args.workers, download=args.download, index=args.index,
                   nprobe=args.nprobe, candidates=args.candidates)
    try:
        if args.engine == "ray":
            from .engine_ray import SHARD_SIZE, build_blocklist_on_ray, default_shard_folder

            blocklist = build_blocklist_on_ray(
                args.sources, embedder, pretrained=args.pretrained, address=args.address, actors=args.actors,
                device=args.device, shards=args.shards or default_shard_folder(args.output),
                shard_size=args.shard_size or SHARD_SIZE, **options,
            )
        else:
            progress = args.progress if args.progress is not None else sys.stderr.isatty()
            blocklist = build_blocklist(args.sources, embedder, progress=progress, descriptor=descriptor,
                                        descriptor_threshold=args.descriptor_threshold, tiles=args.tiles, **options)
    except BuildError as error:
        if args.report:
            _write_json_atomically(args.report, {**error.report, "output": None, "error": str(error)})
        raise
    blocklist.save(args.output, dtype="float16" if args.float16 else args.dtype)
    report = {**blocklist.build_report, "output": args.output}
    if args.report:
        _write_json_atomically(args.report, report)
    print(
        f"wrote {args.output}: {len(blocklist)} entries from {report['read']} items "
        f"({report['embedded']} embedded, {report['precomputed']} precomputed, {report['skipped']} skipped, "
        f"{report['deduplicated']} deduplicated) in {report['seconds']:.1f}s"
    )
    for reason, count in report["skipped_by_reason"].items():
        print(f"  skipped {count}: {reason}")
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    """Mine near-duplicate groups from embedding folders into a blocklist of one representative per group."""
    import time

    from .embedders import open_clip_spec
    from .mine import mine_duplicates

    started = time.perf_counter()
    blocklist = mine_duplicates(
        args.embeddings, open_clip_spec(args.model, args.pretrained), min_duplicates=args.min_duplicates,
        similarity=args.similarity, threshold=args.threshold, engine=args.engine, address=args.address,
        lists=args.lists, work_dir=args.work_dir,
    )
    blocklist.save(args.output, dtype=args.dtype)
    sizes = [entry["duplicates"] for entry in blocklist.entries]
    print(f"wrote {args.output}: {len(blocklist)} groups of {args.min_duplicates}+ near-duplicates at cosine >= "
          f"{args.similarity} ({sum(sizes)} vectors, largest {max(sizes)}) in {time.perf_counter() - started:.1f}s")
    return 0


def add_mine_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `guardrail mine`."""
    parser.add_argument("embeddings", nargs="+", metavar="EMBEDDINGS",
                        help="clip-retrieval / LAION embedding folder (img_emb/*.npy + metadata/*.parquet)")
    parser.add_argument("-o", "--output", required=True, metavar="CANDIDATES.safetensors")
    parser.add_argument("--model", required=True, help="open_clip model that made the vectors (LAION's: ViT-L-14)")
    parser.add_argument("--pretrained", required=True, help="its pretrained tag or weights file (LAION's: openai)")
    parser.add_argument("--min-duplicates", type=int, default=5, metavar="N", help="smallest group kept (default 5)")
    parser.add_argument("--similarity", type=float, default=0.95, metavar="S",
                        help="cosine at or above which two vectors are near-duplicates (default 0.95)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"match threshold stored in the blocklist (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--lists", type=int, metavar="N", help="coarse lists (default: one per 1,000 vectors)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored vector dtype")
    parser.add_argument("--work-dir", metavar="DIR", help="scratch folder of the local engine's shuffle")
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """`--engine` and `--address`, shared by build and mine."""
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this process (default, needs no Ray); ray: a Ray Data cluster")
    parser.add_argument("--address", metavar="ADDR",
                        help="Ray cluster address (HOST:PORT, ray://HOST:PORT or auto; default: a local cluster)")


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge blocklists built with the same embedder spec into one file."""
    from .blocklist import Blocklist
    from .build import merge_blocklists

    merged = merge_blocklists([Blocklist.load(path) for path in args.blocklists], args.threshold, args.dedupe)
    merged.save(args.output)
    print(f"wrote {args.output}: {len(merged)} entries from {len(args.blocklists)} blocklists")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the offline demo (`guardrail.demo.run_demo`) and write report.json and grid.png to `--out`."""
    from .demo import run_demo

    run_demo(
        args.out,
        samples=args.samples,
        model=args.model,
        pretrained=args.pretrained,
        seed=args.seed,
        steps=args.steps,
        threshold=args.threshold,
        threads=args.threads,
        pipeline=args.pipeline,
    )
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `guardrail demo` (CI reads its report.json: keep the flags)."""
    parser.add_argument("--out", default="guardrail-demo", help="output folder (default: ./guardrail-demo)")
    parser.add_argument("--pipeline", choices=("digits", "photos"), default="digits",
                        help="digits: a model that memorized its duplicated images, as Stable Diffusion did "
                        "(default); photos: a model that memorized all 10 of its photos")
    parser.add_argument("--samples", type=int, default=None, help="images per run (default: 128 digits, 64 photos)")
    parser.add_argument("--model", default=None, help="open_clip model name (default: the bundled tiny embedder)")
    parser.add_argument("--pretrained", default=None, help="pretrained tag or weights file for --model")
    parser.add_argument("--threshold", type=float, default=None, help="cosine match threshold")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labels and generators (default: 0)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure copies and non-copies, print the TPR table, and write the blocklist with the chosen threshold."""
    from .blocklist import Blocklist
    from .calibration import TRANSFORM_FAMILIES, calibrate
    from .rebuild import embedder_from_spec

    blocklist = Blocklist.load(args.blocklist)
    positives = _image_files(args.positives, "--positives") if args.positives else _entry_source_files(blocklist)
    negatives = _image_files(args.negatives, "--negatives")
    embedder = embedder_from_spec(blocklist.spec, pretrained=args.pretrained, device=args.device)
    descriptor = _descriptor_for(blocklist, args)
    if descriptor is not None or args.tiles:
        return _calibrate_stages(args, blocklist, embedder, descriptor, positives, negatives)
    result = calibrate(blocklist, embedder, positives, negatives, target_fpr=args.target_fpr,
                       copies_per_image=args.copies, seed=args.seed, on_error="skip",
                       on_suspect=args.suspect_negatives)
    _save_with_dtype_of(blocklist.with_threshold(result.threshold), args.blocklist, args.output)
    if args.json:
        print(json.dumps({**result.to_dict(), "output": args.output}, indent=2))
        return 0
    print(result.table())
    print(
        f"wrote {args.output}: threshold {result.threshold:.6f} (was {blocklist.threshold}) at FPR {result.fpr:.4f} "
        f"on {result.negatives} negatives (resolution {result.fpr_resolution:.4f}), TPR {result.tpr:.2f} over "
        f"{result.positives} positives x {len(TRANSFORM_FAMILIES)} families x {result.copies_per_image} copies"
    )
    evading = [family for family, tpr in result.tpr_by_family.items() if tpr < 0.5]
    if evading:
        print(f"  copies made by {', '.join(evading)} mostly evade this embedder (TPR < 0.5)")
    for suspect in result.suspect_negatives:
        verb = "counted" if result.suspects_counted else "left out"
        print(f"  suspect negative ({verb}): {suspect['negative']} scores {suspect['score']:.4f} to "
              f"{suspect['entry_id']}")
    for line in result.skipped:
        print(f"  skipped {line}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def _calibrate_stages(args: argparse.Namespace, blocklist, embedder, descriptor, positives, negatives) -> int:
    """`calibrate` for a two-stage or tiled blocklist: every threshold, and TPR per stage and family."""
    from .stage_calibration import calibrate_stages

    result = calibrate_stages(blocklist, embedder, positives, negatives, descriptor, tiles=args.tiles,
                              target_fpr=args.target_fpr, recall_fpr=args.recall_fpr, copies_per_image=args.copies,
                              seed=args.seed, on_error="skip")
    chosen = dict(result.thresholds)
    if args.tiles:  # a tiled guard matches whole images at the threshold chosen beside the tile threshold
        chosen["threshold"] = chosen.pop("tiled_threshold", chosen["threshold"])
        if "tiled_descriptor_threshold" in chosen:
            chosen["descriptor_threshold"] = chosen.pop("tiled_descriptor_threshold")
    _save_with_dtype_of(blocklist.with_thresholds(**chosen), args.blocklist, args.output)
    if args.json:
        print(json.dumps({**result.to_dict(), "written": chosen, "output": args.output}, indent=2))
        return 0
    print(result.table())
    if result.proposed is not None:
        print(f"recall stage proposed {result.proposed:.1%} of the negatives to the descriptor")
    written = ", ".join(f"{name} {value:.6f}" for name, value in chosen.items())
    print(f"wrote {args.output}: {written} (for a guard {'with' if args.tiles else 'without'} tiles), target FPR "
          f"{result.target_fpr} on {result.negatives} negatives")
    for line in result.skipped:
        print(f"  skipped {line}")
    return 0


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `guardrail calibrate`."""
    from .calibration import DEFAULT_COPIES_PER_IMAGE, SUSPECT_ACTIONS

    parser.add_argument("-b", "--blocklist", required=True, metavar="FILE", help="the blocklist to calibrate")
    parser.add_argument("--negatives", required=True, nargs="+", metavar="DIR",
                        help="folders of images that are NOT in the blocklist (sets the false-positive rate)")
    parser.add_argument("--positives", nargs="+", metavar="DIR",
                        help="folders of the blocklisted images (default: the entries' source files, when they exist)")
    parser.add_argument("--target-fpr", type=float, default=0.01,
                        help="highest acceptable false-positive rate on the negatives (default 0.01)")
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES_PER_IMAGE,
                        help=f"transformed copies per image and family (default {DEFAULT_COPIES_PER_IMAGE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random transforms (default 0)")
    parser.add_argument("--suspect-negatives", choices=SUSPECT_ACTIONS, default="exclude",
                        help="negatives scoring at or above the median transformed copy are probably copies: leave "
                        "them out of the threshold (default), count them, or stop with an error")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                        help="where to write the blocklist with the chosen threshold")
    add_embedder_arguments(parser)
    add_stage_arguments(parser)
    parser.add_argument("--recall-fpr", type=float, default=0.2,
                        help="with a descriptor set: the share of negatives the first stage may propose (default 0.2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _image_files(folders: Sequence[str], flag: str) -> list[str]:
    """Every image file under `folders`, sorted; a usage error naming `flag` when a folder is missing or empty."""
    import os

    from .sources import IMAGE_EXTENSIONS

    paths = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise UsageError(f"{flag} {folder!r} is not a folder of images")
        for root, _, names in os.walk(folder):
            paths += [os.path.join(root, name) for name in sorted(names)
                      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    if not paths:
        raise UsageError(f"{flag} {', '.join(folders)} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(paths)


def _entry_source_files(blocklist) -> list[str]:
    """The entries' `source` paths that exist here: calibrate's default positives."""
    import os

    sources = [entry.get("source") for entry in blocklist.entries]
    present = [source for source in sources if isinstance(source, str) and os.path.isfile(source)]
    if not present:
        raise UsageError(
            "none of the blocklist entries' source files exist here (they are not local files, or were moved); "
            "pass the blocklisted images with --positives DIR"
        )
    return present


def _save_with_dtype_of(blocklist, original: str, output: str) -> None:
    """Save with the original file's vector dtype, so a float16 blocklist stays half the size."""
    from safetensors import safe_open

    with safe_open(original, framework="numpy") as stored:
        dtype = "float16" if stored.get_slice("embeddings").get_dtype() == "F16" else "float32"
    blocklist.save(output, dtype=dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrail", description="Stop diffusion models from returning copies of their training images."
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    demo = verbs.add_parser("demo", help="watch the guard stop a memorizing model, offline, in about a minute")
    add_demo_arguments(demo)
    demo.set_defaults(run=cmd_demo)

    build = verbs.add_parser("build", help="build a blocklist from image folders, manifests, shards or embeddings")
    build.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="folder of images, .csv/.jsonl/.parquet manifest, webdataset .tar (brace patterns too), "
                       "or clip-retrieval embedding folder")
    build.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    build.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-L-14-quickgelu")
    build.add_argument("--pretrained", required=True, help="open_clip pretrained tag (e.g. openai) or weights file")
    build.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                       help=f"match threshold stored in the blocklist (default {DEFAULT_THRESHOLD})")
    build.add_argument("--dedupe", type=float, metavar="SIM", help="collapse entries at or above this cosine")
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--workers", type=int, default=4, help="threads that read and decode images (default 4)")
    build.add_argument("--device", default="cpu")
    build.add_argument("--download", action="store_true", help="fetch URL entries of manifests")
    build.add_argument("--on-error", choices=("skip", "raise"), default="skip")
    build.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                       help="stored vector dtype; float16 halves the file and the pages re-scoring reads (cosines "
                       "move by about 1e-3; scores are computed in float32)")
    build.add_argument("--float16", action="store_true", help="the same as --dtype float16")
    build.add_argument("--index", choices=("auto", *INDEX_KINDS), default="auto",
                       help="search index; approximate ones are trained now and stored in the file, with their "
                       "search parameters (default: by size)")
    build.add_argument("--nprobe", type=_nprobe_value, metavar="N|auto",
                       help="IVF lists a query visits, stored with the index (default: auto, from the list count)")
    build.add_argument("--candidates", type=int, metavar="N",
                       help="proposals re-scored exactly per query, stored with the index (default: 32)")
    build.add_argument("--descriptor", metavar="FILE",
                       help="a copy-detection descriptor (TorchScript .pt, or .onnx), e.g. SSCD's "
                       "sscd_disc_mixup.torchscript.pt: its vectors are stored as a second set, in the same pass")
    build.add_argument("--descriptor-image-size", type=int, default=288,
                       help="the descriptor's input size (default 288: SSCD's short side; 320 with --descriptor-resize "
                       "squash)")
    build.add_argument("--descriptor-resize", choices=("shortest", "squash"), default="shortest",
                       help="resize the short side to the size (default), or the whole image to a square")
    build.add_argument("--descriptor-threshold", type=float, default=DEFAULT_DESCRIPTOR_THRESHOLD,
                       help=f"the descriptor set's threshold (default {DEFAULT_DESCRIPTOR_THRESHOLD}; calibrate it)")
    build.add_argument("--tiles", action="store_true",
                       help="also store vectors of each entry's tiles (quarters and centre) for partial copies")
    build.add_argument("--report", metavar="REPORT.json", help="write the build report (counts, skips) here")
    build.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")
    add_engine_arguments(build)
    build.add_argument("--shards", metavar="DIR", help="--engine ray: shard folder, resumed on re-run "
                       "(default: OUT.safetensors.shards)")
    build.add_argument("--actors", type=int, metavar="N",
                       help="--engine ray: embedders at once (default: one per GPU, else one per CPU)")
    build.add_argument("--shard-size", type=int, metavar="N", help="--engine ray: items per shard (default 1000)")
    build.set_defaults(run=cmd_build)

    mine = verbs.add_parser("mine", help="mine near-duplicate groups of a training set's embeddings into a blocklist")
    add_mine_arguments(mine)
    mine.set_defaults(run=cmd_mine)

    merge = verbs.add_parser("merge", help="merge blocklists built with the same embedder")
    merge.add_argument("blocklists", nargs="+", metavar="BLOCKLIST")
    merge.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    merge.add_argument("--threshold", type=float, help="threshold of the result (default: the first input's)")
    merge.add_argument("--dedupe", type=float, metavar="SIM", help="collapse entries at or above this cosine")
    merge.set_defaults(run=cmd_merge)

    info = verbs.add_parser("info", help="verify a blocklist and print what it holds")
    info.add_argument("blocklist", metavar="FILE")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)

    check = verbs.add_parser("check", help="check image files against a blocklist (exit 1 when any matches)")
    check.add_argument("-b", "--blocklist", required=True, metavar="FILE")
    check.add_argument("images", nargs="+", metavar="IMAGE")
    check.add_argument("--threshold", type=float, help="override the blocklist's threshold")
    check.add_argument("--json", action="store_true", help="print one JSON object per image")
    add_embedder_arguments(check)
    add_stage_arguments(check)
    check.set_defaults(run=cmd_check)

    calibrate = verbs.add_parser(
        "calibrate", help="choose a threshold from copies of the blocklisted images and known non-copies"
    )
    add_calibrate_arguments(calibrate)
    calibrate.set_defaults(run=cmd_calibrate)

    memorization = verbs.add_parser(
        "calibrate-memorization",
        help="calibrate a pipeline's step-1 memorization-score threshold on benign prompts (writes JSON)",
    )
    memorization.add_argument("--pipeline", required=True,
                              help="a local diffusers pipeline folder, or 'digits' for the embedded demo model")
    memorization.add_argument("--prompts", help="text file of benign prompts, one per line (default for 'digits': "
                              "its prompts that are not memorized)")
    memorization.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default: 0.01)")
    memorization.add_argument("--images-per-prompt", type=int, default=1, help="seeds per prompt (default: 1)")
    memorization.add_argument("--guidance-scale", type=float, help="as the deployment samples (default: the pipeline's)")
    memorization.add_argument("--steps", type=int, help="num_inference_steps, as the deployment samples")
    memorization.add_argument("--seed", type=int, default=0)
    memorization.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    memorization.add_argument("-o", "--output", default="memorization.json", help="where to write the threshold")
    memorization.set_defaults(run=cmd_memorization)
    return parser


def cmd_memorization(args: argparse.Namespace) -> int:
    """Calibrate a pipeline's memorization-score threshold on benign prompts and write it as JSON."""
    from .detector import calibrate_memorization

    pipe = _load_pipeline(args.pipeline, args.device)
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as lines:
                prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        except OSError as error:
            raise UsageError(f"--prompts {args.prompts}: {error}") from error
    elif args.pipeline == "digits":
        from .digits import digits_training_set

        prompts = digits_training_set().other_prompts
    else:
        raise UsageError("--prompts is required: a text file of benign prompts, one per line (hundreds, varied)")
    settings = {key: value for key, value in (("guidance_scale", args.guidance_scale),
                                                ("num_inference_steps", args.steps)) if value is not None}
    threshold = calibrate_memorization(pipe, prompts, fpr=args.fpr, images_per_prompt=args.images_per_prompt,
                                       seed=args.seed, **settings)
    threshold.save(args.output)
    print(json.dumps({**threshold.__dict__, "output": args.output}, indent=2))
    return 0


def _load_pipeline(name_or_path: str, device: str):
    """`digits` (the embedded demo model) or a local diffusers pipeline folder (never downloaded here)."""
    if name_or_path == "digits":
        from .digits import load_digits_pipeline

        return load_digits_pipeline(device=device)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"--pipeline {name_or_path!r}: not a local diffusers pipeline folder ({error})") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _interrupt_on_sigterm():
    """Make `kill` behave like Ctrl-C, so atomic writes clean up their temp files; returns the previous handler."""

    def raise_keyboard_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_keyboard_interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `guardrail` command; returns the exit code (argparse exits 2 itself on usage errors)."""
    args = build_parser().parse_args(argv)
    previous = _interrupt_on_sigterm()
    try:
        return args.run(args)
    except GuardrailError as error:
        print(f"guardrail {args.verb}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"guardrail {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
