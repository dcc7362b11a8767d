"""The GPU node's kit: what bench/gpu.py needs there that the node lacks, in one folder.

    python bench/gpu_kit.py --out gpu-kit                 # make gpu-kit
    python bench/gpu_kit.py --out gpu-kit --check-only    # check a kit, no network

The node (bench/gpu_node.txt: Python 3.12, torch 2.11.0+cu130, no network) has torch and
transformers but not DeepSpeed, Hydra or pydantic. This writes into --out:

- the wheels of ipt's training path that the node lacks (`ROOTS`) and of whatever those
  need that the node lacks too, at the lock's versions (constraints.txt): binary wheels for
  CPython 3.12 on manylinux x86_64 from PyPI, and wheels built here for the source-only
  ones (deepspeed, antlr4-python3-runtime), which must come out pure Python;
- `data/gpubench/`: the benchmark's corpus, its tokenizer and token shards only (no raw text);
- `kit.json`: the manifest (packages, versions, sizes, the node list's checksum).

Then it checks the closure (every requirement of every wheel, for the node, is met by the
kit or the node; one version per package) and the size against the carry limit. On the node,
`bash bench/gpu_session.sh OUT_DIR` installs it (KIT=gpu-kit) and runs the benchmark; by hand:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site KIT/*.whl && export PYTHONPATH=/tmp/site
    python3 bench/gpu.py --data KIT/data/gpubench
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from email.message import Message
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# What train/pretrain.py and bench/gpu.py import on the training path that the node lacks,
# read off sys.modules after a tiny pretrain run (module -> distribution); the rest of what
# that run loaded is on the node (torch, transformers, numpy, sentencepiece, ...), or is
# optional or came with this machine's newer versions (dill, which torch imports if present;
# httpx2, httpcore2, truststore and sniffio, which huggingface_hub 2.x imports, where the
# node's 1.33 uses httpx; hydra-submitit-launcher, which Hydra's plugin scan finds, used
# only by hydra/launcher=slurm; jaraco and more_itertools are setuptools' own vendored
# copies). The closure of these adds what they need and the node lacks.
ROOTS = {
    "deepspeed": "the engine: ipt.engine wraps every run in deepspeed.initialize",
    "hydra-core": "train/pretrain.py and bench/gpu.py compose the config with Hydra",
    "omegaconf": "ipt.config's schema and resolvers",
    "antlr4-python3-runtime": "omegaconf's interpolation grammar",
    "pydantic": "DeepSpeed's config classes",
    "pydantic-core": "pydantic's compiled core",
    "annotated-types": "pydantic's constraint types",
    "typing-inspection": "pydantic's type introspection",
    "hjson": "DeepSpeed's config reader",
    # pydantic needs typing-extensions>=4.16.0 and the node's version is not known: 45 kB,
    # and a newer typing_extensions serves every older user
    "typing-extensions": "pydantic's requirement (>=4.16.0), node version unknown",
}

# The node's interpreter, for Requires-Dist markers; no extra is requested
NODE_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "os_name": "posix", "extra": "",
}
# glibc 2.28 or newer: the node's torch is a manylinux_2_28 wheel
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
NODE_TAGS = {*cpython_tags((3, 12), platforms=PLATFORMS),
             *compatible_tags((3, 12), "cp312", PLATFORMS)}
PIP_TARGET = ["--python-version", "3.12", "--implementation", "cp",
              *[arg for p in PLATFORMS for arg in ("--platform", p)]]

# bench/gpu.py's corpus (its docstring's recipe); the kit carries only what pretrain opens:
# the tokenizer, and per source its train and valid shards with their small accounting
CORPUS = ROOT / "data" / "gpubench"
RECIPE = ["data_pipeline/demo_data.py", "max_docs=40000", "vocab_size=32000"]
SHARD_PARTS = ("train", "valid", "settings.json", "summary.json")
KIT_CORPUS = Path("data") / "gpubench"
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
           "--upgrade --target /tmp/site KIT/*.whl && export PYTHONPATH=/tmp/site")


class KitError(RuntimeError):
    """The kit cannot be made, or would not work on the node."""


def read_pins(path: Path) -> dict[str, Version | None]:
    """`name` or `name==version` per line (constraints.txt, gpu_node.txt), by normalised name."""
    pins: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version) if version else None
    return pins


def metadata(wheel: Path) -> Message:
    """The wheel's METADATA headers."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return email.parser.BytesHeaderParser().parsebytes(z.read(name))


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the node with no extra requested. (A
    requirement's own extras, `X[e]`, are not followed: no wheel of the kit has one.)"""
    reqs = [Requirement(r) for r in metadata(wheel).get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(NODE_MARKERS)]


def unmet(req: Requirement, needer: str, kit: dict[str, Version],
          node: dict[str, Version | None]) -> str | None:
    """Why `req` of `needer` fails on the node with the kit installed over it (the kit's
    folder comes first on PYTHONPATH), or None when it is met. A node package listed with no
    version meets any specifier: its version is not known."""
    name = canonicalize_name(req.name)
    if name in kit:
        version, where = kit[name], "in the kit"
    elif name in node:
        version, where = node[name], "on the node"
    else:
        return f"{name}: needed by {needer} ({req}), neither in the kit nor on the node"
    if version is None or req.specifier.contains(version, prereleases=True):
        return None
    return f"{name} {version} {where} does not satisfy {needer}'s requirement {req}"


def check_kit(folder: Path, node: dict[str, Version | None],
              roots: tuple[str, ...] = tuple(ROOTS)) -> list[str]:
    """Everything that would fail on the node: a root or a wheel's requirement met neither by
    the kit nor by the node, two versions of one package, a wheel the node cannot install.
    No network: reads the wheels in `folder` only."""
    problems, kit = [], {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name in kit:
            problems.append(f"{name}: two versions in the kit, {kit[name]} and {version}")
        kit.setdefault(name, version)
        if not tags & NODE_TAGS:
            problems.append(f"{wheel.name}: not installable on the node (CPython 3.12, "
                            "manylinux x86_64)")
    for root in roots:
        problems.append(unmet(Requirement(root), "ipt's training path", kit, node))
    for wheel in sorted(folder.glob("*.whl")):
        needer = str(parse_wheel_filename(wheel.name)[0])
        problems += [unmet(r, needer, kit, node) for r in requirements(wheel)]
    return [p for p in problems if p]


def where(name: str, kit: set[str], node: dict[str, Version | None]) -> str:
    return "kit" if name in kit else "node" if name in node else "MISSING"


def closure_lines(folder: Path, node: dict[str, Version | None]) -> list[str]:
    """Each wheel and where its requirements are met, for the record of the check."""
    kit = {parse_wheel_filename(w.name)[0] for w in folder.glob("*.whl")}
    lines = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        needs = [f"{r.name}{r.specifier} ({where(canonicalize_name(r.name), kit, node)})"
                 for r in requirements(wheel)]
        lines.append(f"{name} {version}: {', '.join(needs) or 'no requirements'}")
    return lines


def pip(*args: str) -> subprocess.CompletedProcess:
    # DS_BUILD_OPS=0 (DeepSpeed's default, made explicit): no CUDA op is compiled into the
    # wheel, so it is pure Python and the node JIT-builds what it needs
    return subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--no-deps"],
                          capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"})


def fetch(name: str, version: Version, out: Path) -> Path:
    """The wheel of name==version, moved into `out`: PyPI's binary wheel for the node, else
    one built here from the source distribution. The build uses this venv's setuptools and
    torch (--no-build-isolation): DeepSpeed's setup.py imports torch."""
    spec = f"{name}=={version}"
    with tempfile.TemporaryDirectory() as tmp:
        if pip("download", "--only-binary=:all:", *PIP_TARGET, "-d", tmp, spec).returncode:
            print(f"  {spec}: no binary wheel on PyPI, building one from source", flush=True)
            built = pip("wheel", "--no-build-isolation", "-w", tmp, spec)
            if built.returncode:
                raise KitError(f"{spec}: neither downloaded nor built:\n{built.stderr[-3000:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        return Path(shutil.move(wheel, out / wheel.name))


def gather_wheels(out: Path, lock: dict[str, Version | None],
                  node: dict[str, Version | None]) -> None:
    """The roots' wheels and their closure over the node, at the lock's versions. The kit's
    old wheels go first, so a changed lock leaves no stale version behind."""
    for old in out.glob("*.whl"):
        old.unlink()
    kit: dict[str, Version] = {}
    todo = [(root, "ipt's training path") for root in ROOTS]
    while todo:
        name, needer = todo.pop(0)
        if name in kit:
            continue
        version = lock.get(name)
        if version is None:
            raise KitError(f"{name}: needed by {needer} and missing on the node, but the lock "
                           "(constraints.txt) has no version of it")
        wheel = fetch(name, version, out)
        kit[name] = version
        print(f"  {wheel.name}", flush=True)
        todo += [(canonicalize_name(r.name), name) for r in requirements(wheel)
                 if unmet(r, name, kit, node)]


def build_corpus() -> Path:
    """bench/gpu.py's corpus in data/gpubench, by its recipe (each stage skips what exists)."""
    cmd = [sys.executable, *RECIPE, f"out={CORPUS}"]
    print(f"  {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return CORPUS


def copy_corpus(corpus: Path, dest: Path) -> None:
    """The tokenizer and each source's shards (`SHARD_PARTS`), without the raw text, the
    prepare stage's rejects (raw text too) or its per-group accounting."""
    if not (corpus / "tokenizer").is_dir() or not (corpus / "shards").is_dir():
        raise KitError(f"{corpus}: not a prepared corpus (no tokenizer/ or shards/)")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(corpus / "tokenizer", dest / "tokenizer")
    for source in sorted(p for p in (corpus / "shards").iterdir() if p.is_dir()):
        for part in SHARD_PARTS:
            if (source / part).is_dir():
                shutil.copytree(source / part, dest / "shards" / source.name / part)
            elif (source / part).is_file():
                shutil.copy2(source / part, dest / "shards" / source.name / part)


def check_corpus(folder: Path) -> None:
    """Open the copy as bench/gpu.py will (`data.root=<folder>` with the default data=demo
    sources, its 4096-token sequences and data.max_repeat=1000): the tokenizer loads and
    every source's shards open against it, here rather than on the node."""
    sys.path.insert(0, str(ROOT / "src"))
    from hydra import compose, initialize_config_dir

    from ipt.config import register, to_object
    from ipt.data import tokenizer as tok
    from ipt.data.sampling import Packed, open_train

    register()
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = to_object(compose("pretrain", overrides=[
            f"data.root={folder}", "data.seq_len=4096", "model.max_seq_len=4096",
            "data.max_repeat=1000"]))
    tok.load(cfg.tokenizer)
    data = open_train(cfg, tok.fingerprint(cfg.tokenizer), Packed(cfg))
    print(f"  opens as bench/gpu.py's data: sources {', '.join(data.names)}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def carry_report(out: Path, limit_mib: float) -> dict[str, int]:
    """Print what to carry, by part; fail over the limit (the carry is 64 MiB in all, the
    repository included)."""
    wheels = sorted(out.glob("*.whl"))
    sizes = {"wheels": sum(w.stat().st_size for w in wheels),
             "data": folder_bytes(out / "data") if (out / "data").is_dir() else 0}
    sizes["total"] = sizes["wheels"] + sizes["data"]
    print(f"carry {out}/:")
    for w in wheels:
        print(f"  {w.name:<80} {mib(w.stat().st_size):>10}")
    for part, n in sizes.items():
        print(f"  {part:<80} {mib(n):>10}")
    if sizes["total"] > limit_mib * 2**20:
        raise KitError(f"the kit is {mib(sizes['total'])}, over the limit of {limit_mib} MiB")
    return sizes


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out: Path, node_list: Path, sizes: dict[str, int]) -> None:
    """kit.json: what the kit holds and for which node list, so a stale kit can be told."""
    packages = []
    for w in sorted(out.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(w.name)
        packages.append({"name": str(name), "version": str(version), "file": w.name,
                         "bytes": w.stat().st_size, "sha256": sha256(w)})
    shown = node_list.resolve()
    manifest = {"node_list": str(shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown),
                "node_list_sha256": sha256(node_list),
                "packages": packages, "data": str(KIT_CORPUS) if sizes["data"] else None,
                "bytes": sizes, "install": INSTALL,
                "made": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "kit.json").write_text(json.dumps(manifest, indent=1) + "\n")


def node_constraints(lock: dict[str, Version | None], node: dict[str, Version | None],
                     keep: set[str]) -> str:
    """The lock with the node's version of each package the node pins, except `keep`: a venv
    here as close to the node as this machine's builds allow (`make check-gpu-versions`)."""
    lines = ["# constraints.txt with bench/gpu_node.txt's versions in place (bench/gpu_kit.py)"]
    for name, version in lock.items():
        pinned = node.get(name)
        lines.append(f"{name}=={pinned if pinned and name not in keep else version}")
    return "\n".join(lines) + "\n"


def make_kit(args: argparse.Namespace, node: dict[str, Version | None]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    print("wheels (lock versions, for CPython 3.12 manylinux x86_64):", flush=True)
    gather_wheels(args.out, read_pins(args.lock), node)
    if args.skip_data:
        return
    print("data:", flush=True)
    corpus = Path(args.data_from) if args.data_from else build_corpus()
    copy_corpus(corpus, args.out / KIT_CORPUS)
    check_corpus(args.out / KIT_CORPUS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-kit"))
    p.add_argument("--node", type=Path, default=ROOT / "bench" / "gpu_node.txt")
    p.add_argument("--lock", type=Path, default=ROOT / "constraints.txt")
    p.add_argument("--check-only", action="store_true",
                   help="check the wheels and size of an existing --out (no network)")
    p.add_argument("--skip-data", action="store_true", help="wheels only")
    p.add_argument("--data-from", help="a built corpus to copy (default: build data/gpubench)")
    p.add_argument("--limit-mib", type=float, default=48.0)
    p.add_argument("--node-constraints", type=Path,
                   help="write the lock with the node's versions in place to this file, and stop")
    p.add_argument("--keep-lock", default="",
                   help="with --node-constraints: comma-separated packages kept at the lock's")
    args = p.parse_args()
    start = time.perf_counter()
    node = read_pins(args.node)
    try:
        if args.node_constraints:
            keep = {canonicalize_name(n) for n in args.keep_lock.split(",") if n}
            args.node_constraints.write_text(node_constraints(read_pins(args.lock), node, keep))
            return
        if not args.check_only:
            make_kit(args, node)
        print(f"closure check ({args.out}/ over {args.node.name}):")
        for line in closure_lines(args.out, node):
            print(f"  {line}")
        problems = check_kit(args.out, node)
        if problems:
            raise KitError("closure check failed:\n  " + "\n  ".join(problems))
        print("  ok: every requirement met by the kit or the node, one version of each")
        write_manifest(args.out, args.node, carry_report(args.out, args.limit_mib))
    except KitError as e:
        sys.exit(f"bench/gpu_kit.py: {e}")
    print(f"bench/gpu_kit.py: {args.out}/ in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
