"""The in-process response store's memory once full: RSS must stay flat as evictions make room.

Stores ``--count`` responses of a realistic size (a ~2 KB Response with one output message, ~1 KB of input
items) into a ``MemoryStore`` bounded at that many, then as many again past the bound, printing the
process's RSS after each stage and the put and get rates. Every record has bytes of its own, as records
built from separate requests do.

    python -m bench.responses_store [--count N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

from app.responses.memory_store import MemoryStore
from app.responses.store import StoredResponse
from app.settings import ResponsesSettings

_PAGE = os.sysconf("SC_PAGE_SIZE")
_ANSWER = ("The Responses API keeps a conversation's state on the server, so a follow-up names the previous "
           "response instead of resending it. ") * 12
_QUESTION = "Summarise how stored responses are kept and when they are evicted, in a few sentences. " * 10


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def _record(n: int) -> StoredResponse:
    response_id = f"resp_{n:032x}"
    response = {
        "id": response_id, "object": "response", "created_at": 1_700_000_000 + n, "status": "completed",
        "model": "gpt-4o-mini", "previous_response_id": None, "store": True, "temperature": 1.0,
        "output": [{
            "type": "message", "id": f"msg_{n:032x}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": f"{n}: {_ANSWER}", "annotations": []}],
        }],
        "usage": {"input_tokens": 180, "output_tokens": 320, "total_tokens": 500},
    }
    items = [{"type": "message", "id": f"msg_in_{n:029x}", "role": "user",
              "content": [{"type": "input_text", "text": f"{n}: {_QUESTION}"}]}]
    return StoredResponse(id=response_id, owner=f"fp-{n % 16:x}", response=json.dumps(response).encode(),
                          input_items=json.dumps(items).encode(), model="gpt-4o-mini")


async def _fill(store: MemoryStore, first: int, count: int) -> float:
    """Seconds spent in put (building the records is not counted)."""
    spent = 0.0
    for n in range(first, first + count):
        record = _record(n)
        started = time.perf_counter()
        await store.put(record)
        spent += time.perf_counter() - started
    return spent


async def _run(count: int) -> None:
    store = MemoryStore(ResponsesSettings(max_responses=count))
    sample = _record(0)
    print(f"record: response {len(sample.response)} B, input items {len(sample.input_items)} B, "
          f"size() {sample.size()} B")
    rows = [("empty", len(store), store.bytes_held, _rss_mb())]
    put_seconds = await _fill(store, 0, count)
    rows.append((f"{count:,} stored", len(store), store.bytes_held, _rss_mb()))
    put_seconds += await _fill(store, count, count)
    rows.append((f"{count:,} more", len(store), store.bytes_held, _rss_mb()))

    ids = [f"resp_{n:032x}" for n in random.Random(0).choices(range(count, 2 * count), k=count)]
    started = time.perf_counter()
    for response_id in ids:
        await store.get(response_id)
    get_seconds = time.perf_counter() - started

    print(f"\n{'stage':<16} {'kept':>8} {'held MB':>9} {'RSS MB':>8}")
    for stage, kept, held, rss in rows:
        print(f"{stage:<16} {kept:>8,} {held / 2**20:>9.1f} {rss:>8.1f}")
    print(f"\nevicted {store.evicted:,}; RSS growth past the bound: {rows[2][3] - rows[1][3]:+.1f} MB")
    print(f"put {2 * count / put_seconds:,.0f} ops/s, get {count / get_seconds:,.0f} ops/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="the bound, and responses stored per stage")
    args = parser.parse_args(argv)
    asyncio.run(_run(args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
