"""LoRA adapters as the serving app sees them: names, where they live, and which are available.

Owns the adapter name rule (a safe charset, no path separators, no `..`), the adapter root (`lora_root`: a local
folder, or an `s3://` / `gs://` / any fsspec URL, one PEFT directory per adapter name), path checks (a `lora_path`
must resolve inside the root: no traversal, no absolute paths elsewhere), listing the root, the ingress's registry
(name -> where its files are, with a generation that changes when a name is loaded again), and fetching a remote
adapter to a local folder for the engine. Errors are APIError with the status the HTTP API answers (400 for a bad
name or path, 404 for an unknown adapter). It never touches the engine, Ray or HTTP framing; the engine validates
the adapter's contents (ranks, targets, shapes) when it loads it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel

from raymoe.deployments.errors import APIError

log = logging.getLogger(__name__)

NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FILES = ("adapter_config.json", "adapter_model.safetensors")    # what a PEFT adapter directory must hold


def is_url(path: str) -> bool:
    return "://" in path


def valid_name(name: str) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name)) and ".." not in name


def check_name(name: str, param: str = "lora_name") -> str:
    """The name itself, or a 400 saying what a name may be."""
    if not valid_name(name):
        raise APIError(400, f"invalid adapter name {str(name)[:80]!r}: an adapter name is {NAME_RULE}", param,
                       "invalid_lora_name")
    return name


class AdapterRef(BaseModel):
    """One adapter the app serves: what a model replica needs to load it (and to see that it changed)."""
    name: str
    path: str               # a local directory or an fsspec URL
    generation: int = 0     # bumped when the name is loaded again (load_inplace): replicas reload it


def _fs(url: str):
    try:
        import fsspec
    except ImportError:
        raise APIError(400, f"{url}: adapters on remote storage need fsspec (and its s3fs / gcsfs backend) "
                            "installed on the serving nodes", "lora_path") from None
    return fsspec.core.url_to_fs(url)


class AdapterRoot:
    """The folder (or URL) that holds adapters, one subfolder per adapter name. None: no root configured."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        if root is None:
            self.base = None
        elif is_url(root):
            self.base = root.rstrip("/")
        else:
            self.base = os.path.realpath(root)

    def resolve(self, lora_path: str | None, name: str) -> str:
        """Where `lora_path` (relative to the root, or absolute / a URL inside it; None: <root>/<name>) points,
        or a 400 when it leaves the root or there is no root."""
        if self.base is None:
            raise APIError(400, "this server has no adapter root (lora_root): adapters can only be loaded from "
                                "paths inside it", "lora_path", "lora_root_not_configured")
        p = name if lora_path is None or lora_path == "" else lora_path
        outside = APIError(400, f"lora_path {str(p)[:200]!r} is outside the adapter root {self.root!r}",
                           "lora_path", "invalid_lora_path")
        if "\x00" in p:
            raise outside
        if is_url(self.base):
            if is_url(p):
                if not (p.rstrip("/") + "/").startswith(self.base + "/"):
                    raise outside
                rel = p.rstrip("/")[len(self.base) + 1:]
            elif p.startswith("/"):
                raise outside
            else:
                rel = p
            parts = [s for s in rel.split("/") if s not in ("", ".")]
            if not parts or ".." in parts or is_url(rel):
                raise outside
            return self.base + "/" + "/".join(parts)
        if is_url(p):
            raise outside
        full = os.path.realpath(os.path.join(self.base, p))       # absolute p replaces the root; links resolved
        if os.path.commonpath([full, self.base]) != self.base or full == self.base:
            raise outside
        return full

    def find_path(self, name: str) -> str:
        return self.base + "/" + name if is_url(self.base) else os.path.join(self.base, name)

    def find(self, name: str) -> str | None:
        """<root>/<name> when it holds an adapter (adapter_config.json), else None."""
        if self.base is None:
            return None
        path = self.find_path(name)
        return path if exists(path) else None

    def names(self) -> list[str]:
        """The adapter names under the root (subfolders with adapter_config.json and a valid name), sorted."""
        if self.base is None:
            return []
        try:
            if is_url(self.base):
                fs, inner = _fs(self.base)
                subs = [posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False)]
                return sorted(n for n in subs if valid_name(n) and fs.exists(f"{inner}/{n}/{FILES[0]}"))
            return sorted(e.name for e in os.scandir(self.base) if e.is_dir() and valid_name(e.name)
                          and os.path.isfile(os.path.join(e.path, FILES[0])))
        except (OSError, APIError) as e:        # an absent or unreachable root lists nothing (and says why once)
            log.warning("cannot list the adapter root %s: %s", self.root, e)
            return []


