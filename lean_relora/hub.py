"""Where a pretrained model or tokenizer comes from: a local directory or a hub name, told apart before transformers
is asked to load it, so that a wrong path or an unreachable hub fails in seconds with one line.

transformers alone reports a missing local directory as a malformed repo id, and an unreachable hub after five
retries with backoff (30-55 s, and a screen of network warnings). Here a hub name is probed once, with a short
timeout and no retries; an offline machine (HF_HUB_OFFLINE=1) or an unreachable hub falls back to the local hub
cache, and only a name that is in neither fails.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

PROBE_TIMEOUT = 3.0  # seconds the one reachability probe of the hub may take
CONFIG = "config.json"  # the file every transformers model repository holds
TOKENIZER = "tokenizer_config.json"  # the file every transformers tokenizer repository holds


class HubError(ValueError):
    """A model or tokenizer that cannot be found; the message says which case it is and what to do (callers put the
    recipe key in front)."""


def locate(name: str, marker: str = CONFIG) -> dict:
    """The keyword arguments for transformers' from_pretrained(name): {} for a local directory or a reachable hub
    name, {"local_files_only": True} for a hub name that only the local cache holds. `marker` is a file the
    repository must have. HubError otherwise."""
    if Path(name).expanduser().is_dir():
        return {}
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise HubError("no such local directory; give an existing directory or a hub name such as "
                       "Qwen/Qwen2.5-0.5B") from None
    cached = isinstance(try_to_load_from_cache(name, marker), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return {"local_files_only": True}
        raise HubError("not a local directory, and as a hub name it is not in the local hub cache while the machine "
                       "is offline (HF_HUB_OFFLINE=1); download it where the hub is reachable (hf download "
                       f"{name}) or give a local directory")
    unreachable, problem = _ask_hub(name, marker)
    if problem is None:
        return {}
    if unreachable and cached:
        return {"local_files_only": True}
    raise HubError(f"not a local directory, and as a hub name {problem}")


@lru_cache(maxsize=None)  # one probe per name and process: an estimate builds the model several times
def _ask_hub(name: str, marker: str) -> tuple[bool, str | None]:
    """(whether the hub was unreachable, what is wrong with repository `name` and what to do; None: it has
    `marker`)."""
    try:
        get_hf_file_metadata(hf_hub_url(name, marker), timeout=PROBE_TIMEOUT)  # one HEAD, no retries
    except GatedRepoError:
        return False, "it is a gated repository; accept its terms on the hub and log in (hf auth login)"
    except RepositoryNotFoundError:
        return False, "there is no such repository on the hub (a private one needs hf auth login); check the spelling"
    except EntryNotFoundError:
        return False, f"the hub repository has no {marker}: it is not a transformers model or tokenizer"
    except HfHubHTTPError as e:
        return False, f"the hub answered HTTP {e.response.status_code}; try again later or give a local directory"
    except Exception as e:  # connection refused, DNS failure, timeout, proxy errors: the hub is unreachable
        return True, (f"the hub ({constants.ENDPOINT}) is unreachable ({type(e).__name__}) and it is not in the "
                      "local cache; check the network, or download it where the hub is reachable and give the local "
                      "directory")
    return False, None
