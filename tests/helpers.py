"""What the tests share: tiny targets and drafters, running the console script (in a subprocess or in this process)
and reading what it said, the training command lines the CLI tests use. Fixtures live in ``conftest.py``; no test
module imports another."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from draftopd import assets
from draftopd.cli import main
from draftopd.decoding.interface import Proposal
from draftopd.decoding.sampling import logits_to_probs
from draftopd.models.dflash import DFlashConfig, DFlashModel
from draftopd.models.eagle3 import Eagle3Config, Eagle3Model, draft_vocab_map
from draftopd.models.target import Target

needs_default_target = pytest.mark.skipif(
    not (assets.default_target_dir() / "config.json").exists(), reason="default target (its tokenizer) not set up"
)


# --- tiny targets and drafters ---


def make_tiny_target(
    vocab: int = 32, layers: int = 2, hidden: int = 32, seed: int = 0, std: float = 0.02, eos: int | None = None
) -> Target:
    """A random Llama small enough for exhaustive checks; ``std`` sharpens its distributions."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=std,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).float()
    return Target(model, None, name="tiny")


def tiny_dflash(target, layers=2, block=5, seed=0):
    torch.manual_seed(seed)
    cfg = DFlashConfig.from_target(
        target.config, num_layers=layers, block_size=block, mask_token_id=1, target_layer_ids=[0, 2]
    )
    return sharpen(DFlashModel(cfg))


def tiny_drafter(kind: str, target, seed: int):
    """A small drafter of either kind with sharp, varied proposals (random weights, std 0.3)."""
    torch.manual_seed(seed)
    if kind == "dflash":
        cfg = DFlashConfig.from_target(
            target.config, num_layers=2, block_size=5, mask_token_id=1, target_layer_ids=[0, 2]
        )
        model = DFlashModel(cfg)
    else:
        model = Eagle3Model(Eagle3Config.from_target(target.config, 7, target_layer_ids=[0, 1, 2]))
        d2t, t2d = draft_vocab_map(torch.arange(target.vocab_size).float() % 5, 7)
        model.set_vocab(d2t, t2d, target.lm_head.weight)
    with torch.no_grad():  # sharp, varied proposals
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def sharpen(model):
    """Large random weights: sharp, varied proposals."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


class StatelessDrafter:
    """What the tests' drafters without state share: no target features, and start/update/select do nothing."""

    layer_ids: tuple[int, ...] = ()

    def start(self, state, features):
        pass

    def update(self, state, n_accepted, features):
        pass

    def select(self, rows):
        pass


class NoisyOracleDrafter(StatelessDrafter):
    """Drafts from the target itself (full forward, no cache), mixed with a random distribution.

    Greedy: the target's argmax, replaced by a random token with probability ``noise``; sampling: tokens
    drawn from ``q = (1 - noise) * p_target + noise * r``, returned with ``q`` so verification is lossless.
    Rows propose different numbers of tokens (1..k), so batched rows accept different lengths.
    """

    def __init__(self, target, k: int = 4, noise: float = 0.3, seed: int = 0) -> None:
        self.target, self.k, self.noise = target, k, noise
        self.g = torch.Generator().manual_seed(seed)
        self.r = torch.softmax(torch.randn(target.vocab_size, generator=self.g) * 2, -1)

    @torch.no_grad()
    def propose(self, state, params, generator=None):
        bsz = len(state.history)
        n = torch.randint(1, self.k + 1, (bsz,), generator=self.g)
        tokens = torch.zeros(bsz, self.k, dtype=torch.long)
        probs = torch.zeros(bsz, self.k, self.target.vocab_size)
        for b, hist in enumerate(state.history):
            seq = list(hist)
            for j in range(self.k):
                logits = self.target.model(torch.tensor([seq])).logits[0, -1].float()
                if params.greedy:
                    tok = int(logits.argmax())
                    if torch.rand(1, generator=self.g).item() < self.noise:
                        tok = int(torch.randint(self.target.vocab_size, (1,), generator=self.g))
                    q = torch.nn.functional.one_hot(torch.tensor(tok), self.target.vocab_size).float()
                else:
                    q = (1 - self.noise) * logits_to_probs(logits, params) + self.noise * self.r
                    tok = int(torch.multinomial(q, 1, generator=self.g))
                tokens[b, j], probs[b, j] = tok, q
                seq.append(tok)
        return Proposal(tokens, n, None if params.greedy else probs)


