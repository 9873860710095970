"""What ``docker build -f docker/Dockerfile .`` sends into the image, computed without Docker.

The build context is filtered by ``docker/Dockerfile.dockerignore`` (BuildKit's Dockerfile-specific ignore
file). This module applies Docker's own rules to it, ported from the Go code that applies them:

* reading the file (moby/patternmatcher ``ignorefile.ReadAll``): a line starting with ``#`` is a comment,
  lines are trimmed, ``!`` marks an exception, each pattern is cleaned like Go's ``filepath.Clean`` and a
  leading ``/`` is dropped, so patterns are relative to the context root;
* matching (``patternmatcher``): Go ``filepath.Match`` syntax (``*`` and ``?`` stop at ``/``, ``[...]``
  classes, ``\\`` escapes) plus ``**`` for any number of folders; a pattern matches a path or any of its
  parent folders; the last pattern that matches decides, so a later ``!`` exception re-includes;
* walking the context (tonistiigi/fsutil ``filterFS.Walk``): each path is matched with its parent folder's
  results, and an excluded folder is not entered unless an exception could match inside it.

On a throw-away checkout (the repository's tracked files plus what a working copy accumulates: ``.git``, DVC's
``config.local``, cache and lock, the MLflow store, the virtualenv, resume state, caches, data, models, keys)
the tests check that no secret, cache or state reaches the builder, that exactly what the Dockerfile copies
does, and that every ``COPY`` source exists in the repository. The matcher itself is checked on the examples
of Docker's documentation.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import yaml

from helpers import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
IGNORE_FILE = REPO / "docker" / "Dockerfile.dockerignore"
PREFECT_YAML = REPO / "docker" / "prefect.yaml"


# ------------------------------------------------------------------------------- Docker's rules, ported
def go_clean(path: str) -> str:
    """Go's ``filepath.Clean`` on a slash-separated path (POSIX ``normpath`` keeps a leading ``//``; Go does not)."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def read_ignore_file(text: str) -> list[str]:
    """The patterns of a ``.dockerignore`` file, as Docker reads them."""
    patterns = []
    for number, line in enumerate(text.splitlines()):
        if number == 0:
            line = line.removeprefix("\ufeff")
        if line.startswith("#"):  # a comment only when ``#`` is in column 1
            continue
        line = line.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = go_clean(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
        patterns.append("!" + line if invert else line)
    return patterns


_REGEX_ESCAPED = set(".+()|{}$")  # regexp metacharacters that mean nothing to filepath.Match


@dataclass
class Pattern:
    """One pattern, compiled as patternmatcher does: exact, prefix (``foo**``), suffix (``**foo``) or regexp match."""

    text: str
    exclusion: bool
    kind: str = "exact"
    regex: Optional[re.Pattern[str]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        source, kind, pos, n, i = "^", "exact", 0, len(self.text), 0
        p = self.text
        while pos < n:
            ch = p[pos]
            pos += 1
            if ch == "*":
                if pos < n and p[pos] == "*":  # some flavour of **
                    pos += 1
                    if pos < n and p[pos] == "/":  # **/ is **
                        pos += 1
                    if pos == n:  # a trailing ** matches everything
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            source += ".*"
                            kind = "regexp"
                    else:
                        source += "(.*/)?"  # any number of folders, none included
                        kind = "regexp"
                    if i == 0:
                        kind = "suffix"
                else:
                    source += "[^/]*"
                    kind = "regexp"
            elif ch == "?":
                source += "[^/]"
                kind = "regexp"
            elif ch in _REGEX_ESCAPED:
                source += "\\" + ch
            elif ch == "\\":
                if pos < n:
                    source += "\\" + p[pos]
                    pos += 1
                    kind = "regexp"
                else:
                    source += "\\\\"
            elif ch in "[]":
                source += ch
                kind = "regexp"
            else:
                source += ch
            i += 1
        self.kind = kind
        if kind == "regexp":
            try:
                self.regex = re.compile(source + "$")
            except re.error as err:
                raise ValueError(f"bad .dockerignore pattern {self.text!r}: {err}") from None

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix[:1] == "/" and path == suffix[1:])
        assert self.regex is not None
        return self.regex.match(path) is not None


class Matcher:
    """patternmatcher's ``PatternMatcher`` with ``MatchesUsingParentResults``: the last matching pattern decides."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns: list[Pattern] = []
        for raw in patterns:
            text = raw.strip()
            if not text:
                continue
            text = go_clean(text)
            exclusion = text.startswith("!")
            if exclusion:
                if len(text) == 1:
                    raise ValueError('illegal exclusion pattern: "!"')
                text = text[1:]
            self.patterns.append(Pattern(text, exclusion))

    def matches(self, path: str, parent: Optional[list[bool]] = None) -> tuple[bool, list[bool]]:
        """Whether ``path`` is excluded, and the per-pattern results its children start from."""
        matched, info = False, [False] * len(self.patterns)
        for i, pattern in enumerate(self.patterns):
            hit = bool(parent) and parent[i]
            if not hit:
                if pattern.exclusion != matched:  # cannot change the outcome: not evaluated
                    continue
                hit = pattern.match(path)
                if not hit and not parent:  # no parent results: try the parent folders themselves
                    folders = posixpath.dirname(path)
                    if folders not in ("", "."):
                        parts = folders.split("/")
                        hit = any(pattern.match("/".join(parts[: k + 1])) for k in range(len(parts)))
            info[i] = hit
            if hit:
                matched = not pattern.exclusion
        return matched, info

    def excludes(self, path: str) -> bool:
        return self.matches(path)[0]


def _without_trailing_glob(pattern: Pattern) -> str:
    return pattern.text.removesuffix("/**").removesuffix("/*")


def context_files(root: Path, patterns: list[str]) -> set[str]:
    """The files (and links) of ``root`` that the build context carries, walked as BuildKit walks it."""
    matcher = Matcher(patterns)
    exceptions = [p for p in matcher.patterns if p.exclusion]
    only_prefix_exceptions = not any(set(_without_trailing_glob(p)) & set("*[]?^\\") for p in exceptions)
    sent: set[str] = set()

    def walk(folder: str, parent: Optional[list[bool]]) -> None:
        for entry in sorted(os.scandir(root / folder), key=lambda e: e.name):
            path = f"{folder}/{entry.name}" if folder else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            excluded, info = matcher.matches(path, parent)
            if excluded and is_dir and only_prefix_exceptions:
                # An excluded folder is skipped unless an exception names a path inside it.
                if not any((_without_trailing_glob(p) + "/").startswith(path + "/") for p in exceptions):
                    continue
            if is_dir:
                walk(path, info)
            elif not excluded:
                sent.add(path)

    walk("", None)
    return sent


# ------------------------------------------------------------------- the matcher on Docker's documented cases
def _excluded(patterns: list[str], paths: list[str]) -> list[str]:
    matcher = Matcher(patterns)
    return [p for p in paths if matcher.excludes(p)]


@pytest.mark.parametrize("patterns, paths, excluded", [
    # "*/temp*": names starting with temp in any immediate subfolder of the root
    (["*/temp*"], ["somedir/temporary.txt", "somedir/temp/x", "temporary.txt", "a/b/temp"],
     ["somedir/temporary.txt", "somedir/temp/x"]),
    # "*/*/temp*": two levels below the root
    (["*/*/temp*"], ["somedir/subdir/temporary.txt", "somedir/temporary.txt"], ["somedir/subdir/temporary.txt"]),
    # "temp?": one more character, in the root
    (["temp?"], ["tempa", "tempb", "temp", "tempab", "x/tempa"], ["tempa", "tempb"]),
    # "**/*.go": in every folder, the root included
    (["**/*.go"], ["main.go", "a/b/c.go", "a/b/c.gox"], ["main.go", "a/b/c.go"]),
    # an exception after the exclusion re-includes
    (["*.md", "!README.md"], ["README.md", "CHANGES.md"], ["CHANGES.md"]),
    # the last line that matches decides
    (["*.md", "!README*.md", "README-secret.md"], ["README.md", "README-secret.md", "NOTES.md"],
     ["README-secret.md", "NOTES.md"]),
    (["*.md", "README-secret.md", "!README*.md"], ["README.md", "README-secret.md", "NOTES.md"], ["NOTES.md"]),
    # a pattern matches the path or a parent folder; it is anchored at the context root
    (["foo/bar"], ["foo/bar", "foo/bar/baz", "foo/barbaz", "x/foo/bar"], ["foo/bar", "foo/bar/baz"]),
    # character classes and a trailing **
    (["*.py[cod]", "build**"], ["a.pyc", "a.py", "buildx/y", "b/build"], ["a.pyc", "buildx/y"]),
])
def test_the_matcher_follows_dockers_documented_rules(patterns, paths, excluded):
    assert _excluded(patterns, paths) == excluded


def test_reading_an_ignore_file_trims_comments_leading_slashes_and_cleans():
    text = "\ufefftest1\n/test2\n/a/file/here\n\nlastfile\n# a comment\n  # not a comment in column 1\n" \
           "! /inverted/abs/path\n./x/../y/\n!\n! \n"
    assert read_ignore_file(text) == ["test1", "test2", "a/file/here", "lastfile", "# not a comment in column 1",
                                      "!inverted/abs/path", "y", "!", "!"]
    with pytest.raises(ValueError, match="illegal exclusion"):
        Matcher(["!"])
    with pytest.raises(ValueError, match="bad .dockerignore pattern"):
        Matcher(["[abc"])


def test_the_walk_enters_an_excluded_folder_only_for_an_exception_inside_it(tmp_path):
    for name in ("docs/keep.md", "docs/drop.md", "src/a.py", "other/keep.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert context_files(tmp_path, ["*", "!src"]) == {"src/a.py"}
    assert context_files(tmp_path, ["docs", "!docs/keep.md"]) == {"docs/keep.md", "src/a.py", "other/keep.md"}
    # a wildcard exception may match anywhere, so excluded folders are walked
    assert context_files(tmp_path, ["*", "!**/keep.md"]) == {"docs/keep.md", "other/keep.md"}


# --------------------------------------------------------------------------------- this project's image
def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sorted(p for p in out.decode().split("\0") if p)


def copy_sources() -> list[str]:
    """The sources of every ``COPY`` in docker/Dockerfile (comments dropped, continuation lines joined, no flags)."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    sources = []
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        words = line.strip().split(None, 1)
        if not words:
            continue
        instruction, rest = words[0].upper(), (words[1] if len(words) > 1 else "")
        assert instruction != "ADD", "use COPY: ADD also fetches URLs and unpacks archives"
        if instruction == "COPY":
            args = json.loads(rest) if rest.lstrip().startswith("[") else rest.split()
            assert not any(a.startswith("--from") for a in args), "this Dockerfile has one stage"
            sources += [a for a in args if not a.startswith("--")][:-1]
    return sources


# What a working copy holds besides the tracked files: secrets, caches, state, data, at several depths.
UNWANTED = [
    ".git/config", ".git/HEAD", ".git/objects/ab/cdef0123", ".git/hooks/pre-commit",
    ".dvc/config.local", ".dvc/cache/files/md5/ab/cdef0123", ".dvc/tmp/rwlock", ".dvc/tmp/exps/run/x.json",
    "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/abc/artifacts/model/model.pkl",
    ".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".venv/pyvenv.cfg",
    ".state/student/0123abcd/epoch_00001/model.safetensors", ".state/teacher/.trash_epoch_00000_1/x",
    "__pycache__/conftest.cpython-311.pyc", "distill/__pycache__/io.cpython-311.pyc",
    "distill/stages/__pycache__/data.cpython-311.pyc", "distill/models/__pycache__/deit.cpython-311.pyc",
    "flows/__pycache__/stage.cpython-311.pyc", "tests/__pycache__/conftest.cpython-311-pytest-8.pyc",
    "distill/stray.pyc", "flows/old.pyo",
    "data/prepared/train_images.npy", "data/prepared/meta.json", "data/.prepared.old/meta.json",
    "models/teacher.safetensors", "models/student_mlflow/MLmodel", "soft_labels/logits_00000.npy",
    ".soft_labels.tmp-123/meta.json", ".dvc-params-ok", "distill.egg-info/PKG-INFO", ".pytest_cache/v/cache/x",
    ".ruff_cache/0.6/abc", "build/lib/distill/io.py",
    ".env", ".env.local", "distill/.env", "flows/.env.production", "docker/.env",
    "server.pem", "deploy.key", "certs/ca.pem", "distill/stages/leaked.key", "flows/config.local",
]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A realistic working copy: every tracked path of the repository, plus what ``UNWANTED`` lists."""
    root = tmp_path_factory.mktemp("checkout")
    for rel in tracked_files() + UNWANTED:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    return root


@pytest.fixture(scope="module")
def context(checkout: Path) -> set[str]:
    return context_files(checkout, read_ignore_file(IGNORE_FILE.read_text()))


def _under(path: str, source: str) -> bool:
    source = source.rstrip("/")
    return path == source or path.startswith(source + "/")


def test_no_secret_cache_or_state_reaches_the_image(context):
    assert sorted(set(UNWANTED) & context) == []
    parts = {part for path in context for part in path.split("/")}
    assert not parts & {".git", ".dvc", ".venv", ".state", "__pycache__", "mlruns", "mlartifacts", "mlflow.db",
                        ".env", "config.local", "soft_labels", "prepared"}
    assert not [p for p in context if p.endswith((".pyc", ".pyo", ".pem", ".key", ".safetensors", ".npy", ".db"))]


def test_the_context_holds_exactly_what_the_dockerfile_copies(context):
    sources = copy_sources()
    assert {"pyproject.toml", "README.md"} <= set(sources) and {"distill/", "flows/"} <= set(sources)
    needed = {p for p in tracked_files() if any(_under(p, s) for s in sources)}
    assert needed - context == set(), "a file the image needs would be left out"
    assert {p for p in context if not any(_under(p, s) for s in sources)} == set(), \
        "the context would carry files that no COPY uses"


def test_every_copy_source_is_in_the_repository_and_not_excluded(context):
    tracked = tracked_files()
    for source in copy_sources():
        assert source.rstrip("/") not in ("", ".") and not source.startswith(("/", "..")), \
            f"COPY {source}: copy named paths, never the whole context"
        assert [p for p in tracked if _under(p, source)], f"COPY {source}: not in the repository"
        assert [p for p in context if _under(p, source)], f"COPY {source}: excluded from the build context"


# ----------------------------------------------------------------------------- the deployment's run time
def _step(step: dict) -> tuple[str, dict]:
    ((name, args),) = step.items()
    return name.rsplit(".", 1)[-1], args


def test_the_repository_is_cloned_at_run_time_and_dvc_runs_in_the_clone():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    steps = [_step(s) for s in spec["pull"]]
    assert [name for name, _ in steps] == ["set_working_directory", "git_clone", "set_working_directory",
                                           "run_shell_script"]
    workspace, clone, into_clone, pull = (args for _, args in steps)
    assert into_clone["directory"] == f"{{{{ {clone['id']}.directory }}}}"
    assert pull["script"] == "dvc pull --allow-missing"
    # the container's command pushes from the same clone
    clone_dir = f"{workspace['directory']}/{clone['clone_directory_name']}"
    for deployment in spec["deployments"]:
        command = deployment["work_pool"]["job_variables"]["command"]
        assert command.index("prefect flow-run execute") < command.index(f"cd {clone_dir} && dvc push")
    # no credential is written down: only references, filled in at deploy or run time
    assert "access_token" not in clone
    for key in ("repository", "credentials", "commit_sha"):
        assert re.fullmatch(r"\{\{ \$[A-Z_]+ \}\}", clone[key]), (key, clone[key])
    for deployment in spec["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert not [k for k in env if re.search("SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", k)]


def test_a_credentials_block_is_stored_by_name_and_read_at_run_time(monkeypatch):
    """Prefect's own templating: ``prefect deploy`` stores the block reference, the flow run fills in the rest."""
    from prefect.utilities.templating import PlaceholderType, apply_values, find_placeholders

    clone_step = yaml.safe_load(PREFECT_YAML.read_text())["pull"][1]
    block = "{{ prefect.blocks.github-credentials.distill-repo }}"
    for var in ("DISTILL_GIT_REPOSITORY", "DISTILL_GIT_COMMIT", "DISTILL_GIT_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)
    # `prefect deploy`, as prefect/cli/deploy does to pull steps
    monkeypatch.setenv("DISTILL_GIT_REPOSITORY", "https://git.example.com/org/distill.git")
    monkeypatch.setenv("DISTILL_GIT_CREDENTIALS", block)
    stored = apply_values(clone_step, {}, remove_notset=False)["prefect.deployments.steps.git_clone"]
    assert stored["repository"] == "https://git.example.com/org/distill.git" and stored["credentials"] == block
    assert stored["commit_sha"] == "{{ $DISTILL_GIT_COMMIT }}"  # left for the image's environment
    # the flow run, in the container: its environment, then Prefect resolves the block from its API
    monkeypatch.delenv("DISTILL_GIT_REPOSITORY")
    monkeypatch.delenv("DISTILL_GIT_CREDENTIALS")
    monkeypatch.setenv("DISTILL_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    at_run = apply_values(stored, dict(os.environ))
    assert at_run["commit_sha"] == "0123456789abcdef0123456789abcdef01234567"
    assert [p.type for p in find_placeholders(at_run["credentials"])] == [PlaceholderType.BLOCK_DOCUMENT]
    # nothing named at deploy time: an empty value, which git_clone takes as "no credentials"
    bare = apply_values(apply_values(clone_step, {}, remove_notset=False), dict(os.environ))
    assert bare["prefect.deployments.steps.git_clone"]["credentials"] == ""


def test_the_kubernetes_job_variables_fit_the_job_template():
    """What ``prefect work-pool create`` and ``prefect deploy`` check, without a server."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools.validation import validate

    template = json.loads((REPO / "docker" / "k8s-gpu-job-template.json").read_text())
    WorkPoolCreate(name="distill-k8s", type="kubernetes", base_job_template=template)  # placeholders are declared
    (k8s,) = [d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "k8s-gpu"]
    assert validate(k8s["work_pool"]["job_variables"], template["variables"], preprocess=True,
                    ignore_required=True) == []
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "{{ credentials_secret }}", "optional": True}}]
