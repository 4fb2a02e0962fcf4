"""lean_relora.hub: a local directory, a missing path, a hub name in the local cache or nowhere, with the network
made unreachable in a subprocess (the hub endpoint a closed local port, or HF_HUB_OFFLINE=1)."""

import json
import os
import subprocess
import sys

import pytest

from lean_relora.hub import HubError, locate


def test_a_local_directory_is_used_as_it_is_and_a_missing_path_is_named_as_such(tmp_path):
    assert locate(str(tmp_path)) == {}
    with pytest.raises(HubError, match="^no such local directory; give an existing directory or a hub name"):
        locate(str(tmp_path / "moved_away"))


LOCATE = """
import json, sys, time
from lean_relora.hub import HubError, locate
from lean_relora.model import pretrained_config
out = {}
for name in ("org/cached", "org/uncached"):
    started = time.perf_counter()
    try:
        found = locate(name)
        out[name] = {"found": found, "vocab_size": pretrained_config(name).vocab_size}
    except HubError as e:
        out[name] = {"error": str(e)}
    out[name]["seconds"] = time.perf_counter() - started
print(json.dumps(out))
"""


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "hub unreachable"])
def test_without_the_hub_a_cached_name_loads_from_the_cache_and_an_uncached_one_fails_fast(tmp_path, offline):
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 123}))
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_OFFLINE": "1" if offline else "0"}
    result = subprocess.run([sys.executable, "-c", LOCATE], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["org/cached"]["found"] == {"local_files_only": True} and out["org/cached"]["vocab_size"] == 123
    why = ("it is not in the local hub cache while the machine is offline (HF_HUB_OFFLINE=1)" if offline else
           "the hub (http://127.0.0.1:9) is unreachable (ConnectError) and it is not in the local cache")
    assert out["org/uncached"]["error"].startswith(f"not a local directory, and as a hub name {why}")
    assert out["org/uncached"]["seconds"] < 5.0
