"""The management API that Knock's CLI calls says which audiences Knock cannot hold: an audience
with event conditions (our extension) carries `knock_extensions`, a read-only field that
`knock audience pull` writes under `__readonly`, naming each condition."""

from __future__ import annotations

import json
import os
import shutil

import httpx
from api_server import running_server
from condition_harness import ROOT

from audiences.api.app import close_app

FREQUENT = json.loads(
    (ROOT / "data" / "audiences" / "frequent-buyers" / "audience.json").read_text()
)
PRO = {
    "name": "Pro",
    "type": "dynamic",
    "segments": [
        {"conditions": [{"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}]}
    ],
}


def test_event_conditions_are_named_as_not_pushable_to_knock(
    tmp_path, monkeypatch, dbt_project_copy
):
    from audiences.api.app import asgi_app
    from audiences.api.management import create_service_token
    from audiences.settings import Settings
    from audiences.store.database import MembershipStore

    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    # A copy of its own: no test writes the repository's (or the session's) `target/`.
    project = shutil.copytree(dbt_project_copy, tmp_path / "dbt_project")
    monkeypatch.setenv("AUDIENCES_DBT_PROJECT", str(project))
    definitions = tmp_path / "audiences"
    definitions.mkdir()
    settings = Settings.from_env(
        duckdb_path=tmp_path / "warehouse.duckdb",
        definitions_dir=definitions,
        store_url=f"sqlite:///{tmp_path}/store.sqlite",
    )
    token = create_service_token(MembershipStore(settings.store_url).create(), "test")[1]
    app = asgi_app(settings)
    with (
        running_server(app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        answers = {
            key: http.put(f"/v1/audiences/{key}/validate", json={"audience": document})
            for key, document in {"frequent": FREQUENT, "pro": PRO}.items()
        }
        assert all(answer.status_code == 200 for answer in answers.values()), answers
        extensions = answers["frequent"].json()["audience"]["knock_extensions"]
        assert len(extensions) == 1
        assert extensions[0].startswith("$.segments[0].conditions[0].operator: `performed`")
        assert "cannot be pushed to Knock" in extensions[0]
        assert "knock_extensions" not in answers["pro"].json()["audience"]

        pushed = http.put("/v1/audiences/frequent", json={"audience": FREQUENT})
        assert pushed.status_code == 200, pushed.text
        listed = http.get("/v1/audiences", params={"annotate": "true"}).json()["entries"]
        (frequent,) = [entry for entry in listed if entry["key"] == "frequent"]
        assert frequent["knock_extensions"] == extensions
        assert "knock_extensions" in frequent["__annotation"]["readonly_fields"]
    close_app(app.app)
