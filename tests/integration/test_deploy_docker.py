"""deploy/docker (issue 8): the Dockerfile, .dockerignore and the image's install steps.

No Docker engine runs here, so the image is never built. Instead:

* the Dockerfile is parsed: its stages and base images, the final stage's user and entry
  point, and every file it copies from the build context (the repository root), which must
  exist and must not be excluded by .dockerignore;
* the build stage's install step (``deploy/docker/install.sh``) runs as written, on a copy of
  exactly the files the build stage copies, into a fresh virtualenv made by the same Python
  minor version as the distroless runtime image (3.11; Debian 12's own /usr/bin/python3.11 when
  it is there, as in the image); then that virtualenv's ``edgeterm`` checks and serves the
  image's sample config (deploy/docker/edgeterm.toml) with certificates and ticket keys laid
  out as they are mounted in the container.

The install downloads edgeterm's dependencies from PyPI (or pip's cache): about 30 s.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.support.certs import CertSet
from tests.support.launcher import READY_RE

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
SAMPLE = DOCKER / "edgeterm.toml"
IMAGE_ETC = "/etc/edgeterm"
IMAGE_PYTHON = (3, 11)  # gcr.io/distroless/python3-debian12


# --- parsing ----------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        if self.args.startswith("["):
            return {}, list(json.loads(self.args))
        words = shlex.split(self.args)
        flags = {}
        while words and words[0].startswith("--"):
            key, _, value = words.pop(0)[2:].partition("=")
            flags[key] = value
        return flags, words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions (line continuations joined, comments dropped)."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append((start, buf + line))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, f"line {number}: FROM {args}"
            stages.append(Stage(m[1], m[2]))
        else:
            assert stages or keyword in ("ARG",), f"line {number}: {keyword} before FROM"
            if stages:
                stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    return stages


def dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        out.append((negate, pattern))
    return out


def _matches(pattern: str, path: str) -> bool:
    """Docker's rule: the pattern matches the path or one of its parent directories; ``**``
    matches any number of directories."""
    parts = path.split("/")
    regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))


def sent_to_builder(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether ``path`` (relative to the context) is in the build context: the last matching
    pattern decides."""
    included = True
    for negate, pattern in patterns:
        if _matches(pattern, path):
            included = negate
    return included


