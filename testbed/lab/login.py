"""A non-root login user for the emulated lab's hosts, so that a real lab's path can run here.

``testbed lab up INVENTORY --login-user USER`` makes the emulated lab's namespaces look like a
lab of real machines that a user reaches as someone other than root, as on Jetsons and
Raspberry Pis (``inventory/netns-real.yaml`` is such a lab). This module makes and removes:

* the account (``useradd --create-home``; its home holds what ``testbed provision`` installs
  on every node, one folder per node, as separate disks would);
* its SSH key, under the lab's state folder (``login/USER_ed25519``, 0600), in the user's own
  ``~/.ssh/authorized_keys`` (as ``ssh-copy-id`` would put it on a real machine; sshd reads it
  as the user, and a ``Match User`` block names it only for this user, so the key never
  opens root's login, whose keys stay in the state folder);
* ``/etc/sudoers.d/testbed-<lab>``: for that user exactly the commands docs/real-lab.md tells
  real users to allow (``shaping.sudoers_line``), checked with ``visudo -c`` before it is put in
  place.

Everything is recorded in the lab's state (``lab.json``, key ``login``) before it is made, and
``remove`` deletes exactly that: the user's processes are stopped, the account and its home,
the files it left in /tmp and /dev/shm (Ray's temp dirs), the sudoers file and the key. An
account that exists but was not made by this lab is never touched: ``ensure`` refuses it.

Limits: Linux with shadow-utils (``useradd``/``userdel``) and sudo; root only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from testbed.errors import LabError
from testbed.inputs.inventory import USER_RE
from testbed.lab import procs, sshd
from testbed.lab.remote import LocalRunner
from testbed.lab.shaping import sudoers_line

SUDOERS_DIR = Path("/etc/sudoers.d")
AUTHORIZED_KEYS = ".ssh/authorized_keys"     # relative: in the login user's home
SHARED_TEMP = (Path("/tmp"), Path("/dev/shm"))

Progress = Callable[[str], None]


def check_name(user: str) -> None:
    """Refuse what is not a plain POSIX user name, and root."""
    if not USER_RE.match(user):      # the inventory's rule for ssh.user
        raise LabError(f'--login-user "{user}" is not a valid user name (lower-case letters, '
                       'digits, "_" and "-", starting with a letter or "_", at most 32)')
    if user == "root":
        raise LabError("--login-user must not be root: it stands for a real lab's "
                       "unprivileged login")


def key_path(state_dir: Path, user: str) -> Path:
    return Path(state_dir) / "login" / f"{user}_ed25519"


def authorized_keys_dir(state_dir: Path) -> Path:
    """sshd's ``AuthorizedKeysFile`` is ``<this>/%u``: one file per login user."""
    return Path(state_dir) / "authorized_keys.d"


def sudoers_path(lab_name: str) -> Path:
    return SUDOERS_DIR / f"testbed-{lab_name}"


def exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def ensure(lab_name: str, state_dir: Path, user: str, recorded: dict | None,
           save: Callable[[dict], None], progress: Progress) -> dict:
    """Make (or keep) the login user, its key and its sudoers file; return the record.

    ``recorded``: what the lab's state already says (None: nothing). ``save(record)`` is called
    before each thing is made, so a crash leaves a record that ``remove`` can follow.
    """
    check_name(user)
    if recorded and recorded.get("user") != user:
        raise LabError(f"this lab already has the login user {recorded.get('user')}: take the "
                       "lab down first to change it")
    record = dict(recorded or {"user": user, "created": False})
    r = LocalRunner("lab")
    if not exists(user):
        record["created"] = True
        save(record)
        progress(f"login user {user}")
        res = r.run(["useradd", "--create-home", "--shell", "/bin/sh", "--comment",
                     comment(lab_name), user], check=False)
        if res.rc != 0:
            raise LabError(f"useradd {user} failed: {res.stderr.strip()}")
    elif not record.get("created"):
        raise LabError(f"user {user} exists and was not made by this lab: choose another "
                       "--login-user (the lab never takes over an existing account)")
    info = pwd.getpwnam(user)
    record.update(uid=info.pw_uid, home=info.pw_dir)
    key = key_path(state_dir, user)
    record["key"] = str(key)
    record["sudoers"] = str(sudoers_path(lab_name))
    save(record)
    try:
        sshd.generate_key(key, f"testbed-{lab_name}-{user}")
    except sshd.SSHDSetupError as exc:
        raise LabError(str(exc)) from None
    # Written AS the user (runuser), never by root into a home the user controls: a link
    # planted there (~/.ssh -> /root/.ssh) would otherwise have root overwrite its own keys.
    res = r.run(["runuser", "-u", user, "--", "sh", "-c",
                 "umask 077 && mkdir -p ~/.ssh && cat > ~/.ssh/authorized_keys"],
                stdin=(sshd.read_public_key(key) + "\n").encode(), check=False)
    if res.rc != 0:
        raise LabError(f"writing {user}'s authorized_keys failed: {res.stderr.strip()}")
    write_sudoers(sudoers_path(lab_name), sudoers_line(user))
    return record


def write_sudoers(path: Path, line: str) -> None:
    """Write a sudoers drop-in (0440) after ``visudo -c`` accepted it; never half-written."""
    text = ("# Written by testbed (testbed/lab/login.py): the emulated lab's login user may run\n"
            "# exactly what docs/real-lab.md asks of a real device.\n"
            "# `testbed lab down` removes it.\n"
            f"{line}\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".testbed-")   # sudo skips dotted names
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o440)
        res = LocalRunner("lab").run(["visudo", "-c", "-q", "-f", tmp], check=False)
        if res.rc != 0:
            raise LabError(f"visudo rejected the sudoers entry {line!r}: "
                           f"{(res.stderr or res.stdout).strip()}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def comment(lab_name: str) -> str:
    """The account's GECOS comment: how ``leftovers`` finds it when the lab's state is lost."""
    return f"testbed lab {lab_name} login"


def leftovers(lab_name: str, state_dir: Path) -> list[dict]:
    """Records for the accounts this lab made, found by their comment AND the key the lab made
    for them in its (root-only) state folder: a comment alone could be anyone's."""
    return [{"user": e.pw_name, "created": True, "sudoers": str(sudoers_path(lab_name)),
             "key": str(key_path(state_dir, e.pw_name))}
            for e in pwd.getpwall() if e.pw_gecos == comment(lab_name)
            and key_path(state_dir, e.pw_name).exists()]


def remove(record: dict, progress: Progress) -> list[str]:
    """Undo ``ensure``: processes, account and home, its temp files, sudoers file, key."""
    removed: list[str] = []
    user = record.get("user")
    sudoers = record.get("sudoers")
    if sudoers and Path(sudoers).exists():
        Path(sudoers).unlink()
        removed.append(f"sudoers {sudoers}")
    if record.get("created") and user and exists(user):
        uid = pwd.getpwnam(user).pw_uid
        stopped = procs.terminate(procs.owned_by(uid))
        if stopped:
            removed.append(f"{user}: {len(stopped)} processes")
        for top in SHARED_TEMP:
            for entry in _owned_entries(top, uid):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and \
                    not entry.is_symlink() else entry.unlink(missing_ok=True)
        progress(f"removing login user {user}")
        res = LocalRunner("lab").run(["userdel", "--remove", user], check=False)
        # 12: the home or mail spool could not be removed (there was none); the account is gone.
        if res.rc not in (0, 12) or exists(user):
            raise LabError(f"userdel {user} failed: {res.stderr.strip()}")
        removed.append(f"user {user}")
    key = record.get("key")
    if key:
        for path in (Path(key), Path(key + ".pub")):
            path.unlink(missing_ok=True)
    return removed


def _owned_entries(top: Path, uid: int) -> list[Path]:
    try:
        return [p for p in top.iterdir() if p.lstat().st_uid == uid]
    except OSError:
        return []
