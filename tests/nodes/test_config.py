"""Node config loading: the shipped configs load; every kind of mistake names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes._errors import ConfigFileError
from nodes.config import CARD_ROTATIONS, NodeConfig, ReaderPolicyConfig, bus_config, load_node_config
from nodes.demo_processes import write_fleet_keys
from nodes.reader_policy import fixed_budget
from qkv import ROTATIONS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FLEET = ("reader", "answerer", "relay", "base", "field-answerer")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fleet_keys(tmp_path_factory.mktemp("fleet") / "keys", FLEET)


def _install(config: Path, keys: Path, into: Path) -> Path:
    """Copy a shipped config next to a generated key directory (absolute /etc paths rewritten)."""
    text = config.read_text().replace("/etc/edgebus/keys/", f"{keys}/")
    target = into / config.name
    target.write_text(text)
    if not (into / "keys").exists():
        (into / "keys").symlink_to(keys)
    return target


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_shipped_configs_load(name: str, keys: Path, tmp_path: Path) -> None:
    cfg = load_node_config(
        _install(CONFIGS / name, keys, tmp_path), env={"EDGEBUS_STATE": str(tmp_path / "s")}
    )
    assert isinstance(cfg, NodeConfig)
    assert cfg.state_dir == tmp_path / "s"
    bus = bus_config(cfg)
    assert bus.keys is not None
    assert not bus.insecure
    assert bus.node_id == cfg.name
    assert len(bus.connect) == len(cfg.bus.peers)


def test_shipped_configs_cover_every_setup() -> None:
    names = {p.stem for p in CONFIGS.glob("*.toml")}
    assert {"local-demo-reader", "local-demo-answerer", "lan-reader", "lan-answerer"} <= names
    assert {"field-base", "field-answerer", "relay-chain-relay", "relay-chain-answerer"} <= names


def test_field_link_config_has_small_budgets(keys: Path, tmp_path: Path) -> None:
    base = load_node_config(_install(CONFIGS / "field-base.toml", keys, tmp_path))
    field = load_node_config(_install(CONFIGS / "field-answerer.toml", keys, tmp_path))
    assert base.reader is not None
    assert base.reader.bits <= 2
    assert base.reader.keep < 1
    assert field.bus.rate_limit_mbit is not None
    assert bus_config(field).rate_limit_bps == pytest.approx(field.bus.rate_limit_mbit * 1e6 / 8)


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(body)
    return path


BASE = """
[node]
name = "a"
model = "smollm2-135m-instruct"
roles = ["answerer"]
[bus]
insecure = true
"""


READER = """
[node]
name = "r"
model = "smollm2-135m-instruct"
roles = ["reader"]
[bus]
insecure = true
bind = "tcp://127.0.0.1:0"
[reader]
bits = 4
"""


def test_reader_policy_defaults_to_auto_and_reads_its_section(tmp_path: Path) -> None:
    cfg = load_node_config(_write(tmp_path, READER), env={})
    assert cfg.reader is not None
    assert cfg.reader.policy == ReaderPolicyConfig()
    assert cfg.reader.policy.mode == "auto"
    table = tmp_path / "rq.json"
    table.write_text("{}")
    body = READER + (
        '[reader.policy]\nmode = "fixed"\ntable = "rq.json"\nquality_floor = 0.95\ndeadline_s = 2\n'
        "assumed_link_mbit = 1.5\nsplit = false\nsplit_min_head = 128\n"
    )
    policy = load_node_config(_write(tmp_path, body), env={}).reader.policy  # type: ignore[union-attr]
    assert policy == ReaderPolicyConfig(
        mode="fixed", table=table, quality_floor=0.95, deadline_s=2.0, assumed_link_mbit=1.5, split=False,
        split_min_head=128,
    )  # fmt: skip


def test_reader_card_coding_is_read_checked_and_matches_the_codec(tmp_path: Path) -> None:
    assert CARD_ROTATIONS == ROTATIONS
    plain = load_node_config(_write(tmp_path, READER), env={}).reader
    assert plain is not None
    assert (plain.rotation, plain.fp16_sinks) == ("none", 0)
    body = READER + 'rotation = "hadamard-prerope"\nfp16_sinks = 1\n'
    reader = load_node_config(_write(tmp_path, body), env={}).reader
    assert reader is not None
    budget = fixed_budget(reader)
    assert (budget.rotation, budget.fp16_sinks) == ("hadamard-prerope", 1)
    for bad, problem in (('rotation = "spin"', "must be one of"), ("fp16_sinks = -1", "0..64")):
        with pytest.raises(ConfigFileError, match=problem):
            load_node_config(_write(tmp_path, READER + bad + "\n"), env={})


def test_minimal_insecure_config_takes_defaults(tmp_path: Path) -> None:
    cfg = load_node_config(_write(tmp_path, BASE), env={})
    assert cfg.answerer is not None
    assert cfg.answerer.topics == "kv/"
    assert cfg.keys is None
    assert bus_config(cfg).insecure
    assert cfg.state_dir.name == "a"
    assert cfg.heap_retain_mib == 512
    assert cfg.heap_prefault is True


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        (BASE + "colour = 1\n", "bus.colour", "unknown key"),
        (BASE.replace('name = "a"', 'name = "a"\nspeed = 3'), "node.speed", "unknown key"),
        (BASE + '[answerer]\nstore_mib = "big"\n', "answerer.store_mib", "expected int"),
        (BASE + "[answerer]\npersist = 1\n", "answerer.persist", "expected bool"),
        (BASE + "[answerer]\nmax_new_tokens = true\n", "answerer.max_new_tokens", "expected int"),
        (BASE + "[reader]\nbits = 4\n", "reader", "not in node.roles"),
        (BASE.replace('roles = ["answerer"]', 'roles = ["oracle"]'), "node.roles", "non-empty list"),
        (BASE.replace('roles = ["answerer"]', 'roles = ["reader"]'), "bus.bind", "needs a bind"),
        (BASE.replace("insecure = true", "insecure = false"), "keys", "missing"),
        (
            BASE.replace('roles = ["answerer"]', 'roles = ["answerer"]\ndevice = "tpu"'),
            "node.device",
            "one of",
        ),
        (BASE + 'bind = "udp://x"\n', "bus.bind", "tcp://HOST:PORT"),
        (BASE.replace('name = "a"', 'name = "a"\nheap_retain_mib = 4096'), "node.heap_retain_mib", "0..2047"),
        (
            BASE.replace('name = "a"', 'name = "a"\nheap_prefault = "yes"'),
            "node.heap_prefault",
            "expected bool",
        ),
        (BASE + "heartbeat_s = 5\npeer_timeout_s = 2\n", "bus.peer_timeout_s", "exceed"),
        (BASE + '[[bus.peers]]\nendpoint = "tcp://127.0.0.1:1"\nkey = "x"\n', "bus.peers[0].key", "unknown"),
        ("[node\n", "", "not valid TOML"),
        (READER + '[reader.policy]\nmode = "smart"\n', "reader.policy.mode", "auto or fixed"),
        (READER + "[reader.policy]\nquality_floor = 1.5\n", "reader.policy.quality_floor", "[0, 1]"),
        (READER + "[reader.policy]\nsplit = 1\n", "reader.policy.split", "expected bool"),
        (READER + "[reader.policy]\nassumed_link_mbit = 0\n", "reader.policy.assumed_link_mbit", "positive"),
        (READER + '[reader.policy]\ntable = "/nope.json"\n', "reader.policy.table", "no such file"),
        (READER + "[reader.policy]\nspeed = 1\n", "reader.policy.speed", "unknown key"),
    ],
)
def test_mistakes_name_key_and_file(tmp_path: Path, body: str, key: str, problem: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigFileError) as info:
        load_node_config(path, env={})
    assert info.value.key == key
    assert info.value.file == path
    assert problem in str(info.value)
    assert str(path) in str(info.value)


def test_missing_key_file_names_key_and_file(keys: Path, tmp_path: Path) -> None:
    body = BASE.replace("insecure = true", 'bind = "tcp://127.0.0.1:0"') + (
        f'[keys]\nsecret = "{keys}/answerer.key_secret"\nallowed = "{keys}/allowed"\n'
        f'hmac = "{tmp_path}/nope"\n'
    )
    with pytest.raises(ConfigFileError, match=r"keys\.hmac: .*nope: no such file") as info:
        load_node_config(_write(tmp_path, body), env={})
    assert info.value.key == "keys.hmac"


def test_unreadable_key_file_names_key(keys: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.key_secret"
    bad.write_text("not a certificate\n")
    body = BASE.replace("insecure = true", 'bind = "tcp://127.0.0.1:0"') + (
        f'[keys]\nsecret = "{bad}"\nallowed = "{keys}/allowed"\nhmac = "{keys}/hmac.key"\n'
    )
    with pytest.raises(ConfigFileError) as info:
        load_node_config(_write(tmp_path, body), env={})
    assert info.value.key == "keys.secret"


def test_curve_peer_without_public_key_is_refused(keys: Path, tmp_path: Path) -> None:
    body = BASE.replace("insecure = true", "") + (
        f'[keys]\nsecret = "{keys}/answerer.key_secret"\nallowed = "{keys}/allowed"\n'
        f'hmac = "{keys}/hmac.key"\n'
        '[[bus.peers]]\nendpoint = "tcp://127.0.0.1:5550"\n'
    )
    with pytest.raises(ConfigFileError) as info:
        load_node_config(_write(tmp_path, body), env={})
    assert info.value.key == "bus.peers[0].public_key"


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    cfg = load_node_config(_write(tmp_path, BASE), env={})
    with pytest.raises(AttributeError):
        cfg.name = "b"  # type: ignore[misc]
