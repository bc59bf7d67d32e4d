"""The ``edgebus`` command line.

Heavy imports (torch, transformers, zmq) happen inside each subcommand so that ``edgebus --help`` and the
runtime-only commands start fast. Every error a user can cause ends in one line on stderr and exit code 2;
a traceback means a bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgebus import BusKeys
    from nodes.roles_client import Target

EXIT_USER_ERROR = 2

Handler = Callable[[argparse.Namespace], int]


def _models_pull(args: argparse.Namespace) -> int:
    from qkv import pull_model

    path = pull_model(args.name, home=args.home, progress=not args.quiet)
    print(f"{args.name}: stored at {path}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from qkv import list_models

    rows = list_models(home=args.home)
    print(f"{'name':<28} {'pulled':<7} {'size':>10}  path")
    for row in rows:
        size = f"{row.size_bytes / 1e6:.1f} MB" if row.pulled else "-"
        print(f"{row.name:<28} {'yes' if row.pulled else 'no':<7} {size:>10}  {row.path}")
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from edgebus import new_hmac_key, new_keypair

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = new_keypair(args.name, directory)
    print(f"public key: {public}\nsecret key: {secret}")
    if args.hmac:
        print(f"hmac key:   {new_hmac_key(directory / 'hmac.key')}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from nodes.demo import run_demo

    return run_demo(
        model=args.model,
        bits=args.bits,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        plot=args.plot,
        processes=not args.in_process,
    )


def _calibrate(args: argparse.Namespace) -> int:
    if args.sender or args.receiver:
        return _calibrate_pair(args)
    from nodes.bench.calibrate_cli import run_calibrate

    run_calibrate(
        args.model,
        Path(args.data),
        rows=args.rows or 16,
        offset=args.offset,
        out=args.out,
        group_size=args.group_size,
        rotation=args.rotation,
        fp16_sinks=args.fp16_sinks,
    )
    return 0


def _calibrate_pair(args: argparse.Namespace) -> int:
    """Fit the linear KV translation from ``--sender``'s caches to ``--receiver``'s and save the artifact."""
    from nodes.bench.crossmodel import calibration_summary, calibration_texts, fit_or_load_calibration
    from qkv import load_model, models_dir

    if not (args.sender and args.receiver):
        print("edgebus calibrate: --sender and --receiver go together", file=sys.stderr)
        return EXIT_USER_ERROR
    sender, receiver = load_model(args.sender), load_model(args.receiver)
    texts = calibration_texts(Path(args.data), rows=args.rows or 64, offset=args.offset)
    out = args.out or models_dir().parent / "calibrations" / f"{args.sender}--{args.receiver}.safetensors"
    calibration = fit_or_load_calibration(sender, receiver, texts, path=out)
    print(json.dumps(calibration_summary(calibration), indent=1, default=str))
    print(f"calibration {calibration.id}: {out}")
    return 0


def _bench_codec(args: argparse.Namespace) -> int:
    from nodes.bench.codec_model import run_model_codec_bench

    tokens = tuple(int(t) for t in args.tokens.split(","))
    run_model_codec_bench(model=args.model, tokens=tokens, json_out=args.json)
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    from nodes.bench.quality import QualityBenchConfig, run_quality_bench

    if args.sender or args.receiver:
        return _bench_crossmodel(args)

    config = QualityBenchConfig(
        data=Path(args.data),
        limit=args.limit,
        offset=args.offset,
        model=args.model,
        conditions=tuple(args.conditions.split(",")) if args.conditions else None,
        max_new_tokens=args.max_new_tokens,
        kl=args.kl,
        json_out=args.json,
        plot=args.plot,
        profile=args.profile,
    )
    run_quality_bench(config)
    return 0


def _bench_quality_merge(args: argparse.Namespace) -> int:
    from nodes.bench.plots import rate_quality_plot
    from nodes.bench.quality_results import COLUMNS, merge_results
    from nodes.bench.table import format_table, write_json

    summary = merge_results(args.inputs, dataset=args.dataset)
    print(format_table(summary, COLUMNS))
    write_json(summary, args.json)
    if args.plot is not None:
        title = f"{summary[0]['dataset']}: quality vs size ({len(args.inputs)} runs merged)"
        rate_quality_plot(summary, title=title, out=args.plot)
    return 0


def _bench_bus(args: argparse.Namespace) -> int:
    from nodes.bench.bus import run_bus_bench

    run_bus_bench(json_out=args.json, card_mib=args.card_mib)
    return 0


def _bench_handoff(args: argparse.Namespace) -> int:
    from nodes.bench.handoff import HandoffBenchConfig, run_handoff_bench

    config = HandoffBenchConfig(
        model=args.model,
        bits=args.bits,
        group_size=args.group_size,
        condition=args.condition,
        tokens=tuple(int(t) for t in args.tokens.split(",")),
        conditions=tuple(args.conditions.split(",")),
        split=args.split,
    )
    run_handoff_bench(args.json, args.plot, config=config)
    return 0


def _bench_crossmodel(args: argparse.Namespace) -> int:
    """``bench quality --sender A --receiver B``: cards of A read by B through a fitted KV map."""
    from nodes.bench.crossmodel import run_from_args

    if not (args.sender and args.receiver) or args.sender == args.receiver:
        print("edgebus bench quality: --sender and --receiver name two different models", file=sys.stderr)
        return 2
    one_model = [flag for flag, given in (("--conditions", args.conditions), ("--kl", args.kl),
                 ("--profile", args.profile)) if given]  # fmt: skip
    if one_model:
        print(f"edgebus bench quality: {', '.join(one_model)} are for one model", file=sys.stderr)
        return 2
    run_from_args(args)
    return 0


def _policy_table(args: argparse.Namespace) -> int:
    """Generate the budget policy's rate-quality table from quality-benchmark results."""
    from nodes.bench.rate_quality import build_table, model_kv_bytes_per_token, shipped_table_path
    from nodes.bench.table import format_table

    kv = args.kv_bytes_per_token or model_kv_bytes_per_token(args.model)
    table, pruned = build_table(args.results, model=args.model, kv_bytes_per_token=kv)
    out = args.out or shipped_table_path(args.model)
    table.save(out)
    columns = (
        "representation", "condition", "bits", "keep", "layers", "bytes_per_token", "quality", "rotated",
    )  # fmt: skip
    print(format_table([dataclasses.asdict(p) for p in table.points], columns))
    for point in pruned:
        print(f"pruned (another is no bigger, no slower to decode and at least as good): {point.condition}")
    print(f"{len(table.points)} points, quality = {table.metric}, from {table.source}\nwritten: {out}")
    return 0


