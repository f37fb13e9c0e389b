"""Make one shard of a u16 trajectory folder again, with the engine, dtype, batch size and prompts its manifest
records, in a temporary folder, and compare it with the committed one byte for byte (sha256 of the file, and of
its payload: the token ids whatever liblzma compressed them). Prints same/different and the machines of both runs
(CPU, kernel flags, dtype, threads, torch); exit status 0 when the bytes are the same, 1 when they differ.

    python scripts/pool_verify.py pools/smollm2-135m-instruct/B/gsm8k_b [shard_00000.u16.xz] [--threads N] [--record]

--record appends the outcome to FOLDER/verified.json (shard, same or not, both machines, seconds, UTC date), which
the pool cards (scripts/pool_card.py) list.

Expect the same bytes on the same kind of CPU (same kernel flags) with the same torch build: bf16 kernels round
differently across instruction sets, block shapes and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from draftopd.data.trajectories import regenerate_shard  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("shard", nargs="?", help="shard file name (default: the smallest recorded shard)")
    ap.add_argument("--threads", type=int, help="torch threads (default: as the manifest's config)")
    ap.add_argument("--json", help="also write the comparison to this file")
    ap.add_argument("--record", action="store_true", help="append the outcome to FOLDER/verified.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[pool_verify] %(message)s")
    shards = json.loads((Path(args.folder) / "manifest.json").read_text())["shards"]
    name = args.shard or min(shards, key=lambda n: (shards[n]["response_tokens"], n))
    with tempfile.TemporaryDirectory() as tmp:
        res = regenerate_shard(args.folder, name, tmp, args.threads)
    rec, again = res["recorded"], res["again"]
    print(f"{args.folder}/{name}: {'SAME' if res['same'] else 'DIFFERENT'} bytes", end="")
    print(f" (payload {'same' if res['same_payload'] else 'different'})")
    print(f"  recorded  sha256 {rec['sha256']}  {rec['response_tokens']} response tokens")
    print(f"  again     sha256 {again['sha256']}  {again['response_tokens']} response tokens, {again['seconds']} s")
    for who in ("recorded_machine", "this_machine"):
        m = res[who] or {}
        flags = " ".join(f for f in m.get("cpu_flags", []) if "512" in f or "amx" in f) or "-"
        print(f"  {who}: {m.get('cpu')} | {m.get('dtype')} | {m.get('threads')} threads | torch {m.get('torch')}")
        print(f"    avx512/amx flags: {flags}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    if args.record:
        path = Path(args.folder) / "verified.json"
        done = json.loads(path.read_text()) if path.is_file() else []
        keep = ("cpu", "cpu_flags", "dtype", "threads", "torch", "transformers", "batch_size", "engine")
        done.append(
            {
                "shard": name,
                "same": res["same"],
                "same_payload": res["same_payload"],
                "sha256": again["sha256"],
                "seconds": again["seconds"],
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ"),
                "recorded_machine": {k: (res["recorded_machine"] or {}).get(k) for k in keep},
                "this_machine": {k: res["this_machine"].get(k) for k in keep},
            }
        )
        path.write_text(json.dumps(done, indent=2, sort_keys=True) + "\n")
    return 0 if res["same"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
