"""lean_relora.hub: a local directory, a missing path, and a hub that answers (a fake one on a local port). A hub
that does not answer, or an offline machine, with or without the model in the local cache: tests/test_pretrained.py."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import TIMED_CLI
from tiny_models import save_tiny_model
from transformers import AutoTokenizer

from lean_relora.hub import HubError, locate


def test_a_local_directory_is_used_as_it_is_and_a_missing_path_is_named_as_such(tmp_path):
    assert locate(str(tmp_path)) == {}
    with pytest.raises(HubError, match="^no such local directory; give an existing directory or a hub name"):
        locate(str(tmp_path / "moved_away"))


class FakeHub(http.server.BaseHTTPRequestHandler):
    """A hub serving one repository, org/tiny, from a local directory: HEAD and GET of /ORG/NAME/resolve/REV/FILE
    (what a download takes), and "not found" for any listing under /api (transformers looks for optional folders).
    Every path asked for is recorded."""

    repo, requests = None, []

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool):
        FakeHub.requests.append((self.command, self.path))
        if self.path.startswith("/api/models/org/tiny/"):  # a listing of a folder the repository does not have
            return self.fail("EntryNotFound")
        parts = self.path.split("/")  # "", org, name, "resolve", revision, file
        if parts[1:3] != ["org", "tiny"]:
            return self.fail("RepoNotFound")
        file = FakeHub.repo / parts[5]
        if len(parts) != 6 or not file.is_file():
            return self.fail("EntryNotFound")
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", "1" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def fail(self, code: str):
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_hub_model_trains_and_its_memory_estimate_downloads_its_config_alone(tmp_path):
    FakeHub.repo, FakeHub.requests = save_tiny_model("qwen2", tmp_path / "repo"), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    argvs = [["memory-estimate", "recipes/7b_8gb.toml", "--set", f"model.pretrained={name}", "--json"]
             for name in ("org/tiny", "org/none")]
    argvs.append(["train", "--set", "model.pretrained=org/tiny", "--run-dir", str(tmp_path / "run"), "--max-steps",
                  "1", "--set", "train.device='cpu'", "--set", "data.max_documents=50", "--set", "eval.batches=1"])
    try:
        result = subprocess.run([sys.executable, "-c", TIMED_CLI, json.dumps(argvs)], capture_output=True, text=True,
                                env=env, timeout=120, cwd=Path(__file__).parent.parent)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    found, missing, trained = json.loads(result.stdout)
    assert found["code"] == 0, found["stderr"]
    assert json.loads(found["stdout"])["phases"][0]["components"]["frozen base (stored)"] > 0
    # The commands ran in turn: the requests before the first about org/none are the estimate's.
    estimate = FakeHub.requests[:next(i for i, (_, path) in enumerate(FakeHub.requests) if "/org/none/" in path)]
    downloads = {path for method, path in estimate if method == "GET" and "/resolve/" in path}
    assert downloads == {"/org/tiny/resolve/main/config.json"}  # no weight, no tokenizer: the config alone
    assert trained["code"] == 0, trained["stderr"]
    assert ("GET", "/org/tiny/resolve/main/model.safetensors") in FakeHub.requests
    copy, own = (AutoTokenizer.from_pretrained(d) for d in (tmp_path / "run" / "tokenizer", FakeHub.repo))
    assert copy.get_vocab() == own.get_vocab()  # the run keeps the model's own tokenizer
    assert missing["code"] == 2 and missing["stderr"].strip() == (
        "error: model.pretrained = 'org/none': not a local directory, and as a hub name there is no such repository "
        "on the hub (a private one needs hf auth login); check the spelling")
