"""People and SCADA accounts of the line: argon2 password hashes and what each role may do.

Shared by the line's OPC UA server and (later) the HMI. The config holds only argon2 hashes
(`sorter opcua hash-password`); a password never reaches a log line or an exception text here.
"""

from __future__ import annotations

import hmac
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from sorter.config import Role, UserConfig

# argon2-cffi's defaults are RFC 9106's "low memory" profile (argon2id, 64 MiB, t=3): a verification takes
# tens of milliseconds, cheap for a login and expensive for someone guessing offline from a leaked config
_HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    """The argon2id hash (with its own random salt) to put in the config's `users:` list."""
    if not password:
        raise ValueError("an empty password is not allowed")
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str | bytes) -> bool:
    """True if the password matches; False on a mismatch, a malformed hash or any other bad input."""
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
    except Exception:  # odd types or encodings from a client must not turn into a server error
        return False


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # verified when the user name is unknown, so that an unknown name costs as long as a wrong password
    return _HASHER.hash("not a real account")


def authenticate(users: list[UserConfig], name: str | None, password: str | bytes | None) -> UserConfig | None:
    """The configured user with this name and password, or None.

    Takes about one argon2 verification whether or not the name exists (names are not secret, but
    telling "no such user" from "wrong password" by timing would still help someone guessing).
    """
    found: UserConfig | None = None
    wanted = (name or "").encode("utf-8", "surrogatepass")
    for user in users:  # look at every entry, no early exit
        if hmac.compare_digest(user.name.encode("utf-8"), wanted):
            found = user
    if found is None or password is None or not name:
        verify_password(_dummy_hash(), password or "")
        return None
    return found if verify_password(found.password_hash, password) else None


def may_operate(role: Role) -> bool:
    """Start, stop, hold, reset ... the line (PackML commands)."""
    return role in ("operator", "technician")


def may_configure(role: Role) -> bool:
    """Change settings, swap models, edit users."""
    return role == "technician"
