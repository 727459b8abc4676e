"""scripts/gen_settings_docs.py: config/service.yaml, the README settings table
and the Helm chart's settings are generated from the one definition in
service/settings.py, and must match it. When a setting changes, run
``python scripts/gen_settings_docs.py`` and commit the result."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from brainline.service.settings import BY_ENV, BY_NAME, GATEWAY, SETTINGS, WORKER
from tests.helm_render import render_chart

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "brainline"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_settings_docs", ROOT / "scripts" / "gen_settings_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_up_to_date(gen):
    stale = [str(p.relative_to(ROOT)) for p, text in gen.outputs().items() if p.read_text() != text]
    assert not stale, f"{', '.join(stale)} out of date: run python scripts/gen_settings_docs.py"


def test_service_yaml_lists_every_default(gen):
    loaded = yaml.safe_load((ROOT / "config" / "service.yaml").read_text())
    assert loaded == {s.name: gen.raw_default(s) for s in SETTINGS}


def test_readme_table_names_every_setting_and_its_links_resolve(gen):
    text = (ROOT / "README.md").read_text()
    block = text[text.index(gen.README_START):text.index(gen.README_END)]
    rows = re.findall(r"^\| `(BRAINLINE_[A-Z0-9_]+)` \| ([^|]*) \|", block, re.M)
    documented = {name for name, _ in rows}
    assert {s.env for s in SETTINGS} <= documented
    assert dict(rows)["BRAINLINE_DICOM_PORT"].strip() == "`11112`"
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", block):
        assert anchor in headings, f"README has no heading for #{anchor}"


def test_helm_settings_reach_exactly_the_pods_that_read_them(gen):
    values = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]
    assert values and set(values) <= set(BY_ENV) and all(v == "" for v in values.values())
    assert not [k for k in values if BY_ENV[k].secret or BY_ENV[k].name in gen.CHART_SET]
    everything = {k: ("0" if isinstance(BY_ENV[k].default, (int, float)) else "x") for k in values}
    docs = render_chart(CHART, {"settings": everything, "gpuWorker": {"enabled": True}})
    pods = {d["metadata"]["name"].rsplit("-", 1)[-1]: d["spec"]["template"]["spec"]["containers"][0]
            for d in docs if d["kind"] == "Deployment"}
    assert set(pods) == {"gateway", "worker"} or len(pods) == 3
    for name, container in pods.items():
        env = {e["name"]: e for e in container["env"]}
        assert len(env) == len(container["env"]), f"{name}: a variable is set twice"
        reader = GATEWAY if name == "gateway" else WORKER
        for key in values:
            wanted = BY_ENV[key].used_by in (reader, "both")
            assert (key in env) == wanted, (name, key)
            if wanted:
                assert env[key]["value"] == everything[key]


def test_helm_passes_only_given_settings_and_secrets_by_reference(gen):
    docs = render_chart(CHART, {"settings": {"BRAINLINE_AE_TITLE": "SITE_BL", "BRAINLINE_REFERENCE_ROLE": "flair"}})
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("gateway"))
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BRAINLINE_AE_TITLE"]["value"] == "SITE_BL" and env["BRAINLINE_REFERENCE_ROLE"]["value"] == "flair"
    assert "BRAINLINE_STABLE_SECONDS" not in env  # empty: the packaged default
    for s in SETTINGS:
        if s.secret and s.used_by != WORKER:
            ref = env[s.env]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "brainline-secrets" and ref["key"] == s.env
    text = "".join(p.read_text() for p in (CHART / "templates").iterdir())
    for name in gen.CHART_SET:  # the chart really sets what it says it sets (worker_*: command-line options)
        assert f"name: {BY_NAME[name].env}," in text or f'"--{name.removeprefix("worker_")}"' in text, name


def test_check_fails_when_a_file_is_out_of_date(gen, monkeypatch, tmp_path):
    stale = tmp_path / "service.yaml"
    stale.write_text("home: ./elsewhere\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "outputs", lambda: {stale: gen.render_service_yaml()})
    assert gen.main(["--check"]) == 1 and stale.read_text() == "home: ./elsewhere\n"
    assert gen.main([]) == 0 and yaml.safe_load(stale.read_text())["home"] == "./var"
    assert gen.main(["--check"]) == 0
