"""The library versions this project is tested with, where it relies on their internals.

The offload engine and compressed transfer use accelerate's and bitsandbytes' private internals
(accelerate's hook attributes and `send_to_device`; bitsandbytes' `Int8Params`/`Params4bit` state and
quantize calls). requirements.txt bounds both to the ranges below; an installed version outside
them is named once in the log, with what may break, instead of failing later in a cryptic way.
"""

from __future__ import annotations

import logging
from importlib import metadata

from packaging.version import InvalidVersion, Version

logger = logging.getLogger(__name__)

# package -> (lowest tested, first untested): keep in step with requirements.txt
TESTED = {
    "accelerate": ("1.15.0", "1.16"),
    "bitsandbytes": ("0.50.2", "0.51"),
}
WHAT_BREAKS = {
    "accelerate": "the offload engine and accelerate's offload hooks",
    "bitsandbytes": "8-bit/4-bit loading and the engine's compressed transfer",
}
_reported: set[str] = set()


def outside_tested(installed: dict[str, str | None] | None = None) -> list[str]:
    """One message per package whose installed version is outside its tested range."""
    messages = []
    for package, (low, high) in TESTED.items():
        if installed is not None:
            version = installed.get(package)
        else:
            try:
                version = metadata.version(package)
            except metadata.PackageNotFoundError:
                version = None
        if version is None:
            continue
        try:
            ok = Version(low) <= Version(version) < Version(high)
        except InvalidVersion:
            ok = False
        if not ok:
            messages.append(f"{package} {version} is outside the tested range >={low},<{high} (requirements.txt): "
                            f"{WHAT_BREAKS[package]} may fail; install a version in that range")
    return messages


def warn_if_untested() -> None:
    """Log each out-of-range version once per process."""
    for message in outside_tested():
        if message not in _reported:
            _reported.add(message)
            logger.warning(message)
