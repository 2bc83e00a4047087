"""The check every request passes on the worker (bakgrab.worker.names, issue 11).

Pure logic on a storage dir in tmp_path: signatures, registrations, the time
window and the record of accepted task ids. The same paths run end to end
against a real worker in tests/integration/test_names.py.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bakgrab.tasks import GRAB, RESTORE
from bakgrab.tasks.config import Settings
from bakgrab.tasks.errors import InvalidRequest, RequestRefused
from bakgrab.tasks.request import sign, validate, validate_restore
from bakgrab.worker import names
from bakgrab.worker.storage import Storage
from tests import support

NOW = 1_900_000_000.0
SETTINGS = Settings(request_window=600, job_timeout=3600)
ONE_TIME = Ed25519PrivateKey.generate()


def public(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def private_text(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode()


CLIENT = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def grab_fields(identity: Ed25519PrivateKey, **changes: Any) -> dict[str, Any]:
    fields = {"v": 1, "name": "victim", "address": "198.18.0.2", "port": 2222,
              "user": "backup", "key": private_text(ONE_TIME), "host_key": public(identity),
              "excludes": ["*.tmp"]}
    fields.update(changes)
    return fields


def signed(identity: Ed25519PrivateKey, task_id: str, now: float = NOW,
           task: str = GRAB, **changes: Any) -> dict[str, Any]:
    return sign(grab_fields(identity, **changes), task, task_id, identity, now=now)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    (tmp_path / "s").mkdir()
    return Storage(tmp_path / "s").prepare()


def check(storage: Storage, fields: dict[str, Any], task_id: str, now: float = NOW,
          settings: Settings = SETTINGS, task: str = GRAB) -> names.Registration | None:
    return names.check_request(storage, settings, task, task_id, validate(fields), now=now)


def listing(storage: Storage) -> dict[str, tuple[object, ...]]:
    """The storage path by path, with metadata and content (issue 13)."""
    return support.tree_state(storage.root)


def register(storage: Storage, key: Ed25519PrivateKey, nets: str = "") -> None:
    names.write(storage, "victim", names.Registration(
        public(key), names.parse_networks(nets) if nets else ()))


def test_registered_client_is_accepted(storage: Storage) -> None:
    register(storage, CLIENT)
    task_id = str(uuid.uuid4())
    reg = check(storage, signed(CLIENT, task_id), task_id)
    assert reg is not None and reg.key == public(CLIENT)
    record = json.loads((storage.state / "accepted" / f"{task_id}.json").read_text())
    assert record["name"] == "victim"


def test_other_key_unregistered_and_unsigned_get_one_answer(storage: Storage) -> None:
    """Another client's signed request, and any request for an unregistered
    name, are refused with the same message (no probing); nothing is written."""
    task_id = str(uuid.uuid4())
    before = listing(storage)
    with pytest.raises(RequestRefused) as unregistered:
        check(storage, signed(CLIENT, task_id), task_id)
    register(storage, CLIENT)
    before = listing(storage)
    with pytest.raises(RequestRefused) as other:
        check(storage, signed(OTHER, task_id), task_id)
    # the attacker announcing the victim's key but signing with its own
    forged = signed(OTHER, task_id, host_key=public(CLIENT))
    with pytest.raises(RequestRefused) as wrong_sig:
        check(storage, forged, task_id)
    assert str(unregistered.value) == str(other.value) == str(wrong_sig.value)
    assert public(CLIENT).split()[1] not in str(other.value)
    assert listing(storage) == before


@pytest.mark.parametrize(("field", "value"), [
    ("address", "198.18.0.66"), ("port", 22), ("user", "root"), ("excludes", []),
    ("name", "victim2"), ("ts", int(NOW) + 1), ("key", "swapped"),
])
def test_any_field_changed_after_signing_is_refused(storage: Storage, field: str,
                                                    value: Any) -> None:
    register(storage, CLIENT)
    names.write(storage, "victim2", names.Registration(public(CLIENT)))
    task_id = str(uuid.uuid4())
    fields = signed(CLIENT, task_id)
    fields[field] = private_text(OTHER) if value == "swapped" else value
    with pytest.raises(RequestRefused):
        check(storage, fields, task_id)


def test_signature_binds_task_id_and_task_name(storage: Storage) -> None:
    register(storage, CLIENT)
    task_id = str(uuid.uuid4())
    fields = signed(CLIENT, task_id)
    with pytest.raises(RequestRefused):
        check(storage, fields, str(uuid.uuid4()))
    with pytest.raises(RequestRefused):
        check(storage, fields, task_id, task=RESTORE)


def test_stale_first_delivery_refused_redelivery_accepted(storage: Storage) -> None:
    """A first delivery outside the window is refused (writing nothing); a
    redelivery of an accepted id passes long after the window, with the same
    message only, until job_timeout + window."""
    register(storage, CLIENT)
    stale = str(uuid.uuid4())
    before = listing(storage)
    with pytest.raises(InvalidRequest, match="^ts:"):
        check(storage, signed(CLIENT, stale, now=NOW - 601), stale)
    with pytest.raises(InvalidRequest, match="^ts:"):
        check(storage, signed(CLIENT, stale, now=NOW + 601), stale)
    assert listing(storage) == before

    task_id = str(uuid.uuid4())
    fields = signed(CLIENT, task_id)
    check(storage, fields, task_id)
    assert check(storage, fields, task_id, now=NOW + 3000) is not None  # a redelivery
    resigned = signed(CLIENT, task_id, now=NOW + 5)  # same id, another message
    with pytest.raises(RequestRefused):
        check(storage, resigned, task_id, now=NOW + 6)
    with pytest.raises(InvalidRequest, match="^ts:"):
        check(storage, fields, task_id, now=NOW + 4201)


def test_address_outside_registered_network_refused(storage: Storage) -> None:
    register(storage, CLIENT, "198.18.0.0/24")
    task_id = str(uuid.uuid4())
    check(storage, signed(CLIENT, task_id), task_id)
    for address in ("198.18.1.2", "127.0.0.1", "client.example"):
        task_id = str(uuid.uuid4())
        with pytest.raises(InvalidRequest, match="^address:.*did not connect"):
            check(storage, signed(CLIENT, task_id, address=address), task_id)


def test_first_use_enrols_only_after_success_and_only_grabs(storage: Storage) -> None:
    first_use = SETTINGS.replace(enrol="first-use")
    task_id = str(uuid.uuid4())
    assert check(storage, signed(CLIENT, task_id), task_id, settings=first_use) is None
    assert not storage.pin("victim").exists()  # checked, not registered
    restore = sign({"v": 1, "name": "victim", "snapshot": "latest", "paths": ["."],
                    "address": "198.18.0.2", "port": 2222, "user": "backup",
                    "key": private_text(ONE_TIME), "host_key": public(CLIENT)},
                   RESTORE, task_id, CLIENT, now=NOW)
    with pytest.raises(RequestRefused):
        names.check_request(storage, first_use, RESTORE, task_id, validate_restore(restore),
                            now=NOW)
    names.enrol_after_pull(storage, "victim", public(CLIENT))
    assert names.read(storage, "victim") == names.Registration(public(CLIENT))
    with pytest.raises(RequestRefused):
        names.enrol_after_pull(storage, "victim", public(OTHER))
    assert names.read(storage, "victim") == names.Registration(public(CLIENT))


def test_first_use_gives_one_key_at_most_max_names_per_client(storage: Storage) -> None:
    """A client key enrols at most max_names_per_client names by itself; its
    own names stay usable, another key is not affected (issue 11)."""
    first_use = SETTINGS.replace(enrol="first-use", max_names_per_client=2)
    for name in ("a1", "a2"):
        names.enrol_after_pull(storage, name, public(CLIENT))
    task_id = str(uuid.uuid4())
    with pytest.raises(InvalidRequest, match="max_names_per_client=2"):
        check(storage, signed(CLIENT, task_id, name="a3"), task_id, settings=first_use)
    assert not storage.pin("a3").exists()
    again = str(uuid.uuid4())
    assert check(storage, signed(CLIENT, again, name="a2"), again, settings=first_use)
    other = str(uuid.uuid4())
    assert check(storage, signed(OTHER, other, name="b1"), other, settings=first_use) is None
    assert names.names_of(storage, public(CLIENT)) == ["a1", "a2"]


def test_unparsable_registration_refuses_everything(storage: Storage) -> None:
    storage.pin("victim").write_text("garbage\n")
    task_id = str(uuid.uuid4())
    with pytest.raises(RequestRefused):
        check(storage, signed(CLIENT, task_id), task_id,
              settings=SETTINGS.replace(enrol="first-use"))


def test_registration_text_round_trips() -> None:
    reg = names.Registration(public(CLIENT), names.parse_networks("198.18.0.0/24, 10.0.0.1"))
    assert names.parse(reg.text()) == reg
    assert names.parse(public(CLIENT) + "\n") == names.Registration(public(CLIENT))
    for bad in ("", "ssh-rsa AAAA\n", public(CLIENT) + "\nnonsense\n",
                public(CLIENT) + "\nfrom 300.0.0.0/8\n"):
        with pytest.raises(ValueError):
            names.parse(bad)
