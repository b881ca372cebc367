"""A Hugging Face Hub-compatible HTTP endpoint for tests, served on 127.0.0.1 by the test itself.

It implements only the routes `huggingface_hub` (2.x) calls to create a repo, upload files in one
commit, tag a commit, read refs, model info and trees, and download files through `/resolve/`:

    POST /api/repos/create                          create a repo (initial commit: .gitattributes)
    POST /api/validate-yaml                         model-card front matter check
    POST /api/models/{repo}/preupload/{rev}         answers "regular" for every file (no LFS, no xet)
    POST /api/models/{repo}/commit/{branch}         NDJSON: header, file (base64), deletedFile/Folder
    POST /api/models/{repo}/tag/{rev}               create a tag
    GET  /api/models/{repo}[/revision/{rev}]        model info (sha, siblings)
    GET  /api/models/{repo}/refs                    branches and tags
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (no pagination)
    HEAD/GET /{repo}/resolve/{rev}/{path}           file bytes with ETag, X-Repo-Commit, Content-Length

Errors carry the `X-Error-Code` header huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound). When `token` is set, writes and private repos need
`Authorization: Bearer <token>`. Every request is logged in `requests` for assertions.
Not implemented: LFS and xet transfers, pull requests, pagination, scoped tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>preupload|commit|tag|tree|revision|refs)"
                  r"(?:/(?P<rest>.*))?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's bytes (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> Commit:
        parent = self.branches.get(branch)
        seed = json.dumps([parent, message, len(self.commits), sorted((p, git_blob_sha1(b)) for p, b in files.items())])
        new = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, dict(files), message)
        self.commits[new.oid] = new
        self.branches[branch] = new.oid
        return new

    def resolve(self, rev: str) -> Commit | None:
        """A branch, a tag, or a commit id (full or an unambiguous prefix of 7+ characters)."""
        oid = self.branches.get(rev) or self.tags.get(rev)
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", rev):
            matches = [c for c in self.commits if c.startswith(rev)]
            oid = matches[0] if len(matches) == 1 else None
        return self.commits.get(oid) if oid else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.commit, self.extra = status, code, commit, extra or {}


class FakeHub:
    """In-memory repos behind a threaded HTTP server; use as a context manager or call start/stop."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what tests look at or set up directly ---------------------------------------------
    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        repo.commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        self.repos[repo_id] = repo
        return repo

    def files_at(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None, f"{repo_id} has no revision {rev}"
        return dict(commit.files)

    # --- route handlers: (method, match, body, handler) -> (status, headers, body) --------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes, authorized: bool):
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"), authorized)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if m := _API.match(path):
            repo = self._repo(unquote(m["repo"]), authorized)
            action, rest = m["action"], m["rest"] or ""
            rev, _, sub = rest.partition("/")
            rev, sub = unquote(rev), unquote(sub)
            if method == "GET" and action in (None, "revision"):
                return self._info(repo, rev or "main")
            if method == "GET" and action == "refs":
                return self._refs(repo)
            if method == "GET" and action == "tree":
                return self._tree(repo, rev, sub, query.get("recursive", ["False"])[0].lower() == "true")
            if method == "POST" and action in ("preupload", "commit", "tag"):
                if not authorized:
                    raise HubError(401, "Invalid credentials in Authorization header")
                handler = {"preupload": self._preupload, "commit": self._commit, "tag": self._tag}[action]
                return handler(repo, rev, body)
        if (m := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            repo = self._repo(unquote(m["repo"]), authorized)
            return self._resolve_file(repo, unquote(m["rev"]), unquote(m["path"]))
        raise HubError(404, f"no route {method} {path} in the fake hub")

    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _create(self, payload: dict, authorized: bool):
        if not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            # the Hub's 409 names the existing repo's url; create_repo(exist_ok=True) returns it
            raise HubError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.create_repo(repo_id, private)
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    @staticmethod
    def _validate_yaml(payload: dict):
        content = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else {}
        except yaml.YAMLError as exc:
            return 400, {}, {"errors": [{"message": f"invalid YAML: {exc}"}]}
        if not isinstance(meta, dict) or not isinstance(meta.get("model-index", []), list):
            return 400, {}, {"errors": [{"message": "metadata must be a mapping; model-index a list"}]}
        return 200, {}, {"errors": [], "warnings": []}

    def _info(self, repo: Repo, rev: str):
        commit = self._commit_at(repo, rev)
        siblings = [{"rfilename": p} for p in sorted(commit.files)]
        return 200, {}, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
                         "siblings": siblings, "tags": []}

    @staticmethod
    def _refs(repo: Repo):
        def refs(kind: str, table: dict[str, str]) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(table.items())]

        return 200, {}, {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags), "converts": []}

    def _tree(self, repo: Repo, rev: str, sub: str, recursive: bool):
        commit = self._commit_at(repo, rev)
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        entries, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
        if prefix and not entries and not folders:
            raise HubError(404, f"{sub} does not exist at {rev}", "EntryNotFound")
        dirs = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                for f in sorted(folders)]
        return 200, {}, dirs + entries

    def _preupload(self, repo: Repo, rev: str, body: bytes):
        commit = self._commit_at(repo, rev)
        files = json.loads(body)["files"]
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None}
                  for f in files]
        return 200, {}, {"files": answer, "commitOid": commit.oid}

    def _commit(self, repo: Repo, branch: str, body: bytes):
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[branch]].files)
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[branch]:
                    raise HubError(412, "A commit has happened since the parent commit")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"{key} operations (LFS/xet) are not supported by the fake hub")
        new = repo.commit(branch, files, message)
        return 200, {}, {"success": True, "commitOid": new.oid, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{new.oid}",
                         "hookOutput": "", "pullRequestUrl": None}

    def _tag(self, repo: Repo, rev: str, body: bytes):
        commit = self._commit_at(repo, rev)
        tag = json.loads(body)["tag"]
        if tag in repo.tags or tag in repo.branches:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        return 200, {}, {}

    def _resolve_file(self, repo: Repo, rev: str, path: str):
        commit = self._commit_at(repo, rev)
        if path not in commit.files:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound", commit=commit.oid)
        data = commit.files[path]
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit.oid,
                   "Content-Type": "application/octet-stream"}
        return 200, headers, data


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        auth = self.headers.get("Authorization")
        hub = self.hub
        authorized = hub.token is None or auth == f"Bearer {hub.token}"
        with hub.lock:
            hub.requests.append((method, split.path, auth))
            try:
                status, headers, payload = hub.handle(method, split.path, parse_qs(split.query), body, authorized)
            except HubError as exc:
                status, payload = exc.status, {"error": str(exc), **exc.extra}
                headers = {"X-Error-Message": str(exc)}
                if exc.code:
                    headers["X-Error-Code"] = exc.code
                if exc.commit:
                    headers["X-Repo-Commit"] = exc.commit
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")