# --- the sampling law ---


def joint_law_pvalue(target, prompt, samples: list[list[int]], params) -> float:
    """Chi-square p-value of sampled continuations (all of one length) against the target's exact joint law."""
    n_tokens, n = len(samples[0]), len(samples)
    tuples, probs = _exact_joint(target, prompt, n_tokens, params)
    index = {t: i for i, t in enumerate(tuples)}
    counts = torch.zeros(len(tuples), dtype=torch.float64)
    for toks in samples:
        counts[index[tuple(toks)]] += 1
    expected = probs / probs.sum() * n
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def _exact_joint(target, prompt, n_tokens, params):
    """p(t_1..t_n | prompt) for every token tuple, from full forwards of the target."""
    vocab = target.vocab_size
    tuples = list(itertools.product(range(vocab), repeat=n_tokens))
    seqs = torch.tensor([prompt + list(t) for t in tuples])
    with torch.no_grad():
        logits = target.model(seqs).logits.float()
    probs = torch.ones(len(tuples), dtype=torch.float64)
    for j in range(n_tokens):
        pj = torch.softmax(logits[:, len(prompt) - 1 + j] / params.temperature, -1).double()
        probs *= pj.gather(1, seqs[:, len(prompt) + j : len(prompt) + j + 1]).squeeze(1)
    return tuples, probs


# --- the console script ---


def run_cli(*args: str, check: bool = False, wait: bool = True, timeout: float = 600, **kw):
    """``draftopd ARGS`` in a subprocess: its CompletedProcess (``check``: assert it succeeded), or with
    ``wait=False`` the running Popen (stdout discarded, stderr piped)."""
    cmd = [sys.executable, "-m", "draftopd.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def error_lines(stderr: str) -> list[str]:
    """What stderr says beyond progress bars and ``[draftopd]`` log lines."""
    skip = ("it/s]", "%|")
    return [
        ln for ln in stderr.splitlines() if ln.strip() and not any(x in ln for x in skip) and ln[:10] != "[draftopd]"
    ]


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> str:
    """The command failed with exit status 2 and exactly one ``error: ...`` line, naming ``text``, no traceback."""
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def cli_in_process(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    """Run the console script in this process: (exit status, stdout, stderr). ``--gsm8k`` sets an environment
    variable for the process; monkeypatch puts it back afterwards."""
    monkeypatch.setenv("DRAFTOPD_GSM8K", os.environ.get("DRAFTOPD_GSM8K", ""))
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, monkeypatch, *argv: str, text: str = "") -> str:
    """In this process, the command fails with exit status 2 and exactly one ``error: ...`` line naming ``text``."""
    rc, _, err = cli_in_process(capsys, monkeypatch, *argv)
    lines = error_lines(err)
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert text in lines[0], lines[0]
    return lines[0]


def prompt_file(folder: Path, n: int) -> Path:
    """``folder/p.jsonl``: ``n`` short arithmetic prompts, a data source for `draftopd data` on a tiny target."""
    path = folder / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(n)))
    return path


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --- training command lines on the tiny target (tests/test_training.py, tests/test_distributed.py) ---


