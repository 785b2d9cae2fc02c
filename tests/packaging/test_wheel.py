"""kiln as `pip install kiln` gives it: the wheel, not the editable checkout.

- The wheel holds every non-Python file of the package folders (kiln reads them through
  importlib.resources), and no module finds its files through `__file__`.
- Every third-party module kiln imports comes from a declared dependency or extra, and
  kiln.extras (the one message naming a missing extra) agrees with pyproject.toml.
- A missing extra is one message naming it, from the command a user typed.
- End to end: the wheel, installed non-editable into a scratch venv that sees this venv's
  packages but not its editable kiln, and hides what only the extras install (a core
  install), runs `kiln rules`, `kiln compile -t cpu` and `kiln generate` from a directory
  outside the repository.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
from packaging.requirements import Requirement  # noqa: E402 - transformers depends on packaging

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIRS: dict[str, str] = SETUPTOOLS["package-dir"]   # "kiln.ir" -> "ir"
RUNTIME_EXTRAS = {e: rs for e, rs in PROJECT["optional-dependencies"].items() if e != "test"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(reqs) -> set[str]:
    return {_norm(Requirement(r).name) for r in reqs}


def _sources() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS.values() for p in (REPO / d).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _data_files() -> set[str]:
    """Non-Python files of the package folders, as their paths inside the wheel."""
    out = set()
    for package, folder in PACKAGE_DIRS.items():
        root = REPO / folder
        for p in root.rglob("*"):
            sub = p.relative_to(root).parts
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in sub:
                out.add("/".join([*package.split("."), *sub]))
    return out


# Modules of extras that cannot be installed on a machine without their hardware, with
# the distribution that provides them (torch_npu needs Ascend's CANN to install usefully).
NOT_INSTALLED_HERE = {"torch_npu": "torch-npu"}


def _module_distributions() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {m: {_norm(d)} for m, d in NOT_INSTALLED_HERE.items()}
    for module, dists in md.packages_distributions().items():
        out.setdefault(module, set()).update(_norm(d) for d in dists)
    return out


def _core_closure() -> set[str]:
    """Distributions a core install brings: the dependencies and theirs (installed ones)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in PROJECT["dependencies"]]
    while todo:
        r = todo.pop()
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        if _norm(r.name) in seen:
            continue
        seen.add(_norm(r.name))
        try:
            todo += [Requirement(x) for x in md.requires(r.name) or ()]
        except md.PackageNotFoundError:
            pass
    return seen


# -- what the package declares ------------------------------------------------------------
def test_no_module_locates_files_through___file__():
    """Package data is read through importlib.resources (files("kiln.passes") / ...), which
    works wherever and however kiln is installed."""
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in _sources()
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "__file__" in line and not line.lstrip().startswith("#")]
    assert not offenders, f"use importlib.resources.files('kiln...') instead: {offenders}"


