"""tasks/kubernetes.py against a real cluster: only when one is given.

OLAB_KUBECONFIG names a kubeconfig (provision-cluster writes one to <runtime>/kubeconfig),
OLAB_NAMESPACE the hub's namespace (default olab). Read-only: nothing is changed."""

from __future__ import annotations

import os

import pytest

from tasks.kubernetes import api_from_kubeconfig, failing_pods, helm_releases, stuck_release, user_claims

KUBECONFIG = os.environ.get("OLAB_KUBECONFIG")
NAMESPACE = os.environ.get("OLAB_NAMESPACE", "olab")
pytestmark = pytest.mark.skipif(not KUBECONFIG, reason="live Kubernetes test: set OLAB_KUBECONFIG (and OLAB_NAMESPACE) to run it")


def test_a_real_cluster_answers_what_deploy_and_the_shutdown_read():
    with api_from_kubeconfig(KUBECONFIG) as api:
        revisions = helm_releases(api, NAMESPACE, "olab")
        assert all(r.release == "olab" for r in revisions)
        stuck = stuck_release(revisions)
        assert stuck is None or stuck.status.startswith("pending-")
        claims = user_claims(api, NAMESPACE)
        assert all(c.claim == "hub-db-dir" or c.kind == "user" for c in claims)
        for problem in failing_pods(api, NAMESPACE):
            assert problem.pod and problem.reason
