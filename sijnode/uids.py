"""UIDs under sijnode's own root (PS3.5 §9 and Annex B).

The default root is a UUID-derived arc ``2.25.<uuid>`` generated once for sijnode
(PS3.5 §B.2): whoever generates a UUID owns the arc below it, so sub-UIDs are unique
without a registered organisation root. Sites with their own root set ``node.uid_root``.
"""

import re
from collections.abc import Sequence

from pydicom.uid import UID, generate_uid

DEFAULT_UID_ROOT = "2.25.333135700400607363126196540788739262950."

#: PS3.5 §9.1: components of digits without leading zeros, separated by dots, ≤ 64 chars.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """Return whether ``value`` follows the UID grammar of PS3.5 §9.1."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID_PATTERN.match(value))


def make_uid(root: str = DEFAULT_UID_ROOT, entropy: Sequence[str] | None = None) -> UID:
    """Return a new UID under ``root``; deterministic when ``entropy`` is given."""
    return generate_uid(prefix=root, entropy_srcs=list(entropy) if entropy is not None else None)
