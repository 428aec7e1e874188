"""``clipfold index`` and ``clipfold search``: embedding a folder, and searching it by text or image."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipfold.cli import options as o
from clipfold.errors import ConfigError

INDEX = "clipfold.runtime.retrieval.index"


def _build(args: argparse.Namespace):
    from clipfold import Engine, build_index

    def progress(message: str) -> None:
        print(message, file=sys.stderr)

    if args.ray:
        from clipfold.runtime.retrieval.ray_index import build_index_ray

        return build_index_ray(args.bundle, args.folder, args.out, storage=args.storage, address=args.address,
                               actors=args.actors, threads_per_actor=args.threads or 1, progress=progress,
                               strict=args.strict)
    if args.address is not None:
        raise ConfigError("--address joins a Ray cluster: it needs --ray")
    engine = Engine.open(args.bundle, threads=args.threads)
    return build_index(engine, args.folder, args.out, storage=args.storage, progress=progress, strict=args.strict)


def cmd_index(args: argparse.Namespace) -> int:
    index = _build(args)
    print(f"{args.out}: {len(index):,} images, {index.meta['storage']}, built with {index.meta['bundle']['model']}")
    failed = index.failed
    if failed:  # the rest is indexed; exit 1 says some images were not
        print(f"{len(failed):,} image(s) could not be indexed (recorded in {args.out / 'index.json'}; the next run "
              "tries them again):", file=sys.stderr)
        for rel, reason in sorted(failed.items()):
            print(f"  {rel}: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from clipfold import Engine, Index, ShardedIndex

    index = Index.open(args.index[0]) if len(args.index) == 1 else ShardedIndex.open(args.index)
    engine = Engine.open(args.bundle or index.meta["bundle_path"], threads=args.threads)
    result = index.search(engine, text=args.text, image=args.image, k=args.top_k)
    if args.json:
        print(json.dumps({"hits": [{"path": h.path, "score": h.score, **({"index": h.index} if h.index else {})}
                                   for h in result.hits],
                          "query_truncated": result.query_truncated}, indent=2))
        return 0
    if result.query_truncated:
        print("note: the text query was longer than the model's context and was cut", file=sys.stderr)
    for hit in result.hits:
        print(f"  {hit.score:8.4f}  {hit.path}" + (f"  ({hit.index})" if hit.index else ""))
    return 0


def register(sub) -> None:
    p = o.command(sub, "index", "embed a folder of images into a searchable index (resumable)", [
        "clipfold index pets.bundle photos/ --out photos.index",
        "clipfold index pets.bundle photos/ --out photos.index --storage int8 --ray --actors 4",
    ], cmd_index)
    p.add_argument("bundle", type=Path, help="the bundle that embeds the images")
    p.add_argument("folder", type=Path, help="images to index (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="index folder (a re-run adds new or changed images)")
    p.add_argument("--storage", default=o.default(f"{INDEX}:build_index", "storage"), choices=("fp32", "fp16", "int8"),
                   help="embedding storage")
    o.add_threads(p, "ONNX Runtime threads (with --ray: per actor, default 1)")
    p.add_argument("--ray", action="store_true", help="embed with Ray Data: a pool of Engine actors (local Ray "
                   "instance unless --address)")
    p.add_argument("--address", default=None, help="with --ray: the cluster to join ('auto', 'ray://host:10001')")
    p.add_argument("--actors", type=int, default=o.default("clipfold.runtime.retrieval.ray_index:build_index_ray",
                   "actors"), metavar="N", help="with --ray: Engine actors")
    p.add_argument("--strict", action="store_true", help="stop at the first image that cannot be read (default: "
                   "index the rest, record it, exit 1, try it again next run)")

    p = o.command(sub, "search", "search an index by text (bundle compiled with --text) or by image", [
        "clipfold search photos.index --text \"a dog on a beach\" --top-k 5",
        "clipfold search part1.index part2.index --image query.jpg --json",
    ], cmd_search)
    p.add_argument("index", type=Path, nargs="+", help="one index, or several of the same bundle searched as one")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", default=None, help="a text query (the bundle needs its text tower)")
    query.add_argument("--image", type=Path, default=None, help="an image query")
    o.add_top_k(p, o.default(f"{INDEX}:Index.search", "k"), "hits to return", old="--k")
    p.add_argument("--bundle", type=Path, default=None, help="the bundle that embeds the query (default: the bundle "
                   "the index was built with)")
    o.add_threads(p)
    o.add_json(p)