def context_files(source: Path) -> list[str]:
    if source.is_file():
        return [str(source.relative_to(REPO))]
    return [
        str(p.relative_to(REPO))
        for p in sorted(source.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    ]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def context_copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context."""
    out = []
    for ins in stage.all("COPY") + stage.all("ADD"):
        flags, words = ins.flags_and_words()
        if "from" not in flags:
            out.append((words[:-1], words[-1]))
    return out


# --- the Dockerfile ---------------------------------------------------------------------------


def test_stages_and_base_images(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage: a build stage and the runtime"
    build, final = stages[0], stages[-1]
    assert build.name == "build"
    # the build stage's Python must be the runtime's: both Debian 12 (bookworm), Python 3.11
    assert re.fullmatch(r"(docker\.io/)?(library/)?debian:(12|bookworm)(-slim)?(@\S+)?", build.base)
    assert re.fullmatch(r"gcr\.io/distroless/python3-debian12(:[\w.-]+)?(@\S+)?", final.base)
    for ins in build.all("ENV"):
        if "PYTHON=" in ins.args:
            assert "PYTHON=/usr/bin/python3.11" in ins.args


def test_final_stage_holds_only_the_install(stages: list[Stage]) -> None:
    final = stages[-1]
    assert not final.all("RUN"), "distroless has no shell: no RUN in the final stage"
    assert not context_copies(final), "the final stage copies only from the build stage"
    names = {s.name for s in stages[:-1]}
    for ins in final.all("COPY"):
        flags, _ = ins.flags_and_words()
        assert flags.get("from") in names, ins


def test_runs_as_non_root(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), user
    assert user in ("nonroot", "65532")


def test_entrypoint_starts_in_the_foreground_with_the_mounted_config(stages: list[Stage]) -> None:
    final = stages[-1]
    [entry] = final.all("ENTRYPOINT")
    assert entry.args.startswith("["), "exec form: there is no shell to run a string"
    argv = json.loads(entry.args)
    assert argv[1:] == ["start", "--foreground", "-c", f"{IMAGE_ETC}/edgeterm.toml"]
    # the binary is in the prefix the build stage installs into and the final stage copies
    prefix = install_prefix(stages[0])
    assert argv[0] == f"{prefix}/bin/edgeterm"
    assert any(ins.flags_and_words()[1][0] == prefix for ins in final.all("COPY"))
    for check in final.all("HEALTHCHECK"):
        assert "CMD [" in check.args, "exec form"


def test_healthcheck_is_status_ready(stages: list[Stage]) -> None:
    """Healthy means every worker accepts connections, not just that the supervisor answers."""
    [check] = stages[-1].all("HEALTHCHECK")
    argv = json.loads(check.args[check.args.index("CMD [") + len("CMD ") :])
    prefix = install_prefix(stages[0])
    config = f"{IMAGE_ETC}/edgeterm.toml"
    assert argv == [f"{prefix}/bin/edgeterm", "status", "--ready", "-c", config]
    timeout = re.search(r"--timeout=(\d+)s", check.args)
    assert timeout and int(timeout[1]) >= 2, "an exec of Python needs more than a second"


def test_every_copied_path_exists_and_is_in_the_build_context(stages: list[Stage]) -> None:
    patterns = dockerignore_patterns()
    copies = [c for s in stages for c in context_copies(s)]
    assert copies
    for sources, _dest in copies:
        for src in sources:
            path = REPO / src
            assert path.exists(), f"COPY {src}: no such file in the build context"
            files = context_files(path)
            assert files, f"COPY {src}: nothing to copy"
            excluded = [f for f in files if not sent_to_builder(f, patterns)]
            assert not excluded, f"COPY {src}: excluded by .dockerignore: {excluded}"


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = dockerignore_patterns()
    for path in (".git/HEAD", ".venv/bin/python", "tests/__init__.py", "etc/certs/x.key"):
        assert not sent_to_builder(path, patterns), path
    assert not sent_to_builder("edgeterm/__pycache__/cli.cpython-311.pyc", patterns)
    assert sent_to_builder("edgeterm/cli.py", patterns)


def install_prefix(build: Stage) -> str:
    [run] = [i for i in build.all("RUN") if "install.sh" in i.args]
    words = shlex.split(run.args)
    return words[words.index("deploy/docker/install.sh") + 1]


# --- the install steps, for real ---------------------------------------------------------------


def image_python() -> str:
    """Debian 12's python3.11 (what the image has) if it can make a venv, else this one."""
    for candidate in ("/usr/bin/python3.11", sys.executable):
        r = subprocess.run(
            [candidate, "-c", "import ensurepip, sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode == 0 and r.stdout.strip() == str(IMAGE_PYTHON):
            return candidate
    pytest.skip(f"no Python {IMAGE_PYTHON} with venv support to match the image")


def etc_tree(
    config_text: str,
    root: Path,
    certs: CertSet,
    *,
    upstream: str = "127.0.0.1:9",
    etc: str = IMAGE_ETC,
    run_dir: str = "/run/edgeterm",
) -> Path:
    """Lay out ``config_text`` (a config written for the container) under ``root`` as it is
    mounted there: every path under ``etc`` or ``run_dir`` moves into ``root``, the
    certificates and ticket key files it names are created, the listener binds a free port on
    127.0.0.1 and the upstream is ``upstream``. Returns the config's path."""
    cfg: dict[str, Any] = tomllib.loads(config_text)
    etc_root, run_root = root / "etc", root / "run"

    def move(p: str) -> Path:
        if p.startswith(etc + "/"):
            return etc_root / p[len(etc) + 1 :]
        if p.startswith(run_dir + "/"):
            return run_root / p[len(run_dir) + 1 :]
        raise AssertionError(f"{p} is neither under {etc} nor {run_dir}")

    server = cfg.setdefault("server", {})
    for key in ("pidfile", "admin_socket"):
        server[key] = str(move(server[key]))
    for entry in cfg["tls"]["certificates"]:
        for key, source in (("cert", certs.default.cert), ("key", certs.default.key)):
            if key in entry:
                target = move(entry[key])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                entry[key] = str(target)
    tickets = cfg["tls"].get("tickets", {})
    moved = []
    for name in tickets.get("key_files", []):
        target = move(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(os.urandom(80))
        target.chmod(0o600)
        moved.append(str(target))
    if moved:
        tickets["key_files"] = moved
    for listener in cfg["listeners"]:
        listener["bind"] = "127.0.0.1:0"
    for pool in cfg["upstreams"].values():
        pool["servers"] = [upstream]
    run_root.mkdir(parents=True, exist_ok=True)
    path = move(f"{etc}/edgeterm.toml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory, stages: list[Stage]) -> Path:
    """The build stage, replayed: its context COPYs into a scratch /src, then its RUN."""
    build = stages[0]
    root = tmp_path_factory.mktemp("image")
    src = root / "src"
    workdir = "/"
    for ins in build.instructions:
        if ins.keyword == "WORKDIR":
            workdir = ins.args
        elif ins.keyword == "COPY" and "from" not in ins.flags_and_words()[0]:
            _flags, words = ins.flags_and_words()
            *sources, dest = words
            assert workdir == "/src", "the build stage copies into /src"
            target = src / dest.rstrip("/") if dest not in ("./", ".") else src
            for s in sources:
                path = REPO / s
                if path.is_dir():
                    shutil.copytree(
                        path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                    )
                else:
                    to = target / path.name if dest.endswith("/") else target
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, to)
    prefix = install_prefix(build)
    [run] = [i for i in build.all("RUN") if "install.sh" in i.args]
    argv = [
        w.replace(prefix, str(root / prefix.lstrip("/"))).replace("/src", str(src))
        if w.startswith("/")
        else w
        for w in shlex.split(run.args)
    ]
    env = dict(os.environ, PYTHON=image_python(), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run(
        argv,
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, f"{argv} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return root / prefix.lstrip("/")


pytestmark_install = pytest.mark.timeout(500)


@pytestmark_install
def test_installed_edgeterm_is_self_contained(image_venv: Path) -> None:
    python = image_venv / "bin" / "python"
    r = subprocess.run(
        [str(python), "-c", "import sys, edgeterm; print(sys.version_info[:2], edgeterm.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(IMAGE_PYTHON)), r.stdout
    assert str(image_venv) in r.stdout, f"edgeterm imported from outside the venv: {r.stdout}"


# What `python -m venv` seeds and what a build needs; none of it belongs in the image.
NOT_IN_THE_IMAGE = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel")


def site_packages(venv: Path) -> Path:
    [site] = (venv / "lib").glob("python3.*/site-packages")
    return site


def dependency_closure(dists: dict[str, Any], root: str) -> set[str]:
    """The canonical names of ``root`` and everything it requires, transitively, with the
    extras each requirement asks for and the markers evaluated for this Python (the image's
    minor version)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, str]] = set()
    todo = [(canonicalize_name(root), "")]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        assert name in dists, f"{name} is required but not installed"
        for text in dists[name].requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            dep = canonicalize_name(req.name)
            todo += [(dep, "")] + [(dep, e) for e in req.extras]
    return {name for name, _ in seen}


@pytestmark_install
def test_the_venv_holds_exactly_edgeterm_and_its_dependencies(image_venv: Path) -> None:
    """No pip, setuptools, pkg_resources or _distutils_hack (what `python -m venv` seeds);
    every installed distribution is in edgeterm's dependency closure, and every file in
    site-packages belongs to one of them."""
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name

    site = site_packages(image_venv)
    dists = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[str(site)])}
    closure = dependency_closure(dists, "edgeterm")
    assert set(dists) == closure, f"not required by edgeterm: {sorted(set(dists) - closure)}"
    for name in NOT_IN_THE_IMAGE:
        assert name not in dists, name
        assert not list(site.glob(f"{name}*")), f"{name} in {site}"
    assert not list(site.glob("*.pth")), "no .pth hooks (distutils-precedence.pth, ...)"
    owned = {
        Path(str(f)).parts[0]
        for d in dists.values()
        for f in d.files or []
        if not str(f).startswith("..")
    }
    unowned = sorted(p.name for p in site.iterdir() if p.name not in owned)
    assert not unowned, f"files in site-packages that no installed distribution owns: {unowned}"
    scripts = {
        Path(str(f)).name
        for d in dists.values()
        for f in d.files or []
        if str(f).startswith("../../../bin/")
    }
    for exe in (image_venv / "bin").iterdir():
        assert exe.name in scripts or re.fullmatch(
            r"python3?(\.\d+)?|activate.*|Activate\.ps1", exe.name
        ), f"bin/{exe.name}: not a script of edgeterm's dependencies"
    assert "edgeterm" in scripts


@pytestmark_install
def test_sample_config_checks_and_serves(image_venv: Path, certs: CertSet, tmp_path: Path) -> None:
    config = etc_tree(SAMPLE.read_text(), tmp_path, certs)
    exe = str(image_venv / "bin" / "edgeterm")
    r = subprocess.run(
        [exe, "check-config", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr
    # and the installed server starts and stops (every dependency is there)
    proc = subprocess.Popen(
        [exe, "start", "--foreground", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    lines = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))
            if READY_RE.search(lines[-1]) or len(lines) > 200:
                break
        assert any(READY_RE.search(line) for line in lines), "".join(lines)
    finally:
        proc.terminate()
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
            raise
    assert code == 0, "".join(lines)


def test_sample_config_matches_the_image() -> None:
    cfg = tomllib.loads(SAMPLE.read_text())
    assert cfg["server"]["pidfile"].startswith("/run/edgeterm/")
    assert cfg["server"]["admin_socket"].startswith("/run/edgeterm/")
    for entry in cfg["tls"]["certificates"]:
        assert all(p.startswith(IMAGE_ETC + "/") for p in entry.values())
    assert all(p.startswith(IMAGE_ETC + "/") for p in cfg["tls"]["tickets"]["key_files"])
    expose = [i for s in parse_dockerfile(DOCKERFILE.read_text())[-1:] for i in s.all("EXPOSE")]
    ports = {int(w.split("/")[0]) for i in expose for w in i.args.split()}
    assert {int(li["bind"].rpartition(":")[2]) for li in cfg["listeners"]} <= ports
    assert fnmatch.fnmatch(cfg["listeners"][0]["bind"], "0.0.0.0:*")
