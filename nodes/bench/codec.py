"""CacheCard codec speed and size: encode/decode time against a plain fp16 copy of the same KV.

``run_codec_bench`` encodes and decodes each snapshot at each uniform width and reports, per row, the card
size, the honest ratio ``fp16_bytes / len(card)`` (header, metadata, scales and padding included) and the
median over ``reps`` of encode, decode and ``memcpy`` (``clone`` of the same K/V held as fp16 tensors,
one per layer and tensor, timed in the same loop so that the three numbers share the machine's load).
``synthetic_snapshot`` makes SmolLM2-135M-shaped KV so the bench runs without the model.

    python -m nodes.bench.codec --tokens 1024 4096 --json out/codec.json [--threads 1]

On a machine shared with other busy processes, intra-op threads that wait on a descheduled sibling can make
every op many times slower (seen here with 2 threads on 2 shared cores); compare rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nodes.bench.table import format_table, write_json
from qkv import CardMeta, EncodingPlan, KVSnapshot, ModelFingerprint, decode_card, encode_card

COLUMNS = (
    "tokens",
    "bits",
    "card_bytes",
    "fp16_bytes",
    "ratio",
    "encode_s",
    "decode_s",
    "memcpy_s",
    "encode_vs_memcpy",
    "decode_vs_memcpy",
)
OUTLIER_CHANNELS = 4  # per head: keys of RoPE models carry a few large-magnitude channels (KIVI, KVQuant)


def synthetic_snapshot(
    tokens: int, *, layers: int = 30, kv_heads: int = 3, head_dim: int = 64, seed: int = 0
) -> KVSnapshot:
    """fp32 KV shaped like SmolLM2-135M's: keys with per-channel scales and offsets and a few outlier
    channels per head, values roughly unit-scale with per-token spread. Deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    keys: list[torch.Tensor | None] = []
    values: list[torch.Tensor | None] = []
    for _ in range(layers):
        channel_scale = 0.5 + torch.rand(kv_heads, 1, head_dim, generator=generator)
        channel_offset = 0.5 * torch.randn(kv_heads, 1, head_dim, generator=generator)
        outliers = torch.randint(0, head_dim, (kv_heads, OUTLIER_CHANNELS), generator=generator)
        boost = torch.ones(kv_heads, 1, head_dim)
        boost.scatter_(
            2,
            outliers.unsqueeze(1),
            8.0 + 8.0 * torch.rand(kv_heads, 1, OUTLIER_CHANNELS, generator=generator),
        )
        key = torch.randn(kv_heads, tokens, head_dim, generator=generator)
        keys.append(key.mul_(channel_scale * boost).add_(channel_offset * boost))
        token_scale = 0.3 + 0.4 * torch.rand(kv_heads, tokens, 1, generator=generator)
        values.append(torch.randn(kv_heads, tokens, head_dim, generator=generator).mul_(token_scale))
    fingerprint = ModelFingerprint(
        architecture="LlamaForCausalLM",
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=100000.0,
    )
    return KVSnapshot(
        keys=tuple(keys),
        values=tuple(values),
        positions=torch.arange(tokens, dtype=torch.int64),
        fingerprint=fingerprint,
    )


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _bench_row(
    tokens: int, snapshot: KVSnapshot, bits: int, *, reps: int, group_size: int, decode_dtype: torch.dtype
) -> dict[str, Any]:
    fp16 = [t.to(torch.float16) for t in (*snapshot.keys, *snapshot.values) if t is not None]
    plan = EncodingPlan.uniform(snapshot.num_layers, bits, group_size=group_size)
    meta = CardMeta(created=0.0)
    data = encode_card(snapshot, plan, meta=meta)  # warm-up: first calls pay for allocator growth
    decode_card(data, dtype=decode_dtype)
    encode_times, decode_times, copy_times = [], [], []
    for _ in range(reps):
        copy_times.append(_timed(lambda: [t.clone() for t in fp16]))
        encode_times.append(_timed(lambda: encode_card(snapshot, plan, meta=meta)))
        decode_times.append(_timed(lambda: decode_card(data, dtype=decode_dtype)))
    encode_s = statistics.median(encode_times)
    decode_s = statistics.median(decode_times)
    memcpy_s = statistics.median(copy_times)
    fp16_bytes = snapshot.fp16_bytes()
    return {
        "tokens": tokens,
        "bits": bits,
        "card_bytes": len(data),
        "fp16_bytes": fp16_bytes,
        "ratio": fp16_bytes / len(data),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "memcpy_s": memcpy_s,
        "encode_vs_memcpy": memcpy_s / encode_s,
        "decode_vs_memcpy": memcpy_s / decode_s,
        "group_size": group_size,
        "decode_dtype": str(decode_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "reps": reps,
    }


def run_codec_bench(
    snapshots: dict[int, KVSnapshot],
    bits: Sequence[int] = (8, 4, 3, 2),
    json_out: Path | None = None,
    *,
    reps: int = 7,
    group_size: int = 32,
    decode_dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """Encode/decode every snapshot (keyed by its token count) at every uniform width; print and return rows.

    ``*_vs_memcpy`` is memcpy time / codec time: 1.0 means as fast as copying the fp16 KV.
    """
    rows = [
        _bench_row(tokens, snapshot, width, reps=reps, group_size=group_size, decode_dtype=decode_dtype)
        for tokens, snapshot in snapshots.items()
        for width in bits
    ]
    print(format_table(rows, COLUMNS))
    write_json(rows, json_out)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as is)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    snapshots = {tokens: synthetic_snapshot(tokens) for tokens in args.tokens}
    run_codec_bench(snapshots, args.bits, args.json, reps=args.reps, group_size=args.group_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
