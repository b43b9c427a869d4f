"""Weights from the Hugging Face Hub: fail fast and clearly when they cannot be had.

Offline, `huggingface_hub` retries every request five times over about 30 s (logging each retry twice)
before giving up with a message about "the local cache". `hub_weights` checks once, in a few seconds,
whether the hub can be reached; when it cannot, the load runs in offline mode (files already in the local
cache still load) and a failure becomes one `WeightsUnavailable` that says what to do: accept the terms
of a gated repo and log in, pass local weights with `--checkpoint`, or use `--random-weights`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

from vlm.errors import RunError

log = logging.getLogger(__name__)

# where a user reads how to get the weights (a page of the docs site); tests check that the page says so
WEIGHTS_DOC = "docs/weights.md ('Real weights: Prov-GigaPath and PubMedBERT')"
_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailable(RunError, OSError):
    """Pretrained weights could not be loaded from the hub (offline, not logged in, terms not accepted)."""


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) asks for no network at all."""
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in
               ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's endpoint (`HF_ENDPOINT`, default huggingface.co), `timeout` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def weights_message(what: str, repo: str, *, gated: bool, flag: str, reason: str, local: str = "FILE") -> str:
    """The one message a user gets when `what`'s weights from `repo` cannot be loaded."""
    if gated:
        access = (f"{repo} is gated: accept its terms at https://huggingface.co/{repo}, then run "
                  "`huggingface-cli login` (or set HF_TOKEN)")
    else:
        access = f"{repo} is public (not gated): no login is needed, only network access or a local copy"
    return (
        f"could not load the weights of {what} from the Hugging Face Hub repo {repo}: {reason}. {access}. "
        f"Without network: pass local weights with {flag} {local} (download them once elsewhere)"
        + (", or --random-weights for an untrained encoder (smoke tests only)" if local == "FILE" else "")
        + f". HF_HUB_OFFLINE=1 skips every network attempt. See {WEIGHTS_DOC}."
    )


@contextlib.contextmanager
def hub_weights(
    what: str, repo: str, *, gated: bool, flag: str = "--checkpoint", local: str = "FILE"
) -> Iterator[None]:
    """Run a hub download inside; any failure leaves as one `WeightsUnavailable` (see the module docstring)."""
    from huggingface_hub import constants

    offline = hub_offline() or constants.HF_HUB_OFFLINE
    forced = False
    if not offline and not hub_reachable():
        log.info("the Hugging Face Hub is unreachable; looking for %s in the local cache only", repo)
        constants.HF_HUB_OFFLINE = forced = offline = True
    reason = ("HF_HUB_OFFLINE is set" if not forced else "the hub is unreachable") if offline else ""
    try:
        yield
    except WeightsUnavailable:
        raise
    except Exception as error:  # hub errors come in many types (offline, gated, 401, 404, ...)
        detail = reason + " and they are not in the local cache" if offline else f"{type(error).__name__}: {error}"
        message = weights_message(what, repo, gated=gated, flag=flag, reason=detail, local=local)
        raise WeightsUnavailable(message) from error
    finally:
        if forced:
            constants.HF_HUB_OFFLINE = False
