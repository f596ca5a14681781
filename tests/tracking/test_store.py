"""petpipe.tracking.store: where the store is (the repo root, also from a DVC temp workspace) and the health probe."""

import pytest

from petpipe.tracking.store import (
    TrackingError,
    check_tracking,
    default_artifact_location,
    ensure_experiment,
    repo_root,
    tracking_uri,
)


def test_repo_root_from_dvc_root_and_from_a_dvc_temp_workspace(tmp_path):
    assert repo_root({"DVC_ROOT": str(tmp_path)}) == tmp_path.resolve()
    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    assert repo_root({"DVC_ROOT": str(workspace)}) == (tmp_path / "repo").resolve()


def test_default_store_is_sqlite_at_the_repo_root_and_env_overrides(tmp_path):
    env = {"DVC_ROOT": str(tmp_path)}
    assert tracking_uri(env) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_artifact_location(env) == (tmp_path.resolve() / "mlartifacts").as_uri()
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000"
    assert tracking_uri(env) == "http://127.0.0.1:5000" and default_artifact_location(env) is None


def test_a_closed_port_fails_in_seconds_naming_the_uri_and_the_fix():
    import time

    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        check_tracking(uri)
    assert time.monotonic() - started < 10
    assert uri in str(err.value) and "unset MLFLOW_TRACKING_URI" in str(err.value) and "\n" not in str(err.value)


def test_an_experiment_created_by_a_concurrent_stage_is_taken_not_an_error(mlflow_template, tmp_path):
    """Two queued experiments' stages both look the experiment up, find none, and both create it: the second
    create fails in the store (unique name), and ensure_experiment returns the first one's id."""
    from conftest import copy_store
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{copy_store(mlflow_template, tmp_path / 'mlflow.db')}"
    client = MlflowClient(uri)

    class LooksUpBeforeTheOtherCreates:
        """The real client, except that its first lookup happened before the other stage's create."""

        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return client.get_experiment_by_name(name)

        def __getattr__(self, attribute):
            return getattr(client, attribute)

    winner = client.create_experiment("petpipe", artifact_location=(tmp_path / "artifacts").as_uri())
    assert ensure_experiment(LooksUpBeforeTheOtherCreates(), "petpipe", (tmp_path / "artifacts").as_uri()) == winner
    assert [e.name for e in client.search_experiments()].count("petpipe") == 1
