"""Greedy decoding of token-id prompts in llama.cpp's server core (xllamacpp), plain or with a drafter; prints JSON.

Run with the llama.cpp side virtualenv (``bash scripts/gguf_env.sh`` makes it); tests/test_llamacpp.py and
scripts/llamacpp_bench.py drive it:

    .venv-gguf/bin/python scripts/llamacpp_serve.py --target target.gguf --prompts prompts.json --max-new-tokens 64 \
        [--drafter draft.gguf --spec-type draft-eagle3 --n-max 5] [--threads 2]

``prompts.json`` is a list of token-id lists (already chat-templated). Each prompt is one request to llama.cpp's
native ``/completion`` endpoint (the server xllamacpp starts on 127.0.0.1), greedy (temperature 0), no prompt cache,
one slot: batch 1. ``--spec-type`` is any ``llama-server --spec-type`` (``draft-eagle3``, ``draft-dflash``,
``ngram-simple``, ...); ``--n-max``/``--n-min``/``--p-min`` are ``--spec-draft-n-max``/``-n-min``/``-p-min`` (p-min 0:
every drafted token is verified, as ``draftopd bench`` with ``confidence 0`` does). The JSON printed on the last line
has ``tokens`` (new token ids per prompt, the stop token included), ``per_prompt`` ([drafted, accepted, generated,
generation ms] per prompt, from llama.cpp's own timings), ``drafts``/``accepted`` (totals), ``tok_s`` (generated
tokens / generation seconds, llama.cpp's timer: prompt processing excluded), ``wall_s`` (the requests, end to end),
``xllamacpp`` and ``system_info`` (llama.cpp's CPU feature line). The first ``--warmup`` prompts are decoded once
before, not counted.

``--llama-server BIN`` (or ``$DRAFTOPD_LLAMA_SERVER``): an installed ``llama-server`` (e.g. one built from source with
the CPU's own instruction sets; xllamacpp's Linux CPU wheel is built for AVX2 at most) is started on a free loopback
port with the same settings instead, and asked the same requests; then any python runs this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def start_xllamacpp(a) -> tuple[str, dict, object]:
    """llama.cpp's server core in this process (xllamacpp): (its URL, version facts, the server to keep alive)."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = a.target
    params.n_ctx = a.ctx
    params.n_parallel = 1
    params.warmup = True
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = a.threads
    params.sampling.temp = 0.0
    params.sampling.top_k = 1
    if a.spec_type != "none":
        name = "COMMON_SPECULATIVE_TYPE_" + a.spec_type.upper().replace("-", "_")
        params.speculative.types = [getattr(xlc.common_speculative_type, name)]
        d = params.speculative.draft
        if a.drafter:
            d.mparams.path = a.drafter
        d.n_max, d.n_min, d.p_min = a.n_max, a.n_min, a.p_min
        d.cpuparams.n_threads = d.cpuparams_batch.n_threads = a.threads
    server = xlc.Server(params)
    facts = {"xllamacpp": xlc.__version__, "system_info": xlc.get_system_info().strip()}
    return server.listening_address, facts, server


def start_llama_server(a, binary: str) -> tuple[str, dict, subprocess.Popen]:
    """An installed llama-server on a free loopback port, the same settings as flags; waits for /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [binary, "-m", a.target, "-c", str(a.ctx), "-np", "1", "-t", str(a.threads), "-tb", str(a.threads)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--temp", "0", "--top-k", "1"]
    if a.spec_type != "none":
        cmd += ["--spec-type", a.spec_type, "--spec-draft-n-max", str(a.n_max), "--spec-draft-n-min", str(a.n_min)]
        cmd += ["--spec-draft-p-min", str(a.p_min)]
        if a.drafter:
            cmd += ["-md", a.drafter, "-td", str(a.threads), "-tbd", str(a.threads)]
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the server; a pipe nobody reads would fill
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # 5 minutes at most
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"llama-server exited ({proc.returncode}): {log.read()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=5) as f:
            if f.status == 200:
                break
        time.sleep(0.5)
    else:
        proc.kill()
        raise SystemExit("llama-server did not answer /health in 5 minutes")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stderr.strip().splitlines()
    return url, {"llama_server": binary, "system_info": " / ".join(version[-2:])}, proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="the target GGUF")
    p.add_argument("--prompts", required=True, help="json file: a list of token-id lists")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--drafter", help="a draft.gguf written by `draftopd export --to gguf` (with a draft-* spec type)")
    p.add_argument("--spec-type", default="none", help="llama-server --spec-type: draft-eagle3, draft-dflash, ...")
    p.add_argument("--n-max", type=int, default=5, help="--spec-draft-n-max")
    p.add_argument("--n-min", type=int, default=0, help="--spec-draft-n-min")
    p.add_argument("--p-min", type=float, default=0.0, help="--spec-draft-p-min")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=1, help="prompts decoded once first, not counted")
    p.add_argument("--llama-server", default=os.environ.get("DRAFTOPD_LLAMA_SERVER"), help="an installed llama-server")
    a = p.parse_args()
    prompts = json.loads(Path(a.prompts).read_text())
    base, facts, server = start_llama_server(a, a.llama_server) if a.llama_server else start_xllamacpp(a)
    url = base + "/completion"

    def complete(ids: list[int]) -> dict:
        body = {
            "prompt": ids,
            "n_predict": a.max_new_tokens,
            "temperature": 0.0,
            "top_k": 1,
            "cache_prompt": False,
            "return_tokens": True,
        }
        req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as f:
            return json.loads(f.read())

    for ids in prompts[: a.warmup]:
        complete(ids)
    tokens, per_prompt = [], []
    start = time.perf_counter()
    for ids in prompts:
        r = complete(ids)
        t = r["timings"]
        tokens.append(r["tokens"])
        per_prompt.append([t.get("draft_n", 0), t.get("draft_n_accepted", 0), t["predicted_n"], t["predicted_ms"]])
    wall = time.perf_counter() - start
    gen_ms = sum(row[3] for row in per_prompt)
    out = {
        "tokens": tokens,
        "per_prompt": per_prompt,
        "drafts": sum(row[0] for row in per_prompt),
        "accepted": sum(row[1] for row in per_prompt),
        "generated": sum(row[2] for row in per_prompt),
        "tok_s": sum(row[2] for row in per_prompt) / (gen_ms / 1000) if gen_ms else None,
        "wall_s": wall,
        "xllamacpp": None,
        **facts,
        "settings": {k: v for k, v in vars(a).items() if k != "prompts"},
    }
    if isinstance(server, subprocess.Popen):
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