def sft_args(tiny_folder, shards, out, steps=40, dtype="fp32"):
    return [
        "train",
        "sft",
        "--target",
        str(tiny_folder),
        "--dtype",
        dtype,
        "--set",
        f"data={shards}",
        "--set",
        f"out={out}",
        "--set",
        f"loop.max_steps={steps}",
        "--set",
        "batch_size=2",
        "--set",
        "blocks_per_seq=3",
        "--set",
        "loop.save_every=5",
        "--set",
        "loop.eval_every=1000",
        "--set",
        "eval.limit=2",
        "--set",
        "eval.max_new_tokens=8",
        "--set",
        "arch.block_size=4",
        "--set",
        "loop.log_every=5",
    ]


def run_opd(tiny_folder, init, out, data, *extra, dtype="fp32", run=True):
    """Draft-OPD on the tiny target (2 updates of 3 rows drawn from the trajectories in ``data``); ``run=False``
    returns the arguments instead."""
    args = (
        "train",
        "opd",
        "--target",
        str(tiny_folder),
        "--dtype",
        dtype,
        "--set",
        f"init_from={init}",
        "--set",
        f"out={out}",
        "--set",
        f"data={data}",
        "--set",
        "loop.max_steps=2",
        "--set",
        "rollout_batch=3",
        "--set",
        "micro_batch=2",
        "--set",
        "max_new_tokens=16",
        "--set",
        "eval.limit=2",
        "--set",
        "eval.max_new_tokens=8",
        "--set",
        "loop.eval_every=2",
        "--set",
        "loop.save_every=2",
        "--set",
        "loop.lr=0.01",
        "--set",
        "logp_min=-40",  # random tiny target: log p ~ -10.8
        *extra,
    )
    return run_cli(*args, check=True) if run else args


# --- the serving checks' drafters (tests/test_vllm.py, tests/test_llamacpp.py) ---

SERVE_NEW = 64  # new tokens per prompt of the serving checks' data and decoding


def serve_data_overrides(out: Path, engine: str) -> list[str]:
    """``draftopd data`` settings of the serving checks: 16 GSM8K-train prompts, fp32, 1 thread, batch 16."""
    return [
        f"out={out}",
        f"engine={engine}",
        "target.dtype=fp32",
        "target.threads=1",
        "sources=[gsm8k]",
        "limit_per_source=16",
        f"sampling.max_new_tokens={SERVE_NEW}",
        "batch_size=16",
    ]


def train_quick(kind: str, data: Path, out: Path) -> Path:
    """A drafter of the default target barely trained (60 SFT steps, fp32, 1 thread): EAGLE-3 with a 4096-token
    draft vocabulary and 3 TTT steps, or DFlash with 1 layer and block 4. Returns its ``final/``."""
    from draftopd.config import SFTConfig
    from draftopd.recipes import load
    from draftopd.train.sft import train_sft

    arch = (
        ["arch.kind=dflash", "arch.num_layers=1", "arch.block_size=4", "blocks_per_seq=8"]
        if kind == "dflash"
        else ["arch.kind=eagle3", "arch.ttt_steps=3"]
    )
    sets = [
        f"data={data}",
        f"out={out}",
        "target.dtype=fp32",
        "target.threads=1",
        "loop.max_steps=60",
        "batch_size=4",
        "max_len=320",
        "loop.lr=1e-3",
        "arch.draft_vocab_size=4096",
        "loop.eval_every=1000",
        "loop.save_every=1000",
        *arch,
    ]
    return Path(train_sft(load(SFTConfig, None, sets)))


# --- the drivers under scripts/ ---


def script_module(name: str):
    """Import ``scripts/NAME.py`` as module ``NAME`` (a generator for a module-scoped fixture: yields it, then
    forgets it and the sibling drivers it imported, and restores ``sys.path``, which the drivers extend)."""
    import importlib.util

    before = list(sys.path)
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass of the driver looks its module up
    spec.loader.exec_module(module)
    yield module
    for other in (name, "ab_warmstart", "figure1"):
        sys.modules.pop(other, None)
    sys.path[:] = before
