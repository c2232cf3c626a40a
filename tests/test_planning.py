"""Pure planning: what to build, which labs to run, what to do with the hub."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from olab.models import HubDeployment, ImageRef, LabResult, LabSource
from olab.planning import (
    StaleLock,
    check_lock,
    hub_config_hash,
    image_tag,
    lab_cache_key,
    lock_header,
    plan_build,
    plan_hub,
    plan_labs,
)

IMAGE = ImageRef(name="u", tag="a" * 16, digest="sha256:" + "a" * 64, location="/envs/u")


def deployment(config_hash: str) -> HubDeployment:
    return HubDeployment(url="http://127.0.0.1:1", pid=1, config_hash=config_hash, image=IMAGE, started_at=datetime.now(UTC))


def test_image_tag_depends_on_every_input():
    base = {"requirements.in": b"numpy\n", "requirements.lock": b"numpy==2\n"}
    tag = image_tag(base, "3.11.7", "venv")
    assert tag == image_tag(dict(reversed(base.items())), "3.11.7", "venv")
    assert tag != image_tag({**base, "requirements.lock": b"numpy==3\n"}, "3.11.7", "venv")
    assert tag != image_tag({**base, "extra.txt": b""}, "3.11.7", "venv")
    assert tag != image_tag(base, "3.12.0", "venv")
    assert tag != image_tag(base, "3.11.7", "buildah")


def test_plan_build_reuses_only_the_same_tag():
    assert plan_build("a" * 64, None).build
    assert not plan_build("a" * 64, IMAGE).build
    assert plan_build("b" * 64, IMAGE).build


def test_lock_check():
    source = b"numpy\n"
    check_lock(source, lock_header(source) + "numpy==2\n", Path("x.lock"))
    with pytest.raises(StaleLock, match="made from another requirements.in"):
        check_lock(b"scipy\n", lock_header(source) + "numpy==2\n", Path("x.lock"))
    with pytest.raises(StaleLock, match="no '# olab-input-sha256:' header"):
        check_lock(source, "numpy==2\n", Path("x.lock"))


def test_plan_labs_reruns_failures_and_unknown_labs():
    labs = [LabSource(name=n, path=Path(f"{n}.md"), content_hash=n * 8) for n in ("a", "b", "c")]
    cached = {
        "a": LabResult(lab="a", status="passed", seconds=1.0),
        "b": LabResult(lab="b", status="failed", seconds=1.0, error="x"),
    }
    plan = plan_labs(labs, cached)
    assert [lab.name for lab in plan.to_run] == ["b", "c"]
    assert [r.lab for r in plan.reused] == ["a"] and plan.reused[0].cached


def test_lab_cache_key_changes_with_image_lab_and_timeout():
    lab = LabSource(name="a", path=Path("a.md"), content_hash="1" * 64)
    other_image = IMAGE.model_copy(update={"digest": "sha256:" + "b" * 64})
    keys = {
        lab_cache_key(IMAGE, lab, 60),
        lab_cache_key(other_image, lab, 60),
        lab_cache_key(IMAGE, lab.model_copy(update={"content_hash": "2" * 64}), 60),
        lab_cache_key(IMAGE, lab, 61),
    }
    assert len(keys) == 4


def test_plan_hub():
    assert plan_hub("h", None, running=False) == "start"
    assert plan_hub("h", deployment("h"), running=False) == "start"
    assert plan_hub("h", deployment("h"), running=True) == "unchanged"
    assert plan_hub("h2", deployment("h"), running=True) == "restart"


def test_hub_config_hash_covers_settings_template_and_labs():
    settings = {"port": 1, "admins": ["a"]}
    h = hub_config_hash(settings, "t", "l")
    assert h == hub_config_hash(dict(reversed(settings.items())), "t", "l")
    assert len({h, hub_config_hash({**settings, "port": 2}, "t", "l"), hub_config_hash(settings, "t2", "l"), hub_config_hash(settings, "t", "l2")}) == 4
