"""An API service over temporary stores (development and production), with keys for each."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from api_server import running_server

from audiences.api.app import close_app


@dataclass
class Service:
    url: str
    folder: Path
    development_key: str
    production_key: str
    settings: object

    def environment(self, name: str):
        return self.app_environments[name]

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.development_key}"}


def write_definitions(folder: Path) -> Path:
    definitions = folder / "audiences"
    for key, definition in {
        "newsletter": {"name": "Newsletter", "type": "static", "description": "static members"},
        "pro-plan": {
            "name": "Pro plan",
            "type": "dynamic",
            "segments": [
                {
                    "conditions": [
                        {"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}
                    ]
                }
            ],
        },
    }.items():
        (definitions / key).mkdir(parents=True)
        (definitions / key / "audience.json").write_text(json.dumps(definition))
    guides = folder / "guides" / "upgrade-banner"
    guides.mkdir(parents=True)
    (guides / "guide.json").write_text(
        json.dumps(
            {
                "target_audience_key": "newsletter",
                "tenancy_strict": True,
                "target_property_conditions": {
                    "all": [
                        {"variable": "recipient.plan", "operator": "equal_to", "argument": "free"}
                    ]
                },
            }
        )
    )
    (folder / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    return definitions


@pytest.fixture
def service_settings(tmp_path, monkeypatch):
    from audiences.settings import Settings

    postgres = os.environ.get("AUDIENCES_TEST_STORE_URL")
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    definitions = write_definitions(tmp_path)
    monkeypatch.setenv(
        "AUDIENCES_STORE_URL_PRODUCTION", f"sqlite:///{tmp_path}/production/store.sqlite"
    )
    # Production evaluates only promoted definitions (audiences/lifecycle/); here both
    # environments serve the same folder, as if every definition had been promoted.
    monkeypatch.setenv("AUDIENCES_DEFINITIONS_PRODUCTION", str(definitions))
    # With AUDIENCES_TEST_STORE_URL naming a PostgreSQL database, the development environment's
    # store is that database (emptied first), so the API's SQL runs on PostgreSQL too.
    if postgres:
        from audiences.store.database import MembershipStore, metadata

        emptied = MembershipStore(postgres)
        metadata.drop_all(emptied.engine)
        emptied.dispose()
    return Settings.from_env(
        duckdb_path=tmp_path / "warehouse.duckdb",
        definitions_dir=definitions,
        store_url=postgres or None,
    )


def start_service(settings, folder: Path):
    from audiences.api.app import asgi_app
    from audiences.api.keys import create_key
    from audiences.store.database import MembershipStore

    secrets = {}
    for environment in ("development", "production"):
        store = MembershipStore(settings.store_url_for(environment)).create()
        secrets[environment] = create_key(store, environment, "tests")[1]
        store.dispose()
    development, production = secrets["development"], secrets["production"]
    app = asgi_app(settings)
    return app, development, production


@pytest.fixture
def service(service_settings, tmp_path):
    app, development, production = start_service(service_settings, tmp_path)
    with running_server(app) as url:
        service = Service(url, tmp_path, development, production, service_settings)
        service.app_environments = app.app.state.environments
        yield service
    close_app(app.app)
