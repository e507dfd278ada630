"""What of the driver's environment may travel to Ray workers, and what never does.

Credentials never go into a Ray ``runtime_env``, a task/actor argument, a training payload, a log line or
anything the Ray dashboard / state API serves (Ray writes runtime envs in plain text to
``runtime_env_agent.log`` and returns them from its actor/job APIs). Workers get them from their own
process environment instead:

- a local Ray started by the driver (``ray.init()`` without an address) runs its raylet and workers as
  children of the driver, so they inherit the driver's ``AWS_*`` variables;
- on a cluster (KubeRay) every pod reads them from the ``ssfer-s3`` Secret (``secretKeyRef``).

Only non-secret settings are forwarded (endpoint URL, region, accelerator, thread counts, ...).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Mapping, Optional

from ssfer_dist.errors import UserError

__all__ = ["SECRET_ENV", "is_secret_name", "non_secret_env", "missing_credentials_hint", "check_s3_credentials"]

# Never forwarded (the names of every credential this project's storage layer can read).
SECRET_ENV = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
})
_SECRET_PATTERN = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY)", re.I)


def is_secret_name(name: str) -> bool:
    """True for a variable that holds (or points at) a credential."""
    return name in SECRET_ENV or bool(_SECRET_PATTERN.search(name))


def non_secret_env(names: Iterable[str], environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """``{name: value}`` for the set ones of ``names``, credentials left out whatever the caller asked."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in names if k in env and not is_secret_name(k)}


def missing_credentials_hint() -> str:
    return ("S3 credentials must be in the environment of every Ray node (they are never sent through Ray): "
            "export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY before `ray start` or before the driver starts "
            "a local Ray; on KubeRay the pods read them from the ssfer-s3 Secret")


def check_s3_credentials(where: str) -> None:
    """Raise a one-line ``UserError`` when this process can find no S3 credentials (the usual cause: a Ray
    started before the credentials were exported, or nodes whose environment lacks them)."""
    import boto3

    if boto3.Session().get_credentials() is None:
        raise UserError(f"{where}: no S3 credentials in this Ray worker's environment. {missing_credentials_hint()}")
