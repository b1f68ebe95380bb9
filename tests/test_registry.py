"""The MLflow model registry: champion/challenger gating, loading without pickles, the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from data_store.errors import InputError
from tsesnet.cli import main
from tsesnet.tracking import registry

LINEAGE = {"store_fingerprint": "fp-A", "fold": 0}
RULE = "logits > 0"


def _protocol(fp="fp-A", fold=0, cases=("c1", "c2"), window=(16, 32, 32), overlap=0.5):
    from tsesnet.tracking.protocol import ValidationProtocol

    return ValidationProtocol(fp, fold, tuple(cases), window, overlap, RULE)


P = _protocol().tags()


def _mv(version="1", **tags):
    return SimpleNamespace(version=version, tags={k: str(v) for k, v in tags.items()})


@pytest.mark.parametrize(
    ("new", "tags", "champion", "alias"),
    [
        (0.50, P, None, "champion"),
        (0.60, P, _mv(val_dice=0.5, **P), "champion"),
        (0.50, P, _mv(val_dice=0.5, **P), "challenger"),
        (0.40, P, _mv(val_dice=0.5, **P), "challenger"),
        # A better score under another protocol is not comparable: fold, store, the cases
        # validated (the smoke run of issue 24: 1 case against the champion's 2), the window.
        (0.90, _protocol(fold=1).tags(), _mv(val_dice=0.5, **P), "challenger"),
        (0.90, _protocol(fp="fp-B").tags(), _mv(val_dice=0.5, **P), "challenger"),
        (0.90, _protocol(cases=("c1",)).tags(), _mv(val_dice=0.5, **P), "challenger"),
        (0.90, _protocol(window=(16, 16, 16)).tags(), _mv(val_dice=0.5, **P), "challenger"),
        (0.90, _protocol(overlap=0.25).tags(), _mv(val_dice=0.5, **P), "challenger"),
        # A champion registered before protocols were recorded is never beaten automatically;
        # a version without a protocol never beats one either.
        (0.90, P, _mv(val_dice=0.5, **LINEAGE), "challenger"),
        (0.90, LINEAGE, _mv(val_dice=0.5, **P), "challenger"),
        (0.90, LINEAGE, None, "champion"),
        # Full precision: identical weights tie, a tie never moves the champion.
        (0.0437000123, P, _mv(val_dice=repr(0.0437000123), **P), "challenger"),
        (0.0437000124, P, _mv(val_dice=repr(0.0437000123), **P), "champion"),
        # A champion registered before full precision ("%.6f"): compared at its precision.
        (0.0437000123, P, _mv(val_dice="0.043700", **P), "challenger"),
        (0.0437004, P, _mv(val_dice="0.043700", **P), "challenger"),
        (0.0437006, P, _mv(val_dice="0.043700", **P), "champion"),
    ],
)
def test_alias_gate(new, tags, champion, alias):
    got, reason = registry.decide_alias(new, tags, champion)
    assert got == alias
    assert reason and "\n" not in reason


def test_the_reason_says_what_differs():
    """One line naming the difference: the smoke run validated on 1 case, the champion on 2."""
    champion = _mv("4", val_dice=0.02, **P)
    alias, reason = registry.decide_alias(0.03, _protocol(cases=("c1",)).tags(), champion)
    assert alias == "challenger"
    assert "champion v4 was validated under another protocol" in reason
    assert "validated on 1 case(s) vs 2" in reason and "promote by hand" in reason
    _, reason = registry.decide_alias(0.9, P, _mv("2", val_dice=0.5, **LINEAGE))
    assert "champion v2 has no recorded validation protocol" in reason


def test_alias_gate_names_both_fingerprints_when_they_differ():
    """A store re-indexed since fingerprint version 2 has a new fingerprint: the reason says
    which fingerprints differ and why that can happen to the same data."""
    champion = _mv(val_dice=0.5, **_protocol(fp="fp-B").tags())
    alias, reason = registry.decide_alias(0.9, P, champion)
    assert alias == "challenger"
    assert "fp-B" in reason and "fp-A" in reason
    assert "version 2" in reason and "promote by hand" in reason


@pytest.mark.parametrize("champion", [None, _mv(val_dice=0.5, **P)])
def test_a_sweep_registers_as_challenger_unless_promoted(champion):
    alias, reason = registry.decide_alias(0.9, P, champion, promote=False)
    assert alias == "challenger" and "--promote" in reason
    assert registry.decide_alias(0.9, P, champion, promote=True)[0] == "champion"


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory):
    """One SQLite tracking database for the module (creating one costs seconds)."""
    d = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d / 'mlflow.db'}")
        mp.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(d / "mlartifacts"))
        mp.chdir(d)
        from tsesnet.tracking import runs as tracking

        exp = tracking.ensure_database("registry-test")
        yield SimpleNamespace(dir=d, experiment_id=exp)


def _register(db, seed: int, dice: float, validation="P"):
    import mlflow

    from tsesnet.model import build_model

    torch.manual_seed(seed)
    validation = _protocol() if validation == "P" else validation
    net = build_model("tiny")
    run = mlflow.MlflowClient().create_run(db.experiment_id, run_name=f"run-{seed}")
    reg = registry.log_and_register(
        run_id=run.info.run_id,
        weights=net.state_dict(),
        model_config=dataclasses.asdict(net.config),
        patch=(16, 32, 32),
        phases=3,
        val_dice=dice,
        lineage={"store": "/s", "run_name": f"run-{seed}", **LINEAGE}
        if validation is None
        else {
            "store": "/s",
            "run_name": f"run-{seed}",
            "store_fingerprint": validation.store_fingerprint,
            "fold": validation.fold,
        },  # fmt: skip
        validation=validation,
        val_hd95=3.5,
        val_sensitivity=0.75,
    )
    return net.eval(), reg


def _same_output(a, b) -> bool:
    x = torch.randn(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_register_gate_load_promote(tracking_db, capsys):
    net1, r1 = _register(tracking_db, 1, 0.50)
    assert (r1.version, r1.alias) == ("1", "champion")

    loaded = registry.load_model("models:/tsesnet@champion")
    assert not loaded.model.training
    assert loaded.patch == (16, 32, 32)
    assert loaded.config["lineage"]["store_fingerprint"] == "fp-A"
    assert _same_output(loaded.model, net1)

    _, r2 = _register(tracking_db, 2, 0.40)
    assert r2.alias == "challenger"
    net3, r3 = _register(tracking_db, 3, 0.60)
    assert r3.alias == "champion" and r3.replaced == "1"
    # The version that lost @champion says to which version, when and why (tags, description).
    import mlflow

    v1 = mlflow.MlflowClient().get_model_version("tsesnet", "1")
    assert v1.tags["demoted_champion_to"] == "3" and v1.tags["demoted_champion_at"].startswith("20")
    assert v1.tags["demoted_champion_reason"] == r3.reason and "beats champion v1" in r3.reason
    assert "@champion moved from here to v3 at its registration: val Dice" in v1.description
    assert v1.tags["tsesnet.gate"] == "done" and v1.tags["protocol"] == _protocol().digest
    _, r4 = _register(tracking_db, 4, 0.95, _protocol(fold=1))
    assert r4.alias == "challenger"
    assert _same_output(registry.load_model("models:/tsesnet@champion").model, net3)
    assert _same_output(registry.load_model("models:/tsesnet/1").model, net1)

    # What is stored: plain tensors and JSON, the pyfunc as source code, no pickled object.
    local = mlflow.artifacts.download_artifacts("models:/tsesnet@champion")
    from pathlib import Path

    files = {p.name for p in Path(local).rglob("*") if p.is_file()}
    assert {"weights.pt", "model_config.json", "pyfunc.py", "MLmodel"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    mlmodel = (Path(local) / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "signature" in mlmodel
    state = torch.load(next(Path(local).rglob("weights.pt")), weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values())

    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "tsesnet" and row["versions"] == 4
    assert row["aliases"] == {"champion": "3", "challenger": "4"}

    assert main(["models", "show", "tsesnet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [v["val_dice"] for v in info["versions"]] == [0.5, 0.4, 0.6, 0.95]
    assert info["versions"][2]["aliases"] == ["champion"]

    assert [v["protocol"] for v in info["versions"]] == [_protocol().digest] * 3 + [
        _protocol(fold=1).digest
    ]
    assert info["versions"][0]["val_hd95"] == 3.5 and info["versions"][0]["val_sensitivity"] == 0.75

    assert main(["models", "show", "tsesnet"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:7] == ["version", "aliases", "protocol", "cases", "val", "DSC", "HD95"]
    assert table[4].split()[:7] == ["3", "champion", _protocol().digest[:8], "2", "0.6000",
                                    "3.50", "0.7500"]  # fmt: skip

    args = ["models", "promote", "tsesnet", "1", "--alias", "champion", "--reason", "re-read"]
    assert main(args) == 0
    assert "(was version 3)" in capsys.readouterr().out
    assert _same_output(registry.load_model("models:/tsesnet@champion").model, net1)
    # Who moved it, when and why, on both versions (tags and description).
    client = mlflow.MlflowClient()
    won, lost = client.get_model_version("tsesnet", "1"), client.get_model_version("tsesnet", "3")
    assert won.tags["promoted_champion_reason"] == "re-read" and won.tags["promoted_champion_by"]
    assert won.tags["promoted_champion_at"].startswith("20")
    assert lost.tags["demoted_champion_reason"] == "re-read"
    assert "moved here from v3" in won.description and "moved from here to v1" in lost.description
    assert "registered_as" in lost.tags  # what registration decided stays, labelled as such
    assert main(["models", "promote", "tsesnet", "1", "--alias", "v2"]) == 2
    assert "reserved" in capsys.readouterr().err
    assert main(["models", "promote", "tsesnet", "99", "--alias", "champion"]) == 2
    assert "no version 99" in capsys.readouterr().err
    assert main(["models", "show", "nope"]) == 2

    with pytest.raises(InputError):
        registry.load_model("models:/nope@champion")


def test_a_model_registered_before_the_restructure_still_loads(tmp_path):
    """Its model_config.json names the phase selection `input_phases` (today: `phases`), and its
    stored pyfunc imports `load_model_files` from `tsesnet.registry`."""
    import importlib

    from tsesnet.model import build_model

    torch.manual_seed(0)
    net = build_model("tiny", "early", phases=(2,)).eval()
    cfg = dataclasses.asdict(net.config)
    cfg["input_phases"] = cfg.pop("phases")
    d = tmp_path / "model" / "artifacts"
    d.mkdir(parents=True)
    torch.save(net.state_dict(), d / "weights.pt")
    (d / "model_config.json").write_text(
        json.dumps({"format": "tsesnet-weights-v1", "model_config": cfg, "patch": [16, 32, 32]})
    )
    loaded = registry.load_model(str(tmp_path / "model"))
    assert loaded.model.config.phases == (2,)
    assert _same_output(loaded.model, net)
    old_path = importlib.import_module("tsesnet.registry")
    again = old_path.load_model_files(d / "weights.pt", d / "model_config.json")
    assert _same_output(again.model, net)


def test_versions_registered_before_protocols_read_and_keep_the_champion(tracking_db, capsys):
    """A registry written before protocols were recorded (no `protocol` tags): `models show`
    lists "unknown", and a new version with a better Dice does not take @champion from such a
    champion silently: it is @challenger, saying why in one line."""
    import mlflow

    client = mlflow.MlflowClient()
    name = "old-registry"
    old = _register_named(tracking_db, name, 0.30, None)
    assert old.alias == "champion"  # the first version: nothing to compare with
    for key in [k for k in client.get_model_version(name, old.version).tags if "." in k or k ==
                "protocol"]:  # fmt: skip
        client.delete_model_version_tag(name, old.version, key)  # as written before protocols
    new = _register_named(tracking_db, name, 0.90, _protocol())
    assert new.alias == "challenger"
    assert new.reason.startswith("champion v1 has no recorded validation protocol")
    assert str(client.get_model_version_by_alias(name, "champion").version) == old.version
    capsys.readouterr()
    assert main(["models", "show", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [v["protocol"] for v in info["versions"]] == ["unknown", _protocol().digest]
    assert main(["models", "show", name]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[2] == "unknown"


def _register_named(db, name, dice, validation):
    import mlflow

    from tsesnet.model import build_model

    net = build_model("tiny")
    run = mlflow.MlflowClient().create_run(db.experiment_id, run_name=name)
    return registry.log_and_register(
        run_id=run.info.run_id, weights=net.state_dict(), model_config=dataclasses.asdict(
            net.config), patch=(16, 32, 32), phases=3, val_dice=dice, name=name,
        lineage={"store": "/s", **LINEAGE}, validation=validation,
    )  # fmt: skip


def test_a_registration_whose_process_died_does_not_block_the_gate(tracking_db):
    """A version left pending by a registering process that died (kill -9) is marked abandoned,
    never aliased, and the next registration goes on at once instead of waiting for it."""
    import socket
    import time

    import mlflow

    client = mlflow.MlflowClient()
    name = "died-mid-registration"
    first = _register_named(tracking_db, name, 0.30, _protocol())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = mlflow.register_model(
        f"models:/{name}/{first.version}", name,
        tags={"tsesnet.gate": "pending", "tsesnet.gate_holder":
              f"{socket.gethostname()} pid {dead.pid}", "val_dice": "0.99"},
    )  # fmt: skip
    t0 = time.monotonic()
    new = _register_named(tracking_db, name, 0.50, _protocol())
    assert time.monotonic() - t0 < 60
    assert (new.alias, new.replaced) == ("champion", first.version)
    left = client.get_model_version(name, stale.version)
    assert left.tags["tsesnet.gate"] == "abandoned" and not left.aliases
    assert "Registration abandoned" in left.description
