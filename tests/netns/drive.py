"""Control-request driver run inside a namespace: ``python -m tests.netns.drive SPEC.json``.

SPEC: ``{"keys": DIR, "targets": {name: [endpoint, public_key_file]}, "requests": [[name, payload], ...]}``.
Prints one JSON line per reply (``{"ok": reply}`` or ``{"error": message}``), in order.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from edgebus import BusKeys, load_public_key
from nodes._errors import NodeError
from nodes.roles_client import Target, connect


async def drive(spec: dict[str, Any]) -> None:
    keys = Path(spec["keys"])
    client_keys = BusKeys.from_files(keys / "client.key_secret", keys / "allowed", keys / "hmac.key")
    names = list(spec["targets"])
    targets = [
        Target(endpoint=spec["targets"][n][0], server_key=load_public_key(spec["targets"][n][1]))
        for n in names
    ]
    async with connect(targets, keys=client_keys, timeout_s=60) as client:
        for node, payload in spec["requests"]:
            try:
                reply = await client.request(node, payload, timeout_s=300)
                print(json.dumps({"ok": reply}), flush=True)
            except NodeError as exc:
                print(json.dumps({"error": str(exc)}), flush=True)


if __name__ == "__main__":
    asyncio.run(drive(json.loads(Path(sys.argv[1]).read_text())))
