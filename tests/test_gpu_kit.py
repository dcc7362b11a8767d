"""bench/gpu_kit.py: the closure check on folders of wheels made here (METADATA as the kit's
real wheels have it), no network; and, slow, the real kit installed under Python 3.12."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
try:
    import gpu_kit
finally:
    sys.path.remove(str(ROOT / "bench"))

NODE = {"torch": Version("2.11.0"), "numpy": Version("2.5.2"), "einops": None,
        "typing-extensions": None}
DEEPSPEED = ["einops", "hjson", "pydantic>=2.0.0", "torch>=2.0.0",
             'triton>=2.1.0; extra == "sd"', 'pytest<8.4.0,>=7.2.0; extra == "dev"',
             'deepspeed-kernels; sys_platform == "linux" and extra == "dev"']
PYDANTIC = ["pydantic-core==2.50.5", "typing-extensions>=4.16.0",
            "tzdata; (platform_system == 'Windows') and extra == 'timezone'",
            'importlib-resources; python_version < "3.9"', 'pywin32; sys_platform == "win32"',
            'uvloop; implementation_name == "pypy"']
CP312 = "cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64"


def wheel(folder: Path, name: str, version: str, requires: list[str],
          tag: str = "py3-none-any") -> Path:
    """A wheel with just a METADATA: all the check reads."""
    folder.mkdir(exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             *[f"Requires-Dist: {r}" for r in requires]]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(lines))
    return path


def kit(folder: Path) -> Path:
    wheel(folder, "deepspeed", "0.19.8", DEEPSPEED)
    wheel(folder, "hjson", "3.1.0", [])
    wheel(folder, "pydantic", "2.14.4", PYDANTIC)
    wheel(folder, "pydantic-core", "2.50.5", ["typing-extensions>=4.14.1"], tag=CP312)
    return folder


def test_a_closed_kit_passes_and_other_platforms_pythons_and_extras_are_ignored(tmp_path):
    assert gpu_kit.check_kit(kit(tmp_path), NODE, roots=("deepspeed",)) == []


def test_a_requirement_neither_in_the_kit_nor_on_the_node_is_named_with_its_needer(tmp_path):
    (kit(tmp_path) / "hjson-3.1.0-py3-none-any.whl").unlink()
    assert gpu_kit.check_kit(tmp_path, NODE, roots=()) == [
        "hjson: needed by deepspeed (hjson), neither in the kit nor on the node"]


def test_a_root_missing_everywhere_fails(tmp_path):
    problems = gpu_kit.check_kit(kit(tmp_path), NODE, roots=("deepspeed", "hydra-core"))
    assert problems == ["hydra-core: needed by ipt's training path (hydra-core), neither in "
                        "the kit nor on the node"]


def test_the_nodes_version_must_satisfy_the_specifier(tmp_path):
    wheel(kit(tmp_path), "newer", "1.0", ["torch>=2.12", "numpy<2.5"])
    assert gpu_kit.check_kit(tmp_path, NODE, roots=()) == [
        "torch 2.11.0 on the node does not satisfy newer's requirement torch>=2.12",
        "numpy 2.5.2 on the node does not satisfy newer's requirement numpy<2.5"]


def test_the_kits_version_must_satisfy_the_specifier_too(tmp_path):
    (kit(tmp_path) / f"pydantic_core-2.50.5-{CP312}.whl").unlink()
    wheel(tmp_path, "pydantic-core", "2.41.0", [], tag=CP312)
    assert gpu_kit.check_kit(tmp_path, NODE, roots=()) == [
        "pydantic-core 2.41.0 in the kit does not satisfy pydantic's requirement "
        "pydantic-core==2.50.5"]


def test_two_versions_of_one_package_fail(tmp_path):
    wheel(kit(tmp_path), "hjson", "3.0.2", [])
    assert gpu_kit.check_kit(tmp_path, NODE, roots=()) == [
        "hjson: two versions in the kit, 3.0.2 and 3.1.0"]


def test_a_wheel_for_another_python_or_platform_fails(tmp_path):
    wheel(kit(tmp_path), "pyyaml", "6.0.4", [], tag="cp311-cp311-manylinux_2_17_x86_64")
    wheel(tmp_path, "regex", "1.0", [], tag="cp312-cp312-macosx_11_0_arm64")
    assert gpu_kit.check_kit(tmp_path, NODE, roots=()) == [
        "pyyaml-6.0.4-cp311-cp311-manylinux_2_17_x86_64.whl: not installable on the node "
        "(CPython 3.12, manylinux x86_64)",
        "regex-1.0-cp312-cp312-macosx_11_0_arm64.whl: not installable on the node "
        "(CPython 3.12, manylinux x86_64)"]


def test_the_node_list_is_read_with_normalised_names_and_known_versions_only():
    node = gpu_kit.read_pins(ROOT / "bench" / "gpu_node.txt")
    assert node["torch"] == Version("2.11.0") and node["huggingface-hub"] == Version("1.33.0")
    assert "pyyaml" in node and node["pyyaml"] is None
    assert not set(gpu_kit.ROOTS) - {"typing-extensions"} & set(node)


def test_node_constraints_put_the_nodes_pins_over_the_lock_except_those_kept():
    lock = {"transformers": Version("5.24.0"), "torch": Version("2.13.0"),
            "hydra-core": Version("1.3.8")}
    text = gpu_kit.node_constraints(lock, {"transformers": Version("5.17.0"),
                                           "torch": Version("2.11.0"), "jax": Version("0.11.2")},
                                    keep={"torch"})
    assert text.splitlines()[1:] == ["transformers==5.17.0", "torch==2.13.0",
                                     "hydra-core==1.3.8"]


def test_the_corpus_copy_keeps_tokenizer_and_shards_without_raw_text(tmp_path):
    corpus = tmp_path / "corpus"
    for f in ("raw/docstrings.jsonl", "tokenizer/tokenizer.model", "shards/docs/train/s.tokens",
              "shards/docs/valid/s.json", "shards/docs/rejects/s.jsonl",
              "shards/docs/parts/s.json", "shards/docs/summary.json"):
        (corpus / f).parent.mkdir(parents=True, exist_ok=True)
        (corpus / f).write_text("x")
    gpu_kit.copy_corpus(corpus, tmp_path / "kit")
    copied = sorted(str(p.relative_to(tmp_path / "kit")) for p in (tmp_path / "kit").rglob("*")
                    if p.is_file())
    assert copied == ["shards/docs/summary.json", "shards/docs/train/s.tokens",
                      "shards/docs/valid/s.json", "tokenizer/tokenizer.model"]


PY312 = Path("/root/.pyenv/versions/3.12.1/bin/python")
COMPOSE = """
from hydra import compose, initialize_config_dir
import hjson, pydantic, antlr4
from ipt.config import register, to_object
register()
with initialize_config_dir({configs!r}, version_base=None):
    cfg = to_object(compose("pretrain", overrides=["data.root=/nowhere", "model=1b"]))
