"""Loopback Hugging Face Hub: a test double of the Hub's HTTP API, built on the standard library only.

No PyPI package provides a local hub that accepts uploads (see HF-STACK-NOTES, "Hub"), so tests that push and load
with the standard `huggingface_hub` / `transformers` API point `HF_ENDPOINT` (or `HfApi(endpoint=...)`) at this server.
Answers are modelled on what `huggingface_hub` 2.4 reads (`hf_api.py`, `file_download.py`, `_commit_api.py`,
`utils/_http.py::hf_raise_for_status`, which maps the `X-Error-Code` header to `RepositoryNotFoundError`,
`RevisionNotFoundError` and `EntryNotFoundError`).

Routes (`{type}` is `models`, `datasets` or `spaces`; revisions are branch names, url-encoded, or 40-hex commit shas):

    GET  /api/whoami-v2                             the test user (401 without the token)
    POST /api/repos/create                          409 (with `url`) when the repo exists
    POST /api/validate-yaml                         no errors, no warnings
    GET  /api/agent-harnesses                       empty registry (the client fetches it once a day)
    GET  /api/{type}/{repo_id}[/revision/{rev}]     repo info: id, sha, private, siblings
    GET  /api/{type}/{repo_id}/tree/{rev}[/{path}]  `recursive=true` lists the whole sub-tree
    POST /api/{type}/{repo_id}/paths-info/{rev}     form field `paths` (repeated)
    GET  /api/{type}/{repo_id}/refs                 branches only
    POST /api/{type}/{repo_id}/preupload/{rev}      every file `uploadMode: "regular"` (no LFS, no Xet)
    POST /api/{type}/{repo_id}/commit/{rev}         NDJSON: header, file (base64), deletedFile, deletedFolder
    POST /api/{type}/{repo_id}/branch/{branch}      from json `startingPoint` (default main); 409 when it exists
    HEAD|GET /[{type}/]{repo_id}/resolve/{rev}/{path}  file bytes with `X-Repo-Commit` and `ETag`

Errors: missing repo 404 `RepoNotFound`; private repo without the token 401 `RepoNotFound` (as the real hub);
missing revision 404 `RevisionNotFound`; missing file 404 `EntryNotFound`; writes without the token 401.

Storage under `storage_dir/{type}/{namespace}/{name}/`: `repo.json` (private flag, branch -> commit sha, commit log)
and `commits/{sha}/`, one immutable folder per commit, so an older sha stays downloadable as on the real hub.
A commit hard-links the parent commit's files into a new folder, then applies its operations. Files are served
from memory: this is for small test repos.

Standalone, for a demo: `python tests/hub_server.py --port 8765 --storage /tmp/hub` (serves until Ctrl-C).
"""

import argparse
import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit


DEFAULT_TOKEN = "hf_loopback_test_token"
DEFAULT_USER = "loopback"
REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
NAME = r"[A-Za-z0-9][\w.-]*"
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
# (method, pattern, handler): matched against the raw (still percent-encoded) path, groups are unquoted afterwards.
REPO = rf"/api/(?P<kind>models|datasets|spaces)/(?P<repo>{NAME}/{NAME})"
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("GET", REPO + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", REPO + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", REPO + r"/refs", "refs"),
    ("POST", REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", REPO + r"/branch/(?P<rev>[^/]+)", "create_branch"),
    ("GET", rf"/(?:(?P<kind>datasets|spaces)/)?(?P<repo>{NAME}/{NAME})/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class HubError(Exception):
    """An HTTP error answered the way the Hub does: `X-Error-Code` / `X-Error-Message` headers and a json body."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as the `ETag` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def new_commit_sha() -> str:
    return (uuid.uuid4().hex + uuid.uuid4().hex)[:40]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clean_path(path: str) -> str:
    """Reject absolute paths and `..` so that a commit cannot write outside its folder."""
    parts = path.strip("/").split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return "/".join(parts)


class RepoStore:
    """Repos on disk; one lock serialises every write (commits are small, tests are few)."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.lock = threading.Lock()

    def _dir(self, kind: str, repo_id: str) -> Path:
        return self.root / kind / repo_id

    def meta(self, kind: str, repo_id: str) -> dict:
        path = self._dir(kind, repo_id) / "repo.json"
        if not path.is_file():
            raise HubError(404, "Repository not found", "RepoNotFound")
        return json.loads(path.read_text())

    def _save(self, kind: str, repo_id: str, meta: dict) -> None:
        tmp = self._dir(kind, repo_id) / f"repo.json.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self._dir(kind, repo_id) / "repo.json")

    def resolve(self, meta: dict, rev: str) -> str:
        """Branch name or full commit sha -> commit sha."""
        if rev in meta["branches"]:
            return meta["branches"][rev]
        if COMMIT_SHA.fullmatch(rev) and rev in meta["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def snapshot(self, kind: str, repo_id: str, sha: str) -> Path:
        return self._dir(kind, repo_id) / "commits" / sha

    def create(self, kind: str, repo_id: str, private: bool) -> bool:
        """Create the repo with an initial `.gitattributes` commit on `main`, as the Hub does; False if it exists."""
        with self.lock:
            if (self._dir(kind, repo_id) / "repo.json").is_file():
                return False
            sha = new_commit_sha()
            self.snapshot(kind, repo_id, sha).mkdir(parents=True)
            (self.snapshot(kind, repo_id, sha) / ".gitattributes").write_bytes(GITATTRIBUTES)
            commit = {"title": "initial commit", "date": now(), "parents": []}
            self._save(kind, repo_id, {"private": private, "branches": {"main": sha}, "commits": {sha: commit}})
            return True

    def commit(self, kind: str, repo_id: str, branch: str, ops: list, header: dict) -> str:
        """Copy the branch head (hard links), apply `ops` [(key, path, bytes | None)], move the branch to it."""
        with self.lock:
            meta = self.meta(kind, repo_id)
            if branch not in meta["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = meta["branches"][branch]
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            sha = new_commit_sha()
            work = self.snapshot(kind, repo_id, f"tmp-{sha}")
            shutil.copytree(self.snapshot(kind, repo_id, head), work, copy_function=os.link)
            try:
                for key, path, data in ops:
                    target = work / path
                    if key == "file":
                        if target.is_dir():
                            shutil.rmtree(target)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.unlink(missing_ok=True)  # never write through a hard link shared with the parent
                        target.write_bytes(data)
                    elif key == "deletedFile" and target.is_file():
                        target.unlink()
                    elif key == "deletedFolder" and target.is_dir():
                        shutil.rmtree(target)
                    else:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            except BaseException:
                shutil.rmtree(work)
                raise
            work.rename(self.snapshot(kind, repo_id, sha))
            meta["branches"][branch] = sha
            meta["commits"][sha] = {"title": header.get("summary", ""), "date": now(), "parents": [head]}
            self._save(kind, repo_id, meta)
            return sha

    def create_branch(self, kind: str, repo_id: str, branch: str, starting_point: str) -> None:
        with self.lock:
            meta = self.meta(kind, repo_id)
            if branch in meta["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            meta["branches"][branch] = self.resolve(meta, starting_point)
            self._save(kind, repo_id, meta)


def entry(root: Path, path: Path) -> dict:
    """A tree / paths-info entry, as `RepoFile(**entry)` / `RepoFolder(**entry)` read it."""
    rel = path.relative_to(root).as_posix()
    if path.is_dir():
        return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel}
    return {"type": "file", "oid": git_blob_sha(path.read_bytes()), "size": path.stat().st_size, "path": rel}


class HubHandler(BaseHTTPRequestHandler):
    """One request: route it, check the token, answer json or file bytes, or the Hub's error headers."""

    server: "_Server"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("GET")  # same route and headers; `_send` leaves out the body

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        # Read the whole body first, even for a request about to be refused: closing a socket with unread data
        # sends a TCP reset, which can destroy the error response. The client always sends a Content-Length.
        self.body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            auth = self.headers.get("Authorization")
            self.authed = auth == f"Bearer {self.server.token}"
            if auth is not None and not self.authed:
                raise HubError(401, "Invalid credentials in Authorization header")
            for route_method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if name == "resolve":
                        args.setdefault("kind", "models")
                    return getattr(self, f"route_{name}")(**args)
            raise HubError(404, f"Not found: {method} {url.path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message}, headers)
        except Exception as e:  # a bug in the double: answer it rather than drop the connection
            self._send(500, {"error": f"{type(e).__name__}: {e}"}, {"X-Error-Message": type(e).__name__})

    def _send(self, status: int, body: Union[dict, list, bytes], headers: Optional[dict] = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _require_token(self) -> None:
        if not self.authed:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _read(self, kind: str, repo: str, rev: Optional[str] = None) -> tuple:
        """(meta, commit sha, snapshot folder) of a readable repo; private repos need the token."""
        meta = self.server.store.meta(kind, repo)
        if meta["private"] and not self.authed:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        sha = self.server.store.resolve(meta, rev or "main")
        return meta, sha, self.server.store.snapshot(kind, repo, sha)

    def _base_url(self, kind: str, repo: str) -> str:
        prefix = "" if kind == "models" else f"{kind}/"
        return f"http://{self.headers.get('Host', self.server.endpoint[len('http://'):])}/{prefix}{repo}"

    def route_whoami(self) -> None:
        self._require_token()
        access = {"displayName": "loopback test token", "role": "write"}
        self._send(200, {"type": "user", "name": self.server.user, "fullname": "Loopback Test User", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": access}})

    def route_create_repo(self) -> None:
        self._require_token()
        payload = json.loads(self.body or b"{}")
        name = payload.get("name", "")
        repo = name if "/" in name else f"{payload.get('organization') or self.server.user}/{name}"
        kind = REPO_TYPES.get(payload.get("type") or "model")
        if kind is None or not re.fullmatch(f"{NAME}/{NAME}", repo):
            raise HubError(400, f"Invalid repo name or type: {repo!r}, {payload.get('type')!r}")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        body = {"url": self._base_url(kind, repo), "name": repo, "id": repo}
        if not self.server.store.create(kind, repo, private):
            # The client reads `url` from this body too when `exist_ok=True`.
            return self._send(409, {**body, "error": f"You already created this {kind[:-1]} repo"})
        self._send(200, body)

    def route_validate_yaml(self) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def route_agent_harnesses(self) -> None:
        # Fetched once a day by the client to tag its user agent; an empty registry turns detection off.
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def route_repo_info(self, kind: str, repo: str, rev: Optional[str] = None) -> None:
        meta, sha, root = self._read(kind, repo, rev)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        siblings = [{"rfilename": p.relative_to(root).as_posix(), "size": p.stat().st_size} for p in files]
        self._send(200, {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                         "private": meta["private"], "disabled": False, "gated": False, "tags": [],
                         "lastModified": meta["commits"][sha]["date"], "siblings": siblings})

    def route_tree(self, kind: str, repo: str, rev: str, path: str = "") -> None:
        _, _, root = self._read(kind, repo, rev)
        base = root / clean_path(path) if path else root
        if not base.is_dir():
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        self._send(200, [entry(root, p) for p in sorted(base.rglob("*") if recursive else base.iterdir())])

    def route_paths_info(self, kind: str, repo: str, rev: str) -> None:
        paths = parse_qs(self.body.decode()).get("paths", [])
        _, _, root = self._read(kind, repo, rev)
        self._send(200, [entry(root, root / clean_path(p)) for p in paths if (root / clean_path(p)).exists()])

    def route_refs(self, kind: str, repo: str) -> None:
        meta, _, _ = self._read(kind, repo)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in sorted(meta["branches"].items())]
        self._send(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def route_preupload(self, kind: str, repo: str, rev: str) -> None:
        self._require_token()
        files = json.loads(self.body)["files"]
        _, _, root = self._read(kind, repo, rev)
        answer = []
        for file in files:
            # `oid` (git sha of the file already there) lets the client drop unchanged files from the commit.
            existing = root / clean_path(file["path"])
            oid = git_blob_sha(existing.read_bytes()) if existing.is_file() else None
            answer.append({"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": answer})

    def route_commit(self, kind: str, repo: str, rev: str) -> None:
        self._require_token()
        if self.query.get("create_pr", ["0"])[0] not in ("0", "false"):
            raise HubError(400, "The loopback hub does not support pull requests")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        self._read(kind, repo, rev)
        ops = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key not in ("file", "deletedFile", "deletedFolder"):
                raise HubError(400, f"Unsupported commit operation: {key!r} (the loopback hub answers `regular`)")
            data = base64.b64decode(value["content"]) if key == "file" else None
            ops.append((key, clean_path(value["path"]), data))
        sha = self.server.store.commit(kind, repo, rev, ops, lines[0]["value"])
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self._base_url(kind, repo)}/commit/{sha}",
                         "pullRequestUrl": None})

    def route_create_branch(self, kind: str, repo: str, rev: str) -> None:
        self._require_token()
        payload = json.loads(self.body or b"{}")
        self._read(kind, repo)
        if rev.startswith("refs/") or not re.fullmatch(r"[\w.\-/]+", rev):
            raise HubError(400, f"Invalid reference for a branch: {rev}")
        self.server.store.create_branch(kind, repo, rev, payload.get("startingPoint") or "main")
        self._send(200, {})

    def route_resolve(self, kind: str, repo: str, rev: str, path: str) -> None:
        _, sha, root = self._read(kind, repo, rev)
        file = root / clean_path(path)
        if not file.is_file():
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = file.read_bytes()
        # The client refuses a file without `X-Repo-Commit` and `ETag` (FileMetadataError), and checks the size.
        self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"'})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple, store: RepoStore, token: str, user: str, verbose: bool):
        super().__init__(address, HubHandler)
        self.store, self.token, self.user, self.verbose = store, token, user, verbose
        self.endpoint = f"http://{address[0]}:{self.server_address[1]}"


class LoopbackHub:
    """Serve a loopback Hub from `storage_dir` in a daemon thread.

    Example:

    ```python
    >>> with LoopbackHub(tmp_path) as hub:
    ...     api = HfApi(endpoint=hub.endpoint, token=hub.token)
    ...     api.create_repo("tiny")  # -> f"{hub.endpoint}/loopback/tiny"
    ```

    For a child process (`huggingface_hub` reads `HF_ENDPOINT` at import time) use `hub.child_env(hf_home)`.
    """

    def __init__(self, storage_dir: Union[str, Path], *, host: str = "127.0.0.1", port: int = 0,
                 token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER, verbose: bool = False):
        self.storage_dir, self.token, self.user = Path(storage_dir), token, user
        self._address, self._verbose = (host, port), verbose
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("The loopback hub is not running; use `with LoopbackHub(...) as hub:`.")
        return self._server.endpoint

    def start(self) -> "LoopbackHub":
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._server = _Server(self._address, RepoStore(self.storage_dir), self.token, self.user, self._verbose)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def child_env(self, hf_home: Union[str, Path], *, token: bool = True) -> dict:
        """`os.environ` for a child process that talks to this hub, with its own `HF_HOME` (caches, saved token)."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=self.endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        if token:
            env["HF_TOKEN"] = self.token
        return env


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a loopback Hugging Face Hub for tests and demos.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--storage", default="/tmp/loopback-hub")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    args = parser.parse_args()
    with LoopbackHub(args.storage, port=args.port, token=args.token, verbose=True) as hub:
        print(f"HF_ENDPOINT={hub.endpoint}\nHF_TOKEN={hub.token}\nstorage: {hub.storage_dir}  (Ctrl-C to stop)")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