def exists(path: str) -> bool:
    """Whether `path` holds an adapter config (a local folder or a URL)."""
    if not is_url(path):
        return os.path.isfile(os.path.join(path, FILES[0]))
    try:
        fs, inner = _fs(path)
        return fs.exists(f"{inner}/{FILES[0]}")
    except APIError:
        raise
    except Exception as e:                       # noqa: BLE001 (an unreachable store: not there)
        log.warning("cannot check %s: %s", path, e)
        return False


def fetch(ref: AdapterRef, cache_dir: Path) -> str:
    """A local folder with the adapter's files: the path itself when local, else a copy under `cache_dir` (one per
    URL and generation, written atomically). Missing files are left for the engine's reader to name."""
    if not is_url(ref.path):
        return ref.path
    key = hashlib.sha256(f"{ref.path}\0{ref.generation}".encode()).hexdigest()[:16]
    out = cache_dir / f"{ref.name}-{key}"
    if (out / FILES[0]).is_file():
        return str(out)
    fs, inner = _fs(ref.path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ref.name}-", dir=cache_dir))
    try:
        for f in FILES:
            if fs.exists(f"{inner}/{f}"):
                fs.get(f"{inner}/{f}", str(tmp / f))
        tmp.rename(out)
    except OSError:
        if not (out / FILES[0]).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


class AdapterRegistry:
    """The ingress's adapters: `lora_modules` from the config and those loaded through POST /v1/load_lora_adapter
    (`loaded`), plus any folder found under the root on first use. A name unloaded through the API stays unknown
    (not found under the root again) until it is loaded again."""

    def __init__(self, root: AdapterRoot, modules: dict[str, str] | None = None) -> None:
        self.root = root
        self.known: dict[str, AdapterRef] = {n: AdapterRef(name=n, path=p) for n, p in (modules or {}).items()}
        self.loaded: set[str] = set(self.known)
        self.unloaded: set[str] = set()
        self._generation = 0

    def get(self, name: str) -> AdapterRef | None:
        """The adapter called `name`, looking under the root (I/O) when it is not known yet."""
        ref = self.known.get(name)
        if ref is None and name not in self.unloaded and valid_name(name):
            path = self.root.find(name)
            if path is not None:
                ref = self.known[name] = AdapterRef(name=name, path=path)
        return ref

    def next_ref(self, name: str, path: str) -> AdapterRef:
        """A ref for loading `name` from `path`, newer than any before (registered by put once it loaded)."""
        self._generation += 1
        return AdapterRef(name=name, path=path, generation=self._generation)

    def put(self, ref: AdapterRef) -> None:
        self.known[ref.name] = ref
        self.loaded.add(ref.name)
        self.unloaded.discard(ref.name)

    def remove(self, name: str) -> AdapterRef | None:
        ref = self.get(name)
        if ref is not None:
            del self.known[name]
            self.loaded.discard(name)
            self.unloaded.add(name)
        return ref

    def listing(self) -> list[AdapterRef]:
        """Every adapter available: known ones and the folders under the root (I/O), by name."""
        found = {n: AdapterRef(name=n, path=self.root.find_path(n)) for n in self.root.names()
                 if n not in self.unloaded and n not in self.known}
        return sorted([*self.known.values(), *found.values()], key=lambda r: r.name)
