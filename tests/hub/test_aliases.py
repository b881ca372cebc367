"""Rule 3: aliases, their recorded history and rollback; rm and gc."""

import shutil

import pytest

from hotswap.hub import InUseError, InvalidMetadata, InvalidName, NotFoundError


@pytest.fixture
def three_versions(registry, make_adapter):
    for seed in (1, 2, 3):
        registry.publish(make_adapter(seed=seed), name="sql")
    return registry


def test_alias_moves_are_recorded_and_rolled_back(three_versions):
    reg = three_versions
    reg.alias("sql@1", "prod")
    assert reg.resolve("sql@prod").version == 1
    reg.alias("sql@3", "prod")
    assert reg.resolve("sql@prod").version == 3
    moves = [(e.from_version, e.to_version) for e in reg.alias_history("sql") if e.alias == "prod"]
    assert moves == [(None, 1), (1, 3)]
    latest_moves = [(e.from_version, e.to_version) for e in reg.alias_history("sql") if e.alias == "latest"]
    assert latest_moves == [(None, 1), (1, 2), (2, 3)]
    assert reg.rollback("sql", "prod").version == 1
    assert reg.resolve("sql@prod").version == 1
    assert reg.aliases("sql") == {"latest": 3, "prod": 1}


def test_alias_errors(three_versions, make_adapter):
    reg = three_versions
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        reg.resolve("sql@staging")
    with pytest.raises(NotFoundError, match="no version 9"):
        reg.alias("sql@9", "prod")
    with pytest.raises(NotFoundError, match="nearest: sql"):
        reg.resolve("sqll")
    with pytest.raises(InvalidMetadata, match="latest"):
        reg.unalias("sql", "latest")
    with pytest.raises(NotFoundError, match="no earlier target"):
        reg.rollback("sql", "prod")
    # `sql@7` always reads as version 7: an alias named 7 could never be reached
    with pytest.raises(InvalidName, match="alias '7' is a number"):
        reg.alias("sql@1", "7")
    with pytest.raises(InvalidName, match="alias '12' is a number"):
        reg.publish(make_adapter(seed=9), name="sql", aliases=["12"])
    assert "7" not in reg.aliases("sql") and "12" not in reg.aliases("sql") and len(reg.versions("sql")) == 3
    assert reg.alias("sql@1", "v7").version == 1  # digits beside a letter are fine


def test_rm_refused_while_aliased_then_gc(three_versions):
    reg = three_versions
    reg.alias("sql@2", "prod")
    with pytest.raises(InUseError, match="aliases prod point at it"):
        reg.remove("sql@2")
    with pytest.raises(InUseError, match="aliases latest"):
        reg.remove("sql@3")
    reg.remove("sql@1")
    with pytest.raises(NotFoundError, match="versions: 2, 3"):
        reg.resolve("sql@1")
    reg.remove("sql@3", force=True)
    assert reg.resolve("sql").version == 2  # latest falls back to the newest remaining version
    count, freed = reg.gc()
    assert count == 2 and freed > 0  # the weights of @1 and @3 (their configs are identical to @2's)
    assert reg.verify() == []
    assert reg.open("sql@prod").path.is_dir()
    # version numbers are never reused
    copy = shutil.copytree(reg.open("sql@2").path, reg.home.parent / "copy")  # copies link targets
    assert reg.publish(copy, name="other").version.ref == "other@1"


def test_base_with_dependents_is_not_removed(registry, make_adapter):
    registry.publish(make_adapter(), name="sql")
    registry.alias("tiny@1", "prod")
    registry.unalias("tiny", "prod")
    with pytest.raises(InUseError):
        registry.remove("tiny@1")