def _bench_policy(args: argparse.Namespace) -> int:
    from nodes.bench.policy import ALTERNATIVES, PolicyBenchConfig, run_policy_bench

    alternatives = tuple(args.alternatives.split(",")) if args.alternatives else tuple(ALTERNATIVES)
    unknown = sorted(set(alternatives) - set(ALTERNATIVES))
    if unknown:
        print(f"edgebus bench policy: unknown alternative {unknown[0]!r}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.repeats < 1:
        print("edgebus bench policy: --repeats must be at least 1", file=sys.stderr)
        return EXIT_USER_ERROR
    config = PolicyBenchConfig(
        model=args.model,
        links_mbit=tuple(float(x) for x in args.links.split(",")),
        tokens=tuple(int(t) for t in args.tokens.split(",")),
        alternatives=alternatives,
        cap_s=args.cap,
        repeats=args.repeats,
        repeat_below_s=args.repeat_below,
        quality_floor=args.quality_floor,
    )
    run_policy_bench(args.json, args.plot, config=config)
    return 0


def _node(args: argparse.Namespace) -> int:
    import logging

    from nodes.agent import run_node
    from nodes.config import load_node_config

    config = load_node_config(args.config)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run_node(config, events=args.events)


def _client_targets(args: argparse.Namespace) -> tuple[list[Target], BusKeys | None]:
    """(targets, keys) from --to/--server-key/--config/--insecure; see ``edgebus ask --help``."""
    from edgebus import BusKeys, load_keypair, load_public_key
    from nodes._errors import NodeError
    from nodes.config import load_node_config
    from nodes.roles_client import Target

    cfg = load_node_config(args.config) if args.config else None
    keys = None
    if cfg is not None and cfg.keys is not None:
        keys = BusKeys.from_files(cfg.keys.secret, cfg.keys.allowed, cfg.keys.hmac)
    elif not args.insecure:
        raise NodeError(
            "no keys: pass --config NODE.toml (its [keys] are used) or --insecure (loopback only)"
        )
    endpoints: list[str] = list(args.to or [])
    if not endpoints and cfg is not None and cfg.bus.bind:
        # The node this config describes, reached over loopback when it binds every interface.
        endpoints = [cfg.bus.bind.replace("//0.0.0.0:", "//127.0.0.1:").replace("//*:", "//127.0.0.1:")]
    if not endpoints:
        raise NodeError("no node to talk to: pass --to tcp://HOST:PORT (or --config of a node that binds)")
    targets = []
    for endpoint in endpoints:
        server_key = None
        if keys is not None:
            if args.server_key:
                server_key = load_public_key(args.server_key)
            elif cfg is not None:
                peer = next((p for p in cfg.bus.peers if p.endpoint == endpoint), None)
                if peer is not None and peer.public_key is not None:
                    server_key = load_public_key(peer.public_key)
                elif cfg.keys is not None:
                    server_key = load_keypair(cfg.keys.secret)[0]  # the config's own node
        targets.append(Target(endpoint=endpoint, server_key=server_key))
    return targets, keys


def _send(args: argparse.Namespace) -> int:
    import asyncio

    from nodes._errors import NodeError
    from nodes.roles_client import connect

    path = Path(args.file)
    try:
        text = sys.stdin.read() if args.file == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeError(f"{args.file}: cannot read: {exc}") from exc
    targets, keys = _client_targets(args)

    body: dict[str, Any] = {"op": "read", "text": text, "topic": args.topic}
    if args.representation:
        body["representation"] = args.representation
        if args.bits is not None:
            body["budget"] = {"bits": args.bits}
        if args.head_tokens is not None:
            body["head_tokens"] = args.head_tokens

    async def go() -> dict[str, Any]:
        async with connect(targets, keys=keys) as client:
            return await client.request(client.node, body, timeout_s=args.timeout)

    reply = asyncio.run(go())
    rep = reply.get("representation", "card")
    what = (
        f"text, {reply.get('text_bytes')} bytes"
        if rep == "text"
        else f"{reply['card_bytes']} bytes at {reply['bits']} bits (fp16 KV {reply['fp16_bytes']} bytes)"
        + (f", head of {reply['head_tokens']} tokens sent ahead" if rep == "split" else "")
    )
    print(f"{rep} {reply['card']} on {reply['topic']}: {reply['context_tokens']} tokens, {what}")
    for receiver, decision in (reply.get("decisions") or {}).items():
        print(f"  for {receiver}: {decision.get('reason')}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    import asyncio

    from nodes.roles_client import connect

    targets, keys = _client_targets(args)
    payload: dict[str, Any] = {"op": "ask", "card": args.card, "question": args.question, "wait_s": args.wait}
    if args.max_new_tokens is not None:
        payload["max_new_tokens"] = args.max_new_tokens

    async def go() -> dict[str, Any]:
        async with connect(targets, keys=keys) as client:
            return await client.request(client.node, payload, timeout_s=args.timeout + args.wait)

    r = asyncio.run(go())
    print(r["answer"])
    rep = r.get("representation", "card")
    source = (
        f"re-read text of {r.get('text_bytes')} bytes"
        if rep == "text"
        else f"a {r['bits']}-bit {rep} card: {r['card_bytes']} bytes, {r['card_tokens']} tokens "
        f"(fp16 KV {r['fp16_bytes']} bytes)"
    )
    print(f"  [{r['node']}] TTFT {float(r['ttft_s']):.3f} s from {source}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from nodes.roles_client import connect, format_status

    targets, keys = _client_targets(args)

    async def go() -> list[dict[str, Any]]:
        async with connect(targets, keys=keys) as client:
            return [await client.request(n, {"op": "status"}, timeout_s=args.timeout) for n in client.nodes]

    for report in asyncio.run(go()):
        print(format_status(report))
    return 0


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", action="append", metavar="ENDPOINT", help="node control endpoint tcp://HOST:PORT")
    p.add_argument("--config", type=Path, help="node config whose [keys] (and peers' keys) to use")
    p.add_argument("--server-key", type=Path, help="the node's CURVE public key file")
    p.add_argument("--insecure", action="store_true", help="no CURVE (the nodes must run insecure too)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the reply")


def _is_user_error(exc: BaseException) -> bool:
    """True for the packages' own error trees.

    Looked up in ``sys.modules`` rather than imported: if qkv was never imported, its errors cannot have been
    raised, and importing it would cost a torch import on every command.
    """
    trees = (("qkv._errors", "QkvError"), ("edgebus._errors", "BusError"), ("nodes", "NodeError"))
    for module, name in trees:
        base = getattr(sys.modules.get(module), name, None)
        if isinstance(base, type) and isinstance(exc, base):
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgebus", description="Hand LLM KV caches between edge agents as compressed CacheCards."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the local model store").add_subparsers(
        dest="action", required=True
    )
    pull = models.add_parser("pull", help="convert a catalogue model into the local store")
    pull.add_argument("name")
    pull.add_argument("--home", type=Path, default=None, help="store root (default $EDGEBUS_HOME)")
    pull.add_argument("--quiet", action="store_true")
    pull.set_defaults(handler=_models_pull)
    lst = models.add_parser("list", help="catalogue and stored models")
    lst.add_argument("--home", type=Path, default=None)
    lst.set_defaults(handler=_models_list)

    keys = sub.add_parser("keys", help="CurveZMQ key pairs").add_subparsers(dest="action", required=True)
    new = keys.add_parser("new", help="make a key pair NAME.key / NAME.key_secret")
    new.add_argument("name")
    new.add_argument("--dir", default=".", help="directory for the key files")
    new.add_argument("--hmac", action="store_true", help="also make the fleet's shared hmac.key there")
    new.set_defaults(handler=_keys_new)

    demo = sub.add_parser("demo", help="hand real contexts from a reader to an answerer and compare")
    demo.add_argument("--model", default="smollm2-135m-instruct")
    demo.add_argument("--bits", type=int, default=4)
    demo.add_argument("--limit", type=int, default=4, help="number of bundled contexts to hand off")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--plot", type=Path, default=Path("out/demo_ttft.png"))
    demo.add_argument("--in-process", action="store_true", help="hand off inside one process (no bus)")
    demo.set_defaults(handler=_demo)

    node = sub.add_parser("node", help="run an agent node (reader, answerer, relay) from a config")
    node.add_argument("--config", type=Path, required=True)
    node.add_argument("--events", action="store_true", help="JSON-lines events on stdout")
    node.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    node.set_defaults(handler=_node)

    send = sub.add_parser("send", help="have a reader node prefill a document and publish its card")
    send.add_argument("file", help="text file, or - for stdin")
    send.add_argument("--topic", required=True)
    send.add_argument(
        "--representation", choices=("text", "card", "split"), default=None, help="override the policy"
    )
    send.add_argument("--bits", type=int, default=None, help="with --representation card or split")
    send.add_argument("--head-tokens", type=int, default=None, help="with --representation split")
    _add_client_options(send)
    send.set_defaults(handler=_send)

    ask = sub.add_parser("ask", help="ask an answerer node a question about a card it holds")
    ask.add_argument("question")
    ask.add_argument("--card", required=True)
    ask.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the card to arrive")
    ask.add_argument("--max-new-tokens", type=int, default=None)
    _add_client_options(ask)
    ask.set_defaults(handler=_ask)

    status = sub.add_parser("status", help="live nodes, links, memory and budgets as nodes see them")
    _add_client_options(status)
    status.set_defaults(handler=_status)

    calib = sub.add_parser(
        "calibrate",
        help="profile a model's per-layer quantization sensitivity, or fit a cross-model KV translation",
    )
    calib.add_argument("--model", default="smollm2-135m-instruct", help="model to profile")
    calib.add_argument("--sender", default=None, help="cross-model: the model whose cards are translated")
    calib.add_argument("--receiver", default=None, help="cross-model: the model that reads them")
    calib.add_argument("--data", required=True, help="QA JSONL; rows disjoint from benchmark rows are used")
    calib.add_argument("--rows", type=int, default=None, help="calibration items")
    calib.add_argument("--offset", type=int, default=600, help="first row (benchmarks use 0..199)")
    calib.add_argument("--group-size", type=int, default=32)
    calib.add_argument(
        "--rotation",
        choices=("none", "hadamard", "hadamard-prerope"),
        default="none",
        help="card coding the profile is for (see qkv._rotation)",
    )
    calib.add_argument("--fp16-sinks", type=int, default=0, help="leading tokens the cards keep in fp16")
    calib.add_argument("--out", type=Path, default=None, help="output file (default: the store's profiles/)")
    calib.set_defaults(handler=_calibrate)

    policy = sub.add_parser("policy", help="the budget policy's inputs").add_subparsers(
        dest="action", required=True
    )
    table = policy.add_parser("table", help="rate-quality table from `edgebus bench quality --kl` results")
    table.add_argument(
        "--from", dest="results", type=Path, action="append", required=True, help="a quality bench JSON"
    )
    table.add_argument("--model", default="smollm2-135m-instruct")
    table.add_argument("--kv-bytes-per-token", type=int, default=None, help="default: from the model config")
    table.add_argument("--out", type=Path, default=None, help="default: qkv/profiles/<model>-rq.json")
    table.set_defaults(handler=_policy_table)

    bench = sub.add_parser("bench", help="benchmarks that print tables").add_subparsers(
        dest="action", required=True
    )
    codec = bench.add_parser("codec", help="encode/decode speed and size on real SmolLM2 caches")
    codec.add_argument("--model", default="smollm2-135m-instruct")
    codec.add_argument("--tokens", default="1024,4096")
    codec.add_argument("--json", type=Path, default=None)
    codec.set_defaults(handler=_bench_codec)
    quality = bench.add_parser("quality", help="answer quality per compression condition on a QA set")
    quality.add_argument("--data", required=True)
    quality.add_argument("--limit", type=int, default=200)
    quality.add_argument("--offset", type=int, default=0, help="first row (to continue a stopped run)")
    quality.add_argument("--model", default="smollm2-135m-instruct")
    quality.add_argument("--conditions", default=None, help="comma-separated subset of conditions")
    quality.add_argument("--max-new-tokens", type=int, default=24)
    quality.add_argument("--kl", action="store_true", help="also teacher-forced KL vs the text condition")
    quality.add_argument("--profile", type=Path, default=None, help="sensitivity profile for adaptive-b")
    cross = quality.add_argument_group("cross-model (cards of --sender read by --receiver)")
    cross.add_argument("--sender", default=None, help="the model that makes the cards")
    cross.add_argument("--receiver", default=None, help="the model that reads them")
    from nodes.bench.crossmodel_args import add_pair_arguments

    add_pair_arguments(cross)
    quality.add_argument("--json", type=Path, default=None)
    quality.add_argument("--plot", type=Path, default=None)
    quality.set_defaults(handler=_bench_quality)
    merge = bench.add_parser(
        "quality-merge", help="one table from quality runs on the same rows (shards, added conditions)"
    )
    merge.add_argument("inputs", type=Path, nargs="+", help="summary .json and per-row .rows.jsonl files")
    merge.add_argument("--dataset", default=None, help="dataset name, if only per-row files are given")
    merge.add_argument("--json", type=Path, default=None)
    merge.add_argument("--plot", type=Path, default=None)
    merge.set_defaults(handler=_bench_quality_merge)
    bus = bench.add_parser("bus", help="bus throughput and latency vs raw pyzmq")
    bus.add_argument("--json", type=Path, default=None)
    bus.add_argument("--card-mib", type=int, default=64)
    bus.set_defaults(handler=_bench_bus)
    handoff = bench.add_parser("handoff", help="receiver TTFT from a card vs re-prefill, over real links")
    handoff.add_argument("--model", default="smollm2-135m-instruct")
    handoff.add_argument("--bits", type=int, default=4)
    handoff.add_argument("--group-size", type=int, default=32, help="values per quantization group")
    handoff.add_argument("--condition", default=None, help="card budget as a quality condition (adaptive-3)")
    handoff.add_argument("--tokens", default="1024,2048,4096")
    handoff.add_argument("--conditions", default="loopback,100mbit,20mbit")
    handoff.add_argument(
        "--split", action=argparse.BooleanOptionalAction, default=True, help="also a split hand-off"
    )
    handoff.add_argument("--json", type=Path, default=None)
    handoff.add_argument("--plot", type=Path, default=Path("out/handoff_ttft.png"))
    handoff.set_defaults(handler=_bench_handoff)
    bpolicy = bench.add_parser("policy", help="the budget policy's choice vs fixed alternatives, per link")
    bpolicy.add_argument("--model", default="smollm2-135m-instruct")
    bpolicy.add_argument("--links", default="1,10,100,1000", help="link rates in Mbit/s (tc tbf, netns)")
    bpolicy.add_argument("--tokens", default="1024,4096")
    bpolicy.add_argument("--alternatives", default=None, help="comma-separated subset (default: all)")
    bpolicy.add_argument("--cap", type=float, default=75.0, help="seconds per alternative before '> cap'")
    bpolicy.add_argument("--repeats", type=int, default=3, help="interleaved rounds per context")
    bpolicy.add_argument(
        "--repeat-below", type=float, default=10.0, help="repeat only runs whose first TTFT is under this (s)"
    )
    bpolicy.add_argument("--quality-floor", type=float, default=0.9)
    bpolicy.add_argument("--json", type=Path, default=None)
    bpolicy.add_argument("--plot", type=Path, default=None, help="PNG; one per context size (_1024, _4096)")
    bpolicy.set_defaults(handler=_bench_policy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"edgebus: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
