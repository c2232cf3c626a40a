"""The run forms in the Prefect UI explain every parameter of every deployed flow
(Prefect reads the descriptions from the flows' docstrings, Google style)."""

from __future__ import annotations

import pytest
import yaml
from prefect.utilities.callables import parameter_schema

from olab.serve import load_flow
from tests.conftest import REPO

DEPLOYED = sorted({d["entrypoint"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]})


@pytest.mark.parametrize("entrypoint", DEPLOYED)
def test_every_parameter_of_a_deployed_flow_is_explained(entrypoint):
    flow = load_flow(entrypoint)
    schema = parameter_schema(flow.fn)
    missing = [name for name, prop in schema.properties.items() if not prop.get("description")]
    assert schema.properties and not missing, f"{entrypoint}: parameters without a description in the run form: {missing}"
    assert "site's name" in schema.properties["site"]["description"]
