"""A local stand-in for the Hugging Face Hub API: just what ``huggingface_hub`` calls to create a repository,
a branch and a commit (HF_NOTES §6), served over HTTP on 127.0.0.1.

Every file is answered "regular" by the preupload endpoint, so commits carry their files inline (base64 in the
ndjson payload) and no LFS or Xet transfer is involved. Committed files land in ``root/<namespace>/<name>/<branch>/``.
``HubStandIn.reject_commits`` makes the next commits fail with 403, as the Hub does without write access.
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubStandIn:
    """``with HubStandIn(root, token) as hub:`` serves at ``hub.endpoint``; ``hub.repos`` and ``hub.commits`` record."""

    user = "stand-in-user"

    def __init__(self, root, token="hf_stand_in_token"):
        self.root = Path(root)
        self.token = token
        self.repos = {}  # repo_id -> {"private": bool, "branches": set}
        self.commits = []  # {"repo_id", "revision", "summary", "files": [paths]}
        self.requests = []  # (method, path)
        self.reject_commits = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def folder(self, repo_id, revision="main"):
        return self.root / repo_id / revision

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------------------------------------------------

    def _handler(hub):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                self._reply(404, {"error": "not served by the stand-in"}, error_code="EntryNotFound")

            do_GET = do_HEAD

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                parts = [unquote(part) for part in urlparse(self.path).path.strip("/").split("/")]
                if parts == ["api", "repos", "create"]:
                    return self._create_repo(json.loads(body))
                if parts == ["api", "validate-yaml"]:
                    return self._reply(200, {"errors": [], "warnings": []})
                if len(parts) == 6 and parts[:2] == ["api", "models"]:
                    repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"}, error_code="RepoNotFound")
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                        return self._reply(200, {"files": modes})
                    if action == "branch":
                        hub.repos[repo_id]["branches"].add(revision)
                        return self._reply(200, {})
                    if action == "commit":
                        return self._commit(repo_id, revision, body)
                return self._reply(404, {"error": f"the stand-in does not serve {self.path}"})

            def _create_repo(self, payload):
                repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
                if repo_id in hub.repos:
                    url = f"{hub.endpoint}/{repo_id}"
                    return self._reply(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {"main"}}
                return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

            def _commit(self, repo_id, revision, body):
                if hub.reject_commits:
                    return self._reply(403, {"error": "You don't have the rights to create a commit in this repo"})
                if revision not in hub.repos[repo_id]["branches"]:
                    return self._reply(404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound")
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = [line["value"] for line in lines if line["key"] == "file"]
                if any(line["key"] not in ("header", "file") for line in lines):
                    return self._reply(400, {"error": "the stand-in only takes inline (regular) files"})
                for entry in files:
                    target = hub.folder(repo_id, revision) / entry["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(entry["content"]))
                paths = sorted(f["path"] for f in files)
                hub.commits.append({"repo_id": repo_id, "revision": revision, "summary": header["summary"], "files": paths})
                oid = f"{len(hub.commits):040x}"
                url = f"{hub.endpoint}/{repo_id}/commit/{oid}"
                return self._reply(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

            def _reply(self, status, payload, error_code=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                if status >= 400:
                    self.send_header("X-Error-Message", payload.get("error", ""))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