def test_every_import_is_a_declared_dependency():
    declared = _names(PROJECT["dependencies"]) | {
        n for rs in RUNTIME_EXTRAS.values() for n in _names(rs)}
    dists = _module_distributions()
    undeclared = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in ("kiln", "__future__") or top in sys.stdlib_module_names:
                    continue
                if not dists.get(top, set()) & declared:
                    undeclared.setdefault(top, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not undeclared, ("imported, but no dependency or extra in pyproject.toml provides "
                            f"it (add it to [project] dependencies or an extra): {undeclared}")


def test_kiln_extras_match_pyproject():
    from kiln.extras import EXTRAS
    dists = _module_distributions()
    for extra, modules in EXTRAS.items():
        assert extra in RUNTIME_EXTRAS, f"kiln.extras names {extra!r}, pyproject.toml has none"
        for m in modules:
            assert dists.get(m, set()) & _names(RUNTIME_EXTRAS[extra]), (
                f"module {m} of extra {extra!r}: its distribution is not in that extra")


# -- a missing extra is one message -------------------------------------------------------
def _hide(monkeypatch, modules, reimport=()):
    """As if `modules` were not installed; `reimport`: kiln modules to import afresh."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)
    for name in list(sys.modules):
        if any(name == r or name.startswith(r + ".") for r in reimport):
            monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("extra", ["serve", "bench", "gguf", "triton", "mlir"])
def test_missing_extra_is_one_clear_message(extra, tmp_path, monkeypatch, capsys):
    from kiln.cli import main
    from kiln.extras import EXTRAS
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    if extra == "serve":
        _hide(monkeypatch, ["fastapi"])
        argv = ["serve", str(tmp_path / "no-such-artifact")]
    elif extra == "bench":
        _hide(monkeypatch, ["httpx"])
        argv = ["bench", "serve", "--url", "http://127.0.0.1:9", "--num-requests", "1"]
    elif extra == "gguf":
        _hide(monkeypatch, ["gguf"])
        gguf = tmp_path / "model.gguf"
        gguf.write_bytes(b"GGUF" + bytes(60))
        argv = ["compile", str(gguf), "-t", "cpu", "-o", str(tmp_path / "out.kiln")]
    elif extra == "triton":
        _hide(monkeypatch, ["triton"], ["kiln.backends.triton"])
        argv = ["compile", str(tmp_path), "-t", "cuda", "--aot", "-o", str(tmp_path / "out.kiln")]
    else:   # told before the model is even loaded
        _hide(monkeypatch, ["torch_mlir"])
        argv = ["dump", str(tmp_path / "no-such-model"), "--format", "mlir"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"needs the {extra!r} extra" in err and f"pip install 'kiln[{extra}]'" in err, err
    assert EXTRAS[extra][0] in err, err   # names what is missing
    assert not (tmp_path / "out.kiln").exists()


# -- the installed wheel ------------------------------------------------------------------
def _run(cmd, cwd, env, timeout=180):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))} -> {r.returncode}\n"
                               f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the sources (setuptools' build/ in the checkout
    may hold files of an earlier build, which would end up in the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", PROJECT["readme"]):
        shutil.copy2(REPO / name, src / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(REPO / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", out, src], cwd=tmp, env=os.environ.copy())
    (whl,) = out.glob("kiln-*.whl")
    return whl


def test_wheel_holds_every_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    in_wheel = {n for n in names if not n.endswith(".py") and ".dist-info/" not in n}
    assert _data_files() <= in_wheel, (
        f"not in the wheel (add them to [tool.setuptools.package-data]): "
        f"{sorted(_data_files() - in_wheel)}")
    assert in_wheel == _data_files()
    assert "kiln/passes/rules.lark" in names and "kiln/ir/kir.lark" in names


@pytest.fixture(scope="module")
def scratch_venv(wheel, tmp_path_factory) -> Path:
    """A venv with the wheel installed (not editable) that sees this venv's site-packages
    through a .pth path line (a .pth inside those folders is not run, so the editable kiln's
    finder stays out) and hides the modules only extras install."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent,
         env=os.environ.copy())
    python = venv / "bin" / "python"
    # Installed before the .pth exists: pip sees no other kiln to replace.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
          "--no-index", wheel], cwd=venv.parent, env=os.environ.copy())
    purelib = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    outer = list(dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"],
                                sysconfig.get_paths()["platlib"]]))
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        outer.append(site.getusersitepackages())
    (purelib / "zz_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    core = _core_closure()
    dists = _module_distributions()
    optional = {n for rs in RUNTIME_EXTRAS.values() for n in _names(rs)} - core
    hidden = sorted(m for m, ds in dists.items() if ds & optional and not ds & core)
    (purelib / "zz_hide_extras.pth").write_text(
        f"import sys; sys.modules.update(dict.fromkeys({hidden!r}))\n")
    return venv


@pytest.mark.slow
def test_installed_wheel_compiles_and_generates(scratch_venv, tmp_path):
    import models
    model_dir = models.tiny_llama_dir(tmp_path / "tiny-llama")

    work = tmp_path / "work"   # outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["KILN_CACHE_DIR"] = str(tmp_path / "cache")
    bin_ = scratch_venv / "bin"

    # kiln is the wheel's; what only extras install is not there.
    r = _run([bin_ / "python", "-c", "import importlib.util, kiln; print(kiln.__file__); "
              "print(*(m for m in ('fastapi', 'httpx', 'gguf', 'triton') "
              "if importlib.util.find_spec(m) is not None))"], cwd=work, env=env)
    where, present = r.stdout.splitlines()
    assert Path(where).is_relative_to(scratch_venv), where
    assert set(present.split()) <= {m for m in ("fastapi", "httpx", "gguf", "triton")
                                    if _module_distributions().get(m, set()) & _core_closure()}

    # `kiln rules` parses the rule grammar and every rule file.
    r = _run([bin_ / "kiln", "rules"], cwd=work, env=env)
    files = {line.split()[0] for line in r.stdout.splitlines()}
    assert files == {p.name for p in (REPO / PACKAGE_DIRS["kiln.passes"] / "rules").glob("*.kiln")}

    out = work / "out.kiln"
    r = _run([bin_ / "kiln", "compile", model_dir, "-t", "cpu", "-o", "out.kiln"], cwd=work, env=env)
    assert (out / "manifest.json").is_file() and (out / "wrapper.py").is_file(), r.stdout

    r = _run([bin_ / "kiln", "generate", "out.kiln", "--prompt", "hello kiln", "--max-tokens", "4",
              "--num-blocks", "16", "--max-model-len", "64", "--max-num-seqs", "2"],
             cwd=work, env=env)
    assert "4 tokens" in r.stderr, r.stderr