print(cfg.model.name, cfg.tokenizer)
"""


@pytest.mark.slow
def test_the_kit_installs_and_composes_the_config_under_python_312(tmp_path):
    """The node's way: its pure-Python wheels and pydantic-core, --no-index --no-deps
    --target, under CPython 3.12; Hydra composes bench/gpu.py's config. Not deepspeed (it
    imports torch, which has no CPU build for 3.12 here). PyYAML and packaging, which the
    node has, come from PyPI; the kit is built (--skip-data, under a minute) when gpu-kit/ has
    no wheels."""
    if not PY312.exists():
        pytest.skip(f"no Python 3.12 at {PY312}")
    folder = ROOT / "gpu-kit"
    if not any(folder.glob("*.whl")):
        folder = tmp_path / "kit"
        subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_kit.py"), "--out",
                        str(folder), "--skip-data"], check=True, timeout=600)
    node = gpu_kit.read_pins(ROOT / "bench" / "gpu_node.txt")
    assert gpu_kit.check_kit(folder, node) == []
    lock = gpu_kit.read_pins(ROOT / "constraints.txt")
    stand_ins = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", *gpu_kit.PIP_TARGET, "-d", str(stand_ins),
                    f"pyyaml=={lock['pyyaml']}", f"packaging=={lock['packaging']}"],
                   check=True, timeout=300)
    wheels = [str(w) for w in [*folder.glob("*.whl"), *stand_ins.glob("*.whl")]
              if not w.name.startswith("deepspeed-")]
    site = tmp_path / "site"
    subprocess.run([str(PY312), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(site), *wheels], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT / 'src'}"}
    out = subprocess.run([str(PY312), "-s", "-c", COMPOSE.format(configs=str(ROOT / "configs"))],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1b", "/nowhere/tokenizer"]
